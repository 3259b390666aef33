//! A job id whose result is already committed is answered from Postgres: the stored result is
//! published again and the provider is not called a second time.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::Utc;
use rust_decimal::Decimal;
use switchyard::config::Prices;
use switchyard::messages::{AttemptStatus, CostEvent, JobResult, JobStatus, ResultHead, Usage};
use switchyard::store::attempts::AttemptRow;
use switchyard::store::group::{self, Records};
use switchyard::store::jobs::JobRow;
use switchyard::store::results;
use uuid::Uuid;

use crate::helpers::{
    FakeProvider, collect, fake_provider_config, generic_plan, job, plan_for_ids, spawn_app,
    spawn_app_with, sql_array, store_results, stored_result,
};

#[tokio::test]
async fn a_job_published_twice_is_answered_from_the_store_without_a_second_provider_call() {
    let fake = FakeProvider::start(&[]);
    let app = spawn_app_with(&fake_provider_config(&fake.url)).await;
    let mut results = app.subscribe(false, "#").await;
    let j = job(
        "acme",
        Some("dup"),
        "fake",
        "Only once. The provider must see this a single time.",
    );

    app.publish_job(&j).await;
    app.run_worker_until_idle().await;
    app.publish_job(&j).await;
    let report = app.run_worker_until_idle().await;
    assert_eq!(report.finalized.duplicates, 1);

    assert_eq!(fake.requests().await, 1, "the provider was called once");
    let deliveries = collect(&mut results, 2, Duration::from_secs(10)).await;
    let first: JobResult = serde_json::from_slice(&deliveries[0].data).unwrap();
    let second: JobResult = serde_json::from_slice(&deliveries[1].data).unwrap();
    assert_eq!(first.job_id, j.id);
    assert_eq!(
        serde_json::to_value(&first).unwrap(),
        serde_json::to_value(&second).unwrap(),
        "the stored result is republished unchanged"
    );
    assert_eq!(deliveries[1].routing_key.as_str(), "acme.dup.succeeded");
    assert_eq!(app.result_rows().await, (1, 1));
    let ledger_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM cost_ledger")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(ledger_rows, 1, "nothing is billed twice");
    app.cleanup().await;
}

