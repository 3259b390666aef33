//! Integration tests against the machine's real RabbitMQ and Postgres. Each test gets its own
//! database and its own broker prefix, so tests run in parallel.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers fail the test by panicking with a message"
)]

mod helpers;

mod audit;
mod bad_input;
mod bench_smoke;
mod broker;
mod budgets;
mod bulk;
mod chaos;
mod cli;
mod dead_letters;
mod duplicates;
mod isolation;
mod kill;
mod limits;
mod outbox;
mod pipeline;
mod poison;
mod private;
mod providers;
mod reports;
mod retention;
mod routing;
mod secrets;
mod summarize;
