//! The transactional outbox: a worker that dies between its commit and its publish loses no
//! message. Another worker's relay publishes the committed group's result, cost and audit
//! messages, each exactly once per `message_id`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::chaos::{Capture, Worker, batch, deduped_events, wait_for_empty_outbox};
use crate::helpers::{FakeProvider, fake_provider_config, spawn_app_full};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_dying_between_commit_and_publish_has_its_messages_relayed_exactly_once() {
    let fake = FakeProvider::start(&["--latency-ms", "5"]);
    // The relay takes rows older than this. A live worker deletes its rows once confirmed;
    // on a loaded 2-core machine that took over a second once (the relay then sent those rows
    // again: at least once, as designed, but this test counts exactly once), so 3 s.
    let app = spawn_app_full(
        "outbox_relay_after_ms = 3000",
        &fake_provider_config(&fake.url),
    )
    .await;
    let capture = Capture::declare(&app).await;
    let jobs = batch(300, "fake");
    app.publish_jobs(&jobs).await;

    // This worker exits (code 137) right after its first group commits, before publishing.
    let doomed = Worker::start(
        &app,
        16,
        &[("SWITCHYARD_FAILPOINT", "after_commit")],
        "doomed",
    );
    let status = tokio::time::timeout(Duration::from_secs(60), doomed.wait())
        .await
        .expect("the doomed worker reaches its first commit");
    assert_eq!(status.code(), Some(137), "the failpoint crashed the worker");
    let committed: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT job_id FROM results")
        .fetch_all(app.pool())
        .await
        .unwrap();
    let (rows, stranded): (i64, i64) = sqlx::query_as(
        "SELECT count(*), COALESCE(sum(cardinality(message_ids)), 0)::int8 FROM outbox",
    )
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert!(!committed.is_empty(), "the group committed");
    assert!(
        stranded as usize > committed.len(),
        "its result and event messages wait in the outbox ({stranded} messages)"
    );
    assert!(
        rows >= 1 && rows < stranded,
        "a group's messages share one row ({rows} rows, {stranded} messages)"
    );
    // Each result points at its `results` row instead of copying the body.
    let pointing: Vec<uuid::Uuid> = sqlx::query_scalar(
        "SELECT m.job FROM outbox, unnest(bodies, result_job_ids) AS m(body, job)
         WHERE m.body IS NULL ORDER BY 1",
    )
    .fetch_all(app.pool())
    .await
    .unwrap();
    let mut expected = committed.clone();
    expected.sort();
    assert_eq!(pointing, expected);

    // Another worker finishes the batch; its relay publishes what the dead one left.
    let survivor = Worker::start(&app, 16, &[], "survivor");
    crate::chaos::wait_for_results(&app, jobs.len(), Duration::from_secs(90)).await;
    wait_for_empty_outbox(&app, Duration::from_secs(30)).await;
    let status = survivor.sigterm().await;
    assert_eq!(status.code(), Some(0));

    let results = capture.results(&app).await;
    crate::chaos::assert_nothing_lost_nothing_doubled(&app, &jobs, &results).await;

    // Every event message was published once: no `message_id` arrives twice.
    let events = capture.events(&app).await;
    let mut raw: BTreeMap<&str, usize> = BTreeMap::new();
    for message in &events {
        *raw.entry(message.message_id.as_str()).or_default() += 1;
    }
    assert!(
        raw.values().all(|n| *n == 1),
        "an event message was published twice"
    );
    // After deduping, each job has exactly one `job_succeeded` audit event and one cost event;
    // for the dead worker's jobs only the relay could have sent them.
    let (items, _) = deduped_events(&events);
    let mut succeeded: BTreeMap<String, usize> = BTreeMap::new();
    let mut costs: BTreeMap<String, usize> = BTreeMap::new();
    for item in &items {
        let Some(job_id) = item["job_id"].as_str() else {
            continue;
        };
        if item["kind"] == "job_succeeded" {
            *succeeded.entry(job_id.to_owned()).or_default() += 1;
        }
        if item["schema"] == "switchyard.cost_event.v1" {
            *costs.entry(job_id.to_owned()).or_default() += 1;
        }
    }
    let expected: BTreeSet<String> = jobs.iter().map(|j| j.id.to_string()).collect();
    assert_eq!(succeeded.keys().cloned().collect::<BTreeSet<_>>(), expected);
    assert!(
        succeeded.values().all(|n| *n == 1),
        "one job_succeeded per job"
    );
    assert_eq!(costs.keys().cloned().collect::<BTreeSet<_>>(), expected);
    for job_id in &committed {
        assert_eq!(succeeded.get(&job_id.to_string()), Some(&1));
    }
    capture.delete(&app).await;
    app.cleanup().await;
}

