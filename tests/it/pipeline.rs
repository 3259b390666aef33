//! The happy path: jobs in, exactly one result each, cost and audit out, all in Postgres.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use rust_decimal::Decimal;
use switchyard::messages::schema::Schema;
use switchyard::messages::{JobResult, JobStatus};
use uuid::Uuid;

use crate::helpers::{
    FakeProvider, collect, fake_provider_config, items, job, spawn_app, spawn_app_with,
};

#[tokio::test]
async fn a_hundred_jobs_give_a_hundred_results_in_postgres_and_on_the_results_topic() {
    let fake = FakeProvider::start(&[]);
    let app = spawn_app_with(&fake_provider_config(&fake.url)).await;
    let mut results = app.subscribe(false, "#").await;
    let mut events = app.subscribe(true, "#").await;
    let jobs: Vec<_> = (0..100)
        .map(|i| {
            let batch = if i % 2 == 0 { Some("b1") } else { None };
            job(
                "acme",
                batch,
                "fake",
                &format!("Document {i} talks about rivers. It has two sentences."),
            )
        })
        .collect();
    app.publish_jobs(&jobs).await;

    let report = app.run_worker_until_idle().await;
    assert_eq!(report.finalized.jobs, 100);

    // Postgres: one job, one attempt, one result and one ledger row per job.
    let (distinct, rows) = app.result_rows().await;
    assert_eq!((distinct, rows), (100, 100));
    let counts: (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM jobs WHERE status = 'succeeded'), (SELECT count(*) FROM attempts),
                (SELECT count(*) FROM cost_ledger)",
    )
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(counts, (100, 100, 100));

    // The results topic: one message per job, routing key <tenant>.<batch>.<status>, valid schema.
    let deliveries = collect(&mut results, 100, Duration::from_secs(10)).await;
    let by_id: HashMap<Uuid, &str> = jobs
        .iter()
        .map(|j| (j.id, if j.batch.is_some() { "b1" } else { "_" }))
        .collect();
    let mut seen = HashSet::new();
    for delivery in &deliveries {
        let body: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap();
        Schema::Result
            .validate(&body)
            .unwrap_or_else(|e| panic!("result violates schema: {e}\n{body}"));
        let result: JobResult = serde_json::from_value(body).unwrap();
        assert_eq!(result.status, JobStatus::Succeeded);
        assert_eq!(
            delivery.routing_key.as_str(),
            format!("acme.{}.succeeded", by_id[&result.job_id])
        );
        assert_eq!(
            delivery
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_owned()),
            Some(result.job_id.to_string())
        );
        assert_eq!(delivery.properties.delivery_mode(), &Some(2));
        assert!(
            result
                .text()
                .is_some_and(|t| t.starts_with("Summary: Document"))
        );
        assert_eq!(result.provider.as_deref(), Some("fake"));
        assert_eq!(result.attempts.len(), 1);
        assert_eq!(result.attempts[0].key_id.as_deref(), Some("fake-key-1"));

        // The published cost equals the ledger's amount for this job, to the last decimal.
        let ledger: Decimal =
            sqlx::query_scalar("SELECT amount_usd FROM cost_ledger WHERE job_id = $1")
                .bind(result.job_id)
                .fetch_one(app.pool())
                .await
                .unwrap();
        assert_eq!(ledger, result.cost.amount_usd);
        assert!(ledger > Decimal::ZERO);
        let usage = result.cost.usage;
        let expected = (Decimal::from(usage.input_tokens) * Decimal::new(5, 1)
            + Decimal::from(usage.output_tokens) * Decimal::new(15, 1))
            / Decimal::from(1_000_000);
        assert_eq!(ledger, expected);
        // The row keeps the message as it was published, byte for byte.
        let stored: String = sqlx::query_scalar("SELECT body::text FROM results WHERE job_id = $1")
            .bind(result.job_id)
            .fetch_one(app.pool())
            .await
            .unwrap();
        assert_eq!(stored.as_bytes(), &delivery.data[..]);
        assert!(seen.insert(result.job_id), "one result message per job");
    }
    assert_eq!(seen.len(), 100);

    // The stored request and the audit row keep the text the worker wrote (`json`), not a
    // `jsonb` rendering of it (which reorders keys and adds spaces).
    let (request, details): (String, String) = sqlx::query_as(
        "SELECT j.request::text, a.details::text FROM jobs j
         JOIN audit_events a ON a.job_id = j.id AND a.kind = 'job_succeeded' WHERE j.id = $1",
    )
    .bind(jobs[0].id)
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(
        request,
        serde_json::to_value(&jobs[0].request).unwrap().to_string()
    );
    let written: serde_json::Value = serde_json::from_str(&details).unwrap();
    assert_eq!(details, written.to_string());

    // Events: cost and audit events for every job, each valid against its schema.
    let mut cost_jobs = HashSet::new();
    let mut audit_jobs = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while cost_jobs.len() < 100 || audit_jobs.len() < 100 {
        let delivery = collect_one(&mut events, deadline).await;
        for event in items(&delivery.data) {
            let key = delivery.routing_key.as_str();
            if key.starts_with("cost.") {
                assert_eq!(key, "cost.acme.fake");
                Schema::CostEvent.validate(&event).unwrap();
                cost_jobs.insert(event["job_id"].as_str().unwrap().to_owned());
            } else {
                assert_eq!(key, "audit.acme.job_succeeded");
                Schema::AuditEvent.validate(&event).unwrap();
                audit_jobs.insert(event["job_id"].as_str().unwrap().to_owned());
            }
        }
    }
    let audit_rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE kind = 'job_succeeded'")
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert_eq!(audit_rows, 100);
    assert_eq!(fake.requests().await, 100);
    app.cleanup().await;
}