/// Job ids are global: a job whose id another tenant's committed job holds is not answered
/// with that tenant's result. It gets its own `rejected` result (`job_id_taken`, on its own
/// routing key) and a dead-letter copy; nothing of it is stored over the other job's rows.
#[tokio::test]
async fn a_job_whose_id_another_tenant_already_used_is_rejected_not_answered_with_its_result() {
    let fake = FakeProvider::start(&[]);
    let app = spawn_app_with(&fake_provider_config(&fake.url)).await;
    let mut results = app.subscribe(false, "#").await;
    let first = job("acme", Some("mine"), "fake", "Acme's job. Served once.");
    let mut second = job("globex", Some("theirs"), "fake", "Globex reuses the id.");
    second.id = first.id;

    app.publish_job(&first).await;
    app.run_worker_until_idle().await;
    app.publish_job(&second).await;
    let report = app.run_worker_until_idle().await;
    assert_eq!(
        (report.finalized.refused, report.finalized.duplicates),
        (1, 0)
    );

    assert_eq!(fake.requests().await, 1, "the provider was called once");
    let deliveries = collect(&mut results, 2, Duration::from_secs(10)).await;
    assert_eq!(deliveries[0].routing_key.as_str(), "acme.mine.succeeded");
    assert_eq!(deliveries[1].routing_key.as_str(), "globex.theirs.rejected");
    assert_eq!(
        deliveries[1]
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str(),
        format!("{}/taken/globex", first.id),
        "not the message id of acme's result"
    );
    let refused: JobResult = serde_json::from_slice(&deliveries[1].data).unwrap();
    assert_eq!(refused.job_id, first.id);
    assert_eq!(refused.tenant.as_deref(), Some("globex"));
    assert_eq!(refused.status, JobStatus::Rejected);
    let error = refused.error.unwrap();
    assert_eq!(error.code, "job_id_taken");
    assert!(!error.message.contains("acme"), "{}", error.message);
    let kept = app.drain_dead_letters().await;
    assert_eq!(kept.len(), 1, "the refused job is kept for inspection");
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_events WHERE tenant = 'globex' AND kind = 'job_rejected'
         AND details->'error'->>'code' = 'job_id_taken'",
    )
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(audited, 1, "the refusal is audited under its own tenant");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&kept[0].data).unwrap()["tenant"],
        "globex"
    );
    // Acme's rows are untouched.
    assert_eq!(app.result_rows().await, (1, 1));
    let stored = results::find_latest(&mut app.pool().acquire().await.unwrap(), first.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.tenant.as_deref(), Some("acme"));
    assert_eq!(stored.status, JobStatus::Succeeded);

    // A message that could not be read is stored under its message id with no tenant; a job
    // reusing that id is refused on its own key too, not answered on no tenant's.
    let unread = Uuid::now_v7();
    app.publish_raw(b"not json", Some(&unread.to_string()))
        .await;
    app.run_worker_until_idle().await;
    let mut late = job(
        "globex",
        Some("theirs"),
        "fake",
        "Reuses an unread message's id.",
    );
    late.id = unread;
    app.publish_job(&late).await;
    app.run_worker_until_idle().await;
    let deliveries = collect(&mut results, 2, Duration::from_secs(10)).await;
    assert_eq!(deliveries[1].routing_key.as_str(), "globex.theirs.rejected");
    let refused: JobResult = serde_json::from_slice(&deliveries[1].data).unwrap();
    assert_eq!(refused.error.unwrap().code, "job_id_taken");
    assert_eq!(
        fake.requests().await,
        1,
        "neither refused job reached the provider"
    );
    app.cleanup().await;
}

/// A rejected message is stored under its id, unless another tenant's job holds that id: then
/// it is published and dead-lettered but not stored, so it cannot stand in for that job's
/// result, even at a later generation (which the publisher chooses).
#[tokio::test]
async fn a_rejected_message_carrying_another_tenants_job_id_does_not_take_its_place() {
    let app = spawn_app().await;
    let mut results = app.subscribe(false, "#").await;
    let first = job("acme", Some("mine"), "default", "Acme's job. Served.");
    app.publish_job(&first).await;
    app.run_worker_until_idle().await;
    let mut forged = serde_json::to_value(job(
        "globex",
        Some("theirs"),
        "default",
        "Names acme's job id and a later generation, and breaks the schema.",
    ))
    .unwrap();
    forged["id"] = serde_json::json!(first.id);
    forged["generation"] = serde_json::json!(5);
    forged["unexpected"] = serde_json::json!(true);
    app.publish_raw(
        &serde_json::to_vec(&forged).unwrap(),
        Some(&first.id.to_string()),
    )
    .await;
    let report = app.run_worker_until_idle().await;
    assert_eq!(report.finalized.refused, 1);

    let deliveries = collect(&mut results, 2, Duration::from_secs(10)).await;
    assert_eq!(deliveries[1].routing_key.as_str(), "globex.theirs.rejected");
    let rejected: JobResult = serde_json::from_slice(&deliveries[1].data).unwrap();
    assert_eq!(rejected.error.unwrap().code, "schema_violation");
    assert!(
        deliveries[1]
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str()
            .ends_with("/g5/taken/globex")
    );
    assert_eq!(
        app.drain_dead_letters().await.len(),
        1,
        "kept for inspection"
    );
    let stored = results::find_latest(&mut app.pool().acquire().await.unwrap(), first.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (stored.tenant.as_deref(), stored.generation),
        (Some("acme"), 0),
        "acme's result is still the id's latest"
    );
    assert_eq!(app.result_rows().await, (1, 1));
    app.cleanup().await;
}

