//! Concurrency and rate limits per provider and per key, held across every worker that shares
//! the database. A call first takes a local FIFO permit (so jobs of one worker are served in
//! order), then a concurrency slot (a lease that expires if its worker dies), then room in the
//! request/token window. When the wait would be longer than the caller accepts, nothing is held
//! and the caller moves on (or parks the job).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use sqlx::PgPool;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use crate::config::{Limits, Settings};
use crate::store::limiter::{self, Rate};

/// Poll interval while waiting for a concurrency slot held by another worker.
const SLOT_POLL: Duration = Duration::from_millis(20);

/// Most calls one grant holds. A request limit of at least `2 * GRANT_DIVISOR` calls per window
/// is drawn in grants of `rpm / GRANT_DIVISOR` calls (at most this many), so the shared scope
/// row is locked once per grant instead of once per call; smaller limits stay exact per call.
const MAX_GRANT: u32 = 64;
const GRANT_DIVISOR: u32 = 256;
/// The longest a grant's calls may be made after it was taken. Its window entry is logged at
/// its end, so it counts for every window any of its calls falls in: the limit still holds
/// exactly, at the price of up to this much of each window for unused calls.
const GRANT_TTL: Duration = Duration::from_secs(1);

/// How long a scope's shared pause, once read, answers this worker's calls before it is read
/// again. Well below any retry-after a provider sends (whole seconds), and a pause this worker
/// announces itself is seen at once.
const PAUSE_RECHECK: Duration = Duration::from_millis(100);

/// A scope's shared pause as this worker last read it.
#[derive(Debug, Default)]
struct PauseView {
    /// When it was read (`None`: never); a task that finds it stale reads it again, the others
    /// meanwhile go by what was read.
    read_at: Option<tokio::time::Instant>,
    until: Option<tokio::time::Instant>,
}

/// Calls of a grant not used yet, and until when they may be.
#[derive(Debug)]
struct Grant {
    left: u32,
    until: tokio::time::Instant,
}

/// The grants of one scope, oldest first, and a lock so one task at a time takes a new one.
#[derive(Debug, Default)]
struct Grants {
    held: std::sync::Mutex<std::collections::VecDeque<Grant>>,
    refill: tokio::sync::Mutex<()>,
}

impl Grants {
    /// Takes one call from a grant still valid.
    fn take(&self) -> bool {
        let now = tokio::time::Instant::now();
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while let Some(front) = held.front_mut() {
            if front.until > now && front.left > 0 {
                front.left -= 1;
                return true;
            }
            held.pop_front();
        }
        false
    }

    fn add(&self, grant: Grant) {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push_back(grant);
    }
}

/// One limited scope: a provider or one of its keys.
#[derive(Debug, Clone)]
pub struct Scope {
    pub name: String,
    pub limits: Limits,
}

impl Scope {
    pub fn provider(name: &str, limits: Limits) -> Self {
        Self {
            name: format!("provider:{name}"),
            limits,
        }
    }

    pub fn key(provider: &str, key_id: &str, limits: Limits) -> Self {
        Self {
            name: format!("key:{provider}:{key_id}"),
            limits,
        }
    }

    /// Whether calls are logged in a rate window (`rpm` or `tpm` is set).
    pub fn counts_calls(&self) -> bool {
        self.limits.rpm.is_some() || self.limits.tpm.is_some()
    }

    /// Calls per grant for this scope, when it is drawn in grants (a large request limit and
    /// no token limit, whose estimates are corrected per call).
    fn grant_size(&self) -> Option<u32> {
        let rpm = self.limits.rpm?;
        let size = (rpm / GRANT_DIVISOR).min(MAX_GRANT);
        (self.limits.tpm.is_none() && size >= 2).then_some(size)
    }

    /// How long a grant's calls may be made: [`GRANT_TTL`], or a twentieth of a short window.
    fn grant_ttl(&self) -> Duration {
        GRANT_TTL.min(Duration::from_secs(self.limits.window_secs.max(1)) / 20)
    }

