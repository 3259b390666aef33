//! Calls the route's targets in order until one succeeds. Within a target: rotate across its
//! healthy keys (an `auth` or `quota_exhausted` key is taken out, a `rate_limited` key rests
//! for its retry delay and another key is tried), and retry retryable failures with `backon`
//! backoff, honouring the server's delay. A retryable failure that outlasts the retries moves
//! on to the next target; a permanent one stops the job with the provider's reason.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::budget::{Budgets, Held, Reserved, exceeded};
use crate::config::Prices;
use crate::messages::events::COST_EVENT_SCHEMA;
use crate::messages::{ChatRequest, JobError, Usage};
use crate::messages::{CostEvent, Job};
use crate::providers::{ApiKey, Call, ErrorClass, KeyChoice, KeyStatus, ProviderError};
use crate::routing::health::{Admission, Transition};
use crate::routing::limits::{Acquired, Lease, Limiter};
use crate::routing::{Plan, Target};

/// Longest server-requested delay honoured by an in-place retry; a longer one moves on.
const MAX_HONOURED_DELAY: Duration = Duration::from_secs(10);
/// Longest wait for a resting key of a target before moving on to the next target.
const MAX_KEY_WAIT: Duration = Duration::from_secs(10);
/// Rest given to a rate-limited key whose response named no delay.
const DEFAULT_KEY_REST: Duration = Duration::from_secs(1);

/// How long a rate-limited key rests, here and (through the limiter) on every worker: the
/// provider's retry-after, at most [`crate::providers::MAX_RETRY_AFTER`].
fn key_rest(error: &ProviderError) -> Duration {
    error
        .retry_after
        .unwrap_or(DEFAULT_KEY_REST)
        .min(crate::providers::MAX_RETRY_AFTER)
}

/// A change of a key's health, audited with the key's id (never the key).
#[derive(Debug, Clone)]
pub struct KeyEvent {
    /// `key_disabled`, `key_exhausted` or `key_rate_limited`.
    pub kind: &'static str,
    pub key_id: String,
    pub rest_ms: Option<u64>,
}

/// One provider call and how it ended.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub id: Uuid,
    pub n: u32,
    pub provider: String,
    pub model: String,
    pub key_id: Option<String>,
    pub prices: Prices,
    /// The price version `prices` come from (`base` or its effective date).
    pub price_version: String,
    /// The model's price table, for volume tiers chosen when the call is recorded.
    pub price_table: std::sync::Arc<crate::budget::pricing::PriceTable>,
    pub started_at: DateTime<Utc>,
    pub ended_at: DateTime<Utc>,
    pub latency_ms: u64,
    pub outcome: Result<Usage, ProviderError>,
    pub key_event: Option<KeyEvent>,
    /// A circuit-breaker transition this attempt caused.
    pub circuit: Option<Transition>,
    /// Budget reservations held for this call, settled to its actual cost.
    pub holds: Vec<Held>,
    /// The ledger entry of a billed call.
    pub cost: Option<CostEvent>,
    /// Whether the ledger entry (and the settlement of `holds`) was already committed right
    /// after the call; otherwise finalize commits it with the job.
    pub recorded: bool,
}

impl Attempt {
    /// Usage to bill: always for a success, and for a failure the provider reported usage for.
    pub fn billed_usage(&self) -> Option<Usage> {
        match &self.outcome {
            Ok(usage) => Some(*usage),
            Err(error) => error.usage,
        }
    }
}

/// Every attempt of a job, and either the response or why there is none.
#[derive(Debug, Clone)]
pub struct Dispatched {
    pub attempts: Vec<Attempt>,
    /// Targets passed over because their circuit was open (`provider/model`).
    pub skipped: Vec<String>,
    /// Every target was rate limited for at least this long and nothing was called: the job
    /// should be retried later rather than failed.
    pub park: Option<Duration>,
    /// Targets passed over because their provider or key budget could not cover the call.
    pub reroutes: Vec<(String, JobError)>,
    pub outcome: Result<Value, JobError>,
}

impl Dispatched {
    /// The attempt that produced the response.
    pub fn winner(&self) -> Option<&Attempt> {
        self.attempts.last().filter(|a| a.outcome.is_ok())
    }
}

/// Cross-worker state a dispatch consults; each part is `None` when not configured.
#[derive(Debug, Clone, Copy, Default)]
pub struct Shared<'a> {
    pub limiter: Option<&'a Limiter>,
    pub budgets: Option<&'a Budgets>,
    /// Where a billed call is recorded as soon as it returns.
    pub pool: Option<&'a sqlx::PgPool>,
    /// Commits billed calls in groups (through `pool`); without it each call commits alone.
    pub recorder: Option<&'a super::recorder::Recorder>,
}

/// The ledger entry of an attempt the provider billed.
pub fn cost_event(job: &Job, attempt: &Attempt) -> Option<CostEvent> {
    let usage = attempt.billed_usage()?;
    Some(CostEvent {
        schema: COST_EVENT_SCHEMA.to_owned(),
        event_id: Uuid::now_v7(),
        job_id: job.id,
        tenant: job.tenant.clone(),
        batch: job.batch.clone(),
        route: job.route.clone(),
        provider: attempt.provider.clone(),
        model: attempt.model.clone(),
        key_id: attempt.key_id.clone(),
        usage,
        prices: attempt.prices.clone(),
        price_version: attempt.price_version.clone(),
        price_tier_above: None,
        amount_usd: crate::budget::pricing::cost(&usage, &attempt.prices),
        at: attempt.ended_at,
    })
}

