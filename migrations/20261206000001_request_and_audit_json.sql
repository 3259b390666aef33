-- As `results.body` in 20261206000000: the stored request (`jobs.request`) and the audit
-- events' `details` and `provenance` are kept as the worker wrote them (`json`), not parsed
-- into `jsonb` on every insert. The audit chain hashes a canonical form of the values, which
-- the text keeps exactly (a `jsonb` round trip kept it too), so `audit verify` is unaffected.
-- `->` and `->>` work on both types. Rewrites both tables once, under a lock.
ALTER TABLE jobs ALTER COLUMN request TYPE json USING request::json;
ALTER TABLE audit_events
    ALTER COLUMN details TYPE json USING details::json,
    ALTER COLUMN provenance TYPE json USING provenance::json;
