//! Bulk work: `summarize` at scale (map-reduce of long documents, resumable batches), OpenAI
//! Batch files in and out (`batch submit|status|results|cancel`) and `replay`.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::helpers::{
    FakeProvider, TestApp, job, rabbitmqctl, read_lines, spawn_app_with, switchyard, wait_all,
    workers,
};

/// Two OpenAI-style providers behind route `docs` (primary, then fallback), each model with a
/// `window`-token context window, and circuit breakers that never open.
fn two_providers(primary: &str, backup: &str, window: u32) -> String {
    let provider = |name: &str, url: &str| {
        format!(
            r#"
[[providers]]
name = "{name}"
kind = "openai"
base_url = "{url}/v1"
timeout_secs = 5
max_retries = 0
keys = [{{ id = "{name}-key", env = "CARGO_MANIFEST_DIR" }}]
models = [{{ name = "m", context_window = {window}, prices = {{ input = "0.5", output = "1.5" }} }}]
"#
        )
    };
    format!(
        r#"{}{}
[[routes]]
alias = "docs"
targets = [{{ provider = "primary", model = "m" }}]
fallback = [{{ provider = "backup", model = "m" }}]

[[routes]]
alias = "default"
targets = [{{ provider = "extractive", model = "extractive-v1" }}]

[routing]
breaker_consecutive_failures = 1000000
breaker_error_rate = 1.5
"#,
        provider("primary", primary),
        provider("backup", backup),
    )
}

/// A short document: a few sentences naming `n`.
fn short_document(n: usize) -> String {
    format!(
        "Report {n} describes the harbour in week {n}. Ships arrived on time and cranes worked \
         well. The harbour master counted {n} containers. Nothing else happened.\n"
    )
}

