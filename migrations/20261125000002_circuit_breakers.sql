-- Open circuits, shared by every worker: a target one worker found dead is skipped by all.
CREATE TABLE circuit_breakers (
    -- `provider/model`
    target      text PRIMARY KEY,
    open_until  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);