/// Two tenants' jobs under one id, in flight at once: neither sees the other's result before
/// its call, so both are served. The first to commit owns the id's rows; the other still gets
/// its own result, on its own key and under its own message id, and nothing of it overwrites
/// the first's.
#[tokio::test]
async fn two_tenants_racing_with_one_job_id_each_get_their_own_result() {
    let fake = FakeProvider::start(&["--latency-ms", "300"]);
    let app = spawn_app_with(&fake_provider_config(&fake.url)).await;
    let mut results = app.subscribe(false, "#").await;
    let first = job("acme", Some("mine"), "fake", "Acme's job.");
    let mut second = job("globex", Some("theirs"), "fake", "Globex's job, same id.");
    second.id = first.id;
    app.publish_jobs(&[first.clone(), second.clone()]).await;
    app.run_worker_until_idle().await;

    assert_eq!(fake.requests().await, 2, "both were in flight at once");
    let deliveries = collect(&mut results, 2, Duration::from_secs(10)).await;
    let keys: BTreeSet<&str> = deliveries.iter().map(|d| d.routing_key.as_str()).collect();
    assert_eq!(
        keys,
        BTreeSet::from(["acme.mine.succeeded", "globex.theirs.succeeded"])
    );
    let ids: BTreeSet<String> = deliveries
        .iter()
        .map(|d| d.properties.message_id().as_ref().unwrap().to_string())
        .collect();
    let winner = format!("{}", first.id);
    let taken = |tenant: &str| format!("{}/taken/{tenant}", first.id);
    assert!(
        ids == BTreeSet::from([winner.clone(), taken("globex")])
            || ids == BTreeSet::from([winner, taken("acme")]),
        "the winner's id and the loser's own: {ids:?}"
    );
    for delivery in &deliveries {
        let result: JobResult = serde_json::from_slice(&delivery.data).unwrap();
        let key_tenant = delivery.routing_key.as_str().split('.').next().unwrap();
        assert_eq!(result.tenant.as_deref(), Some(key_tenant), "its own result");
    }
    assert_eq!(app.result_rows().await, (1, 1));
    app.cleanup().await;
}

/// A `cancelled` placeholder gives way to its own job's real outcome, never to another
/// tenant's job under the same id.
#[tokio::test]
async fn a_cancelled_placeholder_is_replaced_only_by_its_own_tenants_result() {
    let app = spawn_app().await;
    let mut conn = app.pool().acquire().await.unwrap();
    let id = Uuid::now_v7();
    let mut placeholder = stored_result(id, 0);
    placeholder.status = JobStatus::Cancelled;
    store_results(&mut conn, [&placeholder].into_iter()).await;

    let mut other = stored_result(id, 0);
    other.tenant = Some("globex".to_owned());
    let head = other.head();
    let body = serde_json::to_string(&other).unwrap();
    let written = results::insert_many(&mut conn, &[(&head, body.as_str())], Utc::now())
        .await
        .unwrap();
    assert!(
        written.is_empty(),
        "another tenant's result replaced the placeholder"
    );
    let kept = results::find_latest(&mut conn, id).await.unwrap().unwrap();
    assert_eq!(
        (kept.tenant.as_deref(), kept.status),
        (Some("acme"), JobStatus::Cancelled)
    );

    let own = stored_result(id, 0);
    let head = own.head();
    let body = serde_json::to_string(&own).unwrap();
    let written = results::insert_many(&mut conn, &[(&head, body.as_str())], Utc::now())
        .await
        .unwrap();
    assert_eq!(written, vec![id], "its own job's outcome replaces it");
    drop(conn);
    app.cleanup().await;
}

#[tokio::test]
async fn the_same_job_in_flight_twice_still_gets_exactly_one_result_row() {
    let fake = FakeProvider::start(&["--latency-ms", "200"]);
    let app = spawn_app_with(&fake_provider_config(&fake.url)).await;
    let mut results = app.subscribe(false, "#").await;
    let j = job("acme", None, "fake", "Twice at once. Both copies race.");
    app.publish_jobs(&[j.clone(), j.clone()]).await;
    app.run_worker_until_idle().await;

    assert_eq!(app.result_rows().await, (1, 1));
    let deliveries = collect(&mut results, 2, Duration::from_secs(10)).await;
    let first: JobResult = serde_json::from_slice(&deliveries[0].data).unwrap();
    let second: JobResult = serde_json::from_slice(&deliveries[1].data).unwrap();
    assert_eq!(
        serde_json::to_value(&first).unwrap(),
        serde_json::to_value(&second).unwrap(),
        "both deliveries publish the one committed result"
    );
    app.cleanup().await;
}

