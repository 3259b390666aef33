//! Turns a raw delivery body into a [`Job`], or into a [`Rejection`] that says exactly what is
//! wrong with it. Never panics and never blocks on bad input.

use serde_json::Value;
use uuid::Uuid;

use crate::messages::schema::Schema;
use crate::messages::{Job, JobError};

/// Most bytes of an unusable body kept in Postgres for inspection (the dead-letter queue
/// keeps the whole message).
pub const RAW_BODY_KEEP: usize = 64 * 1024;

/// A message that cannot become a job, with what could be salvaged from it.
#[derive(Debug, Clone)]
pub struct Rejection {
    /// The job's own id when it had a valid one, else the AMQP `message_id` when that is a
    /// UUID, else a fresh id.
    pub job_id: Uuid,
    pub tenant: Option<String>,
    pub batch: Option<String>,
    pub route: Option<String>,
    /// The job's generation when it was readable (0 otherwise).
    pub generation: i32,
    pub error: JobError,
    pub raw_body: Vec<u8>,
}

/// Whether `value` is a valid tenant or batch name: 1–128 of `[A-Za-z0-9_-]`, so it is a safe
/// routing-key segment.
pub fn is_name(value: &str) -> bool {
    (1..=128).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Rejection {
    fn new(body: &[u8], parsed: Option<&Value>, message_id: Option<&str>, error: JobError) -> Self {
        let field = |name: &str| parsed.and_then(|v| v.get(name)).and_then(Value::as_str);
        // An `id` that is not a UUID falls back to the message id, like a missing one.
        let job_id = field("id")
            .and_then(|id| Uuid::parse_str(id).ok())
            .or_else(|| message_id.and_then(|id| Uuid::parse_str(id).ok()))
            .unwrap_or_else(Uuid::now_v7);
        // Only names that are safe routing-key segments are echoed back.
        let name = |key: &str| field(key).filter(|v| is_name(v)).map(str::to_owned);
        Self {
            job_id,
            tenant: name("tenant"),
            batch: name("batch"),
            route: field("route").map(|r| crate::providers::excerpt(r, 128)),
            generation: parsed
                .and_then(|v| v.get("generation"))
                .and_then(Value::as_i64)
                .and_then(|g| i32::try_from(g).ok())
                .filter(|g| *g >= 0)
                .unwrap_or(0),
            error,
            raw_body: body[..body.len().min(RAW_BODY_KEEP)].to_vec(),
        }
    }

    /// A rejection for a job that parsed but cannot be served (e.g. its route is unknown).
    pub fn for_job(job: &Job, body: &[u8], error: JobError) -> Self {
        Self {
            job_id: job.id,
            tenant: Some(job.tenant.clone()),
            batch: job.batch.clone(),
            route: Some(job.route.clone()),
            generation: job.generation,
            error,
            raw_body: body[..body.len().min(RAW_BODY_KEEP)].to_vec(),
        }
    }
}

/// Parses and validates one delivery body against `schemas/job.v1.json`.
pub fn ingest(
    body: &[u8],
    message_id: Option<&str>,
    max_bytes: usize,
) -> Result<Job, Box<Rejection>> {
    let reject = |parsed: Option<&Value>, error: JobError| {
        Box::new(Rejection::new(body, parsed, message_id, error))
    };
    if body.len() > max_bytes {
        return Err(reject(
            None,
            JobError::new(
                "too_large",
                format!(
                    "message body is {} bytes; the limit is {max_bytes}",
                    body.len()
                ),
            ),
        ));
    }
    let text = std::str::from_utf8(body).map_err(|e| {
        reject(
            None,
            JobError::new("invalid_utf8", format!("message body is not UTF-8: {e}")),
        )
    })?;
    let value: Value = serde_json::from_str(text).map_err(|e| {
        reject(
            None,
            JobError::new("invalid_json", format!("message body is not JSON: {e}")),
        )
    })?;
    if let Err(violation) = Schema::Job.validate(&value) {
        return Err(reject(
            Some(&value),
            JobError {
                code: "schema_violation".to_owned(),
                message: format!(
                    "job does not match job.v1 schema at {}: {}",
                    violation.path, violation.message
                ),
                path: Some(violation.path),
            },
        ));
    }
    if contains_nul(&value) {
        return Err(reject(
            Some(&value),
            JobError::new(
                "invalid_text",
                "job contains a NUL character (\\u0000), which cannot be stored or sent to providers",
            ),
        ));
    }
    if let Some(error) = invalid_image(&value) {
        return Err(reject(Some(&value), error));
    }
    // Deserialized from the borrowed tree: no copy of the whole message per job.
    <Job as serde::Deserialize>::deserialize(&value).map_err(|e| {
        reject(
            Some(&value),
            JobError::new(
                "schema_violation",
                format!("job does not match job.v1 schema: {e}"),
            ),
        )
    })
}

/// The first image part whose `data:` URL does not decode (or that has no URL), so a broken
/// image is a clear rejection rather than a provider's `invalid_request` after a paid route.
fn invalid_image(job: &Value) -> Option<JobError> {
    let messages = job.pointer("/request/messages")?.as_array()?;
    for (m, message) in messages.iter().enumerate() {
        let Some(parts) = message.get("content").and_then(Value::as_array) else {
            continue;
        };
        for (p, part) in parts.iter().enumerate() {
            if part.get("type").and_then(Value::as_str) != Some("image_url") {
                continue;
            }
            let path = format!("/request/messages/{m}/content/{p}/image_url/url");
            let problem = match part.pointer("/image_url/url").and_then(Value::as_str) {
                None => {
                    Some("an image_url part needs image_url.url (an https or data: URL)".to_owned())
                }
                Some(url) if url.starts_with("data:") => {
                    crate::providers::images::parse_data_url(url).err()
                }
                Some(_) => None,
            };
            if let Some(problem) = problem {
                return Some(JobError {
                    code: "invalid_image".to_owned(),
                    message: format!("{path}: {problem}"),
                    path: Some(path),
                });
            }
        }
    }
    None
}

fn contains_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(contains_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ID: &str = "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b";

    fn job() -> Value {
        json!({
            "schema": "switchyard.job.v1", "id": ID, "tenant": "acme", "batch": "b1", "route": "default",
            "request": {"messages": [{"role": "user", "content": "hello"}]}
        })
    }

    fn bytes(value: &Value) -> Vec<u8> {
        serde_json::to_vec(value).unwrap()
    }

    #[test]
    fn a_valid_job_is_accepted() {
        let job = ingest(&bytes(&job()), None, 1 << 20).unwrap();
        assert_eq!(job.id.to_string(), ID);
        assert_eq!(job.batch.as_deref(), Some("b1"));
    }

    #[test]
    fn an_oversize_body_is_rejected_before_parsing() {
        let err = ingest(&bytes(&job()), None, 10).unwrap_err();
        assert_eq!(err.error.code, "too_large");
    }

    #[test]
    fn invalid_utf8_is_rejected_and_the_message_id_kept() {
        let err = ingest(b"{\"a\": \"\xff\"}", Some(ID), 1 << 20).unwrap_err();
        assert_eq!(err.error.code, "invalid_utf8");
        assert_eq!(err.job_id.to_string(), ID);
    }

    #[test]
    fn an_id_that_is_not_a_uuid_falls_back_to_the_message_id() {
        let mut bad = job();
        bad["id"] = json!("job-1");
        let err = ingest(&bytes(&bad), Some(ID), 1 << 20).unwrap_err();
        assert_eq!(err.error.path.as_deref(), Some("/id"));
        assert_eq!(err.job_id.to_string(), ID);
    }

    #[test]
    fn not_json_is_rejected() {
        let err = ingest(b"hello there", None, 1 << 20).unwrap_err();
        assert_eq!(err.error.code, "invalid_json");
        assert_eq!(err.raw_body, b"hello there");
    }

    #[test]
    fn a_schema_violation_names_the_field_and_keeps_tenant_and_batch() {
        let mut bad = job();
        bad["request"]["messages"] = json!([]);
        let err = ingest(&bytes(&bad), None, 1 << 20).unwrap_err();
        assert_eq!(err.error.code, "schema_violation");
        assert_eq!(err.error.path.as_deref(), Some("/request/messages"));
        assert_eq!(err.tenant.as_deref(), Some("acme"));
        assert_eq!(err.job_id.to_string(), ID);
    }

    #[test]
    fn a_tenant_that_would_break_routing_keys_is_not_echoed() {
        let mut bad = job();
        bad["tenant"] = json!("a.#");
        let err = ingest(&bytes(&bad), None, 1 << 20).unwrap_err();
        assert_eq!(err.tenant, None);
    }

    #[test]
    fn a_nul_character_is_rejected_because_postgres_cannot_store_it() {
        let mut bad = job();
        bad["request"]["messages"][0]["content"] = json!("a\u{0}b");
        let err = ingest(&bytes(&bad), None, 1 << 20).unwrap_err();
        assert_eq!(err.error.code, "invalid_text");
    }

    #[test]
    fn an_image_whose_data_url_does_not_decode_is_rejected_with_its_path() {
        let mut bad = job();
        bad["request"]["messages"][0]["content"] = json!([
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@not-base64"}}
        ]);
        let err = ingest(&bytes(&bad), None, 1 << 20).unwrap_err();
        assert_eq!(err.error.code, "invalid_image");
        assert_eq!(
            err.error.path.as_deref(),
            Some("/request/messages/0/content/1/image_url/url")
        );
        bad["request"]["messages"][0]["content"][1]["image_url"]["url"] =
            json!("data:image/png;base64,iVBORw0KGgo=");
        assert!(ingest(&bytes(&bad), None, 1 << 20).is_ok());
    }

    #[test]
    fn deeply_nested_json_is_rejected_not_a_stack_overflow() {
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        let err = ingest(deep.as_bytes(), None, 1 << 20).unwrap_err();
        assert_eq!(err.error.code, "invalid_json");
    }
}
