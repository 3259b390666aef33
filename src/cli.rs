//! The command line: clap structs only. Keep it minimal; behaviour lives in `commands/`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Durable, multi-provider LLM job processing over RabbitMQ and Postgres.
#[derive(Debug, Parser)]
#[command(name = "switchyard", version, about)]
pub struct Cli {
    /// Config file (default: ./switchyard.toml when it exists, else built-in defaults).
    #[arg(long, global = true, env = "SWITCHYARD_CONFIG")]
    pub config: Option<PathBuf>,

    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "SWITCHYARD_LOG_FORMAT"
    )]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the database schema and declare the RabbitMQ topology (idempotent).
    Migrate,
    /// Consume jobs and process them until stopped.
    Worker(WorkerArgs),
    /// Publish jobs from a JSONL file (or stdin): full jobs or bare chat-completions bodies.
    Publish(PublishArgs),
    /// Print results (or events) matching a topic pattern as JSON lines.
    Subscribe(SubscribeArgs),
    /// Summarize documents (.txt, .md, .html, JSONL, directories and globs) as one batch.
    Summarize(SummarizeArgs),
    /// OpenAI Batch files: submit, status, results, cancel.
    #[command(subcommand)]
    Batch(BatchCommand),
    /// Publish stored jobs again (failed, rejected, …) with their generation bumped.
    Replay(ReplayArgs),
    /// Reports from the ledger.
    #[command(subcommand)]
    Report(ReportCommand),
    /// Inspect, requeue or purge the dead-letter queue.
    #[command(subcommand)]
    DeadLetters(DeadLetterCommand),
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// The tamper-evident audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Walk each tenant's audit hash chain; report the first broken link (exit code 4).
    Verify(AuditVerifyArgs),
}

#[derive(Debug, clap::Args)]
pub struct AuditVerifyArgs {
    /// Only this tenant's chain (default: every tenant).
    #[arg(long)]
    pub tenant: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// Print matching messages as JSON lines (they stay in the queue).
    List(DeadLetterFilter),
    /// Print one message in full: properties, headers and body (it stays in the queue).
    Show {
        /// The job id (or message id) of the message.
        job: String,
    },
    /// Publish matching messages to the jobs exchange again.
    Requeue(DeadLetterFilter),
    /// Drop matching messages.
    Purge {
        #[command(flatten)]
        filter: DeadLetterFilter,
        /// Confirm: without it nothing is purged.
        #[arg(long)]
        yes: bool,
    },
}

