//! A job id whose result is already committed is answered from Postgres: the stored result is
//! published again and the provider is not called a second time.

use std::time::Duration;

use chrono::Utc;
use switchyard::messages::{JobResult, JobStatus, ResultHead};
use switchyard::store::jobs::JobRow;
use switchyard::store::{jobs, results};
use uuid::Uuid;

use crate::helpers::{FakeProvider, collect, fake_provider_config, job, spawn_app, spawn_app_with};

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
/// duplicates) commit at once with the jobs in opposite orders. The job and result rows are
/// inserted in key order, so one waits for the other; in arrival order they would lock in
/// opposite orders and Postgres would abort one as a deadlock, sending its whole group back to
/// the queue to be paid for again.
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
                jobs::insert_many(&mut tx, &job_rows).await?;
                results::insert_many(&mut tx, &result_rows, Utc::now()).await?;
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
