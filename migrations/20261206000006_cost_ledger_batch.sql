-- no-transaction
-- A batch's cost (`batch status`, `batch cancel`, summarize's progress) sums its ledger rows:
-- without this index that read every ledger row the tenant ever wrote, on every poll. Partial,
-- so jobs outside a batch (most of the hot path) add no index entry. Built concurrently, so
-- workers already running keep writing ledger rows while a new one migrates.
CREATE INDEX CONCURRENTLY IF NOT EXISTS cost_ledger_batch_idx
    ON cost_ledger (tenant, batch) WHERE batch IS NOT NULL;
