//! The audit trail is a hash chain per tenant: `switchyard audit verify` passes on what the
//! workers wrote (also with two workers committing groups concurrently), and names the row
//! when one was edited or deleted with SQL. Every event carries its provenance.

use std::process::Output;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::Value;
use sha2::{Digest, Sha256};
use switchyard::queue::topology::JOBS_ROUTING_KEY;
use uuid::Uuid;

use crate::helpers::{TestApp, job, spawn_app, switchyard, wait_all, workers};

fn verify(app: &TestApp, tenant: Option<&str>) -> Output {
    let mut command = switchyard(app);
    command.args(["audit", "verify"]);
    if let Some(tenant) = tenant {
        command.args(["--tenant", tenant]);
    }
    command.output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The id of `tenant`'s event number `seq`.
async fn row_id(app: &TestApp, tenant: &str, seq: i64) -> Uuid {
    sqlx::query_scalar("SELECT id FROM audit_events WHERE tenant = $1 AND seq = $2")
        .bind(tenant)
        .bind(seq)
        .fetch_one(app.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn audit_verify_passes_on_intact_chains_and_names_an_edited_or_deleted_row() {
    let app = spawn_app().await;
    let mut jobs = Vec::new();
    for tenant in ["acme", "beta", "gamma"] {
        for i in 0..20 {
            jobs.push(job(
                tenant,
                Some("b"),
                "default",
                &format!("Document {i} of {tenant}. It has two sentences."),
            ));
        }
    }
    app.publish_jobs(&jobs).await;
    // A rejected message chains under `_` (no tenant).
    app.publish_raw(b"not json at all", None).await;
    // Two worker processes commit groups concurrently into the same chains.
    wait_all(workers(&app, 2, 8)).await;

    let (events, distinct_seqs): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT (tenant, seq)) FROM audit_events WHERE seq IS NOT NULL",
    )
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(events, 61, "one chained event per job");
    assert_eq!(distinct_seqs, events);

    let ok = verify(&app, None);
    let stdout = text(&ok.stdout);
    assert!(ok.status.success(), "{stdout}{}", text(&ok.stderr));
    assert!(
        stdout.contains("audit chain intact: 4 tenant(s), 61 events verified"),
        "{stdout}"
    );

    // Edit one of acme's rows: verify fails naming exactly that row.
    let edited = row_id(&app, "acme", 7).await;
    sqlx::query("UPDATE audit_events SET details = '{\"cost_usd\": \"0\"}' WHERE id = $1")
        .bind(edited)
        .execute(app.pool())
        .await
        .unwrap();
    let failed = verify(&app, None);
    let stderr = text(&failed.stderr);
    assert_eq!(failed.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("tenant \"acme\""), "{stderr}");
    assert!(
        stderr.contains(&format!("row {edited} (seq 7)")),
        "{stderr}"
    );
    assert!(stderr.contains("the row was changed"), "{stderr}");
    // The other tenants' chains are still intact.
    assert!(verify(&app, Some("gamma")).status.success());

    // Recomputing the edited row's own hash does not help: the next row's prev_hash no
    // longer matches.
    let forged: String = sqlx::query_scalar("SELECT md5('x') || md5('y')")
        .fetch_one(app.pool())
        .await
        .unwrap();
    sqlx::query("UPDATE audit_events SET hash = $2 WHERE id = $1")
        .bind(edited)
        .bind(&forged)
        .execute(app.pool())
        .await
        .unwrap();
    let stderr = text(&verify(&app, Some("acme")).stderr);
    assert!(
        stderr.contains(&format!("row {edited} (seq 7)")),
        "{stderr}"
    );

    // Delete one of beta's rows: the gap is named at the row after it.
    let after = row_id(&app, "beta", 4).await;
    sqlx::query("DELETE FROM audit_events WHERE tenant = 'beta' AND seq = 3")
        .execute(app.pool())
        .await
        .unwrap();
    let failed = verify(&app, Some("beta"));
    let stderr = text(&failed.stderr);
    assert_eq!(failed.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "tenant \"beta\": row {after} (seq 4): seq 3 is missing"
        )),
        "{stderr}"
    );

    // Delete gamma's last row: the chain head no longer matches.
    sqlx::query("DELETE FROM audit_events WHERE tenant = 'gamma' AND seq = 20")
        .execute(app.pool())
        .await
        .unwrap();
    let failed = verify(&app, Some("gamma"));
    let stderr = text(&failed.stderr);
    assert_eq!(failed.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("the chain head is seq 20"), "{stderr}");
    assert!(stderr.contains("rows at the end were deleted"), "{stderr}");

    let unknown = verify(&app, Some("nobody"));
    assert_eq!(unknown.status.code(), Some(2));
    assert!(text(&unknown.stderr).contains("has no audit events"));
    app.cleanup().await;
}

