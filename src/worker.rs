//! The worker: consumes the jobs queue with manual acks and a prefetch equal to its
//! concurrency, runs each delivery through ingest → route → dispatch on its own task, and hands
//! the outcome to one finalizer that commits, publishes and acks in groups.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use backon::{ExponentialBuilder, Retryable};
use chrono::Utc;
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::Context;
use crate::messages::JobResult;
use crate::messages::events::STREAM_CHUNK_SCHEMA;
use crate::messages::{ChunkKind, Job, JobError, StreamChunk};
use crate::queue::consumer::AckTracker;
use crate::queue::publisher::Outgoing;
use crate::queue::publisher::Publisher;
use crate::queue::topology;
use crate::routing::RouteError;
use crate::stages::dispatch::{Dispatched, StreamItem, StreamSink, dispatch};
use crate::stages::finalize::{
    FinalizeStats, Finalizer, Finished, FinishedJob, PUBLISHED_BY_HEADER,
};
use crate::stages::ingest::{Rejection, ingest};
use crate::stages::relay::{Lease, Running};
use crate::stages::route::route;

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Jobs in flight at once (and the consumer prefetch).
    pub concurrency: u16,
    /// Stop once the queue has been empty and nothing was in flight for `idle_after`.
    pub exit_when_idle: bool,
    pub idle_after: Duration,
    /// How long in-flight jobs may take to finish once shutdown starts.
    pub grace: Duration,
}

/// Why the worker stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerExit {
    /// Shutdown was requested (signal or caller).
    Shutdown,
    /// `--exit-when-idle` and the queue stayed empty.
    Idle,
    /// The broker cancelled the consumer (e.g. the queue was deleted).
    ConsumerCancelled,
}

/// What a worker did.
#[derive(Debug, Clone, Copy)]
pub struct WorkerReport {
    pub exit: WorkerExit,
    pub received: u64,
    pub finalized: FinalizeStats,
}

/// Consumes until shutdown or idleness. A lost broker connection ends the current session
/// (in-flight jobs are abandoned unacked, so the broker redelivers them) and the worker
/// reconnects with backoff and consumes again; a Postgres outage pauses it (see
/// [`Finalizer::run`]). Only an error that outlasts the reconnect backoff ends it.
pub async fn run(ctx: &Context, options: &WorkerOptions) -> anyhow::Result<WorkerReport> {
    // Not a child of `shutdown`: sharing, the relay (and health/metrics) must go on through
    // the grace period, and stop only once the worker is done.
    let sharing = CancellationToken::new();
    let _stop_sharing = sharing.clone().drop_guard();
    warn_about_parks_under_enforcement(ctx);
    if let Some(addr) = &ctx.settings.worker.http_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot serve health and metrics on {addr}"))?;
        tracing::info!(addr = %addr, "Serving /healthz, /readyz and /metrics.");
        ctx.tasks
            .spawn(crate::http::serve(listener, ctx.clone(), sharing.clone()));
    }
    crate::http::metrics_handle();
    // Up from the start (the worker has just reached it): an alert on the gauge's absence, or
    // on its value, sees it before the first commit.
    metrics::gauge!("switchyard_database_up").set(1.0);
    let (rests, announced) = mpsc::unbounded_channel();
    ctx.registry.announce_rests_to(&rests);
    ctx.tasks.spawn(crate::routing::sharing::share_key_rests(
        ctx.registry.clone(),
        ctx.pool.clone(),
        announced,
        sharing.clone(),
    ));
    ctx.tasks.spawn(crate::routing::sharing::share_health(
        ctx.router.clone(),
        ctx.limiter.clone(),
        ctx.budgets.clone(),
        ctx.pool.clone(),
        sharing.clone(),
    ));
    let running = Running::default();
    let relay = ctx.tasks.spawn(crate::stages::relay::run(
        ctx.pool.clone(),
        ctx.broker.clone(),
        Duration::from_millis(ctx.settings.worker.outbox_relay_after_ms),
        running.clone(),
        sharing.clone(),
    ));
    let state = WorkerState {
        running,
        received: AtomicU64::new(0),
        in_flight: Arc::new(AtomicUsize::new(0)),
        stop: ctx.shutdown.child_token(),
    };
    let lanes = lane_prefetches(options.concurrency, ctx.settings.worker.lanes);
    // Every lane runs to its end. A lane that fails stops the others through `stop`, so they
    // finish their in-flight jobs within the grace period instead of being dropped midway.
    let outcomes = futures::future::join_all(lanes.iter().enumerate().map(|(lane, &prefetch)| {
        let state = &state;
        async move {
            let outcome = run_lane(ctx, options, lane, prefetch, state).await;
            if outcome.is_err() {
                state.stop.cancel();
            }
            outcome
        }
    }))
    .await;
    // Calls abandoned with their sessions (the grace period ran out) left their concurrency
    // slots behind; the sharing task, stopped below, would have freed them.
    if let Some(limiter) = &ctx.limiter {
        limiter.release_orphans().await;
    }
    let mut ended = Vec::with_capacity(outcomes.len());
    for outcome in outcomes {
        ended.push(outcome?);
    }
    let mut finalized = FinalizeStats::default();
    for (_, stats) in &ended {
        finalized.add(stats);
    }
    // A shutdown request outranks a cancelled consumer, which outranks idleness.
    let exit = ended
        .iter()
        .map(|(exit, _)| *exit)
        .max_by_key(|exit| match exit {
            WorkerExit::Shutdown => 2,
            WorkerExit::ConsumerCancelled => 1,
            WorkerExit::Idle => 0,
        })
        .unwrap_or(WorkerExit::Shutdown);
    // The relay closes its channel on its way out; the connection closes after this returns.
    sharing.cancel();
    if tokio::time::timeout(options.grace, relay).await.is_err() {
        tracing::warn!("The outbox relay did not stop within the grace period.");
    }
    let report = WorkerReport {
        exit,
        received: state.received.load(Ordering::Relaxed),
        finalized,
    };
    tracing::info!(
        jobs = report.finalized.jobs,
        duplicates = report.finalized.duplicates,
        refused = report.finalized.refused,
        groups = report.finalized.groups,
        "Worker stopped."
    );
    Ok(report)
}

