-- A batch's cost (`batch status`, `batch cancel`, summarize's progress) sums its ledger rows:
-- without this index that read every ledger row the tenant ever wrote, on every poll. Partial,
-- so jobs outside a batch (most of the hot path) add no index entry.
CREATE INDEX cost_ledger_batch_idx ON cost_ledger (tenant, batch) WHERE batch IS NOT NULL;
