//! `switchyard subscribe PATTERN`: bind a temporary queue to the results (or events) exchange
//! and print each message body as one JSON line.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context as _;
use futures::StreamExt;

use crate::cli::SubscribeArgs;
use crate::config::Settings;
use crate::queue;
use crate::queue::topology::Names;

pub async fn run(settings: Settings, args: SubscribeArgs) -> anyhow::Result<ExitCode> {
    let broker = queue::connect(&settings.broker.url).await?;
    let names = Names::new(&settings.broker.prefix);
    let exchange = if args.events {
        names.events_exchange()
    } else {
        names.results_exchange()
    };
    let channel = broker.create_channel().await?;
    let mut consumer = queue::listen(&channel, &exchange, &args.pattern)
        .await
        .with_context(|| {
            format!("cannot bind to exchange {exchange} (run `switchyard migrate`?)")
        })?;
    eprintln!("subscribe: listening on {exchange} for {:?}", args.pattern);
    let mut seen = 0u64;
    let mut out = std::io::stdout();
    loop {
        if args.limit.is_some_and(|limit| seen >= limit) {
            break;
        }
        let delivery = tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            next = consumer.next() => match next {
                Some(delivery) => delivery?,
                None => break,
            },
        };
        // Bodies are compact JSON already; re-encode anything else so each line is one value.
        let line = match serde_json::from_slice::<serde_json::Value>(&delivery.data) {
            Ok(value) => value.to_string(),
            Err(_) => {
                serde_json::Value::String(String::from_utf8_lossy(&delivery.data).into_owned())
                    .to_string()
            }
        };
        let mut lock = out.lock();
        writeln!(lock, "{line}")?;
        lock.flush()?;
        seen += 1;
    }
    out.flush()?;
    broker.close(200, "bye".into()).await.ok();
    Ok(ExitCode::SUCCESS)
}