/// Splits the worker's concurrency over `lanes` consumers (at most one per job slot): each lane
/// has its own channel, prefetch and finalizer, so one lane commits a group while another
/// waits for the broker's confirms, and Postgres and RabbitMQ round trips overlap instead of
/// running one after another.
fn lane_prefetches(concurrency: u16, lanes: u16) -> Vec<u16> {
    let lanes = lanes.clamp(1, concurrency.max(1));
    let (each, extra) = (concurrency / lanes, concurrency % lanes);
    (0..lanes)
        .map(|lane| (each + u16::from(lane < extra)).max(1))
        .collect()
}

/// One lane: consuming sessions, reconnecting after a lost broker, until shutdown, idleness or
/// an error that outlasts the reconnect backoff.
async fn run_lane(
    ctx: &Context,
    options: &WorkerOptions,
    lane: usize,
    prefetch: u16,
    state: &WorkerState,
) -> anyhow::Result<(WorkerExit, FinalizeStats)> {
    let mut finalized = FinalizeStats::default();
    let lease_ttl = Duration::from_millis(ctx.settings.worker.outbox_relay_after_ms);
    let exit = loop {
        // The session's outbox rows are its own while the lease lives: the relay leaves them.
        let lease = Lease::start(&ctx.pool, &ctx.tasks, lease_ttl, &state.running).await;
        let outcome = session(
            ctx,
            options,
            lane,
            prefetch,
            state,
            &mut finalized,
            lease.id(),
        )
        .await;
        lease.end().await;
        let end = match outcome {
            Ok(end) => end,
            // Setting up a session on a connection that just died.
            Err(error) if !ctx.broker.is_connected() => {
                tracing::warn!(lane, error.message = %error, "Could not start consuming; the broker connection is lost.");
                SessionEnd::BrokerLost
            }
            Err(error) => return Err(error),
        };
        match end {
            SessionEnd::Exit(exit) => break exit,
            SessionEnd::BrokerLost => {
                metrics::counter!("switchyard_worker_sessions_lost_total").increment(1);
                tokio::select! {
                    () = state.stop.cancelled() => break WorkerExit::Shutdown,
                    connected = ctx.broker.connection() => {
                        connected.context("RabbitMQ stayed unreachable; giving up")?;
                    }
                }
                tracing::info!(lane, "Consuming again after reconnecting to RabbitMQ.");
            }
        }
    };
    Ok((exit, finalized))
}

