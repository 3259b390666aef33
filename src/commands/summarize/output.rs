//! What `summarize` shows while it runs (a progress bar, or plain lines off a terminal) and
//! what it writes at the end (JSONL or Markdown, one entry per document in input order).

use std::cell::Cell;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};
use rust_decimal::Decimal;
use serde::Serialize;
use uuid::Uuid;

use super::Document;
use crate::cli::SummaryFormat;
use crate::commands::BadInput;

/// How one document ended.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub summary: Option<String>,
    /// The job that produced the final summary.
    pub job_id: Option<Uuid>,
    pub provider: Option<String>,
    pub model: Option<String>,
    /// Pieces the document was split into (1 when it fit).
    pub chunks: usize,
    /// Jobs whose results this document used, map and reduce steps together.
    pub jobs: usize,
    pub cost: Decimal,
    pub tokens: u64,
    pub error: Option<String>,
}

/// One JSONL output line.
#[derive(Serialize)]
struct Line<'a> {
    path: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    status: &'a str,
    summary: Option<&'a str>,
    job_id: Option<Uuid>,
    provider: Option<&'a str>,
    model: Option<&'a str>,
    chunks: usize,
    jobs: usize,
    tokens: u64,
    cost_usd: String,
    error: Option<&'a str>,
}

/// Where the summaries go. A regular file is written as a temporary file beside it (beside
/// its target, when `--out` is a symbolic link), created before anything is published (a
/// place that cannot be written is found before any job is paid for) and renamed over it
/// once complete: a run that fails, or whose write fails, leaves a previous file whole, and
/// the temporary file is removed. The file keeps an existing file's permissions; a new one
/// gets the usual ones (0666 less the umask). What is not a regular file (`/dev/stdout`, a
/// pipe) is written in place at the end, and a directory is refused.
pub enum Destination {
    Stdout,
    Stream(PathBuf),
    File {
        out: PathBuf,
        temporary: tempfile::NamedTempFile,
    },
}

impl Destination {
    /// Opens `out` (`-` = stdout).
    pub fn open(out: &str) -> Result<Self, BadInput> {
        if out == "-" {
            return Ok(Self::Stdout);
        }
        let cannot = |e: &dyn std::fmt::Display| BadInput(format!("cannot write --out {out}: {e}"));
        let path = Path::new(out);
        let (target, permissions) = match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => {
                return Err(BadInput(format!("--out {out} is a directory")));
            }
            Ok(meta) if !meta.is_file() => return Ok(Self::Stream(path.to_path_buf())),
            Ok(meta) => (
                std::fs::canonicalize(path).map_err(|e| cannot(&e))?,
                Some(meta.permissions()),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (path.to_path_buf(), None),
            Err(e) => return Err(cannot(&e)),
        };
        let name = target
            .file_name()
            .ok_or_else(|| BadInput(format!("--out {out:?} names no file")))?;
        let dir = match target.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let prefix = format!(".{}.", name.to_string_lossy());
        let mut builder = tempfile::Builder::new();
        builder.prefix(&prefix).suffix(".partial");
        #[cfg(unix)]
        builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
        let temporary = builder.tempfile_in(dir).map_err(|e| cannot(&e))?;
        if let Some(permissions) = permissions {
            temporary
                .as_file()
                .set_permissions(permissions)
                .map_err(|e| cannot(&e))?;
        }
        Ok(Self::File {
            out: target,
            temporary,
        })
    }

    /// Writes every document's outcome, then puts the file in place.
    pub fn write(
        self,
        format: SummaryFormat,
        documents: &[Document],
        outcomes: &[Outcome],
    ) -> anyhow::Result<()> {
        match self {
            Self::Stdout => write(std::io::stdout().lock(), format, documents, outcomes),
            Self::Stream(out) => {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&out)
                    .with_context(|| format!("cannot write {}", out.display()))?;
                write(std::io::BufWriter::new(file), format, documents, outcomes)
                    .with_context(|| format!("cannot write {}", out.display()))
            }
            Self::File { out, temporary } => {
                let mut writer = std::io::BufWriter::new(temporary);
                write(&mut writer, format, documents, outcomes)
                    .with_context(|| format!("cannot write {}", out.display()))?;
                let temporary = writer.into_inner().map_err(|e| {
                    anyhow::anyhow!("cannot write {}: {}", out.display(), e.error())
                })?;
                temporary
                    .persist(&out)
                    .with_context(|| format!("cannot move the summaries into {}", out.display()))?;
                Ok(())
            }
        }
    }
}

/// Writes every document's outcome to `writer`.
fn write(
    mut writer: impl Write,
    format: SummaryFormat,
    documents: &[Document],
    outcomes: &[Outcome],
) -> anyhow::Result<()> {
    if format == SummaryFormat::Markdown {
        writeln!(writer, "# Summaries\n")?;
    }
    for (document, outcome) in documents.iter().zip(outcomes) {
        match format {
            SummaryFormat::Jsonl => {
                let line = Line {
                    path: &document.path,
                    id: document.id.as_deref(),
                    status: if outcome.error.is_some() {
                        "failed"
                    } else {
                        "succeeded"
                    },
                    summary: outcome.summary.as_deref(),
                    job_id: outcome.job_id,
                    provider: outcome.provider.as_deref(),
                    model: outcome.model.as_deref(),
                    chunks: outcome.chunks.max(1),
                    jobs: outcome.jobs,
                    tokens: outcome.tokens,
                    cost_usd: outcome.cost.to_string(),
                    error: outcome.error.as_deref(),
                };
                serde_json::to_writer(&mut writer, &line)?;
                writer.write_all(b"\n")?;
            }
            SummaryFormat::Markdown => {
                writeln!(writer, "## {}\n", document.label())?;
                match (&outcome.summary, &outcome.error) {
                    (_, Some(error)) => writeln!(writer, "**Failed:** {error}\n")?,
                    (Some(summary), None) => writeln!(writer, "{summary}\n")?,
                    (None, None) => writeln!(writer, "_No summary._\n")?,
                }
                writeln!(
                    writer,
                    "_{} · {} part(s) · {} tokens · ${}_\n",
                    match (&outcome.provider, &outcome.model) {
                        (Some(p), Some(m)) => format!("{p}/{m}"),
                        _ => "no model".to_owned(),
                    },
                    outcome.chunks.max(1),
                    outcome.tokens,
                    outcome.cost
                )?;
            }
        }
    }
    writer.flush()?;
    Ok(())
}

