//! `switchyard dead-letters list|show|requeue|purge`: inspect and act on the dead-letter
//! queue. Messages that are not acted on are returned to the queue untouched.

use std::io::Write;
use std::process::ExitCode;

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Channel};
use serde_json::{Value, json};

use super::BadInput;
use crate::cli::{DeadLetterCommand, DeadLetterFilter};
use crate::config::Settings;
use crate::queue;
use crate::queue::header_text;
use crate::queue::publisher::Outgoing;
use crate::queue::topology::{JOBS_ROUTING_KEY, Names};
use crate::stages::finalize::ERROR_HEADER;

/// One dead-lettered message, as read from the queue.
struct Dead {
    tag: u64,
    body: Vec<u8>,
    properties: BasicProperties,
    job_id: String,
    error: String,
    tenant: Option<String>,
}

/// Why the message is here: Switchyard's own header, or the broker's `x-death` reason.
fn reason(properties: &BasicProperties) -> String {
    let Some(headers) = properties.headers() else {
        return "unknown".to_owned();
    };
    if let Some(error) = header_text(headers, ERROR_HEADER) {
        return error;
    }
    if let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death")
        && let Some(AMQPValue::FieldTable(death)) = deaths.as_slice().first()
        && let Some(reason) = header_text(death, "reason")
    {
        return format!("dead-lettered by the broker: {reason}");
    }
    "unknown".to_owned()
}

impl Dead {
    fn summary(&self) -> Value {
        json!({
            "job_id": self.job_id,
            "tenant": self.tenant,
            "error": self.error,
            "bytes": self.body.len(),
            "excerpt": crate::providers::excerpt(&String::from_utf8_lossy(&self.body), 200),
        })
    }

    /// Everything about the message: properties, headers and the body (as JSON when it is,
    /// as text when it is UTF-8, else base64).
    fn detail(&self) -> Value {
        let headers: serde_json::Map<String, Value> = self
            .properties
            .headers()
            .as_ref()
            .map(|headers| {
                headers
                    .inner()
                    .iter()
                    .map(|(name, value)| (name.to_string(), amqp_json(value)))
                    .collect()
            })
            .unwrap_or_default();
        let body = match serde_json::from_slice::<Value>(&self.body) {
            Ok(json) => json!({ "json": json }),
            Err(_) => match std::str::from_utf8(&self.body) {
                Ok(text) => json!({ "text": text }),
                Err(_) => {
                    json!({ "base64": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &self.body) })
                }
            },
        };
        json!({
            "job_id": self.job_id,
            "tenant": self.tenant,
            "error": self.error,
            "bytes": self.body.len(),
            "message_id": self.properties.message_id().as_ref().map(|m| m.to_string()),
            "type": self.properties.kind().as_ref().map(|k| k.to_string()),
            "headers": headers,
            "body": body,
        })
    }

    fn matches(&self, filter: &DeadLetterFilter) -> bool {
        filter
            .job
            .as_ref()
            .is_none_or(|ids| ids.is_empty() || ids.contains(&self.job_id))
            && filter
                .error
                .as_ref()
                .is_none_or(|needle| self.error.contains(needle.as_str()))
            && filter
                .tenant
                .as_ref()
                .is_none_or(|t| self.tenant.as_ref() == Some(t))
    }
}

/// An AMQP header value as JSON (for display).
fn amqp_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::LongString(text) => Value::from(text.to_string()),
        AMQPValue::ShortString(text) => Value::from(text.to_string()),
        AMQPValue::Boolean(b) => Value::from(*b),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::Timestamp(t) => Value::from(*t),
        AMQPValue::FieldArray(items) => items.as_slice().iter().map(amqp_json).collect(),
        AMQPValue::FieldTable(table) => Value::Object(
            table
                .inner()
                .iter()
                .map(|(k, v)| (k.to_string(), amqp_json(v)))
                .collect(),
        ),
        other => Value::from(format!("{other:?}")),
    }
}

