//! A finalize group's writes in fewer statements. [`insert`] writes its jobs, attempts, results
//! and ledger rows (one round trip instead of four); [`write_outbox_then_lock_heads`] writes
//! its outbox row and then locks its tenants' audit chain heads (one instead of two). Each
//! table's SQL is its own module's, its arguments numbered after the ones before it;
//! data-modifying `WITH` parts all run, whether or not the statement's final part reads them.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::messages::{CostEvent, ResultHead};
use crate::store::outbox::OutboxRow;
use crate::store::{attempts, audit, cost_ledger, jobs, outbox, results};

use attempts::AttemptRow;
use jobs::JobRow;

/// What one group writes.
pub struct Records<'a> {
    pub jobs: &'a [&'a JobRow],
    pub attempts: &'a [&'a AttemptRow],
    /// Each result with its JSON body, as [`results::insert_many`] takes them.
    pub results: &'a [(&'a ResultHead, &'a str)],
    /// Ledger rows, each `(attempt_id, event)`.
    pub costs: &'a [(Uuid, &'a CostEvent)],
}

/// The statement: the results insert last (its arguments `$1`–`$8` come first), so it returns
/// the job ids it inserted.
static SQL: LazyLock<String> = LazyLock::new(|| {
    let jobs_at = 9;
    let attempts_at = jobs_at + jobs::COLUMN_COUNT;
    let costs_at = attempts_at + attempts::COLUMN_COUNT;
    format!(
        "WITH jobs_written AS ({}), attempts_written AS ({}), costs_written AS ({})\n{}",
        jobs::upsert_sql(jobs_at),
        attempts::insert_sql(attempts_at),
        cost_ledger::insert_sql(costs_at),
        results::INSERT_SQL,
    )
});

/// Writes the group's records in one statement and returns the job ids whose result it
/// inserted: a job whose result already exists (a duplicate processed concurrently) is not
/// among them, as with [`results::insert_many`].
pub async fn insert(
    conn: &mut PgConnection,
    records: &Records<'_>,
    created_at: DateTime<Utc>,
) -> Result<Vec<Uuid>, sqlx::Error> {
    let results = results::insertable(records.results);
    let query = results::bind(sqlx::query(SQL.as_str()), &results, created_at);
    let query = jobs::bind(query, &jobs::upsertable(records.jobs));
    let query = attempts::bind(query, records.attempts);
    let query = cost_ledger::bind(query, records.costs);
    results::inserted_ids(query, conn).await
}

/// The outbox's parts, then the lock of the chain heads once they have run.
static LOCK_SQL: LazyLock<String> =
    LazyLock::new(|| audit::lock_sql(&outbox::parts_sql(2), outbox::PARTS_DONE));

/// Inserts the group's outbox row (deleting `published`, rows of earlier groups the broker has
/// confirmed), then locks the audit chain heads of `tenants` (see [`audit::tenants`]), in one
/// statement; returns the heads for [`audit::append_locked`]. The heads, which every lane
/// shares, are locked only after the outbox row is written.
pub async fn write_outbox_then_lock_heads(
    conn: &mut PgConnection,
    row: &OutboxRow,
    published: &[Uuid],
    tenants: &[&str],
) -> Result<audit::Heads, sqlx::Error> {
    let query = sqlx::query(LOCK_SQL.as_str()).bind(tenants);
    audit::fetch_heads(outbox::bind(query, row, published), conn).await
}
