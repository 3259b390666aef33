//! `switchyard summarize`: documents in, one JSON line per document out, in input order.

use crate::helpers::{
    FakeProvider, TestApp, fake_provider_config, read_lines, spawn_app, spawn_app_full,
    spawn_app_with, switchyard,
};

const DOC_A: &str = "# Harbor report\n\nThe harbor handled a record number of ships this year. \
    Cargo volumes rose by twelve percent compared with last year. The new crane on pier four \
    doubled the unloading speed. Dock workers praised the improved safety rails. \
    The port authority plans a second crane for next spring.\n";
const DOC_B: &str = "Bees prepare for winter by storing honey. A strong colony needs about twenty \
    kilograms of honey to survive the cold months. Beekeepers check the weight of each hive in \
    autumn. Light hives receive sugar syrup before the first frost. Mouse guards keep rodents out.";

fn documents() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a-harbor.md"), DOC_A).unwrap();
    std::fs::create_dir(dir.path().join("nested")).unwrap();
    std::fs::write(dir.path().join("nested").join("b-bees.txt"), DOC_B).unwrap();
    std::fs::write(dir.path().join("ignored.json"), "{}").unwrap();
    dir
}

#[tokio::test]
async fn summarize_writes_one_line_per_document_in_input_order() {
    let app = spawn_app().await;
    let docs = documents();
    let out = docs.path().join("out.jsonl");
    let output = switchyard(&app)
        .args([
            "summarize",
            docs.path().to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("2 documents, 2 succeeded, 0 failed"),
        "{stderr}"
    );
    let lines = read_lines(&out);
    assert_eq!(lines.len(), 2);
    assert!(lines[0]["path"].as_str().unwrap().ends_with("a-harbor.md"));
    assert!(lines[1]["path"].as_str().unwrap().ends_with("b-bees.txt"));
    for (line, doc) in lines.iter().zip([DOC_A, DOC_B]) {
        assert_eq!(line["status"], "succeeded");
        assert_eq!(line["provider"], "extractive");
        assert_eq!(line["cost_usd"], "0");
        let summary = line["summary"].as_str().unwrap();
        assert!(
            !summary.is_empty() && summary.len() < doc.len(),
            "{summary}"
        );
    }
    // The run's batch left `validating` when its first jobs were published.
    let started: Vec<bool> =
        sqlx::query_scalar("SELECT published_at IS NOT NULL FROM batches WHERE kind = 'summarize'")
            .fetch_all(app.pool())
            .await
            .unwrap();
    assert_eq!(started, [true]);
    app.cleanup().await;
}

#[tokio::test]
async fn summarize_exits_non_zero_and_lists_failures_when_documents_fail() {
    let fake = FakeProvider::start(&["--rate-500", "1"]);
    let app = spawn_app_with(&fake_provider_config(&fake.url)).await;
    let docs = documents();
    let out = docs.path().join("out.jsonl");
    let output = switchyard(&app)
        .args([
            "summarize",
            docs.path().to_str().unwrap(),
            "--route",
            "fake",
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("failed: ") && stderr.contains("all_attempts_failed"),
        "{stderr}"
    );
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(text.lines().count(), 2);
    assert!(text.lines().all(|l| l.contains("\"status\":\"failed\"")));
    app.cleanup().await;
}

/// `switchyard summarize DIR ARGS --out OUT`, which must end within two minutes (a run that
/// waits forever is the failure these tests look for).
async fn summarize_within_two_minutes(
    app: &TestApp,
    dir: &std::path::Path,
    args: &[&str],
    out: &std::path::Path,
) -> std::process::Output {
    let mut command = tokio::process::Command::from(switchyard(app));
    command.arg("summarize").arg(dir).args(args);
    command.arg("--out").arg(out).kill_on_drop(true);
    tokio::time::timeout(std::time::Duration::from_secs(120), command.output())
        .await
        .expect("the run ends")
        .unwrap()
}

/// The batch items stored for documents from the `first`th on.
async fn items_from_line(app: &TestApp, first: i32) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM batch_items WHERE line >= $1")
        .bind(first)
        .fetch_one(app.pool())
        .await
        .unwrap()
}

/// A document of only whitespace is not sent: it fails with its reason at once. One too long
/// to send whole has no piece to split into, and the run used to wait for it forever.
#[tokio::test]
async fn a_long_blank_document_fails_with_its_reason_and_the_run_ends() {
    let app = spawn_app().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a-harbor.md"), DOC_A).unwrap();
    std::fs::write(dir.path().join("b-blank.txt"), " \n\n".repeat(2000)).unwrap();
    let out = dir.path().join("out.jsonl");
    let output =
        summarize_within_two_minutes(&app, dir.path(), &["--chunk-tokens", "200"], &out).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    let lines = read_lines(&out);
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["status"], "succeeded", "{lines:?}");
    assert_eq!(lines[1]["status"], "failed", "{lines:?}");
    assert!(lines[1].to_string().contains("all whitespace"), "{lines:?}");
    app.cleanup().await;
}

