//! Budgets are never overshot, however many workers run at once: reservations before the call,
//! settlement in the finalize transaction, reroute on a provider budget, expiry of a dead
//! worker's reservations, soft alerts once per period, and a per-job cap.

use std::time::Duration;

use rust_decimal::Decimal;
use switchyard::messages::JobStatus;

use crate::helpers::{
    FakeProvider, TestApp, job, spawn_app_with, wait_all, worker_with_env, workers,
};

/// A provider at `url` whose calls cost about $0.01 each with the fake's usage.
fn provider(name: &str, url: &str) -> String {
    format!(
        r#"
[[providers]]
name = "{name}"
kind = "openai"
base_url = "{url}/v1"
timeout_secs = 5
keys = [{{ id = "{name}-key", env = "CARGO_MANIFEST_DIR" }}]
models = [{{ name = "m", prices = {{ input = "300", output = "1000" }} }}]
"#
    )
}

/// Provider `p` (OpenAI kind) at `url`, key `k`, without models: a test adds its own
/// `[[providers.models]]` tables after it.
fn provider_p(url: &str) -> String {
    format!(
        r#"
[[providers]]
name = "p"
kind = "openai"
base_url = "{url}/v1"
keys = [{{ id = "k", env = "CARGO_MANIFEST_DIR" }}]
"#
    )
}

/// Each of `jobs` jobs reached the provider once, succeeded, and has one ledger row.
async fn each_job_ran_and_was_billed_once(app: &TestApp, fake: &FakeProvider, jobs: i64) {
    assert_eq!(
        fake.requests().await,
        u64::try_from(jobs).unwrap(),
        "each job reached the provider once"
    );
    let succeeded = count(
        app,
        "SELECT count(*) FROM results WHERE status = 'succeeded'",
    )
    .await;
    assert_eq!(succeeded, jobs);
    assert_eq!(count(app, "SELECT count(*) FROM cost_ledger").await, jobs);
}

async fn decimal(app: &TestApp, sql: &'static str) -> Decimal {
    sqlx::query_scalar::<_, Option<Decimal>>(sql)
        .fetch_one(app.pool())
        .await
        .unwrap()
        .unwrap_or_default()
}

async fn count(app: &TestApp, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(app.pool()).await.unwrap()
}