    /// Whether a token estimate is needed.
    pub fn counts_tokens(&self) -> bool {
        self.limits.tpm.is_some()
    }
}

/// What holds a call's capacity until it is released.
#[derive(Debug)]
pub struct Lease {
    slots: Vec<(String, i32)>,
    events: Vec<Uuid>,
    _permits: Vec<OwnedSemaphorePermit>,
    /// Where the slots go when the lease is dropped unreleased (see [`Orphans`]).
    orphans: Orphans,
}

/// Concurrency slots whose lease was dropped without being released: the call's task was
/// cancelled (its session lost the broker, the shutdown grace ran out) or panicked. A slot
/// expires only after the longest its call could take (for a stream, `stream_max_secs`, an
/// hour by default), so until then it would keep a provider's capacity from every worker.
/// `Drop` cannot wait on Postgres: it leaves the slots here, and the limiter frees them on its
/// next `acquire` and once a second from the worker's sharing task
/// ([`Limiter::release_orphans`]).
type Orphans = Arc<std::sync::Mutex<Vec<(String, i32)>>>;

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.slots.is_empty() {
            self.orphans
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .append(&mut self.slots);
        }
    }
}

/// The outcome of [`Limiter::acquire`].
#[derive(Debug)]
pub enum Acquired {
    Granted(Lease),
    /// Capacity frees up later than the caller would wait; nothing is held.
    TooLong(Duration),
}

/// Shared-limit handle of one worker.
#[derive(Debug, Clone)]
pub struct Limiter {
    pool: PgPool,
    /// This worker's id on the slots it holds.
    holder: Uuid,
    /// Local FIFO queues in front of each concurrency-limited scope.
    local: Arc<HashMap<String, Arc<Semaphore>>>,
    /// Longest wait for capacity before the caller moves on.
    max_wait: Duration,
    /// How long calls are remembered: twice the longest window.
    keep: Duration,
    /// Grants of the scopes drawn in grants (see [`Scope::grant_size`]).
    grants: Arc<HashMap<String, Grants>>,
    /// The shared pauses of the scopes that count no calls (read every [`PAUSE_RECHECK`]).
    pauses: Arc<HashMap<String, std::sync::Mutex<PauseView>>>,
    /// Slots of leases dropped unreleased, still to be freed.
    orphans: Orphans,
}

/// Every scope the settings define.
pub fn scopes(settings: &Settings) -> Vec<Scope> {
    let mut scopes = Vec::new();
    for provider in &settings.providers {
        let any = provider.limits.is_some() || provider.keys.iter().any(|k| k.limits.is_some());
        if !any {
            continue;
        }
        if let Some(limits) = &provider.limits {
            scopes.push(Scope::provider(&provider.name, limits.clone()));
        }
        // Every key of a limited provider gets a scope, so a retry-after pauses it everywhere.
        for key in &provider.keys {
            scopes.push(Scope::key(
                &provider.name,
                &key.id,
                key.limits.clone().unwrap_or_default(),
            ));
        }
    }
    scopes
}

/// How long a concurrency slot is held before another worker may take it as abandoned: the
/// call's own time, after up to `max_wait` for the rate windows and up to `max_wait` again
/// for a busy budget (both waited for once the slot is taken), and a margin.
fn slot_ttl(call_timeout: Duration, max_wait: Duration) -> Duration {
    call_timeout + max_wait * 2 + Duration::from_secs(30)
}
impl Limiter {
    /// Registers every scope (creating slots) and builds the local queues.
    pub async fn new(
        pool: PgPool,
        scopes: &[Scope],
        max_wait: Duration,
    ) -> Result<Self, sqlx::Error> {
        let mut conn = pool.acquire().await?;
        let mut local = HashMap::new();
        for scope in scopes {
            limiter::register(&mut conn, &scope.name, scope.limits.max_concurrency).await?;
            if let Some(max) = scope.limits.max_concurrency {
                local.insert(scope.name.clone(), Arc::new(Semaphore::new(max as usize)));
            }
        }
        drop(conn);
        let grants = scopes
            .iter()
            .filter(|scope| scope.grant_size().is_some())
            .map(|scope| (scope.name.clone(), Grants::default()))
            .collect();
        let pauses = scopes
            .iter()
            .filter(|scope| !scope.counts_calls())
            .map(|scope| (scope.name.clone(), std::sync::Mutex::default()))
            .collect();
        Ok(Self {
            grants: Arc::new(grants),
            pauses: Arc::new(pauses),
            pool,
            holder: Uuid::now_v7(),
            orphans: Orphans::default(),
            local: Arc::new(local),
            max_wait,
            keep: 2 * Duration::from_secs(
                scopes
                    .iter()
                    .map(|s| s.limits.window_secs)
                    .max()
                    .unwrap_or(60),
            ),
        })
    }