/// What the lanes of one worker share.
struct WorkerState {
    /// The lanes' running sessions, whose outbox rows this worker's relay leaves alone.
    running: Running,
    /// Deliveries received by every lane.
    received: AtomicU64,
    /// Jobs being processed by every lane: a lane is idle only when no lane has one, since a
    /// job another lane holds may still be parked or requeued.
    in_flight: Arc<AtomicUsize>,
    /// Cancelled on shutdown, or when one lane fails, so the others stop gracefully.
    stop: CancellationToken,
}

/// Counts one job in [`WorkerState::in_flight`] while it lives.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(count))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How one consuming session ended.
enum SessionEnd {
    Exit(WorkerExit),
    /// The broker connection (or the consuming channel) is gone: reconnect and consume again.
    BrokerLost,
}

/// Whether the broker connection or the consuming channel is gone, which makes an error on
/// them a reason to reconnect rather than to stop.
fn broker_lost(ctx: &Context, channel: &lapin::Channel) -> bool {
    !ctx.broker.is_connected() || !channel.status().connected()
}

/// One lane's consumer on one channel (prefetch `prefetch`), with its own finalizer, until
/// shutdown, idleness or the loss of the broker connection.
async fn session(
    ctx: &Context,
    options: &WorkerOptions,
    lane: usize,
    prefetch: u16,
    state: &WorkerState,
    finalized: &mut FinalizeStats,
    lease: uuid::Uuid,
) -> anyhow::Result<SessionEnd> {
    let channel = ctx.broker.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let queue = ctx.names.jobs_queue();
    let consumer_tag = format!("switchyard-{}", uuid::Uuid::now_v7().simple());
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            consumer_tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| {
            format!("cannot consume from queue {queue} (run `switchyard migrate`?)")
        })?;
    let publisher = Publisher::open(&ctx.broker).await?;
    // Parked jobs are signed where user ids are enforced: one comes back as published by the
    // workers' user, which is what lets `published_by` believe the job's first publisher.
    // Only they are: a broker that maps logins to other users would refuse every signed
    // message, and results must not be among them.
    let parks = if ctx.settings.enforces_any_user_id() {
        Some(Publisher::signed(&ctx.broker).await?)
    } else {
        None
    };
    // Stream chunks go on their own confirm channel so they never wait behind a finalize group.
    let streams = Publisher::open(&ctx.broker).await?;
    let (outbox, inbox) = mpsc::channel(usize::from(prefetch) * 2);
    let abandon = CancellationToken::new();
    let mut publishers = vec![publisher.clone(), streams.clone()];
    publishers.extend(parks.clone());
    let finalizer = Finalizer {
        pool: ctx.pool.clone(),
        publisher,
        parks,
        consume_channel: channel.clone(),
        names: ctx.names.clone(),
        batch_size: ctx.settings.worker.finalize_batch_size,
        event_publishing: ctx.settings.worker.event_publishing,
        acks: AckTracker::default(),
        stats: FinalizeStats::default(),
        budgets: ctx.budgets.clone(),
        provenance: ctx.identity.provenance(),
        stop: abandon.clone(),
        session: lease,
    };
    let mut finalizing = Some(ctx.tasks.spawn(finalizer.run(inbox)));
    let processing = TaskTracker::new();
    let mut idle_tick = tokio::time::interval(Duration::from_millis(200));
    let mut idle_since: Option<Instant> = None;
    tracing::info!(queue = %queue, lane, prefetch, concurrency = options.concurrency, "Worker is consuming.");

    let end = loop {
        tokio::select! {
            _ = state.stop.cancelled() => break SessionEnd::Exit(WorkerExit::Shutdown),
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    idle_since = None;
                    state.received.fetch_add(1, Ordering::Relaxed);
                    let in_flight = InFlight::new(&state.in_flight);
                    processing.spawn(process(ctx.clone(), streams.clone(), delivery, outbox.clone(), abandon.clone(), in_flight));
                }
                Some(Err(error)) => {
                    tracing::warn!(error.message = %error, "The jobs consumer failed; in-flight jobs stay unacked for redelivery.");
                    break SessionEnd::BrokerLost;
                }
                None if broker_lost(ctx, &channel) => break SessionEnd::BrokerLost,
                None => break SessionEnd::Exit(WorkerExit::ConsumerCancelled),
            },
            finished = async { finalizing.as_mut()?.await.ok() }, if finalizing.is_some() => {
                finalizing = None;
                match finished {
                    Some(Err(error)) if broker_lost(ctx, &channel) => {
                        tracing::warn!(error.message = %error, "Finalize lost the broker; committed messages stay in the outbox for the relay.");
                        break SessionEnd::BrokerLost;
                    }
                    Some(Err(error)) => return Err(error).context("finalize failed; unacked jobs will be redelivered"),
                    _ => anyhow::bail!("the finalizer stopped unexpectedly"),
                }
            }
            _ = idle_tick.tick(), if options.exit_when_idle => {
                if state.in_flight.load(Ordering::Relaxed) == 0 && is_idle(ctx, &channel).await {
                    let since = *idle_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= options.idle_after {
                        break SessionEnd::Exit(WorkerExit::Idle);
                    }
                } else {
                    idle_since = None;
                }
            }
        }
    };

    processing.close();
    match end {
        SessionEnd::BrokerLost => {
            // Deliveries of a dead channel can no longer be acked: stop working on them.
            abandon.cancel();
            processing.wait().await;
        }
        SessionEnd::Exit(exit) => {
            tracing::info!(lane, reason = ?exit, in_flight = processing.len(), "Worker is stopping.");
            if exit != WorkerExit::ConsumerCancelled {
                let cancel = channel
                    .basic_cancel(consumer_tag.as_str().into(), BasicCancelOptions::default());
                match tokio::time::timeout(options.grace, cancel).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        tracing::warn!(error = %error, "Could not cancel the consumer.")
                    }
                    Err(_) => tracing::warn!("The broker did not confirm cancelling the consumer."),
                }
            }
            if tokio::time::timeout(options.grace, processing.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    in_flight = processing.len(),
                    "Grace period over; abandoning in-flight jobs (they stay unacked and will be redelivered)."
                );
                abandon.cancel();
                processing.wait().await;
            }
        }
    }
    drop(outbox);
    if let Some(mut handle) = finalizing {
        // Every job has been handed over; the finalizer commits and publishes what it holds. A
        // finalizer that cannot finish (confirms that never come) is abandoned after the grace
        // period: its jobs are unacked, so the broker redelivers them and nothing is lost.
        let finished = tokio::select! {
            finished = &mut handle => finished,
            () = tokio::time::sleep(options.grace) => {
                tracing::warn!(grace = ?options.grace, "The finalizer did not finish within the grace period; its unacked jobs will be redelivered.");
                handle.abort();
                // Closing the channel returns its unacked deliveries to the queue now.
                crate::queue::close_within("consumer channel", options.grace, channel.close(200, "finalizer stuck".into())).await;
                close_all(&publishers, options.grace).await;
                // Idle no longer holds once those jobs are back: consume again instead.
                return Ok(match end {
                    SessionEnd::Exit(WorkerExit::Idle) => SessionEnd::BrokerLost,
                    end => end,
                });
            }
        };
        match finished.context("the finalizer panicked")? {
            Ok(stats) => finalized.add(&stats),
            Err(error)
                if matches!(end, SessionEnd::BrokerLost)
                    || broker_lost(ctx, &channel)
                    || error.is_connection_loss() =>
            {
                tracing::warn!(error.message = %error, "Finalize could not finish on the lost connection; its jobs will be redelivered.");
                if matches!(end, SessionEnd::Exit(_)) {
                    return Ok(SessionEnd::BrokerLost);
                }
            }
            Err(error) => {
                return Err(error).context("finalize failed; unacked jobs will be redelivered");
            }
        }
    }
    close_all(&publishers, options.grace).await;
    crate::queue::close_within(
        "consumer channel",
        options.grace,
        channel.close(200, "worker stopped".into()),
    )
    .await;
    Ok(end)
}

