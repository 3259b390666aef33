//! The worker's HTTP side: `/healthz` (the process runs), `/readyz` (Postgres and RabbitMQ
//! answer), `/metrics` (Prometheus text).

use std::sync::OnceLock;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::app::Context;

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide metrics recorder once and returns its handle (`None` if another
/// recorder was installed first).
pub fn metrics_handle() -> Option<&'static PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| PrometheusBuilder::new().install_recorder().ok())
        .as_ref()
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(ctx): State<Context>) -> (StatusCode, String) {
    // An unreachable Postgres makes the pool wait for its acquire timeout; answer sooner.
    let database = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        sqlx::query("SELECT 1").execute(&ctx.pool),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    // An idle worker learns of an outage here too, not only from a group it cannot commit.
    metrics::gauge!("switchyard_database_up").set(if database { 1.0 } else { 0.0 });
    let broker = ctx.broker.is_connected();
    let status = if database && broker {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        format!("database: {}\nbroker: {}\n", up(database), up(broker)),
    )
}

fn up(ok: bool) -> &'static str {
    if ok { "up" } else { "down" }
}

async fn metrics() -> (StatusCode, String) {
    match metrics_handle() {
        Some(handle) => (StatusCode::OK, handle.render()),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder unavailable\n".to_owned(),
        ),
    }
}

/// Serves until `shutdown` on an already bound listener.
pub async fn serve(
    listener: tokio::net::TcpListener,
    ctx: Context,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    metrics_handle();
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(ctx);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
