//! What a worker knows about each target: recent latency (EWMA), calls in flight, and a
//! circuit breaker. Open circuits are shared with every worker through Postgres
//! (`circuit_breakers`), so a target one worker found dead is skipped by all within seconds.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::config::RoutingSettings;

/// Breaker state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Circuit {
    Closed,
    /// Skipped until the instant; then one probe is let through.
    Open(Instant),
    /// One probe is in flight; everyone else skips the target.
    HalfOpen,
}

/// A breaker transition worth auditing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Opened,
    Closed,
}

impl Transition {
    /// The audit event kind.
    pub fn kind(self) -> &'static str {
        match self {
            Transition::Opened => "circuit_opened",
            Transition::Closed => "circuit_closed",
        }
    }
}

/// Whether a call may go to the target now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Go,
    /// The half-open probe: its outcome closes or re-opens the circuit.
    Probe,
    /// The circuit is open (or another probe is in flight).
    Skip,
}

#[derive(Debug)]
struct Breaker {
    circuit: Circuit,
    consecutive_failures: u32,
    /// Outcomes of the last calls (true = retryable failure), newest last.
    window: std::collections::VecDeque<bool>,
}

/// Health of one target (provider + model).
#[derive(Debug)]
pub struct TargetHealth {
    /// `provider/model`, the key shared through Postgres.
    pub key: String,
    settings: RoutingSettings,
    breaker: Mutex<Breaker>,
    /// EWMA of successful call latency in microseconds; 0 = never measured.
    ewma_micros: AtomicU64,
    in_flight: AtomicUsize,
    /// Openings not yet written to Postgres.
    pending_share: Mutex<Option<Instant>>,
}