/// Closes a session's publisher channels, once nothing publishes on them any more.
async fn close_all(publishers: &[Publisher], within: Duration) {
    futures::future::join_all(publishers.iter().map(|publisher| publisher.close(within))).await;
}

/// Nothing waits in the queues and no committed message waits in the outbox.
async fn is_idle(ctx: &Context, channel: &lapin::Channel) -> bool {
    if !matches!(topology::pending_jobs(channel, &ctx.names).await, Ok(0)) {
        return false;
    }
    let pending = async {
        let mut conn = ctx.pool.acquire().await?;
        crate::store::outbox::pending(&mut conn).await
    };
    matches!(pending.await, Ok(0))
}

/// One delivery through the pipeline. Abandoned on `abandon` without sending anything, which
/// leaves the delivery unacked for redelivery.
///
/// A plain function returning the task, not an `async fn`: an `async fn` keeps a slot for each
/// argument as well as for the local it is moved into, so the task would hold the context and
/// the delivery (some 750 bytes) twice for its whole life. Here they go straight into the boxed
/// `handle`, and the task keeps only what it needs once the job is handled.
fn process(
    ctx: Context,
    streams: Publisher,
    delivery: Delivery,
    outbox: mpsc::Sender<Finished>,
    abandon: CancellationToken,
    // Counted until the job is handed to the finalizer (or abandoned).
    in_flight: InFlight,
) -> impl Future<Output = ()> + Send + 'static {
    let tag = delivery.delivery_tag;
    let trace_id = crate::audit::delivery_trace_id(delivery.properties.headers().as_ref());
    let identity = Arc::clone(&ctx.identity);
    let settings = Arc::clone(&ctx.settings);
    // Boxed, so a job's task keeps only this small frame once it is handled and waits for
    // the finalizer: thousands of jobs in flight must not each hold the largest state.
    let handled = Box::pin(AssertUnwindSafe(handle(ctx, streams, delivery)).catch_unwind());
    async move {
        let _in_flight = in_flight;
        let (mut finished, message_sha256) = tokio::select! {
            _ = abandon.cancelled() => return,
            finished = handled => finished.unwrap_or_else(|_| {
                // The panic message went to stderr through the panic hook.
                metrics::counter!("switchyard_job_panics_total").increment(1);
                tracing::error!(delivery_tag = tag, "A job's task panicked; returning it to the queue (the broker dead-letters it after the delivery limit).");
                (Finished::Requeue { tag }, String::new())
            }),
        };
        // What the tenant the message names keeps (a refused message's events are in its
        // chain too).
        let retention_of = |result: &crate::messages::JobResult| {
            (result.tenant.as_deref()).map_or_else(Default::default, |t| settings.retention(t))
        };
        match &mut finished {
            Finished::Job(job) => {
                let retention = retention_of(&job.result);
                let provenance = identity.for_delivery(message_sha256, trace_id, retention);
                crate::retention::apply(job, retention);
                crate::audit::stamp(&mut job.audits, &provenance, job.result.job_id);
            }
            Finished::Refused { result, audits, .. } => {
                let retention = retention_of(result);
                let provenance = identity.for_delivery(message_sha256, trace_id, retention);
                let rejected = result.status == crate::messages::JobStatus::Rejected;
                crate::retention::apply_to_audits(audits, retention, rejected);
                crate::audit::stamp(audits, &provenance, result.job_id);
            }
            _ => {}
        }
        // Serialized here, on any of the runtime's threads, not in the finalizer's one task.
        if outbox.send(finished.seal()).await.is_err() {
            tracing::warn!("Finalizer is gone; the job stays unacked and will be redelivered.");
        }
    }
}

