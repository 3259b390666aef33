//! Finalize: turns finished jobs into rows, commits a whole group of jobs in ONE transaction
//! (multi-row inserts) together with the group's messages (the outbox), then publishes results
//! and events with confirms, deletes the published outbox rows, then acks the group's
//! deliveries (with `multiple` where the tags are contiguous). A delivery is never acked before
//! its outcome is committed and its messages confirmed; messages committed but never confirmed
//! (a crash or a broker outage in between) are republished by `stages::relay`.

use std::collections::BTreeMap;

use backon::{ExponentialBuilder, Retryable};
use chrono::{DateTime, Utc};
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::dispatch::Dispatched;
use super::ingest::Rejection;
use crate::config::EventPublishing;
use crate::messages::events::COST_EVENT_SCHEMA;
use crate::messages::job::JOB_SCHEMA;
use crate::messages::result::RESULT_SCHEMA;
use crate::messages::{
    AttemptReport, AttemptStatus, AuditEvent, CostEvent, CostSummary, Job, JobResult, JobStatus,
    NONE_SEGMENT, ResultHead, Timings,
};
use crate::queue::BrokerError;
use crate::queue::consumer::AckTracker;
use crate::queue::publisher::{Outgoing, Publisher};
use crate::queue::topology::{JOBS_ROUTING_KEY, Names};
use crate::store::attempts::AttemptRow;
use crate::store::jobs::JobRow;
use crate::store::outbox::{OutboxMessage, OutboxRow};
use crate::store::{audit, cost_ledger, group, outbox, results};

/// How long confirmed outbox rows wait for the next group's transaction before they are
/// deleted on their own (well below `outbox_relay_after_ms`, so the relay never sees them).
const FLUSH_CONFIRMED_AFTER: std::time::Duration = std::time::Duration::from_millis(250);

/// Confirmed outbox rows (one per group) a finalizer lets wait for the next group's
/// transaction, at most.
const CONFIRMED_BACKLOG: usize = 64;

/// Header naming, on a parked job, the RabbitMQ user that first published it (the worker that
/// parks it publishes it again as its own user); see `worker::published_by`.
pub const PUBLISHED_BY_HEADER: &str = "x-switchyard-published-by";

/// Whether `job` is a rejected message seen again (redelivered after its commit): it lost the
/// race for its id's row to a result of its own tenant, so it was dead-lettered and audited
/// the first time. One that lost to another tenant's job was not.
fn seen_before(job: &SealedJob, lost_races: &BTreeMap<Uuid, JobResult>) -> bool {
    job.dead_letter.is_some()
        && lost_races
            .get(&job.head.job_id)
            .is_some_and(|winner| winner.tenant == job.head.tenant)
}

/// Header carrying the reason on a dead-lettered message.
pub const ERROR_HEADER: &str = "x-switchyard-error";

/// What a processing task hands to the finalizer.
#[derive(Debug)]
///
/// A job's task builds a `Finished<FinishedJob>` and seals it (`Finished::seal`) before handing
/// it to the finalizer, which takes `Finished<SealedJob>`.
pub enum Finished<J = SealedJob> {
    /// A job processed now: to be committed, published and acked.
    Job(Box<J>),
    /// A job whose result was already committed: republish the stored result and ack.
    Duplicate { tag: u64, result: Box<JobResult> },
    /// The job's id already belongs to another job (another tenant's, or an unreadable
    /// message's): publish the job's own `rejected` result (`job_id_taken`, or why its message
    /// was rejected) and a dead-letter copy of `original`, store nothing (the id's rows are the
    /// other job's), and ack.
    Refused {
        tag: u64,
        result: Box<JobResult>,
        original: Vec<u8>,
        /// Its `job_rejected` event, audited in the group's transaction.
        audits: Vec<AuditEvent>,
    },
    /// The job could not be looked up (database trouble): return it to the queue.
    Requeue { tag: u64 },
    /// Every target is rate limited for at least `wait`: republish the job to the delayed
    /// retry queue whose delay covers it, then ack.
    Park {
        tag: u64,
        body: Vec<u8>,
        wait: std::time::Duration,
        /// The RabbitMQ user that published the job, carried in [`PUBLISHED_BY_HEADER`].
        published_by: Option<String>,
    },
}

impl Finished<FinishedJob> {
    /// A rejected job whose id is another job's: its result and audit events, published and
    /// audited, with `original` dead-lettered; nothing else of it is kept.
    pub fn refused(job: FinishedJob, original: Vec<u8>) -> Self {
        Finished::Refused {
            tag: job.tag,
            result: Box::new(job.result),
            original,
            audits: job.audits,
        }
    }

    /// Serializes a processed job's result (`FinishedJob::seal`); the other cases pass as they are.
    pub fn seal(self) -> Finished {
        match self {
            Finished::Job(job) => Finished::Job(Box::new(job.seal())),
            Finished::Duplicate { tag, result } => Finished::Duplicate { tag, result },
            Finished::Refused {
                tag,
                result,
                original,
                audits,
            } => Finished::Refused {
                tag,
                result,
                original,
                audits,
            },
            Finished::Requeue { tag } => Finished::Requeue { tag },
            Finished::Park {
                tag,
                body,
                wait,
                published_by,
            } => Finished::Park {
                tag,
                body,
                wait,
                published_by,
            },
        }
    }
}

/// Everything one job writes and publishes, as its task builds it.
#[derive(Debug)]
pub struct FinishedJob {
    /// The delivery tag on the consuming channel.
    pub tag: u64,
    pub job: JobRow,
    pub attempts: Vec<AttemptRow>,
    pub result: JobResult,
    /// Ledger rows with the attempt they bill.
    pub costs: Vec<(Uuid, CostEvent)>,
    pub audits: Vec<AuditEvent>,
    /// The original message, for the dead-letter queue, when the job was rejected.
    pub dead_letter: Option<Vec<u8>>,
    /// Budget reservations per attempt id, settled in the finalize transaction unless already
    /// recorded.
    pub holds: Vec<(Uuid, Vec<crate::budget::Held>)>,
    /// Attempts whose ledger row and settlement dispatch already committed.
    pub recorded: Vec<Uuid>,
    /// Billed attempts of a model with volume tiers. Dispatch adds a call's tokens to the
    /// model's monthly volume when it records the call; finalize does so for those it records.
    pub tiered: Vec<Uuid>,
    /// What `results.body` keeps when it is not `result` itself (tenant retention
    /// `hash`/`none`, see `crate::retention`).
    pub stored: Option<Box<JobResult>>,
}

