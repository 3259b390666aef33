//! `switchyard worker`: consume and process jobs until SIGTERM/SIGINT (or idle).

use std::process::ExitCode;
use std::time::Duration;

use crate::app::Context;
use crate::cli::WorkerArgs;
use crate::config::Settings;
use crate::worker::{self, WorkerOptions};

pub async fn run(settings: Settings, args: WorkerArgs) -> anyhow::Result<ExitCode> {
    let options = WorkerOptions {
        concurrency: args
            .concurrency
            .unwrap_or(settings.worker.concurrency)
            .max(1),
        exit_when_idle: args.exit_when_idle,
        idle_after: Duration::from_secs(1),
        grace: Duration::from_secs(settings.worker.shutdown_grace_secs),
    };
    let ctx = Context::connect(settings).await?;
    ctx.cancel_on_signals();
    let outcome = worker::run(&ctx, &options).await;
    ctx.shutdown.cancel();
    ctx.close().await;
    outcome?;
    Ok(ExitCode::SUCCESS)
}
