//! Tenant isolation: per-tenant RabbitMQ users whose topic permissions (the recipe in
//! `deploy/rabbitmq/README.md`) let a tenant bind only to its own `results` and `events`
//! routing keys, and `enforce_user_id`, which rejects a job whose tenant is not the RabbitMQ
//! user that published it.

use std::process::Command;
use std::time::Duration;

use futures::FutureExt;
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use switchyard::messages::{JobResult, JobStatus};
use switchyard::queue::topology::{self, JOBS_ROUTING_KEY, Names};
use switchyard::stages::finalize::PUBLISHED_BY_HEADER;
use uuid::Uuid;

use crate::helpers::{
    FakeProvider, TestApp, collect, job, rabbitmqctl, run_with_stdin, spawn_app_full, switchyard,
    trickle_config,
};

/// A RabbitMQ user for one tenant, set up as `deploy/rabbitmq/README.md` documents, and
/// deleted on drop.
struct TenantUser {
    name: String,
    password: String,
}

impl TenantUser {
    fn create(names: &Names) -> Self {
        let name = format!("t{}", &Uuid::now_v7().simple().to_string()[16..]);
        let password = Uuid::now_v7().simple().to_string();
        let user = Self { name, password };
        rabbitmqctl(&["add_user", &user.name, &user.password]);
        let prefix = regex_quote(names.jobs_exchange().trim_end_matches(".jobs"));
        // configure: its own server-named queues; write: those queues (binding) and the jobs
        // exchange; read: those queues and the results and events exchanges.
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            "/",
            &user.name,
            r"^amq\.gen-.*",
            &format!(r"^(amq\.gen-.*|{prefix}\.jobs)$"),
            &format!(r"^(amq\.gen-.*|{prefix}\.results|{prefix}\.events)$"),
        ]);
        rabbitmqctl(&[
            "set_topic_permissions",
            "-p",
            "/",
            &user.name,
            &names.results_exchange(),
            "^$",
            r"^{username}\.",
        ]);
        rabbitmqctl(&[
            "set_topic_permissions",
            "-p",
            "/",
            &user.name,
            &names.events_exchange(),
            "^$",
            r"^(cost|audit|stream)\.{username}\.",
        ]);
        user
    }

    /// The broker URL that logs in as this user.
    fn url(&self) -> String {
        format!("amqp://{}:{}@127.0.0.1:5672/%2f", self.name, self.password)
    }

    async fn connect(&self) -> Connection {
        Connection::connect(&self.url(), ConnectionProperties::default())
            .await
            .expect("the tenant user connects")
    }
}

impl Drop for TenantUser {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_user", &self.name])
            .output();
    }
}

fn regex_quote(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                vec![c]
            } else {
                vec!['\\', c]
            }
        })
        .collect()
}

/// Declares a server-named queue and binds it to `exchange` with `key`.
async fn bind(connection: &Connection, exchange: &str, key: &str) -> Result<(), lapin::Error> {
    let channel = connection.create_channel().await?;
    let options = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    let queue = channel
        .queue_declare("".into(), options, FieldTable::default())
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let _ = channel.close(200, "bye".into()).await;
    Ok(())
}

fn assert_refused(outcome: Result<(), lapin::Error>, what: &str) {
    let error = outcome.expect_err(what);
    let text = format!("{error:?}").to_lowercase();
    assert!(
        text.contains("access") && text.contains("refused"),
        "{what}: {error:?}"
    );
}

async fn publish_as(
    channel: &Channel,
    names: &Names,
    body: &[u8],
    user_id: Option<&str>,
) -> Result<(), lapin::Error> {
    let mut properties = BasicProperties::default().with_delivery_mode(2);
    if let Some(user) = user_id {
        properties = properties.with_user_id(user.into());
    }
    channel
        .basic_publish(
            names.jobs_exchange().as_str().into(),
            JOBS_ROUTING_KEY.into(),
            Default::default(),
            body,
            properties,
        )
        .await?
        .await?;
    Ok(())
}

async fn results_by_id(
    app: &TestApp,
    consumer: &mut lapin::Consumer,
    n: usize,
) -> std::collections::HashMap<Uuid, JobResult> {
    let _ = app;
    collect(consumer, n, Duration::from_secs(10))
        .await
        .iter()
        .map(|d| {
            let result: JobResult = serde_json::from_slice(&d.data).unwrap();
            (result.job_id, result)
        })
        .collect()
}

