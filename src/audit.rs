//! The tamper-evident audit trail: who wrote each event ([`Identity`], [`Provenance`]), the
//! per-tenant hash chain over `audit_events` ([`row_hash`]) and its verification
//! ([`verify`], behind `switchyard audit verify`).
//!
//! Each tenant's events are numbered `seq` = 1, 2, 3, … and each row stores `prev_hash` (the
//! `hash` of the tenant's previous row, [`GENESIS`] for the first) and `hash` = SHA-256 over
//! the canonical serialisation of the row (every column but `hash`). `audit_chain_heads` holds
//! each chain's last `seq` and `hash`: a finalize transaction locks the heads of its group's
//! tenants once (`store::group::write_outbox_then_lock_heads`, or `store::audit::insert_many`
//! for other writers) and appends with `store::audit::append_locked`, so chaining costs two
//! statements per group (one of them shared with the outbox), not a lock per event. Editing a row breaks its own hash; deleting one leaves a gap
//! in `seq` and a `prev_hash` that matches nothing; deleting the last rows leaves the head
//! pointing past the end.

use chrono::{DateTime, SecondsFormat, Utc};
use futures::TryStreamExt;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::config::Settings;
use crate::messages::{AuditEvent, Provenance};
use crate::store::audit::{self as store, ChainRow};

/// `prev_hash` of a chain's first row.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The AMQP header carrying W3C trace context.
pub const TRACEPARENT: &str = "traceparent";

/// The running process, as recorded in every event it writes.
#[derive(Debug, Clone)]
pub struct Identity {
    pub worker_id: String,
    pub version: &'static str,
    pub config_sha256: String,
}

impl Identity {
    /// This process: `<host>:<pid>:<random>`, the crate version, and the settings' hash.
    pub fn new(settings: &Settings) -> Self {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_owned());
        let random = Uuid::now_v7().simple().to_string();
        Self {
            worker_id: format!("{host}:{}:{}", std::process::id(), &random[20..]),
            version: env!("CARGO_PKG_VERSION"),
            config_sha256: config_sha256(settings),
        }
    }

    /// Provenance of an event about no particular message.
    pub fn provenance(&self) -> Provenance {
        Provenance {
            worker_id: Some(self.worker_id.clone()),
            version: Some(self.version.to_owned()),
            config_sha256: Some(self.config_sha256.clone()),
            message_sha256: None,
            trace_id: None,
        }
    }

    /// Provenance of events about one delivered message: its body's hash (not under
    /// retention `none`, which keeps no digest of the prompt: the message holds it) and the
    /// trace id of its `traceparent` header (see [`delivery_trace_id`]).
    pub fn for_delivery(
        &self,
        message_sha256: String,
        trace_id: Option<String>,
        retention: crate::config::Retention,
    ) -> Provenance {
        Provenance {
            message_sha256: (retention != crate::config::Retention::None).then_some(message_sha256),
            trace_id,
            ..self.provenance()
        }
    }
}

/// The trace id of a delivery's `traceparent` header, when it is valid.
pub fn delivery_trace_id(headers: Option<&lapin::types::FieldTable>) -> Option<String> {
    headers
        .and_then(|h| crate::queue::header_text(h, TRACEPARENT))
        .and_then(|value| trace_id_of(&value))
}

/// Sets `provenance` on every event; a missing trace id becomes the job id's 32 hex digits,
/// so every redelivery of a job shares one trace id.
pub fn stamp(events: &mut [AuditEvent], provenance: &Provenance, job_id: Uuid) {
    for event in events {
        event.provenance = provenance.clone();
        if event.provenance.trace_id.is_none() {
            event.provenance.trace_id = Some(job_id.simple().to_string());
        }
    }
}

/// A `traceparent` header value (`00-<trace id>-<span id>-<flags>`) for a new trace whose id
/// is the job id, so the trace and the job are found by the same 128 bits.
pub fn traceparent_for(job_id: Uuid) -> String {
    let span = &Uuid::now_v7().simple().to_string()[16..];
    format!("00-{}-{span}-01", job_id.simple())
}

