//! Bad input never crashes a worker, never blocks the queue and is never lost: each case gets a
//! `rejected` result naming the exact problem, the original goes to the dead-letter queue with
//! an error header, and the next job is served.

use std::time::Duration;

use lapin::types::AMQPValue;
use serde_json::{Value, json};
use switchyard::messages::schema::Schema;
use switchyard::messages::{JobResult, JobStatus};
use switchyard::stages::finalize::ERROR_HEADER;
use uuid::Uuid;

use crate::helpers::{TestApp, collect, job, spawn_app, spawn_app_full};

/// Publishes `body`, then a good job; checks the rejection and that the good job succeeded.
async fn assert_rejected(
    app: TestApp,
    body: &[u8],
    message_id: Option<&str>,
    code: &str,
    path: Option<&str>,
) -> JobResult {
    let mut results = app.subscribe(false, "#").await;
    app.publish_raw(body, message_id).await;
    let good = job(
        "acme",
        None,
        "default",
        "A good job follows the bad one. It must still be served.",
    );
    app.publish_job(&good).await;
    app.run_worker_until_idle().await;

    let deliveries = collect(&mut results, 2, Duration::from_secs(10)).await;
    let mut rejected = None;
    let mut served = false;
    for delivery in deliveries {
        let value: Value = serde_json::from_slice(&delivery.data).unwrap();
        Schema::Result.validate(&value).unwrap();
        let result: JobResult = serde_json::from_value(value).unwrap();
        if result.job_id == good.id {
            assert_eq!(result.status, JobStatus::Succeeded);
            served = true;
        } else {
            assert!(
                delivery.routing_key.as_str().ends_with(".rejected"),
                "{}",
                delivery.routing_key
            );
            rejected = Some(result);
        }
    }
    assert!(served, "the job after the bad one was served");
    let rejected = rejected.expect("a rejected result was published");
    assert_eq!(rejected.status, JobStatus::Rejected);
    let error = rejected.error.clone().unwrap();
    assert_eq!(error.code, code, "{}", error.message);
    assert_eq!(error.path.as_deref(), path, "{}", error.message);

    // Kept for inspection: a `rejected` row in Postgres and the original in the dead-letter queue.
    let status: String = sqlx::query_scalar("SELECT status FROM results WHERE job_id = $1")
        .bind(rejected.job_id)
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(status, "rejected");
    let dead = app.drain_dead_letters().await;
    assert_eq!(dead.len(), 1, "exactly the bad message is dead-lettered");
    assert_eq!(dead[0].delivery.data, body, "the original bytes are kept");
    let headers = dead[0].delivery.properties.headers().clone().unwrap();
    let Some(AMQPValue::LongString(reason)) = headers.inner().get(ERROR_HEADER) else {
        panic!("no {ERROR_HEADER} header")
    };
    assert!(reason.to_string().starts_with(code), "{reason}");
    app.cleanup().await;
    rejected
}

fn valid_job() -> Value {
    serde_json::to_value(job("acme", Some("b7"), "default", "Hello. World.")).unwrap()
}

#[tokio::test]
async fn a_body_that_is_not_json_is_rejected() {
    let app = spawn_app().await;
    let id = Uuid::now_v7().to_string();
    let rejected = assert_rejected(app, b"this is not json", Some(&id), "invalid_json", None).await;
    assert_eq!(
        rejected.job_id.to_string(),
        id,
        "the AMQP message id names the rejected job"
    );
    assert!(rejected.error.unwrap().message.contains("not JSON"));
}

#[tokio::test]
async fn a_body_that_is_not_utf8_is_rejected() {
    let app = spawn_app().await;
    assert_rejected(
        app,
        b"{\"tenant\": \"\xc3\x28\"}",
        None,
        "invalid_utf8",
        None,
    )
    .await;
}

#[tokio::test]
async fn a_field_of_the_wrong_type_is_rejected_with_its_path() {
    let app = spawn_app().await;
    let mut bad = valid_job();
    bad["request"]["max_tokens"] = json!("lots");
    let rejected = assert_rejected(
        app,
        &serde_json::to_vec(&bad).unwrap(),
        None,
        "schema_violation",
        Some("/request/max_tokens"),
    )
    .await;
    assert_eq!(rejected.job_id.to_string(), bad["id"].as_str().unwrap());
    assert_eq!(rejected.tenant.as_deref(), Some("acme"));
    assert_eq!(rejected.batch.as_deref(), Some("b7"));
}

#[tokio::test]
async fn a_job_without_a_tenant_is_rejected_naming_the_field() {
    let app = spawn_app().await;
    let mut bad = valid_job();
    bad.as_object_mut().unwrap().remove("tenant");
    let rejected = assert_rejected(
        app,
        &serde_json::to_vec(&bad).unwrap(),
        None,
        "schema_violation",
        Some("/"),
    )
    .await;
    assert!(rejected.error.unwrap().message.contains("\"tenant\""));
    assert_eq!(rejected.tenant, None);
}

#[tokio::test]
async fn a_job_for_an_unknown_route_is_rejected() {
    let app = spawn_app().await;
    let mut bad = valid_job();
    bad["route"] = json!("no-such-route");
    let rejected = assert_rejected(
        app,
        &serde_json::to_vec(&bad).unwrap(),
        None,
        "unknown_route",
        Some("/route"),
    )
    .await;
    let message = rejected.error.unwrap().message;
    assert!(
        message.contains("no-such-route") && message.contains("default"),
        "{message}"
    );
}

#[tokio::test]
async fn an_oversize_body_is_rejected_without_being_parsed() {
    let app = spawn_app_full("max_message_bytes = 2048", "").await;
    let mut big = valid_job();
    big["request"]["messages"][0]["content"] = json!("x".repeat(4096));
    let rejected = assert_rejected(
        app,
        &serde_json::to_vec(&big).unwrap(),
        None,
        "too_large",
        None,
    )
    .await;
    assert!(rejected.error.unwrap().message.contains("limit is 2048"));
}

#[tokio::test]
async fn an_empty_message_list_is_rejected_with_its_path() {
    let app = spawn_app().await;
    let mut bad = valid_job();
    bad["request"]["messages"] = json!([]);
    assert_rejected(
        app,
        &serde_json::to_vec(&bad).unwrap(),
        None,
        "schema_violation",
        Some("/request/messages"),
    )
    .await;
}
