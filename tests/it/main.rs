//! Integration tests against the machine's real RabbitMQ and Postgres. Each test gets its own
//! database and its own broker prefix, so tests run in parallel.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers fail the test by panicking with a message"
)]

mod helpers;

mod bad_input;
mod bench_smoke;
mod budgets;
mod cli;
mod dead_letters;
mod duplicates;
mod kill;
mod limits;
mod pipeline;
mod providers;
mod reports;
mod routing;
mod summarize;
