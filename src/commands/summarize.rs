//! `switchyard summarize PATH...`: the main job. Reads documents, publishes one summarization
//! job per document as one batch, runs an in-process worker when no worker is consuming, shows
//! progress, and writes one JSON line per document in input order.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

use super::publish::job_message;
use super::{BadInput, EXIT_JOBS_FAILED};
use crate::app::Context;
use crate::cli::SummarizeArgs;
use crate::config::Settings;
use crate::messages::{ChatMessage, ChatRequest, Job, JobResult, JobStatus};
use crate::queue::publisher::{Outgoing, Publisher};
use crate::queue::topology;
use crate::stages::ingest::is_name;
use crate::worker::{self, WorkerOptions};

/// The instruction sent with every document.
const PROMPT: &str =
    "Summarize the following document in a few sentences. Keep the key facts, names and numbers.";

/// One output line.
#[derive(Debug, Serialize)]
struct SummaryLine<'a> {
    path: &'a str,
    job_id: Uuid,
    status: JobStatus,
    summary: Option<&'a str>,
    provider: Option<&'a str>,
    model: Option<&'a str>,
    cost_usd: String,
    error: Option<String>,
}

/// Every `.txt`/`.md` file named or found under a named directory, sorted per argument.
pub fn collect_documents(paths: &[PathBuf]) -> Result<Vec<PathBuf>, BadInput> {
    let mut documents = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut found = Vec::new();
            walk(path, &mut found)
                .map_err(|e| BadInput(format!("cannot read {}: {e}", path.display())))?;
            found.sort();
            documents.extend(found);
        } else if path.is_file() {
            documents.push(path.clone());
        } else {
            return Err(BadInput(format!("{} does not exist", path.display())));
        }
    }
    if documents.is_empty() {
        return Err(BadInput("no .txt or .md documents found".to_owned()));
    }
    Ok(documents)
}

fn walk(dir: &Path, found: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, found)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("txt" | "md")
        ) {
            found.push(path);
        }
    }
    Ok(())
}

pub async fn run(settings: Settings, args: SummarizeArgs) -> anyhow::Result<ExitCode> {
    let documents = collect_documents(&args.paths)?;
    let batch = args.batch.clone().unwrap_or_else(|| {
        format!(
            "summarize-{}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S%3f")
        )
    });
    for (what, value) in [("--batch", &batch), ("--tenant", &args.tenant)] {
        if !is_name(value) {
            return Err(BadInput(format!(
                "{what} {value:?} may only contain letters, digits, '_' and '-'"
            ))
            .into());
        }
    }
    let mut jobs = Vec::with_capacity(documents.len());
    for path in &documents {
        let text = std::fs::read_to_string(path)
            .map_err(|e| BadInput(format!("cannot read {} as UTF-8 text: {e}", path.display())))?;
        let request = ChatRequest {
            messages: vec![
                ChatMessage::text_message("system", PROMPT),
                ChatMessage::text_message("user", text),
            ],
            max_tokens: Some(args.max_tokens),
            ..ChatRequest::default()
        };
        let mut job = Job::new(&args.tenant, Some(&batch), &args.route, request);
        job.metadata = Some(json!({ "path": path.display().to_string() }));
        jobs.push(job);
    }

    let ctx = Context::connect(settings).await?;
    ctx.cancel_on_signals();
    let outcome = summarize(&ctx, &args, &batch, &documents, &jobs).await;
    ctx.shutdown.cancel();
    ctx.tasks.close();
    ctx.close().await;
    outcome
}

