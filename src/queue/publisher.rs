//! Publishing with publisher confirms: every message of a batch is handed to lapin at once, in
//! order, and every confirm is awaited; a broker nack is an error, never a success. A publisher whose connection was lost
//! opens a new channel on the reconnected [`Broker`] by itself.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use futures::future::{join_all, try_join_all};
use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel};

use super::{Broker, BrokerError};

/// A message ready to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub exchange: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    /// Job id or event id: consumers dedupe on it.
    pub message_id: String,
    /// Schema name, e.g. `switchyard.result.v1`.
    pub kind: String,
    pub headers: Option<FieldTable>,
}

/// A channel in confirm mode, replaced by a new one when its connection was lost. Clones share
/// the channel.
#[derive(Debug, Clone)]
pub struct Publisher {
    broker: Broker,
    channel: Arc<Mutex<Channel>>,
    /// The AMQP `user_id` every message carries (see [`Publisher::signed`]).
    user_id: Option<ShortString>,
}

async fn confirm_channel(broker: &Broker) -> Result<Channel, BrokerError> {
    let channel = broker.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

impl Publisher {
    /// Opens a channel on `broker` and enables confirms on it.
    pub async fn open(broker: &Broker) -> Result<Self, BrokerError> {
        let channel = confirm_channel(broker).await?;
        Ok(Self {
            broker: broker.clone(),
            channel: Arc::new(Mutex::new(channel)),
            user_id: None,
        })
    }

    /// Like [`Publisher::open`], and every message carries the user the connection logs in as
    /// as its AMQP `user_id` (RabbitMQ refuses any other), so a worker that enforces user ids
    /// (`enforce_user_id`) can tell who published a job. The commands that publish jobs use it.
    pub async fn signed(broker: &Broker) -> Result<Self, BrokerError> {
        let mut publisher = Self::open(broker).await?;
        publisher.user_id = broker.user().map(ShortString::from);
        Ok(publisher)
    }

    /// [`Publisher::signed`] when `sign`, else [`Publisher::open`].
    pub async fn signed_if(broker: &Broker, sign: bool) -> Result<Self, BrokerError> {
        if sign {
            Self::signed(broker).await
        } else {
            Self::open(broker).await
        }
    }

    /// Closes the channel, waiting at most `within` for the broker's answer. Call it before the
    /// connection closes: a channel whose last handle is dropped instead closes itself on
    /// lapin's own task, and when that lands while the connection is closing, lapin logs the
    /// refused close as a connection error ("invalid channel state: Closing").
    pub async fn close(&self, within: Duration) {
        let channel = self.channel();
        if !channel.status().connected() {
            return;
        }
        super::close_within(
            "publisher channel",
            within,
            channel.close(200, "done".into()),
        )
        .await;
    }

    /// The current confirm channel.
    pub fn channel(&self) -> Channel {
        match self.channel.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The current channel, or a new one (after reconnecting) when it is no longer open.
    async fn open_channel(&self) -> Result<Channel, BrokerError> {
        let channel = self.channel();
        if channel.status().connected() {
            return Ok(channel);
        }
        let fresh = confirm_channel(&self.broker).await?;
        match self.channel.lock() {
            Ok(mut guard) => *guard = fresh.clone(),
            Err(poisoned) => *poisoned.into_inner() = fresh.clone(),
        }
        Ok(fresh)
    }

    /// Publishes every message and waits for every confirm; when the connection is lost on
    /// the way, reconnects with backoff and publishes the whole batch again (so a message may
    /// arrive twice: subscribers dedupe on `message_id`). A broker nack, or a refusal no retry
    /// can change ([`BrokerError::is_permanent`]: no such exchange, access refused), is not
    /// retried.
    pub async fn publish_all(&self, messages: &[Outgoing]) -> Result<(), BrokerError> {
        (|| async {
            // Reconnects (with its own backoff) when the connection was lost.
            self.broker.connection().await?;
            self.publish_all_once(messages).await
        })
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_delay(Duration::from_secs(5))
                    .with_jitter()
                    .without_max_times()
                    .with_total_delay(Some(Duration::from_secs(600))),
            )
            .when(|error| !error.is_permanent())
            .notify(|error, wait| {
                tracing::warn!(error.message = %error, wait = ?wait, "Publishing failed; retrying on a new channel.");
            })
            .await
    }

    /// Publishes every message (pipelined) and waits until the broker confirmed all of them;
    /// one try, for callers that recover by themselves (the finalizer leaves the messages to
    /// the outbox relay).
    pub async fn publish_all_once(&self, messages: &[Outgoing]) -> Result<(), BrokerError> {
        let channel = self.ready_channel().await?;
        // Every message is handed to lapin at once: each publish waits until lapin's I/O loop
        // has written its frames, and awaiting them one after another would add a hand-off to
        // that loop per message. The futures are first polled in order (`try_join_all` polls
        // them in the order given), so the messages go out in order.
        try_join_all(messages.iter().map(|m| self.publish_on(&channel, m))).await?;
        Ok(())
    }

    /// Like [`Publisher::publish_all_once`], but a message the broker refuses (a nack) does not
    /// stop the others: returns, per message, whether the broker took it.
    pub async fn publish_each_once(&self, messages: &[Outgoing]) -> Result<Vec<bool>, BrokerError> {
        let channel = self.ready_channel().await?;
        join_all(messages.iter().map(|m| self.publish_on(&channel, m)))
            .await
            .into_iter()
            .map(|outcome| match outcome {
                Ok(()) => Ok(true),
                Err(BrokerError::Nacked { .. }) => Ok(false),
                Err(error) => Err(error),
            })
            .collect()
    }

    /// This publisher's channel, when the broker is connected.
    async fn ready_channel(&self) -> Result<Channel, BrokerError> {
        if !self.broker.is_connected() {
            return Err(BrokerError::Disconnected);
        }
        self.open_channel().await
    }

    /// Publishes `message` on `channel` and waits for its confirm; a nack is an error.
    async fn publish_on(&self, channel: &Channel, message: &Outgoing) -> Result<(), BrokerError> {
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(message.message_id.as_str().into())
            .with_type(message.kind.as_str().into())
            .with_timestamp(u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0));
        if let Some(headers) = &message.headers {
            properties = properties.with_headers(headers.clone());
        }
        if let Some(user) = &self.user_id {
            properties = properties.with_user_id(user.clone());
        }
        let confirm = channel
            .basic_publish(
                message.exchange.as_str().into(),
                message.routing_key.as_str().into(),
                BasicPublishOptions::default(),
                &message.body,
                properties,
            )
            .await?;
        match confirm.await? {
            Confirmation::Nack(_) => Err(BrokerError::Nacked {
                exchange: message.exchange.clone(),
                routing_key: message.routing_key.clone(),
            }),
            Confirmation::Ack(_) | Confirmation::NotRequested => Ok(()),
        }
    }

    /// Publishes one message and waits for its confirm.
    pub async fn publish(&self, message: Outgoing) -> Result<(), BrokerError> {
        self.publish_all(std::slice::from_ref(&message)).await
    }
}