/// Decrements the in-flight count when dropped.
#[derive(Debug)]
pub struct InFlight<'a>(&'a TargetHealth);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl TargetHealth {
    pub fn new(key: String, settings: &RoutingSettings) -> Self {
        Self {
            key,
            settings: settings.clone(),
            breaker: Mutex::new(Breaker {
                circuit: Circuit::Closed,
                consecutive_failures: 0,
                window: std::collections::VecDeque::new(),
            }),
            ewma_micros: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            pending_share: Mutex::new(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The breaker state, moving an expired `Open` to "due for a probe".
    pub fn circuit(&self) -> Circuit {
        self.lock().circuit
    }

    /// Whether the target should be planned at all (open and not yet due ⇒ no).
    pub fn is_open(&self, now: Instant) -> Option<Instant> {
        match self.lock().circuit {
            Circuit::Open(until) if until > now => Some(until),
            _ => None,
        }
    }

    /// Asks to call the target now.
    pub fn admit(&self) -> Admission {
        let mut breaker = self.lock();
        match breaker.circuit {
            Circuit::Closed => Admission::Go,
            Circuit::Open(until) if until <= Instant::now() => {
                breaker.circuit = Circuit::HalfOpen;
                Admission::Probe
            }
            Circuit::Open(_) | Circuit::HalfOpen => Admission::Skip,
        }
    }

    /// Gives back a probe that was not used (or whose answer said nothing about the target's
    /// health): the circuit is due for a probe again at once.
    pub fn abandon_probe(&self) {
        let mut breaker = self.lock();
        if breaker.circuit == Circuit::HalfOpen {
            breaker.circuit = Circuit::Open(Instant::now());
        }
    }

    /// Counts a call in flight until the guard drops.
    pub fn start_call(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Recent latency; `None` before the first success.
    pub fn latency(&self) -> Option<Duration> {
        match self.ewma_micros.load(Ordering::Relaxed) {
            0 => None,
            micros => Some(Duration::from_micros(micros)),
        }
    }

    /// Records a call's outcome. `failed` means a retryable failure (the provider's health);
    /// permanent errors such as a bad request say nothing about the target and are not
    /// counted.
    pub fn record(&self, latency: Duration, failed: bool, probe: bool) -> Option<Transition> {
        if !failed {
            let sample = u64::try_from(latency.as_micros())
                .unwrap_or(u64::MAX)
                .max(1);
            let old = self.ewma_micros.load(Ordering::Relaxed);
            let new = if old == 0 {
                sample
            } else {
                (old * 4 + sample) / 5
            };
            self.ewma_micros.store(new.max(1), Ordering::Relaxed);
        }
        let mut breaker = self.lock();
        let window = self.settings.breaker_window.max(1) as usize;
        breaker.window.push_back(failed);
        while breaker.window.len() > window {
            breaker.window.pop_front();
        }
        breaker.consecutive_failures = if failed {
            breaker.consecutive_failures + 1
        } else {
            0
        };
        let was_open = !matches!(breaker.circuit, Circuit::Closed);
        if !failed {
            // Only the probe closes an open circuit: a call admitted before the circuit opened
            // that succeeds now says no more than the failures that opened it.
            if probe {
                breaker.circuit = Circuit::Closed;
                breaker.window.clear();
                return was_open.then_some(Transition::Closed);
            }
            return None;
        }
        let failures = breaker.window.iter().filter(|f| **f).count();
        let rate_tripped = breaker.window.len() >= window
            && failures as f64 / breaker.window.len() as f64 >= self.settings.breaker_error_rate;
        let tripped = probe
            || breaker.consecutive_failures >= self.settings.breaker_consecutive_failures.max(1)
            || rate_tripped;
        if !tripped || matches!(breaker.circuit, Circuit::Open(_)) {
            return None;
        }
        let until = Instant::now() + Duration::from_secs(self.settings.breaker_open_secs);
        breaker.circuit = Circuit::Open(until);
        drop(breaker);
        *self
            .pending_share
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(until);
        // A failed probe re-opens a circuit that was already open: not a new transition.
        (!was_open).then_some(Transition::Opened)
    }

    /// An opening learned from another worker: skip the target until `until`.
    pub fn open_until(&self, until: Instant) {
        let mut breaker = self.lock();
        match breaker.circuit {
            Circuit::Open(current) if current >= until => {}
            Circuit::HalfOpen => {}
            _ => breaker.circuit = Circuit::Open(until),
        }
    }

    /// An opening this worker has not shared yet.
    pub fn take_unshared(&self) -> Option<Instant> {
        self.pending_share
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Gives back an opening [`Self::take_unshared`] took but could not share (Postgres
    /// refused the write), so the next sync shares it, or the later opening pending by then.
    pub fn share_later(&self, until: Instant) {
        let mut pending = self
            .pending_share
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *pending = Some(pending.map_or(until, |later| later.max(until)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> TargetHealth {
        TargetHealth::new(
            "p/m".to_owned(),
            &RoutingSettings {
                breaker_consecutive_failures: 3,
                breaker_error_rate: 0.5,
                breaker_window: 10,
                breaker_open_secs: 60,
                exploration_rate: 0.0,
                max_limit_wait_secs: 10,
                reservation_grace_secs: 60,
                default_output_reservation: 4096,
            },
        )
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn consecutive_failures_open_the_circuit_once() {
        let h = health();
        assert_eq!(h.record(MS, true, false), None);
        assert_eq!(h.record(MS, true, false), None);
        assert_eq!(h.record(MS, true, false), Some(Transition::Opened));
        assert_eq!(h.admit(), Admission::Skip);
        assert_eq!(h.record(MS, true, false), None, "already open");
        assert!(h.take_unshared().is_some());
        assert!(h.take_unshared().is_none());
    }

    #[test]
    fn a_high_error_rate_opens_the_circuit_without_a_consecutive_run() {
        let h = health();
        let mut transitions = Vec::new();
        // Failures alternate with successes: never 3 in a row, but half of a full window.
        for i in 0..=10 {
            transitions.extend(h.record(MS, i % 2 == 0, false));
        }
        assert_eq!(transitions, [Transition::Opened]);
    }

    #[test]
    fn an_expired_open_circuit_lets_one_probe_through_and_its_success_closes_it() {
        let h = health();
        h.open_until(Instant::now());
        assert_eq!(h.admit(), Admission::Probe);
        assert_eq!(h.admit(), Admission::Skip, "only one probe at a time");
        assert_eq!(h.record(MS, false, true), Some(Transition::Closed));
        assert_eq!(h.admit(), Admission::Go);
    }

    /// Calls admitted before the circuit opened may still succeed: only the probe, once the
    /// circuit has been open its time, closes it, so the circuit does not flap.
    #[test]
    fn a_call_admitted_before_the_circuit_opened_does_not_close_it_by_succeeding() {
        let h = health();
        for _ in 0..3 {
            h.record(MS, true, false);
        }
        assert!(matches!(h.circuit(), Circuit::Open(_)));
        assert_eq!(h.record(MS, false, false), None);
        assert!(matches!(h.circuit(), Circuit::Open(_)));
        assert_eq!(h.admit(), Admission::Skip);
        // Half open, its probe out.
        let h = health();
        h.open_until(Instant::now());
        assert_eq!(h.admit(), Admission::Probe);
        assert_eq!(h.record(MS, false, false), None, "not the probe");
        assert_eq!(h.admit(), Admission::Skip, "the probe is still out");
        assert_eq!(h.record(MS, false, true), Some(Transition::Closed));
        assert_eq!(h.admit(), Admission::Go);
    }

    #[test]
    fn an_abandoned_probe_makes_the_circuit_due_for_another_probe() {
        let h = health();
        h.open_until(Instant::now());
        assert_eq!(h.admit(), Admission::Probe);
        h.abandon_probe();
        assert_eq!(h.admit(), Admission::Probe, "the probe was not lost");
    }

    #[test]
    fn a_failed_probe_reopens_the_circuit() {
        let h = health();
        h.open_until(Instant::now());
        assert_eq!(h.admit(), Admission::Probe);
        assert_eq!(h.record(MS, true, true), None);
        assert!(matches!(h.circuit(), Circuit::Open(_)));
        assert_eq!(h.admit(), Admission::Skip);
    }

    #[test]
    fn latency_is_an_ewma_of_successes() {
        let h = health();
        assert_eq!(h.latency(), None);
        h.record(Duration::from_millis(100), false, false);
        h.record(Duration::from_millis(200), false, false);
        assert_eq!(h.latency(), Some(Duration::from_millis(120)));
        h.record(Duration::from_secs(5), true, false);
        assert_eq!(
            h.latency(),
            Some(Duration::from_millis(120)),
            "failures do not count"
        );
    }
}
