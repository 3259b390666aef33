//! Bad input never crashes a worker, never blocks the queue and is never lost: each case gets a
//! `rejected` result naming the exact problem, the original goes to the dead-letter queue with
//! an error header, and the next job is served.

use std::time::Duration;

use lapin::types::AMQPValue;
use serde_json::{Value, json};
use switchyard::messages::schema::Schema;
use switchyard::messages::{JobError, JobResult, JobStatus};
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

/// One malformed message and the rejection (or failure) it must end in.
struct Case {
    name: &'static str,
    body: Vec<u8>,
    status: JobStatus,
    code: &'static str,
    /// The JSON pointer of the offending field, for schema violations.
    path: Option<&'static str>,
    /// Text the error message must contain.
    says: &'static str,
}

/// A valid job with `id` and one change made by `edit`.
fn edited(id: Uuid, edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut value = valid_job();
    value["id"] = json!(id.to_string());
    edit(&mut value);
    serde_json::to_vec(&value).unwrap()
}

fn nested(depth: usize) -> Vec<u8> {
    let mut text = "[".repeat(depth);
    text.push_str(&"]".repeat(depth));
    text.into_bytes()
}

#[tokio::test]
async fn a_matrix_of_malformed_messages_each_ends_in_its_own_clear_error() {
    // A route whose only model has a tiny context window; it is never called.
    let app = spawn_app_full(
        "",
        r#"
[[providers]]
name = "tiny"
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
keys = [{ id = "k", env = "CARGO_MANIFEST_DIR" }]
models = [{ name = "tiny-model", context_window = 64 }]

[[routes]]
alias = "tiny"
targets = [{ provider = "tiny", model = "tiny-model" }]

[[routes]]
alias = "default"
targets = [{ provider = "extractive", model = "extractive-v1" }]

[[tenants]]
name = "guarded"
enforce_user_id = true
"#,
    )
    .await;
    let mut subscription = app.subscribe(false, "#").await;
    use JobStatus::{Failed, Rejected};
    let mut cases: Vec<(Uuid, Case)> = Vec::new();
    let mut add = |make: &dyn Fn(Uuid) -> Case| {
        let id = Uuid::now_v7();
        cases.push((id, make(id)));
    };
    let reject = |name, body, code, path, says| Case {
        name,
        body,
        status: Rejected,
        code,
        path,
        says,
    };
    add(&|_| {
        reject(
            "invalid UTF-8",
            b"{\"tenant\": \"\xc3\x28\"}".to_vec(),
            "invalid_utf8",
            None,
            "not UTF-8",
        )
    });
    add(&|_| {
        reject(
            "not JSON",
            b"hello, worker".to_vec(),
            "invalid_json",
            None,
            "not JSON",
        )
    });
    add(&|_| reject("an empty body", Vec::new(), "invalid_json", None, "EOF"));
    add(&|_| {
        reject(
            "truncated JSON",
            br#"{"schema": "switchyard.job.v1", "id": "#.to_vec(),
            "invalid_json",
            None,
            "EOF",
        )
    });
    add(&|_| {
        reject(
            "10,000 levels of nesting",
            nested(10_000),
            "invalid_json",
            None,
            "recursion limit",
        )
    });
    add(&|_| {
        reject(
            "a JSON array",
            b"[1, 2, 3]".to_vec(),
            "schema_violation",
            Some("/"),
            "not of type \"object\"",
        )
    });
    add(&|_| {
        reject(
            "a JSON string",
            b"\"a job\"".to_vec(),
            "schema_violation",
            Some("/"),
            "not of type \"object\"",
        )
    });
    add(&|_| {
        reject(
            "a 50 MB body",
            vec![b' '; 50 * 1024 * 1024],
            "too_large",
            None,
            "the limit is",
        )
    });
    add(&|id| {
        reject(
            "max_tokens of the wrong type",
            edited(id, |v| v["request"]["max_tokens"] = json!("lots")),
            "schema_violation",
            Some("/request/max_tokens"),
            "lots",
        )
    });
    add(&|id| {
        reject(
            "negative max_tokens",
            edited(id, |v| v["request"]["max_tokens"] = json!(-5)),
            "schema_violation",
            Some("/request/max_tokens"),
            "minimum of 1",
        )
    });
    add(&|id| {
        reject(
            "huge max_tokens",
            edited(id, |v| {
                v["request"]["max_tokens"] = json!(1_000_000_000_000u64)
            }),
            "schema_violation",
            Some("/request/max_tokens"),
            "maximum of 1000000",
        )
    });
    add(&|id| {
        reject(
            "temperature out of range",
            edited(id, |v| v["request"]["temperature"] = json!(7)),
            "schema_violation",
            Some("/request/temperature"),
            "maximum of 2",
        )
    });
    add(&|id| {
        reject(
            "a numeric tenant",
            edited(id, |v| v["tenant"] = json!(5)),
            "schema_violation",
            Some("/tenant"),
            "not of type \"string\"",
        )
    });
    add(&|id| {
        reject(
            "a tenant with routing-key wildcards",
            edited(id, |v| v["tenant"] = json!("acme.#")),
            "schema_violation",
            Some("/tenant"),
            "does not match",
        )
    });
    add(&|id| {
        reject(
            "a batch with a space",
            edited(id, |v| v["batch"] = json!("q 4")),
            "schema_violation",
            Some("/batch"),
            "q 4",
        )
    });
    add(&|id| {
        reject(
            "no tenant",
            edited(id, |v| {
                v.as_object_mut().unwrap().remove("tenant");
            }),
            "schema_violation",
            Some("/"),
            "\"tenant\" is a required property",
        )
    });
    add(&|id| {
        reject(
            "no request",
            edited(id, |v| {
                v.as_object_mut().unwrap().remove("request");
            }),
            "schema_violation",
            Some("/"),
            "\"request\" is a required property",
        )
    });
    add(&|id| {
        reject(
            "no messages",
            edited(id, |v| v["request"] = json!({"max_tokens": 5})),
            "schema_violation",
            Some("/request"),
            "\"messages\" is a required property",
        )
    });
    add(&|id| {
        reject(
            "an empty message list",
            edited(id, |v| v["request"]["messages"] = json!([])),
            "schema_violation",
            Some("/request/messages"),
            "[]",
        )
    });
    add(&|id| {
        reject(
            "messages that are not a list",
            edited(id, |v| v["request"]["messages"] = json!("hi")),
            "schema_violation",
            Some("/request/messages"),
            "not of type \"array\"",
        )
    });
    add(&|id| {
        reject(
            "an unknown role",
            edited(id, |v| {
                v["request"]["messages"][0]["role"] = json!("wizard")
            }),
            "schema_violation",
            Some("/request/messages/0/role"),
            "wizard",
        )
    });
    add(&|id| {
        reject(
            "numeric content",
            edited(id, |v| v["request"]["messages"][0]["content"] = json!(42)),
            "schema_violation",
            Some("/request/messages/0/content"),
            "42",
        )
    });
    add(&|id| {
        reject(
            "an unknown top-level field",
            edited(id, |v| v["priority"] = json!("high")),
            "schema_violation",
            Some("/"),
            "priority",
        )
    });
    add(&|_| {
        reject(
            "an id that is not a UUID",
            serde_json::to_vec(&{
                let mut v = valid_job();
                v["id"] = json!("job-1");
                v
            })
            .unwrap(),
            "schema_violation",
            Some("/id"),
            "job-1",
        )
    });
    add(&|id| {
        reject(
            "another schema version",
            edited(id, |v| v["schema"] = json!("switchyard.job.v2")),
            "schema_violation",
            Some("/schema"),
            "switchyard.job.v1",
        )
    });
    add(&|id| {
        reject(
            "a negative max_cost_usd",
            edited(id, |v| v["max_cost_usd"] = json!("-1")),
            "schema_violation",
            Some("/max_cost_usd"),
            "-1",
        )
    });
    add(&|id| {
        reject(
            "regions that are not a list",
            edited(id, |v| v["regions"] = json!("eu")),
            "schema_violation",
            Some("/regions"),
            "eu",
        )
    });
    add(&|id| {
        reject(
            "a NUL character",
            edited(id, |v| {
                v["request"]["messages"][0]["content"] = json!("a\u{0}b")
            }),
            "invalid_text",
            None,
            "NUL",
        )
    });
    add(&|id| {
        reject(
            "an unknown route",
            edited(id, |v| v["route"] = json!("no-such-route")),
            "unknown_route",
            Some("/route"),
            "no-such-route",
        )
    });
    add(&|id| {
        reject(
            "an image data URL that is not base64",
            edited(
                id,
                |v| v["request"]["messages"][0]["content"] = json!([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]),
            ),
            "invalid_image",
            Some("/request/messages/0/content/0/image_url/url"),
            "not valid base64",
        )
    });
    add(&|id| {
        reject(
            "an image data URL of text",
            edited(
                id,
                |v| v["request"]["messages"][0]["content"] = json!([{"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}]),
            ),
            "invalid_image",
            Some("/request/messages/0/content/0/image_url/url"),
            "not an image",
        )
    });
    add(&|id| {
        reject(
            "an image part without a URL",
            edited(id, |v| {
                v["request"]["messages"][0]["content"] =
                    json!([{"type": "image_url", "image_url": {}}])
            }),
            "invalid_image",
            Some("/request/messages/0/content/0/image_url/url"),
            "needs image_url.url",
        )
    });
    add(&|id| {
        reject(
            "a tenant the publisher may not act for",
            edited(id, |v| v["tenant"] = json!("guarded")),
            "tenant_not_authorized",
            None,
            "without a user_id property",
        )
    });
    add(&|id| Case {
        name: "a prompt larger than every context window",
        body: edited(id, |v| {
            v["route"] = json!("tiny");
            v["request"]["messages"][0]["content"] = json!("word ".repeat(500));
        }),
        status: Failed,
        code: "no_eligible_target",
        path: None,
        says: "context window",
    });
    assert!(cases.len() >= 30, "{} cases", cases.len());

    // Good jobs go first, in the middle and last: the bad ones block nothing.
    let goods: Vec<_> = (0..3)
        .map(|i| {
            job(
                "acme",
                None,
                "default",
                &format!("A good job, number {i}. It is served."),
            )
        })
        .collect();
    app.publish_job(&goods[0]).await;
    let middle = cases.len() / 2;
    for (n, (id, case)) in cases.iter().enumerate() {
        if n == middle {
            app.publish_job(&goods[1]).await;
        }
        app.publish_raw(&case.body, Some(&id.to_string())).await;
    }
    app.publish_job(&goods[2]).await;
    let report = app.run_worker_until_idle().await;
    assert_eq!(
        report.received as usize,
        cases.len() + goods.len(),
        "one worker took every message"
    );

    let mut results = std::collections::HashMap::new();
    for delivery in collect(
        &mut subscription,
        cases.len() + goods.len(),
        Duration::from_secs(30),
    )
    .await
    {
        let value: Value = serde_json::from_slice(&delivery.data).unwrap();
        Schema::Result.validate(&value).unwrap();
        let result: JobResult = serde_json::from_value(value).unwrap();
        results.insert(result.job_id, result);
    }
    for good in &goods {
        assert_eq!(
            results[&good.id].status,
            JobStatus::Succeeded,
            "good job {}",
            good.id
        );
    }
    let mut failures = Vec::new();
    for (id, case) in &cases {
        let Some(result) = results.get(id) else {
            failures.push(format!("{}: no result under its message id", case.name));
            continue;
        };
        let error = result
            .error
            .clone()
            .unwrap_or_else(|| JobError::new("", "no error"));
        if result.status != case.status
            || error.code != case.code
            || error.path.as_deref() != case.path
            || !error.message.contains(case.says)
        {
            failures.push(format!(
                "{}: expected {:?} {} at {:?} saying {:?}; got {:?} {} at {:?}: {}",
                case.name,
                case.status,
                case.code,
                case.path,
                case.says,
                result.status,
                error.code,
                error.path,
                error.message
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let rejected = cases.iter().filter(|(_, c)| c.status == Rejected).count();
    assert_eq!(
        app.drain_dead_letters().await.len(),
        rejected,
        "every rejected message is dead-lettered"
    );
    app.cleanup().await;
}
