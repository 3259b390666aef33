//! The `results` table: exactly one terminal result per (job, generation), holding the
//! published message so a redelivered job can be answered without calling a provider.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::messages::{JobResult, ResultHead};
use crate::store::PgQuery;

/// The insert of [`insert_many`], its arguments `$1` to `$8` (as [`bind`] adds them). A
/// `cancelled` placeholder written by `batch cancel` while the job was already running is
/// replaced by the job's real outcome, so nothing paid for is lost (by its own tenant's only:
/// job ids are global). Returns the job ids whose row it wrote.
pub const INSERT_SQL: &str =
    "INSERT INTO results (job_id, generation, tenant, batch, status, error_code, body, created_at)
     SELECT job_id, generation, tenant, batch, status, error_code, body::json, $8
     FROM UNNEST($1::uuid[], $2::int4[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[])
          AS t(job_id, generation, tenant, batch, status, error_code, body)
     ON CONFLICT (job_id, generation) DO UPDATE SET
         status = EXCLUDED.status, error_code = EXCLUDED.error_code, body = EXCLUDED.body,
         created_at = EXCLUDED.created_at
     WHERE results.status = 'cancelled' AND EXCLUDED.status <> 'cancelled'
       AND results.tenant IS NOT DISTINCT FROM EXCLUDED.tenant
     RETURNING job_id";

/// The results an insert may hold: the first copy of each (job, generation), in key order
/// (as [`crate::store::jobs::upsertable`], so overlapping groups lock in the same order).
/// Two copies of one job would make the upsert touch a row twice (an error); the second is
/// then reported as not inserted.
pub fn insertable<'r>(results: &[(&'r ResultHead, &'r str)]) -> Vec<(&'r ResultHead, &'r str)> {
    let mut seen = std::collections::HashSet::with_capacity(results.len());
    let mut results: Vec<(&ResultHead, &str)> = results
        .iter()
        .copied()
        .filter(|(r, _)| seen.insert((r.job_id, r.generation)))
        .collect();
    results.sort_unstable_by_key(|(r, _)| (r.job_id, r.generation));
    results
}

/// Adds the [`insertable`] results' columns to `query`, then `created_at`, in [`INSERT_SQL`]'s
/// order.
pub fn bind<'q>(
    query: PgQuery<'q>,
    results: &[(&ResultHead, &str)],
    created_at: DateTime<Utc>,
) -> PgQuery<'q> {
    query
        .bind(results.iter().map(|(r, _)| r.job_id).collect::<Vec<_>>())
        .bind(
            results
                .iter()
                .map(|(r, _)| r.generation)
                .collect::<Vec<_>>(),
        )
        .bind(
            results
                .iter()
                .map(|(r, _)| r.tenant.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            results
                .iter()
                .map(|(r, _)| r.batch.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            results
                .iter()
                .map(|(r, _)| r.status.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            results
                .iter()
                .map(|(r, _)| r.error.as_ref().map(|e| e.code.as_str()))
                .collect::<Vec<_>>(),
        )
        .bind(results.iter().map(|(_, body)| *body).collect::<Vec<_>>())
        .bind(created_at)
}

/// Inserts results in one statement (see [`INSERT_SQL`]) and returns the job ids that were
/// inserted; a job whose result already exists (a duplicate processed concurrently) is not
/// among them.
///
/// Each result comes with its JSON body (the message that is published), serialized once by
/// the caller for both the row and the message.
pub async fn insert_many(
    conn: &mut PgConnection,
    results: &[(&ResultHead, &str)],
    created_at: DateTime<Utc>,
) -> Result<Vec<Uuid>, sqlx::Error> {
    let results = insertable(results);
    if results.is_empty() {
        return Ok(Vec::new());
    }
    inserted_ids(bind(sqlx::query(INSERT_SQL), &results, created_at), conn).await
}

/// Runs a statement ending in [`INSERT_SQL`] and returns the job ids it inserted.
pub async fn inserted_ids(
    query: PgQuery<'_>,
    conn: &mut PgConnection,
) -> Result<Vec<Uuid>, sqlx::Error> {
    query
        .try_map(|row: PgRow| row.try_get::<Uuid, _>(0))
        .fetch_all(conn)
        .await
}

/// The latest stored result of a job, if it has one.
pub async fn find_latest(
    conn: &mut PgConnection,
    job_id: Uuid,
) -> Result<Option<JobResult>, sqlx::Error> {
    let row: Option<Json<JobResult>> = sqlx::query_scalar(
        "SELECT body FROM results WHERE job_id = $1 ORDER BY generation DESC LIMIT 1",
    )
    .bind(job_id)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|Json(result)| result))
}

/// The query of [`find_latest_many`]: for each id in `$1` that has a result, its latest one
/// (in no particular order).
///
/// One index probe per id, whatever the table's statistics say. The plainer
/// `job_id = ANY($1) … DISTINCT ON (job_id)` was planned as a sequential scan and sort of the
/// whole table for a few hundred ids (their estimated share is large while the table is young
/// or unanalyzed, and it stayed a scan after an `ANALYZE` at 60,000 rows): 6–10 ms per lookup
/// instead of about 1 ms, growing with the table.
pub const LATEST_MANY_SQL: &str = "SELECT latest.body FROM UNNEST($1::uuid[]) AS wanted(job_id)
     CROSS JOIN LATERAL (SELECT body FROM results WHERE results.job_id = wanted.job_id
                         ORDER BY generation DESC LIMIT 1) AS latest";

/// The latest stored results of several jobs (see [`LATEST_MANY_SQL`]).
pub async fn find_latest_many(
    conn: &mut PgConnection,
    job_ids: &[Uuid],
) -> Result<Vec<JobResult>, sqlx::Error> {
    if job_ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<Json<JobResult>> = sqlx::query_scalar(LATEST_MANY_SQL)
        .bind(job_ids)
        .fetch_all(conn)
        .await?;
    Ok(rows.into_iter().map(|Json(result)| result).collect())
}