#[tokio::test]
async fn three_workers_at_concurrency_64_never_spend_past_a_tenants_hard_cap() {
    let fake = FakeProvider::start(&["--latency-ms", "30"]);
    let config = format!(
        "{}
[[routes]]
alias = \"paid\"
targets = [{{ provider = \"p\", model = \"m\" }}]

[[budgets]]
name = \"acme-monthly\"
tenant = \"acme\"
cap_usd = \"1.00\"
",
        provider("p", &fake.url)
    );
    let app = spawn_app_with(&config).await;
    let jobs: Vec<_> = (0..500)
        .map(|i| {
            job(
                "acme",
                Some("spend"),
                "paid",
                &format!("Job {i}. Costs money."),
            )
        })
        .collect();
    app.publish_jobs(&jobs).await;
    wait_all(workers(&app, 3, 64)).await;

    let ledger = decimal(
        &app,
        "SELECT sum(amount_usd) FROM cost_ledger WHERE tenant = 'acme'",
    )
    .await;
    assert!(ledger <= Decimal::ONE, "spent ${ledger} on a $1.00 cap");
    assert!(
        ledger >= Decimal::new(80, 2),
        "the budget was used, not refused early: ${ledger}"
    );
    let succeeded = count(
        &app,
        "SELECT count(*) FROM results WHERE status = 'succeeded'",
    )
    .await;
    let refused = count(
        &app,
        "SELECT count(*) FROM results WHERE status = 'failed' AND error_code = 'budget_exceeded'",
    )
    .await;
    eprintln!("tenant cap $1.00: spent ${ledger}, {succeeded} jobs served, {refused} refused");
    assert_eq!(
        succeeded + refused,
        500,
        "every other job fails with budget_exceeded"
    );
    assert!(refused > 0);
    assert_eq!(
        fake.requests().await as i64,
        succeeded,
        "refused jobs never reached the provider"
    );
    assert_eq!(
        count(&app, "SELECT count(*) FROM (SELECT job_id FROM cost_ledger GROUP BY job_id HAVING count(*) > 1) d").await,
        0,
        "nothing is double-counted"
    );
    let (spent, reserved): (Decimal, Decimal) =
        sqlx::query_as("SELECT spent, reserved FROM budget_periods WHERE budget = 'acme-monthly'")
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert_eq!(
        spent, ledger,
        "the budget's spent equals the ledger to the last decimal"
    );
    assert_eq!(reserved, Decimal::ZERO);
    let message: String = sqlx::query_scalar(
        "SELECT body->'error'->>'message' FROM results WHERE error_code = 'budget_exceeded' LIMIT 1",
    )
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert!(
        message.contains("budget \"acme-monthly\"")
            && message.contains("cap $1")
            && message.contains("period from"),
        "{message}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_provider_cap_reroutes_the_excess_to_the_next_provider() {
    let capped = FakeProvider::start(&[]);
    let other = FakeProvider::start(&[]);
    let config = format!(
        "{}{}
[[routes]]
alias = \"two\"
targets = [{{ provider = \"capped\", model = \"m\" }}, {{ provider = \"other\", model = \"m\" }}]

[[budgets]]
name = \"capped-monthly\"
provider = \"capped\"
cap_usd = \"1.00\"
",
        provider("capped", &capped.url),
        provider("other", &other.url)
    );
    let app = spawn_app_with(&config).await;
    let jobs: Vec<_> = (0..300)
        .map(|i| job("acme", None, "two", &format!("Job {i}. Goes somewhere.")))
        .collect();
    app.publish_jobs(&jobs).await;
    wait_all(workers(&app, 3, 64)).await;

    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM results WHERE status = 'succeeded'"
        )
        .await,
        300,
        "no job failed"
    );
    let on_capped = decimal(
        &app,
        "SELECT sum(amount_usd) FROM cost_ledger WHERE provider = 'capped'",
    )
    .await;
    assert!(
        on_capped <= Decimal::ONE,
        "spent ${on_capped} on a $1.00 provider cap"
    );
    assert!(
        on_capped >= Decimal::new(10, 2),
        "the capped provider served jobs until full (reservations in flight count): ${on_capped}"
    );
    let rerouted = count(
        &app,
        "SELECT count(*) FROM audit_events WHERE kind = 'budget_reroute'",
    )
    .await;
    let on_other = count(
        &app,
        "SELECT count(*) FROM attempts WHERE provider = 'other' AND outcome = 'succeeded'",
    )
    .await;
    assert!(rerouted > 0 && on_other > 0);
    assert_eq!(
        rerouted, on_other,
        "one budget_reroute event per job served by the next provider"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn reservations_of_a_killed_worker_expire_and_the_budget_adds_up_afterwards() {
    let fake = FakeProvider::start(&["--latency-ms", "1500"]);
    let config = format!(
        "{}
[routing]
reservation_grace_secs = 1

[[routes]]
alias = \"slow\"
targets = [{{ provider = \"p\", model = \"m\" }}]

[[budgets]]
name = \"acme-total\"
tenant = \"acme\"
cap_usd = \"10\"
period = \"total\"
",
        provider("p", &fake.url)
    );
    let app = spawn_app_with(&config).await;
    let jobs: Vec<_> = (0..20)
        .map(|i| job("acme", None, "slow", &format!("Job {i}. Interrupted.")))
        .collect();
    app.publish_jobs(&jobs).await;
    let mut worker = workers(&app, 1, 16).remove(0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while count(&app, "SELECT count(*) FROM budget_reservations").await < 10 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker never reserved"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    worker.kill().unwrap();
    worker.wait().unwrap();
    let held = decimal(
        &app,
        "SELECT reserved FROM budget_periods WHERE budget = 'acme-total'",
    )
    .await;
    assert!(
        held > Decimal::ZERO,
        "the dead worker left reservations behind"
    );

    // Past their expiry (timeout 5 s + grace 1 s), a running worker releases them.
    tokio::time::sleep(Duration::from_secs(7)).await;
    app.run_worker_until_idle().await;
    assert_eq!(
        count(&app, "SELECT count(*) FROM budget_reservations").await,
        0
    );
    let (spent, reserved): (Decimal, Decimal) =
        sqlx::query_as("SELECT spent, reserved FROM budget_periods WHERE budget = 'acme-total'")
            .fetch_one(app.pool())
            .await
            .unwrap();
    let ledger = decimal(&app, "SELECT sum(amount_usd) FROM cost_ledger").await;
    assert_eq!(reserved, Decimal::ZERO);
    assert_eq!(
        spent, ledger,
        "spent + reserved is exactly the ledger afterwards"
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM results WHERE status = 'succeeded'"
        )
        .await,
        20
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_soft_budget_alerts_once_per_threshold_and_a_job_cap_stops_its_job() {
    let fake = FakeProvider::start(&[]);
    let config = format!(
        "{}
[[routes]]
alias = \"paid\"
targets = [{{ provider = \"p\", model = \"m\" }}]

[[budgets]]
name = \"acme-soft\"
tenant = \"acme\"
cap_usd = \"0.05\"
mode = \"soft\"
",
        provider("p", &fake.url)
    );
    let app = spawn_app_with(&config).await;
    let jobs: Vec<_> = (0..20)
        .map(|i| {
            job(
                "acme",
                None,
                "paid",
                &format!("Job {i}. Over the soft cap."),
            )
        })
        .collect();
    app.publish_jobs(&jobs).await;
    let mut capped = job("acme", None, "paid", "Too expensive for its own cap.");
    capped.max_cost_usd = Some(Decimal::new(1, 6));
    app.publish_job(&capped).await;
    app.run_worker_until_idle().await;

    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM results WHERE status = 'succeeded'"
        )
        .await,
        20,
        "soft budgets never block"
    );
    let levels: Vec<i64> = sqlx::query_scalar(
        "SELECT (details->>'level_percent')::int8 FROM audit_events WHERE kind = 'budget_alert' ORDER BY 1",
    )
    .fetch_all(app.pool())
    .await
    .unwrap();
    assert_eq!(levels, [50, 80, 100], "each threshold once per period");
    let (status, code): (String, String) =
        sqlx::query_as("SELECT status, error_code FROM results WHERE job_id = $1")
            .bind(capped.id)
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert_eq!(
        (status.as_str(), code.as_str()),
        (JobStatus::Failed.as_str(), "budget_exceeded")
    );
    assert_eq!(
        fake.requests().await,
        20,
        "the capped job never reached the provider"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_call_is_billed_even_when_its_worker_dies_before_finalize_and_the_rerun_is_billed_too() {
    use switchyard::stages::{dispatch, route};
    let fake = FakeProvider::start(&[]);
    let config = format!(
        "{}
[[routes]]
alias = \"paid\"
targets = [{{ provider = \"p\", model = \"m\" }}]

[[budgets]]
name = \"acme-total\"
tenant = \"acme\"
cap_usd = \"10\"
period = \"total\"
",
        provider("p", &fake.url)
    );
    let app = spawn_app_with(&config).await;
    let j = job("acme", None, "paid", "Billed twice. The first worker died.");
    // A worker calls the provider for the job, then dies before finalizing it.
    let plan = route::route(&app.ctx.router, &j).unwrap();
    let first = dispatch::dispatch(&j, &plan, None, app.ctx.shared()).await;
    assert!(
        first.outcome.is_ok() && first.attempts[0].recorded,
        "the call was recorded when it returned"
    );
    drop(first);
    // The broker redelivers the job to another worker, which runs it again.
    app.publish_job(&j).await;
    app.run_worker_until_idle().await;

    assert_eq!(fake.requests().await, 2);
    assert_eq!(
        count(&app, "SELECT count(*) FROM cost_ledger").await,
        2,
        "both calls are in the ledger"
    );
    assert_eq!(
        count(&app, "SELECT count(*) FROM results").await,
        1,
        "one result"
    );
    let ledger = decimal(&app, "SELECT sum(amount_usd) FROM cost_ledger").await;
    let (spent, reserved): (Decimal, Decimal) =
        sqlx::query_as("SELECT spent, reserved FROM budget_periods WHERE budget = 'acme-total'")
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert_eq!(
        (spent, reserved),
        (ledger, Decimal::ZERO),
        "the budget counts both calls, once each"
    );
    let result_cost = decimal(
        &app,
        "SELECT (body->'cost'->>'amount_usd')::numeric FROM results",
    )
    .await;
    assert_eq!(
        result_cost * Decimal::from(2),
        ledger,
        "the result reports its own call"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn each_ledger_row_records_the_price_version_and_volume_tier_that_applied() {
    let fake = FakeProvider::start(&[]);
    let config = format!(
        r#"{}

[[providers.models]]
name = "m"
prices = {{ input = "9", output = "9" }}

[[providers.models.price_versions]]
effective_from = "2020-01-01"
prices = {{ input = "1", output = "2", per_request = "0.001" }}
tiers = [{{ above_monthly_tokens = 60, prices = {{ input = "0.5", output = "1", per_request = "0.001" }} }}]

[[providers.models.price_versions]]
effective_from = "2999-01-01"
prices = {{ input = "100", output = "100" }}

[[routes]]
alias = "paid"
targets = [{{ provider = "p", model = "m" }}]
"#,
        provider_p(&fake.url)
    );
    let app = spawn_app_with(&config).await;
    let jobs: Vec<_> = (0..8)
        .map(|i| {
            job(
                "acme",
                None,
                "paid",
                &format!("Tiered job {i}. Volume grows."),
            )
        })
        .collect();
    app.publish_jobs(&jobs).await;
    app.run_worker_until_idle().await;

    let rows: Vec<(String, Option<i64>, Decimal, Decimal, Decimal, Decimal)> = sqlx::query_as(
        "SELECT price_version, price_tier_above, price_input, price_output, price_per_request, amount_usd
         FROM cost_ledger ORDER BY created_at",
    )
    .fetch_all(app.pool())
    .await
    .unwrap();
    assert_eq!(rows.len(), 8);
    assert!(
        rows.iter().all(|r| r.0 == "2020-01-01"),
        "the version in effect today applied: {rows:?}"
    );
    // Calls take their tier in the order they are recorded (the volume row is locked), which
    // need not be the order they ended in: count, don't sort.
    assert!(
        rows.iter().any(|r| r.1.is_none()),
        "the first calls are below the tier: {rows:?}"
    );
    assert!(
        rows.iter().any(|r| r.1 == Some(60)),
        "later calls reached the tier: {rows:?}"
    );
    for row in &rows {
        let expected = if row.1.is_some() {
            (Decimal::new(5, 1), Decimal::ONE)
        } else {
            (Decimal::ONE, Decimal::TWO)
        };
        assert_eq!((row.2, row.3), expected);
        assert_eq!(row.4, Decimal::new(1, 3));
    }
    // Every amount re-derives from its row's tokens and recorded prices.
    let mismatched = count(
        &app,
        "SELECT count(*) FROM cost_ledger WHERE amount_usd <> round(
            ((input_tokens - cached_input_tokens - cache_write_tokens) * price_input + cached_input_tokens * price_cached_input
             + cache_write_tokens * price_cache_write + output_tokens * price_output) / 1000000 + price_per_request, 10)",
    )
    .await;
    assert_eq!(mismatched, 0, "the bill can be re-derived from the ledger");
    let volume: i64 = sqlx::query_scalar("SELECT tokens FROM model_volumes")
        .fetch_one(app.pool())
        .await
        .unwrap();
    let tokens: i64 =
        sqlx::query_scalar("SELECT sum(input_tokens + output_tokens)::int8 FROM cost_ledger")
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert_eq!(volume, tokens);
    app.cleanup().await;
}

/// A tiered call whose own record fails (failpoint `record_tiered_fails`: its transaction,
/// volume included, rolls back) is recorded by finalize with its job, which also adds its
/// tokens to the model's monthly volume and settles its budget hold, once.
#[tokio::test]
async fn a_tiered_call_recorded_by_finalize_still_counts_toward_its_models_volume() {
    let fake = FakeProvider::start(&[]);
    let config = format!(
        r#"{}

[[providers.models]]
name = "m"
prices = {{ input = "1", output = "2" }}
tiers = [{{ above_monthly_tokens = 60, prices = {{ input = "0.5", output = "1" }} }}]

[[routes]]
alias = "paid"
targets = [{{ provider = "p", model = "m" }}]

[[budgets]]
name = "acme-total"
tenant = "acme"
cap_usd = "10"
period = "total"
"#,
        provider_p(&fake.url)
    );
    let app = spawn_app_with(&config).await;
    let jobs: Vec<_> = (0..8)
        .map(|i| {
            job(
                "acme",
                None,
                "paid",
                &format!("Tiered job {i}. Recorded late."),
            )
        })
        .collect();
    app.publish_jobs(&jobs).await;
    let failpoint = [("SWITCHYARD_FAILPOINT", "record_tiered_fails")];
    wait_all(vec![worker_with_env(&app, 4, &failpoint)]).await;

    each_job_ran_and_was_billed_once(&app, &fake, 8).await;
    let tokens = count(
        &app,
        "SELECT sum(input_tokens + output_tokens)::int8 FROM cost_ledger",
    )
    .await;
    assert!(tokens > 0);
    let volume = count(
        &app,
        "SELECT coalesce(sum(tokens), 0)::int8 FROM model_volumes",
    )
    .await;
    assert_eq!(
        volume, tokens,
        "every recorded call's tokens count toward the volume"
    );
    let (spent, reserved): (Decimal, Decimal) =
        sqlx::query_as("SELECT spent, reserved FROM budget_periods WHERE budget = 'acme-total'")
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert_eq!(
        spent,
        decimal(&app, "SELECT sum(amount_usd) FROM cost_ledger").await
    );
    assert_eq!(reserved, Decimal::ZERO);
    app.cleanup().await;
}

#[tokio::test]
async fn a_group_reservation_grants_only_what_fits_under_the_cap_and_never_past_it() {
    use chrono::{TimeZone, Utc};
    use switchyard::store::budgets::{GroupAsk, reserve_group};

    let app = crate::helpers::spawn_app().await;
    let period = Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap();
    let cap = Decimal::new(100, 2); // $1.00
    let expires_at = Utc::now() + chrono::Duration::minutes(5);
    let ask = |cents: i64| GroupAsk {
        id: uuid::Uuid::now_v7(),
        amount: Decimal::new(cents, 2),
        expires_at,
    };

    let figures = || async {
        sqlx::query_as::<_, (Decimal, Decimal)>(
            "SELECT spent, reserved FROM budget_periods WHERE budget = 'b' AND period_start = $1",
        )
        .bind(period)
        .fetch_one(app.pool())
        .await
        .unwrap()
    };

    // No period row yet: nothing is granted here (the caller's own reservation creates it).
    let asks = [ask(10)];
    let granted = reserve_group(app.pool(), "b", period, cap, &asks)
        .await
        .unwrap();
    assert!(granted.is_empty());

    sqlx::query(
        "INSERT INTO budget_periods (budget, period_start, cap, spent, reserved) VALUES ('b', $1, $2, 0.30, 0.00)",
    )
    .bind(period)
    .bind(cap)
    .execute(app.pool())
    .await
    .unwrap();
    // Room for the whole group ($0.70): every ask is granted at once.
    let asks = [ask(5), ask(10), ask(5)];
    let granted = reserve_group(app.pool(), "b", period, cap, &asks)
        .await
        .unwrap();
    assert_eq!(granted, asks.iter().map(|a| a.id).collect::<Vec<_>>());
    assert_eq!(figures().await, (Decimal::new(30, 2), Decimal::new(20, 2)));
    // Room is $0.50: 0.25 fits, 0.30 does not (0.25 left), 0.20 fits, 0.10 does not (0.05 left),
    // 0.05 fits exactly.
    let asks = [ask(25), ask(30), ask(20), ask(10), ask(5)];
    let granted = reserve_group(app.pool(), "b", period, cap, &asks)
        .await
        .unwrap();
    assert_eq!(granted, vec![asks[0].id, asks[2].id, asks[4].id]);
    let (spent, reserved) = figures().await;
    assert_eq!(spent + reserved, cap, "the cap is reached and not passed");
    let held: Decimal = sqlx::query_scalar(
        "SELECT sum(amount) FROM budget_reservations WHERE budget = 'b' AND id = ANY($1)",
    )
    .bind(&granted)
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(held, Decimal::new(50, 2));

    // A full budget grants nothing.
    let asks = [ask(1)];
    let granted = reserve_group(app.pool(), "b", period, cap, &asks)
        .await
        .unwrap();
    assert!(granted.is_empty());
    app.cleanup().await;
}

#[tokio::test]
async fn settling_releases_reservations_adds_spending_and_creates_a_soft_budgets_row() {
    use chrono::{TimeZone, Utc};
    use switchyard::store::budgets::{Settlement, settle};

    let app = crate::helpers::spawn_app().await;
    let period = Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap();
    let cap = Decimal::new(100, 0);
    let (held_1, held_2, expired) = (
        uuid::Uuid::now_v7(),
        uuid::Uuid::now_v7(),
        uuid::Uuid::now_v7(),
    );
    sqlx::query(
        "INSERT INTO budget_periods (budget, period_start, cap, spent, reserved) VALUES ('hard', $1, $2, 1, 5)",
    )
    .bind(period)
    .bind(cap)
    .execute(app.pool())
    .await
    .unwrap();
    // Two live reservations ($2 and $3); the third call's reservation already expired and was
    // released (no row), so only its spending counts.
    sqlx::query(
        "INSERT INTO budget_reservations (id, budget, period_start, amount, expires_at)
         VALUES ($1, 'hard', $3, 2, now() + interval '5 minutes'), ($2, 'hard', $3, 3, now() + interval '5 minutes')",
    )
    .bind(held_1)
    .bind(held_2)
    .bind(period)
    .execute(app.pool())
    .await
    .unwrap();
    let settlement = |reservation, budget: &str, cents| Settlement {
        reservation,
        budget: budget.to_owned(),
        period_start: period,
        cap,
        actual: Decimal::new(cents, 2),
    };
    let settlements = [
        settlement(Some(held_1), "hard", 150),
        settlement(Some(held_2), "hard", 25),
        settlement(Some(expired), "hard", 10),
        settlement(None, "soft", 40),
        settlement(None, "soft", 2),
    ];
    let mut conn = app.pool().acquire().await.unwrap();
    settle(&mut conn, &settlements).await.unwrap();

    let rows: Vec<(String, Decimal, Decimal, Decimal)> = sqlx::query_as(
        "SELECT budget, cap, spent, reserved FROM budget_periods WHERE period_start = $1 ORDER BY budget",
    )
    .bind(period)
    .fetch_all(app.pool())
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            // spent 1 + 1.50 + 0.25 + 0.10; reserved 5 − 2 − 3.
            ("hard".to_owned(), cap, Decimal::new(285, 2), Decimal::ZERO),
            ("soft".to_owned(), cap, Decimal::new(42, 2), Decimal::ZERO),
        ]
    );
    assert_eq!(
        count(&app, "SELECT count(*) FROM budget_reservations").await,
        0
    );

    // Settling the same reservations again (a retried group) releases nothing twice.
    settle(&mut conn, &settlements[..1]).await.unwrap();
    assert_eq!(
        decimal(
            &app,
            "SELECT reserved FROM budget_periods WHERE budget = 'hard'"
        )
        .await,
        Decimal::ZERO
    );
    drop(conn);
    app.cleanup().await;
}

#[tokio::test]
async fn an_alert_check_locks_the_shared_budget_row_only_once_a_level_is_reached() {
    use chrono::{TimeZone, Utc};
    use switchyard::store::budgets::mark_alerts;

    let app = crate::helpers::spawn_app().await;
    let period = Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap();
    let levels = [50, 80, 100];
    sqlx::query(
        "INSERT INTO budget_periods (budget, period_start, cap, spent) VALUES ('b', $1, 100, 40)",
    )
    .bind(period)
    .execute(app.pool())
    .await
    .unwrap();
    let set_spent = |spent: i64| {
        let pool = app.pool().clone();
        async move {
            sqlx::query("UPDATE budget_periods SET spent = $1 WHERE budget = 'b'")
                .bind(Decimal::from(spent))
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    // Another transaction (a recorder's settlement, say) holds the row's lock; a check made
    // meanwhile fails on its lock timeout if it waits for the row.
    let check = || {
        let pool = app.pool().clone();
        async move {
            let mut tx = pool.begin().await.unwrap();
            sqlx::query("SET LOCAL lock_timeout = '500ms'")
                .execute(&mut *tx)
                .await
                .unwrap();
            let reached = mark_alerts(&mut tx, "b", period, &levels).await;
            tx.commit().await.unwrap_or_default();
            reached
        }
    };
    let hold = || {
        let pool = app.pool().clone();
        async move {
            let mut tx = pool.begin().await.unwrap();
            sqlx::query("SELECT 1 FROM budget_periods WHERE budget = 'b' FOR UPDATE")
                .execute(&mut *tx)
                .await
                .unwrap();
            tx
        }
    };

    // Below every level: answered without waiting for the lock.
    let holder = hold().await;
    assert_eq!(check().await.unwrap(), Vec::new());
    holder.rollback().await.unwrap();

    // 85% reached: the check takes the lock (and so waits for the holder).
    set_spent(85).await;
    let holder = hold().await;
    let waited = check().await.unwrap_err();
    assert!(
        waited.to_string().contains("lock timeout"),
        "the check should have waited for the row's lock: {waited}"
    );
    holder.rollback().await.unwrap();

    // Free again: 50% and 80% are announced together, then never again.
    let (spent, cap) = (Decimal::from(85), Decimal::from(100));
    assert_eq!(
        check().await.unwrap(),
        vec![(50, spent, cap), (80, spent, cap)]
    );
    let holder = hold().await;
    assert_eq!(
        check().await.unwrap(),
        Vec::new(),
        "announced levels take no lock"
    );
    holder.rollback().await.unwrap();
    app.cleanup().await;
}

#[tokio::test]
async fn the_expiry_sweep_skips_a_reservation_being_settled_instead_of_waiting_for_it() {
    use chrono::{TimeZone, Utc};
    use switchyard::store::budgets::release_expired;

    let app = crate::helpers::spawn_app().await;
    let period = Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap();
    let (settling, abandoned) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    sqlx::query(
        "INSERT INTO budget_periods (budget, period_start, cap, reserved) VALUES ('b', $1, 100, 5)",
    )
    .bind(period)
    .execute(app.pool())
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO budget_reservations (id, budget, period_start, amount, expires_at)
         VALUES ($1, 'b', $3, 2, now() - interval '1 minute'), ($2, 'b', $3, 3, now() - interval '1 minute')",
    )
    .bind(settling)
    .bind(abandoned)
    .bind(period)
    .execute(app.pool())
    .await
    .unwrap();
    // A settlement has just deleted the first (expired) reservation and not committed yet: it
    // holds the reservation's row, and will lock the period row next. A sweep that locked the
    // period first and then waited for the reservation would deadlock with it.
    let mut settlement = app.pool().begin().await.unwrap();
    sqlx::query("DELETE FROM budget_reservations WHERE id = $1")
        .bind(settling)
        .execute(&mut *settlement)
        .await
        .unwrap();
    let released = tokio::time::timeout(
        Duration::from_secs(5),
        release_expired(app.pool(), Utc::now()),
    )
    .await
    .expect("the sweep does not wait for a reservation being settled")
    .unwrap();
    assert_eq!(released, 1, "only the abandoned reservation");
    // The settlement can now take the period row and finish.
    sqlx::query("UPDATE budget_periods SET reserved = reserved - 2 WHERE budget = 'b'")
        .execute(&mut *settlement)
        .await
        .unwrap();
    settlement.commit().await.unwrap();
    assert_eq!(
        decimal(
            &app,
            "SELECT reserved FROM budget_periods WHERE budget = 'b'"
        )
        .await,
        Decimal::ZERO
    );
    assert_eq!(
        count(&app, "SELECT count(*) FROM budget_reservations").await,
        0
    );
    app.cleanup().await;
}

/// A recorder commit whose answer is lost (failpoint `record_reply_lost`: the group commits,
/// then every call in it hears an error) still counts once. Each call finds its committed
/// ledger row, so finalize does not write the row again (which would fail the whole group and
/// run its jobs a second time), and the budget is settled once.
#[tokio::test]
async fn a_billed_call_whose_commit_answer_was_lost_is_recorded_once_and_not_run_again() {
    billed_once_although_the_answer_was_lost("record_reply_lost").await;
}

/// The same when the call cannot tell whether its row landed (failpoint `record_unverifiable`):
/// finalize finds the row in its own transaction, writes neither it nor its settlement again.
#[tokio::test]
async fn a_lost_record_answer_nobody_could_check_is_found_by_finalize() {
    billed_once_although_the_answer_was_lost("record_reply_lost,record_unverifiable").await;
}

async fn billed_once_although_the_answer_was_lost(failpoints: &str) {
    let fake = FakeProvider::start(&[]);
    let config = format!(
        "{}
[[routes]]
alias = \"paid\"
targets = [{{ provider = \"p\", model = \"m\" }}]

[[budgets]]
name = \"acme-total\"
tenant = \"acme\"
cap_usd = \"10\"
period = \"total\"
",
        provider("p", &fake.url)
    );
    let app = spawn_app_with(&config).await;
    let jobs: Vec<_> = (0..20)
        .map(|i| job("acme", None, "paid", &format!("Job {i}. Billed once.")))
        .collect();
    app.publish_jobs(&jobs).await;
    let failpoint = [("SWITCHYARD_FAILPOINT", failpoints)];
    wait_all(vec![worker_with_env(&app, 8, &failpoint)]).await;

    each_job_ran_and_was_billed_once(&app, &fake, 20).await;
    let (spent, reserved): (Decimal, Decimal) =
        sqlx::query_as("SELECT spent, reserved FROM budget_periods WHERE budget = 'acme-total'")
            .fetch_one(app.pool())
            .await
            .unwrap();
    let ledger = decimal(&app, "SELECT sum(amount_usd) FROM cost_ledger").await;
    assert!(ledger > Decimal::ZERO);
    assert_eq!(spent, ledger, "the budget is settled once per call");
    assert_eq!(reserved, Decimal::ZERO);
    app.cleanup().await;
}
