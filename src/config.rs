//! Layered settings: built-in defaults, then `switchyard.toml`, then `SWITCHYARD_<SECTION>__<KEY>`
//! environment variables. Unknown keys are errors that name the key.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// The name of the provider that is always available: the offline extractive summarizer.
pub const BUILTIN_PROVIDER: &str = "extractive";
/// The model name the built-in provider answers to.
pub const BUILTIN_MODEL: &str = "extractive-v1";
/// The config file read from the working directory when neither `--config` nor
/// `SWITCHYARD_CONFIG` names one.
pub const DEFAULT_CONFIG_FILE: &str = "switchyard.toml";

/// Everything the binary can be configured with.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub broker: BrokerSettings,
    pub database: DatabaseSettings,
    pub worker: WorkerSettings,
    pub providers: Vec<ProviderSettings>,
    pub routes: Vec<RouteSettings>,
    pub tenants: Vec<TenantSettings>,
    pub routing: RoutingSettings,
    pub budgets: Vec<BudgetSettings>,
}

/// A spending cap on one scope: exactly one of `tenant`, `provider`, `key`
/// (`provider/key id`), `route` or `batch`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetSettings {
    pub name: String,
    #[serde(default)]
    pub tenant: Option<String>,
    #[serde(default)]
    pub provider: Option<String>,
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub route: Option<String>,
    #[serde(default)]
    pub batch: Option<String>,
    /// USD, exact decimal (write it as a string).
    #[serde(with = "rust_decimal::serde::str")]
    pub cap_usd: Decimal,
    /// `hard` budgets are enforced; `soft` ones only alert.
    #[serde(default)]
    pub mode: BudgetMode,
    /// Spending starts fresh each period (history is kept).
    #[serde(default)]
    pub period: BudgetPeriod,
    /// Percentages of the cap that emit an audit event and a metric, once per period.
    #[serde(default = "default_alerts")]
    pub alerts: Vec<u32>,
}

fn default_alerts() -> Vec<u32> {
    vec![50, 80, 100]
}

/// See [`BudgetSettings::mode`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetMode {
    #[default]
    Hard,
    Soft,
}

/// See [`BudgetSettings::period`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetPeriod {
    /// Calendar month, UTC.
    #[default]
    Month,
    /// Calendar day, UTC.
    Day,
    /// Never resets.
    Total,
}

/// RabbitMQ connection and naming.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerSettings {
    /// AMQP URI, e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub url: String,
    /// Every exchange and queue name starts with this, so deployments (and parallel tests)
    /// can share one broker.
    pub prefix: String,
    /// Deliveries of one job before the broker dead-letters it (quorum `x-delivery-limit`),
    /// so a message that crashes workers cannot loop forever.
    pub delivery_limit: u32,
    /// Declare the topology on `worker`/`summarize` start (turn off in production, where
    /// `switchyard migrate` runs once).
    pub auto_declare: bool,
}

/// Postgres connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    pub url: String,
    pub max_connections: u32,
    /// Create the database if missing and apply pending migrations on `worker`/`summarize`
    /// start (turn off in production, where `switchyard migrate` runs once).
    pub auto_migrate: bool,
}

/// How a worker consumes and finalizes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSettings {
    /// Jobs processed at once; also the consumer prefetch (summed over the lanes).
    pub concurrency: u16,
    /// Consumers the concurrency is split over, each with its own channel and finalizer, so
    /// that group commits and publisher confirms of different lanes overlap (at most one lane
    /// per job slot). Default 2: one lane's commit overlaps the other's publish; the benchmark
    /// measured about 10% more jobs/s than one lane and a third less added latency at p50.
    pub lanes: u16,
    /// Bodies larger than this are rejected without being parsed.
    pub max_message_bytes: usize,
    /// Most jobs committed in one finalize transaction.
    pub finalize_batch_size: usize,
    /// How long in-flight jobs may take to finish after SIGTERM/SIGINT before they are
    /// abandoned (left unacked, so the broker redelivers them).
    pub shutdown_grace_secs: u64,
    /// Publish cost and audit events as one array message per finalize group and routing
    /// key (`batched`) or one message per event (`single`).
    pub event_publishing: EventPublishing,
    /// Where the worker serves `/healthz`, `/readyz` and `/metrics` (e.g. `127.0.0.1:9464`);
    /// off when unset.
    pub http_addr: Option<String>,
    /// Outbox rows still unsent this long after their commit belong to a worker that died
    /// (or lost the broker) between commit and publish; the relay republishes them.
    pub outbox_relay_after_ms: u64,
    /// Reject a job whose tenant differs from the RabbitMQ `user_id` it was published with
    /// (RabbitMQ checks `user_id` against the publishing connection's user). A tenant's own
    /// `enforce_user_id` overrides this.
    pub enforce_user_id: bool,
}

