//! The `audit_events` table: append-only record of what happened to each job, hash-chained
//! per tenant (see `crate::audit`), and `audit_chain_heads`, each chain's last link.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::audit::{GENESIS, Link, row_hash, to_micros};
use crate::messages::{AuditEvent, Provenance};
use crate::store::PgQuery;

/// The chain heads a transaction holds: each tenant's last `seq` and `hash`.
pub type Heads = BTreeMap<String, (i64, String)>;

/// Appends events, chaining each tenant's in the order given. Locks the chain heads of the
/// events' tenants (in tenant order, so concurrent groups cannot deadlock) until the caller's
/// transaction ends: call it inside the finalize transaction.
pub async fn insert_many(
    conn: &mut PgConnection,
    events: &[&AuditEvent],
) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let tenants = tenants(events);
    let heads = lock_heads(conn, &tenants).await?;
    append_locked(conn, events, &tenants, heads).await
}

/// The events' tenants, sorted, each once: the order their heads are locked in.
pub fn tenants<'e>(events: &[&'e AuditEvent]) -> Vec<&'e str> {
    let mut tenants: Vec<&str> = events.iter().map(|e| e.tenant.as_str()).collect();
    tenants.sort_unstable();
    tenants.dedup();
    tenants
}

/// The statement that locks the existing heads of the tenants in `$1` (sorted), in tenant
/// order so that concurrent groups cannot deadlock, returning their links. `parts` are other
/// data-modifying `WITH` parts written by the same statement, or empty; `done` is a condition
/// that reads them, so they run before any head is locked (an uncorrelated subquery runs
/// before the scan), and the heads, which every lane shares, are held no longer than before.
pub fn lock_sql(parts: &str, done: &str) -> String {
    let with = if parts.is_empty() {
        String::new()
    } else {
        format!("WITH {parts}\n")
    };
    format!(
        "{with}SELECT tenant, seq, hash FROM audit_chain_heads WHERE tenant = ANY($1) AND {done}
         ORDER BY tenant FOR UPDATE"
    )
}

/// Runs a [`lock_sql`] statement and returns the heads it locked.
pub async fn fetch_heads(
    query: PgQuery<'_>,
    conn: &mut PgConnection,
) -> Result<Heads, sqlx::Error> {
    query
        .try_map(|row: PgRow| {
            Ok((
                row.try_get::<String, _>(0)?,
                (row.try_get::<i64, _>(1)?, row.try_get::<String, _>(2)?),
            ))
        })
        .fetch_all(conn)
        .await
        .map(|rows| rows.into_iter().collect())
}

/// Appends events to their tenants' chains, whose `heads` (of `tenants`, from [`tenants`])
/// this transaction has locked; a tenant without a head yet gets its first.
pub async fn append_locked(
    conn: &mut PgConnection,
    events: &[&AuditEvent],
    tenants: &[&str],
    mut heads: Heads,
) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    if heads.len() < tenants.len() {
        // First events of a tenant (rare): create its head, then lock every head again.
        sqlx::query(
            "INSERT INTO audit_chain_heads (tenant, seq, hash)
             SELECT tenant, 0, $2 FROM UNNEST($1::text[]) AS t(tenant) ORDER BY tenant
             ON CONFLICT (tenant) DO NOTHING",
        )
        .bind(tenants)
        .bind(GENESIS)
        .execute(&mut *conn)
        .await?;
        heads = lock_heads(conn, tenants).await?;
    }

    let n = events.len();
    let (mut seqs, mut prevs, mut hashes, mut ats) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for event in events {
        let (seq, prev) = heads
            .entry(event.tenant.clone())
            .or_insert_with(|| (0, GENESIS.to_owned()));
        let at = to_micros(event.at);
        let next = *seq + 1;
        let hash = row_hash(&Link {
            id: event.event_id,
            tenant: &event.tenant,
            seq: next,
            job_id: event.job_id,
            kind: &event.kind,
            at,
            details: &event.details,
            provenance: &event.provenance,
            prev_hash: prev,
        });
        seqs.push(next);
        prevs.push(std::mem::replace(prev, hash.clone()));
        hashes.push(hash);
        ats.push(at);
        *seq = next;
    }
    let (names, links): (Vec<String>, Vec<(i64, String)>) = heads.into_iter().unzip();
    let (head_seqs, head_hashes): (Vec<i64>, Vec<String>) = links.into_iter().unzip();
    // One statement (one round trip) appends the events and moves the heads.
    sqlx::query(
        "WITH appended AS (
             INSERT INTO audit_events (id, tenant, job_id, kind, at, details, seq, provenance, prev_hash, hash)
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::timestamptz[], $6::json[],
                                  $7::int8[], $8::json[], $9::text[], $10::text[])
             RETURNING 1
         )
         UPDATE audit_chain_heads h SET seq = u.seq, hash = u.hash
         FROM UNNEST($11::text[], $12::int8[], $13::text[]) AS u(tenant, seq, hash)
         WHERE h.tenant = u.tenant",
    )
    .bind(events.iter().map(|e| e.event_id).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.tenant.clone()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.job_id).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.kind.clone()).collect::<Vec<_>>())
    .bind(ats)
    .bind(json_texts(events.iter().map(|e| &e.details))?)
    .bind(seqs)
    .bind(json_texts(events.iter().map(|e| &e.provenance))?)
    .bind(prevs)
    .bind(hashes)
    .bind(names)
    .bind(head_seqs)
    .bind(head_hashes)
    .execute(conn)
    .await?;
    Ok(())
}