/// The job's work from its delivery to what the finalizer gets, with the SHA-256 of the
/// message body for the job's audit provenance. Like `process`, a function returning the
/// future: the delivery is taken apart before the future is built, so the future holds its
/// body and ids, not the whole delivery twice. Hashing (a body may be megabytes) waits for the
/// job's own task, never the consume loop.
fn handle(
    ctx: Context,
    streams: Publisher,
    delivery: Delivery,
) -> impl Future<Output = (Finished<FinishedJob>, String)> + Send + 'static {
    let received_at = Utc::now();
    let tag = delivery.delivery_tag;
    let message_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str().to_owned());
    let user_id = delivery
        .properties
        .user_id()
        .as_ref()
        .map(|u| u.as_str().to_owned());
    let first_published_by = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| crate::queue::header_text(h, PUBLISHED_BY_HEADER));
    let body = delivery.data;
    async move {
        let message_sha256 = crate::audit::sha256_hex(&body);
        let user_id = published_by(&ctx, user_id, first_published_by);
        let finished =
            handle_job(&ctx, &streams, tag, received_at, body, message_id, user_id).await;
        (finished, message_sha256)
    }
}

/// Where user ids are enforced, a parked job comes back vouched for by the workers' own user
/// (see [`published_by`]): says so when this worker has none, or has a tenant's.
fn warn_about_parks_under_enforcement(ctx: &Context) {
    if !ctx.settings.enforces_any_user_id() {
        return;
    }
    match ctx.broker.user() {
        None => tracing::warn!(
            "User ids are enforced, but this worker logs in without a user name (EXTERNAL or ANONYMOUS): jobs it parks will come back rejected as tenant_not_authorized."
        ),
        Some(user) if ctx.settings.tenants.iter().any(|t| t.name == user) => tracing::warn!(
            user = %user,
            "User ids are enforced, but this worker logs in as a tenant's RabbitMQ user, which could then vouch for parked jobs of any tenant; give the workers a user of their own."
        ),
        Some(_) => {}
    }
}

