-- A rate-window entry may stand for several calls: a worker takes a grant of calls at once
-- for a large request limit (see routing/limits.rs), so the shared row is locked once per
-- grant rather than once per call.
ALTER TABLE limiter_events ADD COLUMN calls integer NOT NULL DEFAULT 1;