/// See [`WorkerSettings::event_publishing`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventPublishing {
    Batched,
    Single,
}

/// The wire format a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// Built-in offline summarizer; needs no key and no network.
    Extractive,
    /// OpenAI chat completions and every compatible service, through `base_url`.
    Openai,
    /// Anthropic Messages API.
    Anthropic,
    /// Google Gemini `generateContent`.
    Gemini,
}

/// Which field carries the output-token cap for an `openai`-kind provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaxTokensField {
    /// OpenAI itself (required by its reasoning models).
    MaxCompletionTokens,
    /// Most OpenAI-compatible services.
    MaxTokens,
}

/// One upstream service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSettings {
    /// Name used by routes, ledgers and events.
    pub name: String,
    pub kind: ProviderKind,
    /// Base URL ending where the SDK convention expects (OpenAI: `…/v1`).
    #[serde(default)]
    pub base_url: Option<String>,
    /// API keys, each referenced by an id and read from an environment variable.
    #[serde(default)]
    pub keys: Vec<KeySettings>,
    /// Where the provider processes data, for residency rules (e.g. `eu`, `us`).
    #[serde(default)]
    pub region: Option<String>,
    /// Per-attempt timeout.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// A stream that sends nothing for this long is interrupted.
    #[serde(default = "default_stream_idle_secs")]
    pub stream_idle_secs: u64,
    /// A stream still running after this long is ended, however often its provider sends
    /// (keep-alive comments reset the idle timer); its leases and budget reservations are held
    /// this long, so it never outlives them.
    #[serde(default = "default_stream_max_secs")]
    pub stream_max_secs: u64,
    /// Retries of a retryable failure on this provider (with backoff, honouring the
    /// server's delay) before the job moves on to the next target.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// `openai` kind: the output-cap field; default `max_completion_tokens` for
    /// api.openai.com and `max_tokens` for every other base URL.
    #[serde(default)]
    pub max_tokens_field: Option<MaxTokensField>,
    /// `openai` kind: the service rejects unknown fields and nulls (Mistral): send only the
    /// standard chat-completions fields and drop nulls.
    #[serde(default)]
    pub strict_fields: bool,
    /// Speak HTTP/2 to a plain `http` endpoint without negotiating it (h2c), as TLS
    /// endpoints that offer HTTP/2 are spoken to anyway.
    #[serde(default)]
    pub http2_prior_knowledge: bool,
    /// Calls one HTTP/2 connection carries at once; more calls open more connections, so
    /// none waits for the server's stream limit. Set it at or below what the server allows.
    #[serde(default = "default_max_streams_per_connection")]
    pub max_streams_per_connection: u32,
    /// Calls at once to a plain `http` endpoint spoken to over HTTP/1.1, where each call in
    /// flight holds a connection of its own; a call beyond them waits, within its timeout, for
    /// one to end. Bounds the worker's connections (and their buffers) to the provider.
    #[serde(default = "default_http1_max_connections")]
    pub http1_max_connections: u32,
    /// `gemini` kind: fetch `image_url`s from private addresses too (loopback, private,
    /// link-local and other non-public ones), for images served inside the network on purpose.
    /// Off by default, so a job cannot make the worker call into its own network.
    #[serde(default)]
    pub allow_private_image_hosts: bool,
    /// Limits of the whole provider, shared by every worker through Postgres.
    #[serde(default)]
    pub limits: Option<Limits>,
    #[serde(default)]
    pub models: Vec<ModelSettings>,
}

/// Concurrency and rate limits, held across every worker sharing the database.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Calls in flight at once.
    #[serde(default)]
    pub max_concurrency: Option<u32>,
    /// Requests per window (per minute with the default window).
    #[serde(default)]
    pub rpm: Option<u32>,
    /// Tokens (prompt estimate + output cap, corrected to actual usage) per window.
    #[serde(default)]
    pub tpm: Option<u64>,
    /// The rate window; 60 s makes `rpm`/`tpm` per minute. Tests shrink it.
    #[serde(default = "default_window_secs")]
    pub window_secs: u64,
}

fn default_window_secs() -> u64 {
    60
}

/// An API key by reference: the secret itself never appears in config, logs or Postgres.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySettings {
    /// Stable id recorded in attempts and the ledger.
    pub id: String,
    /// Name of the environment variable holding the key.
    pub env: String,
    /// Limits of this key alone, shared by every worker through Postgres.
    #[serde(default)]
    pub limits: Option<Limits>,
}

