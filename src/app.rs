//! The application context: one struct of cheap, clonable handles (Postgres pool, broker
//! connection, provider registry, router, shutdown token, task tracker) built once at start.

use std::sync::Arc;

use anyhow::Context as _;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::budget::Budgets;
use crate::config::Settings;
use crate::providers::Registry;
use crate::queue::topology::{self, Names};
use crate::routing::Router;
use crate::routing::limits::{self, Limiter};
use crate::stages::dispatch::Shared;
use crate::stages::lookup::Lookups;
use crate::stages::recorder::Recorder;
use crate::{queue, store};

/// How long each step of [`Context::close`] may take, and a publisher's channel close before it.
pub const CLOSE_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Handles every command and task shares.
#[derive(Clone)]
pub struct Context {
    pub settings: Arc<Settings>,
    pub pool: PgPool,
    /// Reconnects by itself when the connection is lost.
    pub broker: queue::Broker,
    pub names: Names,
    pub registry: Registry,
    pub router: Router,
    /// Limits shared across workers through Postgres; `None` when no provider has limits.
    pub limiter: Option<Limiter>,
    /// Budgets enforced through Postgres; `None` when none are configured.
    pub budgets: Option<Budgets>,
    /// Cancelled on SIGTERM/SIGINT (or by a command that is done).
    pub shutdown: CancellationToken,
    /// Every spawned task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// This process as recorded in audit events (worker id, version, config hash).
    pub identity: Arc<crate::audit::Identity>,
    /// Group commit of billed calls (see `stages/recorder.rs`).
    pub recorder: Recorder,
    /// Batched duplicate checks (see `stages/lookup.rs`).
    pub lookups: Lookups,
}

impl Context {
    /// Connects to Postgres and RabbitMQ. With the settings' auto switches on (the default),
    /// creates the database, applies migrations and declares the topology first, so a new
    /// user needs no setup step.
    pub async fn connect(settings: Settings) -> anyhow::Result<Self> {
        let pool = store::connect(&settings.database).await?;
        let broker = queue::Broker::connect(&settings.broker.url).await?;
        let names = Names::new(&settings.broker.prefix);
        if settings.broker.auto_declare {
            let channel = broker.create_channel().await?;
            topology::declare(&channel, &names, settings.broker.delivery_limit)
                .await
                .context("cannot declare the RabbitMQ topology")?;
            channel.close(200, "declared".into()).await?;
        }
        let http =
            crate::providers::transport::worker_client(usize::from(settings.worker.concurrency))
                .context("cannot build the HTTP client")?;
        let registry = Registry::from_settings(&settings, &http);
        let router = Router::from_settings(&settings, &registry);

        let scopes = limits::scopes(&settings);
        let limiter = if scopes.is_empty() {
            None
        } else {
            let max_wait = std::time::Duration::from_secs(settings.routing.max_limit_wait_secs);
            Some(
                Limiter::new(pool.clone(), &scopes, max_wait)
                    .await
                    .context("cannot register the shared limits")?,
            )
        };
        let identity = Arc::new(crate::audit::Identity::new(&settings));
        let tasks = TaskTracker::new();
        let budgets = Budgets::from_settings(&settings, &pool).map(|budgets| {
            budgets.with_reserver(crate::budget::reserver::Reserver::start(
                pool.clone(),
                &tasks,
            ))
        });
        let recorder = Recorder::start(pool.clone(), &tasks);
        let lookups = Lookups::start(pool.clone(), &tasks);
        Ok(Self {
            identity,
            settings: Arc::new(settings),
            pool,
            broker,
            names,
            registry,
            router,
            limiter,
            budgets,
            shutdown: CancellationToken::new(),
            tasks,
            recorder,
            lookups,
        })
    }

    /// The cross-worker state a dispatch consults.
    pub fn shared(&self) -> Shared<'_> {
        Shared {
            limiter: self.limiter.as_ref(),
            budgets: self.budgets.as_ref(),
            pool: Some(&self.pool),
            recorder: Some(&self.recorder),
        }
    }

    /// Cancels `shutdown` on the first SIGTERM or SIGINT.
    pub fn cancel_on_signals(&self) {
        let token = self.shutdown.clone();
        self.tasks.spawn(async move {
            wait_for_signal().await;
            tracing::info!("Shutdown signal received; finishing in-flight jobs.");
            token.cancel();
        });
    }

    /// Closes the broker connection and the pool, each within [`CLOSE_WITHIN`]: a close that
    /// does not finish (a connection still checked out by a task that is winding down, a broker
    /// that does not answer) must not keep a finished process alive; whatever it still held is
    /// released when the process exits.
    pub async fn close(&self) {
        crate::queue::close_within(
            "broker connection",
            CLOSE_WITHIN,
            self.broker.close(200, "bye"),
        )
        .await;
        if tokio::time::timeout(CLOSE_WITHIN, self.pool.close())
            .await
            .is_err()
        {
            tracing::warn!(
                within = ?CLOSE_WITHIN,
                checked_out = self.pool.size().saturating_sub(u32::try_from(self.pool.num_idle()).unwrap_or(0)),
                "Postgres connections were still checked out at exit; closing them with the process."
            );
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
