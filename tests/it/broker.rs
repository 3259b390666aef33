//! The broker connection itself: the frame size it asks for, and that messages larger than a
//! frame still arrive whole.

use std::time::Duration;

use futures::StreamExt;
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;

use crate::helpers::broker_url;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_ask_for_32_kib_frames_unless_the_url_sets_one_and_carry_larger_messages() {
    let url = broker_url();
    let connection = switchyard::queue::connect(&url).await.unwrap();
    assert_eq!(
        connection.configuration().frame_max(),
        32 * 1024,
        "lapin's buffers are 32 frames each; the default frame is 32 KiB, not RabbitMQ's 128"
    );

    // A 200 KiB message crosses seven frames each way and comes back byte for byte.
    let channel = connection.create_channel().await.unwrap();
    let key = format!("frames-{}", uuid::Uuid::now_v7());
    let mut consumer = switchyard::queue::listen(&channel, "amq.direct", &key)
        .await
        .unwrap();
    let body: Vec<u8> = (0..200 * 1024_u32)
        .map(|i| u8::try_from(i % 251).unwrap())
        .collect();
    channel
        .basic_publish(
            "amq.direct".into(),
            key.as_str().into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default(),
        )
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("the message reaches its queue")
        .expect("the consumer is open")
        .unwrap();
    assert_eq!(got.data.len(), body.len());
    assert!(got.data == body, "the body arrives unchanged");

    // The URL's own setting wins.
    let separator = if url.contains('?') { '&' } else { '?' };
    let larger = switchyard::queue::connect(&format!("{url}{separator}frame_max=65536"))
        .await
        .unwrap();
    assert_eq!(larger.configuration().frame_max(), 65536);
}

/// A batch is handed to lapin all at once (not one write at a time), yet its messages reach a
/// queue in the order given, each confirmed: 300 messages, more than `try_join_all` polls as
/// a plain list, so the ordered set it uses then is what keeps the order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_batch_arrives_in_the_order_given() {
    use switchyard::queue::publisher::{Outgoing, Publisher};

    let broker = switchyard::queue::Broker::connect(&broker_url())
        .await
        .unwrap();
    let connection = broker.connection().await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let key = format!("order-{}", uuid::Uuid::now_v7());
    let mut consumer = switchyard::queue::listen(&channel, "amq.direct", &key)
        .await
        .unwrap();
    let publisher = Publisher::open(&broker).await.unwrap();
    let messages: Vec<Outgoing> = (0..300)
        .map(|i| Outgoing {
            exchange: "amq.direct".to_owned(),
            routing_key: key.clone(),
            body: vec![b'x'; 100 + i % 7 * 1000],
            message_id: i.to_string(),
            kind: "test".to_owned(),
            headers: None,
        })
        .collect();
    publisher.publish_all_once(&messages).await.unwrap();
    let mut order = Vec::with_capacity(messages.len());
    while order.len() < messages.len() {
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("every message reaches the queue")
            .expect("the consumer is open")
            .unwrap();
        let id = delivery.properties.message_id().as_ref().unwrap();
        order.push(id.as_str().parse::<usize>().unwrap());
    }
    assert_eq!(order, (0..300).collect::<Vec<_>>());
}