/// A document too big for one job message, with no `--chunk-tokens` or context window to cut
/// it by, is split to fit `worker.max_message_bytes`, even a single word longer than a
/// message; one whose piece still cannot fit (tokens of many bytes each) fails with its
/// reason. Before, each was sent whole, rejected unread as `too_large` with a result no batch
/// subscribes to, and the run waited forever.
#[tokio::test]
async fn a_document_too_big_for_one_message_is_split_to_fit_and_one_that_cannot_fit_fails() {
    let app = spawn_app_full("max_message_bytes = 65536\n", "").await;
    let dir = tempfile::tempdir().unwrap();
    // About 210 KB of sentences: three times the message limit.
    let sentence = "The harbor master counted the boats again before the storm came in. ";
    std::fs::write(dir.path().join("a-long.txt"), sentence.repeat(3000)).unwrap();
    // One word longer than a message is cut between characters.
    std::fs::write(dir.path().join("b-one-word.txt"), "x".repeat(100_000)).unwrap();
    // Pieces that fit and ones that cannot (words of two tokens and 129 bytes, where a piece
    // is sized for 16 bytes per token, 32 unescaped): none of its jobs is sent.
    let mixed = format!(
        "{}\n\n{}",
        sentence.repeat(600),
        format!("{} ", "=".repeat(128)).repeat(2_000)
    );
    std::fs::write(dir.path().join("c-mixed.txt"), mixed).unwrap();
    let out = dir.path().join("out.jsonl");
    let output = summarize_within_two_minutes(&app, dir.path(), &[], &out).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    let lines = read_lines(&out);
    assert_eq!(lines.len(), 3);
    for split in &lines[..2] {
        assert_eq!(split["status"], "succeeded", "{lines:?}");
        assert!(split["chunks"].as_u64().unwrap() > 1, "{lines:?}");
    }
    assert!(lines[0]["chunks"].as_u64().unwrap() > 3, "{lines:?}");
    assert_eq!(lines[2]["status"], "failed", "{lines:?}");
    assert!(
        lines[2]
            .to_string()
            .contains("worker.max_message_bytes (65536)"),
        "{lines:?}"
    );
    // Nothing of the failed document (line 3) was stored, so nothing was published.
    assert_eq!(items_from_line(&app, 3).await, 0, "{lines:?}");
    app.cleanup().await;
}

/// The size check covers every job of a document, not one round of 500 at a time: a document
/// whose last piece cannot fit in a message stores and sends none of the 600 before it.
#[tokio::test]
async fn a_document_whose_last_piece_cannot_fit_sends_none_of_its_many_pieces() {
    // Small messages make small pieces: over 500 of sentences, then pieces of words of two
    // tokens and 129 bytes, where a piece is sized for 16 bytes per token (32 unescaped).
    let app = spawn_app_full("max_message_bytes = 8192\n", "").await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{}\n\n{}",
        "The boats came back before the storm. ".repeat(15_000),
        format!("{} ", "=".repeat(128)).repeat(200)
    );
    std::fs::write(dir.path().join("many.txt"), text).unwrap();
    let out = dir.path().join("out.jsonl");
    let output = summarize_within_two_minutes(&app, dir.path(), &[], &out).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    let lines = read_lines(&out);
    assert_eq!(lines[0]["status"], "failed", "{lines:?}");
    assert!(lines[0]["chunks"].as_u64().unwrap() > 500, "{lines:?}");
    let error = lines[0]["error"].as_str().unwrap();
    assert!(error.contains("worker.max_message_bytes (8192)"), "{error}");
    assert_eq!(items_from_line(&app, 1).await, 0, "{lines:?}");
    app.cleanup().await;
}

