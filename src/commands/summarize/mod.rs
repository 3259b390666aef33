//! `switchyard summarize PATH...`: the main job. Reads documents, publishes summarization
//! jobs as one named batch, runs an in-process worker when no worker is consuming, shows
//! progress, and writes one line (or Markdown section) per document in input order.
//!
//! A document longer than the route's context window is split into pieces
//! ([`chunks::split`]); each piece is summarized, and the piece summaries are combined by a
//! final job — recursively, when even the summaries are too long (map-reduce). Every step is
//! a batch item keyed by the document's path and content hash, so re-running the same
//! `--batch` reuses every step that already has a result: nothing is sent to a provider
//! twice, and Ctrl-C leaves the batch resumable.

mod chunks;
mod documents;
mod output;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use futures::{FutureExt, StreamExt};
use rust_decimal::Decimal;
use serde_json::json;
use uuid::Uuid;

use super::publish::job_message;
use super::{BadInput, EXIT_JOBS_FAILED, Interrupted};
use crate::app::Context;
use crate::cli::{SummarizeArgs, SummaryFormat};
use crate::config::Settings;
use crate::messages::{ChatMessage, ChatRequest, Job, JobResult, JobStatus};
use crate::queue::publisher::{Outgoing, Publisher};
use crate::queue::topology;
use crate::stages::ingest::is_name;
use crate::store::batches::{self, BatchKind, ItemRow};
use crate::tokens;
use crate::worker::{self, WorkerOptions};
pub use documents::Document;
use output::{Outcome, Progress};

/// The instruction sent with a whole document (or the last combining step).
const PROMPT: &str = "Summarize the following document in about {words} words. Keep the key facts, names and numbers.";
/// Added before a piece of a longer document.
const PIECE_NOTE: &str = "This is part {part} of {parts} of a longer document.";
/// Added before summaries of consecutive pieces that are combined.
const COMBINE_NOTE: &str =
    "The text below joins summaries of consecutive parts of one document, in order.";
/// Deepest map-reduce recursion before a document is given up as not shrinking.
const MAX_LEVELS: u32 = 6;
/// Tokens kept free in a context window for message framing and tokenizer differences.
const WINDOW_MARGIN: u32 = 64;
/// Items looked up and published per round trip.
const ROUND: usize = 500;

pub async fn run(settings: Settings, args: SummarizeArgs) -> anyhow::Result<ExitCode> {
    let files = documents::collect_files(&args.paths, Path::new(&args.out))?;
    let documents = documents::read_all(&files)?;
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
    super::configured_route(&settings, &args.route)?;
    let plan = Plan::new(&settings, &args)?;
    let format = args.format.unwrap_or(if args.out.ends_with(".md") {
        SummaryFormat::Markdown
    } else {
        SummaryFormat::Jsonl
    });

    let destination = output::Destination::open(&args.out)?;

    let ctx = Context::connect(settings).await?;
    ctx.cancel_on_signals();
    let outcome = summarize(&ctx, &args, &plan, &batch, &documents).await;
    ctx.shutdown.cancel();
    ctx.tasks.close();
    ctx.close().await;
    // Jobs may have been published and paid for by now: a failure names the batch (its name
    // may have been chosen by this run) and how to resume it. Bad input and an interruption
    // say so themselves.
    let resume = || {
        format!(
            "batch {batch}: run the same command with --batch {batch} to resume: finished \
             documents are not sent again"
        )
    };
    let outcomes = match outcome {
        Err(error)
            if error.downcast_ref::<Interrupted>().is_none()
                && error.downcast_ref::<BadInput>().is_none() =>
        {
            return Err(error.context(resume()));
        }
        outcome => outcome?,
    };
    destination
        .write(format, &documents, &outcomes)
        .with_context(resume)?;
    let failed = outcomes.iter().filter(|o| o.error.is_some()).count();
    let cost: Decimal = outcomes.iter().map(|o| o.cost).sum();
    eprintln!(
        "summarize: {} documents, {} succeeded, {failed} failed, cost ${cost} (batch {batch})",
        documents.len(),
        documents.len() - failed
    );
    for (document, outcome) in documents.iter().zip(&outcomes) {
        if let Some(error) = &outcome.error {
            eprintln!("  failed: {}: {error}", document.label());
        }
    }
    Ok(if failed > 0 {
        ExitCode::from(EXIT_JOBS_FAILED)
    } else {
        ExitCode::SUCCESS
    })
}

