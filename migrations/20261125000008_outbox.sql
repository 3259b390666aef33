-- The transactional outbox: every message of a committed job (its result, dead-letter copy,
-- cost and audit events) is written here in the same transaction as the job's rows. The
-- finalizer publishes the rows with confirms right after the commit and then deletes them;
-- rows a crashed worker left behind are republished by the relay in every worker
-- (`FOR UPDATE SKIP LOCKED` over rows older than a few seconds).
CREATE TABLE outbox (
    id           uuid        PRIMARY KEY,
    -- The AMQP `message_id` subscribers dedupe on: stable across republishing.
    message_id   text        NOT NULL,
    exchange     text        NOT NULL,
    routing_key  text        NOT NULL,
    -- The AMQP `type` (schema name).
    kind         text        NOT NULL,
    -- AMQP headers as a flat JSON object of strings ({} for none).
    headers      jsonb       NOT NULL DEFAULT '{}',
    body         bytea       NOT NULL,
    created_at   timestamptz NOT NULL
);
-- The relay scans the oldest rows first.
CREATE INDEX outbox_created_idx ON outbox (created_at);
