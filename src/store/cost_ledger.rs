//! The `cost_ledger` table: one row per billed attempt, exact decimal.

use std::sync::LazyLock;

use sqlx::PgConnection;
use uuid::Uuid;

use crate::messages::CostEvent;
use crate::store::PgQuery;

fn tokens(entries: &[(Uuid, &CostEvent)], field: impl Fn(&CostEvent) -> u64) -> Vec<i64> {
    entries
        .iter()
        .map(|(_, e)| i64::try_from(field(e)).unwrap_or(i64::MAX))
        .collect()
}

/// How many arguments [`bind`] adds.
pub const COLUMN_COUNT: usize = TYPES.len();

const TYPES: [&str; 22] = [
    "uuid",
    "uuid",
    "uuid",
    "text",
    "text",
    "text",
    "text",
    "text",
    "text",
    "int8",
    "int8",
    "int8",
    "int8",
    "numeric",
    "numeric",
    "numeric",
    "numeric",
    "numeric",
    "timestamptz",
    "text",
    "int8",
    "numeric",
];

/// The insert of [`insert_many`], its arguments numbered from `$first` (as [`bind`] adds them).
pub fn insert_sql(first: usize) -> String {
    format!(
        "INSERT INTO cost_ledger (id, job_id, attempt_id, tenant, batch, route, provider, model, key_id,
                                  input_tokens, cached_input_tokens, cache_write_tokens, output_tokens,
                                  price_input, price_cached_input, price_cache_write, price_output,
                                  amount_usd, created_at, price_version, price_tier_above, price_per_request)
         SELECT * FROM UNNEST({})",
        crate::store::unnest_arguments(first, &TYPES)
    )
}

