//! Token buckets: opens per KEK are rate-limited, so a compromised
//! encryption host cannot bulk-open a study's keys faster than its
//! configured rate.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// A token bucket per key.
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
            per_second: f64::from(per_second),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::default(),
        }
    }

    /// Takes one token for `key`; false when the bucket is empty.
    pub fn allow(&self, key: &str) -> bool {
        self.allow_n(key, 1)
    }

    /// Takes `n` tokens for `key` at once, or none (false) when fewer are left.
    pub fn allow_n(&self, key: &str, n: u32) -> bool {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = buckets.entry(key.to_owned()).or_insert((self.burst, now));
        *tokens =
            (*tokens + now.duration_since(*last).as_secs_f64() * self.per_second).min(self.burst);
        *last = now;
        if *tokens >= f64::from(n) {
            *tokens -= f64::from(n);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_allowed_then_refused_per_key() {
        let limiter = RateLimiter::new(1, 3);
        assert!((0..3).all(|_| limiter.allow("a")));
        assert!(!limiter.allow("a"));
        assert!(limiter.allow("b"), "buckets are per key");
        assert!(!limiter.allow_n("b", 3), "all or nothing");
        assert!(limiter.allow_n("b", 2));
    }
}
