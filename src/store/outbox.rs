//! The `outbox` table: messages of committed jobs, written in the finalize transaction, deleted
//! once the broker confirmed them. Rows left behind by a worker that died between commit and
//! publish are claimed by the relay with `FOR UPDATE SKIP LOCKED` and republished.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use lapin::types::{AMQPValue, FieldTable, LongString};
use sqlx::PgConnection;
use sqlx::types::Json;
use uuid::Uuid;

use crate::queue::publisher::Outgoing;
use crate::store::PgQuery;

/// One message waiting to be published.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: Uuid,
    pub message: Outgoing,
    pub created_at: DateTime<Utc>,
    /// The `results` row (job id, generation) whose `body` is this message's body, written in
    /// the same transaction: the row stores no copy of it. `None` stores the body.
    pub stored_as: Option<(Uuid, i32)>,
}

/// AMQP headers as a flat map of strings (our only header values are strings).
fn headers_to_json(headers: Option<&FieldTable>) -> BTreeMap<String, String> {
    headers
        .map(|table| {
            table
                .inner()
                .iter()
                .filter_map(|(key, value)| match value {
                    AMQPValue::LongString(text) => Some((
                        key.as_str().to_owned(),
                        String::from_utf8_lossy(text.as_bytes()).into_owned(),
                    )),
                    AMQPValue::ShortString(text) => {
                        Some((key.as_str().to_owned(), text.as_str().to_owned()))
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

fn headers_from_json(map: BTreeMap<String, String>) -> Option<FieldTable> {
    if map.is_empty() {
        return None;
    }
    let mut table = FieldTable::default();
    for (key, value) in map {
        table.insert(key.into(), AMQPValue::LongString(LongString::from(value)));
    }
    Some(table)
}

const TYPES: [&str; 10] = [
    "uuid",
    "text",
    "text",
    "text",
    "text",
    "jsonb",
    "bytea",
    "timestamptz",
    "uuid",
    "int4",
];

/// Two data-modifying `WITH` parts: `published` deletes the rows an earlier group's broker
/// confirmed, `outbox_written` inserts the new rows; their arguments are numbered from
/// `$first` (as [`bind`] adds them). [`PARTS_DONE`] is true once both have run.
pub fn parts_sql(first: usize) -> String {
    format!(
        "published AS (DELETE FROM outbox WHERE id = ANY(${}) RETURNING 1),
         outbox_written AS (
             INSERT INTO outbox (id, message_id, exchange, routing_key, kind, headers, body, created_at,
                                 result_job_id, result_generation)
             SELECT * FROM UNNEST({})
             RETURNING 1)",
        first + TYPES.len(),
        crate::store::unnest_arguments(first, &TYPES)
    )
}

/// A condition that reads both of [`parts_sql`]'s parts (so a statement runs them before what
/// the condition guards), and is always true.
pub const PARTS_DONE: &str =
    "(SELECT count(*) FROM published) + (SELECT count(*) FROM outbox_written) >= 0";

/// Adds the rows' columns, one array each, then the `published` ids, in [`parts_sql`]'s order.
pub fn bind<'q>(query: PgQuery<'q>, rows: &[OutboxRow], published: &[Uuid]) -> PgQuery<'q> {
    query
        .bind(rows.iter().map(|r| r.id).collect::<Vec<_>>())
        .bind(
            rows.iter()
                .map(|r| r.message.message_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            rows.iter()
                .map(|r| r.message.exchange.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            rows.iter()
                .map(|r| r.message.routing_key.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            rows.iter()
                .map(|r| r.message.kind.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            rows.iter()
                .map(|r| Json(headers_to_json(r.message.headers.as_ref())))
                .collect::<Vec<_>>(),
        )
        .bind(
            rows.iter()
                .map(|r| r.stored_as.is_none().then_some(r.message.body.as_slice()))
                .collect::<Vec<_>>(),
        )
        .bind(rows.iter().map(|r| r.created_at).collect::<Vec<_>>())
        .bind(
            rows.iter()
                .map(|r| r.stored_as.map(|(job, _)| job))
                .collect::<Vec<_>>(),
        )
        .bind(
            rows.iter()
                .map(|r| r.stored_as.map(|(_, generation)| generation))
                .collect::<Vec<_>>(),
        )
        .bind(published)
}

/// Deletes published rows in one statement.
pub async fn delete_many(conn: &mut PgConnection, ids: &[Uuid]) -> Result<(), sqlx::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
        .bind(ids)
        .execute(conn)
        .await?;
    Ok(())
}

type Claimed = (
    Uuid,
    String,
    String,
    String,
    String,
    Json<BTreeMap<String, String>>,
    Option<Vec<u8>>,
    DateTime<Utc>,
);

/// Locks up to `limit` rows committed before `before`, oldest first, skipping rows another
/// relay holds; a row pointing at its result gets the result's body. The caller publishes
/// them, deletes them and commits.
///
/// A row whose result cannot be found (none is ever deleted, so only a hand-edited database
/// has one) has nothing to publish: it is logged and returned in `unpublishable`, for the
/// caller to delete with the rest.
pub async fn claim_stale(
    conn: &mut PgConnection,
    before: DateTime<Utc>,
    limit: i64,
) -> Result<Claim, sqlx::Error> {
    let rows: Vec<Claimed> = sqlx::query_as(
        "SELECT o.id, o.message_id, o.exchange, o.routing_key, o.kind, o.headers,
                COALESCE(o.body, (SELECT convert_to(r.body::text, 'UTF8') FROM results r
                                  WHERE r.job_id = o.result_job_id
                                    AND r.generation = o.result_generation)),
                o.created_at
         FROM outbox o WHERE o.created_at < $1
         ORDER BY o.created_at LIMIT $2
         FOR UPDATE SKIP LOCKED",
    )
    .bind(before)
    .bind(limit)
    .fetch_all(conn)
    .await?;
    let mut claim = Claim::default();
    for (id, message_id, exchange, routing_key, kind, headers, body, created_at) in rows {
        let Some(body) = body else {
            tracing::error!(outbox.id = %id, message_id = %message_id, "An outbox row points at a result that does not exist; it cannot be published and is dropped.");
            claim.unpublishable.push(id);
            continue;
        };
        claim.rows.push(OutboxRow {
            id,
            message: Outgoing {
                exchange,
                routing_key,
                body,
                message_id,
                kind,
                headers: headers_from_json(headers.0),
            },
            created_at,
            stored_as: None,
        });
    }
    Ok(claim)
}

/// What [`claim_stale`] locked.
#[derive(Debug, Default)]
pub struct Claim {
    /// Rows to publish, each with its body.
    pub rows: Vec<OutboxRow>,
    /// Ids of rows with nothing to publish.
    pub unpublishable: Vec<Uuid>,
}

/// Rows not yet published.
pub async fn pending(conn: &mut PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(conn)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_headers_survive_the_round_trip() {
        let mut table = FieldTable::default();
        table.insert(
            "x-switchyard-error".into(),
            AMQPValue::LongString("too_large: 5 MB".into()),
        );
        let back = headers_from_json(headers_to_json(Some(&table)));
        assert_eq!(back, Some(table));
        assert_eq!(headers_from_json(headers_to_json(None)), None);
    }
}
