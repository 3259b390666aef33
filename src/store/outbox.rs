//! The `outbox` table: messages of committed jobs, written in the finalize transaction, deleted
//! once the broker confirmed them. A finalize group's messages are one row, each message an
//! element of its arrays. Rows left behind by a worker that died between commit and publish are
//! claimed by the relay with `FOR UPDATE SKIP LOCKED` and republished.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use lapin::types::{AMQPValue, FieldTable, LongString};
use sqlx::PgConnection;
use sqlx::types::Json;
use uuid::Uuid;

use crate::queue::publisher::Outgoing;
use crate::store::PgQuery;

/// A finalize group's messages, written as one row in the group's transaction.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: Uuid,
    pub created_at: DateTime<Utc>,
    /// The session whose lease (`outbox_sessions`) keeps the relay away from the row while the
    /// session lives; `None` leaves the row to the relay by age alone.
    pub session: Option<Uuid>,
    /// In publishing order.
    pub messages: Vec<OutboxMessage>,
}

/// One message waiting to be published.
#[derive(Debug, Clone)]
pub struct OutboxMessage {
    pub message: Outgoing,
    /// The `results` row (job id, generation) whose `body` is this message's body, written in
    /// the same transaction: the row stores no copy of it. `None` stores the body.
    pub stored_as: Option<(Uuid, i32)>,
}

/// A message whose row stores its body.
impl From<Outgoing> for OutboxMessage {
    fn from(message: Outgoing) -> Self {
        Self {
            message,
            stored_as: None,
        }
    }
}

/// AMQP headers as a flat map of strings (our only header values are strings); stored as a NULL
/// element when there are none.
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

/// The row's columns, as [`bind`] adds them.
const COLUMNS: [(&str, &str); 11] = [
    ("id", "uuid"),
    ("created_at", "timestamptz"),
    ("session_id", "uuid"),
    ("message_ids", "text[]"),
    ("exchanges", "text[]"),
    ("routing_keys", "text[]"),
    ("kinds", "text[]"),
    ("headers", "jsonb[]"),
    ("bodies", "bytea[]"),
    ("result_job_ids", "uuid[]"),
    ("result_generations", "int4[]"),
];

/// Two data-modifying `WITH` parts: `published` deletes the rows an earlier group's broker
/// confirmed, `outbox_written` inserts the group's row; their arguments are numbered from
/// `$first` (as [`bind`] adds them). [`PARTS_DONE`] is true once both have run.
pub fn parts_sql(first: usize) -> String {
    let names: Vec<&str> = COLUMNS.iter().map(|(name, _)| *name).collect();
    let values: Vec<String> = COLUMNS
        .iter()
        .enumerate()
        .map(|(i, (_, ty))| format!("${}::{ty}", first + i))
        .collect();
    format!(
        "published AS (DELETE FROM outbox WHERE id = ANY(${}) RETURNING 1),
         outbox_written AS (
             INSERT INTO outbox ({}) VALUES ({})
             RETURNING 1)",
        first + COLUMNS.len(),
        names.join(", "),
        values.join(", "),
    )
}

/// A condition that reads both of [`parts_sql`]'s parts (so a statement runs them before what
/// the condition guards), and is always true.
pub const PARTS_DONE: &str =
    "(SELECT count(*) FROM published) + (SELECT count(*) FROM outbox_written) >= 0";

/// Adds the row's columns, one array per message field, then the `published` ids, in
/// [`parts_sql`]'s order.
pub fn bind<'q>(query: PgQuery<'q>, row: &OutboxRow, published: &[Uuid]) -> PgQuery<'q> {
    let messages = &row.messages;
    let each = |field: fn(&Outgoing) -> &str| -> Vec<&str> {
        messages.iter().map(|m| field(&m.message)).collect()
    };
    query
        .bind(row.id)
        .bind(row.created_at)
        .bind(row.session)
        .bind(each(|m| &m.message_id))
        .bind(each(|m| &m.exchange))
        .bind(each(|m| &m.routing_key))
        .bind(each(|m| &m.kind))
        .bind(
            messages
                .iter()
                .map(|m| {
                    let headers = headers_to_json(m.message.headers.as_ref());
                    (!headers.is_empty()).then_some(Json(headers))
                })
                .collect::<Vec<_>>(),
        )
        .bind(
            messages
                .iter()
                .map(|m| m.stored_as.is_none().then_some(m.message.body.as_slice()))
                .collect::<Vec<_>>(),
        )
        .bind(
            messages
                .iter()
                .map(|m| m.stored_as.map(|(job, _)| job))
                .collect::<Vec<_>>(),
        )
        .bind(
            messages
                .iter()
                .map(|m| m.stored_as.map(|(_, generation)| generation))
                .collect::<Vec<_>>(),
        )
        .bind(published)
}

