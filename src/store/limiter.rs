//! The `limiter_*` tables: concurrency slots and recent-call logs shared by every worker.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// Creates `scope` with `slots` concurrency slots (dropping extra slots from an older config).
pub async fn register(
    conn: &mut PgConnection,
    scope: &str,
    slots: Option<u32>,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO limiter_scopes (scope) VALUES ($1) ON CONFLICT (scope) DO NOTHING")
        .bind(scope)
        .execute(&mut *conn)
        .await?;
    let count = i32::try_from(slots.unwrap_or(0)).unwrap_or(i32::MAX);
    sqlx::query(
        "INSERT INTO limiter_slots (scope, slot) SELECT $1, s FROM generate_series(0, $2 - 1) AS s
         ON CONFLICT (scope, slot) DO NOTHING",
    )
    .bind(scope)
    .bind(count)
    .execute(&mut *conn)
    .await?;
    sqlx::query("DELETE FROM limiter_slots WHERE scope = $1 AND slot >= $2")
        .bind(scope)
        .bind(count)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Takes a free (or expired) slot of `scope` for `holder` until `expires_at`.
pub async fn take_slot(
    pool: &PgPool,
    scope: &str,
    holder: Uuid,
    now: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> Result<Option<i32>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE limiter_slots SET holder = $2, expires_at = $4
         WHERE (scope, slot) = (SELECT scope, slot FROM limiter_slots
                                WHERE scope = $1 AND (holder IS NULL OR expires_at < $3)
                                ORDER BY slot LIMIT 1 FOR UPDATE SKIP LOCKED)
         RETURNING slot",
    )
    .bind(scope)
    .bind(holder)
    .bind(now)
    .bind(expires_at)
    .fetch_optional(pool)
    .await
}

/// Frees a slot this holder took.
pub async fn release_slot(
    pool: &PgPool,
    scope: &str,
    slot: i32,
    holder: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE limiter_slots SET holder = NULL, expires_at = NULL WHERE scope = $1 AND slot = $2 AND holder = $3")
        .bind(scope)
        .bind(slot)
        .bind(holder)
        .execute(pool)
        .await?;
    Ok(())
}

/// The outcome of asking for rate capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    Granted,
    /// Full or paused: capacity frees up after this long.
    Wait(Duration),
}

/// How long `scope` is still paused (by a provider's retry-after), if it is.
pub async fn paused_for(
    pool: &PgPool,
    scope: &str,
    now: DateTime<Utc>,
) -> Result<Option<Duration>, sqlx::Error> {
    let until: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT paused_until FROM limiter_scopes WHERE scope = $1")
            .bind(scope)
            .fetch_optional(pool)
            .await?
            .flatten();
    Ok(until
        .filter(|until| *until > now)
        .map(|until| (until - now).to_std().unwrap_or_default()))
}

/// What one rate-window entry asks for: `calls` calls of `units` tokens in all, logged at `at`
/// (later than now for a grant, whose calls may happen until then).
#[derive(Debug, Clone, Copy)]
pub struct Take {
    pub event: Uuid,
    pub at: DateTime<Utc>,
    pub calls: u32,
    pub units: u64,
}

/// Records `take` in `scope` if the window allows it, atomically across workers (the scope
/// row is locked for the check and insert).
pub async fn take_rate(
    pool: &PgPool,
    scope: &str,
    take: Take,
    now: DateTime<Utc>,
    window: Duration,
    rpm: Option<u32>,
    tpm: Option<u64>,
) -> Result<Rate, sqlx::Error> {
    let Take {
        event,
        at,
        calls,
        units,
    } = take;
    let mut tx = pool.begin().await?;
    let paused: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT paused_until FROM limiter_scopes WHERE scope = $1 FOR UPDATE")
            .bind(scope)
            .fetch_optional(&mut *tx)
            .await?
            .flatten();
    if let Some(until) = paused.filter(|until| *until > now) {
        tx.rollback().await?;
        return Ok(Rate::Wait((until - now).to_std().unwrap_or_default()));
    }
    let since = now - chrono::Duration::from_std(window).unwrap_or_default();
    let (count, sum, oldest): (i64, i64, Option<DateTime<Utc>>) = sqlx::query_as(
        "SELECT coalesce(sum(calls), 0)::int8, coalesce(sum(units), 0)::int8, min(at) FROM limiter_events WHERE scope = $1 AND at > $2",
    )
    .bind(scope)
    .bind(since)
    .fetch_one(&mut *tx)
    .await?;
    let units_i64 = i64::try_from(units).unwrap_or(i64::MAX);
    let over_requests = rpm.is_some_and(|rpm| count + i64::from(calls) > i64::from(rpm));
    let over_tokens = tpm.is_some_and(|tpm| {
        count > 0 && sum.saturating_add(units_i64) > i64::try_from(tpm).unwrap_or(i64::MAX)
    });
    if over_requests || over_tokens {
        tx.rollback().await?;
        let frees_at = oldest.map(|at| at + chrono::Duration::from_std(window).unwrap_or_default());
        let wait = frees_at
            .map(|at| (at - now).to_std().unwrap_or_default())
            .unwrap_or(window);
        return Ok(Rate::Wait(wait.max(Duration::from_millis(1))));
    }
    sqlx::query(
        "INSERT INTO limiter_events (id, scope, at, units, calls) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(event)
    .bind(scope)
    .bind(at)
    .bind(units_i64)
    .bind(i32::try_from(calls).unwrap_or(i32::MAX))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Rate::Granted)
}

/// Removes calls that never happened from the rate windows.
pub async fn delete_events(pool: &PgPool, events: &[Uuid]) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    sqlx::query("DELETE FROM limiter_events WHERE id = ANY($1)")
        .bind(events)
        .execute(pool)
        .await?;
    Ok(())
}

/// Corrects a recorded call's tokens to the actual usage.
pub async fn settle_units(pool: &PgPool, event: Uuid, units: u64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE limiter_events SET units = $2 WHERE id = $1")
        .bind(event)
        .bind(i64::try_from(units).unwrap_or(i64::MAX))
        .execute(pool)
        .await?;
    Ok(())
}

/// Pauses `scope` for every worker until `until` (keeping a later pause).
pub async fn pause(pool: &PgPool, scope: &str, until: DateTime<Utc>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE limiter_scopes SET paused_until = GREATEST(coalesce(paused_until, $2), $2) WHERE scope = $1",
    )
    .bind(scope)
    .bind(until)
    .execute(pool)
    .await?;
    Ok(())
}

/// Forgets calls older than `before`.
pub async fn prune(pool: &PgPool, before: DateTime<Utc>) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM limiter_events WHERE at < $1")
        .bind(before)
        .execute(pool)
        .await?;
    Ok(())
}
