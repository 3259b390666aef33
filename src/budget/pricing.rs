//! The cost of a provider call from its normalised usage and the model's unit prices.

use rust_decimal::Decimal;

use crate::config::Prices;
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
    (per_million / Decimal::from(1_000_000u32)).round_dp(SCALE)
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
}
