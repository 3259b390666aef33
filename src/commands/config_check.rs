//! `switchyard config check`: validate the configuration and show what routes where. Key
//! values are never printed, only whether their variables are set.

use std::io::Write;
use std::process::ExitCode;

use crate::config::Settings;
use crate::queue::broker_address;

pub fn run(settings: &Settings) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "configuration is valid")?;
    writeln!(
        out,
        "broker: {} (prefix {:?})",
        broker_address(&settings.broker.url),
        settings.broker.prefix
    )?;
    let database = url::Url::parse(&settings.database.url)
        .map(|u| {
            format!(
                "{}:{}{}",
                u.host_str().unwrap_or("?"),
                u.port().unwrap_or(5432),
                u.path()
            )
        })
        .unwrap_or_else(|_| "(unparsable url)".to_owned());
    writeln!(out, "database: {database}")?;
    for provider in settings.all_providers() {
        writeln!(out, "provider {} ({:?})", provider.name, provider.kind)?;
        for key in &provider.keys {
            let state = match std::env::var(&key.env) {
                Ok(value) if !value.is_empty() => "set",
                _ => "NOT SET",
            };
            writeln!(out, "  key {}: ${} is {state}", key.id, key.env)?;
        }
    }
    for route in &settings.routes {
        let targets: Vec<String> = route
            .targets
            .iter()
            .map(|t| format!("{}/{}", t.provider, t.model))
            .collect();
        let fallback: Vec<String> = route
            .fallback
            .iter()
            .map(|t| format!("{}/{}", t.provider, t.model))
            .collect();
        let fallback = if fallback.is_empty() {
            String::new()
        } else {
            format!("; fallback {}", fallback.join(" -> "))
        };
        writeln!(
            out,
            "route {} ({:?}, failover depth {}) -> {}{fallback}",
            route.alias,
            route.policy,
            route.max_failover_depth,
            targets.join(" -> ")
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