/// Two groups holding copies of the same jobs (two lanes, or two workers, given redelivered
/// duplicates) commit at once with the jobs in opposite orders, through finalize's one
/// statement. The job and result rows are written in key order, so one waits for the other; in
/// arrival order they would lock in opposite orders and Postgres would abort one as a
/// deadlock, sending its whole group back to the queue to be paid for again.
#[tokio::test]
async fn overlapping_groups_in_opposite_orders_commit_without_a_deadlock() {
    let app = spawn_app().await;
    let now = Utc::now();
    for _round in 0..3 {
        let ids: Vec<Uuid> = (0..3000).map(|_| Uuid::now_v7()).collect();
        let rows: Vec<JobRow> = ids
            .iter()
            .map(|&id| JobRow {
                id,
                tenant: Some("acme".to_owned()),
                batch: None,
                route: Some("fake".to_owned()),
                generation: 0,
                status: JobStatus::Succeeded,
                request: None,
                request_sha256: None,
                raw_body: None,
                received_at: now,
                finished_at: now,
            })
            .collect();
        let heads: Vec<ResultHead> = ids
            .iter()
            .map(|&job_id| ResultHead {
                job_id,
                generation: 0,
                tenant: Some("acme".to_owned()),
                batch: None,
                status: JobStatus::Succeeded,
                error: None,
            })
            .collect();
        let group = |reversed: bool| {
            let pool = app.pool().clone();
            let mut job_rows: Vec<&JobRow> = rows.iter().collect();
            let mut result_rows: Vec<(&ResultHead, &str)> =
                heads.iter().map(|h| (h, "{}")).collect();
            if reversed {
                job_rows.reverse();
                result_rows.reverse();
            }
            async move {
                let mut tx = pool.begin().await?;
                let records = Records {
                    jobs: &job_rows,
                    attempts: &[],
                    results: &result_rows,
                    costs: &[],
                };
                group::insert(&mut tx, &records, Utc::now()).await?;
                tx.commit().await
            }
        };
        let (forward, backward) = tokio::join!(group(false), group(true));
        forward.expect("the forward group commits");
        backward.expect("the reversed group commits");
    }
    let (stored,): (i64,) = sqlx::query_as("SELECT count(*) FROM results")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(stored, 9000);
    app.cleanup().await;
}

fn job_row(id: Uuid, status: JobStatus) -> JobRow {
    let now = Utc::now();
    JobRow {
        id,
        tenant: Some("acme".to_owned()),
        batch: Some("b1".to_owned()),
        route: Some("fake".to_owned()),
        generation: 0,
        status,
        request: None,
        request_sha256: Some("ab12".to_owned()),
        raw_body: None,
        received_at: now,
        finished_at: now,
    }
}

fn attempt_row(job_id: Uuid, n: i32, outcome: AttemptStatus) -> AttemptRow {
    let now = Utc::now();
    AttemptRow {
        id: Uuid::now_v7(),
        job_id,
        generation: 0,
        n,
        provider: format!("provider-{n}"),
        model: "m".to_owned(),
        key_id: Some("k1".to_owned()),
        started_at: now,
        ended_at: now,
        outcome,
        error_class: (outcome == AttemptStatus::Failed).then(|| "rate_limited".to_owned()),
        http_status: Some(if outcome == AttemptStatus::Failed {
            429
        } else {
            200
        }),
        error: None,
        latency_ms: 7,
        usage: Some(Usage {
            input_tokens: 11,
            output_tokens: 5,
            ..Usage::default()
        }),
    }
}

