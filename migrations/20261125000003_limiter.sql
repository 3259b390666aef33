-- Limits shared by every worker: concurrency slots (leases that expire if their worker dies)
-- and a log of recent calls per scope for request/token rates. A scope is `provider:<name>`
-- or `key:<provider>:<key id>`.
CREATE TABLE limiter_scopes (
    scope         text PRIMARY KEY,
    -- A provider's retry-after pauses the scope for every worker.
    paused_until  timestamptz
);

CREATE TABLE limiter_slots (
    scope       text    NOT NULL REFERENCES limiter_scopes (scope) ON DELETE CASCADE,
    slot        integer NOT NULL,
    holder      uuid,
    expires_at  timestamptz,
    PRIMARY KEY (scope, slot)
);

CREATE TABLE limiter_events (
    id     uuid PRIMARY KEY,
    scope  text        NOT NULL,
    at     timestamptz NOT NULL,
    units  bigint      NOT NULL
);
CREATE INDEX limiter_events_scope_at_idx ON limiter_events (scope, at);