/// Keeps only the messages at `positions` (from 1) of row `id`, the ones the broker refused,
/// and puts the row at the back of the relay's line (its age starts again): it is tried again
/// later, without the messages that went out, and the rows behind it go first.
pub async fn put_back(
    conn: &mut PgConnection,
    id: Uuid,
    positions: &[i64],
) -> Result<(), sqlx::Error> {
    let kept = |column: &str| {
        format!(
            "{column} = ARRAY(SELECT x FROM unnest({column}) WITH ORDINALITY AS t(x, i)
                              WHERE i = ANY($2) ORDER BY i)"
        )
    };
    let columns = [
        "message_ids",
        "exchanges",
        "routing_keys",
        "kinds",
        "headers",
        "bodies",
        "result_job_ids",
        "result_generations",
    ];
    let sets: Vec<String> = columns.iter().map(|c| kept(c)).collect();
    // The relay's own clock, which its cutoff is taken from.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE outbox SET {}, created_at = $3 WHERE id = $1",
        sets.join(", ")
    )))
    .bind(id)
    .bind(positions)
    .bind(Utc::now())
    .execute(conn)
    .await?;
    Ok(())
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
    i64,
    String,
    String,
    String,
    String,
    Option<Json<BTreeMap<String, String>>>,
    Option<Vec<u8>>,
);

/// Locks up to `limit` rows committed before `before`, oldest first, skipping rows another
/// relay holds, rows of a session whose lease has not expired and rows of the sessions in
/// `running` (the caller's own, alive whatever their lease says), and returns their messages in order, each with its body (a message pointing at
/// its result gets the result's body). The caller publishes them, deletes the rows and commits.
///
/// A message whose result cannot be found (none is ever deleted, so only a hand-edited
/// database has one) has nothing to publish: it is logged and left out, and its row is deleted
/// with the rest.
pub async fn claim_stale(
    conn: &mut PgConnection,
    before: DateTime<Utc>,
    limit: i64,
    running: &[Uuid],
) -> Result<Claim, sqlx::Error> {
    let rows: Vec<Claimed> = sqlx::query_as(
        "WITH claimed AS (
             SELECT * FROM outbox o
             WHERE o.created_at < $1
               AND NOT EXISTS (SELECT 1 FROM outbox_sessions s
                               WHERE s.id = o.session_id AND s.alive_until > now())
               AND (o.session_id IS NULL OR o.session_id <> ALL($3))
             ORDER BY o.created_at LIMIT $2
             FOR UPDATE SKIP LOCKED)
         SELECT c.id, m.n, m.message_id, m.exchange, m.routing_key, m.kind, m.headers,
                COALESCE(m.body, (SELECT convert_to(r.body::text, 'UTF8') FROM results r
                                  WHERE r.job_id = m.result_job_id
                                    AND r.generation = m.result_generation))
         FROM claimed c
         CROSS JOIN LATERAL unnest(c.message_ids, c.exchanges, c.routing_keys, c.kinds,
                                   c.headers, c.bodies, c.result_job_ids, c.result_generations)
             WITH ORDINALITY AS m(message_id, exchange, routing_key, kind, headers, body,
                                  result_job_id, result_generation, n)
         ORDER BY c.created_at, c.id, m.n",
    )
    .bind(before)
    .bind(limit)
    .bind(running)
    .fetch_all(conn)
    .await?;
    let mut claim = Claim::default();
    for (id, position, message_id, exchange, routing_key, kind, headers, body) in rows {
        if claim.ids.last() != Some(&id) {
            claim.ids.push(id);
            claim.counts.push(0);
        }
        let Some(body) = body else {
            tracing::error!(outbox.id = %id, message_id = %message_id, "An outbox message points at a result that does not exist; it cannot be published and is dropped.");
            continue;
        };
        if let Some(count) = claim.counts.last_mut() {
            *count += 1;
        }
        claim.positions.push(position);
        claim.messages.push(Outgoing {
            exchange,
            routing_key,
            body,
            message_id,
            kind,
            headers: headers.and_then(|headers| headers_from_json(headers.0)),
        });
    }
    Ok(claim)
}

/// What [`claim_stale`] locked.
#[derive(Debug, Default)]
pub struct Claim {
    /// The rows' ids, to delete once their messages are confirmed.
    pub ids: Vec<Uuid>,
    /// Their messages in publishing order, each with its body.
    pub messages: Vec<Outgoing>,
    /// How many of `messages` each row holds, in the order of `ids`.
    pub counts: Vec<usize>,
    /// Where each of `messages` is in its row's arrays (from 1).
    pub positions: Vec<i64>,
}

impl Claim {
    /// Each row's id with the range of `messages` (and `positions`) that are its own.
    pub fn rows(&self) -> impl Iterator<Item = (Uuid, std::ops::Range<usize>)> + '_ {
        let mut start = 0;
        self.ids.iter().zip(&self.counts).map(move |(id, count)| {
            let range = start..start + count;
            start = range.end;
            (*id, range)
        })
    }
}

/// Takes (or renews) session `id`'s lease until `ttl` from now, by Postgres' clock.
pub async fn hold_session(
    conn: &mut PgConnection,
    id: Uuid,
    ttl: std::time::Duration,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO outbox_sessions (id, alive_until)
         VALUES ($1, now() + $2 * interval '1 millisecond')
         ON CONFLICT (id) DO UPDATE SET alive_until = EXCLUDED.alive_until",
    )
    .bind(id)
    .bind(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX))
    .execute(conn)
    .await?;
    Ok(())
}

/// Ends session `id`'s lease (its rows are the relay's once they are old enough), and drops
/// leases that expired (a worker that died leaves its own behind).
pub async fn end_session(conn: &mut PgConnection, id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM outbox_sessions WHERE id = $1 OR alive_until < now()")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Rows (groups of messages) not yet published.
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
