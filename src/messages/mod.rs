//! Serde types for every queue message, one file per schema in `schemas/`, plus the
//! validator that checks raw bodies against those schemas.

pub mod events;
pub mod job;
pub mod result;
pub mod schema;

pub use events::{AuditEvent, ChunkKind, CostEvent, Provenance, StreamChunk};
pub use job::{ChatMessage, ChatRequest, Job};
pub use result::{
    AttemptReport, AttemptStatus, CostSummary, JobError, JobResult, JobStatus, ResultHead,
    Retained, Timings, Usage,
};

/// The routing-key segment used when a job has no tenant or no batch.
pub const NONE_SEGMENT: &str = "_";
