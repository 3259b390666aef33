//! Acknowledgement planning for the jobs consumer. Jobs finish out of order. A `multiple` ack
//! covers every outstanding tag up to the one named, so it is only used over a contiguous run
//! of finished deliveries; finished deliveries beyond a gap (a slow job still in flight) are
//! acked one by one, so one slow job never holds the prefetch window hostage.

use std::collections::BTreeSet;

/// Tracks which delivery tags of one channel are finished.
#[derive(Debug, Default)]
pub struct AckTracker {
    /// Every tag up to and including this one is finished and acked (tags start at 1).
    contiguous_through: u64,
    /// Finished (and already acked one by one) tags above `contiguous_through`.
    beyond_gap: BTreeSet<u64>,
}

/// The acks to send for one group of finished deliveries.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AckPlan {
    /// Ack this tag with `multiple = true`.
    pub multiple: Option<u64>,
    /// Ack each of these alone.
    pub single: Vec<u64>,
}

impl AckTracker {
    /// Records newly finished tags (each exactly once) and plans their acks. Every tag of
    /// `tags` is acked by the plan, and no tag is acked twice.
    pub fn finish(&mut self, tags: impl IntoIterator<Item = u64>) -> AckPlan {
        let fresh: BTreeSet<u64> = tags.into_iter().collect();
        self.beyond_gap.extend(fresh.iter().copied());
        self.advance();
        // The highest fresh tag inside the contiguous run acks all fresh tags below it; tags
        // it passes over were acked singly before and are no longer outstanding.
        let multiple = fresh.range(..=self.contiguous_through).next_back().copied();
        let single = fresh
            .range(self.contiguous_through + 1..)
            .copied()
            .collect();
        AckPlan { multiple, single }
    }
}

impl AckTracker {
    /// Records a tag settled without an ack (nacked back to the queue), so the contiguous run
    /// can pass over it without naming it.
    pub fn settle_elsewhere(&mut self, tag: u64) {
        self.beyond_gap.insert(tag);
        self.advance();
    }

    /// Extends the contiguous run over settled tags that now follow it.
    fn advance(&mut self) {
        while self.beyond_gap.remove(&(self.contiguous_through + 1)) {
            self.contiguous_through += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_runs_are_acked_with_one_multiple_ack() {
        let mut tracker = AckTracker::default();
        assert_eq!(
            tracker.finish([1, 2, 3]),
            AckPlan {
                multiple: Some(3),
                single: vec![]
            }
        );
    }

    #[test]
    fn tags_beyond_a_gap_are_acked_singly_and_never_twice() {
        let mut tracker = AckTracker::default();
        // Tag 1 is a slow job still in flight.
        assert_eq!(
            tracker.finish([2, 3]),
            AckPlan {
                multiple: None,
                single: vec![2, 3]
            }
        );
        // Tag 1 finishes: the run now reaches 3, but 2 and 3 are already acked.
        assert_eq!(
            tracker.finish([1, 4]),
            AckPlan {
                multiple: Some(4),
                single: vec![]
            }
        );
        assert_eq!(
            tracker.finish([6]),
            AckPlan {
                multiple: None,
                single: vec![6]
            }
        );
        assert_eq!(
            tracker.finish([5]),
            AckPlan {
                multiple: Some(5),
                single: vec![]
            }
        );
        assert_eq!(tracker.finish([]), AckPlan::default());
    }

    #[test]
    fn a_nacked_tag_is_passed_over_but_never_named_in_an_ack() {
        let mut tracker = AckTracker::default();
        tracker.settle_elsewhere(1);
        assert_eq!(
            tracker.finish([2]),
            AckPlan {
                multiple: Some(2),
                single: vec![]
            }
        );
        tracker.settle_elsewhere(4);
        assert_eq!(
            tracker.finish([3]),
            AckPlan {
                multiple: Some(3),
                single: vec![]
            }
        );
    }
}
