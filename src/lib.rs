//! Switchyard runs LLM work as durable queued jobs across many providers.
//!
//! # How a job flows
//!
//! A client publishes a job (`schemas/job.v1.json`) to the jobs exchange. A [`worker`] consumes
//! the quorum jobs queue with manual acks and runs each delivery through the [`stages`]:
//!
//! 1. [`stages::ingest`] checks size, UTF-8, JSON and the schema; bad input becomes a
//!    `rejected` result plus a dead-lettered copy, never a crash or a blocked queue.
//!    A job whose result is already committed is answered from [`store`] without a provider call.
//! 2. [`stages::route`] resolves the route alias to provider targets.
//! 3. [`stages::dispatch`] calls [`providers`] in order, moving on after retryable failures.
//! 4. [`stages::finalize`] commits groups of finished jobs in ONE transaction (job, attempts,
//!    result, [`budget::pricing`] cost ledger, audit events, and the outbox of every message
//!    to publish), then publishes results and events with confirms ([`queue::publisher`]),
//!    then acks ([`queue::consumer`]). [`stages::relay`] republishes outbox rows a crashed
//!    worker left unsent.
//!
//! # Modules
//!
//! - [`config`]: layered settings (defaults, `switchyard.toml`, `SWITCHYARD_…__…`).
//! - [`app`]: the [`app::Context`] of shared handles and shutdown.
//! - [`messages`]: serde types and schema validation for every queue message.
//! - [`queue`]: topology, publisher with confirms, ack planning.
//! - [`store`]: Postgres queries, one file per table.
//! - [`audit`]: provenance of audit events, the per-tenant hash chain and its verification.
//! - [`retention`]: what Postgres keeps of a job under its tenant's retention policy.
//! - [`providers`]: one adapter per wire format plus the built-in `extractive` model.
//! - [`commands`]: one file per CLI command; [`cli`] holds the clap structs.
//! - [`failpoint`]: test-only crash points armed by `SWITCHYARD_FAILPOINT`.

pub mod app;
pub mod audit;
pub mod budget;
pub mod cli;
pub mod commands;
pub mod config;
pub mod failpoint;
pub mod http;
pub mod messages;
#[cfg(test)]
mod proptests;
pub mod providers;
pub mod queue;
pub mod retention;
pub mod routing;
pub mod stages;
pub mod store;
pub mod summarizer;
pub mod telemetry;
pub mod tokens;
pub mod worker;
