//! Reading the documents to summarize: files, directories, globs; `.txt`, `.md`, `.html`
//! (converted to text) and `.jsonl` (one `{"id", "text"}` document per line).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::commands::BadInput;

/// Extensions read from directories (and accepted for named files).
const EXTENSIONS: [&str; 5] = ["txt", "md", "html", "htm", "jsonl"];

/// One document.
#[derive(Debug, Clone)]
pub struct Document {
    /// The file it came from.
    pub path: String,
    /// Its `id` when it came from a JSONL file.
    pub id: Option<String>,
    pub text: String,
    /// Why the file could not be read as text (not UTF-8, HTML that would not convert, an
    /// I/O error): the document fails with this reason and is not sent; the others go on.
    pub unreadable: Option<String>,
}

impl Document {
    /// Stable identity within a batch: the path (and JSONL id) plus a hash of the text, so
    /// an edited document is summarized again on a resumed run.
    pub fn key(&self) -> String {
        let digest = Sha256::digest(self.text.as_bytes());
        let hash = hex::encode(&digest[..8]);
        match &self.id {
            Some(id) => format!("{}#{id}@{hash}", self.path),
            None => format!("{}@{hash}", self.path),
        }
    }

    /// How the document is named in output and errors.
    pub fn label(&self) -> String {
        match &self.id {
            Some(id) => format!("{}#{id}", self.path),
            None => self.path.clone(),
        }
    }
}

fn is_glob(text: &str) -> bool {
    text.contains(['*', '?', '['])
}

fn wanted(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Every file named, matched by a glob, or found under a named directory: in argument order,
/// sorted within a directory or glob. `out`, the file the summaries go to, is never one of
/// them: a run's output inside its input directory is not read back as a document when the
/// run is repeated (to resume it, or to retry its failures).
pub fn collect_files(arguments: &[String], out: &Path) -> Result<Vec<PathBuf>, BadInput> {
    let mut files = Vec::new();
    for argument in arguments {
        let path = Path::new(argument);
        let mut walked = HashSet::new();
        if path.is_dir() {
            let mut found = Vec::new();
            walk(path, &mut found, &mut walked)
                .map_err(|e| BadInput(format!("cannot read {}: {e}", path.display())))?;
            found.sort();
            files.extend(found);
        } else if path.is_file() {
            files.push(path.to_path_buf());
        } else if is_glob(argument) {
            let matches = glob::glob(argument)
                .map_err(|e| BadInput(format!("bad glob {argument:?}: {e}")))?;
            let mut found = Vec::new();
            for entry in matches {
                let entry = entry
                    .map_err(|e| BadInput(format!("cannot read a match of {argument:?}: {e}")))?;
                if entry.is_file() && wanted(&entry) {
                    found.push(entry);
                } else if entry.is_dir() {
                    walk(&entry, &mut found, &mut walked)
                        .map_err(|e| BadInput(format!("cannot read {}: {e}", entry.display())))?;
                }
            }
            if found.is_empty() {
                return Err(BadInput(format!(
                    "{argument:?} matches no .txt, .md, .html or .jsonl file"
                )));
            }
            found.sort();
            files.extend(found);
        } else {
            return Err(BadInput(format!("{argument} does not exist")));
        }
    }
    if let Some(out) = (out != Path::new("-"))
        .then(|| std::fs::canonicalize(out).ok())
        .flatten()
    {
        files.retain(|file| std::fs::canonicalize(file).ok().as_ref() != Some(&out));
    }
    if files.is_empty() {
        return Err(BadInput(
            "no .txt, .md, .html or .jsonl documents found".to_owned(),
        ));
    }
    Ok(files)
}

/// Collects the wanted files under `dir`. A directory reached twice within one argument (by
/// a symbolic link to a directory above it, or beside it) is walked once: a link loop would
/// otherwise be followed until the path is too long, every file in it collected once per turn.
fn walk(
    dir: &Path,
    found: &mut Vec<PathBuf>,
    walked: &mut HashSet<PathBuf>,
) -> std::io::Result<()> {
    if !walked.insert(std::fs::canonicalize(dir)?) {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, found, walked)?;
        } else if wanted(&path) {
            found.push(path);
        }
    }
    Ok(())
}

/// Reads every document of `files`.
pub fn read_all(files: &[PathBuf]) -> Result<Vec<Document>, BadInput> {
    let mut documents = Vec::with_capacity(files.len());
    for file in files {
        read(file, &mut documents)?;
    }
    if documents.is_empty() {
        return Err(BadInput("the input holds no documents".to_owned()));
    }
    Ok(documents)
}

/// Reads one file's documents. A JSONL line that is not a document is bad input (the list
/// itself is malformed); a file that cannot be read as text is one document that fails.
fn read(file: &Path, documents: &mut Vec<Document>) -> Result<(), BadInput> {
    let path = file.display().to_string();
    let extension = file
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let text = std::fs::read(file)
        .map_err(|e| format!("cannot read {path}: {e}"))
        .and_then(|bytes| match extension.as_deref() {
            Some("html" | "htm") => html2text::from_read(bytes.as_slice(), 200)
                .map_err(|e| format!("cannot convert {path} from HTML: {e}")),
            _ => String::from_utf8(bytes)
                .map_err(|e| format!("cannot read {path} as UTF-8 text: {e}")),
        });
    match (text, extension.as_deref()) {
        (Ok(text), Some("jsonl")) => {
            for (index, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                documents.push(jsonl_document(&path, index + 1, line)?);
            }
        }
        (text, _) => {
            let (text, unreadable) = match text {
                Ok(text) => (text, None),
                Err(reason) => (String::new(), Some(reason)),
            };
            documents.push(Document {
                path,
                id: None,
                text,
                unreadable,
            });
        }
    }
    Ok(())
}