/// The trace id of a W3C `traceparent` value, if it is well formed and not all zeros.
pub fn trace_id_of(traceparent: &str) -> Option<String> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, span) = (parts.next()?, parts.next()?, parts.next()?);
    let _flags = parts.next()?;
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    (hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && hex(span, 16)
        && trace.bytes().any(|b| b != b'0'))
    .then(|| trace.to_owned())
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// SHA-256 of the effective settings without secrets: passwords in the broker and database
/// URLs are removed (API keys are never in settings, only the names of their variables).
pub fn config_sha256(settings: &Settings) -> String {
    let mut value = serde_json::to_value(settings).unwrap_or(Value::Null);
    for (section, field) in [("broker", "url"), ("database", "url")] {
        if let Some(Value::String(url)) = value.get_mut(section).and_then(|s| s.get_mut(field)) {
            *url = without_password(url);
        }
    }
    sha256_hex(canonical(&value).as_bytes())
}

fn without_password(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(None);
            }
            parsed.to_string()
        }
        // Unparseable: keep nothing of it rather than risk a secret.
        Err(_) => String::new(),
    }
}

/// Canonical JSON: object keys sorted by their UTF-8 bytes, no whitespace, strings and numbers
/// as `serde_json` writes them. The row keeps the value's text (`json`), and a `jsonb` round
/// trip would keep the value too, so the hash of a row read back from Postgres equals the hash
/// computed before it was written.
pub fn canonical(value: &Value) -> String {
    let mut out = Vec::new();
    write_canonical(value, &mut out);
    // serde_json writes UTF-8 only.
    String::from_utf8(out).unwrap_or_default()
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_scalar(key, out);
                out.push(b':');
                write_canonical(item, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        other => write_scalar(other, out),
    }
}

/// A string, number, bool or null as serde_json writes it (writing to a `Vec` cannot fail).
fn write_scalar<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) {
    let _ = serde_json::to_writer(&mut *out, value);
}

/// An audit row's timestamp as Postgres keeps it: whole microseconds.
pub fn to_micros(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(at.timestamp_micros()).unwrap_or(at)
}

/// The fields of one chained row that its hash covers.
#[derive(Debug, Clone, Serialize)]
pub struct Link<'a> {
    pub id: Uuid,
    pub tenant: &'a str,
    pub seq: i64,
    pub job_id: Option<Uuid>,
    pub kind: &'a str,
    pub at: DateTime<Utc>,
    pub details: &'a Value,
    pub provenance: &'a Provenance,
    pub prev_hash: &'a str,
}

/// SHA-256 over the canonical serialisation of `link` (format version 1).
pub fn row_hash(link: &Link<'_>) -> String {
    // The canonical form of the object {v, id, tenant, seq, job_id, kind, at, details,
    // provenance, prev_hash}, written field by field in key order (no intermediate value).
    let mut out = Vec::with_capacity(512);
    out.push(b'{');
    let field = |name: &str, out: &mut Vec<u8>| {
        if out.len() > 1 {
            out.push(b',');
        }
        write_scalar(name, out);
        out.push(b':');
    };
    field("at", &mut out);
    let at = to_micros(link.at).to_rfc3339_opts(SecondsFormat::Micros, true);
    write_scalar(&at, &mut out);
    field("details", &mut out);
    write_canonical(link.details, &mut out);
    field("id", &mut out);
    write_scalar(&link.id, &mut out);
    field("job_id", &mut out);
    write_scalar(&link.job_id, &mut out);
    field("kind", &mut out);
    write_scalar(link.kind, &mut out);
    field("prev_hash", &mut out);
    write_scalar(link.prev_hash, &mut out);
    field("provenance", &mut out);
    write_canonical(
        &serde_json::to_value(link.provenance).unwrap_or(Value::Null),
        &mut out,
    );
    field("seq", &mut out);
    write_scalar(&link.seq, &mut out);
    field("tenant", &mut out);
    write_scalar(link.tenant, &mut out);
    field("v", &mut out);
    write_scalar(&1, &mut out);
    out.push(b'}');
    sha256_hex(&out)
}

/// The first broken link of a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    pub tenant: String,
    /// The row where the chain stops holding (`None` when rows after the last one are gone).
    pub row: Option<Uuid>,
    pub seq: Option<i64>,
    pub problem: String,
}

