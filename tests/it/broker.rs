//! The broker connection itself: the frame size it asks for, and that messages larger than a
//! frame still arrive whole.

use lapin::BasicProperties;
use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;

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
    let temporary = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    let queue = channel
        .queue_declare("".into(), temporary, FieldTable::default())
        .await
        .unwrap();
    let body: Vec<u8> = (0..200 * 1024_u32)
        .map(|i| u8::try_from(i % 251).unwrap())
        .collect();
    channel
        .basic_publish(
            "".into(),
            queue.name().clone(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default(),
        )
        .await
        .unwrap();
    let mut got = None;
    for _ in 0..50 {
        got = channel
            .basic_get(queue.name().clone(), BasicGetOptions { no_ack: true })
            .await
            .unwrap();
        if got.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let got = got.expect("the message reaches its queue");
    assert_eq!(got.delivery.data.len(), body.len());
    assert!(got.delivery.data == body, "the body arrives unchanged");

    // The URL's own setting wins.
    let separator = if url.contains('?') { '&' } else { '?' };
    let larger = switchyard::queue::connect(&format!("{url}{separator}frame_max=65536"))
        .await
        .unwrap();
    assert_eq!(larger.configuration().frame_max(), 65536);
}
