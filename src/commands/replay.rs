//! `switchyard replay`: republish stored jobs (failed, rejected, …) from their stored request
//! with the generation bumped. The new result is stored beside the old one (history stays)
//! and supersedes it wherever the latest generation counts (batch status and results). Every
//! replay is an audit event naming who replayed what and why.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context as _;
use chrono::Utc;
use serde_json::json;

use super::BadInput;
use super::publish::job_message;
use super::report::parse_instant;
use crate::cli::{ReplayArgs, ReplayStatus};
use crate::config::Settings;
use crate::messages::events::AUDIT_EVENT_SCHEMA;
use crate::messages::{AuditEvent, ChatRequest, Job};
use crate::queue;
use crate::queue::publisher::Outgoing;
use crate::queue::topology::Names;
use crate::stages::ingest::is_name;
use crate::store::jobs::{self, ReplayFilter, Replayable};
use crate::store::{self, audit};

/// Why a selected job is not replayed.
fn skip_reason(job: &Replayable, force: bool) -> Option<String> {
    if job.status == "succeeded" && !force {
        return Some("already succeeded (use --force to run it again)".to_owned());
    }
    if stored_request(job).is_none() {
        return Some(
            "not replayable: the request was not retained (tenant retention `hash` or `none`, \
             or the message was rejected before it could be read)"
                .to_owned(),
        );
    }
    None
}

/// The request to send again: the stored one, or — for a rejected message — its original
/// body when that still reads as a job (e.g. it named an unknown route).
fn stored_request(job: &Replayable) -> Option<ChatRequest> {
    if let Some(request) = &job.request {
        return serde_json::from_value(request.clone()).ok();
    }
    let body = job.raw_body.as_deref()?;
    serde_json::from_slice::<Job>(body).ok().map(|j| j.request)
}

fn statuses(args: &ReplayArgs) -> Vec<String> {
    if args.status.is_empty() {
        return if args.ids.is_empty() {
            vec!["failed".to_owned(), "rejected".to_owned()]
        } else {
            Vec::new()
        };
    }
    let mut chosen: Vec<String> = args
        .status
        .iter()
        .map(|s| {
            match s {
                ReplayStatus::Failed => "failed",
                ReplayStatus::Rejected | ReplayStatus::DeadLettered => "rejected",
                ReplayStatus::Cancelled => "cancelled",
                ReplayStatus::Succeeded => "succeeded",
            }
            .to_owned()
        })
        .collect();
    chosen.sort();
    chosen.dedup();
    chosen
}

/// Who is replaying, for the audit trail.
pub fn actor() -> String {
    std::env::var("SWITCHYARD_ACTOR")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "unknown".to_owned())
}

