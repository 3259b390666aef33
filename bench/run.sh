#!/usr/bin/env bash
# Builds the release binaries and runs the throughput benchmark (issue 9) against the
# machine's RabbitMQ and Postgres on 127.0.0.1. Arguments go to `switchyard-bench`, e.g.
#   bench/run.sh                 # every scenario; appends to bench/RESULTS.md
#   bench/run.sh --smoke         # a quick, small version (records nothing)
#   bench/run.sh --only raw,healthy --jobs 50000
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin switchyard --bin fake-provider --bin switchyard-bench
exec target/release/switchyard-bench "$@"