/// A long document of `paragraphs` paragraphs of five sentences.
fn long_document(paragraphs: usize) -> String {
    (0..paragraphs)
        .map(|p| {
            (0..5)
                .map(|s| {
                    format!(
                        "In section {p} the archive records fact {s} about river traffic, lock \
                         maintenance and the price of grain at the northern market."
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

#[tokio::test]
async fn summarize_1000_documents_through_transient_failures_and_map_reduce_a_long_one() {
    let primary = FakeProvider::start(&["--rate-503", "0.1", "--seed", "7"]);
    let backup = FakeProvider::start(&[]);
    let window = 1500;
    let app = spawn_app_with(&two_providers(&primary.url, &backup.url, window)).await;
    let dir = tempfile::tempdir().unwrap();
    let docs = dir.path().join("docs");
    std::fs::create_dir(&docs).unwrap();
    for n in 0..999 {
        std::fs::write(docs.join(format!("doc-{n:04}.txt")), short_document(n)).unwrap();
    }
    let long = long_document(150);
    let long_tokens = switchyard::tokens::count(&long);
    assert!(
        long_tokens >= 5 * window as usize,
        "the long document has {long_tokens} tokens"
    );
    std::fs::write(docs.join("doc-long.md"), &long).unwrap();
    let out = dir.path().join("out.jsonl");

    let output = switchyard(&app)
        .args(["summarize", docs.to_str().unwrap(), "--route", "docs"])
        .args(["--batch", "big", "--max-tokens", "100", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("1000 documents, 1000 succeeded, 0 failed"),
        "{stderr}"
    );
    let lines = read_lines(&out);
    assert_eq!(lines.len(), 1000);
    assert!(lines.iter().all(|l| l["status"] == "succeeded"));
    for (n, line) in lines.iter().take(999).enumerate() {
        assert!(
            line["path"]
                .as_str()
                .unwrap()
                .ends_with(&format!("doc-{n:04}.txt"))
        );
        assert_eq!(line["chunks"], 1);
        assert!(
            line["summary"]
                .as_str()
                .unwrap()
                .contains(&format!("Report {n} "))
        );
    }
    // The long document was split into at least five pieces, each summarized, then combined.
    let long_line = &lines[999];
    assert!(long_line["path"].as_str().unwrap().ends_with("doc-long.md"));
    let chunks = long_line["chunks"].as_u64().unwrap();
    assert!(chunks >= 5, "{long_line}");
    assert_eq!(
        long_line["jobs"].as_u64().unwrap(),
        chunks + 1,
        "{long_line}"
    );
    let steps: Vec<(String, Value)> = sqlx::query_as(
        "SELECT i.item_key, j.request FROM batch_items i JOIN jobs j ON j.id = i.job_id
         WHERE i.batch = 'big' AND i.item_key LIKE '%doc-long.md@%' ORDER BY i.item_key",
    )
    .fetch_all(app.pool())
    .await
    .unwrap();
    assert_eq!(steps.len() as u64, chunks + 1);
    let combine = steps.iter().find(|(key, _)| key.ends_with("/L1")).unwrap();
    let combined_input = combine.1["messages"][1]["content"].as_str().unwrap();
    assert_eq!(
        combined_input.split("\n\n").count() as u64,
        chunks,
        "the final job combines every piece summary"
    );
    for (key, request) in &steps {
        let prompt = request["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| switchyard::tokens::count(m["content"].as_str().unwrap()))
            .sum::<usize>();
        assert!(
            prompt + 100 <= window as usize,
            "{key}: {prompt} prompt tokens do not fit the window"
        );
    }
    // The primary really failed some calls, and the fallback answered them.
    let failed = primary.stats().await["by_status"]["503"]
        .as_u64()
        .unwrap_or(0);
    assert!(failed > 0, "{}", primary.stats().await);
    assert!(backup.requests().await >= failed);
    app.cleanup().await;
}

async fn wait_for_requests(fake: &FakeProvider, at_least: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while fake.requests().await < at_least {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the provider got only {} requests",
            fake.requests().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last document is also named a second time: its two copies share one job in the first
/// run, and the resumed run waits for that job (published, not yet answered) for both.
#[tokio::test]
async fn an_interrupted_summarize_resumes_without_sending_any_document_twice() {
    let primary = FakeProvider::start(&["--latency-ms", "300"]);
    let backup = FakeProvider::start(&[]);
    let app = spawn_app_with(&two_providers(&primary.url, &backup.url, 100_000)).await;
    let dir = tempfile::tempdir().unwrap();
    for n in 0..40 {
        std::fs::write(dir.path().join(format!("d{n:02}.txt")), short_document(n)).unwrap();
    }
    let out = dir.path().join("out.jsonl");
    let again = dir.path().join("d39.txt");
    let run = || {
        let mut command = switchyard(&app);
        command
            .env("SWITCHYARD_WORKER__CONCURRENCY", "4")
            .args(["summarize", dir.path().to_str().unwrap()])
            .arg(&again)
            .args(["--route", "docs"])
            .args(["--batch", "resumable", "--out"])
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    };
    let first = run().spawn().unwrap();
    wait_for_requests(&primary, 8).await;
    let interrupted = std::process::Command::new("kill")
        .args(["-INT", &first.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let output = tokio::task::spawn_blocking(move || first.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("--batch resumable"), "{stderr}");
    let sent_first = primary.requests().await;
    assert!(sent_first < 40, "the first run was interrupted early");
    let (published, answered): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(r.job_id) FROM batch_items b
         LEFT JOIN results r ON r.job_id = b.job_id
         WHERE b.item_key LIKE '%d39.txt%' AND b.published",
    )
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(
        (published, answered),
        (1, 0),
        "the twice-named document has one job, published and not yet answered"
    );

    let output = run().output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let lines = read_lines(&out);
    assert_eq!(lines.len(), 41, "a line for each document named");
    assert!(
        lines.iter().all(|l| l["status"] == "succeeded"),
        "{lines:?}"
    );
    // Its two lines share one job, counted once.
    let jobs: u64 = lines.iter().map(|l| l["jobs"].as_u64().unwrap()).sum();
    assert_eq!(jobs, 40, "{lines:?}");
    // Every distinct document reached a provider exactly once over both runs.
    assert_eq!(primary.requests().await, 40);
    assert_eq!(backup.requests().await, 0);
    let billed: i64 = sqlx::query_scalar("SELECT count(*) FROM cost_ledger")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(billed, 40);
    app.cleanup().await;
}

/// An OpenAI Batch input line.
fn batch_line(custom_id: &str, text: &str) -> String {
    serde_json::json!({
        "custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
        "body": { "model": "gpt-4o-mini", "messages": [{ "role": "user", "content": text }], "max_tokens": 50 },
    })
    .to_string()
}

fn batch(app: &TestApp, args: &[&str]) -> std::process::Output {
    switchyard(app).arg("batch").args(args).output().unwrap()
}

fn status_json(app: &TestApp, id: &str) -> Value {
    let output = batch(app, &["status", id, "--json"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test]
async fn an_openai_batch_file_round_trips_with_invalid_lines_reported_by_number() {
    let fake = FakeProvider::start(&[]);
    let app = spawn_app_with(&crate::helpers::fake_provider_config(&fake.url)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut lines = Vec::new();
    let mut valid = BTreeSet::new();
    let invalid_lines: BTreeSet<usize> = (1..=200)
        .filter(|n| [3, 6, 9, 12, 15, 18].contains(&(n % 20)))
        .collect();
    for n in 1..=200usize {
        let id = format!("req-{n}");
        let line = match n % 20 {
            3 => "{not json".to_owned(),
            6 => r#"{"method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"x"}]}}"#.to_owned(),
            9 => batch_line(&id, "x").replace("/v1/chat/completions", "/v1/embeddings"),
            12 => batch_line(&id, "x").replace("\"POST\"", "\"GET\""),
            15 => batch_line(&id, "x").replace("\"max_tokens\":50", "\"max_tokens\":-3"),
            18 => batch_line("req-1", "a duplicate custom_id"),
            _ => {
                valid.insert(id.clone());
                batch_line(&id, &format!("Request {n} asks about the harbour. It is short."))
            }
        };
        lines.push(line);
    }
    let input = dir.path().join("input.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    assert_eq!(valid.len(), 140);
    assert_eq!(invalid_lines.len(), 60);

    // Without --skip-invalid nothing is submitted, and every invalid line is named.
    let output = batch(
        &app,
        &["submit", input.to_str().unwrap(), "--route", "fake"],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    for n in &invalid_lines {
        assert!(
            stderr.contains(&format!(": line {n}: ")),
            "line {n} not reported: {stderr}"
        );
    }
    assert!(stderr.contains("line 6: custom_id: missing"), "{stderr}");
    assert!(stderr.contains("line 9: url: only"), "{stderr}");
    assert!(stderr.contains("line 12: method:"), "{stderr}");
    assert!(stderr.contains("line 15: body.max_tokens:"), "{stderr}");
    assert!(
        stderr.contains("line 18: custom_id: \"req-1\" duplicates line 1"),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was submitted"), "{stderr}");
    let batches: i64 = sqlx::query_scalar("SELECT count(*) FROM batches")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(batches, 0);

    let output = batch(
        &app,
        &[
            "submit",
            input.to_str().unwrap(),
            "--route",
            "fake",
            "--skip-invalid",
        ],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let id = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    assert!(id.starts_with("batch_"), "{id}");
    let status = status_json(&app, &id);
    assert_eq!(status["status"], "in_progress");
    assert_eq!(status["request_counts"]["total"], 140);
    assert_eq!(status["request_counts"]["invalid"], 60);

    wait_all(workers(&app, 1, 16)).await;
    let status = status_json(&app, &id);
    assert_eq!(status["status"], "completed", "{status}");
    assert_eq!(status["request_counts"]["completed"], 140);
    assert_eq!(status["request_counts"]["failed"], 0);
    assert!(status["completed_at"].is_string());
    assert_ne!(status["cost_usd"], "0");
    let human = batch(&app, &["status", &id]);
    assert!(String::from_utf8_lossy(&human.stdout).contains("status    completed"));

    let out = dir.path().join("output.jsonl");
    let errors = dir.path().join("errors.jsonl");
    let output = batch(
        &app,
        &[
            "results",
            &id,
            "--out",
            out.to_str().unwrap(),
            "--errors",
            errors.to_str().unwrap(),
        ],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let results = read_lines(&out);
    assert_eq!(results.len(), 140);
    let mut seen = BTreeSet::new();
    for line in &results {
        let keys: BTreeSet<&str> = line
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            BTreeSet::from(["id", "custom_id", "response", "error"])
        );
        assert!(line["id"].as_str().unwrap().starts_with("batch_req_"));
        assert!(line["error"].is_null());
        assert_eq!(line["response"]["status_code"], 200);
        assert!(line["response"]["request_id"].is_string());
        let body = &line["response"]["body"];
        assert_eq!(body["object"], "chat.completion");
        let custom_id = line["custom_id"].as_str().unwrap();
        let n = custom_id.strip_prefix("req-").unwrap();
        assert!(
            body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .contains(&format!("Request {n} asks")),
            "{line}"
        );
        assert!(seen.insert(custom_id.to_owned()), "{custom_id} twice");
    }
    assert_eq!(seen, valid);
    let error_lines = read_lines(&errors);
    assert_eq!(error_lines.len(), 60);
    assert!(
        error_lines.iter().all(|l| l["response"].is_null()
            && l["error"]["message"].as_str().unwrap().starts_with("line "))
    );
    app.cleanup().await;
}

#[tokio::test]
async fn cancelling_a_batch_ends_unstarted_requests_and_keeps_running_ones() {
    let fake = FakeProvider::start(&["--latency-ms", "1500"]);
    let app = spawn_app_with(&crate::helpers::fake_provider_config(&fake.url)).await;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.jsonl");
    let lines: Vec<String> = (0..20)
        .map(|n| batch_line(&format!("c{n}"), &format!("Item {n}.")))
        .collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let output = batch(
        &app,
        &["submit", input.to_str().unwrap(), "--route", "fake"],
    );
    assert!(output.status.success());
    let id = String::from_utf8(output.stdout).unwrap().trim().to_owned();

    let running = workers(&app, 1, 4);
    wait_for_requests(&fake, 4).await;
    let output = batch(&app, &["cancel", &id]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    wait_all(running).await;

    let status = status_json(&app, &id);
    assert_eq!(status["status"], "cancelled", "{status}");
    let started = fake.requests().await;
    assert_eq!(
        started, 4,
        "only the jobs already running reached the provider"
    );
    assert_eq!(status["request_counts"]["completed"], 4, "{status}");
    assert_eq!(status["request_counts"]["cancelled"], 16, "{status}");
    // Nothing paid for is lost: every billed call has its successful result.
    let billed: i64 = sqlx::query_scalar("SELECT count(*) FROM cost_ledger")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(billed, 4);
    let out = dir.path().join("out.jsonl");
    let output = batch(&app, &["results", &id, "--out", out.to_str().unwrap()]);
    assert!(output.status.success());
    let results = read_lines(&out);
    assert_eq!(results.len(), 20);
    assert_eq!(
        results
            .iter()
            .filter(|l| l["error"]["code"] == "cancelled")
            .count(),
        16
    );
    app.cleanup().await;
}

/// A submission the broker stops part way (here the jobs queue refuses publishes past about
/// 100 messages) fails naming the batch and the command that goes on. `--resume` with another
/// file publishes nothing; with the batch's own file it publishes the rest under their stored
/// job ids, and every request is answered, and billed, once.
#[tokio::test]
async fn a_submission_stopped_part_way_resumes_without_running_any_request_twice() {
    let fake = FakeProvider::start(&[]);
    let app = spawn_app_with(&crate::helpers::fake_provider_config(&fake.url)).await;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.jsonl");
    let lines: Vec<String> = (0..600)
        .map(|n| batch_line(&format!("c{n}"), &format!("Item {n}.")))
        .collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let policy = format!("{}-cap", app.names.prefix());
    let pattern = format!("^{}$", app.names.jobs_queue().replace('.', "\\."));
    rabbitmqctl(&[
        "set_policy",
        "--apply-to",
        "queues",
        &policy,
        &pattern,
        r#"{"max-length": 100, "overflow": "reject-publish"}"#,
    ]);
    // The broker applies a policy to its queue a moment after it is set.
    let applied = || {
        let output = std::process::Command::new("rabbitmqctl")
            .args(["-q", "list_queues", "name", "policy"])
            .output()
            .expect("rabbitmqctl runs");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .any(|line| line.starts_with(&app.names.jobs_queue()) && line.contains(&policy))
    };
    for _ in 0..50 {
        if applied() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(applied(), "the policy reaches the jobs queue");
    let output = batch(
        &app,
        &["submit", input.to_str().unwrap(), "--route", "fake"],
    );
    rabbitmqctl(&["clear_policy", &policy]);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "{stderr}");
    let id = stderr
        .split("--resume ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("the error says how to resume: {stderr}"))
        .trim_end_matches('`')
        .to_owned();
    assert!(stderr.contains(&format!("batch cancel {id}")), "{stderr}");
    let status = status_json(&app, &id);
    assert_eq!(status["status"], "validating", "{status}");
    assert_eq!(status["request_counts"]["pending"], 600, "{status}");
    // Whole chunks are marked published once confirmed: none, or some, but not all.
    let published = count(&app, "SELECT count(*) FROM batch_items WHERE published").await;
    assert!(
        published < 600,
        "the submission stopped part way: {published} published"
    );

    let other = dir.path().join("other.jsonl");
    let other_lines: Vec<String> = (0..600)
        .map(|n| batch_line(&format!("x{n}"), &format!("Item {n}.")))
        .collect();
    std::fs::write(&other, other_lines.join("\n")).unwrap();
    let output = batch(&app, &["submit", other.to_str().unwrap(), "--resume", &id]);
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("is not a request of batch"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // The published part runs; then ten of its marks are lost (as when Postgres went away
    // after the broker confirmed a chunk): answered jobs are not sent again.
    wait_all(workers(&app, 1, 16)).await;
    sqlx::query(
        "UPDATE batch_items SET published = false WHERE job_id IN
             (SELECT job_id FROM results ORDER BY job_id LIMIT 10)",
    )
    .execute(app.pool())
    .await
    .unwrap();
    // What the broker took before it refused (a quorum queue's length limit is approximate)
    // has been answered, marked or not; the rest was never sent.
    let unsent = count(
        &app,
        "SELECT count(*) FROM batch_items i WHERE NOT published
             AND NOT EXISTS (SELECT 1 FROM results r WHERE r.job_id = i.job_id)",
    )
    .await;
    assert!(unsent > 0);
    let output = batch(&app, &["submit", input.to_str().unwrap(), "--resume", &id]);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), id);
    assert!(
        stderr.contains(&format!("submitted {unsent} request(s)")),
        "{unsent} unsent: {stderr}"
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM batch_items i WHERE NOT published
                 AND NOT EXISTS (SELECT 1 FROM results r WHERE r.job_id = i.job_id)"
        )
        .await,
        0,
        "every request without a result is sent"
    );
    wait_all(workers(&app, 1, 16)).await;
    let status = status_json(&app, &id);
    assert_eq!(status["status"], "completed", "{status}");
    assert_eq!(status["request_counts"]["completed"], 600, "{status}");
    assert_eq!(
        count(&app, "SELECT count(DISTINCT job_id) FROM results").await,
        600
    );
    assert_eq!(
        fake.requests().await,
        600,
        "no request reached the provider twice"
    );
    app.cleanup().await;
}

/// With the broker out of reach, `submit` stores nothing: no batch is left waiting for
/// requests that were never sent.
#[tokio::test]
async fn a_submission_that_cannot_reach_the_broker_stores_nothing() {
    let fake = FakeProvider::start(&[]);
    let app = spawn_app_with(&crate::helpers::fake_provider_config(&fake.url)).await;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.jsonl");
    std::fs::write(&input, batch_line("only", "One item.")).unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let output = switchyard(&app)
        .args([
            "batch",
            "submit",
            input.to_str().unwrap(),
            "--route",
            "fake",
        ])
        .env(
            "SWITCHYARD_BROKER__URL",
            format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
        )
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(output.stdout.is_empty());
    assert_eq!(count(&app, "SELECT count(*) FROM batches").await, 0);
    assert_eq!(count(&app, "SELECT count(*) FROM batch_items").await, 0);
    app.cleanup().await;
}

/// A batch that has finished has nothing to cancel: `cancel` says so and leaves it
/// `completed`.
#[tokio::test]
async fn cancelling_a_finished_batch_is_refused_and_it_stays_completed() {
    let fake = FakeProvider::start(&[]);
    let app = spawn_app_with(&crate::helpers::fake_provider_config(&fake.url)).await;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.jsonl");
    std::fs::write(&input, batch_line("only", "One item.")).unwrap();
    let output = batch(
        &app,
        &["submit", input.to_str().unwrap(), "--route", "fake"],
    );
    assert!(output.status.success());
    let id = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    wait_all(workers(&app, 1, 4)).await;
    assert_eq!(status_json(&app, &id)["status"], "completed");
    let output = batch(&app, &["cancel", &id]);
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("nothing to cancel"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let status = status_json(&app, &id);
    assert_eq!(status["status"], "completed", "{status}");
    assert!(status["cancelled_at"].is_null(), "{status}");
    app.cleanup().await;
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(app.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn replaying_a_batchs_failed_jobs_after_the_provider_recovers() {
    let broken = FakeProvider::start(&["--rate-500", "1"]);
    let port = broken.port();
    let app = spawn_app_with(&format!(
        "{}\n[routing]\nbreaker_consecutive_failures = 1000000\nbreaker_error_rate = 1.5\n",
        crate::helpers::fake_provider_config(&broken.url)
    ))
    .await;
    let jobs: Vec<_> = (0..20)
        .map(|n| job("acme", Some("nightly"), "fake", &format!("Job {n} text.")))
        .collect();
    app.publish_jobs(&jobs).await;
    app.run_worker_until_idle().await;
    assert_eq!(
        count(&app, "SELECT count(*) FROM results WHERE status = 'failed'").await,
        20
    );
    drop(broken);
    let healthy = FakeProvider::start_at(port, &[]);

    let replay = |extra: &[&str]| {
        switchyard(&app)
            .env("SWITCHYARD_ACTOR", "ops-oncall")
            .args(["replay", "--tenant", "acme", "--batch", "nightly"])
            .args(extra)
            .output()
            .unwrap()
    };
    // A dry run lists the 20 jobs and changes nothing.
    let output = replay(&["--status", "failed", "--dry-run"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let listed: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(listed.len(), 20);
    assert!(
        listed
            .iter()
            .all(|l| l["action"] == "would_replay" && l["generation"] == 1)
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM audit_events WHERE kind = 'job_replayed'"
        )
        .await,
        0
    );
    let (queued, _consumers) = switchyard::queue::topology::jobs_queue_depth(
        &app.ctx.broker.create_channel().await.unwrap(),
        &app.names,
    )
    .await
    .unwrap();
    assert_eq!(queued, 0, "a dry run publishes nothing");
    // Time-range selection: every failure is after 2000-01-01 and none before.
    let output = replay(&["--status", "failed", "--dry-run", "--since", "2000-01-01"]);
    assert_eq!(String::from_utf8_lossy(&output.stdout).lines().count(), 20);
    let output = replay(&["--status", "failed", "--dry-run", "--until", "2000-01-01"]);
    assert_eq!(String::from_utf8_lossy(&output.stdout).lines().count(), 0);
    assert_eq!(healthy.requests().await, 0);

    // One job lost its prompt (as under retention `none`): it is reported, not replayed.
    sqlx::query("UPDATE jobs SET request = NULL WHERE id = $1")
        .bind(jobs[0].id)
        .execute(app.pool())
        .await
        .unwrap();
    let output = replay(&["--status", "failed", "--reason", "provider recovered"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(stdout.matches("\"replayed\"").count(), 19, "{stdout}");
    assert!(
        stdout.contains("not replayable: the request was not retained"),
        "{stdout}"
    );
    app.run_worker_until_idle().await;

    // The replays succeeded as generation 1; generation 0 stays as history.
    assert_eq!(healthy.requests().await, 19);
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM results WHERE generation = 1 AND status = 'succeeded'"
        )
        .await,
        19
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM results WHERE generation = 0 AND status = 'failed'"
        )
        .await,
        20
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM jobs WHERE generation = 1 AND status = 'succeeded'"
        )
        .await,
        19
    );
    // The first run tried each job twice (one retry on the route's last target).
    assert_eq!(
        count(&app, "SELECT count(*) FROM attempts WHERE generation = 0").await,
        40
    );
    assert_eq!(
        count(&app, "SELECT count(*) FROM attempts WHERE generation = 1").await,
        19
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM cost_ledger WHERE batch = 'nightly'"
        )
        .await,
        19
    );
    let (actor, reason): (String, String) = sqlx::query_as(
        "SELECT details->>'by', details->>'reason' FROM audit_events WHERE kind = 'job_replayed' LIMIT 1",
    )
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(
        (actor.as_str(), reason.as_str()),
        ("ops-oncall", "provider recovered")
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM audit_events WHERE kind = 'job_replayed'"
        )
        .await,
        19
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM audit_events WHERE kind = 'job_failed'"
        )
        .await,
        20
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM audit_events WHERE kind = 'job_succeeded'"
        )
        .await,
        19
    );

    // Succeeded jobs are not replayed again unless forced.
    let again = jobs[1].id.to_string();
    let output = replay(&["--id", &again]);
    assert!(String::from_utf8_lossy(&output.stdout).contains("already succeeded"));
    let output = replay(&["--id", &again, "--force"]);
    assert!(String::from_utf8_lossy(&output.stdout).contains("\"generation\":2"));
    // An id no stored job has is said, not passed over, and the exit code says it too, also
    // when the other ids given are replayed.
    let unknown = uuid::Uuid::now_v7().to_string();
    let output = replay(&["--id", &unknown]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(&unknown) && stdout.contains("no stored job of tenant"),
        "{stdout}"
    );
    assert_eq!(output.status.code(), Some(2));
    // A stored job the other options leave out is skipped as such: it is not unknown.
    let output = replay(&["--id", &again, "--status", "failed"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(&again)
            && stdout.contains("\"status\":\"succeeded\"")
            && stdout.contains("left out by the other options"),
        "{stdout}"
    );
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    let output = replay(&["--id", &unknown, "--id", &again, "--force", "--dry-run"]);
    assert!(String::from_utf8_lossy(&output.stdout).contains("\"action\":\"would_replay\""));
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("1 of the 2 --id value(s) match no"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    app.run_worker_until_idle().await;
    assert_eq!(healthy.requests().await, 20);
    app.cleanup().await;
}

#[tokio::test]
async fn dead_lettered_jobs_are_shown_in_full_and_replayed_to_another_route() {
    let fake = FakeProvider::start(&[]);
    let app = spawn_app_with(&crate::helpers::fake_provider_config(&fake.url)).await;
    let lost = job("acme", Some("b7"), "no-such-route", "Route me properly.");
    app.publish_job(&lost).await;
    app.run_worker_until_idle().await;

    // The whole dead-lettered message: its error header and its body.
    let mut shown = None;
    for _ in 0..50 {
        let output = switchyard(&app)
            .args(["dead-letters", "show", &lost.id.to_string()])
            .output()
            .unwrap();
        if output.status.success() {
            shown = Some(serde_json::from_slice::<Value>(&output.stdout).unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let shown = shown.expect("dead-letters show finds the message");
    assert!(
        shown["headers"]["x-switchyard-error"]
            .as_str()
            .unwrap()
            .starts_with("unknown_route"),
        "{shown}"
    );
    assert_eq!(shown["body"]["json"]["route"], "no-such-route");
    let missing = switchyard(&app)
        .args([
            "dead-letters",
            "show",
            "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
        ])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no dead-lettered message"));

    // Requeued as it is, the rejected job would only be answered with its stored result: it
    // stays in the dead-letter queue, and the line names what runs it again.
    let id = lost.id.to_string();
    let output = switchyard(&app)
        .args(["dead-letters", "requeue", "--job", &id])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    assert!(
        stdout.contains("\"skipped\"")
            && stdout.contains("already has a rejected result")
            && stdout.contains(&format!("switchyard replay --id {id}")),
        "{stdout}"
    );
    let still = switchyard(&app)
        .args(["dead-letters", "show", &id])
        .output()
        .unwrap();
    assert!(still.status.success(), "it is still dead-lettered");

    // `dead-lettered` selects the rejected job; its stored body is replayed to route `fake`.
    let output = switchyard(&app)
        .args(["replay", "--tenant", "acme", "--status", "dead-lettered"])
        .args(["--error-class", "unknown_route", "--route", "fake"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.matches("\"replayed\"").count(), 1, "{stdout}");
    app.run_worker_until_idle().await;
    let (status, route): (String, String) = sqlx::query_as(
        "SELECT status, body->>'route' FROM results WHERE job_id = $1 AND generation = 1",
    )
    .bind(lost.id)
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!((status.as_str(), route.as_str()), ("succeeded", "fake"));
    assert_eq!(fake.requests().await, 1);
    // An unknown --route is refused before anything happens.
    let output = switchyard(&app)
        .args(["replay", "--tenant", "acme", "--route", "nope"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    app.cleanup().await;
}

#[tokio::test]
async fn summarize_reads_html_and_jsonl_and_writes_markdown() {
    let app = crate::helpers::spawn_app().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("page.html"),
        "<html><body><h1>Lighthouse</h1><p>The lighthouse keeper lit the lamp at dusk. \
         Ships passed safely all night. The keeper wrote the log at dawn.</p></body></html>",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("notes.jsonl"),
        "{\"id\":\"n1\",\"text\":\"The orchard gave apples in September. Pickers filled two hundred crates.\"}\n",
    )
    .unwrap();
    let out = dir.path().join("summaries.md");
    let output = switchyard(&app)
        .args(["summarize", &format!("{}/*", dir.path().display()), "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let markdown = std::fs::read_to_string(&out).unwrap();
    assert!(markdown.starts_with("# Summaries\n"), "{markdown}");
    let notes = markdown
        .find("notes.jsonl#n1")
        .expect("the JSONL document has a section");
    let page = markdown
        .find("page.html")
        .expect("the HTML document has a section");
    assert!(notes < page, "input order: {markdown}");
    assert!(
        markdown.contains("lighthouse keeper lit the lamp"),
        "{markdown}"
    );
    assert!(!markdown.contains("<p>"), "{markdown}");
    assert!(markdown.contains("orchard gave apples"), "{markdown}");
    app.cleanup().await;
}

/// Creates batch `batch` of tenant `acme` with `count` items, keyed `item-<n>`, each with a
/// job id; returns them.
async fn batch_of(
    conn: &mut sqlx::PgConnection,
    kind: switchyard::store::batches::BatchKind,
    batch: &str,
    count: i32,
    published: bool,
) -> Vec<switchyard::store::batches::ItemRow> {
    use switchyard::store::batches::{self, ItemRow};
    batches::create_or_get(conn, "acme", batch, kind, "fake", None, None)
        .await
        .unwrap();
    let items: Vec<ItemRow> = (0..count)
        .map(|n| ItemRow {
            item_key: format!("item-{n}"),
            line: n + 1,
            job_id: Some(uuid::Uuid::now_v7()),
            error: None,
            published,
        })
        .collect();
    batches::insert_items(conn, "acme", batch, &items)
        .await
        .unwrap();
    items
}

/// A batch's cost is summed from its own ledger rows, found by index, not from every row its
/// tenant ever wrote (the plan Postgres may keep for the prepared statement).
#[tokio::test]
async fn a_batchs_cost_reads_its_own_ledger_rows_by_index() {
    use switchyard::store::batches::BATCH_COST_SQL;
    let app = crate::helpers::spawn_app().await;
    sqlx::raw_sql(
        "INSERT INTO cost_ledger (id, job_id, attempt_id, tenant, batch, route, provider, model,
             input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, price_input,
             price_cached_input, price_cache_write, price_output, amount_usd, created_at)
         SELECT gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), 'acme',
                CASE WHEN n % 1000 = 0 THEN 'b' || (n / 1000) END, 'r', 'p', 'm',
                10, 0, 0, 5, 1, 0, 0, 2, 0.00002, now()
         FROM generate_series(1, 50000) AS n;
         ANALYZE cost_ledger",
    )
    .execute(app.pool())
    .await
    .unwrap();
    let cost: rust_decimal::Decimal = sqlx::query_scalar(BATCH_COST_SQL)
        .bind("acme")
        .bind("b7")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(cost, rust_decimal::Decimal::new(2, 5));
    let mut conn = app.pool().acquire().await.unwrap();
    let plan =
        crate::helpers::generic_plan(&mut conn, BATCH_COST_SQL, "text, text", "'acme', 'b7'").await;
    assert!(
        plan.contains("cost_ledger_batch_idx") && !plan.contains("Seq Scan"),
        "{plan}"
    );
    drop(conn);
    app.cleanup().await;
}

/// Submitting a batch marks its items published one chunk at a time. Each chunk's update
/// probes the `job_id` index per id, so its cost does not grow with the batch: the earlier
/// form (`tenant = $1 AND batch = $2 AND job_id = ANY($3)`) was planned as a scan of the
/// whole batch by its primary-key prefix on a young table, 12 ms per chunk at 50,000 items.
/// The batch leaves `validating` only when its submitter says so, and keeps the first time.
#[tokio::test]
async fn marking_a_chunk_published_probes_the_job_id_index_and_not_the_whole_batch() {
    use switchyard::store::batches::{self, BatchKind};
    let app = crate::helpers::spawn_app().await;
    let mut conn = app.pool().acquire().await.unwrap();
    let items = batch_of(&mut conn, BatchKind::OpenAi, "big", 20_000, false).await;

    let chunk: Vec<uuid::Uuid> = items[1_000..1_256]
        .iter()
        .filter_map(|i| i.job_id)
        .collect();
    batches::mark_published(&mut conn, &chunk).await.unwrap();
    let published: Vec<String> = sqlx::query_scalar(
        "SELECT item_key FROM batch_items WHERE batch = 'big' AND published ORDER BY line",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    let expected: Vec<String> = items[1_000..1_256]
        .iter()
        .map(|i| i.item_key.clone())
        .collect();
    assert_eq!(
        published, expected,
        "exactly the chunk's items are published"
    );

    let plan = crate::helpers::plan_for_ids(&mut conn, batches::MARK_PUBLISHED_SQL, &chunk).await;
    assert!(
        plan.contains("batch_items_job_id_key")
            && !plan.contains("batch_items_pkey")
            && !plan.contains("Seq Scan"),
        "{plan}"
    );

    let started = || async {
        let at: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
            "SELECT published_at FROM batches WHERE tenant = 'acme' AND id = 'big'",
        )
        .fetch_one(app.pool())
        .await
        .unwrap();
        at
    };
    assert_eq!(started().await, None, "still validating");
    batches::mark_started(&mut conn, "acme", "big")
        .await
        .unwrap();
    let first = started().await.expect("started");
    batches::mark_started(&mut conn, "acme", "big")
        .await
        .unwrap();
    assert_eq!(started().await, Some(first), "the first start time is kept");
    drop(conn);
    app.cleanup().await;
}

/// Summarize asks for up to 500 of its batch's items by key in every round. Each key is one
/// probe of the primary key, and each item's latest result one probe of the results' primary
/// key, also in the generic plan Postgres switches a prepared statement to after its fifth
/// run: there, `item_key = ANY($3)` was a filter over the whole batch, every round.
#[tokio::test]
async fn summarize_rounds_find_their_items_by_one_probe_per_key() {
    use switchyard::store::batches::{self, BatchKind};
    let app = crate::helpers::spawn_app().await;
    let mut conn = app.pool().acquire().await.unwrap();
    let items = batch_of(&mut conn, BatchKind::Summarize, "sum", 5_000, true).await;
    // Items 0..100 succeeded once; items 100..200 were replayed (generation 1 is the latest);
    // items 200..300 have no result yet.
    let job = |n: usize| items[n].job_id.unwrap();
    let results: Vec<_> = (0..200)
        .map(|n| crate::helpers::stored_result(job(n), 0))
        .chain((100..200).map(|n| crate::helpers::stored_result(job(n), 1)))
        .collect();
    crate::helpers::store_results(&mut conn, results.iter()).await;

    let mut keys: Vec<String> = items[..300].iter().map(|i| i.item_key.clone()).collect();
    keys.push("item-unknown".to_owned());
    let found = batches::items_by_key(&mut conn, "acme", "sum", &keys)
        .await
        .unwrap();
    assert_eq!(found.len(), 300, "every known key, once");
    for (n, item) in items[..300].iter().enumerate() {
        let got = &found[&item.item_key];
        assert_eq!(got.item.job_id, item.job_id);
        let generation = got.result.as_ref().map(|r| r.generation);
        let expected = match n {
            0..100 => Some(0),
            100..200 => Some(1),
            _ => None,
        };
        assert_eq!(generation, expected, "item {n}");
    }

    let plan = crate::helpers::generic_plan(
        &mut conn,
        batches::ITEMS_BY_KEY_SQL,
        "text, text, text[]",
        &format!(
            "'acme', 'sum', {}",
            crate::helpers::sql_array(&keys, "text")
        ),
    )
    .await;
    assert!(
        plan.contains("(item_key = k.key)")
            && plan.contains("Index Scan Backward using results_pkey")
            && !plan.contains("Filter: (item_key")
            && !plan.contains("Seq Scan"),
        "{plan}"
    );
    drop(conn);
    app.cleanup().await;
}
