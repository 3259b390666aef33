//! The outbox relay: a task in every worker that republishes messages of committed jobs left
//! unsent — by a worker that died between commit and publish, or lost the broker. It claims
//! rows older than `outbox_relay_after_ms` with `FOR UPDATE SKIP LOCKED` (so relays of several
//! workers share the work and never take the same row), publishes them with confirms under
//! their stored `message_id`, deletes them and commits. A relay that dies before its commit
//! leaves the rows for the next one: delivery is at least once, and subscribers dedupe on
//! `message_id`.

use std::time::Duration;

use chrono::Utc;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

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
enum RelayError {
    #[error("outbox query failed: {0}")]
    Store(#[from] sqlx::Error),
    #[error("cannot publish outbox rows: {0}")]
    Publish(#[from] BrokerError),
}

/// Runs until `stop`.
pub async fn run(pool: PgPool, broker: Broker, after: Duration, stop: CancellationToken) {
    let mut publisher: Option<Publisher> = None;
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    'ticks: loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        // Drain everything stale, a claim at a time, then wait for the next tick.
        loop {
            match relay_once(&pool, &broker, &mut publisher, after).await {
                Ok(0) => break,
                Ok(n) => {
                    metrics::counter!("switchyard_outbox_relayed_total").increment(n as u64);
                    tracing::info!(
                        messages = n,
                        "Relayed outbox messages a worker left unsent."
                    );
                }
                Err(error) => {
                    tracing::warn!(error.message = %error, "Outbox relay pass failed; retrying on the next tick.");
                    break;
                }
            }
            if stop.is_cancelled() {
                break 'ticks;
            }
        }
    }
    if let Some(publisher) = publisher {
        publisher.close(crate::app::CLOSE_WITHIN).await;
    }
}

async fn relay_once(
    pool: &PgPool,
    broker: &Broker,
    publisher: &mut Option<Publisher>,
    after: Duration,
) -> Result<usize, RelayError> {
    let before = Utc::now() - chrono::Duration::from_std(after).unwrap_or_default();
    let mut tx = pool.begin().await?;
    let outbox::Claim { ids, messages } = outbox::claim_stale(&mut tx, before, CLAIM).await?;
    if ids.is_empty() {
        return Ok(0);
    }
    if !messages.is_empty() {
        publish(broker, publisher, &messages).await?;
    }
    outbox::delete_many(&mut tx, &ids).await?;
    tx.commit().await?;
    Ok(messages.len())
}

/// Publishes `messages` with confirms, opening the relay's channel on first use.
async fn publish(
    broker: &Broker,
    publisher: &mut Option<Publisher>,
    messages: &[Outgoing],
) -> Result<(), RelayError> {
    if !broker.is_connected() {
        // The worker's own session reconnects; publishing now would only fail.
        return Err(RelayError::Publish(BrokerError::Disconnected));
    }
    let publisher = match publisher {
        Some(publisher) => publisher,
        None => publisher.insert(Publisher::open(broker).await?),
    };
    publisher.publish_all_once(messages).await?;
    Ok(())
}
