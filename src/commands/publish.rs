//! `switchyard publish`: JSONL lines (full jobs or bare chat-completions bodies) → jobs, with
//! publisher confirms. Prints one job id per line once the broker confirmed it. A bad line stops
//! the run with its line number; the error says exactly which lines were published.

use std::io::{BufRead, Write};
use std::process::ExitCode;

use serde_json::Value;

use super::BadInput;
use crate::cli::PublishArgs;
use crate::config::Settings;
use crate::messages::job::JOB_SCHEMA;
use crate::messages::schema::Schema;
use crate::messages::{ChatRequest, Job};
use crate::queue;
use crate::queue::publisher::Outgoing;
use crate::queue::topology::{JOBS_ROUTING_KEY, Names};

/// Jobs published per confirm window.
const CHUNK: usize = 256;

/// The message that carries `job` to the jobs exchange.
pub fn job_message(names: &Names, job: &Job) -> Outgoing {
    Outgoing {
        exchange: names.jobs_exchange(),
        routing_key: JOBS_ROUTING_KEY.to_owned(),
        body: serde_json::to_vec(job).unwrap_or_default(),
        message_id: job.id.to_string(),
        kind: JOB_SCHEMA.to_owned(),
        headers: Some(trace_headers(job.id)),
    }
}

/// A W3C `traceparent` header starting a trace whose id is the job id; the worker records
/// it as the trace id of the job's audit events.
fn trace_headers(job_id: uuid::Uuid) -> lapin::types::FieldTable {
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        crate::audit::TRACEPARENT.into(),
        lapin::types::AMQPValue::LongString(crate::audit::traceparent_for(job_id).into()),
    );
    headers
}

/// Where bare requests go.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub tenant: String,
    pub batch: Option<String>,
    pub route: String,
}

/// Turns one input line into a job, or says exactly what is wrong with it.
pub fn parse_line(line: &str, defaults: &Defaults) -> Result<Job, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let value = match &value {
        Value::Object(object) if object.contains_key("schema") => value,
        Value::Object(object) if object.contains_key("messages") => {
            let request: ChatRequest = serde_json::from_value(value.clone())
                .map_err(|e| format!("not a chat-completions request: {e}"))?;
            let job = Job::new(
                &defaults.tenant,
                defaults.batch.as_deref(),
                &defaults.route,
                request,
            );
            serde_json::to_value(job).map_err(|e| e.to_string())?
        }
        _ => {
            return Err(
                "neither a job (no \"schema\" field) nor a chat-completions request (no \"messages\" field)".to_owned(),
            );
        }
    };
    Schema::Job
        .validate(&value)
        .map_err(|v| format!("does not match job.v1 schema at {}: {}", v.path, v.message))?;
    serde_json::from_value(value).map_err(|e| format!("does not match job.v1 schema: {e}"))
}

pub async fn run(settings: Settings, args: PublishArgs) -> anyhow::Result<ExitCode> {
    let defaults = Defaults {
        tenant: args.tenant,
        batch: args.batch,
        route: args.route,
    };
    let reader: Box<dyn BufRead> = if args.input == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let file = std::fs::File::open(&args.input)
            .map_err(|e| BadInput(format!("cannot open {}: {e}", args.input)))?;
        Box::new(std::io::BufReader::new(file))
    };
    // Read and check every line before connecting, so bad input never half-publishes a file.
    let mut jobs = Vec::new();
    for (index, line) in reader.lines().enumerate() {
        let number = index + 1;
        let line = line.map_err(|e| BadInput(format!("line {number}: cannot read: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let job = parse_line(&line, &defaults)
            .and_then(|job| {
                match super::too_large_for_workers(&job, settings.worker.max_message_bytes) {
                    Some(reason) => Err(reason),
                    None => Ok(job),
                }
            })
            .map_err(|reason| {
                BadInput(format!(
                    "line {number}: {reason}; nothing was published (fix the line and run again)"
                ))
            })?;
        jobs.push(job);
    }
    let broker = queue::Broker::connect(&settings.broker.url).await?;
    let publisher = super::job_publisher(&broker, &settings).await?;
    let names = Names::new(&settings.broker.prefix);
    let mut out = std::io::stdout().lock();
    for chunk in jobs.chunks(CHUNK) {
        let messages: Vec<Outgoing> = chunk.iter().map(|job| job_message(&names, job)).collect();
        publisher.publish_all(&messages).await?;
        for job in chunk {
            writeln!(out, "{}", job.id)?;
        }
    }
    out.flush()?;
    broker.close(200, "published").await.ok();
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Defaults {
        Defaults {
            tenant: "acme".to_owned(),
            batch: Some("b1".to_owned()),
            route: "default".to_owned(),
        }
    }

    #[test]
    fn a_bare_request_becomes_a_job_with_the_defaults() {
        let job = parse_line(
            r#"{"messages":[{"role":"user","content":"hi"}]}"#,
            &defaults(),
        )
        .unwrap();
        assert_eq!(job.tenant, "acme");
        assert_eq!(job.batch.as_deref(), Some("b1"));
        assert_eq!(job.id.get_version_num(), 7);
    }

    #[test]
    fn a_full_job_keeps_its_own_fields() {
        let line = r#"{"schema":"switchyard.job.v1","id":"0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b","tenant":"t2","route":"r","request":{"messages":[{"role":"user","content":"x"}]}}"#;
        let job = parse_line(line, &defaults()).unwrap();
        assert_eq!(job.tenant, "t2");
        assert_eq!(job.batch, None);
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        assert!(
            parse_line("{oops", &defaults())
                .unwrap_err()
                .starts_with("not JSON")
        );
        assert!(
            parse_line(r#"{"prompt":"x"}"#, &defaults())
                .unwrap_err()
                .contains("neither a job")
        );
        let err = parse_line(r#"{"messages":[]}"#, &defaults()).unwrap_err();
        assert!(err.contains("/request/messages"), "{err}");
    }

    #[test]
    fn the_bundled_example_files_are_valid() {
        for file in ["examples/jobs.jsonl", "examples/requests.jsonl"] {
            let text = std::fs::read_to_string(file).unwrap();
            for (n, line) in text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                parse_line(line, &defaults()).unwrap_or_else(|e| panic!("{file}:{}: {e}", n + 1));
            }
        }
    }
}
