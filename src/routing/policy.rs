//! Orders a route's targets for one job: `priority`, `weighted` (smooth weighted round robin,
//! so shares hold exactly rather than on average), `cheapest`, `fastest` (EWMA latency with
//! occasional exploration) and `least_busy`.

use std::sync::{Arc, Mutex};

use rust_decimal::Decimal;

use super::Target;
use crate::config::Policy;

/// Smooth weighted round robin state (nginx's algorithm): every pick adds each weight to its
/// current value and takes the largest, then subtracts the total from it.
#[derive(Debug)]
pub struct WeightedRoundRobin {
    current: Mutex<Vec<i64>>,
}

impl WeightedRoundRobin {
    pub fn new(targets: usize) -> Self {
        Self {
            current: Mutex::new(vec![0; targets]),
        }
    }

    /// The index of the next pick among `weights`.
    pub fn pick(&self, weights: &[u32]) -> usize {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        current.resize(weights.len(), 0);
        let total: i64 = weights.iter().map(|w| i64::from(*w)).sum();
        let mut best = 0;
        for (index, weight) in weights.iter().enumerate() {
            current[index] += i64::from(*weight);
            if current[index] > current[best] {
                best = index;
            }
        }
        current[best] -= total;
        best
    }
}

/// Estimated cost of a job on a target: prompt tokens at the input price plus the output cap
/// at the output price.
pub fn estimated_cost(target: &Target, prompt_tokens: u64, output_tokens: u64) -> Decimal {
    let prices = target.prices().prices;
    Decimal::from(prompt_tokens) * prices.input
        + Decimal::from(output_tokens) * prices.output
        + prices.per_request * Decimal::from(1_000_000)
}

/// Orders `targets` (already filtered) in place.
pub fn order(
    policy: Policy,
    targets: &mut Vec<Arc<Target>>,
    wrr: &WeightedRoundRobin,
    all_weights: &[(String, u32)],
    tokens: impl Fn() -> (u64, u64),
    exploration_rate: f64,
) {
    match policy {
        Policy::Priority => {}
        Policy::Weighted => {
            // The pick runs over every configured target so shares hold whatever is filtered
            // out for one job; a pick that is not eligible falls back to the heaviest eligible.
            let weights: Vec<u32> = all_weights.iter().map(|(_, w)| *w).collect();
            let picked = &all_weights[wrr.pick(&weights)].0;
            targets.sort_by_key(|t| std::cmp::Reverse(t.weight));
            if let Some(position) = targets.iter().position(|t| &t.health.key == picked) {
                let first = targets.remove(position);
                targets.insert(0, first);
            }
        }
        Policy::Cheapest => {
            let (prompt, output) = tokens();
            targets.sort_by_cached_key(|t| estimated_cost(t, prompt, output));
        }
        Policy::Fastest => {
            // Unmeasured targets sort first, so new ones get measured.
            targets.sort_by_key(|t| t.health.latency().unwrap_or_default());
            if targets.len() > 1 && fastrand::f64() < exploration_rate {
                let explore = fastrand::usize(1..targets.len());
                let chosen = targets.remove(explore);
                targets.insert(0, chosen);
            }
        }
        Policy::LeastBusy => {
            targets.sort_by_key(|t| {
                let capacity = t.max_concurrency.unwrap_or(usize::MAX / 2);
                std::cmp::Reverse(capacity.saturating_sub(t.health.in_flight()))
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_weighted_round_robin_holds_shares_exactly_and_interleaves() {
        let wrr = WeightedRoundRobin::new(2);
        let picks: Vec<usize> = (0..10_000).map(|_| wrr.pick(&[70, 30])).collect();
        let first = picks.iter().filter(|p| **p == 0).count();
        assert_eq!(first, 7_000);
        // Interleaved, not 70 in a row.
        assert!(picks[..10].contains(&1));
    }

    #[test]
    fn a_zero_weight_is_never_picked() {
        let wrr = WeightedRoundRobin::new(3);
        assert!((0..100).all(|_| wrr.pick(&[1, 0, 1]) != 1));
    }
}