fn head(job_id: Uuid, status: JobStatus) -> ResultHead {
    ResultHead {
        job_id,
        generation: 0,
        tenant: Some("acme".to_owned()),
        batch: Some("b1".to_owned()),
        status,
        error: None,
    }
}

/// An attempt row's n, provider, error class, HTTP status, latency and output tokens.
type AttemptColumns = (i32, String, Option<String>, Option<i32>, i64, Option<i64>);

/// Commits one group's records as finalize does, with the same body for every result; returns
/// the job ids whose result was inserted, sorted.
async fn write_group(
    pool: &sqlx::PgPool,
    jobs: &[&JobRow],
    attempts: &[&AttemptRow],
    heads: &[ResultHead],
    costs: &[(Uuid, &CostEvent)],
) -> Vec<Uuid> {
    let results: Vec<(&ResultHead, &str)> =
        heads.iter().map(|h| (h, r#"{"text": "done"}"#)).collect();
    let records = Records {
        jobs,
        attempts,
        results: &results,
        costs,
    };
    let mut tx = pool.begin().await.unwrap();
    let mut inserted = group::insert(&mut tx, &records, Utc::now()).await.unwrap();
    tx.commit().await.unwrap();
    inserted.sort();
    inserted
}

/// Finalize writes a group's jobs, attempts, results and ledger rows in one statement, each
/// table's columns numbered after the last. Every table gets its rows with each value in its
/// own column, and a job whose result is already stored is not reported as inserted.
#[tokio::test]
async fn a_group_writes_its_jobs_attempts_results_and_ledger_rows_in_one_statement() {
    let app = spawn_app().await;
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let jobs = [
        job_row(a, JobStatus::Succeeded),
        job_row(b, JobStatus::Failed),
    ];
    let attempts = [
        attempt_row(a, 1, AttemptStatus::Failed),
        attempt_row(a, 2, AttemptStatus::Succeeded),
        attempt_row(b, 1, AttemptStatus::Failed),
    ];
    let heads = [head(a, JobStatus::Succeeded), head(b, JobStatus::Failed)];
    let cost = CostEvent {
        schema: "switchyard.cost_event.v1".to_owned(),
        event_id: Uuid::now_v7(),
        job_id: a,
        tenant: "acme".to_owned(),
        batch: Some("b1".to_owned()),
        route: "fake".to_owned(),
        provider: "provider-2".to_owned(),
        model: "m".to_owned(),
        key_id: Some("k1".to_owned()),
        usage: Usage {
            input_tokens: 11,
            output_tokens: 5,
            ..Usage::default()
        },
        prices: Prices {
            input: Decimal::new(25, 1),
            output: Decimal::new(10, 0),
            ..Prices::default()
        },
        price_version: "base".to_owned(),
        price_tier_above: Some(1_000_000),
        amount_usd: Decimal::new(77_500, 9),
        at: Utc::now(),
    };
    let inserted = write_group(
        app.pool(),
        &jobs.iter().collect::<Vec<_>>(),
        &attempts.iter().collect::<Vec<_>>(),
        &heads,
        &[(attempts[1].id, &cost)],
    )
    .await;
    assert_eq!(inserted, vec![a, b]);

    let job: (String, Option<String>, Option<String>, Option<String>) =
        sqlx::query_as("SELECT status, batch, route, request_sha256 FROM jobs WHERE id = $1")
            .bind(b)
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert_eq!(
        job,
        (
            "failed".to_owned(),
            Some("b1".to_owned()),
            Some("fake".to_owned()),
            Some("ab12".to_owned())
        )
    );
    let tried: Vec<AttemptColumns> = sqlx::query_as(
        "SELECT n, provider, error_class, http_status, latency_ms, output_tokens FROM attempts
         WHERE job_id = $1 ORDER BY n",
    )
    .bind(a)
    .fetch_all(app.pool())
    .await
    .unwrap();
    assert_eq!(
        tried,
        vec![
            (
                1,
                "provider-1".to_owned(),
                Some("rate_limited".to_owned()),
                Some(429),
                7,
                Some(5)
            ),
            (2, "provider-2".to_owned(), None, Some(200), 7, Some(5)),
        ]
    );
    let ledger: (Uuid, String, i64, Decimal, Decimal, Option<i64>, String) = sqlx::query_as(
        "SELECT attempt_id, provider, input_tokens, price_input, amount_usd, price_tier_above,
                price_version
         FROM cost_ledger WHERE job_id = $1",
    )
    .bind(a)
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(
        ledger,
        (
            attempts[1].id,
            "provider-2".to_owned(),
            11,
            Decimal::new(25, 1),
            Decimal::new(77_500, 9),
            Some(1_000_000),
            "base".to_owned()
        )
    );
    let stored: (String, serde_json::Value) =
        sqlx::query_as("SELECT status, body FROM results WHERE job_id = $1")
            .bind(a)
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert_eq!(
        stored,
        ("succeeded".to_owned(), serde_json::json!({"text": "done"}))
    );

    // The same jobs again (a redelivered group): their results are already stored.
    let again = write_group(
        app.pool(),
        &jobs.iter().collect::<Vec<_>>(),
        &[],
        &heads,
        &[],
    )
    .await;
    assert!(again.is_empty(), "{again:?}");
    let counts: (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM jobs), (SELECT count(*) FROM attempts),
                (SELECT count(*) FROM results), (SELECT count(*) FROM cost_ledger)",
    )
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(counts, (2, 3, 2, 1));
    app.cleanup().await;
}

/// The duplicate check asks for hundreds of job ids at once. It gets each one's latest result
/// (missing ids left out), and its plan probes the primary key per id even on a young,
/// unanalyzed table, where `job_id = ANY($1)` over 300 ids was planned as a scan of them all.
#[tokio::test]
async fn the_latest_results_of_many_jobs_are_found_by_one_index_probe_each() {
    let app = spawn_app().await;
    let stored: Vec<JobResult> = (0..5_000)
        .map(|_| stored_result(Uuid::now_v7(), 0))
        .chain((0..100).map(|_| stored_result(Uuid::now_v7(), 0)))
        .collect();
    // The last 100 jobs were replayed: generation 1 is their latest result.
    let replayed: Vec<JobResult> = stored[5_000..]
        .iter()
        .map(|r| stored_result(r.job_id, 1))
        .collect();
    let mut conn = app.pool().acquire().await.unwrap();
    store_results(&mut conn, stored.iter().chain(&replayed)).await;

    // 100 never-replayed jobs, the 100 replayed ones and 100 unknown ids.
    let asked: Vec<Uuid> = stored[..100]
        .iter()
        .chain(&stored[5_000..])
        .map(|r| r.job_id)
        .chain((0..100).map(|_| Uuid::now_v7()))
        .collect();
    let found = results::find_latest_many(&mut conn, &asked).await.unwrap();
    assert_eq!(found.len(), 200, "one result per known id");
    let found: BTreeSet<(Uuid, i32)> = found.iter().map(|r| (r.job_id, r.generation)).collect();
    let expected: BTreeSet<(Uuid, i32)> = stored[..100]
        .iter()
        .map(|r| (r.job_id, 0))
        .chain(replayed.iter().map(|r| (r.job_id, 1)))
        .collect();
    assert_eq!(found, expected);

    // Both plans: the one made with the ids known (a statement's first runs) and the generic
    // one Postgres may keep from a statement's sixth run, which the lookup task reaches at once.
    for plan in [
        plan_for_ids(&mut conn, results::LATEST_MANY_SQL, &asked).await,
        generic_plan(
            &mut conn,
            results::LATEST_MANY_SQL,
            "uuid[]",
            &sql_array(&asked, "uuid"),
        )
        .await,
    ] {
        assert!(
            plan.contains("Index Scan Backward using results_pkey") && !plan.contains("Seq Scan"),
            "{plan}"
        );
    }
    drop(conn);
    app.cleanup().await;
}