pub async fn run(settings: Settings, args: ReplayArgs) -> anyhow::Result<ExitCode> {
    if !is_name(&args.tenant) {
        return Err(BadInput(format!(
            "--tenant {:?} may only contain letters, digits, '_' and '-'",
            args.tenant
        ))
        .into());
    }
    let filter = ReplayFilter {
        tenant: args.tenant.clone(),
        batch: args.batch.clone(),
        statuses: statuses(&args),
        error_class: args.error_class.clone(),
        since: args
            .since
            .as_deref()
            .map(|s| parse_instant(s, "--since"))
            .transpose()?,
        until: args
            .until
            .as_deref()
            .map(|s| parse_instant(s, "--until"))
            .transpose()?,
        ids: args.ids.clone(),
    };
    if let Some(route) = &args.route {
        super::configured_route(&settings, route)?;
    }
    let mut conn = store::connect_one(&settings.database.url).await?;
    let selected = jobs::select_for_replay(&mut conn, &filter).await?;
    let actor = actor();
    let provenance = crate::audit::Identity::new(&settings).provenance();
    let mut out = std::io::stdout().lock();
    let mut chosen: Vec<(Job, AuditEvent)> = Vec::new();
    let mut skipped = 0usize;
    // An id asked for by `--id` that the selection does not hold is said, not passed over.
    // One the other options left out (its status, batch, time or error) is skipped as such;
    // one with no stored job of the tenant at all makes the command exit `EXIT_BAD_INPUT`
    // once it has replayed the others.
    let unselected: Vec<uuid::Uuid> = (args.ids.iter())
        .filter(|id| !selected.iter().any(|stored| stored.id == **id))
        .copied()
        .collect();
    let left_out = if unselected.is_empty() {
        Vec::new()
    } else {
        let by_id = ReplayFilter {
            tenant: args.tenant.clone(),
            ids: unselected.clone(),
            ..ReplayFilter::default()
        };
        jobs::select_for_replay(&mut conn, &by_id).await?
    };
    let mut missing = 0usize;
    for id in &unselected {
        skipped += 1;
        let line = match left_out.iter().find(|stored| stored.id == *id) {
            Some(stored) => json!({
                "job_id": id, "action": "skipped", "status": stored.status, "batch": stored.batch,
                "reason": "left out by the other options (--status, --batch, --error-class, --since, --until)",
            }),
            None => {
                missing += 1;
                json!({ "job_id": id, "action": "skipped", "reason": format!("no stored job of tenant {} has this id", args.tenant) })
            }
        };
        writeln!(out, "{line}")?;
    }
    for stored in &selected {
        if let Some(reason) = skip_reason(stored, args.force) {
            skipped += 1;
            writeln!(
                out,
                "{}",
                json!({ "job_id": stored.id, "action": "skipped", "status": stored.status, "reason": reason })
            )?;
            continue;
        }
        let Some(request) = stored_request(stored) else {
            continue;
        };
        let route = args
            .route
            .clone()
            .or_else(|| stored.route.clone())
            .unwrap_or_else(|| "default".to_owned());
        let mut job = Job::new(&args.tenant, stored.batch.as_deref(), &route, request);
        job.id = stored.id;
        job.generation = stored.generation + 1;
        job.metadata = stored.metadata.clone().filter(|m| !m.is_null());
        let details = json!({
            "by": actor, "reason": args.reason, "from_generation": stored.generation,
            "to_generation": job.generation, "previous_status": stored.status,
            "previous_error": stored.error_code, "batch": stored.batch,
            "previous_route": stored.route, "route": route,
        });
        writeln!(
            out,
            "{}",
            json!({
                "job_id": stored.id, "action": if args.dry_run { "would_replay" } else { "replayed" },
                "status": stored.status, "error": stored.error_code,
                "generation": job.generation, "route": route,
            })
        )?;
        let mut event = AuditEvent::new(
            &args.tenant,
            Some(job.id),
            "job_replayed",
            Utc::now(),
            details,
        );
        crate::audit::stamp(std::slice::from_mut(&mut event), &provenance, job.id);
        chosen.push((job, event));
    }
    out.flush()?;
    let done = || {
        if missing == 0 {
            return ExitCode::SUCCESS;
        }
        eprintln!(
            "replay: {missing} of the {} --id value(s) match no stored job of tenant {}",
            args.ids.len(),
            args.tenant
        );
        ExitCode::from(super::EXIT_BAD_INPUT)
    };
    if args.dry_run {
        eprintln!(
            "replay: dry run: {} job(s) would be replayed, {skipped} skipped; nothing was changed",
            chosen.len()
        );
        return Ok(done());
    }
    if chosen.is_empty() {
        eprintln!("replay: nothing to replay ({skipped} skipped)");
        return Ok(done());
    }
    // The audit trail first: a replay that then fails to publish is recorded as attempted,
    // and running the same replay again picks the jobs up again.
    let events: Vec<&AuditEvent> = chosen.iter().map(|(_, e)| e).collect();
    // One transaction: chaining locks the tenant's chain head until the rows are in.
    let mut tx = sqlx::Connection::begin(&mut conn).await?;
    audit::insert_many(&mut tx, &events).await?;
    tx.commit().await?;
    let broker = queue::Broker::connect(&settings.broker.url).await?;
    let publisher = super::job_publisher(&broker, &settings).await?;
    let names = Names::new(&settings.broker.prefix);
    for chunk in chosen.chunks(256) {
        let mut messages: Vec<Outgoing> = chunk
            .iter()
            .map(|(job, _)| {
                let mut message = job_message(&names, job);
                message.message_id = format!("{}/g{}", job.id, job.generation);
                message
            })
            .collect();
        messages.extend(chunk.iter().map(|(_, event)| Outgoing {
            exchange: names.events_exchange(),
            routing_key: event.routing_key(),
            body: serde_json::to_vec(event).unwrap_or_default(),
            message_id: event.event_id.to_string(),
            kind: AUDIT_EVENT_SCHEMA.to_owned(),
            headers: None,
        }));
        publisher
            .publish_all(&messages)
            .await
            .context("cannot publish the replayed jobs; run the same replay again")?;
    }
    broker.close(200, "replayed").await.ok();
    eprintln!(
        "replay: {} job(s) replayed, {skipped} skipped",
        chosen.len()
    );
    Ok(done())
}
