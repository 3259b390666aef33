//! Publishing with publisher confirms: every message of a batch is sent, then every confirm is
//! awaited; a broker nack is an error, never a success.

use futures::future::try_join_all;
use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};

use super::BrokerError;

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

/// A channel in confirm mode.
#[derive(Debug, Clone)]
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    /// Opens a channel on `connection` and enables confirms on it.
    pub async fn open(connection: &Connection) -> Result<Self, BrokerError> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self { channel })
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes every message (pipelined) and waits until the broker confirmed all of them.
    pub async fn publish_all(&self, messages: &[Outgoing]) -> Result<(), BrokerError> {
        let mut confirms = Vec::with_capacity(messages.len());
        for message in messages {
            let mut properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(message.message_id.as_str().into())
                .with_type(message.kind.as_str().into())
                .with_timestamp(u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0));
            if let Some(headers) = &message.headers {
                properties = properties.with_headers(headers.clone());
            }
            let confirm = self
                .channel
                .basic_publish(
                    message.exchange.as_str().into(),
                    message.routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    &message.body,
                    properties,
                )
                .await?;
            confirms.push(async move {
                match confirm.await? {
                    Confirmation::Nack(_) => Err(BrokerError::Nacked {
                        exchange: message.exchange.clone(),
                        routing_key: message.routing_key.clone(),
                    }),
                    Confirmation::Ack(_) | Confirmation::NotRequested => Ok(()),
                }
            });
        }
        try_join_all(confirms).await?;
        Ok(())
    }

    /// Publishes one message and waits for its confirm.
    pub async fn publish(&self, message: Outgoing) -> Result<(), BrokerError> {
        self.publish_all(std::slice::from_ref(&message)).await
    }
}
