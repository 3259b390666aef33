-- Switchyard's system of record. IDs are UUIDv7 and timestamps are set by the application.
-- Money is NUMERIC(20,10) USD, never floating point.

CREATE TABLE jobs (
    id           uuid PRIMARY KEY,
    -- NULL when the message was too broken to name a tenant/batch/route.
    tenant       text,
    batch        text,
    route        text,
    -- Bumped by replay; results are unique per (job, generation).
    generation   integer     NOT NULL DEFAULT 0,
    status       text        NOT NULL CHECK (status IN ('succeeded', 'failed', 'rejected')),
    -- The chat request as received (subject to the tenant's retention policy).
    request      jsonb,
    -- The undecodable original body of a rejected message, truncated, kept for inspection.
    raw_body     bytea,
    received_at  timestamptz NOT NULL,
    finished_at  timestamptz NOT NULL
);
CREATE INDEX jobs_tenant_batch_idx ON jobs (tenant, batch);

CREATE TABLE attempts (
    id                  uuid PRIMARY KEY,
    job_id              uuid        NOT NULL,
    generation          integer     NOT NULL,
    n                   integer     NOT NULL,
    provider            text        NOT NULL,
    model               text        NOT NULL,
    -- The key's id from config; never the key itself.
    key_id              text,
    started_at          timestamptz NOT NULL,
    ended_at            timestamptz NOT NULL,
    outcome             text        NOT NULL CHECK (outcome IN ('succeeded', 'failed')),
    error_class         text,
    http_status         integer,
    error               text,
    latency_ms          bigint      NOT NULL,
    input_tokens        bigint,
    cached_input_tokens bigint,
    cache_write_tokens  bigint,
    output_tokens       bigint,
    reasoning_tokens    bigint
);
CREATE INDEX attempts_job_idx ON attempts (job_id);

CREATE TABLE results (
    job_id      uuid        NOT NULL,
    generation  integer     NOT NULL,
    tenant      text,
    batch       text,
    status      text        NOT NULL CHECK (status IN ('succeeded', 'failed', 'rejected')),
    error_code  text,
    -- The published result message (schemas/result.v1.json), republished on redelivery.
    body        jsonb       NOT NULL,
    created_at  timestamptz NOT NULL,
    PRIMARY KEY (job_id, generation)
);
CREATE INDEX results_tenant_batch_idx ON results (tenant, batch);

CREATE TABLE cost_ledger (
    id                  uuid PRIMARY KEY,
    job_id              uuid           NOT NULL,
    attempt_id          uuid           NOT NULL,
    tenant              text           NOT NULL,
    batch               text,
    route               text           NOT NULL,
    provider            text           NOT NULL,
    model               text           NOT NULL,
    key_id              text,
    input_tokens        bigint         NOT NULL,
    cached_input_tokens bigint         NOT NULL,
    cache_write_tokens  bigint         NOT NULL,
    output_tokens       bigint         NOT NULL,
    -- Unit prices (USD per million tokens) used, so a bill can be re-derived.
    price_input         numeric(20,10) NOT NULL,
    price_cached_input  numeric(20,10) NOT NULL,
    price_cache_write   numeric(20,10) NOT NULL,
    price_output        numeric(20,10) NOT NULL,
    amount_usd          numeric(20,10) NOT NULL,
    created_at          timestamptz    NOT NULL
);
CREATE INDEX cost_ledger_tenant_created_idx ON cost_ledger (tenant, created_at);
CREATE INDEX cost_ledger_job_idx ON cost_ledger (job_id);

-- Append-only.
CREATE TABLE audit_events (
    id       uuid PRIMARY KEY,
    tenant   text        NOT NULL,
    job_id   uuid,
    kind     text        NOT NULL,
    at       timestamptz NOT NULL,
    details  jsonb       NOT NULL
);
CREATE INDEX audit_events_tenant_at_idx ON audit_events (tenant, at);
CREATE INDEX audit_events_job_idx ON audit_events (job_id);