/// Which dead-lettered messages a command acts on (all when no filter is given).
#[derive(Debug, Clone, clap::Args)]
pub struct DeadLetterFilter {
    /// Only these job ids (repeatable).
    #[arg(long)]
    pub job: Option<Vec<String>>,
    /// Only messages whose error contains this text (e.g. `schema_violation`).
    #[arg(long)]
    pub error: Option<String>,
    #[arg(long)]
    pub tenant: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum BatchCommand {
    /// Validate an OpenAI Batch input file and publish one job per line; prints the batch id.
    Submit(BatchSubmitArgs),
    /// Counts by status, cost so far, times, and the status in OpenAI's vocabulary.
    Status {
        id: String,
        #[arg(long, default_value = "default")]
        tenant: String,
        /// One JSON object (OpenAI batch-object shape) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write the OpenAI Batch output file (and optionally the error file).
    Results(BatchResultsArgs),
    /// Cancel the requests that have not started; finished and running ones keep their results.
    Cancel {
        id: String,
        #[arg(long, default_value = "default")]
        tenant: String,
    },
}

#[derive(Debug, clap::Args)]
pub struct BatchSubmitArgs {
    /// OpenAI Batch input file (JSONL of `custom_id`, `method`, `url`, `body`).
    pub file: PathBuf,
    #[arg(long, default_value = "default")]
    pub route: String,
    #[arg(long, default_value = "default")]
    pub tenant: String,
    /// Submit the valid lines even when some are invalid (they are reported, and listed in
    /// `batch results --errors`); without it, any invalid line stops the submission.
    #[arg(long)]
    pub skip_invalid: bool,
    /// Publish the requests of batch ID that its submission did not get to (it stopped part
    /// way: the broker or Postgres went away), from the same file. The batch keeps its route.
    #[arg(long, value_name = "ID")]
    pub resume: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct BatchResultsArgs {
    pub id: String,
    #[arg(long, default_value = "default")]
    pub tenant: String,
    /// Output file (`-` for stdout): one line per request, OpenAI Batch output format.
    #[arg(long)]
    pub out: PathBuf,
    /// Write failed requests (and invalid input lines) here instead of to `--out`.
    #[arg(long)]
    pub errors: Option<PathBuf>,
}

/// Which stored jobs `replay` republishes.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    #[arg(long, default_value = "default")]
    pub tenant: String,
    #[arg(long)]
    pub batch: Option<String>,
    /// Latest status to select (repeatable or comma separated); default `failed,rejected`,
    /// or any status with `--id`. `dead-lettered` means `rejected`.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub status: Vec<ReplayStatus>,
    /// Error code of the result (e.g. `all_attempts_failed`) or error class of an attempt
    /// (e.g. `rate_limited`, `server_error`).
    #[arg(long)]
    pub error_class: Option<String>,
    /// Results stored at or after this time (YYYY-MM-DD or RFC 3339).
    #[arg(long)]
    pub since: Option<String>,
    /// Results stored before this time (YYYY-MM-DD or RFC 3339).
    #[arg(long)]
    pub until: Option<String>,
    /// Only these job ids (repeatable or comma separated).
    #[arg(long = "id", value_delimiter = ',')]
    pub ids: Vec<uuid::Uuid>,
    /// Send the replayed jobs to this route instead of their own.
    #[arg(long)]
    pub route: Option<String>,
    /// Why (recorded in the audit event).
    #[arg(long)]
    pub reason: Option<String>,
    /// Replay jobs whose latest result is a success too.
    #[arg(long)]
    pub force: bool,
    /// Print what would be replayed and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// A job status `replay` can select.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReplayStatus {
    Failed,
    Rejected,
    DeadLettered,
    Cancelled,
    Succeeded,
}

#[derive(Debug, Subcommand)]
pub enum ReportCommand {
    /// Cost totals from the ledger (exact decimals).
    Costs(ReportCostsArgs),
}

#[derive(Debug, clap::Args)]
pub struct ReportCostsArgs {
    /// A calendar month, YYYY-MM (default: the current month).
    #[arg(long)]
    pub month: Option<String>,
    /// Start (YYYY-MM-DD or RFC 3339), inclusive.
    #[arg(long)]
    pub since: Option<String>,
    /// End (YYYY-MM-DD or RFC 3339), exclusive.
    #[arg(long)]
    pub until: Option<String>,
    /// Group by these, comma separated.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub by: Vec<crate::store::cost_ledger::Dimension>,
    /// Only this tenant's costs.
    #[arg(long)]
    pub tenant: Option<String>,
    #[arg(long, value_enum, default_value = "table")]
    pub format: ReportFormat,
}

/// How a report is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    Table,
    Csv,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// Jobs processed at once (also the prefetch); default from `[worker] concurrency`.
    #[arg(long)]
    pub concurrency: Option<u16>,
    /// Exit once the queue has been empty (and nothing in flight) for a moment.
    #[arg(long)]
    pub exit_when_idle: bool,
}

#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    /// JSONL file, or `-` for stdin.
    #[arg(default_value = "-")]
    pub input: String,
    /// Route for bare requests.
    #[arg(long, default_value = "default")]
    pub route: String,
    /// Tenant for bare requests.
    #[arg(long, default_value = "default")]
    pub tenant: String,
    /// Batch for bare requests.
    #[arg(long)]
    pub batch: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct SubscribeArgs {
    /// Topic pattern, e.g. `acme.*.failed` or `#` (events: `cost.#`, `audit.acme.*`).
    pub pattern: String,
    /// Subscribe to the events exchange instead of results.
    #[arg(long)]
    pub events: bool,
    /// Stop after this many messages.
    #[arg(long)]
    pub limit: Option<u64>,
}

#[derive(Debug, clap::Args)]
pub struct SummarizeArgs {
    /// Files, directories (searched recursively for .txt, .md, .html and .jsonl) and globs
    /// (`'docs/**/*.md'`). A .jsonl file holds one document per line: `{"id": …, "text": …}`.
    #[arg(required = true)]
    pub paths: Vec<String>,
    /// Output file (`-` for stdout).
    #[arg(long, default_value = "-")]
    pub out: String,
    /// Output format (default: markdown when `--out` ends in .md, else jsonl).
    #[arg(long, value_enum)]
    pub format: Option<SummaryFormat>,
    /// Batch name. Running again with the same name resumes: documents already summarized
    /// are not sent again (default: a fresh `summarize-<time>` name).
    #[arg(long)]
    pub batch: Option<String>,
    #[arg(long, default_value = "default")]
    pub tenant: String,
    #[arg(long, default_value = "default")]
    pub route: String,
    /// Target summary length, in words.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u32).range(1..))]
    pub words: u32,
    /// Longest summary, in tokens (what a job's `max_tokens` may be: 1 to 1,000,000).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_tokens: u32,
    /// Instruction sent with every document; `{words}` is replaced by `--words`.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Largest piece of a document sent at once, in tokens (default: what fits the
    /// route's smallest context window next to the prompt and the summary; no splitting
    /// when no target declares a context window).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub chunk_tokens: Option<u32>,
}

/// How `summarize` writes its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SummaryFormat {
    Jsonl,
    Markdown,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the configuration and print what would route where.
    Check,
}
