//! The JSON Schemas of `schemas/`, embedded and compiled once, with error reports that name
//! the offending field.

use std::sync::LazyLock;

use jsonschema::Validator;
use serde_json::Value;

/// The schemas shipped in `schemas/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schema {
    Job,
    Result,
    CostEvent,
    AuditEvent,
    StreamChunk,
}

/// A schema violation: which field (JSON pointer) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (at {path})")]
pub struct SchemaViolation {
    /// JSON pointer into the instance; `/` for the document itself.
    pub path: String,
    pub message: String,
}

#[expect(
    clippy::expect_used,
    reason = "the schemas are embedded at build time and `schemas_compile` tests them; a bad one is a build defect, not bad input"
)]
fn compile(text: &str) -> Validator {
    let schema: Value = serde_json::from_str(text).expect("embedded schema is JSON");
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("embedded schema compiles")
}

static JOB: LazyLock<Validator> =
    LazyLock::new(|| compile(include_str!("../../schemas/job.v1.json")));
static RESULT: LazyLock<Validator> =
    LazyLock::new(|| compile(include_str!("../../schemas/result.v1.json")));
static COST_EVENT: LazyLock<Validator> =
    LazyLock::new(|| compile(include_str!("../../schemas/cost_event.v1.json")));
static STREAM_CHUNK: LazyLock<Validator> =
    LazyLock::new(|| compile(include_str!("../../schemas/stream_chunk.v1.json")));
static AUDIT_EVENT: LazyLock<Validator> =
    LazyLock::new(|| compile(include_str!("../../schemas/audit_event.v1.json")));

impl Schema {
    fn validator(self) -> &'static Validator {
        match self {
            Schema::Job => &JOB,
            Schema::Result => &RESULT,
            Schema::CostEvent => &COST_EVENT,
            Schema::AuditEvent => &AUDIT_EVENT,
            Schema::StreamChunk => &STREAM_CHUNK,
        }
    }

    /// Checks `instance`, reporting the first violation found.
    pub fn validate(self, instance: &Value) -> Result<(), SchemaViolation> {
        match self.validator().iter_errors(instance).next() {
            None => Ok(()),
            Some(error) => {
                let path = error.instance_path().to_string();
                Err(SchemaViolation {
                    path: if path.is_empty() {
                        "/".to_owned()
                    } else {
                        path
                    },
                    message: error.to_string(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn schemas_compile() {
        for (name, text) in [
            ("job", include_str!("../../schemas/job.v1.json")),
            ("result", include_str!("../../schemas/result.v1.json")),
            ("cost", include_str!("../../schemas/cost_event.v1.json")),
            ("audit", include_str!("../../schemas/audit_event.v1.json")),
            ("stream", include_str!("../../schemas/stream_chunk.v1.json")),
        ] {
            let schema: Value = serde_json::from_str(text).unwrap();
            assert!(
                jsonschema::validator_for(&schema).is_ok(),
                "{name} schema does not compile"
            );
        }
    }

    fn job() -> Value {
        json!({
            "schema": "switchyard.job.v1",
            "id": "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
            "tenant": "acme",
            "route": "default",
            "request": {"messages": [{"role": "user", "content": "hi"}]}
        })
    }

    #[test]
    fn a_valid_job_passes() {
        assert_eq!(Schema::Job.validate(&job()), Ok(()));
    }

    #[test]
    fn a_wrong_type_names_the_field() {
        let mut bad = job();
        bad["request"]["max_tokens"] = json!("many");
        let err = Schema::Job.validate(&bad).unwrap_err();
        assert_eq!(err.path, "/request/max_tokens");
    }

    #[test]
    fn a_missing_tenant_is_named() {
        let mut bad = job();
        bad.as_object_mut().unwrap().remove("tenant");
        let err = Schema::Job.validate(&bad).unwrap_err();
        assert!(err.message.contains("tenant"), "{err}");
    }

    #[test]
    fn a_tenant_with_a_dot_is_rejected_because_it_would_break_routing_keys() {
        let mut bad = job();
        bad["tenant"] = json!("a.b");
        let err = Schema::Job.validate(&bad).unwrap_err();
        assert_eq!(err.path, "/tenant");
    }
}