/// A batch is resumed with the options it was started with: with another piece size (or
/// summary cap, prompt or route) its pieces would not line up with the stored ones, so the run
/// is refused, names both, and sends nothing; the same options resume it.
#[tokio::test]
async fn a_batch_resumed_with_other_options_is_refused_and_names_them() {
    let app = spawn_app().await;
    let docs = documents();
    let elsewhere = tempfile::tempdir().unwrap();
    let out = elsewhere.path().join("out.jsonl");
    let run = |chunk: &str| {
        switchyard(&app)
            .args([
                "summarize",
                docs.path().to_str().unwrap(),
                "--batch",
                "shaped",
            ])
            .args(["--chunk-tokens", chunk, "--out", out.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let first = run("500");
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let jobs = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM jobs")
            .fetch_one(app.pool())
            .await
            .unwrap()
    };
    let sent = jobs().await;

    let other = run("1000");
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert_eq!(other.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("was started with --route default --max-tokens 200 --chunk-tokens 500")
            && stderr.contains("this run has --route default --max-tokens 200 --chunk-tokens 1000"),
        "{stderr}"
    );
    let same = run("500");
    assert!(
        same.status.success(),
        "{}",
        String::from_utf8_lossy(&same.stderr)
    );
    assert_eq!(jobs().await, sent, "neither run sent a job again");
    // A batch started before the options were kept takes those of its first resumed run.
    sqlx::query("UPDATE batches SET options = NULL")
        .execute(app.pool())
        .await
        .unwrap();
    assert!(run("500").status.success());
    assert_eq!(run("1000").status.code(), Some(2));
    app.cleanup().await;
}

#[test]
fn summarize_with_no_documents_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["summarize", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("no .txt, .md, .html or .jsonl documents")
    );
}

/// A run repeated with its output inside its input directory (the README's way to retry
/// failures) does not read its own summaries back as a document; an output that cannot be
/// written is refused before any job is published.
#[tokio::test]
async fn the_output_is_checked_first_and_never_read_back_as_input() {
    let app = spawn_app().await;
    let docs = documents();
    let out = docs.path().join("out.jsonl");
    for _ in 0..2 {
        let output =
            summarize_within_two_minutes(&app, docs.path(), &["--batch", "again"], &out).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{stderr}");
        assert!(
            stderr.contains("2 documents, 2 succeeded, 0 failed"),
            "{stderr}"
        );
        assert_eq!(read_lines(&out).len(), 2);
    }
    let jobs = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM jobs")
            .fetch_one(app.pool())
            .await
            .unwrap()
    };
    let before = jobs().await;
    let fresh = documents();
    let nowhere = fresh.path().join("missing").join("out.jsonl");
    let output =
        summarize_within_two_minutes(&app, fresh.path(), &["--batch", "nowhere"], &nowhere).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot write --out"), "{stderr}");
    let batches: i64 = sqlx::query_scalar("SELECT count(*) FROM batches WHERE id = 'nowhere'")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(
        (batches, jobs().await),
        (0, before),
        "nothing was stored or sent"
    );
    app.cleanup().await;
}

