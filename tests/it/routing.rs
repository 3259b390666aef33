//! Routing through the whole pipeline: failover with circuit breakers, weighted shares, data
//! residency, and every target failing within its timeout.

use std::time::Duration;

use switchyard::messages::{JobResult, JobStatus};

use crate::helpers::{FakeProvider, TestApp, collect, job, spawn_app_with};

fn provider(name: &str, url: &str, extra: &str) -> String {
    format!(
        r#"
[[providers]]
name = "{name}"
kind = "openai"
base_url = "{url}/v1"
timeout_secs = 5
{extra}
keys = [{{ id = "{name}-key", env = "CARGO_MANIFEST_DIR" }}]
models = [{{ name = "m" }}]
"#
    )
}

async fn count(app: &TestApp, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(app.pool()).await.unwrap()
}

#[tokio::test]
async fn a_dead_primary_fails_over_for_every_job_and_once_open_its_circuit_lets_only_probes_through()
 {
    let dead = FakeProvider::start(&["--rate-503", "1"]);
    let healthy = FakeProvider::start(&[]);
    let config = format!(
        "{}{}
[routing]
breaker_consecutive_failures = 5
breaker_open_secs = 1

[[routes]]
alias = \"chain\"
targets = [{{ provider = \"primary\", model = \"m\" }}]
fallback = [{{ provider = \"backup\", model = \"m\" }}]
",
        provider("primary", &dead.url, ""),
        provider("backup", &healthy.url, "")
    );
    let app = spawn_app_with(&config).await;
    let jobs: Vec<_> = (0..1000)
        .map(|i| {
            job(
                "acme",
                Some("fo"),
                "chain",
                &format!("Job {i}. Fails over."),
            )
        })
        .collect();
    app.publish_jobs(&jobs).await;
    let started = std::time::Instant::now();
    app.run_worker_until_idle().await;
    let elapsed = started.elapsed();

    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM results WHERE status = 'succeeded'"
        )
        .await,
        1000
    );
    let by_backup = count(
        &app,
        "SELECT count(*) FROM attempts WHERE outcome = 'succeeded' AND provider = 'backup'",
    )
    .await;
    assert_eq!(by_backup, 1000, "every job was served by the fallback");
    let failovers = count(
        &app,
        "SELECT count(DISTINCT job_id) FROM audit_events WHERE kind = 'failover' AND details->>'from' = 'primary/m'",
    )
    .await;
    assert_eq!(failovers, 1000, "one failover event per job");
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM audit_events WHERE kind = 'failover'"
        )
        .await,
        1000
    );
    assert!(
        count(
            &app,
            "SELECT count(*) FROM audit_events WHERE kind = 'circuit_opened'"
        )
        .await
            >= 1
    );

    // Before the circuit opens: 5 consecutive failures plus what was already in flight (16).
    // After: one probe per open period (1 s).
    let primary_calls = dead.requests().await;
    let bound = 5 + 16 + elapsed.as_secs() + 2;
    assert!(
        primary_calls <= bound,
        "the open circuit should let only probes through: {primary_calls} calls to the primary in {elapsed:?}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn weighted_routing_holds_a_70_30_split_over_10000_jobs() {
    let a = FakeProvider::start(&[]);
    let b = FakeProvider::start(&[]);
    let config = format!(
        "{}{}
[[routes]]
alias = \"split\"
policy = \"weighted\"
targets = [{{ provider = \"a\", model = \"m\", weight = 70 }}, {{ provider = \"b\", model = \"m\", weight = 30 }}]
",
        provider("a", &a.url, ""),
        provider("b", &b.url, "")
    );
    let app = spawn_app_with(&config).await;
    let jobs: Vec<_> = (0..10_000)
        .map(|i| job("acme", None, "split", &format!("Job {i}.")))
        .collect();
    for chunk in jobs.chunks(2_000) {
        app.publish_jobs(chunk).await;
    }
    app.run_worker_until_idle().await;
    let (to_a, to_b) = (a.requests().await, b.requests().await);
    assert_eq!(to_a + to_b, 10_000);
    let share = to_a as f64 / 10_000.0;
    assert!((share - 0.70).abs() <= 0.03, "share of a: {share}");
    app.cleanup().await;
}

#[tokio::test]
async fn a_tenant_restricted_to_eu_never_reaches_a_us_provider() {
    let us = FakeProvider::start(&[]);
    let eu = FakeProvider::start(&[]);
    let config = format!(
        "{}{}
[[routes]]
alias = \"both\"
targets = [{{ provider = \"us-p\", model = \"m\" }}, {{ provider = \"eu-p\", model = \"m\" }}]

[[routes]]
alias = \"us-only\"
targets = [{{ provider = \"us-p\", model = \"m\" }}]

[[tenants]]
name = \"eu-corp\"
regions = [\"eu\"]
",
        provider("us-p", &us.url, "region = \"us\""),
        provider("eu-p", &eu.url, "region = \"eu\"")
    );
    let app = spawn_app_with(&config).await;
    let mut results = app.subscribe(false, "eu-corp.#").await;
    let served: Vec<_> = (0..20)
        .map(|i| job("eu-corp", None, "both", &format!("Job {i}.")))
        .collect();
    app.publish_jobs(&served).await;
    let stranded = job("eu-corp", None, "us-only", "Nowhere to go.");
    app.publish_job(&stranded).await;
    app.run_worker_until_idle().await;

    assert_eq!(us.requests().await, 0, "no request left the eu region");
    assert_eq!(eu.requests().await, 20);
    let deliveries = collect(&mut results, 21, Duration::from_secs(10)).await;
    let stranded_result: JobResult = deliveries
        .iter()
        .map(|d| serde_json::from_slice::<JobResult>(&d.data).unwrap())
        .find(|r| r.job_id == stranded.id)
        .unwrap();
    assert_eq!(stranded_result.status, JobStatus::Failed);
    let error = stranded_result.error.unwrap();
    assert_eq!(error.code, "no_eligible_target");
    assert!(
        error
            .message
            .contains("us-p/m: region us is outside the allowed regions [eu]"),
        "{}",
        error.message
    );
    app.cleanup().await;
}

#[tokio::test]
async fn when_every_target_fails_the_result_lists_every_attempt_and_the_hung_one_timed_out() {
    let hung = FakeProvider::start(&["--rate-hang", "1"]);
    let broken = FakeProvider::start(&["--rate-500", "1"]);
    let config = format!(
        "{}{}
[[routes]]
alias = \"doomed\"
targets = [{{ provider = \"hung\", model = \"m\", timeout_secs = 1 }}, {{ provider = \"broken\", model = \"m\" }}]
",
        provider("hung", &hung.url, "max_retries = 0"),
        provider("broken", &broken.url, "max_retries = 0")
    );
    let app = spawn_app_with(&config).await;
    let mut results = app.subscribe(false, "#").await;
    app.publish_job(&job("acme", None, "doomed", "No luck."))
        .await;
    app.run_worker_until_idle().await;
    let result: JobResult =
        serde_json::from_slice(&collect(&mut results, 1, Duration::from_secs(30)).await[0].data)
            .unwrap();
    assert_eq!(result.status, JobStatus::Failed);
    assert_eq!(result.attempts.len(), 2);
    assert_eq!(result.attempts[0].provider, "hung");
    assert_eq!(result.attempts[0].error_class.as_deref(), Some("timeout"));
    assert!(
        result.attempts[0].latency_ms >= 1000,
        "the target's own 1 s timeout fired"
    );
    assert_eq!(
        result.attempts[1].error_class.as_deref(),
        Some("server_error")
    );
    let error = result.error.unwrap();
    assert_eq!(error.code, "all_attempts_failed");
    assert!(
        error.message.contains("#1 hung/m: timeout")
            && error.message.contains("#2 broken/m: server_error"),
        "{}",
        error.message
    );
    app.cleanup().await;
}

/// An opening this worker could not write to Postgres (the write failed) is shared on a later
/// sync, once Postgres takes it again, instead of being lost: otherwise every other worker goes
/// on calling the failing target until it trips its own breaker.
#[tokio::test]
async fn a_circuit_opening_postgres_refused_is_shared_once_it_is_taken_again() {
    let config = format!(
        "{}
[routing]
breaker_consecutive_failures = 2
breaker_open_secs = 600

[[routes]]
alias = \"r\"
targets = [{{ provider = \"primary\", model = \"m\" }}]
",
        provider("primary", "http://127.0.0.1:9", "")
    );
    let app = spawn_app_with(&config).await;
    let shared = || async {
        count(
            &app,
            "SELECT count(*) FROM circuit_breakers WHERE target = 'primary/m'",
        )
        .await
    };
    let health = app.ctx.router.health_of("primary/m").unwrap();
    // The table is away: every sync fails until it is back.
    sqlx::query("ALTER TABLE circuit_breakers RENAME TO circuit_breakers_away")
        .execute(app.pool())
        .await
        .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut sharing = tokio::task::JoinSet::new();
    sharing.spawn(switchyard::routing::sharing::share_health(
        app.ctx.router.clone(),
        None,
        None,
        app.pool().clone(),
        stop.clone(),
    ));
    for _ in 0..2 {
        health.record(Duration::from_millis(5), true, false);
    }
    assert!(health.is_open(std::time::Instant::now()).is_some());
    // At least two syncs (one a second) try to share the opening and fail.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    sqlx::query("ALTER TABLE circuit_breakers_away RENAME TO circuit_breakers")
        .execute(app.pool())
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while shared().await == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    while sharing.join_next().await.is_some() {}
    assert_eq!(
        shared().await,
        1,
        "the opening was shared once Postgres took it"
    );
    app.cleanup().await;
}
