//! The `batches` and `batch_items` tables: named batches (OpenAI Batch files, resumable
//! summarize runs) and their items, each mapped to the job that serves it. Every query is
//! scoped by tenant, except [`mark_published`], which names items by their (unique) job ids.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::types::Json;
use sqlx::{FromRow, PgConnection};
use uuid::Uuid;

use crate::messages::JobResult;

/// What produced a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchKind {
    /// `switchyard batch submit`.
    OpenAi,
    /// `switchyard summarize --batch`.
    Summarize,
}

impl BatchKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BatchKind::OpenAi => "openai",
            BatchKind::Summarize => "summarize",
        }
    }
}

/// A batch as stored.
#[derive(Debug, Clone, FromRow)]
pub struct BatchRow {
    pub tenant: String,
    pub id: String,
    pub kind: String,
    pub route: String,
    pub source: Option<String>,
    /// What shaped a summarize batch's steps (`None` for OpenAI batches).
    pub options: Option<String>,
    pub created_at: DateTime<Utc>,
    pub published_at: Option<DateTime<Utc>>,
    pub cancelled_at: Option<DateTime<Utc>>,
}

/// One item of a batch: a request line or a summarize step.
#[derive(Debug, Clone, FromRow)]
pub struct ItemRow {
    pub item_key: String,
    pub line: i32,
    pub job_id: Option<Uuid>,
    pub error: Option<String>,
    pub published: bool,
}

/// An item with its job's latest result, if it has one.
#[derive(Debug, Clone)]
pub struct ItemResult {
    pub item: ItemRow,
    pub result: Option<JobResult>,
}

/// Creates the batch unless it exists; returns the stored row either way.
pub async fn create_or_get(
    conn: &mut PgConnection,
    tenant: &str,
    id: &str,
    kind: BatchKind,
    route: &str,
    source: Option<&str>,
    options: Option<&str>,
) -> Result<BatchRow, sqlx::Error> {
    sqlx::query(
        "INSERT INTO batches (tenant, id, kind, route, source, options, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (tenant, id) DO NOTHING",
    )
    .bind(tenant)
    .bind(id)
    .bind(kind.as_str())
    .bind(route)
    .bind(source)
    .bind(options)
    .bind(Utc::now())
    .execute(&mut *conn)
    .await?;
    find(conn, tenant, id)
        .await?
        .ok_or(sqlx::Error::RowNotFound)
}

/// Keeps `options` as what shaped batch `id`'s steps, unless it already has some.
pub async fn keep_options(
    conn: &mut PgConnection,
    tenant: &str,
    id: &str,
    options: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE batches SET options = $3 WHERE tenant = $1 AND id = $2 AND options IS NULL",
    )
    .bind(tenant)
    .bind(id)
    .bind(options)
    .execute(conn)
    .await?;
    Ok(())
}

/// The batch `id` of `tenant`.
pub async fn find(
    conn: &mut PgConnection,
    tenant: &str,
    id: &str,
) -> Result<Option<BatchRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT tenant, id, kind, route, source, options, created_at, published_at, cancelled_at
         FROM batches WHERE tenant = $1 AND id = $2",
    )
    .bind(tenant)
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// Adds items; an item key already present keeps its row (and job).
pub async fn insert_items(
    conn: &mut PgConnection,
    tenant: &str,
    batch: &str,
    items: &[ItemRow],
) -> Result<(), sqlx::Error> {
    if items.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO batch_items (tenant, batch, item_key, line, job_id, error, published)
         SELECT $1, $2, * FROM UNNEST($3::text[], $4::int4[], $5::uuid[], $6::text[], $7::bool[])
         ON CONFLICT (tenant, batch, item_key) DO NOTHING",
    )
    .bind(tenant)
    .bind(batch)
    .bind(items.iter().map(|i| i.item_key.clone()).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.line).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.job_id).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.error.clone()).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.published).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

