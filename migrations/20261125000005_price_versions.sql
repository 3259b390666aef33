-- Which price applied to each ledger row (version and volume tier), the per-request charge,
-- and the monthly token volume per model that volume tiers are chosen by.
ALTER TABLE cost_ledger
    ADD COLUMN price_version     text           NOT NULL DEFAULT 'base',
    ADD COLUMN price_tier_above  bigint,
    ADD COLUMN price_per_request numeric(20,10) NOT NULL DEFAULT 0;

CREATE TABLE model_volumes (
    provider  text        NOT NULL,
    model     text        NOT NULL,
    month     timestamptz NOT NULL,
    tokens    bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (provider, model, month)
);