/// The RabbitMQ user a job was published by. A job the workers parked comes back from its
/// retry queue published by the workers' own user (their publisher is signed where user ids
/// are enforced), with the user that first published it in [`PUBLISHED_BY_HEADER`]. The header
/// is believed only on a message the broker says the workers' user published: anyone else's
/// header proves nothing.
fn published_by(
    ctx: &Context,
    user_id: Option<String>,
    first_published_by: Option<String>,
) -> Option<String> {
    match first_published_by {
        Some(first) if user_id.is_some() && user_id == ctx.broker.user() => Some(first),
        _ => user_id,
    }
}

async fn handle_job(
    ctx: &Context,
    streams: &Publisher,
    tag: u64,
    received_at: chrono::DateTime<Utc>,
    body: Vec<u8>,
    message_id: Option<String>,
    user_id: Option<String>,
) -> Finished<FinishedJob> {
    let job = match ingest(
        &body,
        message_id.as_deref(),
        ctx.settings.worker.max_message_bytes,
    )
    .and_then(|job| authorize(&ctx.settings, job, &body, user_id.as_deref()))
    {
        Ok(job) => job,
        Err(rejection) => {
            tracing::warn!(job_id = %rejection.job_id, code = %rejection.error.code, error.message = %rejection.error.message, "Rejected a job.");
            // A rejection is stored under the message's id. Where another job (another
            // tenant's, or an unreadable message's) holds that id, it is published and
            // dead-lettered but not stored, so it cannot stand in for that job's result. Nor
            // where its tenant is only claimed: with user ids enforced for that tenant, a
            // message its user did not publish (rejected before or by `authorize`) could
            // otherwise replace the tenant's result at a generation of its choosing.
            let vouched = rejection.tenant.as_deref().is_none_or(|tenant| {
                !ctx.settings.enforces_user_id(tenant) || user_id.as_deref() == Some(tenant)
            });
            let taken = match Box::pin(stored_result(ctx, rejection.job_id)).await {
                Ok(stored) => {
                    stored.is_some_and(|stored| stored.tenant != rejection.tenant || !vouched)
                }
                Err(error) => {
                    tracing::error!(job_id = %rejection.job_id, error.cause_chain = ?error, error.message = %error, "Cannot check for a stored result; requeueing the job.");
                    return Finished::Requeue { tag };
                }
            };
            if taken {
                let mut refused = FinishedJob::rejected(tag, *rejection, received_at, Vec::new());
                if !vouched {
                    // The tenant is only claimed: the refusal is not that tenant's to hear
                    // about (its subscribers would see a job of theirs rejected).
                    refused.result.tenant = None;
                }
                return Finished::refused(refused, body);
            }
            return Finished::Job(Box::new(FinishedJob::rejected(
                tag,
                *rejection,
                received_at,
                body,
            )));
        }
    };
    crate::failpoint::on_job(job.metadata.as_ref());
    match Box::pin(stored_result(ctx, job.id)).await {
        // Job ids are global: a result stored for another tenant (or for a message that could
        // not be read, which has none) is not this job's.
        Ok(Some(stored)) if stored.tenant.as_deref() != Some(job.tenant.as_str()) => {
            let error = JobError::new(
                "job_id_taken",
                format!(
                    "job id {} already belongs to another job (another tenant's, or a message that could not be read); publish this job under a new id",
                    job.id
                ),
            );
            tracing::warn!(job_id = %job.id, code = %error.code, error.message = %error.message, "Rejected a job.");
            let refused = FinishedJob::rejected(
                tag,
                Rejection::for_job(&job, &body, error),
                received_at,
                Vec::new(),
            );
            return Finished::refused(refused, body);
        }
        // A replay (a newer generation) is served even though an older result exists.
        Ok(Some(result)) if result.generation >= job.generation => {
            tracing::info!(job_id = %job.id, "Job already has a committed result; republishing it.");
            return Finished::Duplicate {
                tag,
                result: Box::new(result),
            };
        }
        Ok(_) => {}
        Err(error) => {
            tracing::error!(job_id = %job.id, error.cause_chain = ?error, error.message = %error, "Cannot check for a stored result; requeueing the job.");
            return Finished::Requeue { tag };
        }
    }
    let plan = match route(&ctx.router, &job) {
        Ok(plan) => plan,
        Err(RouteError::UnknownRoute(error)) => {
            tracing::warn!(job_id = %job.id, error.message = %error.message, "Rejected a job.");
            let rejection = Rejection::for_job(&job, &body, error);
            return Finished::Job(Box::new(FinishedJob::rejected(
                tag,
                rejection,
                received_at,
                body,
            )));
        }
        Err(RouteError::NoEligibleTarget(error)) => {
            tracing::warn!(job_id = %job.id, error.message = %error.message, "Job failed.");
            let dispatched = Dispatched {
                attempts: Vec::new(),
                skipped: Vec::new(),
                reroutes: Vec::new(),
                park: None,
                outcome: Err(error),
            };
            return Finished::Job(Box::new(FinishedJob::completed(
                tag,
                &job,
                received_at,
                dispatched,
            )));
        }
    };
    let targets = &plan;
    // Each kind of dispatch is boxed: the frame holds only the one that runs, for as long
    // as it runs.
    let dispatched = if job.request.wants_stream() {
        Box::pin(dispatch_streamed(ctx, streams, &job, targets)).await
    } else {
        Box::pin(dispatch(&job, targets, None, ctx.shared())).await
    };
    if let Some(wait) = dispatched.park {
        metrics::counter!("switchyard_jobs_parked_total").increment(1);
        tracing::info!(job_id = %job.id, wait = ?wait, "Every target is rate limited; parking the job.");
        return Finished::Park {
            tag,
            body,
            wait,
            published_by: user_id,
        };
    }
    if let Err(error) = &dispatched.outcome {
        tracing::warn!(job_id = %job.id, code = %error.code, error.message = %error.message, "Job failed.");
    }
    Finished::Job(Box::new(FinishedJob::completed(
        tag,
        &job,
        received_at,
        dispatched,
    )))
}

