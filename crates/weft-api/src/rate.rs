//! A token bucket, for the rates both sides hold a tap session to: the proxy its share
//! of the operator's `--max-rps`, the control plane the session's whole rate.

use std::time::Instant;

/// `rate` events a second, in bursts of at most one second's worth (and at least one
/// event, so that a share below one a second still shows something).
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, now: Instant) -> Self {
        let rate = rate.max(0.0);
        TokenBucket { rate, tokens: rate.max(1.0), updated: now }
    }

    /// Takes one event's token, if there is one at `now`.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.updated = self.updated.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate.max(1.0));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_bucket_allows_its_rate_and_a_burst_of_one_second() {
        let now = Instant::now();
        let mut bucket = TokenBucket::new(5.0, now);
        assert_eq!((0..20).filter(|_| bucket.take(now)).count(), 5, "one second's worth at once");
        let later = now + Duration::from_millis(400);
        assert_eq!((0..20).filter(|_| bucket.take(later)).count(), 2, "0.4 s refills two");
        let mut slow = TokenBucket::new(0.5, now);
        assert!(slow.take(now), "at least one event is possible");
        assert!(!slow.take(now + Duration::from_secs(1)));
        assert!(slow.take(now + Duration::from_secs(2)));
    }
}