/// The prompts and piece size of a run.
struct Plan {
    tenant: String,
    route: String,
    prompt: String,
    max_tokens: u32,
    /// Largest piece of text per job; `None` = split only what would not fit in a message.
    chunk_tokens: Option<usize>,
    /// The workers' `worker.max_message_bytes`: a larger job is rejected unread (`too_large`),
    /// and its result cannot say which batch it was for, so none must be published.
    max_message_bytes: usize,
    /// What a job message holds besides its text (the prompt, the notes, the JSON around
    /// them), measured, with a margin.
    envelope_bytes: usize,
}

impl Plan {
    fn new(settings: &Settings, args: &SummarizeArgs) -> Result<Self, BadInput> {
        let prompt = args
            .prompt
            .as_deref()
            .unwrap_or(PROMPT)
            .replace("{words}", &args.words.to_string());
        // The biggest instruction a step carries: the prompt plus the piece note.
        let overhead = tokens::count(&prompt) + tokens::count(PIECE_NOTE) + 16;
        let chunk_tokens = match (
            args.chunk_tokens,
            settings.route_context_window(&args.route),
        ) {
            (Some(chunk), _) => Some(chunk as usize),
            (None, Some(window)) => {
                let free = i64::from(window)
                    - i64::from(args.max_tokens)
                    - i64::from(WINDOW_MARGIN)
                    - overhead as i64;
                if free < 32 {
                    return Err(BadInput(format!(
                        "route {:?} has a {window}-token context window: too small for a {}-token summary plus the prompt; lower --max-tokens or set --chunk-tokens",
                        args.route, args.max_tokens
                    )));
                }
                Some(usize::try_from(free).unwrap_or(usize::MAX))
            }
            (None, None) => None,
        };
        Self {
            tenant: args.tenant.clone(),
            route: args.route.clone(),
            prompt,
            max_tokens: args.max_tokens,
            chunk_tokens,
            max_message_bytes: settings.worker.max_message_bytes,
            envelope_bytes: 0,
        }
        .measured(args)
    }

    /// The plan with its envelope measured: a job of the longest notes and no text, for a
    /// batch name as long as `--batch` allows, plus a margin.
    fn measured(mut self, args: &SummarizeArgs) -> Result<Self, BadInput> {
        let notes = format!("{COMBINE_NOTE} {PIECE_NOTE}");
        let mut job = Job::new(
            &args.tenant,
            Some(&"b".repeat(256)),
            &args.route,
            self.request(Some(notes), String::new()),
        );
        job.metadata = Some(json!({ "document": "d".repeat(512) }));
        self.envelope_bytes = serde_json::to_vec(&job).map_or(0, |body| body.len()) + 1024;
        if self.text_bytes() < 1024 {
            return Err(BadInput(format!(
                "a job message is limited to {} bytes (worker.max_message_bytes) and the prompt \
                 and notes take {} of them: too little is left for any text",
                self.max_message_bytes, self.envelope_bytes
            )));
        }
        Ok(self)
    }

    /// What shapes the batch's steps, as the options that give it: a resumed run must match.
    fn options(&self) -> String {
        let chunk = self
            .chunk_tokens
            .map_or_else(|| "none".to_owned(), |c| c.to_string());
        // The message limit shapes the pieces too where it cuts them smaller than the piece
        // size given: then it is one of the options (and left out where it is not, so batches
        // begun before it was are resumed as they were).
        let cut = match self.chunk_tokens {
            Some(chunk) if self.piece_tokens() < chunk => {
                format!(" --piece-tokens {}", self.piece_tokens())
            }
            _ => String::new(),
        };
        format!(
            "--route {} --max-tokens {} --chunk-tokens {chunk}{cut} --prompt {:?}",
            self.route, self.max_tokens, self.prompt
        )
    }