/// A run that found workers consuming the jobs queue, and so started none of its own, does not
/// wait forever when they go away (another run's in-process worker that finished, a worker
/// killed or scaled down): it starts its own worker and finishes every document.
#[tokio::test]
async fn a_run_whose_workers_go_away_starts_its_own_and_finishes() {
    let fake = FakeProvider::start(&["--latency-ms", "200"]);
    let app = spawn_app_with(&fake_provider_config(&fake.url)).await;
    let dir = tempfile::tempdir().unwrap();
    for i in 0..40 {
        std::fs::write(
            dir.path().join(format!("doc-{i:02}.txt")),
            format!("Document {i}. {DOC_B}"),
        )
        .unwrap();
    }
    let mut worker = switchyard(&app)
        .args(["worker", "--concurrency", "2"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let channel = app.ctx.broker.create_channel().await.unwrap();
    let consumers = || async {
        switchyard::queue::topology::jobs_queue_depth(&channel, &app.names)
            .await
            .unwrap()
            .1
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while consumers().await == 0 {
        assert!(std::time::Instant::now() < deadline, "the worker consumes");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let out = dir.path().join("out.jsonl");
    let run = summarize_within_two_minutes(&app, dir.path(), &["--route", "fake"], &out);
    let kill = async {
        // The outside worker has answered a few documents, then it is gone.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let answered: i64 = sqlx::query_scalar("SELECT count(*) FROM results")
                .fetch_one(app.pool())
                .await
                .unwrap();
            if answered >= 4 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the worker answers");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        worker.kill().unwrap();
        worker.wait().unwrap();
    };
    let (output, ()) = tokio::join!(run, kill);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("publishing to them") && stderr.contains("starting an in-process worker"),
        "{stderr}"
    );
    assert!(
        stderr.contains("40 documents, 40 succeeded, 0 failed"),
        "{stderr}"
    );
    assert_eq!(read_lines(&out).len(), 40);
    app.cleanup().await;
}

/// The run's own worker failing (here: it cannot serve metrics on an address already taken)
/// ends the run with that worker's error and the batch to resume, instead of a wait forever.
#[tokio::test]
async fn a_run_whose_own_worker_fails_ends_with_its_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let worker = format!("http_addr = \"{}\"\n", taken.local_addr().unwrap());
    let app = spawn_app_full(&worker, "").await;
    let docs = documents();
    let out = docs.path().join("out.jsonl");
    let output = summarize_within_two_minutes(&app, docs.path(), &["--batch", "stuck"], &out).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot serve health and metrics")
            && stderr.contains("--batch stuck to resume"),
        "{stderr}"
    );
    assert!(!out.exists());
    app.cleanup().await;
}

/// A document that fails while some of its pieces are still running counts those pieces
/// when their results arrive while the run still waits for other documents: the output's
/// costs and jobs add up to the ledger's. (Pieces still running when the last document ends
/// are not waited for.)
#[tokio::test]
async fn a_failed_documents_pieces_still_running_count_in_its_cost() {
    use wiremock::matchers::{body_string_contains, method};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let server = MockServer::start().await;
    let completion = serde_json::json!({
        "id": "c", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "A short summary."}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    });
    // The long document's first piece is refused at once; its other pieces answer after a
    // second, while the short document (with "zebra") keeps the run going for three.
    Mock::given(method("POST"))
        .and(body_string_contains("This is part 1 of "))
        .respond_with(ResponseTemplate::new(400).set_body_json(serde_json::json!({
            "error": {"message": "refused", "type": "invalid_request_error", "code": null}
        })))
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(body_string_contains("zebra"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(&completion)
                .set_delay(std::time::Duration::from_secs(3)),
        )
        .with_priority(2)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(&completion)
                .set_delay(std::time::Duration::from_secs(1)),
        )
        .with_priority(3)
        .mount(&server)
        .await;
    let config = format!(
        r#"
[[providers]]
name = "mock"
kind = "openai"
base_url = "{}/v1"
max_retries = 0
keys = [{{ id = "k", env = "CARGO_MANIFEST_DIR" }}]
models = [{{ name = "m", prices = {{ input = "1", output = "2" }} }}]

[[routes]]
alias = "mock"
targets = [{{ provider = "mock", model = "m" }}]
"#,
        server.uri()
    );
    let app = spawn_app_with(&config).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a-long.md"), DOC_A.repeat(8)).unwrap();
    std::fs::write(dir.path().join("b-zebra.txt"), "The zebra grazes.").unwrap();
    let out = dir.path().join("out.jsonl");
    let output = summarize_within_two_minutes(
        &app,
        dir.path(),
        &["--route", "mock", "--chunk-tokens", "200"],
        &out,
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    let lines = read_lines(&out);
    assert_eq!(lines[0]["status"], "failed");
    assert_eq!(lines[1]["status"], "succeeded");
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert!(jobs >= 4, "the long document was split: {jobs} jobs");
    let ledger: rust_decimal::Decimal =
        sqlx::query_scalar("SELECT sum(amount_usd) FROM cost_ledger")
            .fetch_one(app.pool())
            .await
            .unwrap();
    let cost: rust_decimal::Decimal = lines
        .iter()
        .map(|l| {
            l["cost_usd"]
                .as_str()
                .unwrap()
                .parse::<rust_decimal::Decimal>()
                .unwrap()
        })
        .sum();
    let counted: i64 = lines.iter().map(|l| l["jobs"].as_i64().unwrap()).sum();
    assert_eq!((counted, cost), (jobs, ledger), "{lines:?}");
    app.cleanup().await;
}

/// One file that is not UTF-8 text fails as its own document (exit code 3, its reason in its
/// line); the other documents are summarized.
#[tokio::test]
async fn a_file_that_is_not_text_fails_alone() {
    let app = spawn_app().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a-harbor.md"), DOC_A).unwrap();
    std::fs::write(
        dir.path().join("b-latin.txt"),
        b"Caf\xe9 au lait. Cr\xe8me br\xfbl\xe9e.",
    )
    .unwrap();
    let out = dir.path().join("out.jsonl");
    let output = summarize_within_two_minutes(&app, dir.path(), &[], &out).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    let lines = read_lines(&out);
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["status"], "succeeded");
    assert_eq!(lines[1]["status"], "failed");
    let error = lines[1]["error"].as_str().unwrap();
    assert!(error.contains("b-latin.txt as UTF-8 text"), "{error}");
    app.cleanup().await;
}
