//! Requests per identity: a token bucket per certificate identity (role and name), checked by
//! the services' interceptor before any handler runs. A runaway or hostile client is answered
//! `ResourceExhausted` and costs the coordinator one map lookup per refused call; other
//! identities are unaffected.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Token buckets keyed by identity.
#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    /// `per_second` sustained, up to `burst` at once.
    pub fn new(per_second: u32, burst: u32) -> Self {
        Self {
            per_second: f64::from(per_second.max(1)),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::default(),
        }
    }

    /// Takes a token from `key`'s bucket; false when it is empty.
    pub fn allow(&self, key: &str) -> bool {
        self.allow_at(key, Instant::now())
    }

    fn allow_at(&self, key: &str, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, last) = buckets.entry(key.to_owned()).or_insert((self.burst, now));
        let refill = now.saturating_duration_since(*last).as_secs_f64() * self.per_second;
        *tokens = (*tokens + refill).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    pub fn per_second(&self) -> f64 {
        self.per_second
    }

    pub fn burst(&self) -> f64 {
        self.burst
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_the_sustained_rate_per_identity() {
        let rl = RateLimiter::new(10, 5);
        let t0 = Instant::now();
        let allowed = (0..20).filter(|_| rl.allow_at("site/a", t0)).count();
        assert_eq!(allowed, 5, "the burst");
        assert!(rl.allow_at("site/b", t0), "another identity has its own bucket");
        assert!(!rl.allow_at("site/a", t0 + Duration::from_millis(50)));
        assert!(rl.allow_at("site/a", t0 + Duration::from_millis(100)), "one token per 100 ms");
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..20).filter(|_| rl.allow_at("site/a", later)).count(), 5, "capped");
    }
}
