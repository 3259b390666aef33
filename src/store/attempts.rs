//! The `attempts` table: one row per provider call.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::messages::{AttemptStatus, Usage};

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

/// Inserts many attempts in one statement.
pub async fn insert_many(conn: &mut PgConnection, rows: &[&AttemptRow]) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO attempts (id, job_id, generation, n, provider, model, key_id, started_at, ended_at,
                               outcome, error_class, http_status, error, latency_ms, input_tokens,
                               cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens)
         SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::int4[], $4::int4[], $5::text[], $6::text[],
                              $7::text[], $8::timestamptz[], $9::timestamptz[], $10::text[], $11::text[],
                              $12::int4[], $13::text[], $14::int8[], $15::int8[], $16::int8[], $17::int8[],
                              $18::int8[], $19::int8[])",
    )
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
    .bind(rows.iter().map(|r| r.error_class.as_deref()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.http_status).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.error.as_deref()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.latency_ms).collect::<Vec<_>>())
    .bind(tokens(rows, |u| u.input_tokens))
    .bind(tokens(rows, |u| u.cached_input_tokens))
    .bind(tokens(rows, |u| u.cache_write_tokens))
    .bind(tokens(rows, |u| u.output_tokens))
    .bind(tokens(rows, |u| u.reasoning_tokens))
    .execute(conn)
    .await?;
    Ok(())
}
