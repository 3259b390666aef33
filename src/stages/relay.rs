//! The outbox relay: a task in every worker that republishes messages of committed jobs left
//! unsent — by a worker that died between commit and publish, or lost the broker. It claims
//! rows older than `outbox_relay_after_ms` with `FOR UPDATE SKIP LOCKED` (so relays of several
//! workers share the work and never take the same row), publishes them with confirms under
//! their stored `message_id`, deletes them and commits. A relay that dies before its commit
//! leaves the rows for the next one: delivery is at least once, and subscribers dedupe on
//! `message_id`.
//!
//! Rows of a session that still holds its [`Lease`] are not the relay's: a live session
//! publishes and deletes its own rows, however long its commit or the broker's confirms take,
//! so a slow lane's messages are not published twice. Nor are the rows of its own worker's
//! running sessions ([`Running`]), even when their leases expired while the whole process
//! was paused.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::queue::publisher::{Outgoing, Publisher};
use crate::queue::{Broker, BrokerError};
use crate::store::outbox;

/// Rows claimed per transaction: each is a finalize group's messages (up to
/// `finalize_batch_size` results and the group's event messages).
const CLAIM: i64 = 8;
/// How often the relay looks for stale rows.
const EVERY: Duration = Duration::from_secs(1);

/// Why one relay pass failed; the next tick tries again.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("outbox query failed: {0}")]
    Store(#[from] sqlx::Error),
    #[error("cannot publish outbox rows: {0}")]
    Publish(#[from] BrokerError),
}

/// Runs until `stop`, leaving the rows of `running` sessions alone.
pub async fn run(
    pool: PgPool,
    broker: Broker,
    after: Duration,
    running: Running,
    stop: CancellationToken,
) {
    let mut publisher: Option<Publisher> = None;
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let drained = drain(&pool, &broker, &mut publisher, after, &running, &stop).await;
        if let Err(error) = drained {
            tracing::warn!(error.message = %error, "Outbox relay pass failed; retrying on the next tick.");
        }
    }
    if let Some(publisher) = publisher {
        publisher.close(crate::app::CLOSE_WITHIN).await;
    }
}

/// Relays everything stale, a claim at a time, until a claim finds no row (or `stop`);
/// returns how many messages it published. A claim whose rows held only messages that cannot
/// be published (a result row gone) still deletes them, and the drain goes on.
pub async fn drain(
    pool: &PgPool,
    broker: &Broker,
    publisher: &mut Option<Publisher>,
    after: Duration,
    running: &Running,
    stop: &CancellationToken,
) -> Result<usize, RelayError> {
    let mut published = 0;
    loop {
        let pass = relay_once(pool, broker, publisher, after, &running.ids()).await?;
        if pass.rows == 0 {
            return Ok(published);
        }
        if pass.messages > 0 {
            published += pass.messages;
            metrics::counter!("switchyard_outbox_relayed_total").increment(pass.messages as u64);
            tracing::info!(
                messages = pass.messages,
                "Relayed outbox messages a worker left unsent."
            );
        }
        if stop.is_cancelled() {
            return Ok(published);
        }
    }
}

/// What one claim took: its rows (deleted) and the messages it published.
struct Pass {
    rows: usize,
    messages: usize,
}

async fn relay_once(
    pool: &PgPool,
    broker: &Broker,
    publisher: &mut Option<Publisher>,
    after: Duration,
    running: &[Uuid],
) -> Result<Pass, RelayError> {
    let before = Utc::now() - chrono::Duration::from_std(after).unwrap_or_default();
    let mut tx = pool.begin().await?;
    let claim = outbox::claim_stale(&mut tx, before, CLAIM, running).await?;
    if claim.ids.is_empty() {
        return Ok(Pass {
            rows: 0,
            messages: 0,
        });
    }
    // Rows whose messages cannot be published (their results are gone) have none to send.
    let taken = if claim.messages.is_empty() {
        Vec::new()
    } else {
        publish(broker, publisher, &claim.messages).await?
    };
    // Rows whose every message the broker took are done. A message it refused (a full queue
    // that rejects publishes, a message over its size limit) stays in its row, alone with the
    // row's other refused ones, and the row goes to the back of the line to be tried again: it
    // cannot hold up the rows behind it, and what went out does not go out again.
    let (mut sent, mut published) = (Vec::new(), 0);
    for (id, row) in claim.rows() {
        let positions = claim.positions.get(row.clone()).unwrap_or_default();
        let outcomes = taken.get(row.clone()).unwrap_or_default();
        let refused: Vec<i64> = positions
            .iter()
            .zip(outcomes)
            .filter(|(_, taken)| !**taken)
            .map(|(position, _)| *position)
            .collect();
        published += row.len() - refused.len();
        if refused.is_empty() {
            sent.push(id);
        } else {
            metrics::counter!("switchyard_outbox_refused_total").increment(1);
            tracing::error!(outbox.id = %id, refused = refused.len(), of = row.len(), "The broker refuses messages of an outbox row; they are kept at the back of the relay's line and tried again later.");
            outbox::put_back(&mut tx, id, &refused).await?;
        }
    }
    outbox::delete_many(&mut tx, &sent).await?;
    tx.commit().await?;
    Ok(Pass {
        rows: sent.len(),
        messages: published,
    })
}

