//! The `circuit_breakers` table: open circuits shared between workers.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

/// Records that `target` is open until `open_until` (keeping a later opening).
pub async fn open(
    conn: &mut PgConnection,
    target: &str,
    open_until: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO circuit_breakers (target, open_until, updated_at) VALUES ($1, $2, $3)
         ON CONFLICT (target) DO UPDATE SET open_until = GREATEST(circuit_breakers.open_until, EXCLUDED.open_until),
                                            updated_at = EXCLUDED.updated_at",
    )
    .bind(target)
    .bind(open_until)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
}

/// Every circuit open at `now`, with when it closes.
pub async fn open_now(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
) -> Result<Vec<(String, DateTime<Utc>)>, sqlx::Error> {
    sqlx::query_as("SELECT target, open_until FROM circuit_breakers WHERE open_until > $1")
        .bind(now)
        .fetch_all(conn)
        .await
}