/// A result message whose row stores its body.
fn result_message(app: &crate::helpers::TestApp) -> switchyard::store::outbox::OutboxMessage {
    switchyard::queue::publisher::Outgoing {
        exchange: app.names.results_exchange(),
        routing_key: "acme._.succeeded".to_owned(),
        body: b"{}".to_vec(),
        message_id: uuid::Uuid::now_v7().to_string(),
        kind: "switchyard.result.v1".to_owned(),
        headers: None,
    }
    .into()
}

/// An outbox row holding `messages` result messages, created at `created_at`.
fn group_row(
    app: &crate::helpers::TestApp,
    created_at: chrono::DateTime<chrono::Utc>,
    messages: usize,
) -> switchyard::store::outbox::OutboxRow {
    switchyard::store::outbox::OutboxRow {
        id: uuid::Uuid::now_v7(),
        created_at,
        session: None,
        messages: (0..messages).map(|_| result_message(app)).collect(),
    }
}

/// Writes an outbox row (and deletes `published`) with the statement finalize uses, locking no
/// chain head.
async fn write_outbox(
    conn: &mut sqlx::PgConnection,
    row: &switchyard::store::outbox::OutboxRow,
    published: &[uuid::Uuid],
) {
    switchyard::store::group::write_outbox_then_lock_heads(conn, row, published, &[])
        .await
        .unwrap();
}

#[tokio::test]
async fn relays_claim_only_stale_rows_and_never_the_same_row_twice() {
    use chrono::Utc;
    use switchyard::store::outbox::{self, OutboxRow};

    let app = crate::helpers::spawn_app().await;
    let row = |age_secs: i64| group_row(&app, Utc::now() - chrono::Duration::seconds(age_secs), 2);
    let stale: Vec<OutboxRow> = (0..10).map(|_| row(60)).collect();
    let fresh = row(0);
    let published = row(60);
    let mut conn = app.pool().acquire().await.unwrap();
    for stale in &stale {
        write_outbox(&mut conn, stale, &[]).await;
    }
    write_outbox(&mut conn, &published, &[]).await;
    // A group's insert also deletes the rows confirmed since the last one.
    write_outbox(&mut conn, &fresh, &[published.id]).await;
    drop(conn);

    let cutoff = Utc::now() - chrono::Duration::seconds(5);
    let mut first = app.pool().begin().await.unwrap();
    let mut second = app.pool().begin().await.unwrap();
    let a = outbox::claim_stale(&mut first, cutoff, 6, &[])
        .await
        .unwrap();
    let b = outbox::claim_stale(&mut second, cutoff, 6, &[])
        .await
        .unwrap();
    assert_eq!(
        (a.ids.len(), b.ids.len()),
        (6, 4),
        "the second relay skips the first's rows"
    );
    let claimed: BTreeSet<uuid::Uuid> = a.ids.iter().chain(&b.ids).copied().collect();
    let expected: BTreeSet<uuid::Uuid> = stale.iter().map(|r| r.id).collect();
    assert_eq!(
        claimed, expected,
        "every stale row once, the fresh and the published ones not at all"
    );
    // Each row's messages, in the order they were written.
    let ids = |messages: &[switchyard::queue::publisher::Outgoing]| -> Vec<String> {
        messages.iter().map(|m| m.message_id.clone()).collect()
    };
    let written = |rows: &[uuid::Uuid]| -> Vec<String> {
        rows.iter()
            .flat_map(|id| &stale.iter().find(|r| r.id == *id).unwrap().messages)
            .map(|m| m.message.message_id.clone())
            .collect()
    };
    assert_eq!(ids(&a.messages), written(&a.ids));
    assert_eq!(ids(&b.messages), written(&b.ids));
    assert_eq!(a.messages.len() + b.messages.len(), 20);
    first.rollback().await.unwrap();
    second.rollback().await.unwrap();
    app.cleanup().await;
}

