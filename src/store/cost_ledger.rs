//! The `cost_ledger` table: one row per billed attempt, exact decimal.

use sqlx::PgConnection;
use uuid::Uuid;

use crate::messages::CostEvent;

fn tokens(entries: &[(Uuid, &CostEvent)], field: impl Fn(&CostEvent) -> u64) -> Vec<i64> {
    entries
        .iter()
        .map(|(_, e)| i64::try_from(field(e)).unwrap_or(i64::MAX))
        .collect()
}

/// Inserts ledger rows, each `(attempt_id, event)`, in one statement.
pub async fn insert_many(
    conn: &mut PgConnection,
    entries: &[(Uuid, &CostEvent)],
) -> Result<(), sqlx::Error> {
    if entries.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO cost_ledger (id, job_id, attempt_id, tenant, batch, route, provider, model, key_id,
                                  input_tokens, cached_input_tokens, cache_write_tokens, output_tokens,
                                  price_input, price_cached_input, price_cache_write, price_output,
                                  amount_usd, created_at)
         SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[],
                              $7::text[], $8::text[], $9::text[], $10::int8[], $11::int8[], $12::int8[],
                              $13::int8[], $14::numeric[], $15::numeric[], $16::numeric[], $17::numeric[],
                              $18::numeric[], $19::timestamptz[])",
    )
    .bind(entries.iter().map(|(_, e)| e.event_id).collect::<Vec<_>>())
    .bind(entries.iter().map(|(_, e)| e.job_id).collect::<Vec<_>>())
    .bind(entries.iter().map(|(attempt, _)| *attempt).collect::<Vec<_>>())
    .bind(entries.iter().map(|(_, e)| e.tenant.clone()).collect::<Vec<_>>())
    .bind(entries.iter().map(|(_, e)| e.batch.clone()).collect::<Vec<_>>())
    .bind(entries.iter().map(|(_, e)| e.route.clone()).collect::<Vec<_>>())
    .bind(entries.iter().map(|(_, e)| e.provider.clone()).collect::<Vec<_>>())
    .bind(entries.iter().map(|(_, e)| e.model.clone()).collect::<Vec<_>>())
    .bind(entries.iter().map(|(_, e)| e.key_id.clone()).collect::<Vec<_>>())
    .bind(tokens(entries, |e| e.usage.input_tokens))
    .bind(tokens(entries, |e| e.usage.cached_input_tokens))
    .bind(tokens(entries, |e| e.usage.cache_write_tokens))
    .bind(tokens(entries, |e| e.usage.output_tokens))
    .bind(entries.iter().map(|(_, e)| e.prices.input).collect::<Vec<_>>())
    .bind(entries.iter().map(|(_, e)| e.prices.cached_input).collect::<Vec<_>>())
    .bind(entries.iter().map(|(_, e)| e.prices.cache_write).collect::<Vec<_>>())
    .bind(entries.iter().map(|(_, e)| e.prices.output).collect::<Vec<_>>())
    .bind(entries.iter().map(|(_, e)| e.amount_usd).collect::<Vec<_>>())
    .bind(entries.iter().map(|(_, e)| e.at).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}
