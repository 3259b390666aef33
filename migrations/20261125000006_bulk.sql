-- Bulk work: named batches (OpenAI Batch files and resumable summarize runs), their items,
-- and the `cancelled` terminal status written by `batch cancel`.
ALTER TABLE jobs DROP CONSTRAINT jobs_status_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_status_check
    CHECK (status IN ('succeeded', 'failed', 'rejected', 'cancelled'));
ALTER TABLE results DROP CONSTRAINT results_status_check;
ALTER TABLE results ADD CONSTRAINT results_status_check
    CHECK (status IN ('succeeded', 'failed', 'rejected', 'cancelled'));

CREATE TABLE batches (
    tenant        text        NOT NULL,
    id            text        NOT NULL,
    kind          text        NOT NULL CHECK (kind IN ('openai', 'summarize')),
    route         text        NOT NULL,
    -- Input file name (OpenAI) or the summarize arguments, for `batch status`.
    source        text,
    created_at    timestamptz NOT NULL,
    -- Set once every valid item has been published (until then the batch is `validating`).
    published_at  timestamptz,
    cancelled_at  timestamptz,
    PRIMARY KEY (tenant, id)
);

-- One row per request line (OpenAI) or per map/reduce step of a document (summarize).
CREATE TABLE batch_items (
    tenant     text    NOT NULL,
    batch      text    NOT NULL,
    -- `custom_id` (OpenAI) or `<document>@<content hash>/L<level>[/<chunk>]` (summarize).
    item_key   text    NOT NULL,
    -- 1-based input line (OpenAI) or document index (summarize).
    line       integer NOT NULL,
    -- NULL for an input line that failed validation (see `error`).
    job_id     uuid UNIQUE,
    error      text,
    published  boolean NOT NULL DEFAULT false,
    PRIMARY KEY (tenant, batch, item_key),
    FOREIGN KEY (tenant, batch) REFERENCES batches (tenant, id) ON DELETE CASCADE
);
