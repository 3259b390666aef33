//! Poison messages: a job that crashes its worker every time, or panics its task, is
//! dead-lettered by the quorum queue's `x-delivery-limit` instead of looping forever, and the
//! other jobs are not lost. Crashes come from the test-only failpoint `job_metadata`.

use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use crate::chaos::{Worker, batch, results_count, wait_for_results};
use crate::helpers::{FakeProvider, TestApp, fake_provider_config, spawn_app_with};

const FAILPOINT: (&str, &str) = ("SWITCHYARD_FAILPOINT", "job_metadata");

fn poison(route: &str, how: &str) -> switchyard::messages::Job {
    let mut job = batch(1, route).remove(0);
    job.metadata = Some(json!({ "switchyard_failpoint": how }));
    job
}

/// The broker's reason for dead-lettering a message (`x-death[0].reason`).
fn death_reason(properties: &lapin::BasicProperties) -> Option<String> {
    use lapin::types::AMQPValue;
    let headers = properties.headers().as_ref()?;
    let AMQPValue::FieldArray(deaths) = headers.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(death) = deaths.as_slice().first()? else {
        return None;
    };
    match death.inner().get("reason")? {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        _ => None,
    }
}

/// Job ids and broker reasons of the dead-lettered messages (drained).
async fn dead_letters(app: &TestApp) -> Vec<(String, Option<String>)> {
    app.drain_dead_letters()
        .await
        .iter()
        .map(|m| {
            let id = m
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_owned())
                .unwrap_or_default();
            (id, death_reason(&m.properties))
        })
        .collect()
}

async fn dead_letters_waiting(app: &TestApp) -> u32 {
    let channel = app.ctx.broker.create_channel().await.unwrap();
    let queue = channel
        .queue_declare(
            app.names.dead_queue().as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = channel.close(200, "checked".into()).await;
    queue.message_count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_crashes_its_worker_every_time_is_dead_lettered_after_the_delivery_limit() {
    let fake = FakeProvider::start(&["--latency-ms", "2"]);
    let app = spawn_app_with(&fake_provider_config(&fake.url)).await;
    let mut jobs = batch(20, "fake");
    let bad = poison("fake", "exit");
    jobs.insert(10, bad.clone());
    app.publish_jobs(&jobs).await;

    // A supervisor, as systemd or Kubernetes would be: two workers, each restarted when it
    // dies. Concurrency 1 so that a crash returns only the poison job to the queue.
    let mut workers: Vec<Worker> = (0..2)
        .map(|i| Worker::start(&app, 1, &[FAILPOINT], &format!("p{i}")))
        .collect();
    let mut crashes = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while results_count(&app).await < 20 || dead_letters_waiting(&app).await < 1 {
        assert!(
            Instant::now() < deadline,
            "the poison job was not dead-lettered ({crashes} crashes)"
        );
        for (i, worker) in workers.iter_mut().enumerate() {
            if !worker.alive() {
                crashes += 1;
                *worker = Worker::start(&app, 1, &[FAILPOINT], &format!("p{i}-{crashes}"));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for worker in workers {
        worker.sigterm().await;
    }
    // The poison job took down a worker on each of its deliveries until the broker stopped
    // delivering it (the last crash may land after the loop saw the dead letter).
    let limit = app.ctx.settings.broker.delivery_limit as usize;
    assert!(
        (limit..=limit + 1).contains(&crashes),
        "{crashes} crashes for a delivery limit of {limit}"
    );
    assert_eq!(
        dead_letters(&app).await,
        vec![(bad.id.to_string(), Some("delivery_limit".to_owned()))],
        "the poison job, and only it, was dead-lettered for its delivery limit"
    );
    let (distinct, rows) = app.result_rows().await;
    assert_eq!((distinct, rows), (20, 20), "every other job has one result");
    let poisoned: i64 = sqlx::query_scalar("SELECT count(*) FROM results WHERE job_id = $1")
        .bind(bad.id)
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(poisoned, 0, "the poison job never committed");
    eprintln!("poison (exit): dead-lettered after {crashes} worker crashes");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_task_panics_is_dead_lettered_and_the_worker_and_other_jobs_carry_on() {
    let fake = FakeProvider::start(&["--latency-ms", "2"]);
    let app = spawn_app_with(&fake_provider_config(&fake.url)).await;
    let mut jobs = batch(100, "fake");
    let bad = poison("fake", "panic");
    jobs.insert(50, bad.clone());
    app.publish_jobs(&jobs).await;

    let mut worker = Worker::start(&app, 8, &[FAILPOINT], "panics");
    wait_for_results(&app, 100, Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while dead_letters_waiting(&app).await < 1 {
        assert!(
            Instant::now() < deadline,
            "the panicking job was not dead-lettered"
        );
        assert!(worker.alive(), "a panicking job does not kill the worker");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(worker.alive(), "the worker survived every panic");
    let status = worker.sigterm().await;
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        dead_letters(&app).await,
        vec![(bad.id.to_string(), Some("delivery_limit".to_owned()))],
        "the panicking job, and only it, was dead-lettered for its delivery limit"
    );
    let (distinct, rows) = app.result_rows().await;
    assert_eq!(
        (distinct, rows),
        (100, 100),
        "every other job has one result"
    );
    app.cleanup().await;
}