    /// Longest wait for capacity before moving on.
    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }

    /// Waits (at most `max_wait`) for room in every scope, for a call of `units` tokens that
    /// may take up to `call_timeout`.
    pub async fn acquire(
        &self,
        scopes: &[&Scope],
        units: u64,
        max_wait: Duration,
        call_timeout: Duration,
    ) -> Result<Acquired, sqlx::Error> {
        self.release_orphans().await;
        let mut lease = self.lease_of(Vec::new());
        // Whatever was taken before a refusal or an error is given back, uncounted.
        match self
            .fill(&mut lease, scopes, units, max_wait, call_timeout)
            .await
        {
            Ok(None) => Ok(Acquired::Granted(lease)),
            Ok(Some(wait)) => {
                self.cancel(lease).await;
                Ok(Acquired::TooLong(wait))
            }
            Err(error) => {
                self.cancel(lease).await;
                Err(error)
            }
        }
    }

    /// Takes room in every scope into `lease`; `Some(wait)` when capacity comes too late.
    async fn fill(
        &self,
        lease: &mut Lease,
        scopes: &[&Scope],
        units: u64,
        max_wait: Duration,
        call_timeout: Duration,
    ) -> Result<Option<Duration>, sqlx::Error> {
        let deadline = tokio::time::Instant::now() + max_wait;
        for scope in scopes {
            if let Some(queue) = self.local.get(&scope.name) {
                match tokio::time::timeout_at(deadline, queue.clone().acquire_owned()).await {
                    Ok(Ok(permit)) => lease._permits.push(permit),
                    _ => return Ok(Some(max_wait)),
                }
            }
        }
        for scope in scopes {
            if scope.limits.max_concurrency.is_some() {
                loop {
                    let now = Utc::now();
                    let expires = now
                        + chrono::Duration::from_std(slot_ttl(call_timeout, max_wait))
                            .unwrap_or_default();
                    if let Some(slot) =
                        limiter::take_slot(&self.pool, &scope.name, self.holder, now, expires)
                            .await?
                    {
                        lease.slots.push((scope.name.clone(), slot));
                        break;
                    }
                    if tokio::time::Instant::now() + SLOT_POLL > deadline {
                        return Ok(Some(max_wait));
                    }
                    tokio::time::sleep(SLOT_POLL + Duration::from_millis(fastrand::u64(0..10)))
                        .await;
                }
            }
        }
        for scope in scopes {
            if !scope.counts_calls() {
                // Nothing to count: only a shared pause (a key's retry-after) can hold it.
                loop {
                    match self.paused_for(scope).await? {
                        None => break,
                        Some(wait) if tokio::time::Instant::now() + wait <= deadline => {
                            tokio::time::sleep(wait + Duration::from_millis(fastrand::u64(0..5)))
                                .await;
                        }
                        Some(wait) => return Ok(Some(wait)),
                    }
                }
                continue;
            }
            let window = Duration::from_secs(scope.limits.window_secs.max(1));
            let granted = match (scope.grant_size(), self.grants.get(&scope.name)) {
                (Some(size), Some(grants)) => Some((size, grants)),
                _ => None,
            };
            // One task at a time takes a new grant; the others wait and then draw from it.
            let _refilling = match granted {
                Some((_, grants)) => {
                    if grants.take() {
                        continue;
                    }
                    let Ok(refilling) =
                        tokio::time::timeout_at(deadline, grants.refill.lock()).await
                    else {
                        return Ok(Some(max_wait));
                    };
                    if grants.take() {
                        continue;
                    }
                    Some(refilling)
                }
                None => None,
            };
            loop {
                let event = Uuid::now_v7();
                // A grant is valid locally from before it was asked for, so never past its entry.
                let asked = tokio::time::Instant::now();
                let now = Utc::now();
                let take = match granted {
                    Some((size, _)) => limiter::Take {
                        event,
                        at: now + chrono::Duration::from_std(scope.grant_ttl()).unwrap_or_default(),
                        calls: size,
                        units: 0,
                    },
                    None => limiter::Take {
                        event,
                        at: now,
                        calls: 1,
                        units,
                    },
                };
                let decision = limiter::take_rate(
                    &self.pool,
                    &scope.name,
                    take,
                    now,
                    window,
                    scope.limits.rpm,
                    scope.limits.tpm,
                )
                .await?;
                match decision {
                    Rate::Granted => {
                        match granted {
                            // This call is the grant's first; a cancelled call is not given
                            // back (it only leaves the window less full).
                            Some((size, grants)) => grants.add(Grant {
                                left: size - 1,
                                until: asked + scope.grant_ttl(),
                            }),
                            None => lease.events.push(event),
                        }
                        break;
                    }
                    Rate::Wait(wait) if tokio::time::Instant::now() + wait <= deadline => {
                        tokio::time::sleep(wait + Duration::from_millis(fastrand::u64(0..5))).await;
                    }
                    Rate::Wait(wait) => return Ok(Some(wait)),
                }
            }
        }
        Ok(None)
    }

    /// How long `scope` is paused for every worker, read from Postgres at most every
    /// [`PAUSE_RECHECK`] by one task at a time.
    async fn paused_for(&self, scope: &Scope) -> Result<Option<Duration>, sqlx::Error> {
        let Some(view) = self.pauses.get(&scope.name) else {
            return limiter::paused_for(&self.pool, &scope.name, Utc::now()).await;
        };
        let now = tokio::time::Instant::now();
        let cached = {
            let mut view = view
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match view.read_at {
                Some(read_at) if now < read_at + PAUSE_RECHECK => Some(view.until),
                // A pause known to last: wait it out before asking again.
                _ if view.until.is_some_and(|until| until > now) => Some(view.until),
                // Stale: this task reads it; the others go by the last reading meanwhile.
                _ => {
                    view.read_at = Some(now);
                    None
                }
            }
        };
        let until = match cached {
            Some(until) => until,
            None => {
                let wait = limiter::paused_for(&self.pool, &scope.name, Utc::now()).await?;
                let until = wait.map(|wait| now + wait);
                let mut view = view
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                view.until = until.max(view.until.filter(|u| *u > now));
                view.until
            }
        };
        Ok(until.filter(|until| *until > now).map(|until| until - now))
    }

    /// Gives back a lease that was not used for a call: its slots are freed and its calls are
    /// removed from the rate windows.
    pub async fn cancel(&self, lease: Lease) {
        if let Err(error) = limiter::delete_events(&self.pool, &lease.events).await {
            tracing::warn!(error.message = %error, "Could not remove unused calls from a rate window.");
        }
        self.release(lease, None).await;
    }

    /// Frees the lease's slots and corrects its token counts to `actual_units`.
    pub async fn release(&self, mut lease: Lease, actual_units: Option<u64>) {
        self.release_slots(&mut lease).await;
        if let Some(units) = actual_units {
            for event in &lease.events {
                if let Err(error) = limiter::settle_units(&self.pool, *event, units).await {
                    tracing::warn!(error.message = %error, "Could not correct a token count.");
                }
            }
        }
    }

    /// Frees the slots of leases dropped without being released (see [`Orphans`]).
    pub async fn release_orphans(&self) {
        let slots = std::mem::take(
            &mut *self
                .orphans
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        if slots.is_empty() {
            return;
        }
        tracing::debug!(
            slots = slots.len(),
            "Freeing the slots of calls that were dropped."
        );
        // Held as a lease of their own: whatever is not freed (this task dropped in turn,
        // Postgres refusing) goes back to the orphans.
        self.release_slots(&mut self.lease_of(slots)).await;
    }

    /// A lease holding `slots`, whose unreleased slots come back to this limiter.
    fn lease_of(&self, slots: Vec<(String, i32)>) -> Lease {
        Lease {
            slots,
            events: Vec::new(),
            _permits: Vec::new(),
            orphans: self.orphans.clone(),
        }
    }

    /// Frees the lease's slots one at a time, each taken out of the lease once Postgres has
    /// freed it: a slot still in the lease when it is dropped (the task cancelled while it
    /// waits here) or one Postgres would not free goes to the orphans, freed on a later try.
    async fn release_slots(&self, lease: &mut Lease) {
        while let Some((scope, slot)) = lease.slots.last() {
            if let Err(error) = limiter::release_slot(&self.pool, scope, *slot, self.holder).await {
                tracing::warn!(scope = %scope, error.message = %error, "Could not release a slot; trying again within a second.");
                return;
            }
            lease.slots.pop();
        }
    }

    /// Pauses a scope for every worker (a provider's retry-after on a key).
    pub async fn pause(&self, scope: &Scope, rest: Duration) {
        if let Some(view) = self.pauses.get(&scope.name) {
            let until = tokio::time::Instant::now() + rest;
            let mut view = view
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            view.until = Some(until).max(view.until);
        }
        let until = Utc::now() + chrono::Duration::from_std(rest).unwrap_or_default();
        if let Err(error) = limiter::pause(&self.pool, &scope.name, until).await {
            tracing::warn!(scope = %scope.name, error.message = %error, "Could not share a key's pause.");
        }
    }

    /// Forgets calls older than any window needs.
    pub async fn prune(&self) -> Result<(), sqlx::Error> {
        limiter::prune(
            &self.pool,
            Utc::now() - chrono::Duration::from_std(self.keep).unwrap_or_default(),
        )
        .await
    }
}

