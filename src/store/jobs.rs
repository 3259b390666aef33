//! The `jobs` table: one row per job id, written by finalize.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use serde_json::Value;
use serde_json::value::RawValue;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::messages::JobStatus;
use crate::store::PgQuery;

/// A job as recorded at finalize.
#[derive(Debug, Clone)]
pub struct JobRow {
    pub id: Uuid,
    pub tenant: Option<String>,
    pub batch: Option<String>,
    pub route: Option<String>,
    pub generation: i32,
    pub status: JobStatus,
    /// The request as JSON text (serialized once at finalize).
    pub request: Option<Box<RawValue>>,
    /// SHA-256 of the request when the tenant's retention is `hash` (then `request` is None).
    pub request_sha256: Option<String>,
    pub raw_body: Option<Vec<u8>>,
    pub received_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
}

/// The columns of a `jobs` row as bound, in order, with their Postgres types.
const COLUMNS: &str = "id, tenant, batch, route, generation, status, request, raw_body, received_at, finished_at, request_sha256";
/// How many arguments [`bind`] adds.
pub const COLUMN_COUNT: usize = TYPES.len();

const TYPES: [&str; 11] = [
    "uuid",
    "text",
    "text",
    "text",
    "int4",
    "text",
    // The request's text, bound as text and kept as it is (`json`, not parsed into `jsonb`).
    "json",
    "bytea",
    "timestamptz",
    "timestamptz",
    "text",
];

/// The upsert of [`insert_many`], its arguments numbered from `$first` (as [`bind`] adds them).
/// A job id already present is left as it is, unless the new row is a newer generation (a
/// replay) or replaces a `cancelled` placeholder (the job was already running when its batch
/// was cancelled).
pub fn upsert_sql(first: usize) -> String {
    format!(
        "INSERT INTO jobs ({COLUMNS})
         SELECT * FROM UNNEST({})
         ON CONFLICT (id) DO UPDATE SET
             generation = EXCLUDED.generation, status = EXCLUDED.status, route = EXCLUDED.route,
             request = COALESCE(EXCLUDED.request, jobs.request),
             request_sha256 = COALESCE(EXCLUDED.request_sha256, jobs.request_sha256),
             finished_at = EXCLUDED.finished_at
         WHERE EXCLUDED.generation > jobs.generation
            OR (jobs.status = 'cancelled' AND EXCLUDED.status <> 'cancelled')",
        crate::store::unnest_arguments(first, &TYPES)
    )
}

/// The rows an upsert may hold: the first copy of each job id, in key order.
///
/// Two copies of one job in a group would make the upsert touch a row twice (an error). Key
/// order makes two groups holding copies of the same jobs (two lanes, or two workers, given
/// redelivered duplicates) take the rows' locks in the same order: one waits for the other
/// instead of both deadlocking and going back to the queue.
pub fn upsertable<'r>(rows: &[&'r JobRow]) -> Vec<&'r JobRow> {
    let mut seen = std::collections::HashSet::with_capacity(rows.len());
    let mut rows: Vec<&JobRow> = rows.iter().copied().filter(|r| seen.insert(r.id)).collect();
    rows.sort_unstable_by_key(|r| r.id);
    rows
}

/// Adds the [`upsertable`] rows' columns to `query`, one array each, in [`upsert_sql`]'s order.
pub fn bind<'q>(query: PgQuery<'q>, rows: &[&JobRow]) -> PgQuery<'q> {
    query
        .bind(rows.iter().map(|r| r.id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.tenant.as_deref()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.batch.as_deref()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.route.as_deref()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.generation).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.status.as_str()).collect::<Vec<_>>())
        .bind(
            rows.iter()
                .map(|r| r.request.as_deref().map(RawValue::get))
                .collect::<Vec<_>>(),
        )
        .bind(
            rows.iter()
                .map(|r| r.raw_body.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(rows.iter().map(|r| r.received_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.finished_at).collect::<Vec<_>>())
        .bind(
            rows.iter()
                .map(|r| r.request_sha256.as_deref())
                .collect::<Vec<_>>(),
        )
}

/// Upserts many jobs in one statement (see [`upsert_sql`]).
pub async fn insert_many(conn: &mut PgConnection, rows: &[&JobRow]) -> Result<(), sqlx::Error> {
    static SQL: LazyLock<String> = LazyLock::new(|| upsert_sql(1));
    let rows = upsertable(rows);
    if rows.is_empty() {
        return Ok(());
    }
    bind(sqlx::query(SQL.as_str()), &rows).execute(conn).await?;
    Ok(())
}

/// A stored job with its latest result, as `replay` selects it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Replayable {
    pub id: Uuid,
    pub tenant: Option<String>,
    pub batch: Option<String>,
    pub route: Option<String>,
    /// NULL when not retained (retention policy) or never readable (rejected).
    pub request: Option<Value>,
    /// The original body of a rejected message (truncated), which may still be a valid job.
    pub raw_body: Option<Vec<u8>>,
    pub generation: i32,
    pub status: String,
    pub error_code: Option<String>,
    pub metadata: Option<Value>,
    pub finished_at: DateTime<Utc>,
}

/// What `replay` selects; every field narrows the selection, and the tenant always does.
#[derive(Debug, Clone, Default)]
pub struct ReplayFilter {
    pub tenant: String,
    pub batch: Option<String>,
    /// Latest result status; empty means any.
    pub statuses: Vec<String>,
    /// A result's error code or any of its attempts' error class.
    pub error_class: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Empty means any.
    pub ids: Vec<Uuid>,
}

/// The tenant's jobs matching `filter`, each with its latest result, oldest first.
pub async fn select_for_replay(
    conn: &mut PgConnection,
    filter: &ReplayFilter,
) -> Result<Vec<Replayable>, sqlx::Error> {
    sqlx::query_as(
        "SELECT j.id, j.tenant, j.batch, j.route, j.request, j.raw_body, r.generation, r.status,
                r.error_code, r.body->'metadata' AS metadata, r.created_at AS finished_at
         FROM jobs j
         JOIN LATERAL (SELECT generation, status, error_code, body, created_at FROM results
                       WHERE job_id = j.id ORDER BY generation DESC LIMIT 1) r ON true
         WHERE j.tenant = $1
           AND ($2::text IS NULL OR j.batch = $2)
           AND (cardinality($3::text[]) = 0 OR r.status = ANY($3))
           AND ($4::text IS NULL OR r.error_code = $4
                OR EXISTS (SELECT 1 FROM attempts a
                           WHERE a.job_id = j.id AND a.generation = r.generation AND a.error_class = $4))
           AND ($5::timestamptz IS NULL OR r.created_at >= $5)
           AND ($6::timestamptz IS NULL OR r.created_at < $6)
           AND (cardinality($7::uuid[]) = 0 OR j.id = ANY($7))
         ORDER BY j.id",
    )
    .bind(&filter.tenant)
    .bind(&filter.batch)
    .bind(&filter.statuses)
    .bind(&filter.error_class)
    .bind(filter.since)
    .bind(filter.until)
    .bind(&filter.ids)
    .fetch_all(conn)
    .await
}