/// Commits a billed call's ledger entry and budget settlement right away, so a call is paid
/// for in the books even if this worker dies before the job is finalized (the re-run is then
/// billed too, as the provider bills it). On failure finalize records it with the job instead.
async fn record(shared: Shared<'_>, attempt: &mut Attempt) {
    let Some(pool) = shared.pool else { return };
    if attempt.cost.is_none() && attempt.holds.is_empty() {
        return;
    }
    let mut settlements = shared
        .budgets
        .map(|b| b.settlements(&attempt.holds, attempt.cost.as_ref()))
        .unwrap_or_default();
    let table = attempt.price_table.clone();
    // A tiered price is chosen under the model's volume row lock, so those calls commit alone.
    // The two direct writes are boxed: their query futures are ~14 KB, and a job waiting on
    // the recorder (the usual path) would otherwise hold that much while it waits.
    let tiered = attempt.cost.is_some() && table.has_tiers();
    let recorder = shared.recorder.filter(|_| !tiered);
    let recorded = match attempt.cost.as_mut() {
        Some(cost) if table.has_tiers() => Box::pin(crate::store::cost_ledger::record_tiered(
            pool,
            attempt.id,
            cost,
            &table,
            &mut settlements,
        ))
        .await
        .map_err(|e| e.to_string()),
        cost => match recorder {
            Some(recorder) => recorder
                .record(attempt.id, cost.as_deref(), settlements)
                .await
                .map_err(|e| e.to_string()),
            None => Box::pin(crate::store::cost_ledger::record(
                pool,
                attempt.id,
                cost.as_deref(),
                &settlements,
            ))
            .await
            .map_err(|e| e.to_string()),
        },
    };
    // A commit whose answer was lost (the connection failed after COMMIT) may have landed.
    // The ledger row and the settlements are one transaction, so the row tells; recording it
    // again with the job would collide with it and fail the job's whole finalize group. The
    // recorder asks once for its whole group; a call written alone asks here.
    let recorded = match (recorded, &attempt.cost) {
        (Err(error), Some(cost))
            if recorder.is_none()
                && Box::pin(crate::store::cost_ledger::is_recorded(pool, cost.event_id)).await =>
        {
            tracing::info!(error.message = %error, "Recording a billed call reported an error, but its ledger row is committed; it counts as recorded.");
            Ok(())
        }
        (recorded, _) => recorded,
    };
    match recorded {
        Ok(()) => attempt.recorded = true,
        Err(error) => {
            tracing::warn!(error.message = %error, "Could not record a billed call now; finalize will record it with the job.");
        }
    }
}

/// Returns an unused half-open probe when dropped (see [`TargetHealth::abandon_probe`]).
struct ProbeGuard<'a> {
    health: Option<&'a crate::routing::health::TargetHealth>,
}

impl ProbeGuard<'_> {
    /// The probe was used: its outcome was recorded.
    fn disarm(mut self) {
        self.health = None;
    }
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if let Some(health) = self.health {
            health.abandon_probe();
        }
    }
}

/// Gives back a limiter lease that was not used for a call (uncounted).
async fn release(limiter: Option<&Limiter>, lease: Option<Lease>) {
    if let (Some(limiter), Some(lease)) = (limiter, lease) {
        Box::pin(limiter.cancel(lease)).await;
    }
}

/// What a streamed job's subscribers are told, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamItem {
    /// Text from attempt `attempt`.
    Delta { attempt: u32, text: String },
    /// Every earlier delta of attempt `attempt` is void: that attempt failed.
    Void { attempt: u32 },
}

/// Where a streamed job's deltas go (the worker publishes them as chunk events).
#[derive(Debug, Clone)]
pub struct StreamSink {
    tx: mpsc::UnboundedSender<StreamItem>,
}

impl StreamSink {
    pub fn new() -> (Self, mpsc::UnboundedReceiver<StreamItem>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx }, rx)
    }

    fn send(&self, item: StreamItem) {
        // The receiver lives as long as the job; a closed one only means nobody listens.
        let _ = self.tx.send(item);
    }
}

