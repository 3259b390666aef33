//! `switchyard report costs`: totals equal the ledger to the last decimal, in every format.

use rust_decimal::Decimal;
use std::str::FromStr;

use crate::helpers::{FakeProvider, job, spawn_app_with, switchyard};

#[tokio::test]
async fn report_totals_equal_the_ledger_and_csv_and_json_parse() {
    let fake = FakeProvider::start(&[]);
    let mut config = String::new();
    for (name, input, output) in [("cheap", "0.15", "0.6"), ("dear", "3.3333", "15.0001")] {
        config.push_str(&format!(
            "[[providers]]\nname = \"{name}\"\nkind = \"openai\"\nbase_url = \"{}/v1\"\nkeys = [{{ id = \"k\", env = \"CARGO_MANIFEST_DIR\" }}]\nmodels = [{{ name = \"m\", prices = {{ input = \"{input}\", output = \"{output}\" }} }}]\n\n[[routes]]\nalias = \"{name}\"\ntargets = [{{ provider = \"{name}\", model = \"m\" }}]\n\n",
            fake.url
        ));
    }
    let app = spawn_app_with(&config).await;
    let jobs: Vec<_> = (0..30)
        .map(|i| {
            let tenant = if i % 3 == 0 { "acme" } else { "globex" };
            let route = if i % 2 == 0 { "cheap" } else { "dear" };
            job(
                tenant,
                Some("b1"),
                route,
                &format!("Report job {i} has a sentence. And another."),
            )
        })
        .collect();
    app.publish_jobs(&jobs).await;
    app.run_worker_until_idle().await;
    let ledger: Decimal = sqlx::query_scalar("SELECT sum(amount_usd) FROM cost_ledger")
        .fetch_one(app.pool())
        .await
        .unwrap();

    let report = |format: &str| {
        let output = switchyard(&app)
            .args([
                "report",
                "costs",
                "--since",
                "2000-01-01",
                "--by",
                "tenant,provider,batch",
                "--format",
                format,
            ])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };

    let json: serde_json::Value = serde_json::from_str(&report("json")).unwrap();
    let total = Decimal::from_str(json["total"]["amount_usd"].as_str().unwrap()).unwrap();
    assert_eq!(
        total, ledger,
        "the total matches the ledger to the last decimal"
    );
    let groups = json["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 4, "2 tenants × 2 providers");
    let summed: Decimal = groups
        .iter()
        .map(|g| Decimal::from_str(g["amount_usd"].as_str().unwrap()).unwrap())
        .sum();
    assert_eq!(summed, ledger);
    assert_eq!(
        groups
            .iter()
            .map(|g| g["attempts"].as_i64().unwrap())
            .sum::<i64>(),
        30
    );

    let csv = report("csv");
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some(
            "tenant,provider,batch,attempts,input_tokens,cached_input_tokens,cache_write_tokens,output_tokens,amount_usd"
        )
    );
    let mut csv_total = Decimal::ZERO;
    for line in lines {
        assert_eq!(line.split(',').count(), 9, "{line}");
        let amount = line.rsplit(',').next().unwrap();
        csv_total += Decimal::from_str(amount).unwrap();
    }
    assert_eq!(csv_total, ledger);

    let table = report("table");
    let total_line = table.lines().last().unwrap();
    assert!(
        total_line.starts_with("TOTAL") && total_line.ends_with(&ledger.normalize().to_string()),
        "{table}"
    );

    // A tenant's report holds that tenant's costs only, and all of them.
    let output = switchyard(&app)
        .args([
            "report",
            "costs",
            "--since",
            "2000-01-01",
            "--by",
            "tenant",
            "--tenant",
            "acme",
            "--format",
            "json",
        ])
        .output()
        .unwrap();
    assert!(output.status.success());
    let scoped: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let acme: Decimal =
        sqlx::query_scalar("SELECT sum(amount_usd) FROM cost_ledger WHERE tenant = 'acme'")
            .fetch_one(app.pool())
            .await
            .unwrap();
    let groups = scoped["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0]["tenant"], "acme");
    assert_eq!(
        Decimal::from_str(scoped["total"]["amount_usd"].as_str().unwrap()).unwrap(),
        acme
    );
    assert!(acme < ledger);
    app.cleanup().await;
}

#[test]
fn a_malformed_month_is_a_clear_error() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["report", "costs", "--month", "2026-13"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("is not YYYY-MM"));
}
