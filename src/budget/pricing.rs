//! The cost of a provider call from its normalised usage and the model's unit prices.

use rust_decimal::Decimal;

use chrono::{DateTime, TimeZone, Utc};

use crate::config::{ModelSettings, PriceTier, Prices};
use crate::messages::Usage;

/// Decimal places kept, matching the ledger's `NUMERIC(20,10)`.
pub const SCALE: u32 = 10;

/// USD for `usage` at `prices` (USD per million tokens). Cache reads and writes are part of
/// `input_tokens` and are billed at their own prices; the rest of the input at the input
/// price. Exact decimal, rounded to [`SCALE`] places (banker's rounding) so the published
/// amount equals the stored one.
pub fn cost(usage: &Usage, prices: &Prices) -> Decimal {
    let uncached = usage
        .input_tokens
        .saturating_sub(usage.cached_input_tokens)
        .saturating_sub(usage.cache_write_tokens);
    let per_million = Decimal::from(uncached) * prices.input
        + Decimal::from(usage.cached_input_tokens) * prices.cached_input
        + Decimal::from(usage.cache_write_tokens) * prices.cache_write
        + Decimal::from(usage.output_tokens) * prices.output;
    (per_million / Decimal::from(1_000_000u32) + prices.per_request).round_dp(SCALE)
}

/// `YYYY-MM-DD` (midnight UTC) or RFC 3339.
pub fn parse_effective(text: &str) -> Option<DateTime<Utc>> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Some(at.with_timezone(&Utc));
    }
    let day = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?;
    Some(Utc.from_utc_datetime(&day.and_hms_opt(0, 0, 0)?))
}

/// Which prices applied to a call: the version (`base` or its effective date) and the volume
/// tier (the monthly tokens it starts above; `None` for the version's own prices).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub prices: Prices,
    pub version: String,
    pub tier_above: Option<u64>,
}

/// One entry of a price table.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Version {
    /// `None` for the base prices, in effect since always.
    from: Option<DateTime<Utc>>,
    label: String,
    prices: Prices,
    /// Sorted by threshold.
    tiers: Vec<PriceTier>,
}

/// A model's prices over time and volume.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PriceTable {
    /// Oldest first; the first is the base.
    versions: Vec<Version>,
}

impl PriceTable {
    pub fn from_model(model: &ModelSettings) -> Self {
        let mut versions = vec![Version {
            from: None,
            label: "base".to_owned(),
            prices: model.prices.clone(),
            tiers: model.tiers.clone(),
        }];
        let mut later: Vec<Version> = model
            .price_versions
            .iter()
            .filter_map(|v| {
                Some(Version {
                    from: Some(parse_effective(&v.effective_from)?),
                    label: v.effective_from.clone(),
                    prices: v.prices.clone(),
                    tiers: v.tiers.clone(),
                })
            })
            .collect();
        later.sort_by_key(|v| v.from);
        versions.extend(later);
        for version in &mut versions {
            version.tiers.sort_by_key(|t| t.above_monthly_tokens);
        }
        Self { versions }
    }

    /// Whether any version has volume tiers (only then is the monthly volume needed).
    pub fn has_tiers(&self) -> bool {
        self.versions.iter().any(|v| !v.tiers.is_empty())
    }

    /// The prices in effect at `at` for a model that already used `monthly_tokens` this month.
    /// A call is priced whole at the tier reached before it.
    pub fn applied(&self, at: DateTime<Utc>, monthly_tokens: u64) -> Applied {
        let Some(version) = self
            .versions
            .iter()
            .rev()
            .find(|v| v.from.is_none_or(|from| from <= at))
        else {
            return Applied {
                prices: Prices::default(),
                version: "base".to_owned(),
                tier_above: None,
            };
        };
        match version
            .tiers
            .iter()
            .rev()
            .find(|t| monthly_tokens > t.above_monthly_tokens)
        {
            Some(tier) => Applied {
                prices: tier.prices.clone(),
                version: version.label.clone(),
                tier_above: Some(tier.above_monthly_tokens),
            },
            None => Applied {
                prices: version.prices.clone(),
                version: version.label.clone(),
                tier_above: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn dec(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn cost_matches_a_hand_computed_figure_with_cache_reads_and_writes() {
        let prices = Prices {
            input: dec("3"),
            cached_input: dec("0.3"),
            cache_write: dec("3.75"),
            output: dec("15"),
            per_request: Decimal::ZERO,
        };
        let usage = Usage {
            input_tokens: 10_000,
            cached_input_tokens: 4_000,
            cache_write_tokens: 1_000,
            output_tokens: 500,
            reasoning_tokens: 100,
        };
        // 5,000 × 3 + 4,000 × 0.3 + 1,000 × 3.75 + 500 × 15 = 15,000 + 1,200 + 3,750 + 7,500
        // = 27,450 per million = 0.02745 USD.
        assert_eq!(cost(&usage, &prices), dec("0.02745"));
    }

    #[test]
    fn free_models_cost_exactly_zero() {
        let usage = Usage {
            input_tokens: 123,
            output_tokens: 45,
            ..Usage::default()
        };
        assert_eq!(cost(&usage, &Prices::default()), Decimal::ZERO);
    }

    #[test]
    fn tiny_amounts_are_not_lost_to_floating_point() {
        let prices = Prices {
            input: dec("0.1"),
            ..Prices::default()
        };
        let usage = Usage {
            input_tokens: 3,
            ..Usage::default()
        };
        assert_eq!(cost(&usage, &prices), dec("0.0000003"));
    }

    #[test]
    fn a_per_request_price_is_charged_once_per_call() {
        let prices = Prices {
            output: dec("10"),
            per_request: dec("0.002"),
            ..Prices::default()
        };
        let usage = Usage {
            output_tokens: 100,
            ..Usage::default()
        };
        assert_eq!(cost(&usage, &prices), dec("0.003"));
    }

    #[test]
    fn the_price_version_in_effect_and_the_volume_tier_reached_are_applied() {
        let model: ModelSettings = toml::from_str(
            r#"
name = "m"
prices = { input = "3", output = "15" }
tiers = [{ above_monthly_tokens = 1000000, prices = { input = "2", output = "10" } }]
price_versions = [
  { effective_from = "2026-12-01", prices = { input = "2.5", output = "12" } },
]
"#,
        )
        .unwrap();
        let table = PriceTable::from_model(&model);
        let nov = parse_effective("2026-11-20").unwrap();
        let dec_ = parse_effective("2026-12-02T10:00:00Z").unwrap();
        let base = table.applied(nov, 10);
        assert_eq!(
            (base.version.as_str(), base.tier_above, base.prices.input),
            ("base", None, dec("3"))
        );
        let tiered = table.applied(nov, 2_000_000);
        assert_eq!(
            (tiered.tier_above, tiered.prices.output),
            (Some(1_000_000), dec("10"))
        );
        let december = table.applied(dec_, 2_000_000);
        assert_eq!(
            (
                december.version.as_str(),
                december.tier_above,
                december.prices.input
            ),
            ("2026-12-01", None, dec("2.5"))
        );
    }
}