    /// Whether `text` goes in one job: within `--chunk-tokens` (or the route's context window),
    /// and within the message limit, counting its JSON escaping at twice its length.
    fn fits(&self, text: &str) -> bool {
        text.len() <= self.text_bytes()
            && self
                .chunk_tokens
                .is_none_or(|limit| tokens::count(text) <= limit)
    }

    /// The most text one job message carries.
    fn text_bytes(&self) -> usize {
        self.max_message_bytes.saturating_sub(self.envelope_bytes) / 2
    }

    /// The largest piece a text is split into: `--chunk-tokens` (or the route's context
    /// window), and at most a sixteenth of a message's text in tokens, so a piece of even long
    /// tokens fits in a message.
    fn piece_tokens(&self) -> usize {
        let by_bytes = (self.text_bytes() / 16).max(1);
        self.chunk_tokens
            .map_or(by_bytes, |chunk| chunk.min(by_bytes))
    }

    fn request(&self, note: Option<String>, text: String) -> ChatRequest {
        let instruction = match note {
            Some(note) => format!("{note} {}", self.prompt),
            None => self.prompt.clone(),
        };
        ChatRequest {
            messages: vec![
                ChatMessage::text_message("system", instruction),
                ChatMessage::text_message("user", text),
            ],
            max_tokens: Some(self.max_tokens),
            ..ChatRequest::default()
        }
    }
}

/// One job a document needs: its batch-item key and request.
struct Step {
    document: usize,
    piece: usize,
    key: String,
    request: ChatRequest,
}

/// Where a document is in its map-reduce.
struct DocState {
    key: String,
    level: u32,
    /// Text summarized at this level (the document, then the joined piece summaries).
    input_tokens: usize,
    /// Results of this level's pieces, in order.
    pieces: Vec<Option<String>>,
    outcome: Outcome,
    done: bool,
}

impl DocState {
    /// The jobs of the next level for `text`: one job when it fits, else one per piece.
    fn steps(&mut self, index: usize, plan: &Plan, text: String) -> Vec<Step> {
        if text.trim().is_empty() {
            // Nothing to send a model (and, too long to send whole, no piece to split it into).
            return self.fail(if self.level == 0 {
                "the text is all whitespace; there is nothing to summarize".to_owned()
            } else {
                "the model returned blank summaries of the document's pieces".to_owned()
            });
        }
        self.input_tokens = tokens::count(&text);
        let base = format!("{}/L{}", self.key, self.level);
        let note = (self.level > 0).then(|| COMBINE_NOTE.to_owned());
        if plan.fits(&text) {
            self.pieces = vec![None];
            return vec![Step {
                document: index,
                piece: 0,
                key: base,
                request: plan.request(note, text),
            }];
        }
        let pieces = chunks::split(&text, plan.piece_tokens());
        if pieces.is_empty() {
            // No step would ever finish the document.
            return self.fail("the text split into no pieces".to_owned());
        }
        self.pieces = vec![None; pieces.len()];
        if self.level == 0 {
            self.outcome.chunks = pieces.len();
        }
        let parts = pieces.len();
        pieces
            .into_iter()
            .enumerate()
            .map(|(i, piece)| {
                let piece_note = PIECE_NOTE
                    .replace("{part}", &(i + 1).to_string())
                    .replace("{parts}", &parts.to_string());
                let note = match &note {
                    Some(combine) => format!("{combine} {piece_note}"),
                    None => piece_note,
                };
                Step {
                    document: index,
                    piece: i,
                    key: format!("{base}/{i}"),
                    request: plan.request(Some(note), piece),
                }
            })
            .collect()
    }

