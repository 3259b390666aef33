//! `switchyard batch submit|status|results|cancel`: OpenAI Batch files in and out.
//!
//! `submit` validates every line of an OpenAI Batch input file (`custom_id`, `method`, `url`,
//! `body`) before anything is published, records the batch and one item per line, and
//! publishes one job per valid line. `results` writes the OpenAI Batch output format, so
//! tooling that reads OpenAI batch output works unchanged.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::process::ExitCode;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::publish::job_message;
use super::{BadInput, EXIT_JOBS_FAILED};
use crate::cli::{BatchCommand, BatchResultsArgs, BatchSubmitArgs};
use crate::config::Settings;
use crate::messages::result::RESULT_SCHEMA;
use crate::messages::schema::Schema;
use crate::messages::{
    AuditEvent, CostSummary, Job, JobError, JobResult, JobStatus, ResultHead, Timings,
};
use crate::queue::publisher::Outgoing;
use crate::queue::topology::Names;
use crate::stages::ingest::is_name;
use crate::store::batches::{self, BatchKind, BatchRow, Counts, ItemRow};
use crate::store::jobs::{self, JobRow};
use crate::store::{self, audit, results};
use crate::{messages, queue};

/// The only endpoint a batch line may call.
const CHAT_COMPLETIONS: &str = "/v1/chat/completions";
/// Longest `custom_id` accepted (OpenAI's limit).
const MAX_CUSTOM_ID: usize = 512;
/// Jobs published per confirm window.
const CHUNK: usize = 256;

/// One line of an input file after validation.
#[derive(Debug)]
pub enum Line {
    Valid {
        custom_id: String,
        job: Box<Job>,
    },
    Invalid {
        custom_id: Option<String>,
        error: String,
    },
}

pub async fn run(settings: Settings, command: BatchCommand) -> anyhow::Result<ExitCode> {
    match command {
        BatchCommand::Submit(args) => submit(settings, args).await,
        BatchCommand::Status { id, tenant, json } => status(settings, &id, &tenant, json).await,
        BatchCommand::Results(args) => results_file(settings, args).await,
        BatchCommand::Cancel { id, tenant } => cancel(settings, &id, &tenant).await,
    }
}

/// Validates one input line (1-based `number`) into a job of `tenant`/`batch`/`route`.
pub fn parse_line(text: &str, tenant: &str, batch: &str, route: &str) -> Line {
    let value: Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(e) => {
            return Line::Invalid {
                custom_id: None,
                error: format!("not valid JSON: {e}"),
            };
        }
    };
    let Value::Object(mut object) = value else {
        return Line::Invalid {
            custom_id: None,
            error: "expected a JSON object with custom_id, method, url and body".to_owned(),
        };
    };
    let custom_id = object
        .get("custom_id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let invalid = |error: String| Line::Invalid {
        custom_id: custom_id.clone(),
        error,
    };
    if let Some(unknown) = object
        .keys()
        .find(|k| !matches!(k.as_str(), "custom_id" | "method" | "url" | "body"))
    {
        return invalid(format!(
            "{unknown}: unknown field (expected custom_id, method, url, body)"
        ));
    }
    match object.get("custom_id") {
        Some(Value::String(id)) if !id.is_empty() && id.len() <= MAX_CUSTOM_ID => {}
        Some(Value::String(id)) if id.is_empty() => {
            return invalid("custom_id: must not be empty".to_owned());
        }
        Some(Value::String(_)) => {
            return invalid(format!("custom_id: longer than {MAX_CUSTOM_ID} characters"));
        }
        Some(other) => {
            return invalid(format!(
                "custom_id: must be a string, got {}",
                type_name(other)
            ));
        }
        None => return invalid("custom_id: missing".to_owned()),
    }
    match object.get("method") {
        Some(Value::String(method)) if method == "POST" => {}
        Some(other) => {
            return invalid(format!("method: must be \"POST\", got {other}"));
        }
        None => return invalid("method: missing (must be \"POST\")".to_owned()),
    }
    match object.get("url") {
        Some(Value::String(url)) if url == CHAT_COMPLETIONS => {}
        Some(other) => {
            return invalid(format!(
                "url: only \"{CHAT_COMPLETIONS}\" is supported, got {other}"
            ));
        }
        None => return invalid(format!("url: missing (must be \"{CHAT_COMPLETIONS}\")")),
    }
    let body = match object.remove("body") {
        Some(Value::Object(body)) => body,
        Some(other) => {
            return invalid(format!(
                "body: must be an object, got {}",
                type_name(&other)
            ));
        }
        None => return invalid("body: missing".to_owned()),
    };
    let id = Uuid::now_v7();
    let mut job = Map::new();
    job.insert("schema".into(), messages::job::JOB_SCHEMA.into());
    job.insert("id".into(), id.to_string().into());
    job.insert("tenant".into(), tenant.into());
    job.insert("batch".into(), batch.into());
    job.insert("route".into(), route.into());
    job.insert("request".into(), Value::Object(body));
    job.insert(
        "metadata".into(),
        json!({ "custom_id": custom_id.clone().unwrap_or_default() }),
    );
    let job = Value::Object(job);
    if let Err(violation) = Schema::Job.validate(&job) {
        // `/request/messages/0/role` in the job is `body.messages.0.role` in the line.
        let field = violation
            .path
            .strip_prefix("/request")
            .map(|rest| format!("body{}", rest.replace('/', ".")))
            .unwrap_or_else(|| violation.path.clone());
        return invalid(format!("{field}: {}", violation.message));
    }
    match serde_json::from_value::<Job>(job) {
        Ok(job) => Line::Valid {
            custom_id: custom_id.unwrap_or_default(),
            job: Box::new(job),
        },
        Err(e) => invalid(format!("body: {e}")),
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The `custom_id` (if the line had one) and the message of an invalid line's stored error
/// (see [`item_rows`]). An id stored before ids were JSON-quoted is taken as it is.
fn invalid_line_error(error: &str) -> (String, &str) {
    match error
        .strip_prefix("custom_id=")
        .and_then(|rest| rest.split_once('\t'))
    {
        Some((id, message)) => (
            serde_json::from_str::<String>(id).unwrap_or_else(|_| id.to_owned()),
            message,
        ),
        None => (String::new(), error),
    }
}

/// Reads past the rest of the current line (through its newline, or to the end).
fn skip_line(reader: &mut impl BufRead) -> std::io::Result<()> {
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(());
        }
        match buf.iter().position(|b| *b == b'\n') {
            Some(at) => {
                reader.consume(at + 1);
                return Ok(());
            }
            None => {
                let all = buf.len();
                reader.consume(all);
            }
        }
    }
}