/// A finished job as the finalizer takes it: its result serialized, in the job's own task, to
/// the JSON text that is stored and published. Thousands of finished jobs may wait for their
/// group; each holds this text (about 1 KB for a short answer) rather than the response's
/// `Value` tree (about 2.5 KB of map nodes), and the finalizer's one task does not serialize.
#[derive(Debug)]
pub struct SealedJob {
    pub tag: u64,
    pub job: JobRow,
    pub attempts: Vec<AttemptRow>,
    /// What places the result; its body is `body`.
    pub head: ResultHead,
    /// The result message, as published (and stored, unless `stored_body`).
    pub body: String,
    /// What `results.body` keeps when it is not `body` (tenant retention `hash`/`none`).
    pub stored_body: Option<String>,
    pub costs: Vec<(Uuid, CostEvent)>,
    pub audits: Vec<AuditEvent>,
    pub dead_letter: Option<Vec<u8>>,
    pub holds: Vec<(Uuid, Vec<crate::budget::Held>)>,
    pub recorded: Vec<Uuid>,
    pub tiered: Vec<Uuid>,
}

fn millis_between(from: DateTime<Utc>, to: DateTime<Utc>) -> u64 {
    u64::try_from((to - from).num_milliseconds()).unwrap_or(0)
}

/// Postgres text and jsonb cannot hold U+0000; provider output is outside input, so strip it.
fn strip_nul(value: &mut Value) {
    match value {
        Value::String(s) if s.contains('\0') => *s = s.replace('\0', ""),
        Value::Array(items) => items.iter_mut().for_each(strip_nul),
        Value::Object(map) => map.values_mut().for_each(strip_nul),
        _ => {}
    }
}

/// A job's request as JSON text for `jobs.request`: through a `Value`, so its keys are sorted
/// (the digest does not depend on field order) and the text is what `Value::to_string` prints;
/// `null` if it cannot be serialized.
fn request_json(request: &crate::messages::ChatRequest) -> Option<Box<RawValue>> {
    let value = serde_json::to_value(request).unwrap_or(Value::Null);
    serde_json::value::to_raw_value(&value).ok()
}

/// SHA-256 of a job's request as serialized for `jobs.request` (`null` when it could not be).
fn request_hash(request: Option<&RawValue>) -> String {
    crate::audit::sha256_hex(request.map_or("null", RawValue::get).as_bytes())
}

impl FinishedJob {
    /// Serializes the result (and its retention copy) once, for the row and the message; call it
    /// after retention and provenance are applied.
    pub fn seal(self) -> SealedJob {
        let body = held_json(&self.result);
        let stored_body = self.stored.map(|stored| held_json(&*stored));
        SealedJob {
            tag: self.tag,
            job: self.job,
            attempts: self.attempts,
            head: self.result.head(),
            body,
            stored_body,
            costs: self.costs,
            audits: self.audits,
            dead_letter: self.dead_letter,
            holds: self.holds,
            recorded: self.recorded,
            tiered: self.tiered,
        }
    }

