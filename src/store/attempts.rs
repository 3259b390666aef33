//! The `attempts` table: one row per provider call.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::messages::{AttemptStatus, Usage};
use crate::store::PgQuery;

/// One provider call as recorded.
#[derive(Debug, Clone)]
pub struct AttemptRow {
    pub id: Uuid,
    pub job_id: Uuid,
    pub generation: i32,
    pub n: i32,
    pub provider: String,
    pub model: String,
    pub key_id: Option<String>,
    pub started_at: DateTime<Utc>,
    pub ended_at: DateTime<Utc>,
    pub outcome: AttemptStatus,
    pub error_class: Option<String>,
    pub http_status: Option<i32>,
    pub error: Option<String>,
    pub latency_ms: i64,
    pub usage: Option<Usage>,
}

fn tokens(rows: &[&AttemptRow], field: impl Fn(&Usage) -> u64) -> Vec<Option<i64>> {
    rows.iter()
        .map(|r| {
            r.usage
                .as_ref()
                .map(|u| i64::try_from(field(u)).unwrap_or(i64::MAX))
        })
        .collect()
}

/// How many arguments [`bind`] adds.
pub const COLUMN_COUNT: usize = TYPES.len();

const TYPES: [&str; 19] = [
    "uuid",
    "uuid",
    "int4",
    "int4",
    "text",
    "text",
    "text",
    "timestamptz",
    "timestamptz",
    "text",
    "text",
    "int4",
    "text",
    "int8",
    "int8",
    "int8",
    "int8",
    "int8",
    "int8",
];

/// The insert of [`insert_many`], its arguments numbered from `$first` (as [`bind`] adds them).
pub fn insert_sql(first: usize) -> String {
    format!(
        "INSERT INTO attempts (id, job_id, generation, n, provider, model, key_id, started_at, ended_at,
                               outcome, error_class, http_status, error, latency_ms, input_tokens,
                               cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens)
         SELECT * FROM UNNEST({})",
        crate::store::unnest_arguments(first, &TYPES)
    )
}

/// Adds the rows' columns to `query`, one array each, in [`insert_sql`]'s order.
pub fn bind<'q>(query: PgQuery<'q>, rows: &[&AttemptRow]) -> PgQuery<'q> {
    query
        .bind(rows.iter().map(|r| r.id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.job_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.generation).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.n).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.provider.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.model.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.key_id.as_deref()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.started_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.ended_at).collect::<Vec<_>>())
        .bind(
            rows.iter()
                .map(|r| match r.outcome {
                    AttemptStatus::Succeeded => "succeeded",
                    AttemptStatus::Failed => "failed",
                })
                .collect::<Vec<_>>(),
        )
        .bind(
            rows.iter()
                .map(|r| r.error_class.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(rows.iter().map(|r| r.http_status).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.error.as_deref()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.latency_ms).collect::<Vec<_>>())
        .bind(tokens(rows, |u| u.input_tokens))
        .bind(tokens(rows, |u| u.cached_input_tokens))
        .bind(tokens(rows, |u| u.cache_write_tokens))
        .bind(tokens(rows, |u| u.output_tokens))
        .bind(tokens(rows, |u| u.reasoning_tokens))
}

/// Inserts many attempts in one statement.
pub async fn insert_many(conn: &mut PgConnection, rows: &[&AttemptRow]) -> Result<(), sqlx::Error> {
    static SQL: LazyLock<String> = LazyLock::new(|| insert_sql(1));
    if rows.is_empty() {
        return Ok(());
    }
    bind(sqlx::query(SQL.as_str()), rows).execute(conn).await?;
    Ok(())
}
