//! Token buckets keyed by source address or enrollment key, bounded in memory: when the
//! table is full, buckets that have refilled completely (idle keys) are dropped first.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// `burst` tokens, one more every `every`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub burst: u32,
    pub every: Duration,
}

/// Keys tracked at most.
pub const MAX_KEYS: usize = 65536;

pub struct Buckets<K> {
    rate: Rate,
    buckets: Mutex<HashMap<K, (f64, Instant)>>,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    pub fn new(rate: Rate) -> Buckets<K> {
        Buckets { rate, buckets: Mutex::new(HashMap::new()) }
    }

    fn refill(&self, (tokens, at): (f64, Instant), now: Instant) -> f64 {
        let every = self.rate.every.as_secs_f64().max(f64::MIN_POSITIVE);
        (tokens + now.saturating_duration_since(at).as_secs_f64() / every).min(f64::from(self.rate.burst))
    }

    /// Takes a token for `key`; false when it has none left (or the table is full of
    /// busy keys).
    pub fn take(&self, key: &K, now: Instant) -> bool {
        let mut map = crate::registry::lock(&self.buckets);
        if !map.contains_key(key) && map.len() >= MAX_KEYS {
            let full = f64::from(self.rate.burst);
            map.retain(|_, b| self.refill(*b, now) < full);
            if map.len() >= MAX_KEYS {
                return false;
            }
        }
        let state = map.get(key).copied().unwrap_or((f64::from(self.rate.burst), now));
        let tokens = self.refill(state, now);
        if tokens < 1.0 {
            map.insert(key.clone(), (tokens, now));
            return false;
        }
        map.insert(key.clone(), (tokens - 1.0, now));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill_per_key() {
        let b = Buckets::new(Rate { burst: 3, every: Duration::from_secs(10) });
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(b.take(&"a", t0));
        }
        assert!(!b.take(&"a", t0));
        assert!(b.take(&"b", t0), "keys are independent");
        assert!(!b.take(&"a", t0 + Duration::from_secs(9)));
        assert!(b.take(&"a", t0 + Duration::from_secs(10)));
        assert!(!b.take(&"a", t0 + Duration::from_secs(10)));
    }
}
