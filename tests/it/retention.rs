//! Per-tenant retention, read back from Postgres: `full` keeps prompts and outputs, `hash`
//! keeps only their SHA-256, `none` keeps neither. Published results carry the output in
//! every mode; a redelivered duplicate under `hash` is answered without it.

use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};
use switchyard::messages::schema::Schema;
use switchyard::messages::{Job, JobResult, JobStatus};

use crate::helpers::{TestApp, collect, job, spawn_app_with};
use crate::secrets::dump_database;

const TENANTS: &str = r#"
[[tenants]]
name = "keeper"

[[tenants]]
name = "digest"
retention = "hash"

[[tenants]]
name = "forget"
retention = "none"
"#;

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A job whose prompt (and so the extractive summary of it) carries a unique marker.
fn marked(tenant: &str) -> (Job, String) {
    let marker = format!("Marker{}{}", tenant, uuid::Uuid::now_v7().simple());
    let text = format!(
        "The {marker} protocol keeps its secrets well. Nobody outside the team has read the {marker} file."
    );
    (job(tenant, Some("r"), "default", &text), marker)
}

async fn stored(app: &TestApp, job: &Job) -> (Option<Value>, Option<String>, Value) {
    sqlx::query_as(
        "SELECT j.request, j.request_sha256, r.body FROM jobs j JOIN results r ON r.job_id = j.id WHERE j.id = $1",
    )
    .bind(job.id)
    .fetch_one(app.pool())
    .await
    .unwrap()
}

#[tokio::test]
async fn retention_full_hash_and_none_store_what_they_promise() {
    let app = spawn_app_with(TENANTS).await;
    let mut results = app.subscribe(false, "#").await;
    let (keeper, keeper_marker) = marked("keeper");
    let (digest, digest_marker) = marked("digest");
    let (forget, forget_marker) = marked("forget");
    // A rejected message of a `none` tenant: its raw body must not be kept either.
    let mut unroutable = marked("forget");
    unroutable.0.route = "no-such-route".to_owned();
    app.publish_jobs(&[
        keeper.clone(),
        digest.clone(),
        forget.clone(),
        unroutable.0.clone(),
    ])
    .await;
    app.run_worker_until_idle().await;

    // Every published result carries the output, whatever the retention.
    let mut published = std::collections::HashMap::new();
    for delivery in collect(&mut results, 4, Duration::from_secs(10)).await {
        let value: Value = serde_json::from_slice(&delivery.data).unwrap();
        Schema::Result.validate(&value).unwrap();
        let result: JobResult = serde_json::from_value(value).unwrap();
        published.insert(result.job_id, result);
    }
    for (job, marker) in [
        (&keeper, &keeper_marker),
        (&digest, &digest_marker),
        (&forget, &forget_marker),
    ] {
        let result = &published[&job.id];
        assert_eq!(result.status, JobStatus::Succeeded);
        assert!(result.retention.is_none());
        let content = result.response.as_ref().unwrap()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap();
        assert!(
            content.contains(marker.as_str()),
            "the output carries the marker: {content}"
        );
    }
    assert_eq!(published[&unroutable.0.id].status, JobStatus::Rejected);
    assert!(
        published[&unroutable.0.id]
            .error
            .as_ref()
            .unwrap()
            .message
            .contains("no-such-route")
    );

    // full: the request and the output are stored.
    let (request, request_sha256, body) = stored(&app, &keeper).await;
    assert!(request.unwrap().to_string().contains(&keeper_marker));
    assert_eq!(request_sha256, None);
    assert!(
        body["response"]["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains(&keeper_marker)
    );
    assert!(body.get("retention").is_none());

    // hash: digests only.
    let (request, request_sha256, body) = stored(&app, &digest).await;
    assert_eq!(
        request, None,
        "jobs.request stays NULL: the job cannot be replayed"
    );
    let request_text = serde_json::to_value(&digest.request).unwrap().to_string();
    assert_eq!(
        request_sha256.as_deref(),
        Some(sha256(request_text.as_bytes()).as_str())
    );
    assert_eq!(body["response"]["choices"], Value::Array(Vec::new()));
    let published_choices = published[&digest.id].response.as_ref().unwrap()["choices"].to_string();
    assert_eq!(body["retention"]["mode"], "hash");
    assert_eq!(
        body["retention"]["output_sha256"],
        sha256(published_choices.as_bytes()).as_str()
    );
    let request_sha256 = request_sha256.unwrap();
    assert_eq!(body["retention"]["request_sha256"], request_sha256.as_str());
    // The audit event carries the same digest (finalize hashes the request once for both).
    let audit: Value = sqlx::query_scalar(
        "SELECT details FROM audit_events WHERE job_id = $1 AND kind = 'job_succeeded'",
    )
    .bind(digest.id)
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(audit["request_sha256"], request_sha256.as_str(), "{audit}");
    // Usage and cost stay: they are not the prompt.
    assert!(body["cost"]["usage"]["output_tokens"].as_u64().unwrap() > 0);

    // none: neither, nor any digest.
    let (request, request_sha256, body) = stored(&app, &forget).await;
    assert_eq!((request, request_sha256), (None, None));
    assert_eq!(body["response"]["choices"], Value::Array(Vec::new()));
    assert_eq!(body["retention"], serde_json::json!({ "mode": "none" }));
    let (audit, provenance): (Value, Value) =
        sqlx::query_as("SELECT details, provenance FROM audit_events WHERE job_id = $1")
            .bind(forget.id)
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert!(audit.get("request_sha256").is_none(), "{audit}");
    // Nor a digest of the whole message, which holds the prompt (other tenants' events
    // keep theirs).
    assert!(provenance["message_sha256"].is_null(), "{provenance}");
    let kept: Value = sqlx::query_scalar("SELECT provenance FROM audit_events WHERE job_id = $1")
        .bind(digest.id)
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert!(kept["message_sha256"].is_string(), "{kept}");
    let raw: Option<Vec<u8>> = sqlx::query_scalar("SELECT raw_body FROM jobs WHERE id = $1")
        .bind(unroutable.0.id)
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(
        raw, None,
        "a rejected message's body is not kept under none"
    );

    // Nothing of the hash and none tenants' prompts or outputs is anywhere in Postgres.
    let dump = dump_database(app.pool()).await;
    assert!(
        dump.contains(&keeper_marker),
        "the dump sees stored prompts"
    );
    for marker in [&digest_marker, &forget_marker, &unroutable.1] {
        assert!(
            !dump.contains(marker.as_str()),
            "{marker} is stored somewhere"
        );
    }

    // A redelivered duplicate of a `hash` job is answered from Postgres: no output, and says so.
    app.publish_job(&digest).await;
    app.run_worker_until_idle().await;
    let delivery = collect(&mut results, 1, Duration::from_secs(10))
        .await
        .remove(0);
    let value: Value = serde_json::from_slice(&delivery.data).unwrap();
    Schema::Result.validate(&value).unwrap();
    assert_eq!(value["job_id"], digest.id.to_string());
    assert_eq!(value["status"], "succeeded");
    assert_eq!(value["retention"]["mode"], "hash");
    assert_eq!(value["response"]["choices"], Value::Array(Vec::new()));
    let (results_rows, _) = app.result_rows().await;
    assert_eq!(results_rows, 4, "the duplicate added no result");
    app.cleanup().await;
}