    /// A job that went through dispatch, successful or not.
    pub fn completed(
        tag: u64,
        job: &Job,
        received_at: DateTime<Utc>,
        dispatched: Dispatched,
    ) -> Self {
        let finished_at = Utc::now();
        // Serialized and hashed once: `jobs.request` and every audit event reuse them.
        let request = request_json(&job.request);
        let request_sha256 = request_hash(request.as_deref());
        let mut cost = CostSummary::default();
        // Sized for the usual job (one billed call, one audit event): a `Vec` grown by its first
        // push reserves four elements, some 1.3 KB for audit events, which thousands of
        // finished jobs waiting for their group would hold.
        let mut costs = Vec::with_capacity(dispatched.attempts.len());
        let mut audits = Vec::with_capacity(1);
        let mut reports = Vec::with_capacity(dispatched.attempts.len());
        let mut rows = Vec::with_capacity(dispatched.attempts.len());
        for attempt in &dispatched.attempts {
            let error = attempt.outcome.as_ref().err();
            let usage = attempt.billed_usage();
            // Dispatch builds (and usually already committed) the ledger entry of a billed call.
            let entry = attempt
                .cost
                .clone()
                .or_else(|| super::dispatch::cost_event(job, attempt));
            if let Some(entry) = entry {
                cost.amount_usd += entry.amount_usd;
                cost.usage.add(&entry.usage);
                costs.push((attempt.id, entry));
            }
            if let Some(error) = error {
                audits.push(AuditEvent::new(
                    &job.tenant,
                    Some(job.id),
                    "attempt_failed",
                    attempt.ended_at,
                    json!({
                        "route": job.route, "batch": job.batch, "attempt": attempt.n,
                        "provider": attempt.provider, "model": attempt.model, "key_id": attempt.key_id,
                        "error_class": error.class.as_str(), "http_status": error.status,
                        "message": error.message, "latency_ms": attempt.latency_ms,
                    }),
                ));
            }
            if let Some(transition) = attempt.circuit {
                audits.push(AuditEvent::new(
                    &job.tenant,
                    Some(job.id),
                    transition.kind(),
                    attempt.ended_at,
                    json!({ "target": format!("{}/{}", attempt.provider, attempt.model), "attempt": attempt.n }),
                ));
            }
            if let Some(event) = &attempt.key_event {
                audits.push(AuditEvent::new(
                    &job.tenant,
                    Some(job.id),
                    event.kind,
                    attempt.ended_at,
                    json!({
                        "provider": attempt.provider, "key_id": event.key_id, "rest_ms": event.rest_ms,
                        "attempt": attempt.n, "route": job.route, "batch": job.batch,
                    }),
                ));
            }
            let status = if error.is_some() {
                AttemptStatus::Failed
            } else {
                AttemptStatus::Succeeded
            };
            let message = error.map(|e| e.message.replace('\0', ""));
            reports.push(AttemptReport {
                n: attempt.n,
                provider: attempt.provider.clone(),
                model: attempt.model.clone(),
                key_id: attempt.key_id.clone(),
                status,
                error_class: error.map(|e| e.class.as_str().to_owned()),
                http_status: error.and_then(|e| e.status),
                error: message.clone(),
                latency_ms: attempt.latency_ms,
                usage,
            });
            rows.push(AttemptRow {
                id: attempt.id,
                job_id: job.id,
                generation: job.generation,
                n: i32::try_from(attempt.n).unwrap_or(i32::MAX),
                provider: attempt.provider.clone(),
                model: attempt.model.clone(),
                key_id: attempt.key_id.clone(),
                started_at: attempt.started_at,
                ended_at: attempt.ended_at,
                outcome: status,
                error_class: error.map(|e| e.class.as_str().to_owned()),
                http_status: error.and_then(|e| e.status).map(i32::from),
                error: message,
                latency_ms: i64::try_from(attempt.latency_ms).unwrap_or(i64::MAX),
                usage,
            });
        }
        for (target, error) in &dispatched.reroutes {
            audits.push(AuditEvent::new(
                &job.tenant,
                Some(job.id),
                "budget_reroute",
                finished_at,
                json!({ "target": target, "route": job.route, "batch": job.batch, "reason": error.message }),
            ));
        }
        let holds: Vec<(Uuid, Vec<crate::budget::Held>)> = dispatched
            .attempts
            .iter()
            .map(|a| (a.id, a.holds.clone()))
            .collect();
        let recorded: Vec<Uuid> = dispatched
            .attempts
            .iter()
            .filter(|a| a.recorded)
            .map(|a| a.id)
            .collect();
        let tiered: Vec<Uuid> = dispatched
            .attempts
            .iter()
            .filter(|a| a.price_table.has_tiers())
            .map(|a| a.id)
            .collect();
        if let Some(first) = dispatched.attempts.first() {
            for from in &dispatched.skipped {
                audits.push(AuditEvent::new(
                    &job.tenant,
                    Some(job.id),
                    "failover",
                    first.started_at,
                    json!({
                        "route": job.route, "batch": job.batch, "request_sha256": request_sha256,
                        "from": from, "to": format!("{}/{}", first.provider, first.model),
                        "error_class": "circuit_open", "http_status": null, "latency_ms": 0, "attempt": 0,
                    }),
                ));
            }
        }
        for pair in dispatched.attempts.windows(2) {
            let (from, to) = (&pair[0], &pair[1]);
            let Err(error) = &from.outcome else { continue };
            if (&from.provider, &from.model) == (&to.provider, &to.model) {
                continue;
            }
            tracing::info!(
                job_id = %job.id, from = %format!("{}/{}", from.provider, from.model),
                to = %format!("{}/{}", to.provider, to.model), error_class = error.class.as_str(),
                "Failed over to the next target."
            );
            audits.push(AuditEvent::new(
                &job.tenant,
                Some(job.id),
                "failover",
                from.ended_at,
                json!({
                    "route": job.route, "batch": job.batch, "request_sha256": request_sha256,
                    "from": format!("{}/{}", from.provider, from.model),
                    "to": format!("{}/{}", to.provider, to.model),
                    "error_class": error.class.as_str(), "http_status": error.status,
                    "latency_ms": from.latency_ms, "attempt": from.n,
                }),
            ));
        }
        let winner = dispatched
            .winner()
            .map(|a| (a.provider.clone(), a.model.clone()));
        let (status, response, error) = match dispatched.outcome {
            Ok(mut response) => {
                strip_nul(&mut response);
                (JobStatus::Succeeded, Some(response), None)
            }
            Err(error) => (JobStatus::Failed, None, Some(error)),
        };
        let result = JobResult {
            schema: RESULT_SCHEMA.to_owned(),
            job_id: job.id,
            generation: job.generation,
            tenant: Some(job.tenant.clone()),
            batch: job.batch.clone(),
            route: Some(job.route.clone()),
            status,
            response,
            provider: winner.as_ref().map(|w| w.0.clone()),
            model: winner.map(|w| w.1),
            attempts: reports,
            error: error.clone(),
            cost: cost.clone(),
            timings: Timings {
                received_at,
                finished_at,
                total_ms: millis_between(received_at, finished_at),
                provider_ms: dispatched.attempts.iter().map(|a| a.latency_ms).sum(),
            },
            metadata: job.metadata.clone(),
            retention: None,
        };
        let kind = match status {
            JobStatus::Succeeded => "job_succeeded",
            _ => "job_failed",
        };
        audits.push(AuditEvent::new(
            &job.tenant,
            Some(job.id),
            kind,
            finished_at,
            json!({
                "route": job.route, "batch": job.batch, "request_sha256": request_sha256,
                "provider": result.provider, "model": result.model, "attempts": result.attempts.len(),
                "cost_usd": cost.amount_usd.to_string(), "error": error,
            }),
        ));
        Self {
            tag,
            job: JobRow {
                id: job.id,
                tenant: Some(job.tenant.clone()),
                batch: job.batch.clone(),
                route: Some(job.route.clone()),
                generation: job.generation,
                status,
                request,
                request_sha256: None,
                raw_body: None,
                received_at,
                finished_at,
            },
            attempts: rows,
            result,
            costs,
            audits,
            dead_letter: None,
            holds,
            recorded,
            tiered,
            stored: None,
        }
    }

    /// A message that could not become a served job: a `rejected` result, an audit event, and
    /// the original body bound for the dead-letter queue.
    pub fn rejected(
        tag: u64,
        rejection: Rejection,
        received_at: DateTime<Utc>,
        original: Vec<u8>,
    ) -> Self {
        let finished_at = Utc::now();
        let result = JobResult {
            schema: RESULT_SCHEMA.to_owned(),
            job_id: rejection.job_id,
            generation: rejection.generation,
            tenant: rejection.tenant.clone(),
            batch: rejection.batch.clone(),
            route: rejection.route.clone(),
            status: JobStatus::Rejected,
            response: None,
            provider: None,
            model: None,
            attempts: Vec::new(),
            error: Some(rejection.error.clone()),
            cost: CostSummary::default(),
            timings: Timings {
                received_at,
                finished_at,
                total_ms: millis_between(received_at, finished_at),
                provider_ms: 0,
            },
            metadata: None,
            retention: None,
        };
        let audit = AuditEvent::new(
            rejection.tenant.as_deref().unwrap_or(NONE_SEGMENT),
            Some(rejection.job_id),
            "job_rejected",
            finished_at,
            json!({ "error": rejection.error, "bytes": original.len() }),
        );
        Self {
            tag,
            job: JobRow {
                id: rejection.job_id,
                tenant: rejection.tenant,
                batch: rejection.batch,
                route: rejection.route,
                generation: rejection.generation,
                status: JobStatus::Rejected,
                request: None,
                request_sha256: None,
                raw_body: Some(rejection.raw_body),
                received_at,
                finished_at,
            },
            attempts: Vec::new(),
            result,
            costs: Vec::new(),
            audits: vec![audit],
            dead_letter: Some(original),
            holds: Vec::new(),
            recorded: Vec::new(),
            tiered: Vec::new(),
            stored: None,
        }
    }
}

