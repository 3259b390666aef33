//! Batched duplicate check. Before calling a provider, every job asks whether its id already
//! has a committed result (a redelivered or republished job is answered from Postgres). One
//! query per job costs a pool checkout and a round trip each; instead one lookup task per
//! worker answers every question waiting with ONE query (`results::LATEST_MANY_SQL`).

use std::collections::HashMap;
use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::messages::JobResult;
use crate::store::results;

/// Most job ids looked up in one query.
const MAX_GROUP: usize = 512;

/// Why a lookup could not be answered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LookupError {
    #[error("looking up stored results failed: {0}")]
    Store(#[source] Arc<sqlx::Error>),
    #[error("the lookup task is gone")]
    Gone,
}

type Answer = oneshot::Sender<Result<Option<JobResult>, LookupError>>;

/// Handle to a worker's lookup task; cheap to clone.
#[derive(Debug, Clone)]
pub struct Lookups {
    requests: mpsc::Sender<(Uuid, Answer)>,
}

impl Lookups {
    /// Starts the lookup task on `tasks`; it ends when every handle is dropped.
    pub fn start(pool: PgPool, tasks: &TaskTracker) -> Self {
        let (requests, inbox) = mpsc::channel(MAX_GROUP * 4);
        tasks.spawn(run(pool, inbox));
        Self { requests }
    }

    /// The latest committed result of `job_id`, if any.
    pub async fn find(&self, job_id: Uuid) -> Result<Option<JobResult>, LookupError> {
        let (answer, answered) = oneshot::channel();
        self.requests
            .send((job_id, answer))
            .await
            .map_err(|_| LookupError::Gone)?;
        answered.await.map_err(|_| LookupError::Gone)?
    }
}

async fn run(pool: PgPool, mut inbox: mpsc::Receiver<(Uuid, Answer)>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while inbox.recv_many(&mut group, MAX_GROUP).await > 0 {
        let ids: Vec<Uuid> = group.iter().map(|(id, _)| *id).collect();
        let found = lookup(&pool, &ids).await;
        for (id, answer) in group.drain(..) {
            let reply = match &found {
                Ok(found) => Ok(found.get(&id).cloned()),
                Err(error) => Err(error.clone()),
            };
            // A job that was abandoned meanwhile needs no answer.
            let _ = answer.send(reply);
        }
    }
}

async fn lookup(pool: &PgPool, ids: &[Uuid]) -> Result<HashMap<Uuid, JobResult>, LookupError> {
    let store = |e| LookupError::Store(Arc::new(e));
    let mut conn = pool.acquire().await.map_err(store)?;
    let found = results::find_latest_many(&mut conn, ids)
        .await
        .map_err(store)?;
    Ok(found.into_iter().map(|r| (r.job_id, r)).collect())
}
