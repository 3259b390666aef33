//! Chaos tests: batches of 5,000 jobs through several worker processes while a worker is
//! SIGKILLed, RabbitMQ restarts, Postgres restarts or a provider hangs. After each: every job
//! has exactly one result row, the results topic carried a message for every job (deduped on
//! `message_id`), no committed job was billed again, the outbox is empty, and the workers
//! that were not killed are still running. RabbitMQ and Postgres restarts use private
//! instances (`private.rs`), never the shared ones.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use serde_json::Value;
use switchyard::messages::Job;
use switchyard::queue::publisher::Outgoing;
use tokio::time::Instant;

use crate::helpers::{
    FakeProvider, TestApp, broker_url, database_server, fake_provider_config, items, job,
    spawn_app_on, switchyard,
};
use crate::private::{PrivatePostgres, PrivateRabbit};

/// Jobs per chaos batch.
const JOBS: usize = 5000;
/// Jobs in flight per worker process.
const CONCURRENCY: u16 = 32;
/// fake-provider latency: 3 ± 2 ms.
const FAST: &[&str] = &["--latency-ms", "3", "--jitter-ms", "2"];

/// A worker process whose stderr goes to a log file; killed on drop, and its log's tail is
/// printed when the test is failing.
pub struct Worker {
    child: Option<Child>,
    log: PathBuf,
}