/// Points an item at a new job (a failed summarize step tried again), unpublished.
pub async fn replace_job(
    conn: &mut PgConnection,
    tenant: &str,
    batch: &str,
    item_key: &str,
    job_id: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE batch_items SET job_id = $4, published = false
         WHERE tenant = $1 AND batch = $2 AND item_key = $3",
    )
    .bind(tenant)
    .bind(batch)
    .bind(item_key)
    .bind(job_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// Marks items published by their job ids (unique across batches). The ids go through a
/// sub-select so the planner cannot see how many there are: given a list of 256 ids it
/// costed one scan of a young table below 256 probes of the `job_id` index, and with the
/// batch's tenant and id in the condition it scanned the whole batch by its primary-key
/// prefix, once per chunk, so submitting a batch took time growing with its size squared.
pub const MARK_PUBLISHED_SQL: &str = "UPDATE batch_items SET published = true
     WHERE job_id = ANY (ARRAY(SELECT UNNEST($1::uuid[])))";

/// Records that these jobs were published (confirmed by the broker).
pub async fn mark_published(conn: &mut PgConnection, job_ids: &[Uuid]) -> Result<(), sqlx::Error> {
    sqlx::query(MARK_PUBLISHED_SQL)
        .bind(job_ids)
        .execute(conn)
        .await?;
    Ok(())
}

/// Records that the batch's submitter has published every item it holds (the batch leaves
/// `validating`). Later calls keep the first time.
pub async fn mark_started(
    conn: &mut PgConnection,
    tenant: &str,
    batch: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE batches SET published_at = $3
         WHERE tenant = $1 AND id = $2 AND published_at IS NULL",
    )
    .bind(tenant)
    .bind(batch)
    .bind(Utc::now())
    .execute(conn)
    .await?;
    Ok(())
}

#[derive(FromRow)]
struct ItemResultRow {
    item_key: String,
    line: i32,
    job_id: Option<Uuid>,
    error: Option<String>,
    published: bool,
    body: Option<Json<JobResult>>,
}

impl From<ItemResultRow> for ItemResult {
    fn from(row: ItemResultRow) -> Self {
        ItemResult {
            item: ItemRow {
                item_key: row.item_key,
                line: row.line,
                job_id: row.job_id,
                error: row.error,
                published: row.published,
            },
            result: row.body.map(|Json(result)| result),
        }
    }
}

/// Items of a batch (`$items`, a `FROM` item named `i`) with their jobs' latest results.
/// The latest result is found by the `results` primary key alone and then checked for the
/// tenant: with the tenant inside the probe, a young `results` table's plan could look
/// through all of the tenant's results for every item.
macro_rules! items_with_results_sql {
    ($items:literal) => {
        concat!(
            "SELECT i.item_key, i.line, i.job_id, i.error, i.published, r.body
             FROM ",
            $items,
            "
             LEFT JOIN LATERAL (SELECT body, tenant FROM results WHERE job_id = i.job_id
                                ORDER BY generation DESC LIMIT 1) r ON r.tenant = i.tenant
             ORDER BY i.line, i.item_key"
        )
    };
}

/// [`items_by_key`]'s statement: one probe of the primary key per key in `$3`. Summarize asks
/// for up to 500 keys a round. The plain `item_key = ANY($3)` was planned as a scan of the
/// batch's whole primary-key prefix (the planner expects a young or unseen batch to hold one
/// row), testing each item against the list: 235 ms a round at 30,000 items, against 3 ms.
pub const ITEMS_BY_KEY_SQL: &str = items_with_results_sql!(
    "UNNEST($3::text[]) AS k(key)
     CROSS JOIN LATERAL (SELECT * FROM batch_items
                         WHERE tenant = $1 AND batch = $2 AND item_key = k.key LIMIT 1) i"
);

/// Every item of the batch (in line order) with its job's latest result.
pub async fn items_with_results(
    conn: &mut PgConnection,
    tenant: &str,
    batch: &str,
) -> Result<Vec<ItemResult>, sqlx::Error> {
    let rows: Vec<ItemResultRow> = sqlx::query_as(items_with_results_sql!(
        "(SELECT * FROM batch_items WHERE tenant = $1 AND batch = $2) i"
    ))
    .bind(tenant)
    .bind(batch)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(ItemResult::from).collect())
}

