//! Group reservations. Every call on a hard budget reserves its maximum cost on the budget's
//! period row before it is made; with one statement per call, that one row, hit by every job,
//! caps the whole system (DESIGN §8: about 4k conditional updates a second here, fewer under
//! contention). Instead one reserver task per worker takes every reservation waiting for the
//! same budget period and grants them together ([`budgets::reserve_group`]): in ONE statement
//! when the group's total fits (`spent + reserved + total <= cap`, checked on the locked
//! row), otherwise in one locked transaction, each ask only while `spent + reserved + amount
//! <= cap` still holds, so the cap is exactly as safe as with one statement per call.
//!
//! Only single-budget reservations come here; an ask the group cannot grant (no period row
//! yet, no room left, or a failed transaction) goes back to its caller, which reserves it alone
//! with [`budgets::reserve`] (creating the row, or naming the refusal).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::store::budgets::{self, GroupAsk};

/// Most reservations granted in one transaction.
const MAX_GROUP: usize = 512;

/// The budget period a reservation is on.
type Period = (String, DateTime<Utc>, Decimal);

struct Request {
    period: Period,
    id: Uuid,
    amount: Decimal,
    /// How long the reservation is held, from when it is granted.
    hold: chrono::Duration,
    /// Whether the ask was granted (and committed).
    granted: oneshot::Sender<bool>,
}

/// Handle to a worker's reserver task; cheap to clone.
#[derive(Clone)]
pub struct Reserver {
    requests: mpsc::Sender<Request>,
}

impl std::fmt::Debug for Reserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reserver").finish_non_exhaustive()
    }
}

impl Reserver {
    /// Starts the reserver task on `tasks`; it ends when every handle is dropped.
    pub fn start(pool: PgPool, tasks: &TaskTracker) -> Self {
        let (requests, inbox) = mpsc::channel(MAX_GROUP * 4);
        tasks.spawn(run(pool, inbox));
        Self { requests }
    }

    /// Reserves `amount` on the hard budget `budget` (period `period_start`, cap `cap`) under
    /// reservation `id`, held for `hold` from its grant; `true` once the reservation is
    /// committed, `false` when the group could not grant it (the caller then reserves alone).
    pub async fn reserve(
        &self,
        (budget, period_start, cap): (&str, DateTime<Utc>, Decimal),
        id: Uuid,
        amount: Decimal,
        hold: chrono::Duration,
    ) -> bool {
        let (granted, answer) = oneshot::channel();
        let request = Request {
            period: (budget.to_owned(), period_start, cap),
            id,
            amount,
            hold,
            granted,
        };
        if self.requests.send(request).await.is_err() {
            return false;
        }
        answer.await.unwrap_or(false)
    }
}

async fn run(pool: PgPool, mut inbox: mpsc::Receiver<Request>) {
    let mut waiting = Vec::with_capacity(MAX_GROUP);
    while inbox.recv_many(&mut waiting, MAX_GROUP).await > 0 {
        let mut by_period: BTreeMap<Period, Vec<Request>> = BTreeMap::new();
        // A caller that went away (its job was abandoned) gets no reservation to hold room.
        for request in waiting.drain(..).filter(|r| !r.granted.is_closed()) {
            by_period
                .entry(request.period.clone())
                .or_default()
                .push(request);
        }
        // Periods in name order, as every other reservation and settlement locks them.
        for ((budget, period_start, cap), requests) in by_period {
            let now = Utc::now();
            let asks: Vec<GroupAsk> = requests
                .iter()
                .map(|r| GroupAsk {
                    id: r.id,
                    amount: r.amount,
                    expires_at: now + r.hold,
                })
                .collect();
            let granted = match budgets::reserve_group(&pool, &budget, period_start, cap, &asks)
                .await
            {
                Ok(granted) => granted,
                Err(error) => {
                    // Each caller reserves alone instead, and meets the error there if it lasts.
                    tracing::debug!(budget = %budget, error.message = %error, "A group reservation failed; its calls reserve one by one.");
                    Vec::new()
                }
            };
            for request in requests {
                // A caller that went away (its job was abandoned) needs no answer; its
                // reservation, if granted, expires like any abandoned one.
                let _ = request.granted.send(granted.contains(&request.id));
            }
        }
    }
}