/// The limited scopes of one provider: the provider's own and one per key.
#[derive(Debug, Clone, Default)]
pub struct ProviderScopes {
    pub provider: Option<Scope>,
    pub keys: HashMap<String, Scope>,
}

impl ProviderScopes {
    /// The scopes of `settings`' provider (empty when it has no limits anywhere).
    pub fn from_settings(settings: &crate::config::ProviderSettings) -> Self {
        let any = settings.limits.is_some() || settings.keys.iter().any(|k| k.limits.is_some());
        if !any {
            return Self::default();
        }
        Self {
            provider: settings
                .limits
                .clone()
                .map(|l| Scope::provider(&settings.name, l)),
            keys: settings
                .keys
                .iter()
                .map(|k| {
                    (
                        k.id.clone(),
                        Scope::key(&settings.name, &k.id, k.limits.clone().unwrap_or_default()),
                    )
                })
                .collect(),
        }
    }

    /// The scopes a call with `key_id` takes room in.
    pub fn for_call(&self, key_id: Option<&str>) -> Vec<&Scope> {
        self.provider
            .iter()
            .chain(key_id.and_then(|id| self.keys.get(id)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slot is taken before the call waits for its rate windows and then for a busy budget
    /// (each up to `max_wait`): it must outlast both waits and the call, or another worker
    /// could take the slot of a live call and pass `max_concurrency`.
    #[test]
    fn a_slot_outlasts_both_waits_before_its_call_and_the_call_itself() {
        let call = Duration::from_secs(60);
        let wait = Duration::from_secs(20);
        assert!(slot_ttl(call, wait) > call + wait + wait);
        assert!(slot_ttl(call, Duration::ZERO) > call);
    }
}
