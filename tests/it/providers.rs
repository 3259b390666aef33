//! The provider adapters end to end, through RabbitMQ and Postgres, against `fake-provider`
//! speaking each wire format: text, finish reason and usage; streaming with ordered chunks; a
//! cut stream that fails over with a void marker; key rotation past a revoked and an
//! exhausted key.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use switchyard::messages::schema::Schema;
use switchyard::messages::{JobResult, JobStatus};

use crate::helpers::{FakeProvider, TestApp, collect, job, spawn_app_with, switchyard};

/// Three providers (one per wire format) on one fake, and a route to each.
fn three_kinds(url: &str, extra_provider_lines: &str) -> String {
    let mut toml = String::new();
    for (name, kind, base) in [
        ("p-openai", "openai", format!("{url}/v1")),
        ("p-anthropic", "anthropic", url.to_owned()),
        ("p-gemini", "gemini", url.to_owned()),
    ] {
        toml.push_str(&format!(
            r#"
[[providers]]
name = "{name}"
kind = "{kind}"
base_url = "{base}"
timeout_secs = 5
max_retries = 0
{extra_provider_lines}
keys = [{{ id = "{name}-key", env = "CARGO_MANIFEST_DIR" }}]
models = [{{ name = "m-{kind}", prices = {{ input = "1", output = "2" }} }}]

[[routes]]
alias = "r-{kind}"
targets = [{{ provider = "{name}", model = "m-{kind}" }}]
"#
        ));
    }
    toml
}

fn stream_job(tenant: &str, route: &str, text: &str) -> switchyard::messages::Job {
    let mut j = job(tenant, None, route, text);
    j.request
        .extra
        .insert("stream".to_owned(), Value::Bool(true));
    j
}

const TEXT: &str =
    "Tides follow the moon across every ocean of the world. Sailors have timed them for centuries.";

#[tokio::test]
async fn one_route_per_wire_format_gives_text_finish_reason_and_usage() {
    let fake = FakeProvider::start(&[]);
    let app = spawn_app_with(&three_kinds(&fake.url, "")).await;
    let mut results = app.subscribe(false, "#").await;
    let jobs: Vec<_> = ["openai", "anthropic", "gemini"]
        .iter()
        .map(|kind| job("acme", None, &format!("r-{kind}"), TEXT))
        .collect();
    app.publish_jobs(&jobs).await;
    app.run_worker_until_idle().await;

    let deliveries = collect(&mut results, 3, Duration::from_secs(10)).await;
    let mut by_provider = HashMap::new();
    for delivery in deliveries {
        let value: Value = serde_json::from_slice(&delivery.data).unwrap();
        Schema::Result.validate(&value).unwrap();
        let result: JobResult = serde_json::from_value(value).unwrap();
        assert_eq!(result.status, JobStatus::Succeeded, "{:?}", result.error);
        assert_eq!(
            result.text(),
            Some("Summary: Tides follow the moon across every ocean of the world.")
        );
        let response = result.response.as_ref().unwrap();
        assert_eq!(response["object"], "chat.completion");
        assert_eq!(response["choices"][0]["finish_reason"], "stop");
        let usage = result.cost.usage;
        assert!(
            usage.input_tokens > 10 && usage.output_tokens > 5,
            "{usage:?}"
        );
        assert_eq!(response["usage"]["prompt_tokens"], usage.input_tokens);
        assert_eq!(response["usage"]["completion_tokens"], usage.output_tokens);
        // input at $1/M and output at $2/M.
        let expected = rust_decimal::Decimal::from(usage.input_tokens + 2 * usage.output_tokens)
            / rust_decimal::Decimal::from(1_000_000);
        assert_eq!(result.cost.amount_usd, expected);
        by_provider.insert(
            result.provider.clone().unwrap(),
            response["choices"][0]["native_finish_reason"].clone(),
        );
    }
    assert_eq!(by_provider["p-openai"], "stop");
    assert_eq!(by_provider["p-anthropic"], "end_turn");
    assert_eq!(by_provider["p-gemini"], "STOP");
    let stats = fake.stats().await;
    for format in ["openai", "anthropic", "gemini"] {
        assert_eq!(stats["by_format"][format], 1, "{stats}");
    }
    app.cleanup().await;
}

/// Collects a streamed job's chunks until its result arrives.
async fn chunks_and_result(
    app: &TestApp,
    tenant: &str,
    job_id: uuid::Uuid,
) -> (Vec<Value>, JobResult) {
    let mut events = app
        .subscribe(true, &format!("stream.{tenant}.{job_id}"))
        .await;
    let mut results = app.subscribe(false, &format!("{tenant}.#")).await;
    app.run_worker_until_idle().await;
    let result: JobResult =
        serde_json::from_slice(&collect(&mut results, 1, Duration::from_secs(10)).await[0].data)
            .unwrap();
    let mut chunks = Vec::new();
    while let Ok(Some(Ok(delivery))) =
        tokio::time::timeout(Duration::from_millis(500), events.next()).await
    {
        let chunk: Value = serde_json::from_slice(&delivery.data).unwrap();
        Schema::StreamChunk.validate(&chunk).unwrap();
        chunks.push(chunk);
    }
    (chunks, result)
}