fn jsonl_document(path: &str, number: usize, line: &str) -> Result<Document, BadInput> {
    let bad = |what: String| BadInput(format!("{path}: line {number}: {what}"));
    let value: Value =
        serde_json::from_str(line).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let id = match value.get("id") {
        Some(Value::String(id)) if !id.is_empty() => id.clone(),
        Some(Value::Number(id)) => id.to_string(),
        Some(_) => return Err(bad("id: must be a non-empty string or a number".to_owned())),
        None => return Err(bad("id: missing".to_owned())),
    };
    let text = match value.get("text") {
        Some(Value::String(text)) => text.clone(),
        Some(_) => return Err(bad("text: must be a string".to_owned())),
        None => return Err(bad("text: missing".to_owned())),
    };
    Ok(Document {
        path: path.to_owned(),
        id: Some(id),
        text,
        unreadable: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_html_and_globs_are_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.md"), "# A\n\nAlpha text.").unwrap();
        std::fs::write(
            dir.path().join("b.html"),
            "<html><head><style>p{}</style><script>var x=1;</script></head><body><h1>Title</h1><p>Beta &amp; gamma.</p></body></html>",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("c.jsonl"),
            "{\"id\":\"one\",\"text\":\"First.\"}\n\n{\"id\":2,\"text\":\"Second.\"}\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("skip.bin"), [0u8, 1, 2]).unwrap();
        let pattern = format!("{}/*", dir.path().display());
        let files = collect_files(&[pattern], Path::new("-")).unwrap();
        assert_eq!(files.len(), 3, "{files:?}");
        let documents = read_all(&files).unwrap();
        assert_eq!(documents.len(), 4);
        assert_eq!(documents[0].text, "# A\n\nAlpha text.");
        assert!(
            documents[1].text.contains("Beta & gamma."),
            "{}",
            documents[1].text
        );
        assert!(
            !documents[1].text.contains("var x"),
            "{}",
            documents[1].text
        );
        assert_eq!(documents[2].id.as_deref(), Some("one"));
        assert_eq!(documents[3].id.as_deref(), Some("2"));
        assert!(documents[3].label().ends_with("c.jsonl#2"));
        assert_ne!(documents[2].key(), documents[3].key());
    }

    #[test]
    fn bad_jsonl_lines_name_the_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("d.jsonl");
        std::fs::write(
            &file,
            "{\"id\":\"ok\",\"text\":\"x\"}\n{\"id\":\"no-text\"}\n",
        )
        .unwrap();
        let error = read_all(&[file]).unwrap_err().0;
        assert!(error.ends_with("line 2: text: missing"), "{error}");
    }

    /// The summaries of a run inside its input directory are not read back as documents
    /// when the run is repeated, and a link loop is walked once.
    #[test]
    fn the_output_file_and_a_directory_reached_again_are_not_collected() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.md"), "Alpha.").unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub").join("b.txt"), "Beta.").unwrap();
        std::os::unix::fs::symlink("..", dir.path().join("sub").join("up")).unwrap();
        let out = dir.path().join("out.jsonl");
        std::fs::write(&out, "{\"path\":\"a.md\",\"status\":\"succeeded\"}\n").unwrap();
        let argument = [dir.path().display().to_string()];
        let files = collect_files(&argument, &out).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|f| f.strip_prefix(dir.path()).unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["a.md", "sub/b.txt"]);
        // Named another way (relative, through the link), it is still the same file.
        let around = dir.path().join("sub").join("up").join("out.jsonl");
        assert_eq!(collect_files(&argument, &around).unwrap().len(), 2);
        // Any other output leaves it an input.
        assert_eq!(collect_files(&argument, Path::new("-")).unwrap().len(), 3);
    }

    /// One file that is not text fails as one document; the others are read.
    #[test]
    fn a_file_that_is_not_text_is_a_document_that_fails_not_the_whole_input() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), "Alpha.").unwrap();
        std::fs::write(dir.path().join("b.txt"), b"caf\xe9 au lait").unwrap();
        std::os::unix::fs::symlink("gone.md", dir.path().join("c.md")).unwrap();
        let files = [
            dir.path().join("a.txt"),
            dir.path().join("b.txt"),
            dir.path().join("c.md"),
        ];
        let documents = read_all(&files).unwrap();
        assert_eq!(documents.len(), 3);
        assert_eq!(documents[0].text, "Alpha.");
        assert!(documents[0].unreadable.is_none());
        let latin = documents[1].unreadable.as_deref().unwrap();
        assert!(latin.contains("b.txt as UTF-8 text"), "{latin}");
        let gone = documents[2].unreadable.as_deref().unwrap();
        assert!(
            gone.starts_with("cannot read ") && gone.contains("c.md"),
            "{gone}"
        );
    }

    #[test]
    fn a_glob_matching_nothing_is_a_clear_error() {
        let error = collect_files(&["/nonexistent-dir-xyz/*.md".to_owned()], Path::new("-"))
            .unwrap_err()
            .0;
        assert!(error.contains("matches no"), "{error}");
    }
}