/// A model a provider serves and what it costs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    pub name: String,
    /// Prompt plus output tokens the model accepts; unknown ⇒ not checked.
    #[serde(default)]
    pub context_window: Option<u32>,
    /// What the model can do beyond text. Undeclared capabilities are assumed absent, so a
    /// job needing them is never sent to a model that may not have them.
    #[serde(default = "default_capabilities")]
    pub capabilities: Vec<Capability>,
    /// Prices in effect until the first of `price_versions`.
    #[serde(default)]
    pub prices: Prices,
    /// Volume tiers of `prices`.
    #[serde(default)]
    pub tiers: Vec<PriceTier>,
    /// Later prices, each from its effective date.
    #[serde(default)]
    pub price_versions: Vec<PriceVersion>,
}

/// A feature a job may need from a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Capability {
    /// Image inputs.
    Vision,
    /// `response_format` with a JSON schema.
    JsonSchema,
    /// Function tools.
    Tools,
    /// Streamed responses.
    Streaming,
}

fn default_capabilities() -> Vec<Capability> {
    vec![Capability::Streaming]
}

/// USD per million tokens (and per request), exact decimal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Prices {
    #[serde(with = "rust_decimal::serde::str")]
    pub input: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub cached_input: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub cache_write: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub output: Decimal,
    /// A flat charge per billed call.
    #[serde(with = "rust_decimal::serde::str")]
    pub per_request: Decimal,
}

/// Lower prices above a monthly token volume of the model (input + output tokens).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceTier {
    pub above_monthly_tokens: u64,
    pub prices: Prices,
}

/// Prices that take effect on a date (`YYYY-MM-DD`, UTC, or RFC 3339), replacing earlier ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceVersion {
    pub effective_from: String,
    pub prices: Prices,
    #[serde(default)]
    pub tiers: Vec<PriceTier>,
}

/// A route alias and the targets that serve it, tried in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSettings {
    pub alias: String,
    /// How `targets` are ordered for each job.
    #[serde(default)]
    pub policy: Policy,
    pub targets: Vec<TargetSettings>,
    /// Tried in this order after the policy-ordered targets.
    #[serde(default)]
    pub fallback: Vec<TargetSettings>,
    /// Moves to another target allowed after the first (1 + depth targets at most).
    #[serde(default = "default_failover_depth")]
    pub max_failover_depth: u8,
    /// Non-retryable error classes that still fail over (e.g. `context_length`, to reach a
    /// larger-context model).
    #[serde(default)]
    pub failover_on: Vec<String>,
}

/// How a route orders its targets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// First eligible target in order.
    #[default]
    Priority,
    /// Shares by `weight`.
    Weighted,
    /// Lowest estimated cost for the job's tokens.
    Cheapest,
    /// Lowest recent latency, with occasional exploration.
    Fastest,
    /// Most free concurrency.
    LeastBusy,
}

/// One provider + model pair of a route.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSettings {
    pub provider: String,
    pub model: String,
    /// Share under the `weighted` policy.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Per-attempt timeout on this target (default: the provider's `timeout_secs`).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

fn default_weight() -> u32 {
    1
}

fn default_failover_depth() -> u8 {
    2
}

/// Per-tenant policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSettings {
    pub name: String,
    /// Data residency: jobs of this tenant only go to providers in these regions.
    #[serde(default)]
    pub regions: Option<Vec<String>>,
    /// Only these providers may serve this tenant.
    #[serde(default)]
    pub allowed_providers: Option<Vec<String>>,
    /// What Postgres keeps of this tenant's prompts and outputs.
    #[serde(default)]
    pub retention: Retention,
    /// Overrides `[worker] enforce_user_id` for this tenant.
    #[serde(default)]
    pub enforce_user_id: Option<bool>,
}

/// What Postgres keeps of a tenant's prompts (`jobs.request`) and outputs (`results.body`).
/// Published messages always carry the output: retention is about what is stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Retention {
    /// Prompts and outputs.
    #[default]
    Full,
    /// Only SHA-256 digests of the request (`jobs.request_sha256`) and of the output.
    Hash,
    /// Neither, nor their digests.
    None,
}

impl Retention {
    pub fn as_str(self) -> &'static str {
        match self {
            Retention::Full => "full",
            Retention::Hash => "hash",
            Retention::None => "none",
        }
    }
}

