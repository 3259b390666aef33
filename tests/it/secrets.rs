//! An API key never leaks: a worker process at debug log level runs jobs with a recognisable
//! key through a provider that echoes the `Authorization` header in its error bodies, and the
//! key appears in no log line, no Postgres row of any table and no published message.

use std::process::Stdio;
use std::time::Duration;

use futures::StreamExt;
use lapin::Consumer;
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{FakeProvider, collect, job, spawn_app_with, switchyard};

/// Every row of every table of the test database, as text.
pub async fn dump_database(pool: &PgPool) -> String {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT quote_ident(table_name) FROM information_schema.tables
         WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY table_name",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(tables.len() > 5, "found the tables: {tables:?}");
    let mut dump = String::new();
    for table in tables {
        // Table names come from the catalog, quoted by Postgres itself.
        let statement = format!("SELECT coalesce(string_agg(t::text, E'\\n'), '') FROM {table} t");
        let rows: String = sqlx::query_scalar(sqlx::AssertSqlSafe(statement))
            .fetch_one(pool)
            .await
            .unwrap();
        dump.push_str(&format!("== {table}\n{rows}\n"));
    }
    dump
}

/// Whatever else arrives within `quiet` of the last message.
async fn drain(consumer: &mut Consumer, quiet: Duration) -> Vec<lapin::message::Delivery> {
    let mut out = Vec::new();
    while let Ok(Some(Ok(delivery))) = tokio::time::timeout(quiet, consumer.next()).await {
        out.push(delivery);
    }
    out
}

fn message_text(delivery: &lapin::message::Delivery) -> String {
    format!(
        "{} {:?} {}",
        delivery.routing_key,
        delivery.properties,
        String::from_utf8_lossy(&delivery.data)
    )
}

#[tokio::test]
async fn an_api_key_appears_in_no_log_row_or_message_even_when_a_provider_echoes_it() {
    let canary = format!("sk-SWITCHYARD-LEAK-CANARY-{}", Uuid::now_v7().simple());
    let variable = format!("SWITCHYARD_TEST_CANARY_{}", Uuid::now_v7().simple());
    let echoing = FakeProvider::start(&["--rate-500", "1", "--echo-auth-in-errors"]);
    let healthy = FakeProvider::start(&[]);
    let app = spawn_app_with(&format!(
        r#"
[routing]
breaker_consecutive_failures = 100

[[providers]]
name = "echoing"
kind = "openai"
base_url = "{echoing}/v1"
max_retries = 0
keys = [{{ id = "canary-key", env = "{variable}" }}]
models = [{{ name = "fake-model", prices = {{ input = "1", output = "1" }} }}]

[[providers]]
name = "healthy"
kind = "openai"
base_url = "{healthy}/v1"
keys = [{{ id = "canary-key", env = "{variable}" }}]
models = [{{ name = "fake-model", prices = {{ input = "1", output = "1" }} }}]

[[routes]]
alias = "failover"
targets = [{{ provider = "echoing", model = "fake-model" }}, {{ provider = "healthy", model = "fake-model" }}]

[[routes]]
alias = "doomed"
targets = [{{ provider = "echoing", model = "fake-model" }}]
"#,
        echoing = echoing.url,
        healthy = healthy.url,
    ))
    .await;
    let mut results = app.subscribe(false, "#").await;
    let mut events = app.subscribe(true, "#").await;
    let mut jobs = Vec::new();
    for i in 0..3 {
        jobs.push(job(
            "acme",
            Some("s"),
            "failover",
            &format!("Fail over, please ({i})."),
        ));
    }
    for i in 0..2 {
        jobs.push(job(
            "acme",
            Some("s"),
            "doomed",
            &format!("This one fails ({i})."),
        ));
    }
    app.publish_jobs(&jobs).await;

    let output = switchyard(&app)
        .args(["worker", "--exit-when-idle", "--concurrency", "4"])
        .env(&variable, &canary)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{logs}");
    assert!(logs.contains("DEBUG"), "the worker logged at debug level");

    // The provider did echo the key, and the worker redacted it where it kept the error.
    let echoed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM attempts WHERE provider = 'echoing' AND error LIKE '%Bearer [REDACTED]%'",
    )
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(
        echoed, 5,
        "every attempt on the echoing provider kept a redacted error"
    );
    let statuses: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM results GROUP BY status ORDER BY status")
            .fetch_all(app.pool())
            .await
            .unwrap();
    assert_eq!(
        statuses,
        vec![("failed".to_owned(), 2), ("succeeded".to_owned(), 3)]
    );

    let mut published: Vec<String> = collect(&mut results, 5, Duration::from_secs(10))
        .await
        .iter()
        .map(message_text)
        .collect();
    published.extend(
        drain(&mut results, Duration::from_millis(500))
            .await
            .iter()
            .map(message_text),
    );
    let events = drain(&mut events, Duration::from_secs(2)).await;
    assert!(!events.is_empty(), "cost and audit events were published");
    published.extend(events.iter().map(message_text));
    assert!(
        published.iter().any(|m| m.contains("[REDACTED]")),
        "the redacted provider error was published"
    );

    let dump = dump_database(app.pool()).await;
    assert!(dump.contains("[REDACTED]"), "the dump covers the attempts");
    assert!(!logs.contains(&canary), "the key is in the worker's logs");
    assert!(!dump.contains(&canary), "the key is in Postgres");
    for message in &published {
        assert!(
            !message.contains(&canary),
            "the key is in a published message: {message}"
        );
    }
    // Not even a prefix long enough to matter survives an excerpt cut.
    let prefix = &canary[..canary.len() - 8];
    assert!(!logs.contains(prefix) && !dump.contains(prefix));
    app.cleanup().await;
}