/// Publishes `messages` with confirms, opening the relay's channel on first use; returns, per
/// message, whether the broker took it.
async fn publish(
    broker: &Broker,
    publisher: &mut Option<Publisher>,
    messages: &[Outgoing],
) -> Result<Vec<bool>, RelayError> {
    if !broker.is_connected() {
        // The worker's own session reconnects; publishing now would only fail.
        return Err(RelayError::Publish(BrokerError::Disconnected));
    }
    let publisher = match publisher {
        Some(publisher) => publisher,
        None => publisher.insert(Publisher::open(broker).await?),
    };
    Ok(publisher.publish_each_once(messages).await?)
}

/// How long a session's start or end waits for its lease's statement: a session does not wait
/// for a Postgres that is down (the lease is renewed later, or expires on its own).
const LEASE_WAIT: Duration = Duration::from_secs(1);

/// A finalize session's lease on its outbox rows (`outbox_sessions`): taken when the session
/// starts, renewed every quarter of `ttl` while it lives, deleted by [`Lease::end`] (or, when
/// dropped, by its renewing task). A worker that dies stops renewing, and its rows are the
/// relay's once the lease expires. A failed renewal is only logged: the lease then expires and
/// the rows go back to being relayed by age, at least once as before.
pub struct Lease {
    id: Uuid,
    stop: CancellationToken,
    holder: Option<tokio::task::JoinHandle<()>>,
    running: Running,
}

/// The sessions of this worker that are running: its relay never takes their rows. A lease in
/// Postgres can expire while the whole process is paused (the benchmark stops its worker with
/// `SIGSTOP` while it publishes; a VM can be suspended); on waking, the worker's own relay
/// would otherwise race its lanes for rows they have already published.
#[derive(Clone, Debug, Default)]
pub struct Running(Arc<Mutex<BTreeSet<Uuid>>>);

impl Running {
    /// The running sessions' ids.
    pub fn ids(&self) -> Vec<Uuid> {
        self.lock().iter().copied().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<Uuid>> {
        // A panic while holding the lock leaves a set that is still whole.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Lease {
    /// Takes a new session's lease for `ttl` (on `tasks`, which renews it), and counts the
    /// session among `running` until the lease ends.
    pub async fn start(
        pool: &PgPool,
        tasks: &TaskTracker,
        ttl: Duration,
        running: &Running,
    ) -> Self {
        let id = Uuid::now_v7();
        running.lock().insert(id);
        if tokio::time::timeout(LEASE_WAIT, hold(pool, id, ttl))
            .await
            .is_err()
        {
            tracing::warn!(session = %id, "Postgres did not answer within {LEASE_WAIT:?}; the session starts without its outbox lease for now.");
        }
        let stop = CancellationToken::new();
        let holder = tasks.spawn(renew(pool.clone(), id, ttl, stop.clone()));
        Self {
            id,
            stop,
            holder: Some(holder),
            running: running.clone(),
        }
    }

    /// The session id its outbox rows carry.
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// Ends the lease and waits until it is deleted.
    pub async fn end(mut self) {
        self.running.lock().remove(&self.id);
        self.stop.cancel();
        if let Some(holder) = self.holder.take() {
            let _ = holder.await;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.running.lock().remove(&self.id);
        self.stop.cancel();
    }
}

/// Renews the lease until `stop`, then deletes it.
async fn renew(pool: PgPool, id: Uuid, ttl: Duration, stop: CancellationToken) {
    let every = (ttl / 4).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = async {
                tokio::time::sleep(every).await;
                hold(&pool, id, ttl).await;
            } => {}
        }
    }
    let ended = async {
        let mut conn = pool.acquire().await?;
        outbox::end_session(&mut conn, id).await
    };
    match tokio::time::timeout(LEASE_WAIT, ended).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::warn!(session = %id, error.message = %error, "Could not end an outbox session's lease; it expires on its own.");
        }
        Err(_) => {
            tracing::warn!(session = %id, "Postgres did not answer within {LEASE_WAIT:?}; the outbox session's lease expires on its own.");
        }
    }
}

async fn hold(pool: &PgPool, id: Uuid, ttl: Duration) {
    let held = async {
        let mut conn = pool.acquire().await?;
        outbox::hold_session(&mut conn, id, ttl).await
    };
    if let Err(error) = held.await {
        tracing::warn!(session = %id, error.message = %error, "Could not take or renew an outbox session's lease; once it expires, the relay may publish this session's messages again.");
    }
}
