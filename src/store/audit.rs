//! The `audit_events` table: append-only record of what happened to each job.

use sqlx::PgConnection;
use sqlx::types::Json;

use crate::messages::AuditEvent;

/// Appends events in one statement.
pub async fn insert_many(
    conn: &mut PgConnection,
    events: &[&AuditEvent],
) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO audit_events (id, tenant, job_id, kind, at, details)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::timestamptz[], $6::jsonb[])",
    )
    .bind(events.iter().map(|e| e.event_id).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.tenant.clone()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.job_id).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.kind.clone()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.at).collect::<Vec<_>>())
    .bind(events.iter().map(|e| Json(&e.details)).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}
