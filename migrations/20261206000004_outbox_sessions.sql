-- Which finalize sessions are alive. Each lane session of a worker holds a lease here, renewed
-- while it runs and deleted when it ends; its outbox rows name it (`outbox.session_id`). The
-- relay leaves the rows of a session whose lease has not expired to that session, which
-- publishes and deletes them itself, however long a commit or the broker's confirms take: only
-- rows of sessions that ended, died or stopped renewing are republished. Rows without a
-- session (written before this migration) are relayed by age alone, as before.
CREATE TABLE outbox_sessions (
    id          uuid        PRIMARY KEY,
    -- Postgres' own clock, so workers' clocks do not matter.
    alive_until timestamptz NOT NULL
);
ALTER TABLE outbox ADD COLUMN session_id uuid;
