//! The `budget_periods` and `budget_reservations` tables: atomic reservation against hard caps,
//! settlement in the finalize transaction, and release of expired reservations.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// One budget a call must reserve on.
#[derive(Debug, Clone)]
pub struct Ask<'a> {
    pub budget: &'a str,
    pub period_start: DateTime<Utc>,
    pub cap: Decimal,
    pub hard: bool,
}

/// A budget that could not cover a reservation, with its figures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub budget: String,
    pub cap: Decimal,
    pub spent: Decimal,
    pub reserved: Decimal,
    pub period_start: DateTime<Utc>,
}

/// Reserves `amount` on every budget of `asks` in one transaction (all or none). Budgets are
/// locked in name order, so concurrent reservations cannot deadlock.
pub async fn reserve(
    pool: &PgPool,
    asks: &[Ask<'_>],
    amount: Decimal,
    ids: &[Uuid],
    expires_at: DateTime<Utc>,
) -> Result<Result<(), Refusal>, sqlx::Error> {
    // The common case, one budget whose period row exists and has room, is one statement: the
    // shared row stays locked only while it runs and commits, not over five round trips.
    if let ([ask], [id]) = (asks, ids) {
        let granted: Option<Uuid> = sqlx::query_scalar(
            "WITH granted AS (
                 UPDATE budget_periods SET reserved = reserved + $3
                 WHERE budget = $1 AND period_start = $2 AND (NOT $4 OR spent + reserved + $3 <= $5)
                 RETURNING budget, period_start)
             INSERT INTO budget_reservations (id, budget, period_start, amount, expires_at)
             SELECT $6, budget, period_start, $3, $7 FROM granted
             RETURNING id",
        )
        .bind(ask.budget)
        .bind(ask.period_start)
        .bind(amount)
        .bind(ask.hard)
        .bind(ask.cap)
        .bind(id)
        .bind(expires_at)
        .fetch_optional(pool)
        .await?;
        if granted.is_some() {
            return Ok(Ok(()));
        }
        // No row yet, or no room: the transaction below creates the row or names the refusal.
    }
    let mut tx = pool.begin().await?;
    for (ask, id) in asks.iter().zip(ids) {
        sqlx::query(
            "INSERT INTO budget_periods (budget, period_start, cap) VALUES ($1, $2, $3)
             ON CONFLICT (budget, period_start) DO NOTHING",
        )
        .bind(ask.budget)
        .bind(ask.period_start)
        .bind(ask.cap)
        .execute(&mut *tx)
        .await?;
        let granted: Option<Decimal> = sqlx::query_scalar(
            "UPDATE budget_periods SET reserved = reserved + $3
             WHERE budget = $1 AND period_start = $2 AND (NOT $4 OR spent + reserved + $3 <= $5)
             RETURNING reserved",
        )
        .bind(ask.budget)
        .bind(ask.period_start)
        .bind(amount)
        .bind(ask.hard)
        .bind(ask.cap)
        .fetch_optional(&mut *tx)
        .await?;
        if granted.is_none() {
            let (spent, reserved): (Decimal, Decimal) =
                sqlx::query_as("SELECT spent, reserved FROM budget_periods WHERE budget = $1 AND period_start = $2")
                    .bind(ask.budget)
                    .bind(ask.period_start)
                    .fetch_one(&mut *tx)
                    .await?;
            tx.rollback().await?;
            return Ok(Err(Refusal {
                budget: ask.budget.to_owned(),
                cap: ask.cap,
                spent,
                reserved,
                period_start: ask.period_start,
            }));
        }
        sqlx::query(
            "INSERT INTO budget_reservations (id, budget, period_start, amount, expires_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(ask.budget)
        .bind(ask.period_start)
        .bind(amount)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(Ok(()))
}

/// One call's reservation in a group on a single hard budget (see [`reserve_group`]).
#[derive(Debug, Clone, Copy)]
pub struct GroupAsk {
    pub id: Uuid,
    pub amount: Decimal,
    pub expires_at: DateTime<Utc>,
}

/// Reserves, on one hard budget's period row, every ask of `asks` that still fits in the cap,
/// in order: the row is locked once for the whole group (instead of once per call), the asks
/// that fit are added to `reserved` together and their reservation rows inserted with one
/// statement. Returns the ids granted. An ask that does not fit, or every ask when the period
/// row does not exist yet, is not granted here: the caller reserves it alone with [`reserve`],
/// which creates the row or names the refusal.
///
/// The usual case, room for the whole group, is that one statement alone: the shared row is
/// locked only while it runs and commits. Otherwise the row is read under a lock and the asks
/// that fit are chosen one by one.
pub async fn reserve_group(
    pool: &PgPool,
    budget: &str,
    period_start: DateTime<Utc>,
    cap: Decimal,
    asks: &[GroupAsk],
) -> Result<Vec<Uuid>, sqlx::Error> {
    let all: Vec<&GroupAsk> = asks.iter().collect();
    if all.is_empty() || hold(pool, budget, period_start, cap, &all).await? {
        return Ok(all.iter().map(|ask| ask.id).collect());
    }
    let mut tx = pool.begin().await?;
    let row: Option<(Decimal, Decimal)> = sqlx::query_as(
        "SELECT spent, reserved FROM budget_periods WHERE budget = $1 AND period_start = $2 FOR UPDATE",
    )
    .bind(budget)
    .bind(period_start)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((spent, reserved)) = row else {
        return Ok(Vec::new());
    };
    let mut room = cap - spent - reserved;
    let granted: Vec<&GroupAsk> = asks
        .iter()
        .filter(|ask| {
            let fits = ask.amount <= room;
            if fits {
                room -= ask.amount;
            }
            fits
        })
        .collect();
    if granted.is_empty() || !hold(&mut *tx, budget, period_start, cap, &granted).await? {
        return Ok(Vec::new());
    }
    tx.commit().await?;
    Ok(granted.iter().map(|ask| ask.id).collect())
}

/// Adds the asks' total to the period's `reserved` and inserts their reservation rows, in one
/// statement, only if the total fits under `cap` on the row as locked; whether it did.
async fn hold(
    conn: impl sqlx::PgExecutor<'_>,
    budget: &str,
    period_start: DateTime<Utc>,
    cap: Decimal,
    asks: &[&GroupAsk],
) -> Result<bool, sqlx::Error> {
    let total: Decimal = asks.iter().map(|ask| ask.amount).sum();
    let inserted = sqlx::query(
        "WITH held AS (
             UPDATE budget_periods SET reserved = reserved + $3
             WHERE budget = $1 AND period_start = $2 AND spent + reserved + $3 <= $4
             RETURNING budget, period_start)
         INSERT INTO budget_reservations (id, budget, period_start, amount, expires_at)
         SELECT a.id, held.budget, held.period_start, a.amount, a.expires_at
         FROM held, UNNEST($5::uuid[], $6::numeric[], $7::timestamptz[]) AS a(id, amount, expires_at)",
    )
    .bind(budget)
    .bind(period_start)
    .bind(total)
    .bind(cap)
    .bind(asks.iter().map(|ask| ask.id).collect::<Vec<_>>())
    .bind(asks.iter().map(|ask| ask.amount).collect::<Vec<_>>())
    .bind(asks.iter().map(|ask| ask.expires_at).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(inserted.rows_affected() > 0)
}

/// What one call actually cost on one budget, and the reservation it releases (soft budgets
/// hold none).
#[derive(Debug, Clone)]
pub struct Settlement {
    pub reservation: Option<Uuid>,
    pub budget: String,
    pub period_start: DateTime<Utc>,
    pub cap: Decimal,
    pub actual: Decimal,
}

/// Adds each call's actual cost to its budgets' `spent` and releases its reservation — unless
/// it already expired, in which case only `spent` grows — in ONE statement (inside the
/// recorder's, a direct ledger write's or the finalize transaction). A period row a soft
/// budget has not made yet is created. It deletes the reservations first, then locks the
/// shared period rows in name order (the `ORDER BY` of the upsert's rows), as `reserve` locks
/// them and `release_expired` takes both, and holds them only from this statement to the
/// commit.
pub async fn settle(
    conn: &mut PgConnection,
    settlements: &[Settlement],
) -> Result<(), sqlx::Error> {
    if settlements.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = settlements.iter().filter_map(|s| s.reservation).collect();
    // `reserved` of an upserted row carries minus what the deleted reservations held; a period
    // with a reservation always has its row, so a new row is inserted with nothing to release.
    sqlx::query(
        "WITH gone AS (DELETE FROM budget_reservations WHERE id = ANY($5) RETURNING budget, period_start, amount),
              held AS (SELECT budget, period_start, sum(amount) AS amount FROM gone GROUP BY budget, period_start),
              spent AS (SELECT budget, period_start, max(cap) AS cap, sum(actual) AS actual
                        FROM UNNEST($1::text[], $2::timestamptz[], $3::numeric[], $4::numeric[])
                             AS t(budget, period_start, cap, actual)
                        GROUP BY budget, period_start)
         INSERT INTO budget_periods AS p (budget, period_start, cap, spent, reserved)
         SELECT s.budget, s.period_start, s.cap, s.actual, -coalesce(h.amount, 0)
         FROM spent s LEFT JOIN held h USING (budget, period_start)
         ORDER BY s.budget, s.period_start
         ON CONFLICT (budget, period_start) DO UPDATE
         SET spent = p.spent + excluded.spent, reserved = p.reserved + excluded.reserved",
    )
    .bind(settlements.iter().map(|s| s.budget.as_str()).collect::<Vec<_>>())
    .bind(settlements.iter().map(|s| s.period_start).collect::<Vec<_>>())
    .bind(settlements.iter().map(|s| s.cap).collect::<Vec<_>>())
    .bind(settlements.iter().map(|s| s.actual).collect::<Vec<_>>())
    .bind(&ids)
    .execute(conn)
    .await?;
    Ok(())
}

/// Raises the announced alert level of a budget period to the highest of `levels` (in
/// percent, ascending) its spending has reached; returns each newly reached level with the
/// period's `(spent, cap)`.
///
/// The row is first read without a lock: `spent` and `alerted` only grow, and every settlement
/// is committed before (or in the same transaction as) a check of its budget, so a reading
/// with no new level means none was crossed that a later check will not see. Only when a level
/// looks reached is the row read again under a lock, so every level is judged on the same
/// `spent` (judging each level in its own statement let a settlement committed between two
/// statements skip the lower levels) and announced once. Every finalize group checks the
/// budgets it touched, so the usual check takes no lock on the row all workers share.
pub async fn mark_alerts(
    conn: &mut PgConnection,
    budget: &str,
    period_start: DateTime<Utc>,
    levels: &[i32],
) -> Result<Vec<(i32, Decimal, Decimal)>, sqlx::Error> {
    if levels.is_empty() {
        return Ok(Vec::new());
    }
    let row = alert_figures(conn, budget, period_start, false).await?;
    if row.is_none_or(|row| reached(levels, row).is_empty()) {
        return Ok(Vec::new());
    }
    let row = alert_figures(conn, budget, period_start, true).await?;
    let reached = row.map(|row| reached(levels, row)).unwrap_or_default();
    if let Some(&(highest, _, _)) = reached.last() {
        sqlx::query(
            "UPDATE budget_periods SET alerted = $3 WHERE budget = $1 AND period_start = $2",
        )
        .bind(budget)
        .bind(period_start)
        .bind(highest)
        .execute(conn)
        .await?;
    }
    Ok(reached)
}

/// `(spent, cap, alerted)` of a budget period, read under a lock when `lock`.
async fn alert_figures(
    conn: &mut PgConnection,
    budget: &str,
    period_start: DateTime<Utc>,
    lock: bool,
) -> Result<Option<(Decimal, Decimal, i32)>, sqlx::Error> {
    let sql = if lock {
        "SELECT spent, cap, alerted FROM budget_periods WHERE budget = $1 AND period_start = $2 FOR UPDATE"
    } else {
        "SELECT spent, cap, alerted FROM budget_periods WHERE budget = $1 AND period_start = $2"
    };
    sqlx::query_as(sql)
        .bind(budget)
        .bind(period_start)
        .fetch_optional(conn)
        .await
}

/// The levels of `levels` above `alerted` that `spent` has reached, each with `(spent, cap)`.
fn reached(
    levels: &[i32],
    (spent, cap, alerted): (Decimal, Decimal, i32),
) -> Vec<(i32, Decimal, Decimal)> {
    levels
        .iter()
        .filter(|&&level| {
            level > alerted && spent * Decimal::from(100) >= cap * Decimal::from(level)
        })
        .map(|&level| (level, spent, cap))
        .collect()
}

/// Releases reservations that expired before `now` (their workers died); returns how many.
///
/// Locks are taken in the order `settle` takes them: the reservations first (`settle`
/// deletes them), then their period rows in name order (`settle`'s ordered upsert), so a sweep
/// and a settlement of a reservation that just expired cannot deadlock. A reservation a
/// settlement holds right now is skipped: that settlement releases it.
pub async fn release_expired(pool: &PgPool, now: DateTime<Utc>) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let expired: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM budget_reservations WHERE expires_at < $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(now)
    .fetch_all(&mut *tx)
    .await?;
    if expired.is_empty() {
        tx.rollback().await?;
        return Ok(0);
    }
    sqlx::query(
        "SELECT 1 FROM budget_periods p
         WHERE (p.budget, p.period_start) IN (SELECT budget, period_start FROM budget_reservations WHERE id = ANY($1))
         ORDER BY p.budget, p.period_start FOR UPDATE OF p",
    )
    .bind(&expired)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "WITH gone AS (DELETE FROM budget_reservations WHERE id = ANY($1) RETURNING budget, period_start, amount),
              held AS (SELECT budget, period_start, sum(amount) AS amount FROM gone GROUP BY budget, period_start)
         UPDATE budget_periods p SET reserved = p.reserved - held.amount
         FROM held WHERE p.budget = held.budget AND p.period_start = held.period_start",
    )
    .bind(&expired)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(u64::try_from(expired.len()).unwrap_or(u64::MAX))
}