/// Circuit breakers and routing behaviour.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingSettings {
    /// Consecutive retryable failures that open a target's circuit.
    pub breaker_consecutive_failures: u32,
    /// Error rate over the last `breaker_window` calls that opens it.
    pub breaker_error_rate: f64,
    pub breaker_window: u32,
    /// How long an open circuit skips its target before one probe is let through.
    pub breaker_open_secs: u64,
    /// Share of jobs the `fastest` policy sends to a random target to notice recoveries.
    pub exploration_rate: f64,
    /// Longest wait for a limited target's capacity before moving on; a job whose every
    /// target is limited for longer is parked in a delayed retry queue.
    pub max_limit_wait_secs: u64,
    /// A budget reservation outlives its attempt's timeout by this long; then it expires and
    /// is released (its worker died).
    pub reservation_grace_secs: u64,
    /// Output tokens reserved for a job that sets no `max_tokens`.
    pub default_output_reservation: u32,
}

impl Default for RoutingSettings {
    fn default() -> Self {
        Self {
            breaker_consecutive_failures: 5,
            breaker_error_rate: 0.5,
            breaker_window: 20,
            breaker_open_secs: 5,
            exploration_rate: 0.05,
            max_limit_wait_secs: 10,
            reservation_grace_secs: 60,
            default_output_reservation: 4096,
        }
    }
}

fn default_timeout_secs() -> u64 {
    60
}

fn default_stream_idle_secs() -> u64 {
    30
}

fn default_stream_max_secs() -> u64 {
    3600
}

fn default_max_streams_per_connection() -> u32 {
    100
}

/// The official OpenAI Python SDK's default `max_connections`.
fn default_http1_max_connections() -> u32 {
    1000
}

fn default_max_retries() -> u32 {
    1
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            broker: BrokerSettings::default(),
            database: DatabaseSettings::default(),
            worker: WorkerSettings::default(),
            providers: Vec::new(),
            routes: vec![RouteSettings {
                alias: "default".to_owned(),
                policy: Policy::Priority,
                targets: vec![TargetSettings {
                    provider: BUILTIN_PROVIDER.to_owned(),
                    model: BUILTIN_MODEL.to_owned(),
                    weight: 1,
                    timeout_secs: None,
                }],
                fallback: Vec::new(),
                max_failover_depth: default_failover_depth(),
                failover_on: Vec::new(),
            }],
            tenants: Vec::new(),
            routing: RoutingSettings::default(),
            budgets: Vec::new(),
        }
    }
}

impl Default for BrokerSettings {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
            prefix: "switchyard".to_owned(),
            delivery_limit: 5,
            auto_declare: true,
        }
    }
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/switchyard".to_owned(),
            max_connections: 16,
            auto_migrate: true,
        }
    }
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            concurrency: 64,
            lanes: 2,
            max_message_bytes: 4 * 1024 * 1024,
            finalize_batch_size: 256,
            shutdown_grace_secs: 30,
            event_publishing: EventPublishing::Batched,
            http_addr: None,
            outbox_relay_after_ms: 5000,
            enforce_user_id: false,
        }
    }
}

/// Non-retryable error classes a route may opt in to fail over on.
pub const FAILOVER_CLASSES: &[&str] = &[
    "context_length",
    "invalid_request",
    "content_filtered",
    "auth",
    "quota_exhausted",
];

