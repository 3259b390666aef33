//! `switchyard`: parse the CLI, initialise telemetry, load config, run the command.

use std::process::ExitCode;

use clap::Parser;
use switchyard::cli::{Cli, Command};
use switchyard::config::Settings;
use switchyard::{commands, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
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
