//! Exchange and queue names (all under one prefix) and their idempotent declaration.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

/// Delays of the retry queues: a parked job waits there, then dead-letters back to the jobs
/// exchange (no delayed-message plugin needed).
pub const RETRY_TIERS_SECS: [u64; 3] = [1, 10, 60];

/// The routing key jobs are published with on the jobs exchange.
pub const JOBS_ROUTING_KEY: &str = "jobs";

/// Names of every exchange and queue of one deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    prefix: String,
}

impl Names {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Direct exchange jobs are published to.
    pub fn jobs_exchange(&self) -> String {
        format!("{}.jobs", self.prefix)
    }

    /// Quorum queue workers consume.
    pub fn jobs_queue(&self) -> String {
        format!("{}.jobs", self.prefix)
    }

    /// Fanout exchange for poison, rejected and exhausted jobs.
    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// The delayed retry queue whose delay is the shortest that covers `wait` (longest tier
    /// for anything longer).
    pub fn retry_queue(&self, wait: std::time::Duration) -> String {
        let tier = RETRY_TIERS_SECS
            .iter()
            .find(|tier| std::time::Duration::from_secs(**tier) >= wait)
            .unwrap_or(&RETRY_TIERS_SECS[RETRY_TIERS_SECS.len() - 1]);
        format!("{}.retry.{tier}s", self.prefix)
    }

    /// Every delayed retry queue with its delay in seconds.
    pub fn retry_queues(&self) -> Vec<(String, u64)> {
        RETRY_TIERS_SECS
            .iter()
            .map(|tier| (format!("{}.retry.{tier}s", self.prefix), *tier))
            .collect()
    }

    /// Topic exchange of results, routing key `<tenant>.<batch>.<status>`.
    pub fn results_exchange(&self) -> String {
        format!("{}.results", self.prefix)
    }

    /// Topic exchange of cost and audit events.
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

fn quorum_arguments(extra: &[(&str, AMQPValue)]) -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    for (key, value) in extra {
        arguments.insert((*key).into(), value.clone());
    }
    arguments
}

/// Declares the whole topology; declaring it again with the same settings changes nothing.
pub async fn declare(
    channel: &Channel,
    names: &Names,
    delivery_limit: u32,
) -> Result<(), lapin::Error> {
    for (exchange, kind) in [
        (names.jobs_exchange(), ExchangeKind::Direct),
        (names.dead_exchange(), ExchangeKind::Fanout),
        (names.results_exchange(), ExchangeKind::Topic),
        (names.events_exchange(), ExchangeKind::Topic),
    ] {
        channel
            .exchange_declare(
                exchange.into(),
                kind,
                durable_exchange(),
                FieldTable::default(),
            )
            .await?;
    }
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(names.dead_queue().into(), durable, quorum_arguments(&[]))
        .await?;
    channel
        .queue_bind(
            names.dead_queue().into(),
            names.dead_exchange().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let jobs_arguments = quorum_arguments(&[
        (
            "x-delivery-limit",
            AMQPValue::LongInt(i32::try_from(delivery_limit).unwrap_or(i32::MAX)),
        ),
        (
            "x-dead-letter-exchange",
            AMQPValue::LongString(names.dead_exchange().into()),
        ),
    ]);
    channel
        .queue_declare(names.jobs_queue().into(), durable, jobs_arguments)
        .await?;
    for (queue, delay) in names.retry_queues() {
        let arguments = quorum_arguments(&[
            (
                "x-message-ttl",
                AMQPValue::LongLongInt(i64::try_from(delay * 1000).unwrap_or(i64::MAX)),
            ),
            (
                "x-dead-letter-exchange",
                AMQPValue::LongString(names.jobs_exchange().into()),
            ),
            (
                "x-dead-letter-routing-key",
                AMQPValue::LongString(JOBS_ROUTING_KEY.into()),
            ),
        ]);
        channel
            .queue_declare(queue.as_str().into(), durable, arguments)
            .await?;
    }
    channel
        .queue_bind(
            names.jobs_queue().into(),
            names.jobs_exchange().into(),
            JOBS_ROUTING_KEY.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// Messages ready in the jobs queue and consumers attached to it.
pub async fn jobs_queue_depth(
    channel: &Channel,
    names: &Names,
) -> Result<(u32, u32), lapin::Error> {
    let queue = channel
        .queue_declare(
            names.jobs_queue().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok((queue.message_count(), queue.consumer_count()))
}

/// Jobs waiting anywhere: ready in the jobs queue or parked in a retry queue.
pub async fn pending_jobs(channel: &Channel, names: &Names) -> Result<u64, lapin::Error> {
    let ready = u64::from(jobs_queue_depth(channel, names).await?.0);
    Ok(ready + parked_jobs(channel, names).await?)
}

/// Jobs parked in the retry queues.
pub async fn parked_jobs(channel: &Channel, names: &Names) -> Result<u64, lapin::Error> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let mut parked = 0;
    for (queue, _) in names.retry_queues() {
        let queue = channel
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await?;
        parked += u64::from(queue.message_count());
    }
    Ok(parked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_starts_with_the_prefix() {
        let names = Names::new("t1");
        for name in [
            names.jobs_exchange(),
            names.jobs_queue(),
            names.dead_exchange(),
            names.dead_queue(),
            names.results_exchange(),
            names.events_exchange(),
        ] {
            assert!(name.starts_with("t1."), "{name}");
        }
    }

    #[test]
    fn a_parked_job_goes_to_the_shortest_tier_that_covers_its_wait() {
        let names = Names::new("p");
        assert_eq!(
            names.retry_queue(std::time::Duration::from_millis(300)),
            "p.retry.1s"
        );
        assert_eq!(
            names.retry_queue(std::time::Duration::from_secs(5)),
            "p.retry.10s"
        );
        assert_eq!(
            names.retry_queue(std::time::Duration::from_secs(3600)),
            "p.retry.60s"
        );
    }
}
