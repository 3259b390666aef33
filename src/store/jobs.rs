//! The `jobs` table: one row per job id, written by finalize.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::messages::JobStatus;

/// A job as recorded at finalize.
#[derive(Debug, Clone)]
pub struct JobRow {
    pub id: Uuid,
    pub tenant: Option<String>,
    pub batch: Option<String>,
    pub route: Option<String>,
    pub generation: i32,
    pub status: JobStatus,
    pub request: Option<Value>,
    /// SHA-256 of the request when the tenant's retention is `hash` (then `request` is None).
    pub request_sha256: Option<String>,
    pub raw_body: Option<Vec<u8>>,
    pub received_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
}

/// Inserts many jobs in one statement; a job id already present is left as it is.
pub async fn insert_many(conn: &mut PgConnection, rows: &[JobRow]) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO jobs (id, tenant, batch, route, generation, status, request, raw_body, received_at, finished_at,
                           request_sha256)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::text[],
                              $7::jsonb[], $8::bytea[], $9::timestamptz[], $10::timestamptz[], $11::text[])
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(rows.iter().map(|r| r.id).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.tenant.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.batch.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.route.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.generation).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.status.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.request.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.raw_body.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.received_at).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.finished_at).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.request_sha256.clone()).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}
