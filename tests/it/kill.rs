//! Crash and shutdown safety with real processes: a worker killed with SIGKILL mid-batch, or
//! stopped with SIGTERM, loses no job and leaves exactly one result row per job.

use std::process::{Child, Stdio};
use std::time::Duration;

use crate::helpers::{
    FakeProvider, TestApp, fake_provider_config, job, spawn_app_with, switchyard,
};

async fn results_count(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM results")
        .fetch_one(app.pool())
        .await
        .unwrap()
}

fn start_worker(app: &TestApp, extra: &[&str], stderr: Stdio) -> Child {
    switchyard(app)
        .args(["worker", "--concurrency", "16"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("worker starts")
}

async fn wait_for_results(app: &TestApp, at_least: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while results_count(app).await < at_least {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no progress: fewer than {at_least} results"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn finish_with_a_fresh_worker(app: &TestApp) {
    let mut worker = start_worker(app, &["--exit-when-idle"], Stdio::null());
    let status = tokio::task::spawn_blocking(move || worker.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "the final worker exits cleanly: {status}");
}

async fn assert_exactly_one_result_per_job(app: &TestApp, jobs: i64) {
    let (distinct, rows) = app.result_rows().await;
    assert_eq!(
        (distinct, rows),
        (jobs, jobs),
        "every job has exactly one result row"
    );
    let unfinished: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE id NOT IN (SELECT job_id FROM results)",
    )
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(unfinished, 0);
}

#[tokio::test]
async fn a_worker_killed_with_sigkill_mid_batch_loses_nothing_and_duplicates_nothing() {
    let fake = FakeProvider::start(&["--latency-ms", "20", "--jitter-ms", "10"]);
    let app = spawn_app_with(&fake_provider_config(&fake.url)).await;
    let jobs: Vec<_> = (0..600)
        .map(|i| {
            job(
                "acme",
                Some("chaos"),
                "fake",
                &format!("Job {i}. Survives a crash."),
            )
        })
        .collect();
    app.publish_jobs(&jobs).await;

    for kill_at in [100, 250, 400] {
        let mut worker = start_worker(&app, &[], Stdio::null());
        wait_for_results(&app, kill_at).await;
        worker.kill().expect("SIGKILL the worker");
        worker.wait().unwrap();
    }
    let before_restart = results_count(&app).await;
    assert!(
        before_restart < 600,
        "the kills happened mid-batch ({before_restart} results)"
    );

    finish_with_a_fresh_worker(&app).await;
    assert_exactly_one_result_per_job(&app, 600).await;
    // A call is billed as soon as it returns, so a job re-run after a crash is billed for both
    // calls, as the provider bills them; but nothing is billed once a job's result is committed.
    let billed_after_commit: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM cost_ledger l JOIN results r ON r.job_id = l.job_id WHERE l.created_at > r.created_at",
    )
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(billed_after_commit, 0, "no committed job is billed again");
    let ledger_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM cost_ledger")
        .fetch_one(app.pool())
        .await
        .unwrap();
    let calls = fake.requests().await as i64;
    assert!(
        ledger_rows >= 600 && ledger_rows <= calls,
        "{ledger_rows} ledger rows for {calls} provider calls"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn sigterm_stops_a_worker_cleanly_and_nothing_unfinished_is_acked() {
    let fake = FakeProvider::start(&["--latency-ms", "100"]);
    let app = spawn_app_with(&fake_provider_config(&fake.url)).await;
    let jobs: Vec<_> = (0..300)
        .map(|i| job("acme", None, "fake", &format!("Job {i}. Stops politely.")))
        .collect();
    app.publish_jobs(&jobs).await;

    let log = tempfile::NamedTempFile::new().unwrap();
    let worker = start_worker(&app, &[], log.reopen().unwrap().into());
    wait_for_results(&app, 20).await;
    // Each consuming session holds a lease that keeps the relay off its outbox rows.
    let leases = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM outbox_sessions WHERE alive_until > now()",
        )
        .fetch_one(app.pool())
        .await
        .unwrap()
    };
    assert!(leases().await >= 1, "a running worker holds its leases");
    let pid = worker.id().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::task::spawn_blocking(move || {
        let mut worker = worker;
        worker.wait()
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM ends the worker with exit code 0"
    );
    assert!(
        results_count(&app).await < 300,
        "the worker stopped mid-batch"
    );
    // A clean stop logs no error: every channel is closed before the connection, so none is
    // left for lapin to close while the connection is closing ("invalid channel state").
    let log = std::fs::read_to_string(log.path()).unwrap();
    assert!(
        log.contains("Worker stopped."),
        "the worker logged its stop:\n{log}"
    );
    assert!(
        !log.contains("ERROR"),
        "a clean stop logged an error:\n{log}"
    );
    assert_eq!(leases().await, 0, "a clean stop ends its sessions' leases");

    finish_with_a_fresh_worker(&app).await;
    assert_exactly_one_result_per_job(&app, 300).await;
    app.cleanup().await;
}
