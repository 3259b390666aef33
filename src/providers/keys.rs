//! API keys of one provider and their health: calls rotate across healthy keys; `auth`
//! disables a key, `quota_exhausted` marks it exhausted, `rate_limited` rests it until its
//! retry delay has passed.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use secrecy::SecretString;

/// An API key by id; the secret is only exposed when building a request.
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub id: String,
    pub secret: SecretString,
}

/// Health of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    Healthy,
    /// Rejected by the provider (`auth`); not used again until restart.
    Disabled,
    /// Out of quota (`quota_exhausted`); not used again until restart.
    Exhausted,
    /// Rate limited until this instant.
    Resting(Instant),
}

/// What [`KeyPool::pick`] found.
#[derive(Debug, Clone)]
pub enum KeyChoice {
    Key(ApiKey),
    /// Every usable key rests; the first is free again after this long.
    AllResting(Duration),
    /// No key is usable (none configured, or all disabled, exhausted or already tried).
    NoneUsable,
}

/// A key told to wait by its provider (`retry-after`), announced to every worker.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyRest {
    pub provider: String,
    pub key_id: String,
    /// Unix milliseconds until which the key rests.
    pub until_ms: i64,
}

/// The keys of one provider, shared by every job of a worker.
#[derive(Debug, Default)]
pub struct KeyPool {
    keys: Vec<ApiKey>,
    status: Mutex<Vec<KeyStatus>>,
    next: AtomicUsize,
    /// Where rests are announced so other workers learn of them (set by the worker).
    announcer: Mutex<Option<tokio::sync::mpsc::UnboundedSender<KeyRest>>>,
}

impl KeyPool {
    pub fn new(keys: Vec<ApiKey>) -> Self {
        let status = Mutex::new(vec![KeyStatus::Healthy; keys.len()]);
        Self {
            keys,
            status,
            next: AtomicUsize::new(0),
            announcer: Mutex::new(None),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    fn statuses(&self) -> std::sync::MutexGuard<'_, Vec<KeyStatus>> {
        // A poisoned lock only means another task panicked mid-update of plain enums.
        self.status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The next healthy key in round-robin order, skipping ids in `tried`.
    pub fn pick(&self, tried: &[String]) -> KeyChoice {
        let now = Instant::now();
        let statuses = self.statuses();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut soonest: Option<Duration> = None;
        for offset in 0..self.keys.len() {
            let index = (start + offset) % self.keys.len();
            let key = &self.keys[index];
            if tried.contains(&key.id) {
                continue;
            }
            match statuses[index] {
                KeyStatus::Healthy => return KeyChoice::Key(key.clone()),
                KeyStatus::Resting(until) if until <= now => return KeyChoice::Key(key.clone()),
                KeyStatus::Resting(until) => {
                    let wait = until - now;
                    soonest = Some(soonest.map_or(wait, |s| s.min(wait)));
                }
                KeyStatus::Disabled | KeyStatus::Exhausted => {}
            }
        }
        soonest.map_or(KeyChoice::NoneUsable, KeyChoice::AllResting)
    }

    /// Records a new status for key `id`.
    pub fn set(&self, id: &str, status: KeyStatus) {
        if let Some(index) = self.keys.iter().position(|k| k.id == id) {
            self.statuses()[index] = status;
        }
    }

    /// Sends this pool's rests to `announcer` from now on.
    pub fn announce_to(&self, announcer: tokio::sync::mpsc::UnboundedSender<KeyRest>) {
        *self
            .announcer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(announcer);
    }

    /// Tells every worker (through the announcer) that key `id` of `provider` rests for `rest`.
    pub fn announce_rest(&self, provider: &str, id: &str, rest: Duration) {
        if let Some(announcer) = self
            .announcer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
        {
            let until = chrono::Utc::now() + chrono::Duration::from_std(rest).unwrap_or_default();
            let _ = announcer.send(KeyRest {
                provider: provider.to_owned(),
                key_id: id.to_owned(),
                until_ms: until.timestamp_millis(),
            });
        }
    }

    /// Adopts a rest another worker announced, unless the key is already out for longer.
    pub fn adopt_rest(&self, id: &str, until: Instant) {
        if let Some(index) = self.keys.iter().position(|k| k.id == id) {
            let mut statuses = self.statuses();
            match statuses[index] {
                KeyStatus::Healthy => statuses[index] = KeyStatus::Resting(until),
                KeyStatus::Resting(current) if current < until => {
                    statuses[index] = KeyStatus::Resting(until)
                }
                _ => {}
            }
        }
    }

    /// The status of key `id`.
    pub fn status(&self, id: &str) -> Option<KeyStatus> {
        let index = self.keys.iter().position(|k| k.id == id)?;
        Some(self.statuses()[index])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(ids: &[&str]) -> KeyPool {
        KeyPool::new(
            ids.iter()
                .map(|id| ApiKey {
                    id: (*id).to_owned(),
                    secret: SecretString::from("s"),
                })
                .collect(),
        )
    }

    fn picked(choice: KeyChoice) -> String {
        match choice {
            KeyChoice::Key(key) => key.id,
            other => panic!("no key: {other:?}"),
        }
    }

    #[test]
    fn calls_rotate_across_healthy_keys() {
        let pool = pool(&["a", "b", "c"]);
        let ids: Vec<String> = (0..6).map(|_| picked(pool.pick(&[]))).collect();
        assert_eq!(ids, ["a", "b", "c", "a", "b", "c"]);
    }

    #[test]
    fn disabled_and_exhausted_keys_are_skipped() {
        let pool = pool(&["a", "b", "c"]);
        pool.set("a", KeyStatus::Disabled);
        pool.set("b", KeyStatus::Exhausted);
        assert!((0..5).all(|_| picked(pool.pick(&[])) == "c"));
        assert!(matches!(
            pool.pick(&["c".to_owned()]),
            KeyChoice::NoneUsable
        ));
    }

    #[test]
    fn a_resting_key_comes_back_after_its_delay() {
        let pool = pool(&["a"]);
        pool.set(
            "a",
            KeyStatus::Resting(Instant::now() + Duration::from_secs(30)),
        );
        assert!(matches!(pool.pick(&[]), KeyChoice::AllResting(d) if d > Duration::from_secs(29)));
        pool.set("a", KeyStatus::Resting(Instant::now()));
        assert_eq!(picked(pool.pick(&[])), "a");
    }
}