/// Why a group could not be finalized. A `Store` error ends nothing: the finalizer holds the
/// group and commits it once Postgres answers (`Finalizer::run`). After the others the
/// session ends with the group's deliveries unacked, so the broker redelivers them; any
/// already committed are then answered from Postgres.
#[derive(Debug, thiserror::Error)]
pub enum FinalizeError {
    #[error("cannot commit a group of {jobs} jobs: {source}")]
    Store {
        jobs: usize,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot publish a group's messages: {0}")]
    Publish(#[from] BrokerError),
    #[error("cannot ack deliveries: {0}")]
    Ack(#[source] lapin::Error),
}

impl FinalizeError {
    /// Whether the error is the broker connection going away: an I/O error on it, or a
    /// connection no longer open. A publish can fail with the I/O error a moment before lapin
    /// marks the connection lost, so the session asks the error as well as the connection.
    pub fn is_connection_loss(&self) -> bool {
        let lost = |error: &lapin::Error| {
            error.is_io_error()
                || matches!(error.kind(), lapin::ErrorKind::InvalidConnectionState(_))
        };
        match self {
            Self::Publish(BrokerError::Disconnected) => true,
            Self::Publish(BrokerError::Amqp(error)) | Self::Ack(error) => lost(error),
            Self::Publish(_) | Self::Store { .. } => false,
        }
    }
}

/// Counts of what a finalizer did, for logs and `--exit-when-idle` reporting.
#[derive(Debug, Default, Clone, Copy)]
pub struct FinalizeStats {
    pub groups: u64,
    pub jobs: u64,
    pub duplicates: u64,
    /// Jobs and rejected messages refused because their id belongs to another job.
    pub refused: u64,
}

impl FinalizeStats {
    /// Adds another session's counts.
    pub fn add(&mut self, other: &Self) {
        self.groups += other.groups;
        self.jobs += other.jobs;
        self.duplicates += other.duplicates;
        self.refused += other.refused;
    }
}

/// A group sorted for its commit: the deliveries to ack, the jobs to commit, the stored results
/// to republish and the jobs to park.
struct Sorted {
    tags: Vec<u64>,
    fresh: Vec<SealedJob>,
    republish: Vec<JobResult>,
    refused: Vec<(JobResult, Vec<u8>)>,
    /// The refused jobs' audit events.
    refused_audits: Vec<AuditEvent>,
    parked: Vec<Parked>,
}

/// A job to publish to a retry queue: its body, how long it waits, who first published it.
type Parked = (Vec<u8>, std::time::Duration, Option<String>);

/// Owns the commit → publish → ack sequence for one consuming channel.
pub struct Finalizer {
    pub pool: PgPool,
    pub publisher: Publisher,
    /// Publishes parked jobs to their retry queues, signed, where user ids are enforced;
    /// `None`: they go with the group's other messages.
    pub parks: Option<Publisher>,
    /// The channel the deliveries came from: acks must go back on it.
    pub consume_channel: Channel,
    pub names: Names,
    pub batch_size: usize,
    pub event_publishing: EventPublishing,
    pub acks: AckTracker,
    pub stats: FinalizeStats,
    /// Budgets to settle and alert on; `None` when none are configured.
    pub budgets: Option<crate::budget::Budgets>,
    /// Ends a wait for Postgres (the session is over).
    pub stop: tokio_util::sync::CancellationToken,
    /// This worker's provenance, for events about no particular message (budget alerts).
    pub provenance: crate::messages::Provenance,
    /// The session's lease id (`stages::relay::Lease`), written on its outbox rows.
    pub session: Uuid,
}

impl Finalizer {
    /// Finalizes groups until every sender is gone. Whatever is already waiting when a group
    /// starts joins it (up to `batch_size`), so groups grow with load and no job waits on a timer.
    pub async fn run(
        mut self,
        mut inbox: mpsc::Receiver<Finished>,
    ) -> Result<FinalizeStats, FinalizeError> {
        let mut group = Vec::with_capacity(self.batch_size);
        // Outbox rows already confirmed by the broker: deleted by the next group's transaction
        // (no commit of their own), or by one statement when no group follows soon.
        let mut confirmed = Vec::new();
        loop {
            let received = if confirmed.is_empty() {
                inbox.recv_many(&mut group, self.batch_size).await
            } else {
                let next = inbox.recv_many(&mut group, self.batch_size);
                match tokio::time::timeout(FLUSH_CONFIRMED_AFTER, next).await {
                    Ok(received) => received,
                    Err(_) => {
                        self.mark_published(&mut confirmed).await;
                        continue;
                    }
                }
            };
            if received == 0 {
                break;
            }
            let sorted = match self.sort(std::mem::take(&mut group)).await {
                Ok(sorted) => sorted,
                Err(error) => {
                    self.mark_published(&mut confirmed).await;
                    return Err(error);
                }
            };
            let mut finished = self.finish(&sorted, &mut confirmed).await;
            let mut tries = 1;
            while let Err(error @ FinalizeError::Store { source, .. }) = &finished {
                if tries > 1 && !crate::store::is_unreachable(source) {
                    // Postgres answers and refuses this group itself: it goes back to the queue.
                    tracing::error!(error.cause_chain = ?error, error.message = %error, "Postgres answers but refuses a group it was given again; its deliveries went back to the queue.");
                    self.return_to_queue(&sorted.tags).await?;
                    finished = Ok(());
                    break;
                }
                // The group's calls were made (and billed): it is kept, its deliveries held,
                // and committed once Postgres answers, rather than run again from the queue.
                tracing::error!(error.cause_chain = ?error, error.message = %error, "Cannot commit a group; holding it, and taking no new job, until Postgres answers.");
                metrics::gauge!("switchyard_database_up").set(0.0);
                if !self.wait_for_database().await {
                    // Stopped: the group goes back to the queue, the confirmed rows to the relay.
                    self.return_to_queue(&sorted.tags).await?;
                    return Ok(self.stats);
                }
                metrics::gauge!("switchyard_database_up").set(1.0);
                tracing::info!(
                    "Postgres answers again; committing the group it held and resuming."
                );
                finished = self.finish(&sorted, &mut confirmed).await;
                tries += 1;
            }
            match finished {
                Ok(()) => {
                    if confirmed.len() >= CONFIRMED_BACKLOG {
                        self.mark_published(&mut confirmed).await;
                    }
                }
                Err(error) => {
                    self.mark_published(&mut confirmed).await;
                    return Err(error);
                }
            }
        }
        self.mark_published(&mut confirmed).await;
        Ok(self.stats)
    }

    /// Waits (with backoff) until Postgres answers; `false` when stopped first. Meanwhile no job
    /// is acked, and processing tasks hold their deliveries, so the worker takes nothing new
    /// beyond its prefetch.
    async fn wait_for_database(&self) -> bool {
        let probe = || async {
            sqlx::query("SELECT 1")
                .execute(&self.pool)
                .await
                .map(|_| ())
        };
        let backoff = ExponentialBuilder::default()
            .with_min_delay(std::time::Duration::from_millis(200))
            .with_max_delay(std::time::Duration::from_secs(2))
            .with_jitter()
            .without_max_times();
        tokio::select! {
            () = self.stop.cancelled() => false,
            up = probe.retry(backoff) => up.is_ok(),
        }
    }

    /// Returns a group that could not be committed to the queue (each delivery once).
    async fn return_to_queue(&mut self, tags: &[u64]) -> Result<(), FinalizeError> {
        for &tag in tags {
            self.acks.settle_elsewhere(tag);
            self.consume_channel
                .basic_nack(
                    tag,
                    BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    },
                )
                .await
                .map_err(FinalizeError::Ack)?;
        }
        Ok(())
    }

    /// Sorts a group for its commit; a job to requeue goes back to the queue at once.
    async fn sort(&mut self, group: Vec<Finished>) -> Result<Sorted, FinalizeError> {
        let mut tags = Vec::with_capacity(group.len());
        let mut fresh = Vec::new();
        let mut republish = Vec::new();
        let mut refused = Vec::new();
        let mut refused_audits = Vec::new();
        let mut parked = Vec::new();
        for item in group {
            match item {
                Finished::Requeue { tag } => {
                    self.acks.settle_elsewhere(tag);
                    self.consume_channel
                        .basic_nack(
                            tag,
                            BasicNackOptions {
                                multiple: false,
                                requeue: true,
                            },
                        )
                        .await
                        .map_err(FinalizeError::Ack)?;
                    continue;
                }
                Finished::Job(ref job) => tags.push(job.tag),
                Finished::Duplicate { tag, .. }
                | Finished::Refused { tag, .. }
                | Finished::Park { tag, .. } => tags.push(tag),
            }
            match item {
                Finished::Job(job) => fresh.push(*job),
                Finished::Duplicate { result, .. } => republish.push(*result),
                Finished::Refused {
                    result,
                    original,
                    audits,
                    ..
                } => {
                    refused.push((*result, original));
                    refused_audits.extend(audits);
                }
                Finished::Park {
                    body,
                    wait,
                    published_by,
                    ..
                } => parked.push((body, wait, published_by)),
                Finished::Requeue { .. } => {}
            }
        }
        Ok(Sorted {
            tags,
            fresh,
            republish,
            refused,
            refused_audits,
            parked,
        })
    }

    /// Commits a sorted group, publishes its messages and acks its deliveries. When the commit
    /// fails nothing is published or acked, and the group can be finished again.
    async fn finish(
        &mut self,
        group: &Sorted,
        confirmed: &mut Vec<Uuid>,
    ) -> Result<(), FinalizeError> {
        let Sorted {
            tags,
            fresh,
            republish,
            refused,
            refused_audits,
            parked,
        } = group;
        let began = std::time::Instant::now();
        let committed = self.commit(fresh, refused_audits, confirmed).await?;
        crate::failpoint::hit(crate::failpoint::AFTER_COMMIT);
        let published = committed.as_ref().map(|row| row.id);
        let mut outgoing: Vec<Outgoing> = committed
            .into_iter()
            .flat_map(|row| row.messages)
            .map(|m| m.message)
            .collect();
        outgoing.extend(republish.iter().map(|r| self.result_message(r)));
        for (result, original) in refused {
            // Its own message id: the job id's is the other job's result.
            let message = self.taken_message(self.result_message(result), result.tenant.as_deref());
            outgoing.push(message);
            outgoing.push(self.dead_letter_message(&result.head(), original));
        }
        let parks = parked
            .iter()
            .map(|(body, wait, by)| self.park_message(body.clone(), *wait, by.as_deref()));
        let parks: Vec<Outgoing> = match &self.parks {
            Some(_) => parks.collect(),
            None => {
                outgoing.extend(parks);
                Vec::new()
            }
        };
        // One try: if the broker is gone, the committed messages stay in the outbox for the
        // relay, and the unacked deliveries come back after the reconnect.
        let commit_took = began.elapsed();
        self.publisher.publish_all_once(&outgoing).await?;
        // The outbox row's messages are all confirmed, whatever happens to the parks.
        confirmed.extend(published);
        if let Some(publisher) = self.parks.as_ref().filter(|_| !parks.is_empty()) {
            publisher.publish_all_once(&parks).await?;
        }
        let publish_took = began.elapsed() - commit_took;

        let plan = self.acks.finish(tags.iter().copied());
        if let Some(tag) = plan.multiple {
            self.consume_channel
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .await
                .map_err(FinalizeError::Ack)?;
        }
        for tag in plan.single {
            self.consume_channel
                .basic_ack(tag, BasicAckOptions { multiple: false })
                .await
                .map_err(FinalizeError::Ack)?;
        }
        for job in fresh {
            metrics::counter!("switchyard_jobs_total", "status" => job.head.status.as_str())
                .increment(1);
            let failovers = job.audits.iter().filter(|a| a.kind == "failover").count();
            if failovers > 0 {
                metrics::counter!("switchyard_failovers_total").increment(failovers as u64);
            }
        }
        tracing::debug!(jobs = fresh.len(), messages = outgoing.len(), commit = ?commit_took, publish = ?publish_took, total = ?began.elapsed(), "Finalized a group.");
        metrics::counter!("switchyard_jobs_total", "status" => JobStatus::Rejected.as_str())
            .increment(refused.len() as u64);
        metrics::counter!("switchyard_duplicates_total").increment(republish.len() as u64);
        self.stats.groups += 1;
        self.stats.jobs += fresh.len() as u64;
        self.stats.duplicates += republish.len() as u64;
        self.stats.refused += refused.len() as u64;
        Ok(())
    }

    /// Deletes confirmed outbox rows in one statement (when no group's transaction will). A
    /// failure only means the relay publishes them again later, under the same `message_id`.
    async fn mark_published(&self, confirmed: &mut Vec<Uuid>) {
        if confirmed.is_empty() {
            return;
        }
        let deleted = async {
            let mut conn = self.pool.acquire().await?;
            outbox::delete_many(&mut conn, confirmed).await
        };
        if let Err(error) = deleted.await {
            tracing::warn!(messages = confirmed.len(), error.message = %error, "Could not mark published outbox rows; the relay will publish them again.");
        }
        confirmed.clear();
    }

    /// Writes the group in one transaction, together with every message it will publish (its
    /// outbox row, returned; `None` for a group without fresh jobs). A job that lost a race
    /// with a concurrent duplicate publishes the winner's stored result.
    ///
    /// The transaction also deletes `confirmed`, earlier groups' outbox rows the broker has
    /// confirmed, and empties it once committed. `refused` are the audit events of jobs
    /// refused because their id is another job's: audited and published as events, though
    /// nothing else of those jobs is stored.
    async fn commit(
        &self,
        fresh: &[SealedJob],
        refused: &[AuditEvent],
        confirmed: &mut Vec<Uuid>,
    ) -> Result<Option<OutboxRow>, FinalizeError> {
        if fresh.is_empty() && refused.is_empty() {
            return Ok(None);
        }
        let store_error = |source| FinalizeError::Store {
            jobs: fresh.len(),
            source,
        };
        let mut tx = self.pool.begin().await.map_err(store_error)?;
        let job_rows: Vec<&JobRow> = fresh.iter().map(|j| &j.job).collect();
        let attempt_rows: Vec<&AttemptRow> = fresh.iter().flat_map(|j| &j.attempts).collect();
        // Each result was serialized once, in its job's task: the same text is stored and
        // published.
        let result_rows: Vec<(&ResultHead, &str)> = fresh
            .iter()
            .map(|j| (&j.head, j.stored_body.as_deref().unwrap_or(&j.body)))
            .collect();
        let costs: Vec<(Uuid, &CostEvent)> = fresh
            .iter()
            .flat_map(|j| {
                j.costs
                    .iter()
                    .filter(|(attempt, _)| !j.recorded.contains(attempt))
                    .map(|(attempt, cost)| (*attempt, cost))
            })
            .collect();
        // A call whose record reported an error may have landed after all, its answer lost
        // and `cost_ledger::is_recorded` unable to tell then: its row and settlements are in.
        // Writing the row again would fail the group on the primary key and run its jobs again.
        let landed = if costs.is_empty() {
            std::collections::HashSet::new()
        } else {
            let ids: Vec<Uuid> = costs.iter().map(|(_, c)| c.event_id).collect();
            cost_ledger::recorded_attempts(&mut tx, &ids)
                .await
                .map_err(store_error)?
        };
        let costs: Vec<(Uuid, &CostEvent)> = costs
            .into_iter()
            .filter(|(attempt, _)| !landed.contains(attempt))
            .collect();
        let records = group::Records {
            jobs: &job_rows,
            attempts: &attempt_rows,
            results: &result_rows,
            costs: &costs,
        };
        let inserted = group::insert(&mut tx, &records, Utc::now())
            .await
            .map_err(store_error)?;
        // The tokens of tiered calls recorded here grow their model's monthly volume, as
        // dispatch's own record would have (before the budget rows, in the order it locks them).
        let tiered: std::collections::HashSet<Uuid> = fresh
            .iter()
            .flat_map(|j| j.tiered.iter().copied())
            .collect();
        let tiered: Vec<&CostEvent> = costs
            .iter()
            .filter(|(attempt, _)| tiered.contains(attempt))
            .map(|(_, cost)| *cost)
            .collect();
        cost_ledger::add_volumes(&mut tx, &tiered)
            .await
            .map_err(store_error)?;
        // A job lost the race when its result row was already there, or when an earlier copy
        // of the same job in this very group claimed the row.
        let inserted: std::collections::HashSet<Uuid> = inserted.into_iter().collect();
        let mut claimed = std::collections::HashSet::with_capacity(fresh.len());
        let lost: Vec<Uuid> = fresh
            .iter()
            .map(|j| j.head.job_id)
            .filter(|id| !(inserted.contains(id) && claimed.insert(*id)))
            .collect();
        let stored = results::find_latest_many(&mut tx, &lost)
            .await
            .map_err(store_error)?;
        let lost_races: BTreeMap<Uuid, JobResult> =
            stored.into_iter().map(|r| (r.job_id, r)).collect();
        // The rows every lane's transaction shares come last, so each is locked only for the
        // end of the transaction: a budget's period row from its settlement, and a tenant's
        // audit chain head from the audit insert, until the commit.
        let mut alerts = match &self.budgets {
            Some(budgets) => settle_budgets(&mut tx, budgets, fresh, &landed)
                .await
                .map_err(store_error)?,
            None => Vec::new(),
        };
        for alert in &mut alerts {
            alert.provenance = self.provenance.clone();
        }
        // Each refused job's event keeps its own provenance (stamped in its task).
        alerts.extend(refused.iter().cloned());
        let row = OutboxRow {
            id: Uuid::now_v7(),
            created_at: Utc::now(),
            session: Some(self.session),
            messages: self.messages(fresh, &lost_races, &alerts),
        };
        // A rejected message seen again (redelivered after its commit) adds no second audit.
        let audits: Vec<&AuditEvent> = fresh
            .iter()
            .filter(|j| !seen_before(j, &lost_races))
            .flat_map(|j| j.audits.iter())
            .chain(&alerts)
            .collect();
        let tenants = audit::tenants(&audits);
        let heads = group::write_outbox_then_lock_heads(&mut tx, &row, confirmed, &tenants)
            .await
            .map_err(store_error)?;
        audit::append_locked(&mut tx, &audits, &tenants, heads)
            .await
            .map_err(store_error)?;
        tx.commit().await.map_err(store_error)?;
        confirmed.clear();
        Ok(Some(row))
    }

    /// Every message of a committed group: one result per job, dead-letter copies of first-seen
    /// rejections, then the cost and audit events; each with the `results` row that holds its
    /// body, when one does (see [`OutboxMessage::stored_as`]).
    ///
    /// A job's own result is published as its task serialized it (a redacted retention copy
    /// is only stored, never published).
    fn messages(
        &self,
        fresh: &[SealedJob],
        lost_races: &BTreeMap<Uuid, JobResult>,
        alerts: &[AuditEvent],
    ) -> Vec<OutboxMessage> {
        let mut outgoing = Vec::with_capacity(fresh.len() + 4);
        for job in fresh {
            // A job that lost a race publishes the winner's result.
            outgoing.push(match lost_races.get(&job.head.job_id) {
                // Unless the winner is another tenant's job under the same id (the two were in
                // flight at once, so neither saw the other's result): this job's own result
                // goes to its own key, under its own message id, and is not stored.
                Some(winner) if winner.tenant != job.head.tenant => {
                    let body = job.body.as_bytes().to_vec();
                    let message = self.result_message_with_body(&job.head, body);
                    self.taken_message(message, job.head.tenant.as_deref())
                        .into()
                }
                Some(winner) => self.result_message(winner).into(),
                None => {
                    // The row this transaction writes holds the body byte for byte, unless
                    // retention stores a redacted copy. A `cancelled` row may still be replaced
                    // by the job's real outcome, so its message keeps its own body.
                    let stored_as = (job.stored_body.is_none()
                        && job.head.status != JobStatus::Cancelled)
                        .then_some((job.head.job_id, job.head.generation));
                    let body = job.body.as_bytes().to_vec();
                    OutboxMessage {
                        message: self.result_message_with_body(&job.head, body),
                        stored_as,
                    }
                }
            });
            // A rejected message seen again was dead-lettered the first time.
            if let Some(body) = &job.dead_letter
                && !seen_before(job, lost_races)
            {
                outgoing.push(self.dead_letter_message(&job.head, body).into());
            }
        }
        let costs: Vec<&CostEvent> = fresh
            .iter()
            .flat_map(|j| j.costs.iter().map(|(_, c)| c))
            .collect();
        let audits: Vec<&AuditEvent> = fresh
            .iter()
            .filter(|j| !seen_before(j, lost_races))
            .flat_map(|j| j.audits.iter())
            .chain(alerts)
            .collect();
        let mut events = Vec::with_capacity(2);
        self.event_messages(&costs, CostEvent::routing_key, |e| e.event_id, &mut events);
        self.event_messages(
            &audits,
            AuditEvent::routing_key,
            |e| e.event_id,
            &mut events,
        );
        outgoing.extend(events.into_iter().map(OutboxMessage::from));
        outgoing
    }

    /// A result whose job id belongs to another job: its own message id, `<id>/taken/<tenant>`
    /// (`_` for none), since the job id's is the other job's.
    fn taken_message(&self, mut message: Outgoing, tenant: Option<&str>) -> Outgoing {
        message.message_id = format!(
            "{}/taken/{}",
            message.message_id,
            tenant.unwrap_or(NONE_SEGMENT)
        );
        message
    }

    fn result_message(&self, result: &JobResult) -> Outgoing {
        self.result_message_with_body(&result.head(), to_json(result))
    }

    /// The result message placed by `head`, whose JSON is `body`.
    fn result_message_with_body(&self, head: &ResultHead, body: Vec<u8>) -> Outgoing {
        Outgoing {
            exchange: self.names.results_exchange(),
            routing_key: head.routing_key(),
            body,
            message_id: head.message_id(),
            kind: RESULT_SCHEMA.to_owned(),
            headers: None,
        }
    }

    fn park_message(
        &self,
        body: Vec<u8>,
        wait: std::time::Duration,
        published_by: Option<&str>,
    ) -> Outgoing {
        let queue = self.names.retry_queue(wait);
        let message_id = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("id").and_then(|id| id.as_str()).map(str::to_owned))
            .unwrap_or_default();
        let headers = published_by.map(|user| {
            let mut headers = FieldTable::default();
            headers.insert(
                PUBLISHED_BY_HEADER.into(),
                AMQPValue::LongString(user.into()),
            );
            headers
        });
        Outgoing {
            exchange: String::new(),
            routing_key: queue,
            body,
            message_id,
            kind: JOB_SCHEMA.to_owned(),
            headers,
        }
    }

    fn dead_letter_message(&self, head: &ResultHead, body: &[u8]) -> Outgoing {
        let error = head
            .error
            .as_ref()
            .map_or_else(String::new, |e| format!("{}: {}", e.code, e.message));
        let mut headers = FieldTable::default();
        headers.insert(ERROR_HEADER.into(), AMQPValue::LongString(error.into()));
        headers.insert(
            "x-switchyard-job-id".into(),
            AMQPValue::LongString(head.job_id.to_string().into()),
        );
        Outgoing {
            exchange: self.names.dead_exchange(),
            routing_key: JOBS_ROUTING_KEY.to_owned(),
            body: body.to_vec(),
            message_id: head.job_id.to_string(),
            kind: JOB_SCHEMA.to_owned(),
            headers: Some(headers),
        }
    }

    /// Cost or audit events: one message per routing key carrying an array (`batched`), or
    /// one message per event (`single`).
    fn event_messages<E: Serialize + HasSchema>(
        &self,
        events: &[&E],
        routing_key: impl Fn(&E) -> String,
        event_id: impl Fn(&E) -> Uuid,
        outgoing: &mut Vec<Outgoing>,
    ) {
        let message =
            |routing_key: String, body: Vec<u8>, message_id: Uuid, kind: String| Outgoing {
                exchange: self.names.events_exchange(),
                routing_key,
                body,
                message_id: message_id.to_string(),
                kind,
                headers: None,
            };
        match self.event_publishing {
            EventPublishing::Single => outgoing.extend(events.iter().map(|event| {
                message(
                    routing_key(event),
                    to_json(event),
                    event_id(event),
                    E::SCHEMA.to_owned(),
                )
            })),
            EventPublishing::Batched => {
                let mut by_key: BTreeMap<String, Vec<&E>> = BTreeMap::new();
                for event in events {
                    by_key.entry(routing_key(event)).or_default().push(event);
                }
                outgoing.extend(by_key.into_iter().map(|(key, batch)| {
                    message(
                        key,
                        to_json(&batch),
                        Uuid::now_v7(),
                        format!("{}[]", E::SCHEMA),
                    )
                }));
            }
        }
    }
}

/// Settles the group's budget reservations (and soft budgets) to actual costs, then announces
/// every alert threshold newly crossed, once per budget period.
/// Settles the budget holds of the group's calls not yet recorded (neither by dispatch nor,
/// `landed`, by a record whose answer was lost), and returns the alerts they set off.
async fn settle_budgets(
    conn: &mut sqlx::PgConnection,
    budgets: &crate::budget::Budgets,
    fresh: &[SealedJob],
    landed: &std::collections::HashSet<Uuid>,
) -> Result<Vec<AuditEvent>, sqlx::Error> {
    let mut settlements = Vec::new();
    let mut touched: Vec<(String, chrono::DateTime<Utc>)> = Vec::new();
    for job in fresh {
        for (attempt, holds) in &job.holds {
            let cost = job
                .costs
                .iter()
                .find(|(id, _)| id == attempt)
                .map(|(_, c)| c);
            let settled = budgets.settlements(holds, cost);
            touched.extend(settled.iter().map(|s| (s.budget.clone(), s.period_start)));
            if !job.recorded.contains(attempt) && !landed.contains(attempt) {
                settlements.extend(settled);
            }
        }
    }
    crate::store::budgets::settle(conn, &settlements).await?;
    touched.sort();
    touched.dedup();
    let mut alerts = Vec::new();
    for (name, period_start) in touched {
        let Some(budget) = budgets.get(&name) else {
            continue;
        };
        let mut levels: Vec<i32> = budget
            .alerts
            .iter()
            .map(|&level| i32::try_from(level).unwrap_or(i32::MAX))
            .collect();
        levels.sort_unstable();
        let reached =
            crate::store::budgets::mark_alerts(conn, &name, period_start, &levels).await?;
        for (level, spent, cap) in reached {
            metrics::counter!("switchyard_budget_alerts_total", "budget" => name.clone(), "level" => level.to_string())
                .increment(1);
            alerts.push(AuditEvent::new(
                budget.tenant.as_deref().unwrap_or(NONE_SEGMENT),
                None,
                "budget_alert",
                Utc::now(),
                json!({
                    "budget": name, "level_percent": level, "spent_usd": spent.normalize().to_string(),
                    "cap_usd": cap.normalize().to_string(), "period_start": period_start,
                    "mode": format!("{:?}", budget.mode).to_lowercase(),
                }),
            ));
        }
    }
    Ok(alerts)
}

/// The schema name an event type is published under.
pub trait HasSchema {
    const SCHEMA: &'static str;
}

impl HasSchema for CostEvent {
    const SCHEMA: &'static str = COST_EVENT_SCHEMA;
}

impl HasSchema for AuditEvent {
    const SCHEMA: &'static str = crate::messages::events::AUDIT_EVENT_SCHEMA;
}

fn to_json<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    to_json_string(value).into_bytes()
}