/// Runs `request` against the plan's targets in order. Moving on to the next target is
/// immediate; retries with backoff happen only on the last target, where there is nowhere
/// else to go.
///
/// Every awaited step (limiter, budget, call, ledger) is boxed: this future lives as long as
/// the job, so it holds only its own state and the one step running, never the largest of
/// them all (a worker keeps thousands of these in flight).
pub async fn dispatch(
    job: &Job,
    plan: &Plan,
    stream: Option<&StreamSink>,
    shared: Shared<'_>,
) -> Dispatched {
    // With budgets, or a job's own `max_cost_usd`, the output cap that was reserved (or
    // counted against the job's cap) is also the cap the provider is given, so a call can never
    // cost more output than was allowed for.
    let default_output = match shared.budgets {
        Some(budgets) => Some(budgets.default_output()),
        None => job
            .max_cost_usd
            .map(|_| crate::budget::DEFAULT_OUTPUT_RESERVATION),
    };
    let capped;
    let request = match default_output {
        Some(cap) if job.request.output_cap().is_none() => {
            capped = ChatRequest {
                max_tokens: Some(cap),
                ..job.request.clone()
            };
            &capped
        }
        _ => &job.request,
    };
    let hold_for = |target: &Target| held_for(target, stream.is_some());
    let limiter = shared.limiter;
    let mut attempts: Vec<Attempt> = Vec::with_capacity(1);
    // Targets passed over because a provider or key budget could not cover the call.
    let mut reroutes: Vec<(String, JobError)> = Vec::new();
    // Set when a tenant, route, batch or job budget refuses the call: the job stops.
    let mut refused: Option<JobError> = None;
    let mut skipped = plan.skipped.clone();
    // The longest wait of a target passed over because it was rate limited.
    let mut limited: Option<Duration> = None;
    let estimate = std::sync::OnceLock::new();
    let units = || {
        *estimate.get_or_init(|| {
            crate::tokens::count_prompt(request) as u64
                + u64::from(request.output_cap().unwrap_or(0))
        })
    };
    let last = plan.targets.len().saturating_sub(1);
    'targets: for (index, target) in plan.targets.iter().enumerate() {
        let entry = &target.provider;
        let is_last = index == last;
        let mut tried_keys: Vec<String> = Vec::new();
        let mut retries_left = if is_last { entry.max_retries } else { 0 };
        // A conflict (409) is tried again once, as the providers' own SDKs do.
        let mut conflict_retried = false;
        // Bounds key rotation and retries together, whatever the keys' health does meanwhile.
        let mut calls_left = entry.keys.len() + entry.max_retries as usize + 1;
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .without_max_times()
            .build();
        loop {
            let key = if entry.needs_key() {
                match entry.keys.pick(&tried_keys) {
                    KeyChoice::Key(key) => Some(key),
                    KeyChoice::AllResting(wait) if wait <= MAX_KEY_WAIT => {
                        tokio::time::sleep(wait).await;
                        tried_keys.clear();
                        continue;
                    }
                    KeyChoice::AllResting(wait) if tried_keys.is_empty() => {
                        limited = limited.max(Some(wait));
                        continue 'targets;
                    }
                    choice => {
                        let reason = match choice {
                            KeyChoice::AllResting(wait) => {
                                format!("every key is rate limited for {wait:?}")
                            }
                            _ if tried_keys.is_empty() => {
                                "no usable API key (none set, or all disabled or exhausted)"
                                    .to_owned()
                            }
                            _ => "no other usable API key".to_owned(),
                        };
                        if tried_keys.is_empty() {
                            attempts.push(no_key_attempt(target, attempts.len(), reason));
                        }
                        continue 'targets;
                    }
                }
            } else {
                None
            };
            if calls_left == 0 {
                continue 'targets;
            }
            let probe = match target.health.admit() {
                Admission::Go => false,
                Admission::Probe => true,
                // The circuit opened (here or on another worker) since the plan was made.
                Admission::Skip => {
                    skipped.push(target.label().to_owned());
                    continue 'targets;
                }
            };
            // A probe not used for a call (limits, budgets) goes back, so the target is
            // probed again rather than stuck half-open.
            let probe_guard = ProbeGuard {
                health: probe.then_some(&*target.health),
            };
            let scopes = entry.scopes.for_call(key.as_ref().map(|k| k.id.as_str()));
            let lease = match limiter.filter(|_| !scopes.is_empty()) {
                None => None,
                Some(limiter) => {
                    let units = if scopes.iter().any(|s| s.counts_tokens()) {
                        units()
                    } else {
                        0
                    };
                    match Box::pin(limiter.acquire(
                        &scopes,
                        units,
                        limiter.max_wait(),
                        hold_for(target),
                    ))
                    .await
                    {
                        Ok(Acquired::Granted(lease)) => Some(lease),
                        Ok(Acquired::TooLong(wait)) => {
                            limited = limited.max(Some(wait));
                            continue 'targets;
                        }
                        Err(error) => {
                            tracing::warn!(target = %target.label(), error.message = %error, "Cannot reach the shared limiter; treating the target as limited.");
                            limited = limited.max(Some(Duration::from_secs(1)));
                            continue 'targets;
                        }
                    }
                }
            };
            let mut holds = Vec::new();
            if shared.budgets.is_some() || job.max_cost_usd.is_some() {
                // The output cap the provider is given when the job sets none.
                let needed = crate::budget::max_cost(
                    job,
                    &target.prices().prices,
                    default_output.unwrap_or(crate::budget::DEFAULT_OUTPUT_RESERVATION),
                );
                if let Some(cap) = job.max_cost_usd {
                    let so_far: rust_decimal::Decimal = attempts
                        .iter()
                        .filter_map(|a| {
                            a.billed_usage()
                                .map(|u| crate::budget::pricing::cost(&u, &a.prices))
                        })
                        .sum();
                    if so_far + needed > cap {
                        release(limiter, lease).await;
                        refused = Some(JobError::new(
                            "budget_exceeded",
                            format!(
                                "the job's own cap ${cap} cannot cover ${needed} more (spent ${so_far} on earlier attempts)"
                            ),
                        ));
                        break 'targets;
                    }
                }
                if let Some(budgets) = shared.budgets {
                    let key_id = key.as_ref().map(|k| k.id.as_str());
                    let deadline = tokio::time::Instant::now() + budgets.max_wait();
                    let reserve = || {
                        Box::pin(budgets.reserve(
                            job,
                            &entry.name,
                            key_id,
                            needed,
                            hold_for(target),
                        ))
                    };
                    let mut reserved = reserve().await;
                    // Room held by calls in flight frees up when they settle: wait, don't fail.
                    while matches!(reserved, Ok(Reserved::Busy(_)))
                        && tokio::time::Instant::now() < deadline
                    {
                        tokio::time::sleep(Duration::from_millis(20 + fastrand::u64(0..30))).await;
                        reserved = reserve().await;
                    }
                    match reserved {
                        Ok(Reserved::Held(held)) => holds = held,
                        Ok(Reserved::Busy(_)) => {
                            release(limiter, lease).await;
                            limited = limited.max(Some(budgets.max_wait()));
                            continue 'targets;
                        }
                        Ok(Reserved::Reroute(refusal)) => {
                            release(limiter, lease).await;
                            reroutes.push((target.label().to_owned(), exceeded(&refusal, needed)));
                            continue 'targets;
                        }
                        Ok(Reserved::Refused(refusal)) => {
                            release(limiter, lease).await;
                            refused = Some(exceeded(&refusal, needed));
                            break 'targets;
                        }
                        Err(error) => {
                            // Without a reservation the cap cannot be guaranteed: do not call.
                            release(limiter, lease).await;
                            tracing::warn!(error.message = %error, "Cannot reserve budget; treating the target as limited.");
                            limited = limited.max(Some(Duration::from_secs(1)));
                            continue 'targets;
                        }
                    }
                }
            }
            calls_left -= 1;
            let n = u32::try_from(attempts.len() + 1).unwrap_or(u32::MAX);
            // The outcome is boxed too (880 bytes): held across the ledger and limiter awaits
            // below, it would otherwise widen every job's dispatch frame by that much.
            let mut attempt = Box::new(
                Box::pin(call_once(request, target, key.as_ref(), n, stream, probe)).await,
            );
            probe_guard.disarm();
            attempt.attempt.holds = holds;
            attempt.attempt.cost = cost_event(job, &attempt.attempt);
            Box::pin(record(shared, &mut attempt.attempt)).await;
            if !attempt.sent {
                // Nothing reached the provider: its rate windows give the call back.
                release(limiter, lease).await;
            } else if let (Some(limiter), Some(lease)) = (limiter, lease) {
                let actual = attempt
                    .billed_usage()
                    .map(|u| u.input_tokens + u.output_tokens);
                Box::pin(limiter.release(lease, actual)).await;
                if let (Err(error), Some(key)) = (&attempt.outcome, &key)
                    && error.class == ErrorClass::RateLimited
                    && let Some(scope) = entry.scopes.keys.get(&key.id)
                {
                    Box::pin(limiter.pause(scope, key_rest(error))).await;
                }
            }
            let error = match &attempt.outcome {
                Ok(_) => {
                    let response = attempt
                        .response
                        .take()
                        .map_or(Value::Null, |text| parse_response(&text));
                    attempts.push(attempt.with_response_dropped());
                    return Dispatched {
                        attempts,
                        skipped,
                        reroutes,
                        park: None,
                        outcome: Ok(response),
                    };
                }
                Err(error) => error.clone(),
            };
            attempts.push(attempt.with_response_dropped());
            if let Some(key) = &key
                && matches!(
                    error.class,
                    ErrorClass::Auth | ErrorClass::QuotaExhausted | ErrorClass::RateLimited
                )
            {
                tried_keys.push(key.id.clone());
                // Another key of the same provider is tried before the job moves on.
                if !matches!(entry.keys.pick(&tried_keys), KeyChoice::NoneUsable) {
                    continue;
                }
                if error.class != ErrorClass::RateLimited {
                    continue 'targets;
                }
            }
            let tried_enough =
                retries_left == 0 || (error.class == ErrorClass::Conflict && conflict_retried);
            if !error.is_retryable() || tried_enough {
                // No more tries here. The next target follows the error's class, whatever the
                // provider said of retrying (`x-should-retry`), or the route's `failover_on`.
                if error.class.is_retryable() || plan.failover_on.contains(&error.class) {
                    continue 'targets;
                }
                break 'targets;
            }
            conflict_retried |= error.class == ErrorClass::Conflict;
            let delay = match error.retry_after {
                Some(delay) if delay > MAX_HONOURED_DELAY => continue 'targets,
                Some(delay) => delay,
                None => backoff.next().unwrap_or(Duration::from_secs(1)),
            };
            retries_left -= 1;
            tried_keys.clear();
            tokio::time::sleep(delay).await;
        }
    }
    // Nothing was tried because every target was limited for long: park the job rather than
    // fail it or hold a worker slot.
    let park = limited.filter(|_| attempts.is_empty() && refused.is_none());
    let error = match refused {
        Some(error) => error,
        None if attempts.is_empty() && !reroutes.is_empty() => JobError::new(
            "budget_exceeded",
            format!(
                "no target's budget can cover the job: {}",
                reroutes
                    .iter()
                    .map(|(t, e)| format!("{t}: {}", e.message))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        ),
        None => job_error(&attempts, &skipped),
    };
    Dispatched {
        attempts,
        skipped,
        reroutes,
        park,
        outcome: Err(error),
    }
}