/// Values as JSON text, bound as text: the columns are `json`, kept as written rather than
/// parsed into `jsonb`.
fn json_texts<'v, T: serde::Serialize + 'v>(
    values: impl Iterator<Item = &'v T>,
) -> Result<Vec<String>, sqlx::Error> {
    values
        .map(|value| serde_json::to_string(value).map_err(|e| sqlx::Error::Encode(Box::new(e))))
        .collect()
}

/// Locks the existing heads of `tenants` (sorted) and returns their current links.
async fn lock_heads(conn: &mut PgConnection, tenants: &[&str]) -> Result<Heads, sqlx::Error> {
    static SQL: LazyLock<String> = LazyLock::new(|| lock_sql("", "true"));
    fetch_heads(sqlx::query(SQL.as_str()).bind(tenants), conn).await
}

/// One chained row as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ChainRow {
    pub id: Uuid,
    pub seq: i64,
    pub job_id: Option<Uuid>,
    pub kind: String,
    pub at: DateTime<Utc>,
    #[sqlx(json)]
    pub details: Value,
    #[sqlx(json(nullable))]
    pub provenance: Option<Provenance>,
    pub prev_hash: String,
    pub hash: String,
}

/// Every tenant with a chain (rows or a head), in name order, with its head if it has one.
pub async fn chains(
    conn: &mut PgConnection,
    tenant: Option<&str>,
) -> Result<Vec<(String, Option<(i64, String)>)>, sqlx::Error> {
    let rows: Vec<(String, Option<i64>, Option<String>)> = sqlx::query_as(
        "SELECT t.tenant, h.seq, h.hash
         FROM (SELECT DISTINCT tenant FROM audit_events WHERE seq IS NOT NULL
               UNION SELECT tenant FROM audit_chain_heads) AS t
         LEFT JOIN audit_chain_heads h ON h.tenant = t.tenant
         WHERE $1::text IS NULL OR t.tenant = $1
         ORDER BY t.tenant",
    )
    .bind(tenant)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(tenant, seq, hash)| (tenant, seq.zip(hash)))
        .collect())
}

/// The chained rows of `tenant` in chain order, streamed.
pub fn chain<'c>(
    conn: &'c mut PgConnection,
    tenant: &'c str,
) -> BoxStream<'c, Result<ChainRow, sqlx::Error>> {
    sqlx::query_as(
        "SELECT id, seq, job_id, kind, at, details, provenance,
                coalesce(prev_hash, '') AS prev_hash, coalesce(hash, '') AS hash
         FROM audit_events WHERE tenant = $1 AND seq IS NOT NULL ORDER BY seq",
    )
    .bind(tenant)
    .fetch(conn)
}

/// Rows written before chaining existed (no `seq`).
pub async fn unchained(conn: &mut PgConnection, tenant: Option<&str>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM audit_events WHERE seq IS NULL AND ($1::text IS NULL OR tenant = $1)",
    )
    .bind(tenant)
    .fetch_one(conn)
    .await
}