/// A progress bar on a terminal, plain periodic lines otherwise: documents done, failed and
/// total, tokens, cost so far, rate and ETA.
pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    done: Cell<u64>,
    failed: Cell<u64>,
    tokens: Cell<u64>,
    cost: Cell<Decimal>,
    started: std::time::Instant,
}

impl Progress {
    pub fn new(total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} documents {msg} ({per_sec}, eta {eta})",
            ) {
                bar.set_style(style);
            }
            bar
        });
        Self {
            bar,
            total,
            done: Cell::new(0),
            failed: Cell::new(0),
            tokens: Cell::new(0),
            cost: Cell::new(Decimal::ZERO),
            started: std::time::Instant::now(),
        }
    }

    /// One job's result arrived (a whole document or one step of it).
    pub fn step(&self, cost: Decimal, tokens: u64) {
        self.tokens.set(self.tokens.get() + tokens);
        self.cost.set(self.cost.get() + cost);
        self.refresh();
    }

    /// A document finished, `failed` or not.
    pub fn advance(&self, failed: bool) {
        self.done.set(self.done.get() + 1);
        if failed {
            self.failed.set(self.failed.get() + 1);
        }
        if let Some(bar) = &self.bar {
            bar.set_position(self.done.get());
        }
        self.refresh();
    }

    fn refresh(&self) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!(
                "{} failed, {} tokens, ${}",
                self.failed.get(),
                self.tokens.get(),
                self.cost.get()
            ));
        }
    }

    /// The periodic plain line (only when stderr is not a terminal).
    pub fn line(&self) {
        if self.bar.is_some() {
            return;
        }
        let done = self.done.get();
        let elapsed = self.started.elapsed().as_secs_f64();
        let rate = if elapsed > 0.0 {
            done as f64 / elapsed
        } else {
            0.0
        };
        let eta = if rate > 0.0 {
            format!("{:.0}s", (self.total - done) as f64 / rate)
        } else {
            "-".to_owned()
        };
        eprintln!(
            "summarize: {done}/{} documents done, {} failed, {} tokens, cost ${}, {rate:.1} docs/s, eta {eta}",
            self.total,
            self.failed.get(),
            self.tokens.get(),
            self.cost.get()
        );
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome() -> Outcome {
        Outcome {
            summary: Some("Short.".to_owned()),
            chunks: 1,
            jobs: 1,
            ..Outcome::default()
        }
    }

    fn document() -> Document {
        Document {
            path: "a.md".to_owned(),
            id: None,
            text: "Alpha.".to_owned(),
            unreadable: None,
        }
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// The file appears whole, or not at all: a run that ends without writing (it failed)
    /// leaves the previous summaries as they were and no temporary file behind.
    #[test]
    fn the_summaries_replace_the_previous_file_only_once_complete() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.jsonl");
        std::fs::write(&out, "previous\n").unwrap();
        let destination = Destination::open(out.to_str().unwrap()).unwrap();
        assert_eq!(entries(dir.path()).len(), 2, "the temporary file beside it");
        drop(destination);
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "previous\n");
        assert_eq!(entries(dir.path()), ["out.jsonl"]);

        Destination::open(out.to_str().unwrap())
            .unwrap()
            .write(SummaryFormat::Jsonl, &[document()], &[outcome()])
            .unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        assert!(text.starts_with("{\"path\":\"a.md\""), "{text}");
        assert_eq!(entries(dir.path()), ["out.jsonl"]);
    }

    /// A private file stays private, a link's target is written (the link stays a link),
    /// and what is not a regular file is written in place.
    #[test]
    fn permissions_links_and_devices_are_kept() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("private.jsonl");
        std::fs::write(&target, "previous\n").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.path().join("link.jsonl");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        Destination::open(link.to_str().unwrap())
            .unwrap()
            .write(SummaryFormat::Jsonl, &[document()], &[outcome()])
            .unwrap();
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        let written = std::fs::metadata(&target).unwrap();
        assert_eq!(written.permissions().mode() & 0o777, 0o600);
        assert!(std::fs::read_to_string(&target).unwrap().contains("a.md"));
        let null = Destination::open("/dev/null").unwrap();
        assert!(matches!(null, Destination::Stream(_)));
        null.write(SummaryFormat::Jsonl, &[document()], &[outcome()])
            .unwrap();
        let Err(BadInput(error)) = Destination::open(dir.path().to_str().unwrap()) else {
            panic!("a directory was accepted");
        };
        assert!(error.contains("is a directory"), "{error}");
    }

    /// A place that cannot be written is found when the run starts, before anything is sent.
    #[test]
    fn an_output_in_a_missing_directory_is_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("missing").join("out.jsonl");
        let Err(BadInput(error)) = Destination::open(out.to_str().unwrap()) else {
            panic!("a missing directory was accepted");
        };
        assert!(error.contains("cannot write --out"), "{error}");
    }
}
