//! The command line as a user runs it: exit codes, stderr messages, idempotent migrate,
//! publish and subscribe.

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;

use switchyard::queue::topology;

use crate::helpers::{TestApp, run_with_stdin, spawn_app, spawn_app_full, switchyard};

#[tokio::test]
async fn migrate_is_idempotent() {
    let app = spawn_app().await;
    for run in 1..=2 {
        let output = switchyard(&app).arg("migrate").output().unwrap();
        assert!(
            output.status.success(),
            "run {run}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let migrations: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(
        migrations as usize,
        switchyard::store::MIGRATOR.iter().count()
    );
    let channel = app.ctx.broker.create_channel().await.unwrap();
    let (ready, _) = topology::jobs_queue_depth(&channel, &app.names)
        .await
        .unwrap();
    assert_eq!(ready, 0);
    app.cleanup().await;
}

/// `switchyard publish -` with `args`, given `input` on its standard input.
fn publish_stdin(app: &TestApp, args: &[&str], input: &str) -> std::process::Output {
    let mut command = switchyard(app);
    command.args(["publish", "-"]).args(args);
    run_with_stdin(command, input)
}

/// A job larger than `worker.max_message_bytes` would be rejected unread, with a result that
/// cannot name its tenant or batch: `publish` refuses the file and publishes nothing.
#[tokio::test]
async fn publish_refuses_a_job_too_large_for_the_workers() {
    let app = spawn_app_full("max_message_bytes = 2048\n", "").await;
    let channel = app.ctx.broker.create_channel().await.unwrap();
    let big = format!(
        "{{\"messages\":[{{\"role\":\"user\",\"content\":\"one\"}}]}}\n\
         {{\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}\n",
        "x".repeat(3000)
    );
    let output = publish_stdin(&app, &["--tenant", "acme"], &big);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("line 2:") && stderr.contains("over worker.max_message_bytes (2048)"),
        "{stderr}"
    );
    assert_eq!(
        topology::jobs_queue_depth(&channel, &app.names)
            .await
            .unwrap()
            .0,
        0
    );
    app.cleanup().await;
}

#[tokio::test]
async fn publish_prints_one_id_per_job_and_a_bad_line_publishes_nothing() {
    let app = spawn_app().await;
    let channel = app.ctx.broker.create_channel().await.unwrap();

    let bad = "{\"messages\":[{\"role\":\"user\",\"content\":\"one\"}]}\n\n{\"messages\":[{\"role\":\"user\",\"content\":\"two\"}]}\n{\"messages\": 5}\n";
    let output = publish_stdin(&app, &["--tenant", "acme", "--batch", "b1"], bad);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("line 4:"), "{stderr}");
    assert!(stderr.contains("nothing was published"), "{stderr}");
    assert!(output.stdout.is_empty());
    assert_eq!(
        topology::jobs_queue_depth(&channel, &app.names)
            .await
            .unwrap()
            .0,
        0
    );

    let output = switchyard(&app)
        .args(["publish", "examples/requests.jsonl", "--tenant", "acme"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let ids: Vec<uuid::Uuid> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let expected = std::fs::read_to_string("examples/requests.jsonl")
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count();
    assert_eq!(ids.len(), expected);
    assert_eq!(
        topology::jobs_queue_depth(&channel, &app.names)
            .await
            .unwrap()
            .0 as usize,
        expected
    );
    app.cleanup().await;
}

#[tokio::test]
async fn subscribe_prints_each_result_as_one_json_line() {
    let app = spawn_app().await;
    let mut child = switchyard(&app)
        .args(["subscribe", "acme.#", "--limit", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it is bound, so no result is published before it listens.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.contains("listening"), "{line}");

    let output = switchyard(&app)
        .args(["publish", "examples/jobs.jsonl"])
        .output()
        .unwrap();
    assert!(output.status.success());
    app.run_worker_until_idle().await;
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(output.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(
        lines
            .iter()
            .all(|l| l["schema"] == "switchyard.result.v1" && l["tenant"] == "acme")
    );
    app.cleanup().await;
}

#[test]
fn config_check_rejects_an_unknown_key_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[worker]\nconcurency = 4\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["--config", path.to_str().unwrap(), "config", "check"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("concurency"), "{stderr}");
}

#[test]
fn config_check_accepts_the_example_config_and_never_prints_key_values() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["--config", "switchyard.example.toml", "config", "check"])
        .env("OPENAI_API_KEY", "sk-very-secret-value")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("route default"), "{stdout}");
    assert!(!stdout.contains("sk-very-secret-value"));
}

