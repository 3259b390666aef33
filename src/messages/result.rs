//! `schemas/result.v1.json`: the one result message per job.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// The `schema` value (and AMQP `type`) of a result message.
pub const RESULT_SCHEMA: &str = "switchyard.result.v1";

/// Terminal outcome of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Succeeded,
    Failed,
    /// The message itself was unusable (not JSON, schema violation, unknown route, …).
    Rejected,
    /// Its batch was cancelled before the job started (`switchyard batch cancel`).
    Cancelled,
}

impl JobStatus {
    /// The lowercase name used in routing keys and Postgres.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Rejected => "rejected",
            JobStatus::Cancelled => "cancelled",
        }
    }
}

/// The result of one job, as published and as stored in `results.body`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobResult {
    pub schema: String,
    pub job_id: Uuid,
    pub generation: i32,
    pub tenant: Option<String>,
    pub batch: Option<String>,
    pub route: Option<String>,
    pub status: JobStatus,
    /// OpenAI `chat.completion` object when the job succeeded.
    pub response: Option<Value>,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub attempts: Vec<AttemptReport>,
    pub error: Option<JobError>,
    pub cost: CostSummary,
    pub timings: Timings,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    /// Set only on the copy Postgres keeps for a tenant with retention `hash` or `none`
    /// (which is also what a redelivered duplicate is answered with): what was left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retained>,
}

/// What a stored result kept of the output under a tenant's retention policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retained {
    /// `hash` or `none`.
    pub mode: String,
    /// SHA-256 of the output (`response.choices` as published) under `hash`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_sha256: Option<String>,
    /// SHA-256 of the request under `hash`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_sha256: Option<String>,
}

/// What places a result (its row key, routing key and `message_id`) and why it failed: what the
/// finalizer reads of a result once the result itself is serialized (`FinishedJob::seal`), so
/// a job waiting for its group holds the JSON text rather than the response's `Value` tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultHead {
    pub job_id: Uuid,
    pub generation: i32,
    pub tenant: Option<String>,
    pub batch: Option<String>,
    pub status: JobStatus,
    pub error: Option<JobError>,
}

impl ResultHead {
    /// `<tenant>.<batch>.<status>`, `_` standing in for a missing tenant or batch.
    pub fn routing_key(&self) -> String {
        routing_key(self.tenant.as_deref(), self.batch.as_deref(), self.status)
    }

    /// The AMQP `message_id` of the result: see `JobResult::message_id`.
    pub fn message_id(&self) -> String {
        message_id(self.job_id, self.generation)
    }
}

fn routing_key(tenant: Option<&str>, batch: Option<&str>, status: JobStatus) -> String {
    format!(
        "{}.{}.{}",
        tenant.unwrap_or(super::NONE_SEGMENT),
        batch.unwrap_or(super::NONE_SEGMENT),
        status.as_str()
    )
}

fn message_id(job_id: Uuid, generation: i32) -> String {
    if generation == 0 {
        job_id.to_string()
    } else {
        format!("{job_id}/g{generation}")
    }
}

impl JobResult {
    /// `<tenant>.<batch>.<status>`, `_` standing in for a missing tenant or batch.
    pub fn routing_key(&self) -> String {
        routing_key(self.tenant.as_deref(), self.batch.as_deref(), self.status)
    }

    /// The AMQP `message_id` of this result: the job id, with `/g<N>` for a replayed
    /// generation so that subscribers deduplicating on it keep every generation's result.
    pub fn message_id(&self) -> String {
        message_id(self.job_id, self.generation)
    }

    /// A copy of the fields that place the result (see `ResultHead`).
    pub fn head(&self) -> ResultHead {
        ResultHead {
            job_id: self.job_id,
            generation: self.generation,
            tenant: self.tenant.clone(),
            batch: self.batch.clone(),
            status: self.status,
            error: self.error.clone(),
        }
    }

    /// The assistant text of a successful result.
    pub fn text(&self) -> Option<&str> {
        self.response
            .as_ref()?
            .pointer("/choices/0/message/content")?
            .as_str()
    }
}

/// A clear, specific reason a job did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobError {
    /// Machine-readable code, e.g. `invalid_json`, `schema_violation`, `unknown_route`,
    /// `too_large`, `all_attempts_failed`, `invalid_request`.
    pub code: String,
    pub message: String,
    /// JSON pointer of the offending field, for schema violations.
    #[serde(default)]
    pub path: Option<String>,
}

impl JobError {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_owned(),
            message: message.into(),
            path: None,
        }
    }
}

/// Whether one provider call succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptStatus {
    Succeeded,
    Failed,
}

/// One provider call as reported in a result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttemptReport {
    pub n: u32,
    pub provider: String,
    pub model: String,
    pub key_id: Option<String>,
    pub status: AttemptStatus,
    pub error_class: Option<String>,
    pub http_status: Option<u16>,
    pub error: Option<String>,
    pub latency_ms: u64,
    pub usage: Option<Usage>,
}

/// Token usage normalised across providers (see `providers-wire.md` §1.5).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// All prompt tokens, including cache reads and writes.
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_tokens: u64,
    /// Billable output, including reasoning.
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
}

impl Usage {
    /// Field-wise sum.
    pub fn add(&mut self, other: &Usage) {
        self.input_tokens += other.input_tokens;
        self.cached_input_tokens += other.cached_input_tokens;
        self.cache_write_tokens += other.cache_write_tokens;
        self.output_tokens += other.output_tokens;
        self.reasoning_tokens += other.reasoning_tokens;
    }
}

/// Money and tokens of all billed attempts of a job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CostSummary {
    #[serde(with = "rust_decimal::serde::str")]
    pub amount_usd: Decimal,
    pub usage: Usage,
}

/// When the job was received and finished.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Timings {
    pub received_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub total_ms: u64,
    /// Time spent waiting on providers, summed over attempts.
    pub provider_ms: u64,
}

impl Timings {
    /// A result settled the moment it was received, without any work (a cancelled request).
    pub fn instant(at: DateTime<Utc>) -> Self {
        Self {
            received_at: at,
            finished_at: at,
            total_ms: 0,
            provider_ms: 0,
        }
    }
}
