//! `switchyard dead-letters`: list without consuming, requeue a job, refuse to purge without
//! `--yes`, purge with it.

use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, options::BasicPublishOptions};
use switchyard::stages::finalize::ERROR_HEADER;

use crate::helpers::{TestApp, job, spawn_app, switchyard};

fn run(app: &TestApp, args: &[&str]) -> (Option<i32>, Vec<serde_json::Value>, String) {
    let output = switchyard(app)
        .arg("dead-letters")
        .args(args)
        .output()
        .unwrap();
    let lines = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (
        output.status.code(),
        lines,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The dead-letter queue's depth once it has settled at `expected` (a quorum queue applies
/// returned messages asynchronously), or whatever it is after 5 s.
async fn depth_settles_at(app: &TestApp, expected: u32) -> u32 {
    let mut seen = depth(app).await;
    for _ in 0..50 {
        if seen == expected {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        seen = depth(app).await;
    }
    seen
}

/// Runs a read-only `dead-letters` command until it sees `expected` messages (returned
/// messages reach a quorum queue asynchronously), or gives its last answer after 5 s.
async fn listed(
    app: &TestApp,
    args: &[&str],
    expected: usize,
) -> (Option<i32>, Vec<serde_json::Value>) {
    let mut answer = run(app, args);
    for _ in 0..50 {
        if answer.1.len() == expected {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        answer = run(app, args);
    }
    (answer.0, answer.1)
}

async fn depth(app: &TestApp) -> u32 {
    let channel = app.ctx.broker.create_channel().await.unwrap();
    channel
        .queue_declare(
            app.names.dead_queue().as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count()
}

#[tokio::test]
async fn dead_letters_can_be_listed_requeued_and_purged() {
    let app = spawn_app().await;
    // A broken message the worker dead-letters, and a valid job dead-lettered by hand, as the
    // broker dead-letters a replayed poison job past its delivery limit: its message id is the
    // replay's `<job id>/g<generation>`, and it has no job-id header.
    app.publish_raw(b"definitely not json", None).await;
    app.run_worker_until_idle().await;
    let mut poisoned = job(
        "acme",
        None,
        "default",
        "Came back from the dead. It is served now.",
    );
    poisoned.generation = 1;
    let mut headers = FieldTable::default();
    headers.insert(
        ERROR_HEADER.into(),
        AMQPValue::LongString("crashed the worker".into()),
    );
    app.publisher
        .channel()
        .basic_publish(
            app.names.dead_exchange().as_str().into(),
            "jobs".into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&poisoned).unwrap(),
            BasicProperties::default()
                .with_message_id(format!("{}/g1", poisoned.id).as_str().into())
                .with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(depth_settles_at(&app, 2).await, 2);

    let (code, all) = listed(&app, &["list"], 2).await;
    assert_eq!(code, Some(0));
    assert_eq!(all.len(), 2);
    let (_, broken) = listed(&app, &["list", "--error", "invalid_json"], 1).await;
    assert_eq!(broken.len(), 1);
    assert!(
        broken[0]["excerpt"]
            .as_str()
            .unwrap()
            .contains("definitely not json")
    );
    assert_eq!(
        depth_settles_at(&app, 2).await,
        2,
        "listing consumes nothing"
    );

    let (code, _, stderr) = run(&app, &["purge", "--error", "invalid_json"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("without --yes"), "{stderr}");
    assert_eq!(depth_settles_at(&app, 2).await, 2);

    let id = poisoned.id.to_string();
    let (code, requeued, _) = run(&app, &["requeue", "--job", &id]);
    assert_eq!(code, Some(0));
    assert_eq!(requeued.len(), 1);
    assert_eq!(requeued[0]["job_id"], id.as_str());
    assert_eq!(depth_settles_at(&app, 1).await, 1);
    app.run_worker_until_idle().await;
    let status: String = sqlx::query_scalar("SELECT status FROM results WHERE job_id = $1")
        .bind(poisoned.id)
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(status, "succeeded");

    let (code, purged, _) = run(&app, &["purge", "--error", "invalid_json", "--yes"]);
    assert_eq!((code, purged.len()), (Some(0), 1));
    assert_eq!(depth_settles_at(&app, 0).await, 0);
    app.cleanup().await;
}

/// `requeue` leaves a copy that would only be answered again, and says why: a rejected message
/// has its own stored result (replay runs it again), while a job refused as `job_id_taken`
/// would be refused again (it needs a new id).
#[tokio::test]
async fn requeue_skips_copies_that_would_be_answered_again_and_says_why() {
    let app = spawn_app().await;
    let unread = uuid::Uuid::now_v7();
    app.publish_raw(b"not json either", Some(&unread.to_string()))
        .await;
    let first = job("acme", None, "default", "Acme's job. Served.");
    let mut second = job("globex", None, "default", "Globex reuses Acme's id.");
    second.id = first.id;
    // At a later generation: another tenant's result answers a copy of any generation.
    second.generation = 3;
    app.publish_job(&first).await;
    app.run_worker_until_idle().await;
    app.publish_job(&second).await;
    app.run_worker_until_idle().await;
    assert_eq!(listed(&app, &["list"], 2).await.1.len(), 2);

    let (code, lines, _) = run(&app, &["requeue", "--job", &unread.to_string()]);
    assert_eq!(code, Some(0));
    assert_eq!(lines[0]["action"], "skipped");
    let reason = lines[0]["reason"].as_str().unwrap();
    assert!(reason.contains("switchyard replay --id"), "{reason}");

    let (code, lines, _) = run(&app, &["requeue", "--job", &first.id.to_string()]);
    assert_eq!(code, Some(0));
    assert_eq!(lines[0]["action"], "skipped");
    let reason = lines[0]["reason"].as_str().unwrap();
    assert!(reason.contains("another job"), "{reason}");
    assert!(reason.contains("new id"), "{reason}");
    assert_eq!(depth_settles_at(&app, 2).await, 2, "both copies stay");
    app.cleanup().await;
}