/// How long a call may run, and so how long its leases and reservations are held: its
/// timeout, or for a stream, which may run long past its first byte, `stream_max_secs`
/// (`call_once` ends a stream then).
fn held_for(target: &Target, streamed: bool) -> Duration {
    if streamed {
        target.timeout.max(target.provider.stream_max)
    } else {
        target.timeout
    }
}

/// One call of one target with one key, its key bookkeeping, and its stream handling.
async fn call_once(
    request: &ChatRequest,
    target: &Target,
    key: Option<&ApiKey>,
    n: u32,
    stream: Option<&StreamSink>,
    probe: bool,
) -> AttemptWithResponse {
    let entry = &target.provider;
    let applied = target.prices();
    let streamed_any = AtomicBool::new(false);
    let on_delta = |text: &str| {
        streamed_any.store(true, Ordering::Relaxed);
        if let Some(sink) = stream {
            sink.send(StreamItem::Delta {
                attempt: n,
                text: text.to_owned(),
            });
        }
    };
    let in_flight = target.health.start_call();
    // Over HTTP/1.1 a call first waits for one of the provider's connections, within its
    // timeout: the call itself gets what is left, so it still ends within its reservation.
    let waiting = Instant::now();
    let (connection, mut no_connection) = match &entry.connections {
        None => (None, None),
        Some(cap) => match cap.wait(target.timeout).await {
            Ok(permit) => (Some(permit), None),
            Err(message) => (None, Some(message)),
        },
    };
    let waited = waiting.elapsed();
    // A connection that came free only as the timeout ran out leaves the call no time.
    if let Some(cap) = &entry.connections
        && no_connection.is_none()
        && target.timeout <= waited
    {
        no_connection = Some(cap.none_in(target.timeout));
    }
    let call = Call {
        key,
        timeout: target.timeout.saturating_sub(waited),
        idle_timeout: entry.idle_timeout,
        on_delta: stream.map(|_| &on_delta as &(dyn Fn(&str) + Send + Sync)),
    };
    let started_at = Utc::now();
    let clock = Instant::now();
    let sent = no_connection.is_none();
    let queued = connection.as_ref().is_some_and(|c| c.queued);
    let result = if let Some(message) = no_connection {
        Err(ProviderError::new(
            entry.client.provider_type(),
            ErrorClass::Timeout,
            message,
        ))
    } else {
        let completion = entry.client.complete(request, &target.model, &call);
        if stream.is_some() {
            // However often the provider sends (a keep-alive comment resets the idle timer), a
            // stream does not outlive its leases and reservations. Boxed with its timer, so a
            // call that is not streamed does not reserve room for them.
            let limit = held_for(target, true).saturating_sub(waited);
            Box::pin(tokio::time::timeout(limit, completion))
                .await
                .unwrap_or_else(|_| {
                    Err(ProviderError::new(
                        entry.client.provider_type(),
                        ErrorClass::Timeout,
                        format!(
                            "the stream was still running after {limit:?} (stream_max_secs), \
                             as long as its reservations are held"
                        ),
                    ))
                })
        } else {
            completion.await
        }
    };
    drop((connection, in_flight));
    let elapsed = clock.elapsed();
    let latency_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
    // Only failures that say something about the target's health count against it.
    let unhealthy = result
        .as_ref()
        .err()
        .is_some_and(|e| e.class.is_retryable() && e.class != ErrorClass::RateLimited);
    // A call that found no connection was never sent, and one that timed out after waiting
    // here for a connection did not have its whole time: neither says anything about the
    // target, and a probe goes back unused.
    let telling = sent
        && !(queued
            && result
                .as_ref()
                .is_err_and(|e| e.class == ErrorClass::Timeout));
    if probe && !telling {
        target.health.abandon_probe();
    }
    // Only failures that say something about the target's health count against it; a probe's
    // answer always decides (a 400 or a 429 still shows the target is up).
    let counts = telling && (result.is_ok() || unhealthy || probe);
    let circuit = if counts {
        target.health.record(elapsed, unhealthy, probe)
    } else {
        None
    };
    metrics::counter!(
        "switchyard_provider_calls_total",
        "provider" => entry.name.clone(),
        "outcome" => result.as_ref().err().map_or("succeeded", |e| e.class.as_str()),
    )
    .increment(1);
    if let Some(transition) = circuit {
        metrics::counter!(
            "switchyard_circuit_transitions_total",
            "target" => target.label().to_owned(),
            "to" => transition.kind(),
        )
        .increment(1);
        tracing::warn!(target = %target.label(), transition = transition.kind(), "Circuit breaker changed state.");
    }
    let (outcome, response) = match result {
        // A `Value` always serializes (its keys are strings).
        Ok(completion) => (
            Ok(completion.usage),
            serde_json::value::to_raw_value(&completion.response).ok(),
        ),
        Err(error) => {
            if let Some(sink) = stream
                && streamed_any.load(Ordering::Relaxed)
            {
                sink.send(StreamItem::Void { attempt: n });
            }
            (Err(error), None)
        }
    };
    let key_event = match (&outcome, key) {
        (Err(error), Some(key)) => key_health(entry, key, error),
        _ => None,
    };
    AttemptWithResponse {
        attempt: Attempt {
            id: Uuid::now_v7(),
            n,
            provider: entry.name.clone(),
            model: target.model.clone(),
            key_id: key.map(|k| k.id.clone()),
            prices: applied.prices,
            price_version: applied.version,
            price_table: target.price_table.clone(),
            started_at,
            ended_at: Utc::now(),
            latency_ms,
            outcome,
            key_event,
            circuit,
            holds: Vec::new(),
            cost: None,
            recorded: false,
        },
        response,
        sent,
    }
}

