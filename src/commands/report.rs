//! `switchyard report costs`: ledger totals for a month or a time range, grouped by any of
//! tenant, provider, model, batch, route and key, as a table, CSV or JSON. Totals are sums of
//! the ledger's exact decimals, so they match it to the last decimal.

use std::io::Write;
use std::process::ExitCode;

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use rust_decimal::Decimal;
use serde_json::json;

use super::BadInput;
use crate::cli::{ReportCostsArgs, ReportFormat};
use crate::config::Settings;
use crate::store;
use crate::store::cost_ledger::{Dimension, ReportRow};

fn start_of_month(year: i32, month: u32) -> Option<DateTime<Utc>> {
    Utc.with_ymd_and_hms(year, month, 1, 0, 0, 0).single()
}

/// `YYYY-MM` → `[first day, first day of the next month)`.
pub fn month_range(month: &str) -> Result<(DateTime<Utc>, DateTime<Utc>), BadInput> {
    let bad = || BadInput(format!("--month {month:?} is not YYYY-MM"));
    let (year, number) = month.split_once('-').ok_or_else(bad)?;
    let year: i32 = year.parse().map_err(|_| bad())?;
    let number: u32 = number.parse().map_err(|_| bad())?;
    let since = start_of_month(year, number).ok_or_else(bad)?;
    let until = if number == 12 {
        start_of_month(year + 1, 1)
    } else {
        start_of_month(year, number + 1)
    }
    .ok_or_else(bad)?;
    Ok((since, until))
}

/// `YYYY-MM-DD` (midnight UTC) or an RFC 3339 timestamp.
pub fn parse_instant(text: &str, flag: &str) -> Result<DateTime<Utc>, BadInput> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|d| Utc.from_utc_datetime(&d))
        .ok_or_else(|| {
            BadInput(format!(
                "{flag} {text:?} is neither YYYY-MM-DD nor an RFC 3339 time"
            ))
        })
}

fn csv_field(value: &str) -> String {
    if value.contains([',', '"', '\n']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_owned()
    }
}

/// Renders `rows` (plus a total) in `format`.
pub fn render(rows: &[ReportRow], by: &[Dimension], format: ReportFormat) -> String {
    let total: Decimal = rows.iter().map(|r| r.amount_usd).sum();
    let attempts: i64 = rows.iter().map(|r| r.attempts).sum();
    let key = |row: &ReportRow, i: usize| row.keys.get(i).cloned().flatten().unwrap_or_default();
    let numbers = [
        "attempts",
        "input_tokens",
        "cached_input_tokens",
        "cache_write_tokens",
        "output_tokens",
        "amount_usd",
    ];
    let values = |row: &ReportRow| {
        vec![
            row.attempts.to_string(),
            row.input_tokens.to_string(),
            row.cached_input_tokens.to_string(),
            row.cache_write_tokens.to_string(),
            row.output_tokens.to_string(),
            row.amount_usd.normalize().to_string(),
        ]
    };
    match format {
        ReportFormat::Json => {
            let groups: Vec<serde_json::Value> = rows
                .iter()
                .map(|row| {
                    let mut object = serde_json::Map::new();
                    for (i, dimension) in by.iter().enumerate() {
                        object.insert(
                            dimension.name().to_owned(),
                            json!(row.keys.get(i).cloned().flatten()),
                        );
                    }
                    for (name, value) in numbers.iter().zip(values(row)) {
                        let value = if *name == "amount_usd" {
                            json!(value)
                        } else {
                            json!(value.parse::<i64>().unwrap_or(0))
                        };
                        object.insert((*name).to_owned(), value);
                    }
                    serde_json::Value::Object(object)
                })
                .collect();
            json!({ "groups": groups, "total": { "attempts": attempts, "amount_usd": total.normalize().to_string() } })
                .to_string()
                + "\n"
        }
        ReportFormat::Csv => {
            let mut out = String::new();
            let header: Vec<&str> = by.iter().map(|d| d.name()).chain(numbers).collect();
            out.push_str(&header.join(","));
            out.push('\n');
            for row in rows {
                let fields: Vec<String> = (0..by.len())
                    .map(|i| csv_field(&key(row, i)))
                    .chain(values(row))
                    .collect();
                out.push_str(&fields.join(","));
                out.push('\n');
            }
            out
        }
        ReportFormat::Table => {
            let header: Vec<String> = by
                .iter()
                .map(|d| d.name().to_owned())
                .chain(numbers.iter().map(|n| (*n).to_owned()))
                .collect();
            let mut lines: Vec<Vec<String>> = vec![header];
            for row in rows {
                lines.push(
                    (0..by.len())
                        .map(|i| key(row, i))
                        .chain(values(row))
                        .collect(),
                );
            }
            let mut total_line = vec![String::new(); by.len() + numbers.len()];
            total_line[0] = "TOTAL".to_owned();
            total_line[by.len()] = attempts.to_string();
            total_line[by.len() + numbers.len() - 1] = total.normalize().to_string();
            lines.push(total_line);
            let widths: Vec<usize> = (0..lines[0].len())
                .map(|c| lines.iter().map(|l| l[c].len()).max().unwrap_or(0))
                .collect();
            lines
                .iter()
                .map(|line| {
                    line.iter()
                        .zip(&widths)
                        .map(|(cell, width)| format!("{cell:<width$}"))
                        .collect::<Vec<_>>()
                        .join("  ")
                        .trim_end()
                        .to_owned()
                        + "\n"
                })
                .collect()
        }
    }
}

pub async fn run(settings: Settings, args: ReportCostsArgs) -> anyhow::Result<ExitCode> {
    let (since, until) = match (&args.month, &args.since, &args.until) {
        (Some(month), None, None) => month_range(month)?,
        (None, since, until) if since.is_some() || until.is_some() => (
            match since {
                Some(s) => parse_instant(s, "--since")?,
                None => Utc.timestamp_opt(0, 0).single().unwrap_or_default(),
            },
            match until {
                Some(u) => parse_instant(u, "--until")?,
                None => Utc::now() + chrono::Duration::seconds(1),
            },
        ),
        (None, None, None) => month_range(&Utc::now().format("%Y-%m").to_string())?,
        _ => {
            return Err(
                BadInput("give either --month or --since/--until, not both".to_owned()).into(),
            );
        }
    };
    let mut conn = store::connect_one(&settings.database.url).await?;
    let rows =
        store::cost_ledger::report(&mut conn, since, until, &args.by, args.tenant.as_deref())
            .await?;
    let mut out = std::io::stdout().lock();
    out.write_all(render(&rows, &args.by, args.format).as_bytes())?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_run_to_the_first_of_the_next_one() {
        let (since, until) = month_range("2026-12").unwrap();
        assert_eq!(since.to_rfc3339(), "2026-12-01T00:00:00+00:00");
        assert_eq!(until.to_rfc3339(), "2027-01-01T00:00:00+00:00");
        assert!(month_range("2026-13").is_err());
        assert!(month_range("november").is_err());
    }

    #[test]
    fn csv_quotes_commas_and_quotes() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("plain"), "plain");
    }
}
