-- Issue 8: a tamper-evident audit trail and per-tenant retention.

-- Each tenant's audit events form a hash chain: `seq` numbers them 1, 2, 3, … per tenant,
-- `prev_hash` is the `hash` of the tenant's previous event (64 zeros for the first), and
-- `hash` is SHA-256 over a canonical serialisation of the row plus `prev_hash`
-- (`src/audit.rs`). Rows written before this migration have no `seq` and are not chained.
ALTER TABLE audit_events
    ADD COLUMN seq        bigint,
    -- Who wrote the event: worker id, version, config hash, message hash, trace id.
    ADD COLUMN provenance jsonb,
    ADD COLUMN prev_hash  text,
    ADD COLUMN hash       text;
CREATE UNIQUE INDEX audit_events_tenant_seq_idx ON audit_events (tenant, seq);

-- The last link of each tenant's chain. A finalize group locks the heads of its tenants
-- (in tenant order) once, chains its events in order, and moves the heads, all in its one
-- transaction; `audit verify` also uses the head to notice deleted trailing rows.
CREATE TABLE audit_chain_heads (
    tenant text PRIMARY KEY,
    seq    bigint NOT NULL,
    hash   text   NOT NULL
);

-- Retention `hash` keeps only this digest of the request (and `request` stays NULL);
-- retention `none` keeps neither.
ALTER TABLE jobs ADD COLUMN request_sha256 text;