/// The relay leaves the rows of a session that holds its lease to that session, however old
/// they are (a slow lane's messages are not published twice); the rows of a session whose
/// lease ended or expired, or that never took one, are the relay's. A worker's own relay also
/// leaves the rows of its running sessions whose lease expired (the whole process was paused),
/// which another worker's relay takes.
#[tokio::test]
async fn the_relay_leaves_a_live_sessions_rows_to_it() {
    use chrono::Utc;
    use std::time::Duration;
    use switchyard::stages::relay::{Lease, Running};
    use switchyard::store::outbox;

    let app = crate::helpers::spawn_app().await;
    let tasks = tokio_util::task::TaskTracker::new();
    let running = Running::default();
    let live = Lease::start(app.pool(), &tasks, Duration::from_secs(60), &running).await;
    // Running, but its lease lapses at once, as it would while the process is paused.
    let paused = Lease::start(app.pool(), &tasks, Duration::ZERO, &running).await;
    let expired = uuid::Uuid::now_v7();
    let mut conn = app.pool().acquire().await.unwrap();
    outbox::hold_session(&mut conn, expired, Duration::ZERO)
        .await
        .unwrap();
    let old = Utc::now() - chrono::Duration::seconds(60);
    let row = |session| switchyard::store::outbox::OutboxRow {
        session,
        ..group_row(&app, old, 1)
    };
    let (of_live, of_paused, of_expired, of_unknown) = (
        row(Some(live.id())),
        row(Some(paused.id())),
        row(Some(expired)),
        row(Some(uuid::Uuid::now_v7())),
    );
    for row in [&of_live, &of_paused, &of_expired, &of_unknown] {
        write_outbox(&mut conn, row, &[]).await;
    }
    drop(conn);
    let pool = app.pool();
    let claimed = |running: Vec<uuid::Uuid>| async move {
        let mut tx = pool.begin().await.unwrap();
        let claim = outbox::claim_stale(&mut tx, Utc::now(), 10, &running)
            .await
            .unwrap();
        tx.rollback().await.unwrap();
        claim.ids.into_iter().collect::<BTreeSet<_>>()
    };
    assert_eq!(
        BTreeSet::from_iter(running.ids()),
        BTreeSet::from([live.id(), paused.id()])
    );
    assert_eq!(
        claimed(running.ids()).await,
        BTreeSet::from([of_expired.id, of_unknown.id]),
        "the worker's own relay leaves both of its running sessions' rows alone"
    );
    assert_eq!(
        claimed(Vec::new()).await,
        BTreeSet::from([of_paused.id, of_expired.id, of_unknown.id]),
        "another worker's relay leaves only the live lease's row alone"
    );

    live.end().await;
    paused.end().await;
    assert!(running.ids().is_empty(), "ended sessions are not running");
    assert_eq!(
        claimed(running.ids()).await,
        BTreeSet::from([of_live.id, of_paused.id, of_expired.id, of_unknown.id]),
        "an ended session's row is the relay's"
    );
    let leases: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_sessions")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(
        leases, 0,
        "ending a lease deletes it, and the expired one with it"
    );
    app.cleanup().await;
}