    /// Records a piece's result (its cost too when `billed`: not for a copy of a document whose
    /// job another copy was credited with); returns the next level's steps when the level is
    /// complete.
    fn record(
        &mut self,
        index: usize,
        plan: &Plan,
        piece: usize,
        result: &JobResult,
        billed: bool,
    ) -> Vec<Step> {
        // A piece still running when its document failed was paid for all the same.
        if billed {
            self.outcome.cost += result.cost.amount_usd;
            self.outcome.tokens += result.cost.usage.input_tokens + result.cost.usage.output_tokens;
            self.outcome.jobs += 1;
        }
        if self.done {
            return Vec::new();
        }
        let text = match (result.status, result.text()) {
            (JobStatus::Succeeded, Some(text)) => text.to_owned(),
            (JobStatus::Succeeded, None) => {
                return self.fail("the model returned no text".to_owned());
            }
            _ => {
                let reason = result.error.as_ref().map_or_else(
                    || result.status.as_str().to_owned(),
                    |e| format!("{}: {}", e.code, e.message),
                );
                let which = if self.pieces.len() > 1 {
                    format!("part {} of {}: ", piece + 1, self.pieces.len())
                } else {
                    String::new()
                };
                return self.fail(format!("{which}{reason}"));
            }
        };
        if let Some(slot) = self.pieces.get_mut(piece) {
            *slot = Some(text);
        }
        if self.pieces.iter().any(Option::is_none) {
            return Vec::new();
        }
        let texts: Vec<String> = self.pieces.iter_mut().filter_map(Option::take).collect();
        if texts.len() == 1 {
            self.done = true;
            self.outcome.summary = texts.into_iter().next();
            self.outcome.job_id = Some(result.job_id);
            self.outcome.provider = result.provider.clone();
            self.outcome.model = result.model.clone();
            return Vec::new();
        }
        let joined = texts.join("\n\n");
        if self.level + 1 >= MAX_LEVELS || tokens::count(&joined) >= self.input_tokens {
            return self.fail(format!(
                "the piece summaries ({} tokens) do not shrink below their input; raise --chunk-tokens or lower --max-tokens",
                tokens::count(&joined)
            ));
        }
        self.level += 1;
        self.steps(index, plan, joined)
    }

    fn fail(&mut self, reason: String) -> Vec<Step> {
        self.done = true;
        self.outcome.error = Some(reason);
        Vec::new()
    }
}

/// The jobs this run waits for: job id → every (document, piece) its result answers. A
/// document given twice (the same file named twice, two equal JSONL lines) has the same keys,
/// so its steps share one job.
type Waiting = HashMap<Uuid, Vec<(usize, usize)>>;

async fn summarize(
    ctx: &Context,
    args: &SummarizeArgs,
    plan: &Plan,
    batch: &str,
    documents: &[Document],
) -> anyhow::Result<Vec<Outcome>> {
    // Listen before publishing (or looking anything up) so no result can slip past.
    let channel = ctx.broker.create_channel().await?;
    let pattern = format!("{}.{batch}.*", args.tenant);
    let mut results =
        crate::queue::listen(&channel, &ctx.names.results_exchange(), &pattern).await?;

    // The batch is checked before anything starts: a refused run leaves nothing running.
    let mut conn = ctx.pool.acquire().await?;
    let options = plan.options();
    let stored = batches::create_or_get(
        &mut conn,
        &plan.tenant,
        batch,
        BatchKind::Summarize,
        &plan.route,
        Some(&args.paths.join(" ")),
        Some(&options),
    )
    .await?;
    if stored.kind != BatchKind::Summarize.as_str() {
        anyhow::bail!(BadInput(format!(
            "batch {batch:?} exists and is not a summarize batch; choose another --batch"
        )));
    }
    // A piece is found by its document and position: with other options the pieces would not
    // line up with the stored ones.
    match stored.options.as_deref() {
        Some(started) if started != options => {
            anyhow::bail!(BadInput(format!(
                "batch {batch:?} was started with {started}; this run has {options}. Run it with the same options to resume it, or choose another --batch"
            )));
        }
        Some(_) => {}
        // A batch started before its options were kept: this run's hold from now on.
        None => batches::keep_options(&mut conn, &plan.tenant, batch, &options).await?,
    }
    let publisher = super::job_publisher(&ctx.broker, &ctx.settings).await?;
    let (_, consumers) = topology::jobs_queue_depth(&channel, &ctx.names).await?;
    let local_worker = (consumers == 0).then(|| LocalWorker::start(ctx));
    if local_worker.is_none() {
        eprintln!("summarize: {consumers} consumer(s) are on the jobs queue; publishing to them");
    }

    let mut runner = Runner {
        ctx,
        plan,
        batch,
        conn: &mut conn,
        publisher: &publisher,
        channel: &channel,
        local_worker,
        started: false,
        waiting: Waiting::new(),
        credited: HashSet::new(),
        states: documents
            .iter()
            .map(|d| DocState {
                key: d.key(),
                level: 0,
                input_tokens: 0,
                pieces: Vec::new(),
                outcome: Outcome::default(),
                done: false,
            })
            .collect(),
        progress: Progress::new(documents.len() as u64),
    };
    let first: Vec<Step> = documents
        .iter()
        .enumerate()
        .flat_map(|(i, d)| match &d.unreadable {
            Some(reason) => runner.states[i].fail(reason.clone()),
            None => runner.states[i].steps(i, plan, d.text.clone()),
        })
        .collect();
    // A document done before its first job failed at once (unreadable, or nothing to
    // summarize).
    for state in runner.states.iter().filter(|s| s.done) {
        runner.progress.advance(state.outcome.error.is_some());
    }
    let outcome = runner.drive(first, &mut results).await;
    runner.progress.finish();
    let outcomes: Vec<Outcome> = runner.states.into_iter().map(|s| s.outcome).collect();
    if let Some(local) = runner.local_worker {
        local.stop.cancel();
        local
            .handle
            .await
            .context("the in-process worker panicked")??;
    }
    drop(results);
    crate::queue::close_within(
        "results channel",
        crate::app::CLOSE_WITHIN,
        channel.close(200, "done".into()),
    )
    .await;
    publisher.close(crate::app::CLOSE_WITHIN).await;
    outcome.map(|()| outcomes)
}

