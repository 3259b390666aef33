//! One file per CLI command. Each returns `anyhow::Result`; [`run`] turns errors into one
//! line on stderr and an exit code.

pub mod audit;
pub mod batch;
pub mod config_check;
pub mod dead_letters;
pub mod migrate;
pub mod publish;
pub mod replay;
pub mod report;
pub mod subscribe;
pub mod summarize;
pub mod worker;

use std::process::ExitCode;

use crate::cli::{AuditCommand, Command, ConfigCommand, ReportCommand};
use crate::config::Settings;

/// Exit code for runtime failures (broker or database unreachable, …).
pub const EXIT_FAILURE: u8 = 1;
/// Exit code for bad input: bad config, bad arguments, bad input lines.
pub const EXIT_BAD_INPUT: u8 = 2;
/// Exit code when the command ran but some jobs failed.
pub const EXIT_JOBS_FAILED: u8 = 3;

/// Exit code of a command stopped by Ctrl-C (128 + SIGINT).
pub const EXIT_INTERRUPTED: u8 = 130;

/// A command stopped by SIGINT/SIGTERM before it was done.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Interrupted(pub String);

/// An error that is the user's input, not the system's state.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

/// Why `job` would be rejected unread by workers whose `worker.max_message_bytes` is `max`:
/// its size as a message, when over. Such a rejection's result cannot name the job's tenant or
/// batch, so a command must not publish it (nothing that waits for its batch would hear back).
pub fn too_large_for_workers(job: &crate::messages::Job, max: usize) -> Option<String> {
    // Counted, not written out: the job is serialized once more when it is published.
    let bytes = crate::budget::json_len(job);
    (bytes > max as u64).then(|| {
        format!(
            "the job is a {bytes}-byte message, over worker.max_message_bytes ({max}), which \
             workers reject unread"
        )
    })
}

/// The publisher for the jobs a command publishes. Where this configuration enforces user ids
/// for any tenant, it signs them with the user it logs in as ([`Publisher::signed`]), which is
/// what workers check; elsewhere it sets no `user_id`, so a broker whose users are not the
/// URL's login names (an OAuth2 backend, say) never sees one that is not its own.
///
/// [`Publisher::signed`]: crate::queue::publisher::Publisher::signed
pub async fn job_publisher(
    broker: &crate::queue::Broker,
    settings: &Settings,
) -> Result<crate::queue::publisher::Publisher, crate::queue::BrokerError> {
    crate::queue::publisher::Publisher::signed_if(broker, settings.enforces_any_user_id()).await
}

/// `route` as a `--route` argument: a configured route, or a [`BadInput`] saying it is not
/// (before anything is published that would only come back rejected).
pub fn configured_route(settings: &Settings, route: &str) -> Result<(), BadInput> {
    if settings.routes.iter().any(|r| r.alias == route) {
        Ok(())
    } else {
        Err(BadInput(format!(
            "--route {route:?} is not a configured route"
        )))
    }
}

/// Runs one command and maps its outcome to an exit code.
pub async fn run(command: Command, settings: Settings) -> ExitCode {
    let outcome = match command {
        Command::Migrate => migrate::run(settings).await,
        Command::Worker(args) => worker::run(settings, args).await,
        Command::Publish(args) => publish::run(settings, args).await,
        Command::Subscribe(args) => subscribe::run(settings, args).await,
        Command::Summarize(args) => summarize::run(settings, args).await,
        Command::Batch(command) => batch::run(settings, command).await,
        Command::Replay(args) => replay::run(settings, args).await,
        Command::Report(ReportCommand::Costs(args)) => report::run(settings, args).await,
        Command::DeadLetters(command) => dead_letters::run(settings, command).await,
        Command::Config(ConfigCommand::Check) => config_check::run(&settings),
        Command::Audit(AuditCommand::Verify(args)) => audit::verify(settings, args).await,
    };
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            if error.downcast_ref::<BadInput>().is_some() {
                ExitCode::from(EXIT_BAD_INPUT)
            } else if error.downcast_ref::<Interrupted>().is_some() {
                ExitCode::from(EXIT_INTERRUPTED)
            } else {
                ExitCode::from(EXIT_FAILURE)
            }
        }
    }
}