/// Counts of a batch's items by their job's latest status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Items with a job (valid lines).
    pub total: i64,
    /// Lines that failed validation and were never submitted.
    pub invalid: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub rejected: i64,
    pub cancelled: i64,
}

impl Counts {
    /// Valid items without a terminal result yet.
    pub fn pending(&self) -> i64 {
        self.total - self.succeeded - self.failed - self.rejected - self.cancelled
    }
}

/// Status counts, cost so far (every ledger row of the batch, replays included) and the
/// time the last result was stored.
pub async fn progress(
    conn: &mut PgConnection,
    tenant: &str,
    batch: &str,
) -> Result<(Counts, Decimal, Option<DateTime<Utc>>), sqlx::Error> {
    let rows: Vec<(Option<String>, i64, Option<DateTime<Utc>>)> = sqlx::query_as(
        "SELECT CASE WHEN i.job_id IS NULL THEN 'invalid' ELSE r.status END, count(*),
                max(r.created_at)
         FROM batch_items i
         LEFT JOIN LATERAL (SELECT status, created_at, tenant FROM results
                            WHERE job_id = i.job_id
                            ORDER BY generation DESC LIMIT 1) r ON r.tenant = i.tenant
         WHERE i.tenant = $1 AND i.batch = $2
         GROUP BY 1",
    )
    .bind(tenant)
    .bind(batch)
    .fetch_all(&mut *conn)
    .await?;
    let mut counts = Counts::default();
    let mut last = None;
    for (status, count, at) in rows {
        match status.as_deref() {
            Some("invalid") => counts.invalid += count,
            other => {
                counts.total += count;
                match other {
                    Some("succeeded") => counts.succeeded += count,
                    Some("failed") => counts.failed += count,
                    Some("rejected") => counts.rejected += count,
                    Some("cancelled") => counts.cancelled += count,
                    _ => {}
                }
            }
        }
        last = last.max(at);
    }
    let cost: Decimal = sqlx::query_scalar(BATCH_COST_SQL)
        .bind(tenant)
        .bind(batch)
        .fetch_one(conn)
        .await?;
    Ok((counts, cost, last))
}

/// What a batch has cost so far: its ledger rows, found through `cost_ledger_batch_idx`.
pub const BATCH_COST_SQL: &str =
    "SELECT COALESCE(sum(amount_usd), 0) FROM cost_ledger WHERE tenant = $1 AND batch = $2";

/// A job of the batch that has no result and no billed call yet, so cancelling it loses
/// nothing paid for.
#[derive(Debug, Clone, FromRow)]
pub struct Unstarted {
    pub job_id: Uuid,
    pub item_key: String,
}

/// Marks the batch cancelled and returns its jobs that have not started.
pub async fn cancel(
    conn: &mut PgConnection,
    tenant: &str,
    batch: &str,
) -> Result<Vec<Unstarted>, sqlx::Error> {
    sqlx::query(
        "UPDATE batches SET cancelled_at = COALESCE(cancelled_at, $3) WHERE tenant = $1 AND id = $2",
    )
    .bind(tenant)
    .bind(batch)
    .bind(Utc::now())
    .execute(&mut *conn)
    .await?;
    sqlx::query_as(
        "SELECT i.job_id, i.item_key FROM batch_items i
         WHERE i.tenant = $1 AND i.batch = $2 AND i.job_id IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM results r WHERE r.job_id = i.job_id)
           AND NOT EXISTS (SELECT 1 FROM cost_ledger c WHERE c.job_id = i.job_id)
         ORDER BY i.line",
    )
    .bind(tenant)
    .bind(batch)
    .fetch_all(conn)
    .await
}

/// The items with these keys (and their jobs' latest results), by key.
pub async fn items_by_key(
    conn: &mut PgConnection,
    tenant: &str,
    batch: &str,
    keys: &[String],
) -> Result<std::collections::HashMap<String, ItemResult>, sqlx::Error> {
    let rows: Vec<ItemResultRow> = sqlx::query_as(ITEMS_BY_KEY_SQL)
        .bind(tenant)
        .bind(batch)
        .bind(keys)
        .fetch_all(conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(|row| (row.item_key.clone(), ItemResult::from(row)))
        .collect())
}