/// Dispatches a job that asked for a stream, publishing its chunks as they come.
async fn dispatch_streamed(
    ctx: &Context,
    streams: &Publisher,
    job: &Job,
    targets: &crate::routing::Plan,
) -> Dispatched {
    let (sink, items) = StreamSink::new();
    let relay = relay_stream(ctx, streams, job, items);
    let (dispatched, relayed) = tokio::join!(
        async {
            let dispatched = dispatch(job, targets, Some(&sink), ctx.shared()).await;
            drop(sink);
            dispatched
        },
        relay
    );
    if let Err(error) = relayed {
        // Chunks are a convenience; the result (with the whole text) still follows.
        tracing::warn!(job_id = %job.id, error.message = %error, "Could not publish stream chunks.");
    }
    dispatched
}

/// With `enforce_user_id` on for the job's tenant, the job must have been published with
/// RabbitMQ `user_id` equal to its tenant (the broker refuses a `user_id` other than the
/// publishing connection's user, so the property names who really published).
fn authorize(
    settings: &crate::config::Settings,
    job: Job,
    body: &[u8],
    user_id: Option<&str>,
) -> Result<Job, Box<Rejection>> {
    if !settings.enforces_user_id(&job.tenant) || user_id == Some(job.tenant.as_str()) {
        return Ok(job);
    }
    let published_by = user_id.map_or_else(
        || "without a user_id property".to_owned(),
        |u| format!("by RabbitMQ user {u:?}"),
    );
    let error = crate::messages::JobError::new(
        "tenant_not_authorized",
        format!(
            "job for tenant {:?} was published {published_by}; only user {:?} may publish for this tenant",
            job.tenant, job.tenant
        ),
    );
    Err(Box::new(Rejection::for_job(&job, body, error)))
}