/// A result message stores no copy of its body: it points at the `results` row written in the
/// same transaction, and the relay publishes that row's body, byte for byte. A message pointing
/// at a result that does not exist has nothing to publish and is left out; the rest of its row
/// is published and the row deleted.
#[tokio::test]
async fn a_result_message_points_at_its_result_and_the_relay_publishes_the_stored_body() {
    use chrono::Utc;
    use switchyard::store::outbox;

    let app = crate::helpers::spawn_app().await;
    let result = crate::helpers::stored_result(uuid::Uuid::now_v7(), 2);
    let mut conn = app.pool().acquire().await.unwrap();
    crate::helpers::store_results(&mut conn, std::iter::once(&result)).await;
    let mut row = group_row(&app, Utc::now() - chrono::Duration::seconds(60), 3);
    row.messages[0].stored_as = Some((result.job_id, 2));
    row.messages[1].stored_as = Some((uuid::Uuid::now_v7(), 1));
    row.messages[2].message.body = b"{\"kept\":true}".to_vec();
    write_outbox(&mut conn, &row, &[]).await;

    let (copied, points_at, kept): (Option<i32>, Option<uuid::Uuid>, Option<Vec<u8>>) =
        sqlx::query_as(
            "SELECT octet_length(bodies[1]), result_job_ids[1], bodies[3] FROM outbox WHERE id = $1",
        )
        .bind(row.id)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(
        (copied, points_at, kept.as_deref()),
        (None, Some(result.job_id), Some(&b"{\"kept\":true}"[..]))
    );
    let stored: String =
        sqlx::query_scalar("SELECT body::text FROM results WHERE job_id = $1 AND generation = 2")
            .bind(result.job_id)
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    drop(conn);

    let mut tx = app.pool().begin().await.unwrap();
    let claim = outbox::claim_stale(&mut tx, Utc::now(), 10, &[])
        .await
        .unwrap();
    assert_eq!(claim.ids, [row.id]);
    let published: Vec<(&str, &[u8])> = claim
        .messages
        .iter()
        .map(|m| (m.message_id.as_str(), m.body.as_slice()))
        .collect();
    assert_eq!(
        published,
        [
            (
                row.messages[0].message.message_id.as_str(),
                stored.as_bytes()
            ),
            (
                row.messages[2].message.message_id.as_str(),
                &b"{\"kept\":true}"[..]
            ),
        ],
        "the stored result's body, the dangling message left out, the last one as written"
    );
    tx.rollback().await.unwrap();
    app.cleanup().await;
}

