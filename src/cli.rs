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
    /// Summarize documents (.txt, .md, directories of them) as one batch.
    Summarize(SummarizeArgs),
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
    /// Files or directories (searched recursively for .txt and .md).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Output JSONL file (`-` for stdout).
    #[arg(long, default_value = "-")]
    pub out: String,
    /// Batch name (default: a fresh `summarize-<time>` name).
    #[arg(long)]
    pub batch: Option<String>,
    #[arg(long, default_value = "default")]
    pub tenant: String,
    #[arg(long, default_value = "default")]
    pub route: String,
    /// Longest summary, in tokens.
    #[arg(long, default_value_t = 200)]
    pub max_tokens: u32,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the configuration and print what would route where.
    Check,
}