#[tokio::test]
async fn a_streamed_job_yields_ordered_chunks_and_a_final_result_for_every_wire_format() {
    let fake = FakeProvider::start(&[]);
    let app = spawn_app_with(&three_kinds(&fake.url, "")).await;
    for kind in ["openai", "anthropic", "gemini"] {
        let j = stream_job("acme", &format!("r-{kind}"), TEXT);
        app.publish_job(&j).await;
        let (chunks, result) = chunks_and_result(&app, "acme", j.id).await;
        assert_eq!(
            result.status,
            JobStatus::Succeeded,
            "{kind}: {:?}",
            result.error
        );
        assert!(chunks.len() >= 3, "{kind}: only {} chunks", chunks.len());
        let seqs: Vec<u64> = chunks.iter().map(|c| c["seq"].as_u64().unwrap()).collect();
        assert_eq!(
            seqs,
            (0..chunks.len() as u64).collect::<Vec<_>>(),
            "{kind}: chunks in order"
        );
        let text: String = chunks.iter().map(|c| c["text"].as_str().unwrap()).collect();
        assert_eq!(
            Some(text.as_str()),
            result.text(),
            "{kind}: chunks add up to the result"
        );
        assert!(
            result.cost.usage.output_tokens > 0,
            "{kind}: streamed usage is recorded"
        );
    }
    app.cleanup().await;
}

#[tokio::test]
async fn a_cut_stream_fails_over_and_subscribers_are_told_the_first_attempt_is_void() {
    let broken = FakeProvider::start(&["--rate-cut", "1"]);
    let healthy = FakeProvider::start(&[]);
    let config = format!(
        r#"
[[providers]]
name = "broken"
kind = "openai"
base_url = "{}/v1"
max_retries = 0
keys = [{{ id = "b", env = "CARGO_MANIFEST_DIR" }}]
models = [{{ name = "m" }}]

[[providers]]
name = "healthy"
kind = "anthropic"
base_url = "{}"
keys = [{{ id = "h", env = "CARGO_MANIFEST_DIR" }}]
models = [{{ name = "claude-x" }}]

[[routes]]
alias = "chain"
targets = [{{ provider = "broken", model = "m" }}, {{ provider = "healthy", model = "claude-x" }}]
"#,
        broken.url, healthy.url
    );
    let app = spawn_app_with(&config).await;
    let j = stream_job("acme", "chain", TEXT);
    app.publish_job(&j).await;
    let (chunks, result) = chunks_and_result(&app, "acme", j.id).await;

    assert_eq!(result.status, JobStatus::Succeeded);
    assert_eq!(result.provider.as_deref(), Some("healthy"));
    assert_eq!(result.attempts.len(), 2);
    assert_eq!(
        result.attempts[0].error_class.as_deref(),
        Some("stream_interrupted")
    );
    let void_at = chunks
        .iter()
        .position(|c| c["kind"] == "void")
        .expect("a void chunk is published");
    assert_eq!(chunks[void_at]["attempt"], 1);
    assert!(void_at > 0, "the cut stream had sent chunks first");
    assert!(
        chunks[..void_at]
            .iter()
            .all(|c| c["attempt"] == 1 && c["kind"] == "delta")
    );
    let after: String = chunks[void_at + 1..]
        .iter()
        .inspect(|c| assert_eq!(c["attempt"], 2))
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        Some(after.as_str()),
        result.text(),
        "the second attempt's chunks are the answer"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_revoked_and_an_exhausted_key_are_taken_out_and_the_third_key_serves_every_job() {
    let fake = FakeProvider::start(&[]);
    let config = format!(
        r#"
[[providers]]
name = "multi"
kind = "openai"
base_url = "{}/v1"
keys = [
  {{ id = "k-revoked", env = "SY_TEST_KEY_REVOKED" }},
  {{ id = "k-exhausted", env = "SY_TEST_KEY_EXHAUSTED" }},
  {{ id = "k-good", env = "SY_TEST_KEY_GOOD" }},
]
models = [{{ name = "m" }}]

[[routes]]
alias = "multi"
targets = [{{ provider = "multi", model = "m" }}]
"#,
        fake.url
    );
    let app = spawn_app_with(&config).await;
    let jobs: Vec<_> = (0..30)
        .map(|i| {
            job(
                "acme",
                Some("keys"),
                "multi",
                &format!("Job {i}. Keys rotate."),
            )
        })
        .collect();
    app.publish_jobs(&jobs).await;
    // A separate process, so the keys' environment variables can be set for it alone.
    let status = switchyard(&app)
        .args(["worker", "--exit-when-idle", "--concurrency", "4"])
        .env("SY_TEST_KEY_REVOKED", "revoked")
        .env("SY_TEST_KEY_EXHAUSTED", "exhausted")
        .env("SY_TEST_KEY_GOOD", "good")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());

    let succeeded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM results WHERE status = 'succeeded'")
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert_eq!(succeeded, 30);
    let winners: Vec<(Option<String>, i64)> = sqlx::query_as(
        "SELECT key_id, count(*) FROM attempts WHERE outcome = 'succeeded' GROUP BY key_id",
    )
    .fetch_all(app.pool())
    .await
    .unwrap();
    assert_eq!(winners, vec![(Some("k-good".to_owned()), 30)]);
    let audited: Vec<(String, String)> = sqlx::query_as(
        "SELECT DISTINCT kind, details->>'key_id' FROM audit_events WHERE kind LIKE 'key_%' ORDER BY kind",
    )
    .fetch_all(app.pool())
    .await
    .unwrap();
    assert_eq!(
        audited,
        vec![
            ("key_disabled".to_owned(), "k-revoked".to_owned()),
            ("key_exhausted".to_owned(), "k-exhausted".to_owned())
        ]
    );
    let stats = fake.stats().await;
    // Each bad key is taken out after its first failure (a few jobs may race it at once).
    assert!(
        stats["by_auth"]["revoked"].as_u64().unwrap() <= 4,
        "{stats}"
    );
    assert!(
        stats["by_auth"]["exhausted"].as_u64().unwrap() <= 4,
        "{stats}"
    );
    assert_eq!(stats["by_auth"]["good"], 30);
    app.cleanup().await;
}
