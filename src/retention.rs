//! Per-tenant retention: what Postgres keeps of a job's prompt and output.
//!
//! - `full` keeps the request (`jobs.request`) and the result as published (`results.body`).
//! - `hash` keeps `jobs.request_sha256` instead of the request, and a result whose
//!   `response.choices` is empty, with `retention.output_sha256` the digest of the choices.
//! - `none` keeps neither, nor any digest of them (a digest of a short prompt can be
//!   confirmed by guessing).
//!
//! Under `hash` and `none` a rejected message's raw body is not kept either, and the stored
//! and audited rejection message is reduced to its code and field, because a schema error
//! can quote the input. Provider error messages are kept: they are the provider's words.
//!
//! The published result always carries the output. A redelivered duplicate is answered
//! from Postgres, so under `hash`/`none` it gets the stored copy: `status` and usage as
//! before, no output, and a `retention` object saying so. The subscriber already received the
//! output under the same `message_id` (a duplicate is only ever answered after the first
//! result was committed and published).

use serde_json::Value;

use crate::audit::sha256_hex;
use crate::config::Retention;
use crate::messages::{JobStatus, Retained};
use crate::stages::finalize::FinishedJob;

/// Drops from `job`'s rows (not from what it publishes) what `mode` does not keep.
pub fn apply(job: &mut FinishedJob, mode: Retention) {
    if mode == Retention::Full {
        return;
    }
    let request = job.job.request.take();
    job.job.raw_body = None;
    let request_sha256 = (mode == Retention::Hash).then(|| match (&request, &job.dead_letter) {
        // The same digest as the `request_sha256` of the job's audit events.
        (Some(request), _) => sha256_hex(request.get().as_bytes()),
        (None, Some(original)) => sha256_hex(original),
        (None, None) => sha256_hex(b""),
    });
    job.job.request_sha256 = request_sha256.clone();

    let mut stored = job.result.clone();
    let mut output_sha256 = None;
    if let Some(Value::Object(response)) = &mut stored.response
        && let Some(choices) = response.get_mut("choices")
    {
        if mode == Retention::Hash {
            output_sha256 = Some(sha256_hex(choices.to_string().as_bytes()));
        }
        *choices = Value::Array(Vec::new());
    }
    let rejected = stored.status == JobStatus::Rejected;
    if rejected && let Some(error) = &mut stored.error {
        error.message = withheld(&error.code, error.path.as_deref(), mode);
    }
    stored.retention = Some(Retained {
        mode: mode.as_str().to_owned(),
        output_sha256,
        request_sha256,
    });
    job.stored = Some(Box::new(stored));
    apply_to_audits(&mut job.audits, mode, rejected);
}

/// Drops from audit events what `mode` does not keep: under `none` the request's digest;
/// under `hash` and `none` a rejection's message (`rejected`), which can quote the input.
/// Also for the events of a refused message, which has no job rows to apply [`apply`] to.
pub fn apply_to_audits(
    audits: &mut [crate::messages::AuditEvent],
    mode: Retention,
    rejected: bool,
) {
    if mode == Retention::Full {
        return;
    }
    for event in audits {
        let Value::Object(details) = &mut event.details else {
            continue;
        };
        if mode == Retention::None {
            details.remove("request_sha256");
        }
        if rejected && let Some(Value::Object(error)) = details.get_mut("error") {
            let code = error
                .get("code")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            let path = error.get("path").and_then(Value::as_str).map(str::to_owned);
            error.insert(
                "message".to_owned(),
                Value::String(withheld(&code, path.as_deref(), mode)),
            );
        }
    }
}

fn withheld(code: &str, path: Option<&str>, mode: Retention) -> String {
    let at = path.map(|p| format!(" at {p}")).unwrap_or_default();
    format!(
        "{code}{at} (details withheld: retention {}; the published result carries them)",
        mode.as_str()
    )
}