impl std::fmt::Display for Break {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tenant {:?}: ", self.tenant)?;
        match (self.row, self.seq) {
            (Some(row), Some(seq)) => write!(f, "row {row} (seq {seq}): ")?,
            (Some(row), None) => write!(f, "row {row}: ")?,
            _ => {}
        }
        f.write_str(&self.problem)
    }
}

/// One intact chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSummary {
    pub tenant: String,
    pub events: i64,
    pub head: String,
}

/// What `verify` found.
#[derive(Debug, Clone, Default)]
pub struct Verification {
    /// Every chain checked, in tenant order, up to the first broken one.
    pub intact: Vec<ChainSummary>,
    pub broken: Option<Break>,
    /// Rows written before the chain existed (no `seq`), not covered by any chain.
    pub unchained: i64,
}

/// Walks the chain of `tenant` (or of every tenant, in name order) and stops at the first
/// broken link. It reads one snapshot (a `REPEATABLE READ` transaction): workers go on
/// appending while it walks, and heads read at the start must match rows read later.
pub async fn verify(
    conn: &mut PgConnection,
    tenant: Option<&str>,
) -> Result<Verification, sqlx::Error> {
    let mut snapshot = sqlx::Connection::begin(conn).await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *snapshot)
        .await?;
    let mut report = Verification {
        unchained: store::unchained(&mut snapshot, tenant).await?,
        ..Verification::default()
    };
    for (tenant, head) in store::chains(&mut snapshot, tenant).await? {
        match verify_chain(&mut snapshot, &tenant, head).await? {
            Ok(summary) => report.intact.push(summary),
            Err(broken) => {
                report.broken = Some(broken);
                break;
            }
        }
    }
    snapshot.commit().await?;
    Ok(report)
}

