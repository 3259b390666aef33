//! RabbitMQ: topology (names and declarations), the publisher with confirms, and the
//! consumer's acknowledgement bookkeeping.

pub mod consumer;
pub mod publisher;
pub mod topology;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use lapin::{Channel, Connection, ConnectionProperties};

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
    #[error("the RabbitMQ connection is lost (reconnecting)")]
    Disconnected,
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
}

impl BrokerError {
    /// Whether trying again cannot help: a nack, a bad URL, or the broker closing the channel
    /// because what is published to does not exist (404), is not allowed (403) or breaks a
    /// precondition (406, e.g. a `user_id` that is not the connection's user). A lost
    /// connection, or any other error, may pass.
    pub fn is_permanent(&self) -> bool {
        use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
        match self {
            Self::Nacked { .. } | Self::Url(_) => true,
            Self::Amqp(error) => matches!(
                error.kind(),
                lapin::ErrorKind::ProtocolError(amqp) if matches!(
                    amqp.kind(),
                    AMQPErrorKind::Soft(
                        AMQPSoftError::NOTFOUND
                            | AMQPSoftError::ACCESSREFUSED
                            | AMQPSoftError::PRECONDITIONFAILED
                    )
                )
            ),
            Self::Unreachable { .. } | Self::Disconnected => false,
        }
    }
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

/// A message header's value as text (a long or short string), if it has one.
pub fn header_text(headers: &lapin::types::FieldTable, name: &str) -> Option<String> {
    use lapin::types::AMQPValue;
    match headers.inner().get(name)? {
        AMQPValue::LongString(text) => Some(text.to_string()),
        AMQPValue::ShortString(text) => Some(text.to_string()),
        _ => None,
    }
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

/// The broker connection shared by a process, which reconnects by itself.
///
/// lapin 4 has an opt-in auto-recovery, but it replays consumers on a new connection whose
/// delivery tags restart, under the same `Channel` handles; our ack bookkeeping is per channel
/// incarnation, so we reconnect explicitly instead: whoever finds the connection dead (a
/// worker session, a publisher, the relay) calls [`Broker::connection`], which opens a new one
/// with exponential backoff (one reconnect at a time; the others wait for it) and every user
/// then opens fresh channels on it.
#[derive(Clone)]
pub struct Broker {
    url: String,
    current: Arc<Mutex<Arc<Connection>>>,
    /// Serializes reconnects so a dead connection is replaced once, not once per caller.
    reconnecting: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("address", &broker_address(&self.url))
            .field("connected", &self.is_connected())
            .finish()
    }
}

/// How long a lost broker connection is retried before the caller gets an error.
const RECONNECT_FOR: Duration = Duration::from_secs(600);

impl Broker {
    /// Connects once; an unreachable broker at start is an error, not a wait.
    pub async fn connect(url: &str) -> Result<Self, BrokerError> {
        let connection = connect(url).await?;
        Ok(Self {
            url: url.to_owned(),
            current: Arc::new(Mutex::new(Arc::new(connection))),
            reconnecting: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// The RabbitMQ user this broker's connections log in as, when they log in with a user
    /// name (PLAIN, the default, or AMQPLAIN); `None` under EXTERNAL or ANONYMOUS, where the
    /// broker decides who the connection is.
    pub fn user(&self) -> Option<String> {
        login_user(&self.url)
    }

    fn current(&self) -> Arc<Connection> {
        match self.current.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Whether the current connection is open.
    pub fn is_connected(&self) -> bool {
        self.current().status().connected()
    }

    /// The open connection, reconnecting with backoff (for up to ten minutes) when it was lost.
    pub async fn connection(&self) -> Result<Arc<Connection>, BrokerError> {
        let current = self.current();
        if current.status().connected() {
            return Ok(current);
        }
        let _one_at_a_time = self.reconnecting.lock().await;
        let current = self.current();
        if current.status().connected() {
            return Ok(current);
        }
        tracing::warn!(address = %broker_address(&self.url), "RabbitMQ connection lost; reconnecting with backoff.");
        let fresh = (|| connect(&self.url))
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_delay(Duration::from_secs(5))
                    .with_jitter()
                    .without_max_times()
                    .with_total_delay(Some(RECONNECT_FOR)),
            )
            .notify(|error, wait| {
                tracing::info!(error.message = %error, wait = ?wait, "RabbitMQ is not reachable yet; retrying.");
            })
            .await?;
        let fresh = Arc::new(fresh);
        match self.current.lock() {
            Ok(mut guard) => *guard = fresh.clone(),
            Err(poisoned) => *poisoned.into_inner() = fresh.clone(),
        }
        metrics::counter!("switchyard_broker_reconnects_total").increment(1);
        tracing::info!(address = %broker_address(&self.url), "Reconnected to RabbitMQ.");
        Ok(fresh)
    }

    /// Opens a channel on the open connection (reconnecting first when it was lost).
    pub async fn create_channel(&self) -> Result<Channel, BrokerError> {
        Ok(self.connection().await?.create_channel().await?)
    }

    /// Closes the current connection.
    pub async fn close(&self, reply_code: u16, reply_text: &str) -> Result<(), lapin::Error> {
        self.current().close(reply_code, reply_text.into()).await
    }
}

/// The largest AMQP frame a connection asks for, unless its URL sets `frame_max`. lapin keeps
/// a receive and a send buffer of 32 frames each per connection, so RabbitMQ's default of
/// 128 KiB holds 8 MiB resident in every process; 32 KiB holds 2 MiB. A message larger than a
/// frame is split into body frames, as it always was.
const FRAME_MAX: u32 = 32 * 1024;

/// Awaits closing a channel or connection (`what`, for the logs) for at most `within`. One
/// already closed is only noted at debug level; one the broker does not confirm in time is
/// warned about and left behind, so a close never keeps a session or a process waiting.
pub async fn close_within(
    what: &str,
    within: Duration,
    close: impl std::future::Future<Output = Result<(), lapin::Error>>,
) {
    match tokio::time::timeout(within, close).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::debug!(error = %error, "{what} was already closed."),
        Err(_) => tracing::warn!(
            ?within,
            "The broker did not confirm closing the {what}; going on without it."
        ),
    }
}

/// The user name an AMQP URL logs in with (percent-decoded; `guest` when it names none), or
/// `None` when its mechanism (EXTERNAL, ANONYMOUS) leaves the user to the broker.
fn login_user(url: &str) -> Option<String> {
    use lapin::uri::{AMQPUri, SASLMechanism};
    let uri: AMQPUri = url.parse().ok()?;
    match uri.query.auth_mechanism.unwrap_or_default() {
        SASLMechanism::Plain | SASLMechanism::AMQPlain | SASLMechanism::RabbitCrDemo => {
            Some(uri.authority.userinfo.username)
        }
        SASLMechanism::External | SASLMechanism::Anonymous => None,
    }
}

/// Opens a connection, turning failures into a one-line error that names the address.
pub async fn connect(url: &str) -> Result<Connection, BrokerError> {
    // The AMQP parser starts with `url::Url::parse`, whose error text it passes on.
    let mut uri: lapin::uri::AMQPUri = url.parse().map_err(BrokerError::Url)?;
    uri.query.frame_max.get_or_insert(FRAME_MAX);
    Connection::connect_uri(uri, ConnectionProperties::default())
        .await
        .map_err(|source| BrokerError::Unreachable {
            address: broker_address(url),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_login_user_is_the_urls_user_unless_the_broker_decides_it() {
        assert_eq!(
            login_user("amqp://acme-eu:secret@127.0.0.1:5672/%2f").as_deref(),
            Some("acme-eu")
        );
        assert_eq!(
            login_user("amqp://a%40b:secret@127.0.0.1/%2f").as_deref(),
            Some("a@b")
        );
        assert_eq!(
            login_user("amqp://127.0.0.1:5672/%2f").as_deref(),
            Some("guest")
        );
        assert_eq!(
            login_user("amqps://acme@broker.example/%2f?auth_mechanism=external"),
            None
        );
        assert_eq!(
            login_user("amqp://127.0.0.1/%2f?auth_mechanism=anonymous"),
            None
        );
    }

    #[tokio::test]
    async fn a_close_the_broker_never_confirms_is_given_up_after_its_time() {
        let began = std::time::Instant::now();
        close_within(
            "test channel",
            Duration::from_millis(50),
            std::future::pending(),
        )
        .await;
        let waited = began.elapsed();
        assert!(waited >= Duration::from_millis(50), "{waited:?}");
        assert!(waited < Duration::from_secs(5), "{waited:?}");
    }
}
