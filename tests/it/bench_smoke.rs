//! The benchmark's smoke run (`switchyard-bench --smoke`): it completes, prints its table and
//! every job gets a result. Timings are printed, never asserted.

use std::path::Path;
use std::process::Command;

use crate::helpers::{broker_url, database_server};

#[tokio::test]
async fn the_benchmark_smoke_run_completes_and_every_job_gets_a_result() {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_switchyard"))
        .parent()
        .expect("binaries have a directory");
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_switchyard-bench"))
            .args([
                "--smoke",
                "--jobs",
                "200",
                "--in-flight",
                "200",
                "--scaling",
                "100,200",
            ])
            .arg("--bin-dir")
            .arg(bin_dir)
            .args(["--broker-url", &broker_url()])
            .args(["--database-server", &database_server()])
            .env_remove("RUST_LOG")
            .output()
    })
    .await
    .unwrap()
    .expect("switchyard-bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "switchyard-bench failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(
        stdout.contains("| figure | measured | target | met |"),
        "{stdout}"
    );
    assert!(stdout.contains("pipeline ÷ raw relay"), "{stdout}");
    // Postgres runs on this machine, so its CPU per job is reported beside the worker's.
    assert!(
        stdout.contains(
            "| Postgres CPU ms/job, healthy (every Postgres process on the machine) | 0."
        ),
        "{stdout}"
    );
    assert!(stdout.contains("every job got a result: yes"), "{stdout}");
}
