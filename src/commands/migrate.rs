//! `switchyard migrate`: create the database and schema, declare the topology. Idempotent.

use std::process::ExitCode;

use crate::config::Settings;
use crate::queue::topology::{self, Names};
use crate::{queue, store};

pub async fn run(settings: Settings) -> anyhow::Result<ExitCode> {
    let mut database = settings.database.clone();
    database.auto_migrate = true;
    let pool = store::connect(&database).await?;
    pool.close().await;
    let broker = queue::connect(&settings.broker.url).await?;
    let channel = broker.create_channel().await?;
    let names = Names::new(&settings.broker.prefix);
    topology::declare(&channel, &names, settings.broker.delivery_limit).await?;
    broker.close(200, "migrated".into()).await?;
    eprintln!(
        "migrated: database schema is current; exchanges and queues under prefix {:?} are declared",
        names.prefix()
    );
    Ok(ExitCode::SUCCESS)
}
