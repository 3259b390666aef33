//! Limits shared by every worker process through Postgres: concurrency and request rate,
//! a provider's retry-after pausing its key everywhere, and parking when every target is
//! limited for long.

use std::time::Duration;

use crate::helpers::{
    FakeProvider, TestApp, job, spawn_app_with, trickle_config, wait_all, workers,
};

/// Two workers' limiters over `scope`, sharing the app's database.
async fn two_limiters(
    app: &TestApp,
    scope: &switchyard::routing::limits::Scope,
) -> (
    switchyard::routing::limits::Limiter,
    switchyard::routing::limits::Limiter,
) {
    let worker = || async {
        switchyard::routing::limits::Limiter::new(
            app.pool().clone(),
            std::slice::from_ref(scope),
            Duration::ZERO,
        )
        .await
        .unwrap()
    };
    (worker().await, worker().await)
}

async fn succeeded(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM results WHERE status = 'succeeded'")
        .fetch_one(app.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn three_worker_processes_together_never_exceed_the_providers_concurrency_or_rate() {
    let fake = FakeProvider::start(&["--latency-ms", "150"]);
    // 40 requests per 2 s window stands in for 1,200 rpm; concurrency 8.
    let config = format!(
        r#"
[[providers]]
name = "limited"
kind = "openai"
base_url = "{}/v1"
keys = [{{ id = "k", env = "CARGO_MANIFEST_DIR" }}]
limits = {{ max_concurrency = 8, rpm = 40, window_secs = 2 }}
models = [{{ name = "m" }}]

[[routes]]
alias = "limited"
targets = [{{ provider = "limited", model = "m" }}]
"#,
        fake.url
    );
    let app = spawn_app_with(&config).await;
    let jobs: Vec<_> = (0..150)
        .map(|i| job("acme", None, "limited", &format!("Job {i}.")))
        .collect();
    app.publish_jobs(&jobs).await;
    wait_all(workers(&app, 3, 16)).await;

    assert_eq!(
        succeeded(&app).await,
        150,
        "every job was served (waiting, not dropped)"
    );
    let stats = fake.stats().await;
    assert_eq!(stats["requests_total"], 150);
    let max_in_flight = stats["max_in_flight"].as_u64().unwrap();
    assert!(
        max_in_flight <= 8,
        "{max_in_flight} calls in flight at once"
    );
    assert!(
        max_in_flight >= 4,
        "the limit, not the workers, was the bottleneck: {max_in_flight}"
    );
    // Requests may reach the fake up to 500 ms late on a loaded machine: measuring a 1.5 s window
    // still cannot count more than the 40 a 2 s window allows.
    let window: serde_json::Value = reqwest::get(format!("{}/stats/window?ms=1500", fake.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let busiest = window["max_requests"].as_u64().unwrap();
    assert!(busiest <= 40, "{busiest} requests within 1.5 s");
    app.cleanup().await;
}

#[tokio::test]
async fn a_retry_after_pauses_the_key_for_every_worker_and_every_job_still_succeeds() {
    // A 3 s retry-after, and requests within 1.5 s of a 429 not counted as early: on a loaded
    // 2-core machine a worker may read the 429 (or the other worker hear of it through
    // `NOTIFY`) hundreds of milliseconds late, yet a worker that ignored the rest would still
    // call inside the remaining 1.5 s, as the jobs keep coming.
    let fake = FakeProvider::start(&[
        "--rate-429",
        "0.2",
        "--retry-after",
        "3",
        "--rest-grace-ms",
        "1500",
        "--seed",
        "42",
    ]);
    let config = format!(
        r#"
[[providers]]
name = "flaky"
kind = "openai"
base_url = "{}/v1"
max_retries = 8
keys = [{{ id = "only", env = "CARGO_MANIFEST_DIR" }}]
models = [{{ name = "m" }}]

[[routes]]
alias = "flaky"
targets = [{{ provider = "flaky", model = "m" }}]
"#,
        fake.url
    );
    let app = spawn_app_with(&config).await;
    let jobs: Vec<_> = (0..40)
        .map(|i| job("acme", None, "flaky", &format!("Job {i}.")))
        .collect();
    app.publish_jobs(&jobs).await;
    wait_all(workers(&app, 2, 4)).await;

    assert_eq!(succeeded(&app).await, 40);
    let stats = fake.stats().await;
    assert!(
        stats["by_status"]["429"].as_u64().unwrap_or(0) >= 3,
        "the fault was injected: {stats}"
    );
    assert_eq!(
        stats["early_after_429"], 0,
        "a request reached the key before its retry-after passed: {stats}"
    );
    let rate_limited: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE kind = 'key_rate_limited'")
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert!(rate_limited >= 3);
    app.cleanup().await;
}

#[tokio::test]
async fn a_job_whose_every_target_is_limited_for_long_is_parked_and_comes_back() {
    let fake = FakeProvider::start(&[]);
    let config = trickle_config(&fake.url);
    let app = spawn_app_with(&config).await;
    let jobs: Vec<_> = (0..3)
        .map(|i| job("acme", None, "trickle", &format!("Job {i}.")))
        .collect();
    app.publish_jobs(&jobs).await;
    let parked_seen = {
        let worker = workers(&app, 1, 16);
        // While the worker runs, parked jobs wait in a retry queue instead of a worker slot.
        let channel = app.ctx.broker.create_channel().await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let mut seen = false;
        while tokio::time::Instant::now() < deadline && !seen {
            let (queue, _) = &app.names.retry_queues()[1];
            let depth = channel
                .queue_declare(
                    queue.as_str().into(),
                    lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    Default::default(),
                )
                .await
                .unwrap()
                .message_count();
            seen = depth > 0;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        wait_all(worker).await;
        seen
    };
    assert!(parked_seen, "a job waited in the 10 s retry queue");
    assert_eq!(
        succeeded(&app).await,
        3,
        "parked jobs came back and were served"
    );
    assert_eq!(
        fake.requests().await,
        3,
        "a parked job made no provider call"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn token_limits_count_estimates_and_are_corrected_to_actual_usage() {
    use switchyard::config::Limits;
    use switchyard::routing::limits::{Acquired, Limiter, Scope};
    let app = spawn_app_with("").await;
    let scope = Scope::provider(
        "tpm-test",
        Limits {
            tpm: Some(100),
            ..Limits::default()
        },
    );
    let limiter = Limiter::new(
        app.pool().clone(),
        std::slice::from_ref(&scope),
        Duration::ZERO,
    )
    .await
    .unwrap();
    let timeout = Duration::from_secs(5);
    let Acquired::Granted(first) = limiter
        .acquire(&[&scope], 60, Duration::ZERO, timeout)
        .await
        .unwrap()
    else {
        panic!("an empty window grants the first call");
    };
    assert!(
        matches!(
            limiter
                .acquire(&[&scope], 60, Duration::ZERO, timeout)
                .await
                .unwrap(),
            Acquired::TooLong(_)
        ),
        "60 + 60 estimated tokens exceed 100 per window"
    );
    // The first call really used 10 tokens: the correction frees room for another 60.
    limiter.release(first, Some(10)).await;
    assert!(matches!(
        limiter
            .acquire(&[&scope], 60, Duration::ZERO, timeout)
            .await
            .unwrap(),
        Acquired::Granted(_)
    ));
    app.cleanup().await;
}

#[tokio::test]
async fn a_key_pause_is_seen_at_once_by_its_own_worker_and_within_a_recheck_by_another() {
    use switchyard::config::Limits;
    use switchyard::routing::limits::{Acquired, Scope};
    let app = spawn_app_with("").await;
    // A key scope counts no calls: only a shared pause (a retry-after) can hold it.
    let scope = Scope::key("pause-test", "k1", Limits::default());
    let (a, b) = two_limiters(&app, &scope).await;
    let timeout = Duration::from_secs(5);
    let granted = |acquired: Acquired| matches!(acquired, Acquired::Granted(_));
    // Both have read the scope (unpaused) just now.
    assert!(granted(
        a.acquire(&[&scope], 0, Duration::ZERO, timeout)
            .await
            .unwrap()
    ));
    assert!(granted(
        b.acquire(&[&scope], 0, Duration::ZERO, timeout)
            .await
            .unwrap()
    ));
    a.pause(&scope, Duration::from_secs(3)).await;
    assert!(
        !granted(
            a.acquire(&[&scope], 0, Duration::ZERO, timeout)
                .await
                .unwrap()
        ),
        "the worker that announced the pause keeps it at once"
    );
    // The other worker reads the shared pause again after at most 100 ms.
    tokio::time::sleep(Duration::from_millis(250)).await;
    match b
        .acquire(&[&scope], 0, Duration::ZERO, timeout)
        .await
        .unwrap()
    {
        Acquired::TooLong(wait) => assert!(
            wait > Duration::from_secs(2) && wait <= Duration::from_secs(3),
            "the rest of the announced pause: {wait:?}"
        ),
        Acquired::Granted(_) => panic!("another worker's pause was not seen"),
    }
    app.cleanup().await;
}

/// A call that found no free HTTP/1.1 connection (`http1_max_connections`) was never sent: its
/// place in the provider's rate window is given back, so the next call is not held back by it.
#[tokio::test]
async fn a_call_that_got_no_connection_gives_back_its_place_in_the_rate_window() {
    use switchyard::stages::dispatch::{Shared, dispatch};
    let fake = FakeProvider::start(&[]);
    let config = format!(
        r#"
[routing]
max_limit_wait_secs = 1

[[providers]]
name = "narrow"
kind = "openai"
base_url = "{}/v1"
keys = [{{ id = "k", env = "CARGO_MANIFEST_DIR" }}]
limits = {{ rpm = 1, window_secs = 60 }}
timeout_secs = 1
max_retries = 0
http1_max_connections = 1
models = [{{ name = "m" }}]

[[routes]]
alias = "narrow"
targets = [{{ provider = "narrow", model = "m" }}]
"#,
        fake.url
    );
    let app = spawn_app_with(&config).await;
    let job = job("acme", None, "narrow", "Hello.");
    let plan = app.ctx.router.plan(&job, &|_| None).unwrap();
    let shared = Shared {
        limiter: app.ctx.limiter.as_ref(),
        ..Shared::default()
    };
    let cap = plan.targets[0]
        .provider
        .connections
        .as_ref()
        .expect("a plain http provider has a connection cap");
    let held = cap.wait(Duration::from_secs(1)).await.unwrap();
    let refused = dispatch(&job, &plan, None, shared).await;
    let error = refused.attempts[0].outcome.as_ref().unwrap_err();
    assert!(
        error.message.contains("http1_max_connections"),
        "{}",
        error.message
    );
    drop(held);
    let served = dispatch(&job, &plan, None, shared).await;
    assert!(
        served.outcome.is_ok(),
        "the one call a minute was not used up: {:?}",
        served.outcome
    );
    assert_eq!(fake.requests().await, 1);
    app.cleanup().await;
}

/// A call whose task is dropped while it holds a concurrency slot (its session lost the broker,
/// the grace period ran out, or it panicked) gives the slot back: otherwise it would be held
/// until its lease expires, for a stream up to an hour, and the provider would look full to
/// every worker.
#[tokio::test]
async fn a_slot_held_by_a_dropped_or_panicked_call_is_given_back_to_every_worker() {
    use switchyard::config::Limits;
    use switchyard::routing::limits::{Acquired, Scope};
    let app = spawn_app_with("").await;
    let scope = Scope::provider(
        "slot-test",
        Limits {
            max_concurrency: Some(1),
            ..Limits::default()
        },
    );
    let (a, b) = two_limiters(&app, &scope).await;
    // A streamed call's lease: it could last an hour.
    let long_call = Duration::from_secs(3600);
    let granted = |acquired: Acquired| matches!(acquired, Acquired::Granted(_));
    for panics in [false, true] {
        let (taken, slot_held) = tokio::sync::oneshot::channel();
        let mut calls = tokio::task::JoinSet::new();
        let (limiter, held_scope) = (a.clone(), scope.clone());
        calls.spawn(async move {
            let Acquired::Granted(_lease) = limiter
                .acquire(&[&held_scope], 0, Duration::ZERO, long_call)
                .await
                .unwrap()
            else {
                panic!("the only slot was free");
            };
            taken.send(()).unwrap();
            if panics {
                panic!("the call's task panics holding its slot");
            }
            std::future::pending::<()>().await;
        });
        slot_held.await.unwrap();
        assert!(
            !granted(
                b.acquire(&[&scope], 0, Duration::ZERO, long_call)
                    .await
                    .unwrap()
            ),
            "the slot is held while the call lives"
        );
        calls.abort_all();
        let ended = calls.join_next().await.unwrap();
        assert_eq!(ended.unwrap_err().is_panic(), panics);
        // What the worker's sharing task does every second.
        a.release_orphans().await;
        let Acquired::Granted(lease) = b
            .acquire(&[&scope], 0, Duration::ZERO, long_call)
            .await
            .unwrap()
        else {
            panic!("a dropped call's slot was not given back (panicked: {panics})");
        };
        b.release(lease, None).await;
    }
    app.cleanup().await;
}

/// A worker that could not listen for other workers' key rests when it started (Postgres
/// refused the connection) listens once Postgres takes it, and adopts the rests announced
/// after that.
#[tokio::test]
async fn a_key_rest_listener_refused_at_start_listens_once_postgres_lets_it() {
    use switchyard::providers::KeyStatus;
    let config = "
[[providers]]
name = \"rested\"
kind = \"openai\"
base_url = \"http://127.0.0.1:9/v1\"
keys = [{ id = \"k\", env = \"CARGO_MANIFEST_DIR\" }]
models = [{ name = \"m\" }]
";
    let app = spawn_app_with(config).await;
    let allow = |allowed: bool| {
        format!(
            "ALTER DATABASE \"{}\" ALLOW_CONNECTIONS {allowed}",
            app.database
        )
    };
    // The connection held here stays open; a new one (the listener's) is refused. A database
    // is closed to new connections from another one.
    let mut held = app.pool().acquire().await.unwrap();
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&format!(
        "{}/postgres",
        app.database_server
    ))
    .await
    .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(allow(false)))
        .execute(&mut admin)
        .await
        .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let (_announcer, announced) = tokio::sync::mpsc::unbounded_channel();
    let mut sharing = tokio::task::JoinSet::new();
    // A pool of its own, with no connection yet: the listener's must be a new one.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_lazy(&format!("{}/{}", app.database_server, app.database))
        .unwrap();
    sharing.spawn(switchyard::routing::sharing::share_key_rests(
        app.ctx.registry.clone(),
        pool,
        announced,
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sqlx::query(sqlx::AssertSqlSafe(allow(true)))
        .execute(&mut admin)
        .await
        .unwrap();
    let keys = &app.ctx.registry.get("rested").unwrap().keys;
    let until_ms = chrono::Utc::now().timestamp_millis() + 60_000;
    let payload = format!(r#"{{"provider":"rested","key_id":"k","until_ms":{until_ms}}}"#);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    // Announced again until adopted: the listener starts within a second of being allowed.
    while !matches!(keys.status("k"), Some(KeyStatus::Resting(_))) {
        assert!(
            std::time::Instant::now() < deadline,
            "the rest was never adopted"
        );
        sqlx::query("SELECT pg_notify('switchyard_key_rest', $1)")
            .bind(&payload)
            .execute(&mut *held)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    while sharing.join_next().await.is_some() {}
    drop(held);
    app.cleanup().await;
}