/// Adds the entries' columns to `query`, one array each, in [`insert_sql`]'s order.
pub fn bind<'q>(query: PgQuery<'q>, entries: &[(Uuid, &CostEvent)]) -> PgQuery<'q> {
    query
        .bind(entries.iter().map(|(_, e)| e.event_id).collect::<Vec<_>>())
        .bind(entries.iter().map(|(_, e)| e.job_id).collect::<Vec<_>>())
        .bind(
            entries
                .iter()
                .map(|(attempt, _)| *attempt)
                .collect::<Vec<_>>(),
        )
        .bind(
            entries
                .iter()
                .map(|(_, e)| e.tenant.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            entries
                .iter()
                .map(|(_, e)| e.batch.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            entries
                .iter()
                .map(|(_, e)| e.route.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            entries
                .iter()
                .map(|(_, e)| e.provider.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            entries
                .iter()
                .map(|(_, e)| e.model.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            entries
                .iter()
                .map(|(_, e)| e.key_id.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(tokens(entries, |e| e.usage.input_tokens))
        .bind(tokens(entries, |e| e.usage.cached_input_tokens))
        .bind(tokens(entries, |e| e.usage.cache_write_tokens))
        .bind(tokens(entries, |e| e.usage.output_tokens))
        .bind(
            entries
                .iter()
                .map(|(_, e)| e.prices.input)
                .collect::<Vec<_>>(),
        )
        .bind(
            entries
                .iter()
                .map(|(_, e)| e.prices.cached_input)
                .collect::<Vec<_>>(),
        )
        .bind(
            entries
                .iter()
                .map(|(_, e)| e.prices.cache_write)
                .collect::<Vec<_>>(),
        )
        .bind(
            entries
                .iter()
                .map(|(_, e)| e.prices.output)
                .collect::<Vec<_>>(),
        )
        .bind(
            entries
                .iter()
                .map(|(_, e)| e.amount_usd)
                .collect::<Vec<_>>(),
        )
        .bind(entries.iter().map(|(_, e)| e.at).collect::<Vec<_>>())
        .bind(
            entries
                .iter()
                .map(|(_, e)| e.price_version.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            entries
                .iter()
                .map(|(_, e)| {
                    e.price_tier_above
                        .map(|t| i64::try_from(t).unwrap_or(i64::MAX))
                })
                .collect::<Vec<_>>(),
        )
        .bind(
            entries
                .iter()
                .map(|(_, e)| e.prices.per_request)
                .collect::<Vec<_>>(),
        )
}

/// Inserts ledger rows, each `(attempt_id, event)`, in one statement.
pub async fn insert_many(
    conn: &mut PgConnection,
    entries: &[(Uuid, &CostEvent)],
) -> Result<(), sqlx::Error> {
    static SQL: LazyLock<String> = LazyLock::new(|| insert_sql(1));
    if entries.is_empty() {
        return Ok(());
    }
    bind(sqlx::query(SQL.as_str()), entries)
        .execute(conn)
        .await?;
    Ok(())
}

/// Commits one billed call: its ledger row and the settlement of its budget reservations, in
/// one transaction.
pub async fn record(
    pool: &sqlx::PgPool,
    attempt: Uuid,
    cost: Option<&CostEvent>,
    settlements: &[crate::store::budgets::Settlement],
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    if let Some(cost) = cost {
        insert_many(&mut tx, &[(attempt, cost)]).await?;
    }
    crate::store::budgets::settle(&mut tx, settlements).await?;
    tx.commit().await
}

/// Whether the ledger row `id` is committed. Asked after a record whose commit may have landed
/// although its answer was lost; retried briefly while Postgres is unreachable (a job waits on
/// it), and `false` when it still cannot tell.
pub async fn is_recorded(pool: &sqlx::PgPool, id: Uuid) -> bool {
    use backon::{ExponentialBuilder, Retryable};
    let ask = || {
        sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM cost_ledger WHERE id = $1)")
            .bind(id)
            .fetch_one(pool)
    };
    if crate::failpoint::is_armed(crate::failpoint::RECORD_UNVERIFIABLE) {
        return false;
    }
    ask.retry(
        ExponentialBuilder::default()
            .with_min_delay(std::time::Duration::from_millis(100))
            .with_max_delay(std::time::Duration::from_secs(1))
            .with_max_times(3)
            .with_jitter(),
    )
    .when(crate::store::is_unreachable)
    .await
    .unwrap_or(false)
}

/// The attempts whose ledger rows, of the event ids `ids`, are committed.
pub async fn recorded_attempts(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> Result<std::collections::HashSet<Uuid>, sqlx::Error> {
    let attempts: Vec<Uuid> =
        sqlx::query_scalar("SELECT attempt_id FROM cost_ledger WHERE id = ANY($1)")
            .bind(ids)
            .fetch_all(&mut *conn)
            .await?;
    Ok(attempts.into_iter().collect())
}

/// Locks the model's volume row for this month and returns the tokens used so far; with
/// [`add_volume`] in the same transaction, calls of one model take their tier in turn.
pub async fn lock_volume(
    conn: &mut PgConnection,
    provider: &str,
    model: &str,
    month: chrono::DateTime<chrono::Utc>,
) -> Result<u64, sqlx::Error> {
    sqlx::query("INSERT INTO model_volumes (provider, model, month) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
        .bind(provider)
        .bind(model)
        .bind(month)
        .execute(&mut *conn)
        .await?;
    let tokens: i64 = sqlx::query_scalar(
        "SELECT tokens FROM model_volumes WHERE provider = $1 AND model = $2 AND month = $3 FOR UPDATE",
    )
    .bind(provider)
    .bind(model)
    .bind(month)
    .fetch_one(&mut *conn)
    .await?;
    Ok(u64::try_from(tokens).unwrap_or(0))
}

/// Adds a call's tokens to the model's monthly volume.
pub async fn add_volume(
    conn: &mut PgConnection,
    provider: &str,
    model: &str,
    month: chrono::DateTime<chrono::Utc>,
    tokens: u64,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE model_volumes SET tokens = tokens + $4 WHERE provider = $1 AND model = $2 AND month = $3")
        .bind(provider)
        .bind(model)
        .bind(month)
        .bind(i64::try_from(tokens).unwrap_or(i64::MAX))
        .execute(conn)
        .await?;
    Ok(())
}

/// Like [`record`], for a model with volume tiers: the tier is chosen by the model's monthly
/// volume (locked for the transaction), the entry's prices and amount are set from it, and the
/// volume grows by the call's tokens.
pub async fn record_tiered(
    pool: &sqlx::PgPool,
    attempt: Uuid,
    cost: &mut CostEvent,
    table: &crate::budget::pricing::PriceTable,
    settlements: &mut [crate::store::budgets::Settlement],
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let month = crate::budget::period_start(crate::config::BudgetPeriod::Month, cost.at);
    let used = lock_volume(&mut tx, &cost.provider, &cost.model, month).await?;
    let applied = table.applied(cost.at, used);
    cost.amount_usd = crate::budget::pricing::cost(&cost.usage, &applied.prices);
    cost.prices = applied.prices;
    cost.price_version = applied.version;
    cost.price_tier_above = applied.tier_above;
    for settlement in settlements.iter_mut() {
        settlement.actual = cost.amount_usd;
    }
    add_volume(
        &mut tx,
        &cost.provider,
        &cost.model,
        month,
        cost.usage.input_tokens + cost.usage.output_tokens,
    )
    .await?;
    insert_many(&mut tx, &[(attempt, &*cost)]).await?;
    crate::store::budgets::settle(&mut tx, settlements).await?;
    if crate::failpoint::is_armed(crate::failpoint::RECORD_TIERED_FAILS) {
        // Dropped uncommitted: everything above rolls back.
        return Err(sqlx::Error::Protocol(format!(
            "failpoint {}",
            crate::failpoint::RECORD_TIERED_FAILS
        )));
    }
    tx.commit().await
}

/// Adds the tokens of `costs` (calls of models with volume tiers, recorded by finalize rather
/// than by [`record_tiered`]) to their models' monthly volumes, locking each volume row in
/// one order (provider, model, month) so concurrent groups cannot deadlock on them.
pub async fn add_volumes(conn: &mut PgConnection, costs: &[&CostEvent]) -> Result<(), sqlx::Error> {
    let mut volumes: std::collections::BTreeMap<(&str, &str, chrono::DateTime<chrono::Utc>), u64> =
        std::collections::BTreeMap::new();
    for cost in costs {
        let month = crate::budget::period_start(crate::config::BudgetPeriod::Month, cost.at);
        *volumes
            .entry((cost.provider.as_str(), cost.model.as_str(), month))
            .or_default() += cost.usage.input_tokens + cost.usage.output_tokens;
    }
    for ((provider, model, month), tokens) in volumes {
        sqlx::query(
            "INSERT INTO model_volumes (provider, model, month, tokens) VALUES ($1, $2, $3, $4)
             ON CONFLICT (provider, model, month) DO UPDATE SET tokens = model_volumes.tokens + EXCLUDED.tokens",
        )
        .bind(provider)
        .bind(model)
        .bind(month)
        .bind(i64::try_from(tokens).unwrap_or(i64::MAX))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// A dimension costs can be grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Dimension {
    Tenant,
    Provider,
    Model,
    Batch,
    Route,
    Key,
}

impl Dimension {
    /// The ledger column (a fixed identifier, never user text).
    pub fn column(self) -> &'static str {
        match self {
            Dimension::Tenant => "tenant",
            Dimension::Provider => "provider",
            Dimension::Model => "model",
            Dimension::Batch => "batch",
            Dimension::Route => "route",
            Dimension::Key => "key_id",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dimension::Key => "key_id",
            other => other.column(),
        }
    }
}

/// One group of a cost report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportRow {
    /// Values of the grouping dimensions, in order (`None` for a missing batch or key).
    pub keys: Vec<Option<String>>,
    pub attempts: i64,
    pub input_tokens: i64,
    pub cached_input_tokens: i64,
    pub cache_write_tokens: i64,
    pub output_tokens: i64,
    pub amount_usd: rust_decimal::Decimal,
}

/// Ledger totals for `[since, until)`, grouped by `by` (all rows in one group when empty).
pub async fn report(
    conn: &mut PgConnection,
    since: chrono::DateTime<chrono::Utc>,
    until: chrono::DateTime<chrono::Utc>,
    by: &[Dimension],
    tenant: Option<&str>,
) -> Result<Vec<ReportRow>, sqlx::Error> {
    use sqlx::Row;
    let mut query = sqlx::QueryBuilder::<sqlx::Postgres>::new("SELECT ");
    for dimension in by {
        query.push(dimension.column()).push("::text, ");
    }
    query.push(
        "count(*)::int8, coalesce(sum(input_tokens), 0)::int8, coalesce(sum(cached_input_tokens), 0)::int8,
         coalesce(sum(cache_write_tokens), 0)::int8, coalesce(sum(output_tokens), 0)::int8,
         coalesce(sum(amount_usd), 0) FROM cost_ledger WHERE created_at >= ",
    );
    query
        .push_bind(since)
        .push(" AND created_at < ")
        .push_bind(until);
    // A report for one tenant is scoped in SQL, never filtered afterwards.
    if let Some(tenant) = tenant {
        query.push(" AND tenant = ").push_bind(tenant.to_owned());
    }
    if !by.is_empty() {
        let columns: Vec<&str> = by.iter().map(|d| d.column()).collect();
        query.push(" GROUP BY ").push(columns.join(", "));
        query.push(" ORDER BY ").push(columns.join(", "));
    }
    let rows = query.build().fetch_all(conn).await?;
    let n = by.len();
    rows.iter()
        .map(|row| {
            Ok(ReportRow {
                keys: (0..n)
                    .map(|i| row.try_get::<Option<String>, _>(i))
                    .collect::<Result<_, _>>()?,
                attempts: row.try_get(n)?,
                input_tokens: row.try_get(n + 1)?,
                cached_input_tokens: row.try_get(n + 2)?,
                cache_write_tokens: row.try_get(n + 3)?,
                output_tokens: row.try_get(n + 4)?,
                amount_usd: row.try_get(n + 5)?,
            })
        })
        .collect()
}
