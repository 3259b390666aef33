//! `switchyard audit verify [--tenant T]`: walks each tenant's audit hash chain and reports
//! the first broken link (tenant, row, what mismatched) with exit code 4, or a summary of the
//! intact chains.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context as _;

use super::BadInput;
use crate::cli::AuditVerifyArgs;
use crate::config::Settings;
use crate::stages::ingest::is_name;
use crate::store;

/// Exit code when a chain is broken.
pub const EXIT_CHAIN_BROKEN: u8 = 4;

/// Runs `audit verify`.
pub async fn verify(settings: Settings, args: AuditVerifyArgs) -> anyhow::Result<ExitCode> {
    if let Some(tenant) = &args.tenant
        && !(is_name(tenant) || tenant == crate::messages::NONE_SEGMENT)
    {
        return Err(BadInput(format!(
            "--tenant {tenant:?} is not a tenant name (letters, digits, '_' and '-')"
        ))
        .into());
    }
    let mut conn = store::connect_one(&settings.database.url).await?;
    let report = crate::audit::verify(&mut conn, args.tenant.as_deref())
        .await
        .context("cannot read the audit chain")?;
    if let Some(broken) = &report.broken {
        eprintln!("audit chain BROKEN: {broken}");
        return Ok(ExitCode::from(EXIT_CHAIN_BROKEN));
    }
    if let Some(tenant) = &args.tenant
        && report.intact.is_empty()
    {
        return Err(BadInput(format!("tenant {tenant:?} has no audit events")).into());
    }
    let mut out = std::io::stdout().lock();
    let events: i64 = report.intact.iter().map(|c| c.events).sum();
    for chain in &report.intact {
        writeln!(
            out,
            "ok  tenant {:<24} {:>10} events  head {}",
            chain.tenant, chain.events, chain.head
        )?;
    }
    writeln!(
        out,
        "audit chain intact: {} tenant(s), {events} events verified",
        report.intact.len()
    )?;
    if report.unchained > 0 {
        writeln!(
            out,
            "note: {} events predate the chain and are not covered",
            report.unchained
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
