//! Group commit of billed calls. Dispatch commits each billed call's ledger row and budget
//! settlement as soon as the call returns (so a call is in the books even if the worker dies
//! before its job is finalized). Doing that in one transaction per call costs the database one
//! commit per job; instead every call of a worker goes to one recorder task, which commits
//! whatever is waiting in ONE transaction (multi-row insert, one settlement) and answers each
//! call once the group is committed. A call still returns only after its row is committed, or
//! with an error, in which case finalize records it with the job, as before.

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::messages::CostEvent;
use crate::store::budgets::Settlement;
use crate::store::{budgets, cost_ledger};

/// Most calls committed in one transaction.
const MAX_GROUP: usize = 512;

/// Why a call could not be recorded by the recorder.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("recording a group of billed calls failed: {0}")]
    Store(String),
    #[error("the recorder is gone")]
    Gone,
}

struct Request {
    attempt: Uuid,
    cost: Option<CostEvent>,
    settlements: Vec<Settlement>,
    done: oneshot::Sender<Result<(), String>>,
}

/// Handle to a worker's recorder task; cheap to clone.
#[derive(Debug, Clone)]
pub struct Recorder {
    requests: mpsc::Sender<Request>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

impl Recorder {
    /// Starts the recorder task on `tasks`; it ends when every handle is dropped.
    pub fn start(pool: PgPool, tasks: &TaskTracker) -> Self {
        let (requests, inbox) = mpsc::channel(MAX_GROUP * 4);
        tasks.spawn(run(pool, inbox));
        Self { requests }
    }

    /// Commits one call's ledger row (if billed) and settlements; returns once committed.
    pub async fn record(
        &self,
        attempt: Uuid,
        cost: Option<&CostEvent>,
        settlements: Vec<Settlement>,
    ) -> Result<(), RecordError> {
        let (done, answer) = oneshot::channel();
        let request = Request {
            attempt,
            cost: cost.cloned(),
            settlements,
            done,
        };
        self.requests
            .send(request)
            .await
            .map_err(|_| RecordError::Gone)?;
        answer
            .await
            .map_err(|_| RecordError::Gone)?
            .map_err(RecordError::Store)
    }
}

async fn run(pool: PgPool, mut inbox: mpsc::Receiver<Request>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while inbox.recv_many(&mut group, MAX_GROUP).await > 0 {
        let outcome = commit(&pool, &group)
            .await
            .map_err(|e| e.to_string())
            .and_then(|()| {
                if crate::failpoint::is_armed(crate::failpoint::RECORD_REPLY_LOST) {
                    Err("failpoint record_reply_lost: the commit's answer was lost".to_owned())
                } else {
                    Ok(())
                }
            });
        // A commit whose answer was lost may have landed. The group is one transaction, so
        // any of its ledger rows tells for all of it (settlements included).
        let outcome = match (outcome, group.iter().find_map(|r| r.cost.as_ref())) {
            (Err(error), Some(cost)) if cost_ledger::is_recorded(&pool, cost.event_id).await => {
                tracing::info!(calls = group.len(), error.message = %error, "Recording a group of billed calls reported an error, but its rows are committed; they count as recorded.");
                Ok(())
            }
            (outcome, _) => outcome,
        };
        for request in group.drain(..) {
            // A caller that went away (its job was abandoned) needs no answer.
            let _ = request.done.send(outcome.clone());
        }
    }
}

async fn commit(pool: &PgPool, group: &[Request]) -> Result<(), sqlx::Error> {
    let rows: Vec<(Uuid, &CostEvent)> = group
        .iter()
        .filter_map(|r| r.cost.as_ref().map(|cost| (r.attempt, cost)))
        .collect();
    let settlements: Vec<Settlement> = group
        .iter()
        .flat_map(|r| r.settlements.iter().cloned())
        .collect();
    // Without settlements the ledger rows are one statement, atomic on its own: no
    // transaction, so two round trips fewer on every call's way back.
    if settlements.is_empty() {
        let mut conn = pool.acquire().await?;
        return cost_ledger::insert_many(&mut conn, &rows).await;
    }
    let mut tx = pool.begin().await?;
    cost_ledger::insert_many(&mut tx, &rows).await?;
    budgets::settle(&mut tx, &settlements).await?;
    tx.commit().await
}