impl Worker {
    pub fn start(app: &TestApp, concurrency: u16, env: &[(&str, &str)], name: &str) -> Self {
        let log = std::env::temp_dir().join(format!("sy-chaos-{}-{name}.log", app.names.prefix()));
        let file = std::fs::File::create(&log).expect("worker log");
        let mut command = switchyard(app);
        command
            .args(["worker", "--concurrency", &concurrency.to_string()])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file);
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().expect("worker starts");
        Self {
            child: Some(child),
            log,
        }
    }

    fn child(&mut self) -> &mut Child {
        self.child
            .as_mut()
            .expect("the worker was not waited for yet")
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        self.child().try_wait().expect("worker status").is_none()
    }

    pub fn sigkill(&mut self) {
        self.child().kill().expect("SIGKILL");
        self.child().wait().expect("reaped");
    }

    /// Waits for the process to exit by itself.
    pub async fn wait(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("not waited for yet");
        tokio::task::spawn_blocking(move || child.wait())
            .await
            .expect("waiter")
            .expect("exit status")
    }

    /// SIGTERM, then the exit status.
    pub async fn sigterm(mut self) -> ExitStatus {
        let pid = self.child().id().to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill runs");
        assert!(sent.success());
        self.wait().await
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- tail of {} ---", self.log.display());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// Durable queues bound to the results and events exchanges, so messages published while a
/// broker restarts are kept for the test to read.
pub struct Capture {
    results: String,
    events: String,
}

/// A captured message.
pub struct Captured {
    pub message_id: String,
    pub body: Vec<u8>,
}

impl Capture {
    pub async fn declare(app: &TestApp) -> Self {
        let channel = app.ctx.broker.create_channel().await.unwrap();
        let capture = Self {
            results: format!("{}.capture.results", app.names.prefix()),
            events: format!("{}.capture.events", app.names.prefix()),
        };
        for (queue, exchange) in [
            (&capture.results, app.names.results_exchange()),
            (&capture.events, app.names.events_exchange()),
        ] {
            channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .unwrap();
            channel
                .queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    "#".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
        }
        capture
    }

    async fn drain(app: &TestApp, queue: &str) -> Vec<Captured> {
        let channel = app.ctx.broker.create_channel().await.unwrap();
        channel
            .basic_qos(2000, BasicQosOptions::default())
            .await
            .unwrap();
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut out = Vec::new();
        while let Ok(Some(Ok(delivery))) =
            tokio::time::timeout(Duration::from_secs(3), consumer.next()).await
        {
            out.push(Captured {
                message_id: delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|id| id.as_str().to_owned())
                    .unwrap_or_default(),
                body: delivery.data,
            });
        }
        let _ = channel.close(200, "drained".into()).await;
        out
    }

    /// Every message that reached the results exchange.
    pub async fn results(&self, app: &TestApp) -> Vec<Captured> {
        Self::drain(app, &self.results).await
    }

    /// Every message that reached the events exchange.
    pub async fn events(&self, app: &TestApp) -> Vec<Captured> {
        Self::drain(app, &self.events).await
    }

    pub async fn delete(&self, app: &TestApp) {
        let channel = app.ctx.broker.create_channel().await.unwrap();
        for queue in [&self.results, &self.events] {
            let _ = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
}

/// `n` jobs of tenant `acme`, batch `chaos`, on route `route`.
pub fn batch(n: usize, route: &str) -> Vec<Job> {
    (0..n)
        .map(|i| {
            job(
                "acme",
                Some("chaos"),
                route,
                &format!("Job {i}. Chaos is a ladder, and every rung is one committed result."),
            )
        })
        .collect()
}

pub async fn results_count(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM results")
        .fetch_one(app.pool())
        .await
        .unwrap()
}

/// Waits until at least `n` results are committed.
pub async fn wait_for_results(app: &TestApp, n: usize, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let count = results_count(app).await;
        if count >= n as i64 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {count} of {n} results within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the outbox is empty (the relay caught up).
pub async fn wait_for_empty_outbox(app: &TestApp, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(app.pool())
            .await
            .unwrap();
        if pending == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{pending} outbox rows still unsent after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The promise after any fault: one result row per job, a result message per job (after
/// deduping on `message_id`), no charge after a job's committed result, an empty outbox.
pub async fn assert_nothing_lost_nothing_doubled(
    app: &TestApp,
    jobs: &[Job],
    results: &[Captured],
) {
    let expected: BTreeSet<String> = jobs.iter().map(|j| j.id.to_string()).collect();
    let (distinct, rows) = app.result_rows().await;
    assert_eq!(
        (distinct, rows),
        (jobs.len() as i64, jobs.len() as i64),
        "every job has exactly one result row"
    );
    let stored: BTreeSet<String> =
        sqlx::query_scalar::<_, uuid::Uuid>("SELECT job_id FROM results")
            .fetch_all(app.pool())
            .await
            .unwrap()
            .into_iter()
            .map(|id| id.to_string())
            .collect();
    assert_eq!(stored, expected, "the result rows are the published jobs'");

    let mut by_id: BTreeMap<&str, usize> = BTreeMap::new();
    for message in results {
        let body: Value = serde_json::from_slice(&message.body).unwrap();
        assert_eq!(
            body["job_id"].as_str(),
            Some(message.message_id.as_str()),
            "a result's message_id is its job id"
        );
        *by_id.entry(message.message_id.as_str()).or_default() += 1;
    }
    let delivered: BTreeSet<String> = by_id.keys().map(|id| (*id).to_owned()).collect();
    assert_eq!(
        delivered.len(),
        jobs.len(),
        "after deduping on message_id, the results topic carried one message per job ({} raw)",
        results.len()
    );
    assert_eq!(delivered, expected);

    let billed_after_commit: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM cost_ledger l JOIN results r ON r.job_id = l.job_id WHERE l.created_at > r.created_at",
    )
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(billed_after_commit, 0, "no committed job is billed again");
    let unsent: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(unsent, 0, "every outbox row was published");
}

/// Number of raw result messages beyond one per job (republished after a fault).
fn republished(results: &[Captured], jobs: usize) -> usize {
    results.len().saturating_sub(jobs)
}

async fn stop_all(workers: Vec<Worker>) {
    for worker in workers {
        let status = worker.sigterm().await;
        assert_eq!(status.code(), Some(0), "a worker stops cleanly on SIGTERM");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_sigkill_a_worker_several_times_mid_batch() {
    let started = Instant::now();
    let fake = FakeProvider::start(FAST);
    let app = spawn_app_on(
        &broker_url(),
        &database_server(),
        "",
        &fake_provider_config(&fake.url),
    )
    .await;
    let capture = Capture::declare(&app).await;
    let jobs = batch(JOBS, "fake");
    app.publish_jobs(&jobs).await;

    let mut steady: Vec<Worker> = (0..2)
        .map(|i| Worker::start(&app, CONCURRENCY, &[], &format!("steady{i}")))
        .collect();
    let mut kills = 0;
    for kill_at in [800, 1800, 2800, 3800] {
        let mut victim = Worker::start(&app, CONCURRENCY, &[], &format!("victim{kill_at}"));
        wait_for_results(&app, kill_at, Duration::from_secs(90)).await;
        victim.sigkill();
        kills += 1;
    }
    let at_last_kill = results_count(&app).await;
    let restarted = Worker::start(&app, CONCURRENCY, &[], "restarted");
    wait_for_results(&app, JOBS, Duration::from_secs(120)).await;
    wait_for_empty_outbox(&app, Duration::from_secs(30)).await;
    for worker in &mut steady {
        assert!(worker.alive(), "the workers that were not killed still run");
    }
    steady.push(restarted);
    stop_all(steady).await;

    let results = capture.results(&app).await;
    assert_nothing_lost_nothing_doubled(&app, &jobs, &results).await;
    assert!(
        at_last_kill < JOBS as i64,
        "the kills happened mid-batch ({at_last_kill} results at the last one)"
    );
    eprintln!(
        "sigkill chaos: {JOBS} jobs, {kills} kills, {} results republished, {:.1} s",
        republished(&results, JOBS),
        started.elapsed().as_secs_f64()
    );
    capture.delete(&app).await;
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_private_restart_rabbitmq_mid_batch() {
    let started = Instant::now();
    let rabbit = PrivateRabbit::start();
    let fake = FakeProvider::start(FAST);
    let app = spawn_app_on(
        &rabbit.url(),
        &database_server(),
        "",
        &fake_provider_config(&fake.url),
    )
    .await;
    let capture = Capture::declare(&app).await;
    let jobs = batch(JOBS, "fake");
    // The publisher publishes in chunks through the restart: it reconnects by itself.
    let messages: Vec<Outgoing> = jobs
        .iter()
        .map(|job| switchyard::commands::publish::job_message(&app.names, job))
        .collect();
    // It publishes half the batch, waits for the broker to go down, and publishes the rest
    // into the outage: it must reconnect by itself to finish.
    let publisher = app.publisher.clone();
    let published = Arc::new(AtomicUsize::new(0));
    let broker_down = Arc::new(AtomicBool::new(false));
    let (counter, down) = (published.clone(), broker_down.clone());
    let mut publishing = tokio::task::JoinSet::new();
    publishing.spawn(async move {
        for chunk in messages.chunks(100) {
            while counter.load(Ordering::SeqCst) >= JOBS / 2 && !down.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            publisher.publish_all(chunk).await?;
            counter.fetch_add(chunk.len(), Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok::<_, switchyard::queue::BrokerError>(())
    });

    let mut workers: Vec<Worker> = (0..3)
        .map(|i| Worker::start(&app, CONCURRENCY, &[], &format!("w{i}")))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    while published.load(Ordering::SeqCst) < JOBS / 2 || results_count(&app).await < 500 {
        assert!(Instant::now() < deadline, "no progress before the restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rabbit.stop();
    broker_down.store(true, Ordering::SeqCst);
    let at_stop = results_count(&app).await;
    let published_at_stop = published.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    for worker in &mut workers {
        assert!(worker.alive(), "workers outlive the broker going away");
    }
    rabbit.start_again();
    let down_for = started.elapsed();
    wait_for_results(&app, JOBS, Duration::from_secs(120)).await;
    publishing
        .join_next()
        .await
        .expect("the publisher task")
        .unwrap()
        .expect("the publisher finished through the restart");
    wait_for_empty_outbox(&app, Duration::from_secs(30)).await;
    for worker in &mut workers {
        assert!(
            worker.alive(),
            "workers still run after the broker came back"
        );
    }
    stop_all(workers).await;

    let results = capture.results(&app).await;
    assert_nothing_lost_nothing_doubled(&app, &jobs, &results).await;
    assert!(at_stop < JOBS as i64, "the restart happened mid-batch");
    assert!(
        published_at_stop < JOBS,
        "the restart happened while publishing"
    );
    eprintln!(
        "rabbitmq restart chaos: {JOBS} jobs, broker stopped at {at_stop} results and {published_at_stop} published, back at t={:.1} s, {} results republished, {:.1} s in all",
        down_for.as_secs_f64(),
        republished(&results, JOBS),
        started.elapsed().as_secs_f64()
    );
    app.cleanup().await;
    drop(rabbit);
}

/// A free loopback port for a worker's health endpoint.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn readyz(port: u16) -> Option<u16> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    client
        .get(format!("http://127.0.0.1:{port}/readyz"))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// Waits until every worker's `/readyz` answers `want` (200 or not 200).
async fn wait_for_readiness(ports: &[u16], ready: bool, within: Duration) {
    let deadline = Instant::now() + within;
    for port in ports {
        loop {
            let status = readyz(*port).await;
            if (status == Some(200)) == ready && status.is_some() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "worker on {port} did not become {} within {within:?} (last: {status:?})",
                if ready { "ready" } else { "not ready" }
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn ready_jobs(app: &TestApp) -> u32 {
    let channel = app.ctx.broker.create_channel().await.unwrap();
    let (ready, _) = switchyard::queue::topology::jobs_queue_depth(&channel, &app.names)
        .await
        .unwrap();
    let _ = channel.close(200, "checked".into()).await;
    ready
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_private_restart_postgres_mid_batch() {
    let started = Instant::now();
    let postgres = PrivatePostgres::start();
    let fake = FakeProvider::start(FAST);
    let app = spawn_app_on(
        &broker_url(),
        &postgres.server(),
        "",
        &fake_provider_config(&fake.url),
    )
    .await;
    let capture = Capture::declare(&app).await;
    let jobs = batch(JOBS, "fake");
    app.publish_jobs(&jobs).await;

    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut workers: Vec<Worker> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            let addr = format!("127.0.0.1:{port}");
            Worker::start(
                &app,
                CONCURRENCY,
                &[("SWITCHYARD_WORKER__HTTP_ADDR", &addr)],
                &format!("w{i}"),
            )
        })
        .collect();
    wait_for_readiness(&ports, true, Duration::from_secs(30)).await;
    wait_for_results(&app, 1000, Duration::from_secs(90)).await;
    postgres.stop();
    let stopped_at = Instant::now();
    wait_for_readiness(&ports, false, Duration::from_secs(20)).await;
    // Workers stop taking jobs: beyond the deliveries they hold (their prefetch), nothing
    // leaves the queue while Postgres is down.
    let early = ready_jobs(&app).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let late = ready_jobs(&app).await;
    let held = 3 * u32::from(CONCURRENCY);
    assert!(
        late + held >= early,
        "workers kept taking jobs while Postgres was down ({early} → {late} ready)"
    );
    for worker in &mut workers {
        assert!(worker.alive(), "workers outlive Postgres going away");
    }
    postgres.start_again();
    let down_for = stopped_at.elapsed();
    wait_for_readiness(&ports, true, Duration::from_secs(30)).await;
    wait_for_results(&app, JOBS, Duration::from_secs(120)).await;
    wait_for_empty_outbox(&app, Duration::from_secs(30)).await;
    for worker in &mut workers {
        assert!(worker.alive(), "workers still run after Postgres came back");
    }
    stop_all(workers).await;

    let results = capture.results(&app).await;
    assert_nothing_lost_nothing_doubled(&app, &jobs, &results).await;
    // Calls that returned while Postgres was down kept their ledger rows (and their results)
    // until it came back: no call was made twice, and none went unbilled.
    let calls = fake.stats().await["requests_total"].as_i64().unwrap();
    let billed: i64 = sqlx::query_scalar("SELECT count(*) FROM cost_ledger")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(
        (calls, billed),
        (JOBS as i64, JOBS as i64),
        "provider calls and ledger rows"
    );
    eprintln!(
        "postgres restart chaos: {JOBS} jobs, Postgres down {:.1} s ({early} → {late} jobs ready meanwhile), {} results republished, {:.1} s in all",
        down_for.as_secs_f64(),
        republished(&results, JOBS),
        started.elapsed().as_secs_f64()
    );
    capture.delete(&app).await;
    app.cleanup().await;
    drop(postgres);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_a_hanging_provider_times_out_per_attempt_and_fails_over() {
    let started = Instant::now();
    let hanging = FakeProvider::start(&[
        "--latency-ms",
        "3",
        "--jitter-ms",
        "2",
        "--rate-hang",
        "0.05",
    ]);
    let steady = FakeProvider::start(FAST);
    let config = format!(
        r#"
[[providers]]
name = "hangs"
kind = "openai"
base_url = "{}/v1"
keys = [{{ id = "hangs-key", env = "CARGO_MANIFEST_DIR" }}]
models = [{{ name = "fake-model", prices = {{ input = "0.5", output = "1.5" }} }}]

[[providers]]
name = "steady"
kind = "openai"
base_url = "{}/v1"
keys = [{{ id = "steady-key", env = "CARGO_MANIFEST_DIR" }}]
models = [{{ name = "fake-model", prices = {{ input = "0.5", output = "1.5" }} }}]

[[routes]]
alias = "fake"
targets = [{{ provider = "hangs", model = "fake-model", timeout_secs = 1 }}]
fallback = [{{ provider = "steady", model = "fake-model", timeout_secs = 5 }}]

# This test is about per-attempt timeouts and failover. With circuit breakers on, a burst of
# timeouts opens the circuit and later jobs skip the hanging provider altogether (correct,
# but then "rescued" counts jobs that never hung).
[routing]
breaker_consecutive_failures = 1000000
breaker_error_rate = 1.5
"#,
        hanging.url, steady.url
    );
    let app = spawn_app_on(&broker_url(), &database_server(), "", &config).await;
    let capture = Capture::declare(&app).await;
    let jobs = batch(JOBS, "fake");
    app.publish_jobs(&jobs).await;
    let mut workers: Vec<Worker> = (0..3)
        .map(|i| Worker::start(&app, CONCURRENCY, &[], &format!("w{i}")))
        .collect();
    wait_for_results(&app, JOBS, Duration::from_secs(150)).await;
    wait_for_empty_outbox(&app, Duration::from_secs(30)).await;
    for worker in &mut workers {
        assert!(worker.alive(), "workers still run");
    }
    stop_all(workers).await;

    let results = capture.results(&app).await;
    assert_nothing_lost_nothing_doubled(&app, &jobs, &results).await;
    let succeeded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM results WHERE status = 'succeeded'")
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert_eq!(
        succeeded, JOBS as i64,
        "every job succeeded on the fallback"
    );
    let timeouts: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM attempts WHERE provider = 'hangs' AND error_class = 'timeout'",
    )
    .fetch_one(app.pool())
    .await
    .unwrap();
    let hung = hanging.stats().await["by_status"]["hang"]
        .as_i64()
        .unwrap_or(0);
    assert!(hung > 0, "the provider hung some requests");
    assert_eq!(
        timeouts, hung,
        "every hung request became a timed-out attempt"
    );
    let rescued: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT job_id) FROM attempts WHERE provider = 'steady' AND outcome = 'succeeded'",
    )
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(
        rescued, hung,
        "each job whose attempt hung failed over to the fallback"
    );
    eprintln!(
        "hanging provider chaos: {JOBS} jobs, {hung} hung attempts failed over, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    capture.delete(&app).await;
    app.cleanup().await;
}

/// Items of every event message, deduped on `message_id`, with the number of raw messages.
pub fn deduped_events(events: &[Captured]) -> (Vec<Value>, usize) {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for message in events {
        if seen.insert(message.message_id.clone()) {
            out.extend(items(&message.body));
        }
    }
    (out, events.len())
}

/// Ctrl-C stops `summarize` at once even while it is publishing into a broker that has gone
/// away (publishing waits for the broker for up to ten minutes): exit code 130, the batch to
/// resume named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_ctrl_c_stops_summarize_publishing_into_a_stopped_broker() {
    let rabbit = PrivateRabbit::start();
    let app = spawn_app_on(&rabbit.url(), &database_server(), "", "").await;
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<String> = (0..20_000)
        .map(|i| format!(r#"{{"id":"d{i}","text":"Document {i}. The tide came in early."}}"#))
        .collect();
    std::fs::write(dir.path().join("many.jsonl"), lines.join("\n")).unwrap();
    let run = crate::helpers::switchyard(&app)
        .args([
            "summarize",
            dir.path().to_str().unwrap(),
            "--batch",
            "outage",
        ])
        .args(["--out", dir.path().join("out.jsonl").to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The first rounds are stored and published; the broker goes while the rest are.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let published: i64 = sqlx::query_scalar("SELECT count(*) FROM batch_items WHERE published")
            .fetch_one(app.pool())
            .await
            .unwrap();
        if published > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the run publishes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rabbit.stop();
    let unpublished: i64 =
        sqlx::query_scalar("SELECT count(*) FROM batch_items WHERE NOT published")
            .fetch_one(app.pool())
            .await
            .unwrap();
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM batch_items")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert!(
        unpublished > 0 || stored < 20_000,
        "the broker stopped before the run had published everything"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = run.id().to_string();
    let signal = |name: &str| {
        std::process::Command::new("kill")
            .args([name, &pid])
            .status()
            .unwrap()
            .success()
    };
    assert!(signal("-INT"));
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || run.wait_with_output()),
    )
    .await;
    if output.is_err() {
        // It would go on trying to publish for minutes, into the next test's broker.
        signal("-KILL");
    }
    let output = output
        .expect("the run stops soon after Ctrl-C")
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("--batch outage to resume"), "{stderr}");
    rabbit.start_again();
    app.cleanup().await;
}
