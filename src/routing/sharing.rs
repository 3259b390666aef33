//! How workers share what they learn: circuit openings through the `circuit_breakers` table
//! (once a second), key rests through Postgres `NOTIFY`/`LISTEN` (within milliseconds),
//! releasing expired budget reservations, and pruning of the limiter's call log.

use std::time::{Duration, Instant};

use super::Router;

/// Once a second: shares circuit openings between workers through Postgres (publishes this
/// worker's, adopts everyone else's), releases budget reservations of workers that died and
/// frees the concurrency slots of this worker's dropped calls; every 30 s, prunes the
/// limiter's call log. Stops on `shutdown`.
pub async fn share_health(
    router: Router,
    limiter: Option<super::limits::Limiter>,
    budgets: Option<crate::budget::Budgets>,
    pool: sqlx::PgPool,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(error) = sync_once(&router, &pool).await {
            tracing::warn!(error.message = %error, "Could not share circuit-breaker state.");
        }
        if let Some(budgets) = &budgets
            && let Err(error) = budgets.release_expired().await
        {
            tracing::warn!(error.message = %error, "Could not release expired budget reservations.");
        }
        if let Some(limiter) = &limiter {
            limiter.release_orphans().await;
        }
        ticks += 1;
        if let Some(limiter) = &limiter
            && ticks.is_multiple_of(30)
            && let Err(error) = limiter.prune().await
        {
            tracing::warn!(error.message = %error, "Could not prune the limiter's call log.");
        }
    }
}

async fn sync_once(router: &Router, pool: &sqlx::PgPool) -> Result<(), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let now = chrono::Utc::now();
    let instant_now = Instant::now();
    for health in router.health() {
        if let Some(until) = health.take_unshared() {
            let remaining = until.saturating_duration_since(instant_now);
            let open_until = now + chrono::Duration::from_std(remaining).unwrap_or_default();
            if let Err(error) =
                crate::store::circuits::open(&mut conn, &health.key, open_until, now).await
            {
                health.share_later(until);
                return Err(error);
            }
        }
    }
    for (target, open_until) in crate::store::circuits::open_now(&mut conn, now).await? {
        if let Some(health) = router.health_of(&target) {
            let remaining = (open_until - now).to_std().unwrap_or_default();
            health.open_until(instant_now + remaining);
        }
    }
    Ok(())
}

/// The Postgres channel key rests are announced on.
const KEY_REST_CHANNEL: &str = "switchyard_key_rest";
/// How long the key-rest listener waits after failing to receive before it tries again.
const LISTEN_RETRY: Duration = Duration::from_secs(1);

/// Announces this worker's key rests to every worker (Postgres `NOTIFY`) and adopts theirs
/// (`LISTEN`), so a provider's retry-after pauses the key everywhere within milliseconds,
/// without a database round trip per call.
pub async fn share_key_rests(
    registry: crate::providers::Registry,
    pool: sqlx::PgPool,
    mut local: tokio::sync::mpsc::UnboundedReceiver<crate::providers::KeyRest>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut listener = listen(&pool, true).await;
    // When the next try to listen is due (a fixed time, not a timer restarted by every rest
    // announced meanwhile, which a stream of 429s would put off for good).
    let mut listen_at = tokio::time::Instant::now() + LISTEN_RETRY;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            rest = local.recv() => {
                let Some(rest) = rest else { return };
                let payload = serde_json::to_string(&rest).unwrap_or_default();
                if let Err(error) = sqlx::query("SELECT pg_notify($1, $2)").bind(KEY_REST_CHANNEL).bind(payload).execute(&pool).await {
                    tracing::warn!(error.message = %error, "Cannot announce a key rest.");
                }
            }
            // A listener that could not be set up (Postgres down, out of connections) is
            // tried again every second: without it the worker would never adopt another
            // worker's rests.
            () = tokio::time::sleep_until(listen_at), if listener.is_none() => {
                listener = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    listening = listen(&pool, false) => listening,
                };
                listen_at = tokio::time::Instant::now() + LISTEN_RETRY;
            }
            notification = async { listener.as_mut()?.recv().await.ok() }, if listener.is_some() => {
                let Some(notification) = notification else {
                    // `recv` reconnects by itself; it fails when it cannot (Postgres down, the
                    // pool closed). Trying again at once would spin: wait a moment first.
                    tracing::debug!("Cannot receive key rests from Postgres; trying again in a second.");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        () = tokio::time::sleep(LISTEN_RETRY) => continue,
                    }
                };
                let Ok(rest) = serde_json::from_str::<crate::providers::KeyRest>(notification.payload()) else { continue };
                let now_ms = chrono::Utc::now().timestamp_millis();
                let remaining = Duration::from_millis(u64::try_from(rest.until_ms - now_ms).unwrap_or(0));
                if let Some(entry) = registry.get(&rest.provider) {
                    entry.keys.adopt_rest(&rest.key_id, Instant::now() + remaining);
                }
            }
        }
    }
}

/// A listener on [`KEY_REST_CHANNEL`], or `None` when Postgres refuses one (said at `warn`
/// the `first` time, at `debug` on each retry).
async fn listen(pool: &sqlx::PgPool, first: bool) -> Option<sqlx::postgres::PgListener> {
    let listening = async {
        let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
        listener.listen(KEY_REST_CHANNEL).await?;
        Ok::<_, sqlx::Error>(listener)
    };
    match listening.await {
        Ok(listener) => {
            if !first {
                tracing::info!("Listening for key rests again.");
            }
            Some(listener)
        }
        Err(error) if first => {
            tracing::warn!(error.message = %error, "Cannot listen for key rests; trying again every second, and until then they stay local to this worker.");
            None
        }
        Err(error) => {
            tracing::debug!(error.message = %error, "Still cannot listen for key rests.");
            None
        }
    }
}