#[tokio::test]
async fn a_tenant_user_can_bind_only_to_its_own_results_and_publish_only_its_own_jobs() {
    let app = spawn_app_full("enforce_user_id = true", "").await;
    let a = TenantUser::create(&app.names);
    let b = TenantUser::create(&app.names);
    let connection = a.connect().await;
    let results = app.names.results_exchange();
    let events = app.names.events_exchange();

    bind(&connection, &results, &format!("{}.#", a.name))
        .await
        .expect("A binds to its own results");
    bind(&connection, &events, &format!("audit.{}.#", a.name))
        .await
        .expect("A binds to its own audit events");
    assert_refused(
        bind(&connection, &results, &format!("{}.#", b.name)).await,
        "A binds to B's results",
    );
    assert_refused(
        bind(&connection, &results, "#").await,
        "A binds to every result",
    );
    assert_refused(
        bind(&connection, &results, &format!("{}#", a.name)).await,
        "A binds to a prefix of its name",
    );
    assert_refused(
        bind(&connection, &events, &format!("cost.{}.#", b.name)).await,
        "A binds to B's cost events",
    );

    // RabbitMQ itself refuses a `user_id` other than the connection's user …
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    let forged = job(
        &b.name,
        None,
        "default",
        "Pretending to be B. This must not pass.",
    );
    let outcome = publish_as(
        &channel,
        &app.names,
        &serde_json::to_vec(&forged).unwrap(),
        Some(&b.name),
    )
    .await;
    assert!(outcome.is_err(), "the broker refused a forged user_id");

    // … so with enforcement the worker serves A's own jobs, and rejects a job for B that A
    // published, and one published without a user_id.
    let mut subscription = app.subscribe(false, "#").await;
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    let own = job(&a.name, None, "default", "A's own job. It is served.");
    let for_b = job(
        &b.name,
        None,
        "default",
        "A publishes for B. It is rejected.",
    );
    let anonymous = job(
        &a.name,
        None,
        "default",
        "No user id at all. It is rejected.",
    );
    publish_as(
        &channel,
        &app.names,
        &serde_json::to_vec(&own).unwrap(),
        Some(&a.name),
    )
    .await
    .unwrap();
    publish_as(
        &channel,
        &app.names,
        &serde_json::to_vec(&for_b).unwrap(),
        Some(&a.name),
    )
    .await
    .unwrap();
    publish_as(
        &channel,
        &app.names,
        &serde_json::to_vec(&anonymous).unwrap(),
        None,
    )
    .await
    .unwrap();
    app.run_worker_until_idle().await;

    let results = results_by_id(&app, &mut subscription, 3).await;
    assert_eq!(results[&own.id].status, JobStatus::Succeeded);
    for (id, published_by) in [
        (for_b.id, format!("by RabbitMQ user {:?}", a.name)),
        (anonymous.id, "without a user_id property".to_owned()),
    ] {
        let result = &results[&id];
        assert_eq!(result.status, JobStatus::Rejected);
        let error = result.error.as_ref().unwrap();
        assert_eq!(error.code, "tenant_not_authorized");
        assert!(error.message.contains(&published_by), "{}", error.message);
    }
    // Audited under the tenant the job named, and dead-lettered.
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_events WHERE kind = 'job_rejected' AND details->'error'->>'code' = 'tenant_not_authorized'",
    )
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(audited, 2);
    assert_eq!(app.drain_dead_letters().await.len(), 2);
    let _ = connection.close(200, "bye".into()).await;
    app.cleanup().await;
}

/// `switchyard publish` signs its messages with the user it connects as: with enforcement on,
/// a tenant's jobs published through the CLI as that tenant's RabbitMQ user are served, and a
/// job it publishes for another tenant is rejected, naming that user.
#[tokio::test]
async fn jobs_published_by_the_cli_carry_the_user_it_connects_as() {
    let app = spawn_app_full("enforce_user_id = true", "").await;
    let a = TenantUser::create(&app.names);
    let mut subscription = app.subscribe(false, "#").await;
    let own = job(
        &a.name,
        None,
        "default",
        "A's own job, through the CLI. Served.",
    );
    let other = job(
        "another-tenant",
        None,
        "default",
        "A publishes for another tenant through the CLI. Rejected.",
    );
    let input = [&own, &other]
        .map(|job| serde_json::to_string(job).unwrap() + "\n")
        .concat();
    let mut command = switchyard(&app);
    command
        .args(["publish", "-"])
        .env("SWITCHYARD_BROKER__URL", a.url());
    let output = run_with_stdin(command, &input);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    app.run_worker_until_idle().await;

    let results = results_by_id(&app, &mut subscription, 2).await;
    assert_eq!(results[&own.id].status, JobStatus::Succeeded);
    let rejected = &results[&other.id];
    assert_eq!(rejected.status, JobStatus::Rejected);
    let error = rejected.error.as_ref().unwrap();
    assert_eq!(error.code, "tenant_not_authorized");
    let published_by = format!("by RabbitMQ user {:?}", a.name);
    assert!(error.message.contains(&published_by), "{}", error.message);
    app.cleanup().await;
}