fn to_json_string<T: Serialize + ?Sized>(value: &T) -> String {
    // Serializing our own message types cannot fail: they hold no maps with non-string keys.
    serde_json::to_string(value).unwrap_or_default()
}

/// JSON text that waits (for its finalize group) without spare capacity: serializing doubles
/// the buffer as it grows, so a 1.1 KB result would otherwise hold 2 KB, and thousands of
/// finished jobs may wait at once.
fn held_json<T: Serialize + ?Sized>(value: &T) -> String {
    let mut text = to_json_string(value);
    text.shrink_to_fit();
    text
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    use super::*;

    #[test]
    fn io_errors_and_closed_connections_are_connection_losses_and_nothing_else_is() {
        let reset = || {
            lapin::Error::from(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "Connection reset by peer",
            ))
        };
        assert!(FinalizeError::Publish(BrokerError::Amqp(reset())).is_connection_loss());
        assert!(FinalizeError::Ack(reset()).is_connection_loss());
        assert!(FinalizeError::Publish(BrokerError::Disconnected).is_connection_loss());
        let nacked = BrokerError::Nacked {
            exchange: "x".to_owned(),
            routing_key: "k".to_owned(),
        };
        assert!(!FinalizeError::Publish(nacked).is_connection_loss());
        let protocol = lapin::Error::from(lapin::ErrorKind::FutureCompleted);
        assert!(!FinalizeError::Ack(protocol).is_connection_loss());
    }

    /// A sealed job's JSON text (which waits for its group, thousands at a time) has no spare
    /// capacity, and is exactly what serializing the result gives.
    #[test]
    fn a_sealed_result_holds_its_json_text_without_spare_capacity() {
        // Long enough that serializing grows the buffer past its size (128 → … → 2,048 bytes).
        let rejection = Rejection {
            job_id: Uuid::now_v7(),
            tenant: Some("acme".to_owned()),
            batch: None,
            route: None,
            generation: 0,
            error: crate::messages::JobError::new("invalid_json", "x".repeat(1_100)),
            raw_body: b"{".to_vec(),
        };
        let mut job = FinishedJob::rejected(1, rejection, Utc::now(), b"{".to_vec());
        job.stored = Some(Box::new(job.result.clone()));
        let expected = serde_json::to_string(&job.result).unwrap();
        assert!(
            expected.capacity() > expected.len(),
            "the case must be one where serializing leaves spare capacity"
        );
        let sealed = job.seal();
        assert_eq!(sealed.body, expected);
        assert_eq!(sealed.body.capacity(), sealed.body.len());
        let stored = sealed.stored_body.expect("a retention copy");
        assert_eq!(stored, expected);
        assert_eq!(stored.capacity(), stored.len());
    }

    /// The stored request and its digest are exactly what hashing `Value::to_string()` gave
    /// before the request was serialized once: keys sorted, escapes, non-ASCII text, floats.
    #[test]
    fn the_request_text_and_digest_match_the_value_printing() {
        let request: crate::messages::ChatRequest = serde_json::from_str(
            r#"{"zeta": {"y": 1, "b": [0.1, 1e300, -2.5]}, "alpha": "tab\t \"quote\" é ✓ \u0001",
                "messages": [{"role": "user", "content": "Grüße \n ✓"}], "temperature": 0.7,
                "max_tokens": 12, "model": "m"}"#,
        )
        .unwrap();
        let value = serde_json::to_value(&request).unwrap();
        let text = request_json(&request).unwrap();
        assert_eq!(text.get(), value.to_string());
        assert!(
            text.get().starts_with(r#"{"alpha":"#),
            "keys sorted: {}",
            text.get()
        );
        assert_eq!(
            request_hash(Some(&text)),
            hex::encode(Sha256::digest(value.to_string().as_bytes()))
        );
        assert_eq!(request_hash(None), hex::encode(Sha256::digest(b"null")));
    }
}