/// A response kept as text (`AttemptWithResponse::response`) as a `Value` again. The text came
/// from a `Value`, so it parses; the depth limit is lifted because the normalised
/// `chat.completion` wraps a provider's content (parsed within serde_json's 128 levels) a few
/// levels deeper, so the depth stays bounded by that parse.
fn parse_response(text: &RawValue) -> Value {
    let mut parser = serde_json::Deserializer::from_str(text.get());
    parser.disable_recursion_limit();
    Value::deserialize(&mut parser).unwrap_or_else(|error| {
        tracing::error!(%error, "A provider response could not be read back; the result carries no response.");
        Value::Null
    })
}

/// Updates the key's health after a failure and says what changed.
fn key_health(
    entry: &crate::providers::ProviderEntry,
    key: &ApiKey,
    error: &ProviderError,
) -> Option<KeyEvent> {
    let (kind, status, rest) = match error.class {
        ErrorClass::Auth => ("key_disabled", KeyStatus::Disabled, None),
        ErrorClass::QuotaExhausted => ("key_exhausted", KeyStatus::Exhausted, None),
        ErrorClass::RateLimited => {
            let rest = key_rest(error);
            (
                "key_rate_limited",
                KeyStatus::Resting(Instant::now() + rest),
                Some(rest),
            )
        }
        _ => return None,
    };
    entry.keys.set(&key.id, status);
    metrics::counter!("switchyard_key_events_total", "provider" => entry.name.clone(), "event" => kind).increment(1);
    if let Some(rest) = rest {
        entry.keys.announce_rest(&entry.name, &key.id, rest);
    }
    tracing::warn!(provider = %entry.name, key_id = %key.id, event = kind, rest = ?rest, "API key health changed.");
    Some(KeyEvent {
        kind,
        key_id: key.id.clone(),
        rest_ms: rest.map(|r| u64::try_from(r.as_millis()).unwrap_or(u64::MAX)),
    })
}