/// Takes every message of the dead-letter queue (unacked, to be acked or returned).
async fn take_all(channel: &Channel, names: &Names) -> Result<Vec<Dead>, lapin::Error> {
    let mut taken = Vec::new();
    while let Some(message) = channel
        .basic_get(
            names.dead_queue().as_str().into(),
            BasicGetOptions { no_ack: false },
        )
        .await?
    {
        let delivery = message.delivery;
        let properties = delivery.properties.clone();
        let headers = properties.headers().clone().unwrap_or_default();
        let parsed: Option<Value> = serde_json::from_slice(&delivery.data).ok();
        // The message id, when nothing else names the job, is cut at `/`: a replay publishes
        // the job as `<job id>/g<generation>`, which the broker keeps when it dead-letters it.
        let job_id = header_text(&headers, "x-switchyard-job-id")
            .or_else(|| {
                parsed
                    .as_ref()
                    .and_then(|v| v.get("id")?.as_str().map(str::to_owned))
            })
            .or_else(|| {
                properties
                    .message_id()
                    .as_ref()
                    .and_then(|m| m.as_str().split('/').next().map(str::to_owned))
            })
            .unwrap_or_default();
        taken.push(Dead {
            tag: delivery.delivery_tag,
            error: reason(&properties),
            tenant: parsed
                .as_ref()
                .and_then(|v| v.get("tenant")?.as_str().map(str::to_owned)),
            body: delivery.data,
            properties,
            job_id,
        });
    }
    Ok(taken)
}

/// For each of `messages`, the stored result that would answer it if it went back to the jobs
/// queue: its job's latest result, when it is of the message's generation or newer. One query
/// for all of them.
async fn answered_by(
    conn: &mut sqlx::PgConnection,
    messages: &[&Dead],
) -> Result<Vec<Option<crate::messages::JobResult>>, sqlx::Error> {
    let ids: Vec<uuid::Uuid> = messages
        .iter()
        .filter_map(|m| uuid::Uuid::parse_str(&m.job_id).ok())
        .collect();
    let latest: std::collections::HashMap<uuid::Uuid, crate::messages::JobResult> =
        crate::store::results::find_latest_many(conn, &ids)
            .await?
            .into_iter()
            .map(|result| (result.job_id, result))
            .collect();
    Ok(messages
        .iter()
        .map(|message| {
            let result = latest.get(&uuid::Uuid::parse_str(&message.job_id).ok()?)?;
            let generation = serde_json::from_slice::<Value>(&message.body)
                .ok()
                .and_then(|v| v.get("generation")?.as_i64())
                .unwrap_or(0);
            // Another job's result (another tenant's, or an unreadable message's) answers a
            // copy of any generation: a requeued copy would be refused again.
            (result.tenant != message.tenant || i64::from(result.generation) >= generation)
                .then(|| result.clone())
        })
        .collect())
}

async fn give_back(channel: &Channel, messages: &[&Dead]) -> Result<(), lapin::Error> {
    for message in messages {
        channel
            .basic_nack(
                message.tag,
                BasicNackOptions {
                    multiple: false,
                    requeue: true,
                },
            )
            .await?;
    }
    Ok(())
}