/// One relay drain of the rows older than `after` on a publisher of its own; the messages it
/// published.
async fn drain(app: &crate::helpers::TestApp, after: Duration) -> usize {
    let mut publisher = None;
    let published = switchyard::stages::relay::drain(
        app.pool(),
        &app.ctx.broker,
        &mut publisher,
        after,
        &switchyard::stages::relay::Running::default(),
        &tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap();
    if let Some(publisher) = publisher {
        publisher.close(Duration::from_secs(5)).await;
    }
    published
}

/// A claim whose rows hold only messages that cannot be published (their result rows are
/// gone) deletes them and the drain goes on: the row behind them is relayed in the same pass,
/// not a tick later.
#[tokio::test]
async fn a_claim_of_unpublishable_rows_does_not_end_the_relays_drain() {
    use chrono::Utc;

    let app = crate::helpers::spawn_app().await;
    let capture = Capture::declare(&app).await;
    let old = Utc::now() - chrono::Duration::seconds(60);
    let mut conn = app.pool().acquire().await.unwrap();
    // More rows than one claim takes (8), each pointing at a result that does not exist.
    for _ in 0..9 {
        let mut dangling = group_row(&app, old, 1);
        dangling.messages[0].stored_as = Some((uuid::Uuid::now_v7(), 0));
        write_outbox(&mut conn, &dangling, &[]).await;
    }
    let kept = group_row(&app, old + chrono::Duration::seconds(1), 1);
    write_outbox(&mut conn, &kept, &[]).await;
    drop(conn);

    let published = drain(&app, Duration::ZERO).await;
    assert_eq!(published, 1, "the one message that can be published");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(left, 0, "every row claimed and deleted in one drain");
    let results: Vec<String> = capture
        .results(&app)
        .await
        .into_iter()
        .map(|m| m.message_id)
        .collect();
    assert_eq!(results, [kept.messages[0].message.message_id.clone()]);
    capture.delete(&app).await;
    app.cleanup().await;
}

/// A row whose messages the broker refuses (here a queue that rejects every publish, bound to
/// its routing key) does not hold up the rows claimed with it: they are published and deleted,
/// and the refused row goes to the back of the line, kept, to be tried again.
#[tokio::test]
async fn a_row_the_broker_refuses_does_not_hold_up_the_rows_behind_it() {
    use chrono::Utc;
    use lapin::options::{QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
    use lapin::types::{AMQPValue, FieldTable};

    let app = crate::helpers::spawn_app().await;
    let capture = Capture::declare(&app).await;
    let refuser = format!("{}.refuser", app.names.prefix());
    let channel = app.ctx.broker.create_channel().await.unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongInt(0));
    arguments.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    channel
        .queue_declare(
            refuser.as_str().into(),
            QueueDeclareOptions::default(),
            arguments,
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            refuser.as_str().into(),
            app.names.results_exchange().as_str().into(),
            "refused.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let old = Utc::now() - chrono::Duration::seconds(60);
    let mut refused = group_row(&app, old, 2);
    refused.messages[1].message.routing_key = "refused.x".to_owned();
    let behind: Vec<_> = (1..=3)
        .map(|n| group_row(&app, old + chrono::Duration::seconds(n), 2))
        .collect();
    let mut conn = app.pool().acquire().await.unwrap();
    write_outbox(&mut conn, &refused, &[]).await;
    for row in &behind {
        write_outbox(&mut conn, row, &[]).await;
    }
    drop(conn);

    let published = drain(&app, Duration::from_secs(30)).await;
    assert_eq!(
        published, 7,
        "the three rows behind the refused one, and the refused row's other message"
    );
    let left = || async {
        let rows: Vec<(uuid::Uuid, Vec<String>, chrono::DateTime<Utc>)> =
            sqlx::query_as("SELECT id, message_ids, created_at FROM outbox")
                .fetch_all(app.pool())
                .await
                .unwrap();
        rows
    };
    let kept = left().await;
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(kept[0].0, refused.id, "the refused row is kept");
    assert_eq!(
        kept[0].1,
        [refused.messages[1].message.message_id.clone()],
        "with only the message the broker refused"
    );
    assert!(
        kept[0].2 > old + chrono::Duration::seconds(30),
        "and put at the back"
    );

    // Its turn again: the broker still refuses it, and nothing else goes out twice.
    sqlx::query("UPDATE outbox SET created_at = $1")
        .bind(old)
        .execute(app.pool())
        .await
        .unwrap();
    assert_eq!(drain(&app, Duration::from_secs(30)).await, 0);
    assert_eq!(left().await.len(), 1);
    // The refused message reaches the capture queue on each try (the broker nacks it for the
    // queue that refuses it, and delivers it to the others), so it is left out here.
    let refused_id = refused.messages[1].message.message_id.clone();
    let mut results: Vec<String> = capture
        .results(&app)
        .await
        .into_iter()
        .map(|m| m.message_id)
        .filter(|id| *id != refused_id)
        .collect();
    results.sort();
    let mut expected: Vec<String> = behind
        .iter()
        .flat_map(|r| &r.messages)
        .chain(&refused.messages[..1])
        .map(|m| m.message.message_id.clone())
        .collect();
    expected.sort();
    assert_eq!(results, expected, "each accepted message once");
    channel
        .queue_delete(refuser.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    capture.delete(&app).await;
    app.cleanup().await;
}

/// A finalize group writes its outbox row (deleting rows the broker confirmed for an earlier
/// group) and then locks its tenants' audit chain heads, in one statement: the row is
/// written, the confirmed one is gone, the heads come back with their links, and another
/// transaction cannot take a head until this one ends.
#[tokio::test]
async fn a_group_writes_its_outbox_rows_and_then_locks_its_chain_heads_in_one_statement() {
    use chrono::Utc;
    use switchyard::store::group;

    let app = crate::helpers::spawn_app().await;
    let row = || group_row(&app, Utc::now(), 2);
    let confirmed = row();
    let mut conn = app.pool().acquire().await.unwrap();
    write_outbox(&mut conn, &confirmed, &[]).await;
    sqlx::query(
        "INSERT INTO audit_chain_heads (tenant, seq, hash) VALUES ('acme', 7, 'h7'), ('beta', 2, 'h2')",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    drop(conn);

    let written = row();
    let mut tx = app.pool().begin().await.unwrap();
    let heads = group::write_outbox_then_lock_heads(
        &mut tx,
        &written,
        &[confirmed.id],
        &["acme", "beta", "new"],
    )
    .await
    .unwrap();
    assert_eq!(
        heads.into_iter().collect::<Vec<_>>(),
        vec![
            ("acme".to_owned(), (7, "h7".to_owned())),
            ("beta".to_owned(), (2, "h2".to_owned()))
        ],
        "the existing heads, each with its link; a tenant without one has none yet"
    );
    let ids: Vec<(uuid::Uuid, Vec<String>)> = sqlx::query_as("SELECT id, message_ids FROM outbox")
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    let message_ids: Vec<String> = written
        .messages
        .iter()
        .map(|m| m.message.message_id.clone())
        .collect();
    assert_eq!(
        ids,
        vec![(written.id, message_ids)],
        "written, and the confirmed row deleted"
    );

    let mut other = app.pool().begin().await.unwrap();
    let taken =
        sqlx::query("SELECT 1 FROM audit_chain_heads WHERE tenant = 'beta' FOR UPDATE NOWAIT")
            .execute(&mut *other)
            .await;
    assert!(taken.is_err(), "the head is locked until the group commits");
    other.rollback().await.unwrap();
    tx.commit().await.unwrap();
    let mut other = app.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM audit_chain_heads WHERE tenant = 'beta' FOR UPDATE NOWAIT")
        .execute(&mut *other)
        .await
        .expect("free once the group committed");
    other.rollback().await.unwrap();
    app.cleanup().await;
}

/// An outbox row is deleted once the broker confirms it, so it is not compressed with pglz: a
/// group's event array of tens of KB, and the message ids, routing keys, exchanges and kinds of
/// a large group's results, are compressed with lz4 (a fifth of pglz's CPU), or not at all on
/// a server built without lz4.
#[tokio::test]
async fn outbox_rows_are_compressed_with_lz4_or_not_at_all() {
    let app = crate::helpers::spawn_app().await;
    let mut row = group_row(&app, chrono::Utc::now(), 1);
    let events: Vec<String> = (0..400)
        .map(|n| format!(r#"{{"kind":"job_succeeded","tenant":"acme","n":{n}}}"#))
        .collect();
    let message = &mut row.messages[0].message;
    message.body = format!("[{}]", events.join(",")).into_bytes();
    message.kind = "switchyard.audit_event.v1[]".to_owned();
    let mut conn = app.pool().acquire().await.unwrap();
    write_outbox(&mut conn, &row, &[]).await;
    let (length, compression): (i32, Option<String>) = sqlx::query_as(
        "SELECT octet_length(bodies[1]), pg_column_compression(bodies)::text FROM outbox WHERE id = $1",
    )
    .bind(row.id)
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!(length as usize, row.messages[0].message.body.len());
    assert!(length > 16_000, "{length}");
    // lz4 where the server has it, else none: never pglz.
    let expected = if lz4_supported(&mut conn).await {
        Some("lz4")
    } else {
        None
    };
    assert_eq!(compression.as_deref(), expected);

    let results = group_row(&app, chrono::Utc::now(), 300);
    write_outbox(&mut conn, &results, &[]).await;
    let compressions: Vec<Option<String>> = sqlx::query_as::<_, (Option<String>, Option<String>)>(
        "SELECT pg_column_compression(exchanges)::text, pg_column_compression(kinds)::text
         FROM outbox WHERE id = $1",
    )
    .bind(results.id)
    .fetch_one(&mut *conn)
    .await
    .map(|(exchanges, kinds)| vec![exchanges, kinds])
    .unwrap();
    assert_eq!(
        compressions,
        [expected.map(str::to_owned), expected.map(str::to_owned)]
    );
    drop(conn);
    app.cleanup().await;
}

/// Whether the server was built with lz4 (it then accepts it as a column's compression).
async fn lz4_supported(conn: &mut sqlx::PgConnection) -> bool {
    sqlx::query("CREATE TEMP TABLE lz4_probe (v text COMPRESSION lz4)")
        .execute(conn)
        .await
        .is_ok()
}

/// Messages left unsent when a worker is upgraded are not lost: migration 20261206000003 turns
/// each old outbox row (a message, its body or its result reference, its headers) into a
/// one-message row that the relay publishes as it was.
#[tokio::test]
async fn rows_left_unsent_before_the_group_rows_migration_are_relayed_after_it() {
    use switchyard::store::{self, outbox};

    let app = crate::helpers::spawn_app().await;
    let database = format!("{}_upgrade", app.database);
    let server = crate::helpers::database_server();
    let options = store::connect_options(&format!("{server}/{database}")).unwrap();
    store::create_database_if_missing(&options).await.unwrap();
    let pool = sqlx::PgPool::connect_with(options).await.unwrap();
    // The schema as it was before the migration: the migrations up to 20261206000002.
    let before = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if name.as_str() <= "20261206000002_outbox_result_reference.sql" {
            std::fs::copy(&path, before.path().join(name)).unwrap();
        }
    }
    sqlx::migrate::Migrator::new(before.path())
        .await
        .unwrap()
        .run(&pool)
        .await
        .unwrap();

    let result = crate::helpers::stored_result(uuid::Uuid::now_v7(), 1);
    let mut conn = pool.acquire().await.unwrap();
    crate::helpers::store_results(&mut conn, std::iter::once(&result)).await;
    sqlx::query(
        "INSERT INTO outbox (id, message_id, exchange, routing_key, kind, headers, body, created_at,
                             result_job_id, result_generation)
         VALUES (gen_random_uuid(), 'pointing', 'x.results', 'acme._.succeeded', 'switchyard.result.v1',
                 '{}', NULL, now() - interval '2 minutes', $1, 1),
                (gen_random_uuid(), 'carrying', 'x.dead', 'acme', 'switchyard.job.v1',
                 '{\"x-switchyard-error\": \"too_large\"}', '\\x7b7d', now() - interval '1 minute',
                 NULL, NULL)",
    )
    .bind(result.job_id)
    .execute(&mut *conn)
    .await
    .unwrap();
    drop(conn);

    switchyard::store::MIGRATOR.run(&pool).await.unwrap();
    let stored: String = sqlx::query_scalar("SELECT body::text FROM results")
        .fetch_one(&pool)
        .await
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    let claim = outbox::claim_stale(&mut tx, chrono::Utc::now(), 10, &[])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(claim.ids.len(), 2, "two one-message rows");
    let relayed: Vec<(&str, &str, &[u8], Option<String>)> = claim
        .messages
        .iter()
        .map(|m| {
            let header = m
                .headers
                .as_ref()
                .map(|headers| format!("{:?}", headers.inner().get("x-switchyard-error").unwrap()));
            (
                m.message_id.as_str(),
                m.exchange.as_str(),
                m.body.as_slice(),
                header,
            )
        })
        .collect();
    assert_eq!(
        relayed,
        [
            ("pointing", "x.results", stored.as_bytes(), None),
            (
                "carrying",
                "x.dead",
                &b"{}"[..],
                Some(format!(
                    "{:?}",
                    lapin::types::AMQPValue::LongString("too_large".into())
                ))
            ),
        ]
    );
    pool.close().await;
    crate::helpers::drop_database(&server, &database).await;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(&database)
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(left, 0, "the upgrade test's database is dropped");
    app.cleanup().await;
}