/// An attempt that never reached the provider because no key was usable.
fn no_key_attempt(target: &Target, previous: usize, reason: String) -> Attempt {
    let now = Utc::now();
    Attempt {
        id: Uuid::now_v7(),
        n: u32::try_from(previous + 1).unwrap_or(u32::MAX),
        provider: target.provider.name.clone(),
        model: target.model.clone(),
        key_id: None,
        prices: target.prices().prices,
        price_version: target.prices().version,
        price_table: target.price_table.clone(),
        started_at: now,
        ended_at: now,
        latency_ms: 0,
        outcome: Err(ProviderError::new(
            target.provider.client.provider_type(),
            ErrorClass::Auth,
            reason,
        )),
        key_event: None,
        circuit: None,
        holds: Vec::new(),
        cost: None,
        recorded: false,
    }
}

/// An attempt with the response body of a success, which only the winner carries onwards.
struct AttemptWithResponse {
    attempt: Attempt,
    /// The response as JSON text while the call's ledger row is recorded: when thousands of
    /// calls return at once they queue for the recorder, and a `chat.completion` `Value` (a map
    /// node per object, some 3 KB) is several times its text. Parsed back once recorded.
    response: Option<Box<RawValue>>,
    /// Whether the call was sent: one that found no free connection was not.
    sent: bool,
}

impl std::ops::Deref for AttemptWithResponse {
    type Target = Attempt;
    fn deref(&self) -> &Attempt {
        &self.attempt
    }
}

impl AttemptWithResponse {
    fn with_response_dropped(self) -> Attempt {
        self.attempt
    }
}