/// A worker inside this process, for a run that found no consumer on the jobs queue.
struct LocalWorker {
    stop: tokio_util::sync::CancellationToken,
    handle: tokio::task::JoinHandle<anyhow::Result<worker::WorkerReport>>,
}

impl LocalWorker {
    fn start(ctx: &Context) -> Self {
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
        Self { stop, handle }
    }
}

/// Drives every document's map-reduce to an end.
struct Runner<'a> {
    ctx: &'a Context,
    plan: &'a Plan,
    batch: &'a str,
    conn: &'a mut sqlx::PgConnection,
    publisher: &'a Publisher,
    /// The results subscription's channel, also used to see who consumes the jobs queue.
    channel: &'a lapin::Channel,
    /// This run's own worker, when it found (or later finds) no consumer on the jobs queue.
    local_worker: Option<LocalWorker>,
    /// Whether the batch has left `validating` (`batches::mark_started`), done once, at the
    /// first publish.
    started: bool,
    waiting: Waiting,
    /// Jobs whose cost a document's outcome already counts.
    credited: HashSet<Uuid>,
    states: Vec<DocState>,
    progress: Progress,
}

impl Runner<'_> {
    async fn drive(
        &mut self,
        first: Vec<Step>,
        results: &mut lapin::Consumer,
    ) -> anyhow::Result<()> {
        self.issue_unless_interrupted(first).await?;
        let every = Duration::from_secs(2);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        while self.states.iter().any(|s| !s.done) {
            let mut next_steps = Vec::new();
            tokio::select! {
                _ = self.ctx.shutdown.cancelled() => return Err(self.interrupted()),
                _ = tick.tick() => {
                    self.progress.line();
                    self.keep_a_worker().await?;
                }
                next = results.next() => {
                    let Some(delivery) = next else {
                        anyhow::bail!(
                            "the results subscription closed (the broker connection was lost); run the same command with --batch {} to resume: finished documents are not sent again",
                            self.batch
                        )
                    };
                    next_steps.extend(self.on_delivery(&delivery?.data));
                    // Take whatever else already arrived, so new steps are issued together.
                    while let Some(Some(Ok(delivery))) = results.next().now_or_never() {
                        next_steps.extend(self.on_delivery(&delivery.data));
                    }
                }
            }
            if !next_steps.is_empty() {
                self.issue_unless_interrupted(next_steps).await?;
            }
        }
        Ok(())
    }

    /// [`Self::issue`], given up at Ctrl-C: a publish the broker refuses, or a broker that is
    /// gone, is retried for minutes, and the run must stop at once all the same. Stopping
    /// part way leaves what a crash there would, which a resumed run completes without sending
    /// any job twice.
    async fn issue_unless_interrupted(&mut self, steps: Vec<Step>) -> anyhow::Result<()> {
        let shutdown = self.ctx.shutdown.clone();
        let interrupted = tokio::select! {
            issued = self.issue(steps) => {
                issued?;
                false
            }
            () = shutdown.cancelled() => true,
        };
        if interrupted {
            return Err(self.interrupted());
        }
        Ok(())
    }

    fn interrupted(&self) -> anyhow::Error {
        let left = self.states.iter().filter(|s| !s.done).count();
        Interrupted(format!(
            "interrupted with {left} of {} documents unfinished; their jobs stay queued. Run the same command with --batch {} to resume: finished documents are not sent again",
            self.states.len(),
            self.batch
        ))
        .into()
    }

    /// Makes sure some worker still consumes the jobs: the workers this run published to may
    /// have stopped (another `summarize` whose in-process worker it found, a scaled-down
    /// deployment), and the run would wait for its results forever. With no consumer left, it
    /// starts its own worker. Its own worker failing ends the run with that worker's error.
    async fn keep_a_worker(&mut self) -> anyhow::Result<()> {
        if self
            .local_worker
            .as_ref()
            .is_some_and(|local| !local.handle.is_finished())
        {
            return Ok(());
        }
        if let Some(ended) = self.local_worker.take() {
            ended
                .handle
                .await
                .context("the in-process worker panicked")?
                .context("the in-process worker stopped")?;
        }
        let (_, consumers) = topology::jobs_queue_depth(self.channel, &self.ctx.names).await?;
        if consumers == 0 {
            eprintln!(
                "summarize: no consumer is left on the jobs queue; starting an in-process worker"
            );
            self.local_worker = Some(LocalWorker::start(self.ctx));
        }
        Ok(())
    }

    fn on_delivery(&mut self, data: &[u8]) -> Vec<Step> {
        let Ok(result) = serde_json::from_slice::<JobResult>(data) else {
            return Vec::new();
        };
        let Some(waiters) = self.waiting.remove(&result.job_id) else {
            return Vec::new();
        };
        waiters
            .into_iter()
            .flat_map(|(document, piece)| self.on_result(document, piece, &result))
            .collect()
    }

    fn on_result(&mut self, document: usize, piece: usize, result: &JobResult) -> Vec<Step> {
        // A job shared by two copies of a document is counted (cost, tokens, jobs) once.
        let billed = self.credited.insert(result.job_id);
        let state = &mut self.states[document];
        let was_done = state.done;
        let steps = state.record(document, self.plan, piece, result, billed);
        if billed {
            self.progress.step(
                result.cost.amount_usd,
                result.cost.usage.input_tokens + result.cost.usage.output_tokens,
            );
        }
        if state.done && !was_done {
            self.progress.advance(state.outcome.error.is_some());
        }
        steps
    }

    /// Waits for `job`'s result to answer piece `piece` of document `document`.
    fn wait_for(&mut self, job: Uuid, (document, piece): (usize, usize)) {
        self.waiting.entry(job).or_default().push((document, piece));
    }

    /// The jobs of `steps`, but for documents that are done: a job the workers would reject
    /// unread (too large) fails its document first, before anything of the document is stored
    /// or published, since its result could not say which batch it was for.
    fn checked(&mut self, steps: Vec<Step>) -> Vec<(Step, Job)> {
        let mut steps: Vec<(Step, Job)> = steps
            .into_iter()
            .map(|mut step| {
                let mut job = Job::new(
                    &self.plan.tenant,
                    Some(self.batch),
                    &self.plan.route,
                    std::mem::take(&mut step.request),
                );
                job.metadata = Some(json!({ "document": step.key }));
                (step, job)
            })
            .collect();
        for (step, job) in &steps {
            if let Some(reason) = super::too_large_for_workers(job, self.plan.max_message_bytes) {
                let state = &mut self.states[step.document];
                if !state.done {
                    state.fail(format!(
                        "{reason}: lower --chunk-tokens, or raise worker.max_message_bytes for \
                         text whose tokens are many bytes each (long runs of one character)"
                    ));
                    self.progress.advance(true);
                }
            }
        }
        steps.retain(|(step, _)| !self.states[step.document].done);
        steps
    }

    /// Starts `steps`, a round of at most [`ROUND`] at a time; steps their results make
    /// possible at once (stored successes) follow in later rounds.
    async fn issue(&mut self, steps: Vec<Step>) -> anyhow::Result<()> {
        let mut next = steps;
        while !next.is_empty() {
            let mut steps = self.checked(std::mem::take(&mut next));
            while !steps.is_empty() {
                let round = steps.drain(..steps.len().min(ROUND)).collect();
                next.extend(self.issue_round(round).await?);
            }
        }
        Ok(())
    }

    /// Starts the steps of `round`: a step whose batch item already has a successful result is
    /// answered from it; one whose job was published and has no result yet is waited for; one
    /// whose job failed before gets a new job; everything else is published. Returns the steps
    /// that the stored successes make possible.
    async fn issue_round(&mut self, round: Vec<(Step, Job)>) -> anyhow::Result<Vec<Step>> {
        let mut ready = Vec::new();
        let keys: Vec<String> = round.iter().map(|(s, _)| s.key.clone()).collect();
        let known = batches::items_by_key(self.conn, &self.plan.tenant, self.batch, &keys).await?;
        let mut new_items = Vec::new();
        let mut to_publish: Vec<Job> = Vec::new();
        // This round's new jobs by key: a step with the key of one waits for it.
        let mut issued: HashMap<String, Uuid> = HashMap::new();
        for (step, mut job) in round {
            if let Some(id) = issued.get(&step.key) {
                self.wait_for(*id, (step.document, step.piece));
                continue;
            }
            let job_id = match known.get(&step.key) {
                Some(existing) => match &existing.result {
                    Some(result) if result.status == JobStatus::Succeeded => {
                        ready.push((step.document, step.piece, result.clone()));
                        continue;
                    }
                    Some(_) => {
                        // Failed before: try again with a new job.
                        let id = Uuid::now_v7();
                        batches::replace_job(
                            self.conn,
                            &self.plan.tenant,
                            self.batch,
                            &step.key,
                            id,
                        )
                        .await?;
                        Some(id)
                    }
                    None if existing.item.published => {
                        if let Some(id) = existing.item.job_id {
                            self.wait_for(id, (step.document, step.piece));
                        }
                        continue;
                    }
                    None => existing.item.job_id,
                },
                None => None,
            };
            if let Some(id) = job_id {
                job.id = id;
            } else {
                new_items.push(ItemRow {
                    item_key: step.key.clone(),
                    line: i32::try_from(step.document + 1).unwrap_or(i32::MAX),
                    job_id: Some(job.id),
                    error: None,
                    published: false,
                });
            }
            self.wait_for(job.id, (step.document, step.piece));
            issued.insert(step.key, job.id);
            to_publish.push(job);
        }
        batches::insert_items(self.conn, &self.plan.tenant, self.batch, &new_items).await?;
        if !to_publish.is_empty() {
            let messages: Vec<Outgoing> = to_publish
                .iter()
                .map(|job| job_message(&self.ctx.names, job))
                .collect();
            self.publisher
                .publish_all(&messages)
                .await
                .context("cannot publish the batch")?;
            let ids: Vec<Uuid> = to_publish.iter().map(|j| j.id).collect();
            batches::mark_published(self.conn, &ids).await?;
            if !self.started {
                batches::mark_started(self.conn, &self.plan.tenant, self.batch).await?;
                self.started = true;
            }
        }
        let mut next = Vec::new();
        for (document, piece, result) in ready {
            next.extend(self.on_result(document, piece, &result));
        }
        Ok(next)
    }
}