#[tokio::test]
async fn every_audit_event_carries_its_provenance() {
    let app = spawn_app().await;
    // Published like `switchyard publish` does: with a `traceparent` naming the job id.
    let plain = job("acme", None, "default", "A plain job. Nothing special.");
    app.publish_jobs(std::slice::from_ref(&plain)).await;
    // Published with a caller's own trace context.
    let traced = job(
        "acme",
        None,
        "default",
        "A traced job. Its trace id is the caller's.",
    );
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let body = serde_json::to_vec(&traced).unwrap();
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(format!("00-{trace_id}-00f067aa0ba902b7-01").into()),
    );
    app.publisher
        .channel()
        .basic_publish(
            app.names.jobs_exchange().as_str().into(),
            JOBS_ROUTING_KEY.into(),
            Default::default(),
            &body,
            BasicProperties::default().with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let mut events = app.subscribe(true, "audit.#").await;
    app.run_worker_until_idle().await;

    let rows: Vec<(Uuid, Value)> =
        sqlx::query_as("SELECT job_id, provenance FROM audit_events ORDER BY seq")
            .fetch_all(app.pool())
            .await
            .unwrap();
    assert_eq!(rows.len(), 2);
    let config_hash = switchyard::audit::config_sha256(&app.ctx.settings);
    for (job_id, provenance) in &rows {
        let (expected_body, expected_trace) = if *job_id == plain.id {
            (
                serde_json::to_vec(&plain).unwrap(),
                plain.id.simple().to_string(),
            )
        } else {
            (body.clone(), trace_id.to_owned())
        };
        assert_eq!(provenance["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(provenance["config_sha256"], config_hash.as_str());
        assert_eq!(
            provenance["message_sha256"],
            hex::encode(Sha256::digest(&expected_body)).as_str()
        );
        assert_eq!(provenance["trace_id"], expected_trace.as_str());
        assert!(
            provenance["worker_id"]
                .as_str()
                .is_some_and(|w| !w.is_empty())
        );
    }
    // The published events carry the same provenance and validate against the schema.
    let deliveries =
        crate::helpers::collect(&mut events, 1, std::time::Duration::from_secs(10)).await;
    let published: Vec<Value> = deliveries
        .iter()
        .flat_map(|d| crate::helpers::items(&d.data))
        .collect();
    for event in &published {
        switchyard::messages::schema::Schema::AuditEvent
            .validate(event)
            .unwrap();
        assert_eq!(event["provenance"]["config_sha256"], config_hash.as_str());
    }
    app.cleanup().await;
}

/// `audit verify` run while workers append (a cron job on a live system) reads one snapshot:
/// a chain head read at its start matches the rows it reads later, so it never calls a live
/// chain broken.
#[tokio::test]
async fn audit_verify_passes_while_workers_append() {
    let app = spawn_app().await;
    // A long chain walked first, so the others' heads are read well before their rows.
    let first: Vec<_> = (0..3000)
        .map(|i| {
            job(
                "aa",
                None,
                "default",
                &format!("Document {i}. Two sentences here."),
            )
        })
        .collect();
    app.publish_jobs(&first).await;
    app.run_worker_until_idle().await;
    let mut worker = workers(&app, 1, 16);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let appending = async {
        let mut i = 0;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let jobs: Vec<_> = (0..5)
                .map(|k| job("zz", None, "default", &format!("Live {i}-{k}. It goes on.")))
                .collect();
            app.publish_jobs(&jobs).await;
            i += 1;
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };
    let verifying = async {
        // Once the live chain exists, verify again and again while it grows.
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        let mut outcomes = Vec::new();
        for _ in 0..10 {
            let mut command = switchyard(&app);
            command.args(["audit", "verify"]);
            let output = tokio::task::spawn_blocking(move || command.output())
                .await
                .unwrap()
                .unwrap();
            outcomes.push(output);
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        outcomes
    };
    let ((), outcomes) = tokio::join!(appending, verifying);
    wait_all(std::mem::take(&mut worker)).await;
    for output in outcomes {
        assert!(
            output.status.success(),
            "{}{}",
            text(&output.stdout),
            text(&output.stderr)
        );
    }
    app.cleanup().await;
}