/// Why settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    Missing(PathBuf),
    #[error("invalid configuration: {0}")]
    Parse(#[from] Box<figment::Error>),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Settings {
    /// Loads defaults, then `path` (or `switchyard.toml` in the working directory when it
    /// exists), then `SWITCHYARD_<SECTION>__<KEY>` variables, and checks cross-references.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        match path {
            Some(path) if !path.exists() => return Err(ConfigError::Missing(path.to_owned())),
            Some(path) => figment = figment.merge(Toml::file_exact(path)),
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => {
                figment = figment.merge(Toml::file_exact(DEFAULT_CONFIG_FILE));
            }
            None => {}
        }
        figment = figment.merge(
            Env::prefixed("SWITCHYARD_")
                .filter(|key| key.as_str().contains("__"))
                .split("__"),
        );
        let settings: Settings = figment.extract().map_err(Box::new)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Parses settings from TOML text alone (no environment), for tests and `config check`.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let settings: Settings = Figment::from(Serialized::defaults(Settings::default()))
            .merge(Toml::string(text))
            .extract()
            .map_err(Box::new)?;
        settings.validate()?;
        Ok(settings)
    }

    /// The retention policy of `tenant` (`full` unless configured).
    pub fn retention(&self, tenant: &str) -> Retention {
        self.tenant(tenant).map_or(Retention::Full, |t| t.retention)
    }

    /// Whether jobs of `tenant` must be published by the RabbitMQ user of the same name.
    pub fn enforces_user_id(&self, tenant: &str) -> bool {
        self.tenant(tenant)
            .and_then(|t| t.enforce_user_id)
            .unwrap_or(self.worker.enforce_user_id)
    }

    /// Whether jobs of any tenant must be published by the RabbitMQ user of the same name.
    pub fn enforces_any_user_id(&self) -> bool {
        self.worker.enforce_user_id || self.tenants.iter().any(|t| t.enforce_user_id == Some(true))
    }

    fn tenant(&self, name: &str) -> Option<&TenantSettings> {
        self.tenants.iter().find(|t| t.name == name)
    }

    /// The smallest context window among a route's targets and fallbacks (so any of them can
    /// take a prompt that fits), or `None` when the route is unknown or no target declares one.
    pub fn route_context_window(&self, route: &str) -> Option<u32> {
        let route = self.routes.iter().find(|r| r.alias == route)?;
        let providers = self.all_providers();
        route
            .targets
            .iter()
            .chain(&route.fallback)
            .filter_map(|target| {
                providers
                    .iter()
                    .find(|p| p.name == target.provider)?
                    .models
                    .iter()
                    .find(|m| m.name == target.model)?
                    .context_window
            })
            .min()
    }

    /// Every provider, including the built-in one unless a configured provider takes its name.
    pub fn all_providers(&self) -> Vec<ProviderSettings> {
        let mut providers = self.providers.clone();
        if !providers.iter().any(|p| p.name == BUILTIN_PROVIDER) {
            providers.push(ProviderSettings {
                name: BUILTIN_PROVIDER.to_owned(),
                kind: ProviderKind::Extractive,
                base_url: None,
                keys: Vec::new(),
                region: None,
                timeout_secs: default_timeout_secs(),
                stream_idle_secs: default_stream_idle_secs(),
                stream_max_secs: default_stream_max_secs(),
                max_retries: 0,
                max_tokens_field: None,
                strict_fields: false,
                http2_prior_knowledge: false,
                max_streams_per_connection: default_max_streams_per_connection(),
                http1_max_connections: default_http1_max_connections(),
                allow_private_image_hosts: false,
                limits: None,
                models: vec![ModelSettings {
                    name: BUILTIN_MODEL.to_owned(),
                    context_window: None,
                    capabilities: default_capabilities(),
                    prices: Prices::default(),
                    tiers: Vec::new(),
                    price_versions: Vec::new(),
                }],
            });
        }
        providers
    }

    /// Cross-field checks that serde cannot express.
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |message: String| Err(ConfigError::Invalid(message));
        if self.broker.prefix.is_empty() || self.broker.prefix.contains(char::is_whitespace) {
            return invalid(format!(
                "broker.prefix must be non-empty without spaces, got {:?}",
                self.broker.prefix
            ));
        }
        if self.worker.concurrency == 0 {
            return invalid("worker.concurrency must be at least 1".to_owned());
        }
        if self.worker.lanes == 0 {
            return invalid("worker.lanes must be at least 1".to_owned());
        }
        if self.worker.finalize_batch_size == 0 {
            return invalid("worker.finalize_batch_size must be at least 1".to_owned());
        }
        if self.worker.outbox_relay_after_ms < 1000 {
            // It is also a finalize session's lease, renewed every quarter of it: shorter, and
            // a renewal late by a few hundred milliseconds lets another worker's relay publish
            // a live group's messages again.
            return invalid(format!(
                "worker.outbox_relay_after_ms must be at least 1000, got {}",
                self.worker.outbox_relay_after_ms
            ));
        }
        // Parsed as the worker will (a URL it cannot read fails `config check` too).
        if let Err(error) = self.broker.url.parse::<lapin::uri::AMQPUri>() {
            return invalid(format!("broker.url is not an AMQP URL: {error}"));
        }
        if let Err(error) = self
            .database
            .url
            .parse::<sqlx::postgres::PgConnectOptions>()
        {
            return invalid(format!("database.url is not a Postgres URL: {error}"));
        }
        if self.database.max_connections < 2 {
            // `summarize` holds one for its whole run, beside its in-process worker's.
            return invalid(format!(
                "database.max_connections must be at least 2, got {}",
                self.database.max_connections
            ));
        }
        let providers = self.all_providers();
        let mut names = HashSet::new();
        for provider in &providers {
            if !names.insert(provider.name.as_str()) {
                return invalid(format!("provider {:?} is defined twice", provider.name));
            }
            for (setting, value) in [
                ("timeout_secs", provider.timeout_secs),
                ("stream_idle_secs", provider.stream_idle_secs),
                ("stream_max_secs", provider.stream_max_secs),
                (
                    "max_streams_per_connection",
                    u64::from(provider.max_streams_per_connection),
                ),
                (
                    "http1_max_connections",
                    u64::from(provider.http1_max_connections),
                ),
            ] {
                if value == 0 {
                    return invalid(format!(
                        "provider {:?}: {setting} must be at least 1",
                        provider.name
                    ));
                }
            }
            let provider_limits = provider.limits.iter().map(|l| (String::new(), l));
            let key_limits = (provider.keys.iter())
                .filter_map(|k| Some((format!("key {:?}: ", k.id), k.limits.as_ref()?)));
            for (whose, limits) in provider_limits.chain(key_limits) {
                // Zero would park every call for good (a limit of none) or, for the window,
                // let the call log be pruned of calls a window still counts.
                for (setting, value) in [
                    ("max_concurrency", limits.max_concurrency.map(u64::from)),
                    ("rpm", limits.rpm.map(u64::from)),
                    ("tpm", limits.tpm),
                    ("window_secs", Some(limits.window_secs)),
                ] {
                    if value == Some(0) {
                        return invalid(format!(
                            "provider {:?}: {whose}limits.{setting} must be at least 1 \
                             (leave it out for no limit)",
                            provider.name
                        ));
                    }
                }
            }
            if provider.kind != ProviderKind::Extractive {
                match provider.base_url.as_deref().map(url::Url::parse) {
                    None => {
                        return invalid(format!("provider {:?} needs base_url", provider.name));
                    }
                    Some(Err(e)) => {
                        return invalid(format!(
                            "provider {:?} has an invalid base_url: {e}",
                            provider.name
                        ));
                    }
                    Some(Ok(_)) => {}
                }
                if provider.keys.is_empty() {
                    return invalid(format!(
                        "provider {:?} needs at least one key: \
                         keys = [{{ id = \"main\", env = \"API_KEY_VARIABLE\" }}]",
                        provider.name
                    ));
                }
            }
        }
        let mut aliases = HashSet::new();
        for route in &self.routes {
            if !aliases.insert(route.alias.as_str()) {
                return invalid(format!("route {:?} is defined twice", route.alias));
            }
            if route.targets.is_empty() {
                return invalid(format!("route {:?} has no targets", route.alias));
            }
            if route.max_failover_depth > 3 {
                return invalid(format!(
                    "route {:?}: max_failover_depth is at most 3, got {}",
                    route.alias, route.max_failover_depth
                ));
            }
            for class in &route.failover_on {
                if !FAILOVER_CLASSES.contains(&class.as_str()) {
                    return invalid(format!(
                        "route {:?}: failover_on {class:?} is not one of {}",
                        route.alias,
                        FAILOVER_CLASSES.join(", ")
                    ));
                }
            }
            if route.policy == Policy::Weighted && route.targets.iter().all(|t| t.weight == 0) {
                return invalid(format!("route {:?}: every weight is 0", route.alias));
            }
            for target in route.targets.iter().chain(&route.fallback) {
                if target.timeout_secs == Some(0) {
                    return invalid(format!(
                        "route {:?}: the timeout_secs of its target {:?} must be at least 1",
                        route.alias, target.provider
                    ));
                }
                let Some(provider) = providers.iter().find(|p| p.name == target.provider) else {
                    return invalid(format!(
                        "route {:?} names unknown provider {:?}",
                        route.alias, target.provider
                    ));
                };
                if provider.kind != ProviderKind::Extractive
                    && !provider.models.iter().any(|m| m.name == target.model)
                {
                    return invalid(format!(
                        "route {:?} names model {:?}, which provider {:?} does not list",
                        route.alias, target.model, target.provider
                    ));
                }
            }
        }
        for provider in &providers {
            for model in &provider.models {
                for version in &model.price_versions {
                    if crate::budget::pricing::parse_effective(&version.effective_from).is_none() {
                        return invalid(format!(
                            "model {:?} of provider {:?}: effective_from {:?} is neither YYYY-MM-DD nor RFC 3339",
                            model.name, provider.name, version.effective_from
                        ));
                    }
                }
            }
        }
        let mut budget_names = HashSet::new();
        for budget in &self.budgets {
            if !budget_names.insert(budget.name.as_str()) {
                return invalid(format!("budget {:?} is defined twice", budget.name));
            }
            let scopes = [
                &budget.tenant,
                &budget.provider,
                &budget.key,
                &budget.route,
                &budget.batch,
            ]
            .iter()
            .filter(|s| s.is_some())
            .count();
            if scopes != 1 {
                return invalid(format!(
                    "budget {:?} needs exactly one of tenant, provider, key, route, batch",
                    budget.name
                ));
            }
            if budget.cap_usd < Decimal::ZERO {
                return invalid(format!("budget {:?} has a negative cap", budget.name));
            }
            // A budget whose scope names nothing configured would never apply: its cap would
            // hold nothing back, silently.
            let provider_named = |name: &str| providers.iter().find(|p| p.name == name);
            if let Some(provider) = &budget.provider
                && provider_named(provider).is_none()
            {
                return invalid(format!(
                    "budget {:?}: provider {provider:?} is not configured",
                    budget.name
                ));
            }
            if let Some(route) = &budget.route
                && !self.routes.iter().any(|r| r.alias == *route)
            {
                return invalid(format!(
                    "budget {:?}: route {route:?} is not configured",
                    budget.name
                ));
            }
            if let Some(key) = &budget.key {
                let known = key.split_once('/').is_some_and(|(provider, id)| {
                    provider_named(provider).is_some_and(|p| p.keys.iter().any(|k| k.id == id))
                });
                if !known {
                    return invalid(format!(
                        "budget {:?}: key {key:?} is not \"provider/key id\" of a configured key",
                        budget.name
                    ));
                }
            }
        }
        let mut tenants = HashSet::new();
        for tenant in &self.tenants {
            if !tenants.insert(tenant.name.as_str()) {
                return invalid(format!("tenant {:?} is defined twice", tenant.name));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_enforced_somewhere_when_the_worker_or_any_tenant_says_so() {
        let enforced = |toml: &str| Settings::from_toml(toml).unwrap().enforces_any_user_id();
        assert!(!enforced(""));
        assert!(!enforced(
            "[[tenants]]\nname = \"a\"\nenforce_user_id = false\n"
        ));
        assert!(enforced("[worker]\nenforce_user_id = true\n"));
        assert!(enforced(
            "[[tenants]]\nname = \"a\"\n\n[[tenants]]\nname = \"b\"\nenforce_user_id = true\n"
        ));
    }

    #[test]
    fn defaults_route_everything_to_the_builtin_model() {
        let settings = Settings::from_toml("").unwrap();
        assert_eq!(settings.routes[0].alias, "default");
        assert_eq!(settings.routes[0].targets[0].provider, BUILTIN_PROVIDER);
        assert_eq!(settings.broker.prefix, "switchyard");
        assert!(
            settings
                .all_providers()
                .iter()
                .any(|p| p.name == BUILTIN_PROVIDER)
        );
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = Settings::from_toml("[broker]\nprefx = \"x\"\n").unwrap_err();
        assert!(err.to_string().contains("prefx"), "{err}");
        let err = Settings::from_toml("[nonsense]\na = 1\n").unwrap_err();
        assert!(err.to_string().contains("nonsense"), "{err}");
    }

    #[test]
    fn a_route_to_an_unknown_provider_is_rejected() {
        let text =
            "[[routes]]\nalias = \"x\"\ntargets = [{ provider = \"nope\", model = \"m\" }]\n";
        let err = Settings::from_toml(text).unwrap_err();
        assert!(
            err.to_string().contains("unknown provider \"nope\""),
            "{err}"
        );
    }

    #[test]
    fn connection_settings_default_and_zero_is_rejected() {
        let provider = |extra: &str| {
            format!(
                "[[providers]]\nname = \"p\"\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\n\
                 keys = [{{ id = \"k\", env = \"K\" }}]\n{extra}"
            )
        };
        let settings = Settings::from_toml(&provider("")).unwrap();
        assert!(!settings.providers[0].http2_prior_knowledge);
        assert_eq!(settings.providers[0].max_streams_per_connection, 100);
        let settings = Settings::from_toml(&provider(
            "http2_prior_knowledge = true\nmax_streams_per_connection = 8\n",
        ))
        .unwrap();
        assert!(settings.providers[0].http2_prior_knowledge);
        assert_eq!(settings.providers[0].max_streams_per_connection, 8);
        assert_eq!(settings.providers[0].http1_max_connections, 1000);
        let settings = Settings::from_toml(&provider("http1_max_connections = 64\n")).unwrap();
        assert_eq!(settings.providers[0].http1_max_connections, 64);
        for setting in ["max_streams_per_connection", "http1_max_connections"] {
            let err = Settings::from_toml(&provider(&format!("{setting} = 0\n"))).unwrap_err();
            assert!(
                err.to_string()
                    .contains(&format!("{setting} must be at least 1")),
                "{err}"
            );
        }
    }

    /// Zero (or too small) values that would pass the types but break the worker later: every
    /// call timing out at once, leases lapsing between renewals, a pool `summarize` starves,
    /// a limit that parks every call for good or a window pruned while it still counts.
    #[test]
    fn zero_timeouts_a_short_relay_delay_and_a_one_connection_pool_are_rejected() {
        let provider = "[[providers]]\nname = \"p\"\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\n\
             keys = [{ id = \"k\", env = \"K\" }]\nmodels = [{ name = \"m\" }]\n";
        let route = "[[routes]]\nalias = \"r\"\ntargets = [{ provider = \"p\", model = \"m\"";
        let cases = [
            (
                format!("{provider}timeout_secs = 0\n"),
                "provider \"p\": timeout_secs must be at least 1",
            ),
            (
                format!("{provider}stream_max_secs = 0\n"),
                "provider \"p\": stream_max_secs must be at least 1",
            ),
            (
                format!("{provider}{route}, timeout_secs = 0 }}]\n"),
                "the timeout_secs of its target \"p\" must be at least 1",
            ),
            (
                "[worker]\noutbox_relay_after_ms = 100\n".to_owned(),
                "worker.outbox_relay_after_ms must be at least 1000, got 100",
            ),
            (
                "[database]\nmax_connections = 1\n".to_owned(),
                "database.max_connections must be at least 2, got 1",
            ),
            (
                "[broker]\nurl = \"nonsense\"\n".to_owned(),
                "broker.url is not an AMQP URL",
            ),
            (
                "[database]\nurl = \"not a url\"\n".to_owned(),
                "database.url is not a Postgres URL",
            ),
            (
                format!("{provider}limits = {{ rpm = 0 }}\n"),
                "provider \"p\": limits.rpm must be at least 1",
            ),
            (
                format!("{provider}limits = {{ max_concurrency = 0 }}\n"),
                "provider \"p\": limits.max_concurrency must be at least 1",
            ),
            (
                format!("{provider}limits = {{ rpm = 10, window_secs = 0 }}\n"),
                "provider \"p\": limits.window_secs must be at least 1",
            ),
            (
                provider.replace("env = \"K\" }", "env = \"K\", limits = { tpm = 0 } }"),
                "provider \"p\": key \"k\": limits.tpm must be at least 1",
            ),
            // Budgets that would never apply, and a tenant whose second block is ignored.
            (
                format!("{provider}[[budgets]]\nname = \"b\"\nprovider = \"q\"\ncap_usd = \"1\"\n"),
                "budget \"b\": provider \"q\" is not configured",
            ),
            (
                format!("{provider}[[budgets]]\nname = \"b\"\nroute = \"r\"\ncap_usd = \"1\"\n"),
                "budget \"b\": route \"r\" is not configured",
            ),
            (
                format!("{provider}[[budgets]]\nname = \"b\"\nkey = \"k\"\ncap_usd = \"1\"\n"),
                "budget \"b\": key \"k\" is not \"provider/key id\" of a configured key",
            ),
            (
                "[[tenants]]\nname = \"acme\"\n\n[[tenants]]\nname = \"acme\"\nenforce_user_id = true\n"
                    .to_owned(),
                "tenant \"acme\" is defined twice",
            ),
        ];
        for (text, expected) in cases {
            let err = Settings::from_toml(&text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text}: {err}");
        }
        Settings::from_toml(&format!("{provider}{route} }}]\n")).unwrap();
        for scope in ["provider = \"p\"", "route = \"r\"", "key = \"p/k\""] {
            Settings::from_toml(&format!(
                "{provider}{route} }}]\n[[budgets]]\nname = \"b\"\n{scope}\ncap_usd = \"1\"\n"
            ))
            .unwrap();
        }
    }

    #[test]
    fn prices_are_exact_decimals() {
        let text = r#"
[[providers]]
name = "openai"
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
keys = [{ id = "main", env = "OPENAI_API_KEY" }]
models = [{ name = "gpt-x", prices = { input = "0.15", output = "0.6" } }]
"#;
        let settings = Settings::from_toml(text).unwrap();
        let prices = &settings.providers[0].models[0].prices;
        assert_eq!(prices.input, Decimal::new(15, 2));
        assert_eq!(prices.output, Decimal::new(6, 1));
        assert_eq!(prices.cached_input, Decimal::ZERO);
    }

    #[test]
    fn an_openai_provider_without_a_key_is_rejected() {
        let text = "[[providers]]\nname = \"o\"\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\n";
        let err = Settings::from_toml(text).unwrap_err();
        assert!(err.to_string().contains("needs at least one key"), "{err}");
    }
}
