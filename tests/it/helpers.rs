//! `spawn_app()` and friends: a fresh database, a random broker prefix with the topology
//! declared, a `fake-provider` on a loopback port, and helpers to publish, run a worker and
//! collect messages.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicGetOptions, ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{BasicProperties, Consumer};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use switchyard::app::Context;
use switchyard::config::Settings;
use switchyard::messages::{
    ChatMessage, ChatRequest, CostSummary, Job, JobResult, JobStatus, ResultHead, Timings,
};
use switchyard::queue::publisher::{Outgoing, Publisher};
use switchyard::queue::topology::{JOBS_ROUTING_KEY, Names};
use switchyard::worker::{self, WorkerOptions, WorkerReport};
use uuid::Uuid;

/// Postgres server the tests use (a database per test is created on it).
pub fn database_server() -> String {
    std::env::var("SWITCHYARD_TEST_DATABASE_SERVER")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

/// RabbitMQ the tests use.
pub fn broker_url() -> String {
    std::env::var("SWITCHYARD_TEST_BROKER_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// A running fake provider.
pub struct FakeProvider {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub url: String,
}

impl FakeProvider {
    /// Starts `fake-provider` with extra flags and waits for its address.
    pub fn start(args: &[&str]) -> Self {
        Self::start_at(0, args)
    }

    /// Starts `fake-provider` on `port` (0 = any free port).
    pub fn start_at(port: u16, args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fake-provider"))
            .args(["--port", &port.to_string()])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("fake-provider starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("fake-provider prints its address");
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line from fake-provider: {line:?}"))
            .to_owned();
        Self { child, url }
    }

    /// `GET /stats`.
    pub async fn stats(&self) -> Value {
        reqwest::get(format!("{}/stats", self.url))
            .await
            .expect("stats answer")
            .json()
            .await
            .expect("stats are JSON")
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("url ends in a port")
    }

    /// Chat requests received, whatever their outcome.
    pub async fn requests(&self) -> u64 {
        self.stats().await["requests_total"]
            .as_u64()
            .expect("requests_total")
    }
}

impl Drop for FakeProvider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One test's world.
pub struct TestApp {
    pub ctx: Context,
    pub names: Names,
    pub database: String,
    /// The Postgres server holding `database` (`postgres://…:port`, no database).
    pub database_server: String,
    pub publisher: Publisher,
    /// Config file with this app's database, prefix and providers, for spawned binaries.
    pub config_file: tempfile::NamedTempFile,
}

/// TOML for a provider `fake` (OpenAI kind) at `url`, route `fake` → it.
pub fn fake_provider_config(url: &str) -> String {
    format!(
        r#"
[[providers]]
name = "fake"
kind = "openai"
base_url = "{url}/v1"
timeout_secs = 5
# Any variable that is set will do: fake-provider accepts any bearer token.
keys = [{{ id = "fake-key-1", env = "CARGO_MANIFEST_DIR" }}]
models = [{{ name = "fake-model", prices = {{ input = "0.5", cached_input = "0.25", output = "1.5" }} }}]

[[routes]]
alias = "fake"
targets = [{{ provider = "fake", model = "fake-model" }}]

[[routes]]
alias = "default"
targets = [{{ provider = "extractive", model = "extractive-v1" }}]
"#
    )
}

/// TOML for a provider `trickle` at `url` allowing one request per 3 s, route `trickle` → it,
/// and a wait for a limit of at most 1 s: a second job in the window is parked.
pub fn trickle_config(url: &str) -> String {
    format!(
        r#"
[routing]
max_limit_wait_secs = 1

[[providers]]
name = "trickle"
kind = "openai"
base_url = "{}/v1"
keys = [{{ id = "k", env = "CARGO_MANIFEST_DIR" }}]
limits = {{ rpm = 1, window_secs = 3 }}
models = [{{ name = "m" }}]

[[routes]]
alias = "trickle"
targets = [{{ provider = "trickle", model = "m" }}]
"#,
        url
    )
}

/// An app with the default (built-in model only) configuration.
pub async fn spawn_app() -> TestApp {
    spawn_app_with("").await
}

/// An app whose settings are built-in defaults, then `extra_toml`, then this test's database
/// and prefix.
pub async fn spawn_app_with(extra_toml: &str) -> TestApp {
    spawn_app_full("", extra_toml).await
}

/// Like [`spawn_app_with`], with extra lines for the `[worker]` section.
pub async fn spawn_app_full(worker_toml: &str, extra_toml: &str) -> TestApp {
    spawn_app_on(&broker_url(), &database_server(), worker_toml, extra_toml).await
}

/// Like [`spawn_app_full`], on a given broker and Postgres server (the chaos tests' private
/// instances).
pub async fn spawn_app_on(
    broker_url: &str,
    database_server: &str,
    worker_toml: &str,
    extra_toml: &str,
) -> TestApp {
    let suffix = Uuid::now_v7().simple().to_string();
    let database = format!("sy_test_{suffix}");
    let prefix = format!("sytest-{suffix}");
    let toml = format!(
        "[broker]\nurl = \"{broker_url}\"\nprefix = \"{prefix}\"\n\n[database]\nurl = \"{database_server}/{database}\"\nmax_connections = 5\n\n[worker]\nconcurrency = 16\nshutdown_grace_secs = 10\n{worker_toml}\n{extra_toml}",
    );
    let settings = Settings::from_toml(&toml).expect("test config is valid");
    let config_file = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp file");
    std::fs::write(config_file.path(), &toml).expect("write config");
    let ctx = Context::connect(settings.clone())
        .await
        .expect("connect to the test database and broker");
    let publisher = Publisher::open(&ctx.broker).await.expect("publisher");
    TestApp {
        names: ctx.names.clone(),
        ctx,
        database,
        database_server: database_server.to_owned(),
        publisher,
        config_file,
    }
}

/// A summarization-style request.
pub fn request(text: &str) -> ChatRequest {
    ChatRequest {
        messages: vec![
            ChatMessage::text_message("system", "Summarize."),
            ChatMessage::text_message("user", text),
        ],
        max_tokens: Some(60),
        ..ChatRequest::default()
    }
}

/// A job for `tenant`/`batch` on `route`.
pub fn job(tenant: &str, batch: Option<&str>, route: &str, text: &str) -> Job {
    Job::new(tenant, batch, route, request(text))
}

impl TestApp {
    pub fn pool(&self) -> &PgPool {
        &self.ctx.pool
    }

    pub async fn publish_job(&self, job: &Job) {
        self.publish_raw(&serde_json::to_vec(job).unwrap(), Some(&job.id.to_string()))
            .await;
    }

    pub async fn publish_jobs(&self, jobs: &[Job]) {
        let messages: Vec<Outgoing> = jobs
            .iter()
            .map(|job| switchyard::commands::publish::job_message(&self.names, job))
            .collect();
        self.publisher
            .publish_all(&messages)
            .await
            .expect("publish jobs");
    }

    /// Publishes arbitrary bytes to the jobs exchange.
    pub async fn publish_raw(&self, body: &[u8], message_id: Option<&str>) {
        let mut properties = BasicProperties::default().with_delivery_mode(2);
        if let Some(id) = message_id {
            properties = properties.with_message_id(id.into());
        }
        self.publisher
            .channel()
            .basic_publish(
                self.names.jobs_exchange().as_str().into(),
                JOBS_ROUTING_KEY.into(),
                Default::default(),
                body,
                properties,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
    }

    /// Runs an in-process worker until the queue is empty and nothing is in flight.
    pub async fn run_worker_until_idle(&self) -> WorkerReport {
        let options = WorkerOptions {
            concurrency: 16,
            exit_when_idle: true,
            idle_after: Duration::from_millis(500),
            grace: Duration::from_secs(10),
        };
        // A guard against a hung worker, not a performance bound: on a loaded 2-core machine
        // 10,000 jobs through a debug build can take two minutes.
        tokio::time::timeout(Duration::from_secs(300), worker::run(&self.ctx, &options))
            .await
            .expect("worker finishes within 300 s")
            .expect("worker runs without error")
    }

    /// A temporary queue bound to the results (or events) exchange with `pattern`.
    pub async fn subscribe(&self, events: bool, pattern: &str) -> Consumer {
        let channel = self.ctx.broker.create_channel().await.unwrap();
        let exchange = if events {
            self.names.events_exchange()
        } else {
            self.names.results_exchange()
        };
        switchyard::queue::listen(&channel, &exchange, pattern)
            .await
            .unwrap()
    }

    /// Messages left in the dead-letter queue (drained).
    pub async fn drain_dead_letters(&self) -> Vec<lapin::message::BasicGetMessage> {
        let channel = self.ctx.broker.create_channel().await.unwrap();
        let mut messages = Vec::new();
        while let Some(message) = channel
            .basic_get(
                self.names.dead_queue().as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
        {
            messages.push(message);
        }
        messages
    }

    /// Number of result rows per job id, as (distinct jobs, total rows).
    pub async fn result_rows(&self) -> (i64, i64) {
        sqlx::query_as("SELECT count(DISTINCT job_id), count(*) FROM results")
            .fetch_one(self.pool())
            .await
            .unwrap()
    }

    /// Deletes this test's queues and exchanges and drops its database.
    pub async fn cleanup(self) {
        let channel = self.ctx.broker.create_channel().await.unwrap();
        let retry: Vec<String> = self
            .names
            .retry_queues()
            .into_iter()
            .map(|(q, _)| q)
            .collect();
        for queue in [self.names.jobs_queue(), self.names.dead_queue()]
            .into_iter()
            .chain(retry)
        {
            let _ = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for exchange in [
            self.names.jobs_exchange(),
            self.names.dead_exchange(),
            self.names.results_exchange(),
            self.names.events_exchange(),
        ] {
            let _ = channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        self.ctx.close().await;
        drop_database(&self.database_server, &self.database).await;
    }
}

/// Drops `database` on `server`, if both are there, whoever is still connected.
pub async fn drop_database(server: &str, database: &str) {
    if let Ok(options) = switchyard::store::connect_options(&format!("{server}/{database}")) {
        let _ = switchyard::store::drop_database_if_exists(&options).await;
    }
}

/// Receives `n` messages (or fails after `wait`).
pub async fn collect(
    consumer: &mut Consumer,
    n: usize,
    wait: Duration,
) -> Vec<lapin::message::Delivery> {
    let mut out = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + wait;
    while out.len() < n {
        match tokio::time::timeout_at(deadline, consumer.next()).await {
            Ok(Some(Ok(delivery))) => out.push(delivery),
            Ok(other) => panic!("consumer ended: {other:?}"),
            Err(_) => panic!("only {} of {n} messages arrived within {wait:?}", out.len()),
        }
    }
    out
}

/// Every element of a message body: the body itself, or each item of a batched array.
pub fn items(body: &[u8]) -> Vec<Value> {
    match serde_json::from_slice::<Value>(body).expect("message body is JSON") {
        Value::Array(items) => items,
        value => vec![value],
    }
}

/// `switchyard` binary with this app's config.
/// The JSON lines of a file (a command's `--out`).
pub fn read_lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub fn switchyard(app: &TestApp) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    command.env("SWITCHYARD_CONFIG", app.config_file.path());
    command.env_remove("RUST_LOG");
    command
}

/// Runs `command` with `input` on its standard input, capturing its output.
pub fn run_with_stdin(mut command: Command, input: &str) -> std::process::Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// Runs `rabbitmqctl` (the tests run where the broker does, as root) and asserts it succeeds.
pub fn rabbitmqctl(args: &[&str]) {
    let output = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `count` worker processes with `--exit-when-idle` and the given concurrency.
pub fn workers(app: &TestApp, count: usize, concurrency: u16) -> Vec<Child> {
    (0..count)
        .map(|_| worker_with_env(app, concurrency, &[]))
        .collect()
}

/// A worker process with `--exit-when-idle`, the given concurrency and `env` set (failpoints,
/// for one).
pub fn worker_with_env(app: &TestApp, concurrency: u16, env: &[(&str, &str)]) -> Child {
    let mut command = switchyard(app);
    command.args([
        "worker",
        "--exit-when-idle",
        "--concurrency",
        &concurrency.to_string(),
    ]);
    for (name, value) in env {
        command.env(name, value);
    }
    command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("worker starts")
}

/// Waits for every worker process to exit successfully.
pub async fn wait_all(children: Vec<Child>) {
    for mut child in children {
        let status = tokio::task::spawn_blocking(move || child.wait())
            .await
            .expect("waiter runs")
            .expect("worker exits");
        assert!(status.success(), "worker exited with {status}");
    }
}

/// A succeeded result of tenant `acme` to store, `generation` given.
pub fn stored_result(job_id: Uuid, generation: i32) -> JobResult {
    JobResult {
        schema: "switchyard.result.v1".to_owned(),
        job_id,
        generation,
        tenant: Some("acme".to_owned()),
        batch: Some("b1".to_owned()),
        route: Some("fake".to_owned()),
        status: JobStatus::Succeeded,
        response: None,
        provider: None,
        model: None,
        attempts: Vec::new(),
        error: None,
        cost: CostSummary::default(),
        timings: Timings::instant(chrono::Utc::now()),
        metadata: None,
        retention: None,
    }
}

/// Stores results as finalize does (`results::insert_many`).
pub async fn store_results(conn: &mut PgConnection, results: impl Iterator<Item = &JobResult>) {
    let rows: Vec<(ResultHead, String)> = results
        .map(|r| (r.head(), serde_json::to_string(r).unwrap()))
        .collect();
    let rows: Vec<(&ResultHead, &str)> = rows.iter().map(|(h, b)| (h, b.as_str())).collect();
    switchyard::store::results::insert_many(conn, &rows, chrono::Utc::now())
        .await
        .unwrap();
}

/// The plan Postgres makes for `sql` with `ids` as its one argument (`EXPLAIN`, the values
/// known to the planner as in a prepared statement's first runs), one line per node.
pub async fn plan_for_ids(conn: &mut PgConnection, sql: &str, ids: &[Uuid]) -> String {
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {sql}")))
        .bind(ids)
        .fetch_all(conn)
        .await
        .unwrap();
    plan.join("\n")
}

/// The generic plan of `sql` (the one Postgres may keep for a prepared statement from its
/// sixth run on, made without the arguments' values), explained for `args`: `types` and
/// `args` are SQL lists, e.g. `"text, uuid[]"` and `"'acme', ARRAY[…]::uuid[]"` (see
/// [`sql_array`]). The arguments are written out, as `EXECUTE` takes no bound parameters.
pub async fn generic_plan(conn: &mut PgConnection, sql: &str, types: &str, args: &str) -> String {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET plan_cache_mode = force_generic_plan;
         PREPARE generic_plan_of({types}) AS {sql}"
    )))
    .execute(&mut *conn)
    .await
    .unwrap();
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN EXECUTE generic_plan_of({args})"
    )))
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    sqlx::raw_sql("DEALLOCATE generic_plan_of; RESET plan_cache_mode")
        .execute(&mut *conn)
        .await
        .unwrap();
    plan.join("\n")
}

/// `items` as an SQL array literal of `sql_type`, e.g. `ARRAY['a','b']::text[]`, for
/// [`generic_plan`]'s arguments. The items are test data without quotes.
pub fn sql_array(
    items: impl IntoIterator<Item = impl std::fmt::Display>,
    sql_type: &str,
) -> String {
    let items: Vec<String> = items.into_iter().map(|item| format!("'{item}'")).collect();
    format!("ARRAY[{}]::{sql_type}[]", items.join(","))
}