/// Publishes a streamed job's deltas and void markers as chunk events, in order, until the
/// dispatch drops its sink; returns once the broker confirmed them all, so every chunk
/// precedes the job's result.
async fn relay_stream(
    ctx: &Context,
    streams: &Publisher,
    job: &Job,
    mut items: mpsc::UnboundedReceiver<StreamItem>,
) -> Result<(), crate::queue::BrokerError> {
    let mut seq = 0u64;
    let mut batch = Vec::with_capacity(64);
    while items.recv_many(&mut batch, 64).await > 0 {
        let messages: Vec<Outgoing> = batch
            .drain(..)
            .map(|item| {
                let (attempt, kind, text) = match item {
                    StreamItem::Delta { attempt, text } => (attempt, ChunkKind::Delta, Some(text)),
                    StreamItem::Void { attempt } => (attempt, ChunkKind::Void, None),
                };
                let chunk = StreamChunk {
                    schema: STREAM_CHUNK_SCHEMA.to_owned(),
                    job_id: job.id,
                    tenant: job.tenant.clone(),
                    attempt,
                    seq,
                    kind,
                    text,
                };
                seq += 1;
                Outgoing {
                    exchange: ctx.names.events_exchange(),
                    routing_key: chunk.routing_key(),
                    body: serde_json::to_vec(&chunk).unwrap_or_default(),
                    message_id: format!("{}.{}", job.id, chunk.seq),
                    kind: STREAM_CHUNK_SCHEMA.to_owned(),
                    headers: None,
                }
            })
            .collect();
        streams.publish_all(&messages).await?;
    }
    Ok(())
}

/// Looks up a committed result (batched with other jobs' lookups, see `stages/lookup.rs`).
/// While Postgres is unreachable this keeps retrying (with backoff, for up to ten minutes),
/// holding the delivery unacked: the worker takes no new job beyond its prefetch, and a
/// redelivery would only burn the message's delivery count.
async fn stored_result(
    ctx: &Context,
    job_id: uuid::Uuid,
) -> Result<Option<JobResult>, crate::stages::lookup::LookupError> {
    let lookup = || ctx.lookups.find(job_id);
    lookup
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(50))
                .with_max_delay(Duration::from_secs(2))
                .without_max_times()
                .with_total_delay(Some(Duration::from_secs(600)))
                .with_jitter(),
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::lane_prefetches;

    #[test]
    fn lanes_split_the_concurrency_exactly_and_never_exceed_it() {
        assert_eq!(lane_prefetches(64, 4), vec![16, 16, 16, 16]);
        assert_eq!(lane_prefetches(10, 4), vec![3, 3, 2, 2]);
        assert_eq!(lane_prefetches(2, 4), vec![1, 1]);
        assert_eq!(lane_prefetches(1, 4), vec![1]);
        assert_eq!(lane_prefetches(7, 1), vec![7]);
        for concurrency in 1..=100u16 {
            for lanes in 1..=8u16 {
                let split = lane_prefetches(concurrency, lanes);
                assert_eq!(split.iter().sum::<u16>(), concurrency);
                assert!(split.iter().all(|&p| p >= 1));
            }
        }
    }
}