/// The item key of an invalid line (its `custom_id` may be missing or taken): `#line-<n>`. A
/// valid line's `custom_id` may not look like one.
const INVALID_LINE_KEY: &str = "#line-";

/// How much longer than `worker.max_message_bytes` a line may be before it is not read whole:
/// the job a line becomes is about the line's size, and one over the limit is invalid anyway.
const LINE_SLACK: usize = 64 * 1024;

/// Validates a whole file: every line parsed, duplicate `custom_id`s reported against the
/// line that had it first, a line that is not UTF-8 reported like any invalid line, and a line
/// far longer than any job the workers take reported without being read into memory. Returns
/// `(line number, line)` for every non-blank line.
pub fn parse_file(
    mut reader: impl BufRead,
    tenant: &str,
    batch: &str,
    route: &str,
    max_message_bytes: usize,
) -> Result<Vec<(usize, Line)>, BadInput> {
    let cap = max_message_bytes.saturating_add(LINE_SLACK);
    let mut lines = Vec::new();
    let mut first_seen: HashMap<String, usize> = HashMap::new();
    let mut number = 0;
    loop {
        number += 1;
        let cannot_read = |e: std::io::Error| BadInput(format!("line {number}: cannot read: {e}"));
        let mut bytes = Vec::new();
        let read = std::io::Read::take(
            &mut reader,
            u64::try_from(cap).unwrap_or(u64::MAX).saturating_add(1),
        )
        .read_until(b'\n', &mut bytes)
        .map_err(cannot_read)?;
        if read == 0 {
            break;
        }
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
        } else if bytes.len() > cap {
            skip_line(&mut reader).map_err(cannot_read)?;
            lines.push((
                number,
                Line::Invalid {
                    error: format!(
                        "longer than {cap} bytes, far over worker.max_message_bytes ({max_message_bytes}); not read"
                    ),
                    custom_id: None,
                },
            ));
            continue;
        }
        let Ok(text) = String::from_utf8(bytes) else {
            lines.push((
                number,
                Line::Invalid {
                    error: "not UTF-8 text".to_owned(),
                    custom_id: None,
                },
            ));
            continue;
        };
        let text = text.strip_suffix('\r').unwrap_or(&text);
        if text.trim().is_empty() {
            continue;
        }
        let line = match parse_line(text, tenant, batch, route) {
            Line::Valid { custom_id, .. } if custom_id.starts_with(INVALID_LINE_KEY) => {
                Line::Invalid {
                    error: format!(
                        "custom_id: {custom_id:?} may not start with {INVALID_LINE_KEY:?}, which names invalid lines"
                    ),
                    custom_id: Some(custom_id),
                }
            }
            Line::Valid { custom_id, job } => match first_seen.get(&custom_id) {
                Some(first) => Line::Invalid {
                    error: format!("custom_id: {custom_id:?} duplicates line {first}"),
                    custom_id: Some(custom_id),
                },
                None => match super::too_large_for_workers(&job, max_message_bytes) {
                    Some(error) => Line::Invalid {
                        error,
                        custom_id: Some(custom_id),
                    },
                    None => {
                        first_seen.insert(custom_id.clone(), number);
                        Line::Valid { custom_id, job }
                    }
                },
            },
            invalid => invalid,
        };
        lines.push((number, line));
    }
    Ok(lines)
}

