-- Budgets: spent and reserved per budget and period (a new period starts fresh; old rows are
-- history), and the reservations of calls in flight, which expire if their worker dies.
CREATE TABLE budget_periods (
    budget        text           NOT NULL,
    period_start  timestamptz    NOT NULL,
    cap           numeric(20,10) NOT NULL,
    spent         numeric(20,10) NOT NULL DEFAULT 0,
    reserved      numeric(20,10) NOT NULL DEFAULT 0,
    -- Highest alert percentage already announced this period.
    alerted       integer        NOT NULL DEFAULT 0,
    PRIMARY KEY (budget, period_start)
);

CREATE TABLE budget_reservations (
    id            uuid PRIMARY KEY,
    budget        text           NOT NULL,
    period_start  timestamptz    NOT NULL,
    amount        numeric(20,10) NOT NULL,
    expires_at    timestamptz    NOT NULL
);
CREATE INDEX budget_reservations_expires_idx ON budget_reservations (expires_at);
