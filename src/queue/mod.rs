//! RabbitMQ: topology (names and declarations), the publisher with confirms, and the
//! consumer's acknowledgement bookkeeping.

pub mod consumer;
pub mod publisher;
pub mod topology;

use lapin::{Connection, ConnectionProperties};

/// Why the broker could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(
        "cannot connect to RabbitMQ at {address}: {source}. Is it running? Start it with \
         `rabbitmq-server -detached`, or set [broker] url / SWITCHYARD_BROKER__URL"
    )]
    Unreachable {
        address: String,
        #[source]
        source: lapin::Error,
    },
    #[error("invalid broker url: {0}")]
    Url(String),
    #[error("broker refused a publish (nack) to {exchange} with routing key {routing_key}")]
    Nacked {
        exchange: String,
        routing_key: String,
    },
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
}

/// A temporary (exclusive, auto-delete) queue bound to `exchange` with `pattern`, consumed
/// without acks: for listeners such as `subscribe` and `summarize`.
pub async fn listen(
    channel: &lapin::Channel,
    exchange: &str,
    pattern: &str,
) -> Result<lapin::Consumer, lapin::Error> {
    use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    let temporary = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    let queue = channel
        .queue_declare("".into(), temporary, FieldTable::default())
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            exchange.into(),
            pattern.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

/// `host:port` of an AMQP URL, without credentials, for error messages.
pub fn broker_address(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(parsed) => format!(
            "{}:{}",
            parsed.host_str().unwrap_or("?"),
            parsed.port().unwrap_or(5672)
        ),
        Err(_) => "(unparsable url)".to_owned(),
    }
}

/// Opens a connection, turning failures into a one-line error that names the address.
pub async fn connect(url: &str) -> Result<Connection, BrokerError> {
    url::Url::parse(url).map_err(|e| BrokerError::Url(e.to_string()))?;
    Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(|source| BrokerError::Unreachable {
            address: broker_address(url),
            source,
        })
}