async fn submit(settings: Settings, args: BatchSubmitArgs) -> anyhow::Result<ExitCode> {
    for (what, value) in [("--tenant", &args.tenant)] {
        if !is_name(value) {
            return Err(BadInput(format!(
                "{what} {value:?} may only contain letters, digits, '_' and '-'"
            ))
            .into());
        }
    }
    let mut conn = None;
    let (batch, route) = match &args.resume {
        // A batch whose submission stopped part way: its items are stored, and the file says
        // again what each unpublished one asks.
        Some(id) => {
            let conn = conn.insert(store::connect_one(&settings.database.url).await?);
            let batch = find_batch(conn, &args.tenant, id).await?;
            if batch.kind != BatchKind::OpenAi.as_str() {
                return Err(BadInput(format!(
                    "batch {id} is a {} batch, not a submitted file",
                    batch.kind
                ))
                .into());
            }
            if batch.cancelled_at.is_some() {
                return Err(BadInput(format!(
                    "batch {id} was cancelled; submit the file as a new batch"
                ))
                .into());
            }
            (batch.id, batch.route)
        }
        None => (
            format!("batch_{}", Uuid::now_v7().simple()),
            args.route.clone(),
        ),
    };
    super::configured_route(&settings, &route)?;
    let file = std::fs::File::open(&args.file)
        .map_err(|e| BadInput(format!("cannot open {}: {e}", args.file.display())))?;
    let mut lines = parse_file(
        std::io::BufReader::new(file),
        &args.tenant,
        &batch,
        &route,
        settings.worker.max_message_bytes,
    )?;
    let invalid: Vec<(usize, &str)> = lines
        .iter()
        .filter_map(|(n, line)| match line {
            Line::Invalid { error, .. } => Some((*n, error.as_str())),
            Line::Valid { .. } => None,
        })
        .collect();
    for (number, error) in &invalid {
        eprintln!("{}: line {number}: {error}", args.file.display());
    }
    let invalid = invalid.len();
    let valid = lines.len() - invalid;
    if valid == 0 {
        return Err(BadInput(format!(
            "{}: no valid request lines ({invalid} invalid); nothing was submitted",
            args.file.display(),
        ))
        .into());
    }
    if invalid > 0 && !args.skip_invalid {
        return Err(BadInput(format!(
            "{}: {invalid} of {} lines are invalid (listed above); nothing was submitted. Fix them, or pass --skip-invalid to submit the {valid} valid lines",
            args.file.display(),
            lines.len()
        ))
        .into());
    }

    // The broker first: when it cannot be reached, nothing is stored.
    let broker = queue::Broker::connect(&settings.broker.url).await?;
    let publisher = super::job_publisher(&broker, &settings).await?;
    let mut conn = match conn {
        Some(conn) => conn,
        None => store::connect_one(&settings.database.url).await?,
    };
    let resume_hint = format!(
        "`batch submit {} --tenant {}{} --resume {batch}` publishes the rest, `batch cancel {batch} --tenant {}` gives them up",
        args.file.display(),
        args.tenant,
        if args.skip_invalid {
            " --skip-invalid"
        } else {
            ""
        },
        args.tenant
    );
    let unpublished: std::collections::HashSet<Uuid> = if args.resume.is_some() {
        resumed_jobs(&mut conn, &args.tenant, &batch, &mut lines, &args.file).await?
    } else {
        let source = args.file.display().to_string();
        // The batch and its items together: a batch without its items could be neither
        // resumed nor cancelled.
        let mut tx = sqlx::Connection::begin(&mut conn).await?;
        batches::create_or_get(
            &mut tx,
            &args.tenant,
            &batch,
            BatchKind::OpenAi,
            &route,
            Some(&source),
            None,
        )
        .await?;
        let items = item_rows(&lines);
        batches::insert_items(&mut tx, &args.tenant, &batch, &items).await?;
        tx.commit().await?;
        items.iter().filter_map(|item| item.job_id).collect()
    };
    let names = Names::new(&settings.broker.prefix);
    let jobs: Vec<&Job> = lines
        .iter()
        .filter_map(|(_, line)| match line {
            Line::Valid { job, .. } if unpublished.contains(&job.id) => Some(job.as_ref()),
            _ => None,
        })
        .collect();
    let mut published = valid - jobs.len();
    for chunk in jobs.chunks(CHUNK) {
        let messages: Vec<Outgoing> = chunk.iter().map(|job| job_message(&names, job)).collect();
        let stopped = |what: &str| {
            format!("{what} batch {batch} after {published} of its {valid} requests; {resume_hint}")
        };
        publisher
            .publish_all(&messages)
            .await
            .with_context(|| stopped("cannot publish"))?;
        let ids: Vec<Uuid> = chunk.iter().map(|job| job.id).collect();
        batches::mark_published(&mut conn, &ids)
            .await
            .with_context(|| stopped("cannot record what was published of"))?;
        published += chunk.len();
    }
    batches::mark_started(&mut conn, &args.tenant, &batch).await?;
    broker.close(200, "submitted").await.ok();
    let mut out = std::io::stdout().lock();
    writeln!(out, "{batch}")?;
    out.flush()?;
    eprintln!(
        "batch: submitted {} request(s) as {batch} (tenant {}, route {route}){}{}",
        jobs.len(),
        args.tenant,
        if jobs.len() < valid {
            format!("; {} were published before", valid - jobs.len())
        } else {
            String::new()
        },
        if invalid == 0 {
            String::new()
        } else {
            format!("; {invalid} invalid line(s) skipped")
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// The batch's items, one per line: a valid line's keyed by its `custom_id`, an invalid one's
/// by its line number (its `custom_id` may be missing or taken), kept so `batch results
/// --errors` can report it.
fn item_rows(lines: &[(usize, Line)]) -> Vec<ItemRow> {
    lines
        .iter()
        .map(|(number, line)| {
            let line_number = i32::try_from(*number).unwrap_or(i32::MAX);
            match line {
                Line::Valid { custom_id, job } => ItemRow {
                    item_key: custom_id.clone(),
                    line: line_number,
                    job_id: Some(job.id),
                    error: None,
                    published: false,
                },
                Line::Invalid { custom_id, error } => ItemRow {
                    item_key: format!("{INVALID_LINE_KEY}{number}"),
                    line: line_number,
                    job_id: None,
                    error: Some(match custom_id {
                        // JSON-quoted, so a tab in the id cannot be taken for the separator.
                        Some(id) => format!(
                            "custom_id={}\t{error}",
                            serde_json::to_string(id).unwrap_or_default()
                        ),
                        None => error.clone(),
                    }),
                    published: false,
                },
            }
        })
        .collect()
}

/// For `batch submit --resume`: gives each valid line of the file the job id its item was
/// stored with, and returns the ids of the jobs not yet published. The file must hold exactly
/// the batch's requests (by `custom_id`), or nothing is published.
async fn resumed_jobs(
    conn: &mut sqlx::PgConnection,
    tenant: &str,
    batch: &str,
    lines: &mut [(usize, Line)],
    file: &std::path::Path,
) -> anyhow::Result<std::collections::HashSet<Uuid>> {
    let items: HashMap<String, batches::ItemResult> =
        batches::items_with_results(conn, tenant, batch)
            .await?
            .into_iter()
            .filter(|i| i.item.job_id.is_some())
            .map(|i| (i.item.item_key.clone(), i))
            .collect();
    let mut matched = 0;
    let mut unpublished = std::collections::HashSet::new();
    for (number, line) in lines.iter_mut() {
        let Line::Valid { custom_id, job } = line else {
            continue;
        };
        let Some(batches::ItemResult { item, result }) = items.get(custom_id.as_str()) else {
            return Err(BadInput(format!(
                "{}: line {number}: custom_id {custom_id:?} is not a request of batch {batch}; resume it with the file it was submitted from",
                file.display()
            ))
            .into());
        };
        matched += 1;
        if let Some(id) = item.job_id {
            job.id = id;
            // A job with a result was published (its mark was lost); sending it again could
            // only run it twice.
            if !item.published && result.is_none() {
                unpublished.insert(id);
            }
        }
    }
    if matched != items.len() {
        return Err(BadInput(format!(
            "{}: {} of batch {batch}'s {} requests are not in this file; resume it with the file it was submitted from",
            file.display(),
            items.len() - matched,
            items.len()
        ))
        .into());
    }
    Ok(unpublished)
}

async fn find_batch(
    conn: &mut sqlx::PgConnection,
    tenant: &str,
    id: &str,
) -> anyhow::Result<BatchRow> {
    batches::find(conn, tenant, id).await?.ok_or_else(|| {
        BadInput(format!(
            "no batch {id:?} for tenant {tenant:?} (batch ids are printed by `batch submit`)"
        ))
        .into()
    })
}

/// The batch's status in OpenAI's vocabulary.
pub fn openai_status(batch: &BatchRow, counts: &Counts) -> &'static str {
    if batch.published_at.is_none() && batch.cancelled_at.is_none() {
        "validating"
    } else if batch.cancelled_at.is_some() {
        if counts.pending() > 0 {
            "cancelling"
        } else {
            "cancelled"
        }
    } else if counts.pending() > 0 {
        "in_progress"
    } else if counts.succeeded == 0 {
        "failed"
    } else {
        "completed"
    }
}

async fn status(
    settings: Settings,
    id: &str,
    tenant: &str,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let mut conn = store::connect_one(&settings.database.url).await?;
    let batch = find_batch(&mut conn, tenant, id).await?;
    let (counts, cost, last) = batches::progress(&mut conn, tenant, id).await?;
    let status = openai_status(&batch, &counts);
    let finished: Option<DateTime<Utc>> = (counts.pending() == 0).then_some(last).flatten();
    let mut out = std::io::stdout().lock();
    if as_json {
        let report = json!({
            "id": batch.id,
            "object": "batch",
            "endpoint": CHAT_COMPLETIONS,
            "tenant": batch.tenant,
            "route": batch.route,
            "input_file": batch.source,
            "status": status,
            "created_at": batch.created_at,
            "in_progress_at": batch.published_at,
            "completed_at": if batch.cancelled_at.is_none() { finished } else { None },
            "cancelled_at": batch.cancelled_at,
            "request_counts": {
                "total": counts.total,
                "completed": counts.succeeded,
                "failed": counts.failed + counts.rejected,
                "cancelled": counts.cancelled,
                "pending": counts.pending(),
                "invalid": counts.invalid,
            },
            "cost_usd": cost.to_string(),
        });
        writeln!(out, "{report}")?;
    } else {
        let time = |t: Option<DateTime<Utc>>| t.map_or_else(|| "-".to_owned(), |t| t.to_rfc3339());
        writeln!(out, "batch     {}", batch.id)?;
        writeln!(out, "status    {status}")?;
        writeln!(
            out,
            "requests  {} total: {} completed, {} failed, {} cancelled, {} pending{}",
            counts.total,
            counts.succeeded,
            counts.failed + counts.rejected,
            counts.cancelled,
            counts.pending(),
            if counts.invalid > 0 {
                format!(" ({} invalid lines not submitted)", counts.invalid)
            } else {
                String::new()
            }
        )?;
        writeln!(out, "cost      ${cost}")?;
        writeln!(out, "tenant    {}  route {}", batch.tenant, batch.route)?;
        writeln!(out, "created   {}", batch.created_at.to_rfc3339())?;
        writeln!(out, "started   {}", time(batch.published_at))?;
        writeln!(out, "finished  {}", time(finished))?;
        if let Some(at) = batch.cancelled_at {
            writeln!(out, "cancelled {}", at.to_rfc3339())?;
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// One line of the OpenAI Batch output (and error) file.
fn output_line(
    custom_id: &str,
    job_id: Option<Uuid>,
    result: Option<&JobResult>,
    invalid: Option<&str>,
) -> Value {
    let id = format!(
        "batch_req_{}",
        job_id.map_or_else(
            || Uuid::now_v7().simple().to_string(),
            |id| id.simple().to_string()
        )
    );
    match (result, invalid) {
        (Some(result), _) if result.status == JobStatus::Succeeded => json!({
            "id": id,
            "custom_id": custom_id,
            "response": {
                "status_code": 200,
                "request_id": result.job_id.to_string(),
                "body": result.response,
            },
            "error": null,
        }),
        (Some(result), _) => {
            let (code, message) = result.error.as_ref().map_or_else(
                || (result.status.as_str().to_owned(), String::new()),
                |e| (e.code.clone(), e.message.clone()),
            );
            json!({ "id": id, "custom_id": custom_id, "response": null,
                    "error": { "code": code, "message": message } })
        }
        (None, Some(error)) => json!({ "id": id, "custom_id": custom_id, "response": null,
                                       "error": { "code": "invalid_request", "message": error } }),
        (None, None) => json!({ "id": id, "custom_id": custom_id, "response": null,
                                "error": { "code": "pending", "message": "no result yet" } }),
    }
}

fn create(path: &std::path::Path) -> anyhow::Result<Box<dyn Write>> {
    if path.as_os_str() == "-" {
        return Ok(Box::new(std::io::stdout().lock()));
    }
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    Ok(Box::new(std::io::BufWriter::new(file)))
}

async fn results_file(settings: Settings, args: BatchResultsArgs) -> anyhow::Result<ExitCode> {
    let mut conn = store::connect_one(&settings.database.url).await?;
    find_batch(&mut conn, &args.tenant, &args.id).await?;
    let items = batches::items_with_results(&mut conn, &args.tenant, &args.id).await?;
    let mut out = create(&args.out)?;
    let mut errors = args.errors.as_deref().map(create).transpose()?;
    let (mut written, mut failed, mut pending) = (0u64, 0u64, 0u64);
    for entry in &items {
        let item = &entry.item;
        match (&entry.result, &item.error) {
            (None, Some(error)) => {
                // A line that never ran: only in the error file.
                if let Some(errors) = errors.as_mut() {
                    let (custom_id, message) = invalid_line_error(error);
                    let line = output_line(
                        &custom_id,
                        None,
                        None,
                        Some(&format!("line {}: {message}", item.line)),
                    );
                    writeln!(errors, "{line}")?;
                }
            }
            (None, None) => pending += 1,
            (Some(result), _) => {
                let line = output_line(&item.item_key, item.job_id, Some(result), None);
                if result.status == JobStatus::Succeeded {
                    writeln!(out, "{line}")?;
                    written += 1;
                } else {
                    failed += 1;
                    match errors.as_mut() {
                        Some(errors) => writeln!(errors, "{line}")?,
                        None => {
                            writeln!(out, "{line}")?;
                            written += 1;
                        }
                    }
                }
            }
        }
    }
    out.flush()?;
    if let Some(errors) = errors.as_mut() {
        errors.flush()?;
    }
    eprintln!(
        "batch: {written} line(s) written to {}, {failed} failed{}",
        args.out.display(),
        if pending > 0 {
            format!(
                "; {pending} request(s) have no result yet (run again when `batch status` says completed)"
            )
        } else {
            String::new()
        }
    );
    Ok(if pending > 0 {
        ExitCode::from(EXIT_JOBS_FAILED)
    } else {
        ExitCode::SUCCESS
    })
}

async fn cancel(settings: Settings, id: &str, tenant: &str) -> anyhow::Result<ExitCode> {
    let mut conn = store::connect_one(&settings.database.url).await?;
    let batch = find_batch(&mut conn, tenant, id).await?;
    if batch.cancelled_at.is_none() {
        let (counts, _, _) = batches::progress(&mut conn, tenant, id).await?;
        if counts.pending() == 0 {
            return Err(BadInput(format!(
                "batch {id} has finished ({} completed, {} failed); there is nothing to cancel",
                counts.succeeded,
                counts.failed + counts.rejected
            ))
            .into());
        }
    }
    let mut tx = sqlx::Connection::begin(&mut conn).await?;
    let unstarted = batches::cancel(&mut tx, tenant, id).await?;
    let now = Utc::now();
    let cancelled: Vec<JobResult> = unstarted
        .iter()
        .map(|job| JobResult {
            schema: RESULT_SCHEMA.to_owned(),
            job_id: job.job_id,
            generation: 0,
            tenant: Some(tenant.to_owned()),
            batch: Some(id.to_owned()),
            route: Some(batch.route.clone()),
            status: JobStatus::Cancelled,
            response: None,
            provider: None,
            model: None,
            attempts: Vec::new(),
            error: Some(JobError::new(
                "cancelled",
                format!("batch {id} was cancelled before this request started"),
            )),
            cost: CostSummary::default(),
            timings: Timings::instant(now),
            metadata: Some(json!({ "custom_id": job.item_key })),
            retention: None,
        })
        .collect();
    let bodies: Vec<String> = cancelled
        .iter()
        .map(serde_json::to_string)
        .collect::<Result<_, _>>()?;
    let heads: Vec<ResultHead> = cancelled.iter().map(JobResult::head).collect();
    let refs: Vec<(&ResultHead, &str)> = heads
        .iter()
        .zip(&bodies)
        .map(|(head, body)| (head, body.as_str()))
        .collect();
    // Results first, as a finalize group writes them (so the two never wait on each other's
    // rows in opposite order). A job a worker finished meanwhile keeps its own result and
    // row, and is not counted as cancelled.
    let placed: std::collections::HashSet<Uuid> = results::insert_many(&mut tx, &refs, now)
        .await?
        .into_iter()
        .collect();
    let cancelled: Vec<&JobResult> = cancelled
        .iter()
        .filter(|result| placed.contains(&result.job_id))
        .collect();
    let rows: Vec<JobRow> = cancelled
        .iter()
        .map(|result| JobRow {
            id: result.job_id,
            tenant: Some(tenant.to_owned()),
            batch: Some(id.to_owned()),
            route: Some(batch.route.clone()),
            generation: 0,
            status: JobStatus::Cancelled,
            request: None,
            request_sha256: None,
            raw_body: None,
            received_at: now,
            finished_at: now,
        })
        .collect();
    jobs::insert_many(&mut tx, &rows.iter().collect::<Vec<_>>()).await?;
    let mut event = AuditEvent::new(
        tenant,
        None,
        "batch_cancelled",
        now,
        json!({ "batch": id, "cancelled_jobs": cancelled.len(), "by": super::replay::actor() }),
    );
    event.provenance = crate::audit::Identity::new(&settings).provenance();
    audit::insert_many(&mut tx, &[&event]).await?;
    tx.commit().await?;
    let (counts, cost, _) = batches::progress(&mut conn, tenant, id).await?;
    eprintln!(
        "batch: cancelled {} request(s) that had not started; {} already finished; {} still running will keep their results; cost so far ${cost}",
        cancelled.len(),
        counts.succeeded + counts.failed + counts.rejected,
        counts.pending()
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The workers' default `worker.max_message_bytes`.
    const LIMIT: usize = 4 * 1024 * 1024;

    /// A line far over the workers' limit (here a 300 KB run of bytes with no newline where
    /// 1 KB is allowed) is reported by number without being read into memory, and the lines
    /// after it are read as usual.
    #[test]
    fn a_line_far_too_long_is_skipped_unread_and_the_next_line_still_counts() {
        let valid = r#"{"custom_id":"after","method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"hi"}]}}"#;
        let mut text = vec![b'x'; 300_000];
        text.push(b'\n');
        text.extend_from_slice(valid.as_bytes());
        text.extend_from_slice(b"\n");
        text.extend_from_slice(&vec![b'y'; 300_000]);
        let lines = parse_file(text.as_slice(), "acme", "b", "default", 1000).unwrap();
        assert_eq!(lines.len(), 3);
        let Line::Invalid { error, custom_id } = &lines[0].1 else {
            panic!("the long line is invalid")
        };
        assert_eq!((lines[0].0, custom_id), (1, &None));
        assert!(error.contains("not read"), "{error}");
        assert!(
            matches!(&lines[1], (2, Line::Valid { custom_id, .. }) if custom_id == "after"),
            "{:?}",
            lines[1].0
        );
        assert!(
            matches!(&lines[2], (3, Line::Invalid { error, .. }) if error.contains("not read"))
        );
    }

    /// An invalid line's `custom_id` comes back whole from its stored error, a tab in it
    /// included, and so does an id stored before ids were quoted.
    #[test]
    fn an_invalid_lines_custom_id_survives_being_stored_with_its_error() {
        let lines = vec![(
            4,
            Line::Invalid {
                error: "body: missing".to_owned(),
                custom_id: Some("a\tb".to_owned()),
            },
        )];
        let stored = item_rows(&lines)[0].error.clone().unwrap();
        assert_eq!(
            invalid_line_error(&stored),
            ("a\tb".to_owned(), "body: missing")
        );
        assert_eq!(
            invalid_line_error("custom_id=old\tbody: missing"),
            ("old".to_owned(), "body: missing")
        );
        assert_eq!(
            invalid_line_error("not UTF-8 text"),
            (String::new(), "not UTF-8 text")
        );
    }

    /// A request the workers would reject unread for its size is an invalid line, reported by
    /// number: published, it would never be answered into its batch.
    #[test]
    fn a_line_too_large_for_the_workers_is_an_invalid_line() {
        let line = |id: &str, text: &str| {
            format!(
                r#"{{"custom_id":"{id}","method":"POST","url":"/v1/chat/completions","body":{{"messages":[{{"role":"user","content":"{text}"}}]}}}}"#
            )
        };
        let text = format!(
            "{}\n{}\n",
            line("small", "hi"),
            line("big", &"x".repeat(2000))
        );
        let lines = parse_file(text.as_bytes(), "acme", "b", "default", 1500).unwrap();
        assert!(matches!(&lines[0].1, Line::Valid { custom_id, .. } if custom_id == "small"));
        let Line::Invalid { error, custom_id } = &lines[1].1 else {
            panic!("a line over the limit is invalid")
        };
        assert_eq!(custom_id.as_deref(), Some("big"));
        assert!(
            error.contains("over worker.max_message_bytes (1500)"),
            "{error}"
        );
    }

    fn parse(text: &str) -> Line {
        parse_line(text, "acme", "batch_x", "default")
    }

    fn error_of(text: &str) -> String {
        match parse(text) {
            Line::Invalid { error, .. } => error,
            Line::Valid { .. } => panic!("{text} should be invalid"),
        }
    }

    #[test]
    fn a_valid_line_becomes_a_job_carrying_its_custom_id() {
        let line = r#"{"custom_id":"r-1","method":"POST","url":"/v1/chat/completions","body":{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"max_tokens":5}}"#;
        let Line::Valid { custom_id, job } = parse(line) else {
            panic!("valid")
        };
        assert_eq!(custom_id, "r-1");
        assert_eq!(job.batch.as_deref(), Some("batch_x"));
        assert_eq!(job.request.max_tokens, Some(5));
        assert_eq!(job.metadata.unwrap()["custom_id"], "r-1");
    }

    #[test]
    fn invalid_lines_name_the_field() {
        let ok_body = r#""body":{"messages":[{"role":"user","content":"hi"}]}"#;
        assert!(error_of("{nope").starts_with("not valid JSON"));
        assert!(error_of("[1]").starts_with("expected a JSON object"));
        assert_eq!(
            error_of(&format!(
                r#"{{"method":"POST","url":"/v1/chat/completions",{ok_body}}}"#
            )),
            "custom_id: missing"
        );
        assert!(
            error_of(&format!(
                r#"{{"custom_id":7,"method":"POST","url":"/v1/chat/completions",{ok_body}}}"#
            ))
            .starts_with("custom_id: must be a string")
        );
        assert!(
            error_of(&format!(
                r#"{{"custom_id":"a","method":"GET","url":"/v1/chat/completions",{ok_body}}}"#
            ))
            .starts_with("method:")
        );
        assert!(
            error_of(&format!(
                r#"{{"custom_id":"a","method":"POST","url":"/v1/embeddings",{ok_body}}}"#
            ))
            .starts_with("url: only")
        );
        assert!(
            error_of(r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"messages":[]}}"#)
                .starts_with("body.messages:"),
        );
        assert!(
            error_of(r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"x"}],"max_tokens":-1}}"#)
                .starts_with("body.max_tokens:"),
        );
        assert!(
            error_of(&format!(r#"{{"custom_id":"a","method":"POST","url":"/v1/chat/completions",{ok_body},"extra":1}}"#))
                .starts_with("extra: unknown field")
        );
    }

    #[test]
    fn duplicate_custom_ids_are_reported_against_the_first_line() {
        let line = r#"{"custom_id":"same","method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"hi"}]}}"#;
        let text = format!("{line}\n\n{line}\n");
        let lines = parse_file(text.as_bytes(), "acme", "b", "default", LIMIT).unwrap();
        assert_eq!(lines.len(), 2);
        assert!(matches!(lines[0].1, Line::Valid { .. }));
        assert_eq!(lines[1].0, 3);
        let Line::Invalid { error, .. } = &lines[1].1 else {
            panic!("duplicate")
        };
        assert_eq!(error, "custom_id: \"same\" duplicates line 1");
    }

    /// A line that is not UTF-8 is one invalid line, reported by number like the others (so
    /// `--skip-invalid` submits the rest); a `custom_id` shaped like an invalid line's key is
    /// refused, since that key would take its row.
    #[test]
    fn a_line_not_in_utf8_and_a_custom_id_like_an_invalid_lines_key_are_invalid_lines() {
        let line = |id: &str| {
            format!(
                r#"{{"custom_id":"{id}","method":"POST","url":"/v1/chat/completions","body":{{"messages":[{{"role":"user","content":"hi"}}]}}}}"#
            )
        };
        let mut text = format!("{}\r\n", line("a")).into_bytes();
        text.extend_from_slice(b"{\"custom_id\":\"\xff\xfe\"}\n");
        text.extend_from_slice(format!("{}\n{}\n", line("#line-2"), line("b")).as_bytes());
        let lines = parse_file(text.as_slice(), "acme", "b", "default", LIMIT).unwrap();
        let summary: Vec<(usize, Result<String, String>)> = lines
            .into_iter()
            .map(|(n, line)| match line {
                Line::Valid { custom_id, .. } => (n, Ok(custom_id)),
                Line::Invalid { error, .. } => (n, Err(error)),
            })
            .collect();
        assert_eq!(
            summary,
            [
                (1, Ok("a".to_owned())),
                (2, Err("not UTF-8 text".to_owned())),
                (
                    3,
                    Err("custom_id: \"#line-2\" may not start with \"#line-\", which names invalid lines".to_owned())
                ),
                (4, Ok("b".to_owned())),
            ]
        );
    }
}
