//! `schemas/cost_event.v1.json` and `schemas/audit_event.v1.json`: what the events exchange carries.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::Usage;
use crate::config::Prices;

/// The `schema` value of a cost event.
pub const COST_EVENT_SCHEMA: &str = "switchyard.cost_event.v1";
/// The `schema` value of an audit event.
pub const AUDIT_EVENT_SCHEMA: &str = "switchyard.audit_event.v1";

/// One billed provider attempt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CostEvent {
    pub schema: String,
    pub event_id: Uuid,
    pub job_id: Uuid,
    pub tenant: String,
    pub batch: Option<String>,
    pub route: String,
    pub provider: String,
    pub model: String,
    pub key_id: Option<String>,
    pub usage: Usage,
    pub prices: Prices,
    /// The price version that applied (`base` or its effective date).
    pub price_version: String,
    /// The volume tier that applied (monthly tokens it starts above), if any.
    pub price_tier_above: Option<u64>,
    #[serde(with = "rust_decimal::serde::str")]
    pub amount_usd: Decimal,
    pub at: DateTime<Utc>,
}

impl CostEvent {
    /// `cost.<tenant>.<provider>`.
    pub fn routing_key(&self) -> String {
        format!("cost.{}.{}", self.tenant, self.provider)
    }
}

/// Something that happened to a job; kinds are lowercase snake case.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditEvent {
    pub schema: String,
    pub event_id: Uuid,
    pub tenant: String,
    pub job_id: Option<Uuid>,
    pub kind: String,
    pub at: DateTime<Utc>,
    pub details: Value,
    /// Who wrote the event, from what: see [`Provenance`].
    #[serde(default)]
    pub provenance: Provenance,
}

/// Where an audit event came from. Every field is set on events a worker writes; events
/// about no particular message (budget alerts) have no `message_sha256`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// The worker process (`<host>:<pid>:<random>`).
    pub worker_id: Option<String>,
    /// The Switchyard version (`CARGO_PKG_VERSION`).
    pub version: Option<String>,
    /// SHA-256 of the effective settings with every secret removed.
    pub config_sha256: Option<String>,
    /// SHA-256 of the job message body as delivered.
    pub message_sha256: Option<String>,
    /// W3C trace id: from the message's `traceparent` header, else the job id's 32 hex digits.
    pub trace_id: Option<String>,
}

impl AuditEvent {
    /// A new event with a fresh id.
    pub fn new(
        tenant: &str,
        job_id: Option<Uuid>,
        kind: &str,
        at: DateTime<Utc>,
        details: Value,
    ) -> Self {
        Self {
            schema: AUDIT_EVENT_SCHEMA.to_owned(),
            event_id: Uuid::now_v7(),
            tenant: tenant.to_owned(),
            job_id,
            kind: kind.to_owned(),
            at,
            details,
            provenance: Provenance::default(),
        }
    }

    /// `audit.<tenant>.<kind>`.
    pub fn routing_key(&self) -> String {
        format!("audit.{}.{}", self.tenant, self.kind)
    }
}

/// The `schema` value of a stream chunk.
pub const STREAM_CHUNK_SCHEMA: &str = "switchyard.stream_chunk.v1";

/// What a stream chunk carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChunkKind {
    /// More text of attempt `attempt`.
    Delta,
    /// Every earlier delta of attempt `attempt` is void.
    Void,
}

/// A piece of a streamed answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamChunk {
    pub schema: String,
    pub job_id: Uuid,
    pub tenant: String,
    pub attempt: u32,
    pub seq: u64,
    pub kind: ChunkKind,
    pub text: Option<String>,
}

impl StreamChunk {
    /// `stream.<tenant>.<job_id>`.
    pub fn routing_key(&self) -> String {
        format!("stream.{}.{}", self.tenant, self.job_id)
    }
}