async fn verify_chain(
    conn: &mut PgConnection,
    tenant: &str,
    head: Option<(i64, String)>,
) -> Result<Result<ChainSummary, Break>, sqlx::Error> {
    let broken = |row: Option<&ChainRow>, problem: String| Break {
        tenant: tenant.to_owned(),
        row: row.map(|r| r.id),
        seq: row.map(|r| r.seq),
        problem,
    };
    let mut prev_seq = 0i64;
    let mut prev_hash = GENESIS.to_owned();
    let mut rows = store::chain(conn, tenant);
    while let Some(row) = rows.try_next().await? {
        if row.seq != prev_seq + 1 {
            let missing = if row.seq == prev_seq + 2 {
                format!("seq {} is missing", prev_seq + 1)
            } else {
                format!("seq {}..={} are missing", prev_seq + 1, row.seq - 1)
            };
            return Ok(Err(broken(
                Some(&row),
                format!("{missing} before it: rows were deleted (or renumbered)"),
            )));
        }
        if row.prev_hash != prev_hash {
            return Ok(Err(broken(
                Some(&row),
                format!(
                    "prev_hash {} does not match the hash {prev_hash} of the row before it",
                    row.prev_hash
                ),
            )));
        }
        let provenance = row.provenance.clone().unwrap_or_default();
        let computed = row_hash(&Link {
            id: row.id,
            tenant,
            seq: row.seq,
            job_id: row.job_id,
            kind: &row.kind,
            at: row.at,
            details: &row.details,
            provenance: &provenance,
            prev_hash: &row.prev_hash,
        });
        if computed != row.hash {
            return Ok(Err(broken(
                Some(&row),
                format!(
                    "stored hash {} does not match the row's contents (computed {computed}): the row was changed",
                    row.hash
                ),
            )));
        }
        prev_seq = row.seq;
        prev_hash = row.hash;
    }
    drop(rows);
    match head {
        Some((seq, hash)) if seq != prev_seq || hash != prev_hash => Ok(Err(broken(
            None,
            format!(
                "the chain head is seq {seq} (hash {hash}) but the last row is seq {prev_seq}: \
                 rows at the end were deleted"
            ),
        ))),
        None if prev_seq > 0 => Ok(Err(broken(
            None,
            "the chain has rows but no head in audit_chain_heads (the head was deleted)".to_owned(),
        ))),
        _ => Ok(Ok(ChainSummary {
            tenant: tenant.to_owned(),
            events: prev_seq,
            head: prev_hash,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The hash as format version 1 defines it: the canonical form of one JSON object.
    fn reference_row_hash(link: &Link<'_>) -> String {
        let value = json!({
            "v": 1,
            "id": link.id,
            "tenant": link.tenant,
            "seq": link.seq,
            "job_id": link.job_id,
            "kind": link.kind,
            "at": to_micros(link.at).to_rfc3339_opts(SecondsFormat::Micros, true),
            "details": link.details,
            "provenance": serde_json::to_value(link.provenance).unwrap_or(Value::Null),
            "prev_hash": link.prev_hash,
        });
        sha256_hex(canonical(&value).as_bytes())
    }

    #[test]
    fn the_row_hash_written_field_by_field_equals_the_canonical_object_hash() {
        let details = json!({"z": [1, {"b": "é\n\"q\"", "a": null}], "cost_usd": "0.1", "f": 0.1});
        let provenance = Provenance {
            worker_id: Some("w-1".to_owned()),
            ..Provenance::default()
        };
        for job_id in [None, Some(Uuid::now_v7())] {
            let link = Link {
                id: Uuid::now_v7(),
                tenant: "acme",
                seq: 42,
                job_id,
                kind: "job_succeeded",
                at: Utc::now(),
                details: &details,
                provenance: &provenance,
                prev_hash: GENESIS,
            };
            assert_eq!(row_hash(&link), reference_row_hash(&link));
        }
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let value = json!({"b": 1, "a": {"z": [1, {"y": null, "x": "s"}], "c": 2.5}});
        assert_eq!(
            canonical(&value),
            r#"{"a":{"c":2.5,"z":[1,{"x":"s","y":null}]},"b":1}"#
        );
    }

    #[test]
    fn a_jsonb_like_round_trip_keeps_the_hash() {
        let details = json!({"cost_usd": "0.1", "n": 3, "f": 0.1, "big": 1e300, "s": "é\n\"q\""});
        let provenance = Provenance::default();
        let link = Link {
            id: Uuid::now_v7(),
            tenant: "acme",
            seq: 1,
            job_id: None,
            kind: "job_succeeded",
            at: Utc::now(),
            details: &details,
            provenance: &provenance,
            prev_hash: GENESIS,
        };
        let reparsed: Value = serde_json::from_str(&details.to_string()).unwrap();
        let again = Link {
            details: &reparsed,
            at: to_micros(link.at),
            ..link.clone()
        };
        assert_eq!(row_hash(&link), row_hash(&again));
        let changed = json!({"cost_usd": "0.2", "n": 3, "f": 0.1, "big": 1e300, "s": "é\n\"q\""});
        assert_ne!(
            row_hash(&link),
            row_hash(&Link {
                details: &changed,
                ..link.clone()
            })
        );
    }

    #[test]
    fn traceparent_headers_are_parsed_strictly() {
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(
            trace_id_of(&format!("00-{id}-00f067aa0ba902b7-01")).as_deref(),
            Some(id)
        );
        assert_eq!(
            trace_id_of("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(trace_id_of("00-XYZ-00f067aa0ba902b7-01"), None);
        assert_eq!(trace_id_of("garbage"), None);
        let job = Uuid::now_v7();
        assert_eq!(
            trace_id_of(&traceparent_for(job)),
            Some(job.simple().to_string())
        );
    }

    #[test]
    fn the_config_hash_ignores_passwords_but_not_settings() {
        let a = Settings::from_toml("[broker]\nurl = \"amqp://u:secret1@127.0.0.1:5672/%2f\"\n")
            .unwrap();
        let b = Settings::from_toml("[broker]\nurl = \"amqp://u:secret2@127.0.0.1:5672/%2f\"\n")
            .unwrap();
        let c = Settings::from_toml("[worker]\nconcurrency = 3\n").unwrap();
        assert_eq!(config_sha256(&a), config_sha256(&b));
        assert_ne!(config_sha256(&a), config_sha256(&c));
    }
}