pub async fn run(settings: Settings, command: DeadLetterCommand) -> anyhow::Result<ExitCode> {
    let broker = queue::Broker::connect(&settings.broker.url).await?;
    let names = Names::new(&settings.broker.prefix);
    let channel = broker.create_channel().await?;
    let taken = take_all(&channel, &names).await?;
    let by_job;
    let (filter, action) = match &command {
        DeadLetterCommand::List(filter) => (filter, "list"),
        DeadLetterCommand::Show { job } => {
            by_job = DeadLetterFilter {
                job: Some(vec![job.clone()]),
                error: None,
                tenant: None,
            };
            (&by_job, "show")
        }
        DeadLetterCommand::Requeue(filter) => (filter, "requeue"),
        DeadLetterCommand::Purge { filter, .. } => (filter, "purge"),
    };
    let (mut chosen, others): (Vec<&Dead>, Vec<&Dead>) =
        taken.iter().partition(|m| m.matches(filter));
    let mut out = std::io::stdout().lock();
    let outcome = match &command {
        DeadLetterCommand::List(_) => {
            for message in &chosen {
                writeln!(out, "{}", message.summary())?;
            }
            give_back(&channel, &chosen).await?;
            Ok(())
        }
        DeadLetterCommand::Show { job } => {
            for message in &chosen {
                writeln!(out, "{:#}", message.detail())?;
            }
            give_back(&channel, &chosen).await?;
            if chosen.is_empty() {
                Err(BadInput(format!(
                    "no dead-lettered message has job id {job:?} (`dead-letters list` shows them)"
                )))
            } else {
                Ok(())
            }
        }
        DeadLetterCommand::Requeue(_) => {
            // A job that already has a result at its generation (a rejected one) would only be
            // answered with it: it stays here, and the line says what runs it again.
            let mut conn = crate::store::connect_one(&settings.database.url).await?;
            let results = answered_by(&mut conn, &chosen).await?;
            let mut answered = Vec::new();
            let mut requeued = Vec::new();
            for (message, result) in chosen.drain(..).zip(results) {
                match result {
                    Some(result) => {
                        // A job refused as `job_id_taken`: the stored result is another job's.
                        let reason = if result.tenant == message.tenant {
                            format!(
                                "it already has a {} result (generation {}), which a requeued copy would only be answered with; `switchyard replay --id {} --status {}` runs it again as a new generation",
                                result.status.as_str(),
                                result.generation,
                                message.job_id,
                                result.status.as_str()
                            )
                        } else {
                            "its job id belongs to another job (another tenant's, or a message that could not be read), so a requeued copy would be refused again; publish the job under a new id".to_owned()
                        };
                        writeln!(
                            out,
                            "{}",
                            json!({ "job_id": message.job_id, "action": "skipped", "reason": reason })
                        )?;
                        answered.push(message);
                    }
                    None => requeued.push(message),
                }
            }
            give_back(&channel, &answered).await?;
            chosen = requeued;
            let publisher = super::job_publisher(&broker, &settings).await?;
            let messages: Vec<Outgoing> = chosen
                .iter()
                .map(|m| Outgoing {
                    exchange: names.jobs_exchange(),
                    routing_key: JOBS_ROUTING_KEY.to_owned(),
                    body: m.body.clone(),
                    message_id: m.job_id.clone(),
                    kind: m.properties.kind().as_ref().map_or_else(
                        || crate::messages::job::JOB_SCHEMA.to_owned(),
                        |k| k.to_string(),
                    ),
                    headers: None,
                })
                .collect();
            publisher.publish_all(&messages).await?;
            publisher.close(crate::app::CLOSE_WITHIN).await;
            for message in &chosen {
                channel
                    .basic_ack(message.tag, BasicAckOptions { multiple: false })
                    .await?;
                writeln!(out, "{}", message.summary())?;
            }
            Ok(())
        }
        DeadLetterCommand::Purge { yes, .. } => {
            if !yes && !chosen.is_empty() {
                give_back(&channel, &chosen).await?;
                Err(BadInput(format!(
                    "refusing to purge {} message(s) without --yes (run `dead-letters list` with the same filters to see them)",
                    chosen.len()
                )))
            } else {
                for message in &chosen {
                    channel
                        .basic_ack(message.tag, BasicAckOptions { multiple: false })
                        .await?;
                    writeln!(out, "{}", message.summary())?;
                }
                Ok(())
            }
        }
    };
    give_back(&channel, &others).await?;
    out.flush()?;
    channel.close(200, "done".into()).await.ok();
    broker.close(200, "done").await.ok();
    outcome?;
    eprintln!(
        "dead-letters: {action} {} of {} message(s)",
        chosen.len(),
        taken.len()
    );
    Ok(ExitCode::SUCCESS)
}