async fn collect_one(
    consumer: &mut lapin::Consumer,
    deadline: tokio::time::Instant,
) -> lapin::message::Delivery {
    use futures::StreamExt;
    match tokio::time::timeout_at(deadline, consumer.next()).await {
        Ok(Some(Ok(delivery))) => delivery,
        other => panic!("no event arrived: {other:?}"),
    }
}

#[tokio::test]
async fn the_builtin_model_serves_the_default_route_at_zero_cost() {
    let app = spawn_app().await;
    let mut results = app.subscribe(false, "t1.#").await;
    let text = "Glaciers advance and retreat over centuries. The station measured the Hallvard glacier \
                every summer since 1998. Its tongue retreated four hundred meters in that time. \
                Meltwater now forms a lake at the front. Researchers expect the lake to double in size.";
    let j = job("t1", Some("docs"), "default", text);
    app.publish_job(&j).await;
    app.run_worker_until_idle().await;
    let delivery = collect(&mut results, 1, Duration::from_secs(10))
        .await
        .remove(0);
    let result: JobResult = serde_json::from_slice(&delivery.data).unwrap();
    assert_eq!(delivery.routing_key.as_str(), "t1.docs.succeeded");
    assert_eq!(result.provider.as_deref(), Some("extractive"));
    assert_eq!(result.cost.amount_usd, Decimal::ZERO);
    let summary = result.text().unwrap();
    assert!(
        !summary.is_empty() && summary.len() < text.len(),
        "{summary}"
    );
    assert!(result.cost.usage.input_tokens > 0 && result.cost.usage.output_tokens > 0);
    app.cleanup().await;
}

#[tokio::test]
async fn a_provider_error_is_a_failed_result_with_status_and_body_excerpt() {
    let fake = FakeProvider::start(&["--rate-500", "1"]);
    let app = spawn_app_with(&fake_provider_config(&fake.url)).await;
    let mut results = app.subscribe(false, "#").await;
    let j = job("acme", None, "fake", "Hello there. This will fail.");
    app.publish_job(&j).await;
    app.run_worker_until_idle().await;
    let delivery = collect(&mut results, 1, Duration::from_secs(10))
        .await
        .remove(0);
    let result: JobResult = serde_json::from_slice(&delivery.data).unwrap();
    assert_eq!(delivery.routing_key.as_str(), "acme._.failed");
    assert_eq!(result.status, JobStatus::Failed);
    // One call and one retry (the provider's default `max_retries = 1`), both 500.
    assert_eq!(result.attempts.len(), 2);
    assert_eq!(fake.requests().await, 2);
    let attempt = &result.attempts[1];
    assert_eq!(attempt.http_status, Some(500));
    assert_eq!(attempt.error_class.as_deref(), Some("server_error"));
    assert!(
        attempt
            .error
            .as_deref()
            .unwrap()
            .contains("The server had an error")
    );
    let error = result.error.unwrap();
    assert_eq!(error.code, "all_attempts_failed");
    assert!(
        error.message.contains("fake/fake-model"),
        "{}",
        error.message
    );
    let failed_attempts: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM attempts WHERE outcome = 'failed' AND http_status = 500",
    )
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(failed_attempts, 2);
    app.cleanup().await;
}