#[test]
fn environment_variables_override_the_file() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["--config", "switchyard.example.toml", "config", "check"])
        .env("SWITCHYARD_BROKER__PREFIX", "from-env")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stdout).contains("\"from-env\""));
}

#[test]
fn an_unreachable_broker_is_a_one_line_error_naming_the_address() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["publish", "examples/requests.jsonl"])
        .env(
            "SWITCHYARD_BROKER__URL",
            "amqp://guest:guest@127.0.0.1:1/%2f",
        )
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("127.0.0.1:1") && stderr.contains("rabbitmq-server -detached"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("guest:guest"),
        "credentials are not printed: {stderr}"
    );
}

#[test]
fn an_unreachable_database_is_a_one_line_error_naming_the_address() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["worker", "--exit-when-idle"])
        .env(
            "SWITCHYARD_DATABASE__URL",
            "postgres://postgres@127.0.0.1:1/nothing",
        )
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("127.0.0.1:1") && stderr.contains("pg_ctlcluster"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_worker_serves_health_readiness_and_metrics() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let app = crate::helpers::spawn_app().await;
    app.publish_job(&crate::helpers::job(
        "acme",
        None,
        "default",
        "Counted. Then scraped.",
    ))
    .await;
    let mut worker = switchyard(&app)
        .args(["worker"])
        .env("SWITCHYARD_WORKER__HTTP_ADDR", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let mut metrics = String::new();
    for _ in 0..200 {
        if let Ok(response) = reqwest::get(format!("{base}/metrics")).await {
            metrics = response.text().await.unwrap();
            if metrics.contains("switchyard_jobs_total") {
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        metrics.contains(r#"switchyard_jobs_total{status="succeeded"} 1"#),
        "{metrics}"
    );
    // There from the start, without an outage to set it.
    assert!(metrics.contains("switchyard_database_up 1"), "{metrics}");
    let health = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(ready.text().await.unwrap(), "database: up\nbroker: up\n");
    let pid = worker.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(worker.wait().unwrap().success());
    app.cleanup().await;
}

/// One bad invocation: the arguments, an optional config file and stdin, and the exit code
/// and stderr text it must end in.
struct BadRun {
    args: &'static [&'static str],
    config: Option<&'static str>,
    stdin: Option<&'static [u8]>,
    code: i32,
    says: &'static str,
}

#[tokio::test]
async fn bad_config_files_arguments_and_batch_files_each_fail_with_their_own_message() {
    let app = spawn_app().await;
    let run = |args, config, stdin, code, says| BadRun {
        args,
        config,
        stdin,
        code,
        says,
    };
    let cases = [
        // Config files (checked by `config check`, the same loader every command uses).
        run(&["config", "check"], Some("[worker]\nconcurency = 4\n"), None, 2, "unknown field: found `concurency`"),
        run(&["config", "check"], Some("[worker]\nconcurrency = \"many\"\n"), None, 2, "worker.concurrency"),
        run(&["config", "check"], Some("[worker]\nconcurrency = -1\n"), None, 2, "worker.concurrency"),
        run(&["config", "check"], Some("[worker\nconcurrency = 4\n"), None, 2, "TOML parse error"),
        run(&["config", "check"], Some("[[routes]]\nalias = \"x\"\ntargets = [{ provider = \"nope\", model = \"m\" }]\n"), None, 2, "unknown provider \"nope\""),
        run(&["config", "check"], Some("[[tenants]]\nname = \"a\"\nretention = \"forever\"\n"), None, 2, "unknown variant: found `forever`"),
        run(&["--config", "/nonexistent/switchyard.toml", "config", "check"], None, None, 2, "does not exist"),
        // Arguments.
        run(&["frobnicate"], None, None, 2, "unrecognized subcommand 'frobnicate'"),
        run(&["worker", "--concurrency", "lots"], None, None, 2, "invalid value 'lots' for '--concurrency"),
        run(&["report", "costs", "--month", "2026-13"], None, None, 2, "--month \"2026-13\" is not YYYY-MM"),
        run(&["summarize", "examples/articles", "--max-tokens", "0"], None, None, 2, "invalid value '0' for '--max-tokens"),
        run(&["batch", "submit", "examples/requests.jsonl", "--route", "nope"], None, None, 2, "--route \"nope\" is not a configured route"),
        run(&["summarize", "examples/articles", "--chunk-tokens", "0"], None, None, 2, "invalid value '0' for '--chunk-tokens"),
        run(&["audit", "verify", "--tenant", "a.b"], None, None, 2, "--tenant \"a.b\" is not a tenant name"),
        // Batch files for `publish`: nothing is published from a file with a bad line.
        run(&["publish", "-"], None, Some(b"{\"messages\":[{\"role\":\"user\",\"content\":\"ok\"}]}\nnot json\n"), 2, "line 2: not JSON"),
        run(&["publish", "-"], None, Some(b"{\"schema\":\"switchyard.job.v1\",\"id\":\"0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b\",\"tenant\":\"a.b\",\"route\":\"default\",\"request\":{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}}\n"), 2, "line 1:"),
        run(&["publish", "-"], None, Some(b"{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"max_tokens\":-1}\n"), 2, "line 1:"),
        run(&["publish", "-"], None, Some(b"{\"messages\":\"hi\"}\n"), 2, "line 1:"),
        run(&["publish", "-"], None, Some(b"{\"content\":\"neither a job nor a request\"}\n"), 2, "line 1:"),
        run(&["publish", "-"], None, Some(b"{\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}\n"), 2, "line 1:"),
        run(&["publish", "/nonexistent/jobs.jsonl"], None, None, 2, "/nonexistent/jobs.jsonl"),
    ];
    let mut failures = Vec::new();
    for case in &cases {
        let config = case.config.map(|text| {
            let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
            std::fs::write(file.path(), text).unwrap();
            file
        });
        let mut command = switchyard(&app);
        if let Some(file) = &config {
            command.env("SWITCHYARD_CONFIG", file.path());
        }
        let mut child = command
            .args(case.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        if let Some(bytes) = case.stdin {
            stdin.write_all(bytes).unwrap();
        }
        drop(stdin);
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        if output.status.code() != Some(case.code) || !stderr.contains(case.says) {
            failures.push(format!(
                "{:?}: expected exit {} saying {:?}; got {:?}: {stderr}",
                case.args,
                case.code,
                case.says,
                output.status.code()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Nothing was published, and a good file afterwards is published and served.
    let channel = app.ctx.broker.create_channel().await.unwrap();
    assert_eq!(
        topology::jobs_queue_depth(&channel, &app.names)
            .await
            .unwrap()
            .0,
        0
    );
    let output = switchyard(&app)
        .args(["publish", "examples/requests.jsonl", "--tenant", "acme"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let published = String::from_utf8_lossy(&output.stdout).lines().count() as i64;
    app.run_worker_until_idle().await;
    let succeeded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM results WHERE status = 'succeeded'")
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert!(published > 0);
    assert_eq!(succeeded, published);
    app.cleanup().await;
}

/// A publish the broker refuses for good (the exchange does not exist: a wrong prefix, or
/// `migrate` never run) fails at once, naming what is missing, instead of being retried for
/// ten minutes.
#[tokio::test]
async fn publishing_to_an_exchange_that_does_not_exist_fails_at_once() {
    let config = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    let prefix = format!("sytest-never-{}", uuid::Uuid::now_v7().simple());
    std::fs::write(
        config.path(),
        format!(
            "[broker]\nurl = \"{}\"\nprefix = \"{prefix}\"\n",
            crate::helpers::broker_url()
        ),
    )
    .unwrap();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
    command
        .env("SWITCHYARD_CONFIG", config.path())
        .env_remove("RUST_LOG")
        .args(["publish", "examples/requests.jsonl"])
        .kill_on_drop(true);
    let output = tokio::time::timeout(std::time::Duration::from_secs(60), command.output())
        .await
        .expect("the publish gives up at once")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("NOT_FOUND") && stderr.contains(&format!("{prefix}.jobs")),
        "{stderr}"
    );
    assert!(output.stdout.is_empty(), "nothing was published");
}