async fn summarize(
    ctx: &Context,
    args: &SummarizeArgs,
    batch: &str,
    documents: &[PathBuf],
    jobs: &[Job],
) -> anyhow::Result<ExitCode> {
    // Listen before publishing so no result can slip past.
    let channel = ctx.broker.create_channel().await?;
    let pattern = format!("{}.{batch}.*", args.tenant);
    let mut results =
        crate::queue::listen(&channel, &ctx.names.results_exchange(), &pattern).await?;

    let (_, consumers) = topology::jobs_queue_depth(&channel, &ctx.names).await?;
    let local_worker = (consumers == 0).then(|| {
        let worker_ctx = Context {
            shutdown: ctx.shutdown.child_token(),
            ..ctx.clone()
        };
        let options = WorkerOptions {
            concurrency: ctx.settings.worker.concurrency,
            exit_when_idle: false,
            idle_after: Duration::from_secs(1),
            grace: Duration::from_secs(ctx.settings.worker.shutdown_grace_secs),
        };
        let stop = worker_ctx.shutdown.clone();
        let handle = ctx
            .tasks
            .spawn(async move { worker::run(&worker_ctx, &options).await });
        (stop, handle)
    });
    if local_worker.is_none() {
        eprintln!("summarize: {consumers} worker(s) are consuming; publishing to them");
    }

    let publisher = Publisher::open(&ctx.broker).await?;
    let messages: Vec<Outgoing> = jobs
        .iter()
        .map(|job| job_message(&ctx.names, job))
        .collect();
    publisher
        .publish_all(&messages)
        .await
        .context("cannot publish the batch")?;

    let progress = Progress::new(jobs.len() as u64);
    let mut pending: HashMap<Uuid, usize> =
        jobs.iter().enumerate().map(|(i, j)| (j.id, i)).collect();
    let mut collected: Vec<Option<JobResult>> = vec![None; jobs.len()];
    let mut failed = 0u64;
    let mut cost = Decimal::ZERO;
    let every = Duration::from_secs(2);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    while !pending.is_empty() {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => {
                progress.finish();
                anyhow::bail!("interrupted with {} of {} documents unfinished; their jobs stay queued", pending.len(), jobs.len());
            }
            _ = tick.tick() => progress.line(cost, failed),
            next = results.next() => {
                let Some(delivery) = next else { anyhow::bail!("the results subscription closed") };
                let delivery = delivery?;
                let Ok(result) = serde_json::from_slice::<JobResult>(&delivery.data) else { continue };
                let Some(index) = pending.remove(&result.job_id) else { continue };
                if result.status != JobStatus::Succeeded {
                    failed += 1;
                }
                cost += result.cost.amount_usd;
                progress.advance(cost, failed);
                collected[index] = Some(result);
            }
        }
    }
    progress.finish();
    if let Some((stop, handle)) = local_worker {
        stop.cancel();
        handle.await.context("the in-process worker panicked")??;
    }

    drop(results);
    if let Err(error) = channel.close(200, "done".into()).await {
        tracing::debug!(error = %error, "Results channel was already closed.");
    }
    if let Err(error) = publisher.channel().close(200, "done".into()).await {
        tracing::debug!(error = %error, "Publisher channel was already closed.");
    }
    write_output(&args.out, documents, jobs, &collected)?;
    eprintln!(
        "summarize: {} documents, {} succeeded, {failed} failed, cost ${cost} (batch {batch})",
        jobs.len(),
        jobs.len() as u64 - failed
    );
    for (path, result) in documents.iter().zip(&collected) {
        if let Some(error) = result.as_ref().and_then(|r| r.error.as_ref()) {
            eprintln!(
                "  failed: {}: {}: {}",
                path.display(),
                error.code,
                error.message
            );
        }
    }
    Ok(if failed > 0 {
        ExitCode::from(EXIT_JOBS_FAILED)
    } else {
        ExitCode::SUCCESS
    })
}

fn write_output(
    out: &str,
    documents: &[PathBuf],
    jobs: &[Job],
    results: &[Option<JobResult>],
) -> anyhow::Result<()> {
    let mut writer: Box<dyn Write> = if out == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(std::io::BufWriter::new(
            std::fs::File::create(out).with_context(|| format!("cannot create {out}"))?,
        ))
    };
    for ((path, job), result) in documents.iter().zip(jobs).zip(results) {
        let path = path.display().to_string();
        let line = match result {
            Some(result) => SummaryLine {
                path: &path,
                job_id: job.id,
                status: result.status,
                summary: result.text(),
                provider: result.provider.as_deref(),
                model: result.model.as_deref(),
                cost_usd: result.cost.amount_usd.to_string(),
                error: result
                    .error
                    .as_ref()
                    .map(|e| format!("{}: {}", e.code, e.message)),
            },
            None => SummaryLine {
                path: &path,
                job_id: job.id,
                status: JobStatus::Failed,
                summary: None,
                provider: None,
                model: None,
                cost_usd: "0".to_owned(),
                error: Some("no result received".to_owned()),
            },
        };
        serde_json::to_writer(&mut writer, &line)?;
        writer.write_all(b"\n")?;
    }
    writer.flush()?;
    Ok(())
}

/// A progress bar on a terminal, plain periodic lines otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    done: std::cell::Cell<u64>,
}

impl Progress {
    fn new(total: u64) -> Self {
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
            done: std::cell::Cell::new(0),
        }
    }

    fn advance(&self, cost: Decimal, failed: u64) {
        self.done.set(self.done.get() + 1);
        if let Some(bar) = &self.bar {
            bar.set_position(self.done.get());
            bar.set_message(format!("{failed} failed, ${cost}"));
        }
    }

    fn line(&self, cost: Decimal, failed: u64) {
        if self.bar.is_none() {
            eprintln!(
                "summarize: {}/{} documents done, {failed} failed, cost ${cost}",
                self.done.get(),
                self.total
            );
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
