//! `switchyard`: parse the CLI, initialise telemetry, load config, run the command.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use switchyard::cli::{Cli, Command};
use switchyard::config::Settings;
use switchyard::{commands, telemetry};

/// jemalloc rather than glibc's malloc: a worker allocates from every runtime thread, and
/// glibc's per-thread arenas keep what was freed while jemalloc's allocation path is also
/// cheaper. Measured with `bench/run.sh` (issue 9): worker CPU per job 0.25 → 0.15 ms on
/// the healthy run. Its options (a background purge thread, freed pages returned after
/// 200 ms) are built in from `.cargo/config.toml`.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// How long tasks still running when a command is done may take to stop before the process
/// exits anyway (the runtime otherwise waits for every blocking task without limit).
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run());
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    code
}

async fn run() -> ExitCode {
    let cli = Cli::parse();
    // The summarizer draws a progress bar on stderr; keep routine logs out of its way.
    let level = match cli.command {
        Command::Summarize(_)
        | Command::Publish(_)
        | Command::Subscribe(_)
        | Command::Report(_)
        | Command::DeadLetters(_)
        | Command::Batch(_)
        | Command::Replay(_)
        | Command::Audit(_) => "warn",
        _ => "info",
    };
    telemetry::init(cli.log_format, level);
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(commands::EXIT_BAD_INPUT);
        }
    };
    commands::run(cli.command, settings).await
}
