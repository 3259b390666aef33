//! Test-only crash points. `SWITCHYARD_FAILPOINT` names the points that are armed
//! (comma-separated); unset — as in production — every point is a no-op. Chaos tests use them
//! to crash a worker exactly where a real crash would hurt most.

use std::sync::OnceLock;

/// Exit the process (code 137, as after SIGKILL) right after a finalize group commits and
/// before its messages are published.
pub const AFTER_COMMIT: &str = "after_commit";

/// Answer every call of a recorder group with an error although the group's transaction
/// committed, as when the connection fails after COMMIT and before its answer arrives.
pub const RECORD_REPLY_LOST: &str = "record_reply_lost";

/// `cost_ledger::is_recorded` cannot tell (as when Postgres does not answer in time), so a
/// record whose answer was lost is left to finalize.
pub const RECORD_UNVERIFIABLE: &str = "record_unverifiable";

/// A tiered call's record fails before it commits (as when Postgres drops the connection in
/// the middle), so finalize records the call with its job.
pub const RECORD_TIERED_FAILS: &str = "record_tiered_fails";

/// Honour `"switchyard_failpoint": "exit" | "panic"` in a job's metadata: exit the process (code
/// 137) or panic the job's task while processing that job.
pub const JOB_METADATA: &str = "job_metadata";

/// The environment variable naming the armed points.
pub const ENV: &str = "SWITCHYARD_FAILPOINT";

fn armed() -> &'static [String] {
    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var(ENV)
            .map(|value| value.split(',').map(|p| p.trim().to_owned()).collect())
            .unwrap_or_default()
    })
}

/// Whether the point `name` is armed.
pub fn is_armed(name: &str) -> bool {
    armed().iter().any(|point| point == name)
}

/// Exits the process with code 137 when `name` is armed.
pub fn hit(name: &str) {
    if is_armed(name) {
        crash(name);
    }
}

/// Exits at once with code 137, skipping destructors, like a process killed with SIGKILL.
pub fn crash(name: &str) -> ! {
    tracing::error!(
        failpoint = name,
        "Failpoint reached; exiting with code 137."
    );
    std::process::exit(137)
}

/// For a job whose metadata asks for it (and only when [`JOB_METADATA`] is armed): exits the
/// process or panics the calling task.
pub fn on_job(metadata: Option<&serde_json::Value>) {
    if !is_armed(JOB_METADATA) {
        return;
    }
    match metadata
        .and_then(|m| m.get("switchyard_failpoint"))
        .and_then(|v| v.as_str())
    {
        Some("exit") => crash(JOB_METADATA),
        Some("panic") => panic!("failpoint {JOB_METADATA}: this job's task panics"),
        _ => {}
    }
}