/// The job's error: the last failure's class as the code, and every attempt in the message.
fn job_error(attempts: &[Attempt], skipped: &[String]) -> JobError {
    let failures: Vec<&ProviderError> = attempts
        .iter()
        .filter_map(|a| a.outcome.as_ref().err())
        .collect();
    let Some(last) = failures.last() else {
        return JobError::new(
            "no_eligible_target",
            format!(
                "every target's circuit opened before it could be called: {}",
                skipped.join(", ")
            ),
        );
    };
    let code = if last.class.is_retryable() {
        "all_attempts_failed"
    } else {
        last.class.as_str()
    };
    let listing = attempts
        .iter()
        .filter_map(|a| {
            let e = a.outcome.as_ref().err()?;
            Some(format!(
                "#{} {}/{}: {} ({})",
                a.n,
                a.provider,
                a.model,
                e.class.as_str(),
                e.message
            ))
        })
        .collect::<Vec<_>>()
        .join("; ");
    JobError::new(
        code,
        format!("{} attempt(s) failed: {listing}", failures.len()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use crate::messages::ChatMessage;
    use crate::providers::Registry;
    use crate::routing::{RouteError, Router};
    use serde_json::json;
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, ResponseTemplate};

    const OK: &str = r#"{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"big answer"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#;
    const TOO_LONG: &str = r#"{"error":{"message":"maximum context length is 8192 tokens","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#;

    /// The text a response waits as reads back as the same `Value`: floats to the last bit,
    /// NUL characters (finalize strips them later), and deeper than serde_json's 128 levels
    /// (a provider's content parsed at the limit, wrapped by the normaliser).
    #[test]
    fn a_response_kept_as_text_reads_back_unchanged() {
        let mut deep = json!("leaf");
        for _ in 0..140 {
            deep = json!({ "nested": deep });
        }
        let response = json!({
            "choices": [{ "message": { "content": "a\u{0}b", "tool": deep } }],
            "float": 0.1 + 0.2, "tiny": 5e-324, "big": u64::MAX, "negative": i64::MIN,
        });
        let text = serde_json::value::to_raw_value(&response).unwrap();
        assert_eq!(parse_response(&text), response);
    }

    async fn server(status: u16, body: &str) -> MockServer {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(status).set_body_string(body))
            .mount(&server)
            .await;
        server
    }

    fn plan(small: &MockServer, large: &MockServer, failover_on: &str) -> Plan {
        let text = format!(
            r#"
[[providers]]
name = "small"
kind = "openai"
base_url = "{}/v1"
keys = [{{ id = "k", env = "PATH" }}]
models = [{{ name = "s" }}]

[[providers]]
name = "large"
kind = "openai"
base_url = "{}/v1"
keys = [{{ id = "k", env = "PATH" }}]
models = [{{ name = "l" }}]

[[routes]]
alias = "r"
failover_on = [{failover_on}]
targets = [{{ provider = "small", model = "s" }}, {{ provider = "large", model = "l" }}]
"#,
            small.uri(),
            large.uri()
        );
        plan_of(&text, &request())
    }

    /// The plan of `job` under the config `text`.
    fn plan_of(text: &str, job: &Job) -> Plan {
        let settings = Settings::from_toml(text).unwrap();
        let router = Router::from_settings(
            &settings,
            &Registry::from_settings(&settings, &reqwest::Client::new()),
        );
        match router.plan(job, &|_| None) {
            Ok(plan) => plan,
            Err(RouteError::UnknownRoute(e) | RouteError::NoEligibleTarget(e)) => panic!("{e:?}"),
        }
    }

    fn request() -> Job {
        Job::new(
            "t",
            None,
            "r",
            ChatRequest {
                messages: vec![ChatMessage::text_message("user", "long document")],
                ..ChatRequest::default()
            },
        )
    }

    #[tokio::test]
    async fn a_context_length_error_stops_the_job_unless_the_route_opts_in_to_fail_over() {
        let small = server(400, TOO_LONG).await;
        let large = server(200, OK).await;

        let stopped = dispatch(
            &request(),
            &plan(&small, &large, ""),
            None,
            Shared::default(),
        )
        .await;
        assert_eq!(stopped.attempts.len(), 1, "no failover by default");
        let error = stopped.outcome.unwrap_err();
        assert_eq!(error.code, "context_length");
        assert!(
            error.message.contains("maximum context length"),
            "{}",
            error.message
        );

        let rescued = dispatch(
            &request(),
            &plan(&small, &large, "\"context_length\""),
            None,
            Shared::default(),
        )
        .await;
        assert_eq!(rescued.attempts.len(), 2);
        assert_eq!(rescued.winner().map(|a| a.provider.as_str()), Some("large"));
        assert_eq!(
            rescued.outcome.unwrap()["choices"][0]["message"]["content"],
            "big answer"
        );
    }

    #[tokio::test]
    async fn a_retryable_failure_moves_on_at_once_without_retrying_a_target_that_has_a_successor() {
        let broken = server(503, "").await;
        let healthy = server(200, OK).await;
        let dispatched = dispatch(
            &request(),
            &plan(&broken, &healthy, ""),
            None,
            Shared::default(),
        )
        .await;
        assert_eq!(
            dispatched.attempts.len(),
            2,
            "one call to the primary, then the fallback"
        );
        assert_eq!(broken.received_requests().await.unwrap().len(), 1);
        assert_eq!(
            dispatched.attempts[0].outcome.as_ref().unwrap_err().class,
            ErrorClass::Overloaded
        );
        assert!(dispatched.outcome.is_ok());
    }

    /// The last target is tried again up to `max_retries` on a retryable failure, except where
    /// the provider says otherwise (`x-should-retry`, either way) and a conflict (409), which
    /// is tried again once.
    #[tokio::test]
    async fn x_should_retry_overrides_the_class_and_a_conflict_is_tried_again_once() {
        async fn calls(status: u16, should_retry: Option<&str>) -> usize {
            let server = MockServer::start().await;
            let mut response = ResponseTemplate::new(status)
                .set_body_string(r#"{"error":{"message":"no","type":"server_error","code":null}}"#);
            if let Some(value) = should_retry {
                response = response.insert_header("x-should-retry", value);
            }
            Mock::given(method("POST"))
                .respond_with(response)
                .mount(&server)
                .await;
            let text = format!(
                r#"
[[providers]]
name = "solo"
kind = "openai"
base_url = "{}/v1"
keys = [{{ id = "k", env = "PATH" }}]
models = [{{ name = "m" }}]
max_retries = 3

[[routes]]
alias = "r"
targets = [{{ provider = "solo", model = "m" }}]
"#,
                server.uri()
            );
            let dispatched = dispatch(
                &request(),
                &plan_of(&text, &request()),
                None,
                Shared::default(),
            )
            .await;
            assert!(dispatched.outcome.is_err());
            server.received_requests().await.unwrap().len()
        }
        assert_eq!(calls(500, None).await, 4, "retried max_retries times");
        assert_eq!(calls(500, Some("false")).await, 1, "the provider said no");
        assert_eq!(calls(400, Some("true")).await, 4, "the provider said yes");
        assert_eq!(calls(409, None).await, 2, "a conflict is tried again once");

        // Before the last target there are no retries: a permanent error the provider asked to
        // retry still does not fail over (the route does not opt in), a retryable one does.
        for (status, fails_over) in [(400, false), (500, true)] {
            let first = MockServer::start().await;
            Mock::given(method("POST"))
                .respond_with(
                    ResponseTemplate::new(status)
                        .set_body_string(r#"{"error":{"message":"no"}}"#)
                        .insert_header("x-should-retry", "true"),
                )
                .mount(&first)
                .await;
            let second = server(200, OK).await;
            let dispatched = dispatch(
                &request(),
                &plan(&first, &second, ""),
                None,
                Shared::default(),
            )
            .await;
            assert_eq!(first.received_requests().await.unwrap().len(), 1);
            assert_eq!(
                second.received_requests().await.unwrap().len(),
                usize::from(fails_over),
                "HTTP {status}"
            );
            assert_eq!(dispatched.outcome.is_ok(), fails_over);
        }
    }

    /// A provider that keeps a stream alive with comments forever never trips the idle timer;
    /// the stream is ended after `stream_max_secs`, which its reservations are held for.
    #[tokio::test]
    async fn a_stream_kept_alive_forever_ends_after_stream_max_secs() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let tasks = tokio_util::task::TaskTracker::new();
        tasks.spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request).await;
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n";
            if socket.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            while socket.write_all(b": keep-alive\n\n").await.is_ok() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let text = format!(
            r#"
[[providers]]
name = "chatty"
kind = "openai"
base_url = "http://{address}/v1"
keys = [{{ id = "k", env = "PATH" }}]
models = [{{ name = "m" }}]
timeout_secs = 1
stream_idle_secs = 1
stream_max_secs = 1
max_retries = 0

[[routes]]
alias = "r"
targets = [{{ provider = "chatty", model = "m" }}]
"#
        );
        let mut job = request();
        job.request
            .extra
            .insert("stream".to_owned(), Value::Bool(true));
        let plan = plan_of(&text, &job);
        let (sink, _items) = StreamSink::new();
        let dispatched = tokio::time::timeout(
            Duration::from_secs(20),
            dispatch(&job, &plan, Some(&sink), Shared::default()),
        )
        .await
        .expect("the stream is ended");
        assert_eq!(dispatched.attempts.len(), 1);
        let error = dispatched.attempts[0].outcome.as_ref().unwrap_err();
        assert_eq!(error.class, ErrorClass::Timeout);
        assert!(
            error.message.contains("stream_max_secs"),
            "{}",
            error.message
        );
        assert!(dispatched.outcome.is_err());
    }

    /// The config of one plain `http` provider at `address` that allows `connections` calls
    /// at once over HTTP/1.1, each given `timeout_secs`.
    fn http1_plan(address: std::net::SocketAddr, connections: u32, timeout_secs: u64) -> Plan {
        let text = format!(
            r#"
[[providers]]
name = "plain"
kind = "openai"
base_url = "http://{address}/v1"
keys = [{{ id = "k", env = "PATH" }}]
models = [{{ name = "m" }}]
timeout_secs = {timeout_secs}
http1_max_connections = {connections}
max_retries = 0

[[routes]]
alias = "r"
targets = [{{ provider = "plain", model = "m" }}]
"#
        );
        plan_of(&text, &request())
    }

    /// Over HTTP/1.1 every call in flight holds a connection: a provider's calls beyond
    /// `http1_max_connections` wait for one to end, so the worker never holds more.
    #[tokio::test]
    async fn calls_over_http1_beyond_the_connection_cap_wait_for_a_connection() {
        use std::sync::Arc;
        use std::sync::atomic::AtomicUsize;
        let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (counting, highest) = (Arc::clone(&now), Arc::clone(&most));
        let app = axum::Router::new().route(
            "/v1/chat/completions",
            axum::routing::post(move || {
                let (now, most) = (Arc::clone(&counting), Arc::clone(&highest));
                async move {
                    most.fetch_max(now.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    // Counted out before the answer is sent, so a call that has its answer
                    // (and gave its connection back) is never still counted.
                    now.fetch_sub(1, Ordering::SeqCst);
                    ([(axum::http::header::CONTENT_TYPE, "application/json")], OK)
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let tasks = tokio_util::task::TaskTracker::new();
        tasks.spawn(async move { axum::serve(listener, app).await });
        let plan = http1_plan(address, 2, 30);
        let job = request();
        let calls = (0..6).map(|_| dispatch(&job, &plan, None, Shared::default()));
        let done = futures::future::join_all(calls).await;
        assert!(
            done.iter().all(|d| d.outcome.is_ok()),
            "every call is answered"
        );
        assert_eq!(
            most.load(Ordering::SeqCst),
            2,
            "six calls, two connections: two at once"
        );
    }

    /// `plan`'s first target, its circuit due for a probe, and its one connection, taken.
    async fn due_for_a_probe_with_no_connection(
        plan: &Plan,
    ) -> (&Target, crate::providers::transport::Connection<'_>) {
        let target = &plan.targets[0];
        let cap = target
            .provider
            .connections
            .as_ref()
            .expect("plain http has a cap");
        let held = cap.wait(Duration::from_secs(1)).await.unwrap();
        target.health.open_until(Instant::now());
        (target, held)
    }

    /// A call that finds every connection taken for its whole timeout fails as a timeout
    /// that names the cap. It was never sent, so it says nothing about the provider: a
    /// half-open circuit's probe goes back, due again at once.
    #[tokio::test]
    async fn a_call_that_finds_no_free_connection_in_its_timeout_fails_and_gives_its_probe_back() {
        let server = server(200, OK).await;
        let plan = http1_plan(*server.address(), 1, 1);
        let (target, held) = due_for_a_probe_with_no_connection(&plan).await;
        let dispatched = dispatch(&request(), &plan, None, Shared::default()).await;
        assert_eq!(dispatched.attempts.len(), 1, "the probe was let through");
        let error = dispatched.attempts[0].outcome.as_ref().unwrap_err();
        assert_eq!(error.class, ErrorClass::Timeout);
        assert!(
            error.message.contains("http1_max_connections"),
            "{}",
            error.message
        );
        assert!(server.received_requests().await.unwrap().is_empty());
        assert_eq!(target.health.in_flight(), 0);
        assert_eq!(
            target.health.admit(),
            Admission::Probe,
            "the probe was given back, not counted"
        );
        // That check took the probe: give it back for the next call.
        target.health.abandon_probe();
        drop(held);
        let dispatched = dispatch(&request(), &plan, None, Shared::default()).await;
        assert!(dispatched.outcome.is_ok(), "the connection is free again");
        assert_eq!(target.health.admit(), Admission::Go, "the probe closed it");
    }

    /// A call that waited here for a connection and then ran out of time did not have its
    /// whole timeout: its timeout does not count against the provider either.
    #[tokio::test]
    async fn a_call_that_waited_for_a_connection_and_then_timed_out_leaves_the_circuit_alone() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_string(OK)
                    .set_delay(Duration::from_secs(3)),
            )
            .mount(&server)
            .await;
        let plan = http1_plan(*server.address(), 1, 1);
        let (target, held) = due_for_a_probe_with_no_connection(&plan).await;
        let job = request();
        let (dispatched, ()) =
            tokio::join!(dispatch(&job, &plan, None, Shared::default()), async {
                tokio::time::sleep(Duration::from_millis(400)).await;
                drop(held);
            });
        let error = dispatched.attempts[0].outcome.as_ref().unwrap_err();
        assert_eq!(error.class, ErrorClass::Timeout);
        assert!(
            !error.message.contains("http1_max_connections"),
            "the call was sent: {}",
            error.message
        );
        assert_eq!(server.received_requests().await.unwrap().len(), 1);
        assert_eq!(
            target.health.admit(),
            Admission::Probe,
            "the probe was given back, not counted as a failure"
        );
    }

    /// A job's own `max_cost_usd` was checked against a call of at most the default output, so
    /// without budgets too the provider is given that cap when the job sets none; a job with
    /// neither is sent as it came.
    #[tokio::test]
    async fn a_job_with_its_own_cost_cap_gives_the_provider_the_output_cap_it_was_checked_with() {
        let first = server(200, OK).await;
        let second = server(200, OK).await;
        let plan = plan(&first, &second, "");
        let mut capped = request();
        capped.max_cost_usd = Some(rust_decimal::Decimal::ONE);
        for job in [&capped, &request()] {
            assert!(
                dispatch(job, &plan, None, Shared::default())
                    .await
                    .outcome
                    .is_ok()
            );
        }
        let sent: Vec<Value> = first
            .received_requests()
            .await
            .unwrap()
            .iter()
            .map(|r| serde_json::from_slice(&r.body).unwrap())
            .collect();
        assert_eq!(sent.len(), 2);
        assert_eq!(
            sent[0]["max_tokens"],
            crate::budget::DEFAULT_OUTPUT_RESERVATION
        );
        assert_eq!(sent[1].get("max_tokens"), None);
    }
}