/// A job the workers park (every target rate limited, as in `limits.rs`) comes back from its
/// retry queue published by the workers' own user, naming its first publisher in a header:
/// with enforcement on it is still its tenant's job. A tenant writing that header itself
/// proves nothing.
#[tokio::test]
async fn a_parked_job_is_still_its_publishers_when_it_comes_back() {
    let fake = FakeProvider::start(&[]);
    let config = trickle_config(&fake.url);
    let app = spawn_app_full("enforce_user_id = true", &config).await;
    let a = TenantUser::create(&app.names);
    let connection = a.connect().await;
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    let mut subscription = app.subscribe(false, "#").await;
    let jobs: Vec<_> = (0..3)
        .map(|i| {
            job(
                &a.name,
                None,
                "trickle",
                &format!("Job {i}. Parked, then served."),
            )
        })
        .collect();
    for j in &jobs {
        publish_as(
            &channel,
            &app.names,
            &serde_json::to_vec(j).unwrap(),
            Some(&a.name),
        )
        .await
        .unwrap();
    }
    let forged = job(
        "victim",
        None,
        "trickle",
        "A claims a header it cannot vouch for.",
    );
    let mut headers = FieldTable::default();
    headers.insert(
        PUBLISHED_BY_HEADER.into(),
        lapin::types::AMQPValue::LongString("victim".into()),
    );
    channel
        .basic_publish(
            app.names.jobs_exchange().as_str().into(),
            JOBS_ROUTING_KEY.into(),
            Default::default(),
            &serde_json::to_vec(&forged).unwrap(),
            BasicProperties::default()
                .with_user_id(a.name.as_str().into())
                .with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    // While the worker runs, watch the retry queues: the jobs must really be parked.
    let watcher = app.ctx.broker.create_channel().await.unwrap();
    let watching = async {
        while topology::parked_jobs(&watcher, &app.names).await.unwrap() == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let ((), parked) = tokio::join!(app.run_worker_until_idle().map(|_| ()), async {
        tokio::time::timeout(Duration::from_secs(30), watching)
            .await
            .is_ok()
    });
    assert!(parked, "a job waited in a retry queue");

    let results = results_by_id(&app, &mut subscription, 4).await;
    for j in &jobs {
        assert_eq!(
            results[&j.id].status,
            JobStatus::Succeeded,
            "{:?}",
            results[&j.id].error
        );
    }
    assert_eq!(fake.requests().await, 3);
    let refused = &results[&forged.id];
    assert_eq!(refused.status, JobStatus::Rejected);
    assert_eq!(
        refused.error.as_ref().unwrap().code,
        "tenant_not_authorized"
    );
    let _ = connection.close(200, "bye".into()).await;
    app.cleanup().await;
}

/// With enforcement on, a message another user publishes in a tenant's name, under the id of
/// that tenant's committed job and at a later generation, is rejected without being stored:
/// it cannot become that job's latest result.
#[tokio::test]
async fn a_job_forged_in_a_tenants_name_cannot_replace_its_result() {
    let app = spawn_app_full("enforce_user_id = true", "").await;
    let a = TenantUser::create(&app.names);
    let connection = a.connect().await;
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    let own = job(&a.name, None, "default", "A's own job. Served.");
    publish_as(
        &channel,
        &app.names,
        &serde_json::to_vec(&own).unwrap(),
        Some(&a.name),
    )
    .await
    .unwrap();
    app.run_worker_until_idle().await;

    let mut forged = job(
        &a.name,
        None,
        "default",
        "Guest, in A's name, at generation 5.",
    );
    forged.id = own.id;
    forged.generation = 5;
    publish_as(
        &app.publisher.channel(),
        &app.names,
        &serde_json::to_vec(&forged).unwrap(),
        Some("guest"),
    )
    .await
    .unwrap();
    let report = app.run_worker_until_idle().await;
    assert_eq!(report.finalized.refused, 1);
    let latest =
        switchyard::store::results::find_latest(&mut app.pool().acquire().await.unwrap(), own.id)
            .await
            .unwrap()
            .unwrap();
    assert_eq!(
        (latest.generation, latest.status),
        (0, JobStatus::Succeeded),
        "A's result is still the job's latest"
    );
    assert_eq!(
        app.drain_dead_letters().await.len(),
        1,
        "kept for inspection"
    );
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_events WHERE kind = 'job_rejected'
         AND details->'error'->>'code' = 'tenant_not_authorized'",
    )
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(audited, 1, "the forgery is audited");
    let _ = connection.close(200, "bye".into()).await;
    app.cleanup().await;
}

#[tokio::test]
async fn a_tenant_can_opt_out_of_user_id_enforcement_and_another_in() {
    let app = spawn_app_full(
        "",
        "[[tenants]]\nname = \"strict\"\nenforce_user_id = true\n\n[[tenants]]\nname = \"relaxed\"\n",
    )
    .await;
    let mut subscription = app.subscribe(false, "#").await;
    let strict = job(
        "strict",
        None,
        "default",
        "Published by guest for strict. Rejected.",
    );
    let relaxed = job(
        "relaxed",
        None,
        "default",
        "Published by guest for relaxed. Served.",
    );
    let channel = app.publisher.channel();
    publish_as(
        &channel,
        &app.names,
        &serde_json::to_vec(&strict).unwrap(),
        Some("guest"),
    )
    .await
    .unwrap();
    publish_as(
        &channel,
        &app.names,
        &serde_json::to_vec(&relaxed).unwrap(),
        Some("guest"),
    )
    .await
    .unwrap();
    app.run_worker_until_idle().await;
    let results = results_by_id(&app, &mut subscription, 2).await;
    assert_eq!(results[&relaxed.id].status, JobStatus::Succeeded);
    assert_eq!(
        results[&strict.id].error.as_ref().unwrap().code,
        "tenant_not_authorized"
    );
    app.cleanup().await;
}
