//! When a failed try may be retried: retry conditions, idempotency, backoff with full
//! jitter, and the retry budget that keeps retries from storming a failing service.
//!
//! The budget is per addressed Service and survives configuration swaps: over a sliding
//! window, retries may add at most `ratio` of the requests seen plus `minPerSecond`
//! each second, so a dead service sees at most `1 + ratio` times its normal load.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use http::Method;
use rand::Rng;
use weft_model::spec::{BackoffSpec, RetryBudgetSpec, RetryOn};

use crate::endpoint::TryOutcome;

/// Slots the budget window is divided into; the window slides one slot at a time.
const BUDGET_SLOTS: usize = 10;

/// A sliding-window retry budget.
#[derive(Debug)]
pub struct RetryBudget {
    inner: Mutex<BudgetWindow>,
}

#[derive(Debug)]
struct BudgetWindow {
    spec: RetryBudgetSpec,
    started: Instant,
    /// Index of the newest slot since `started`.
    newest: u64,
    requests: [u64; BUDGET_SLOTS],
    retries: [u64; BUDGET_SLOTS],
}

impl RetryBudget {
    /// A budget with `spec`, empty.
    pub fn new(spec: RetryBudgetSpec) -> Self {
        RetryBudget {
            inner: Mutex::new(BudgetWindow {
                spec,
                started: Instant::now(),
                newest: 0,
                requests: [0; BUDGET_SLOTS],
                retries: [0; BUDGET_SLOTS],
            }),
        }
    }

    /// Applies a new spec, keeping what the window has seen.
    pub fn set_spec(&self, spec: &RetryBudgetSpec) {
        let mut window = self.inner.lock().expect("budget lock poisoned");
        if window.spec != *spec {
            window.spec = spec.clone();
        }
    }

    /// Counts one original request.
    pub fn deposit(&self) {
        let mut window = self.inner.lock().expect("budget lock poisoned");
        let slot = window.advance(Instant::now());
        window.requests[slot] += 1;
    }

    /// Retries the budget would still allow now (for tap).
    pub fn headroom(&self) -> u64 {
        let mut window = self.inner.lock().expect("budget lock poisoned");
        window.advance(Instant::now());
        window.room().max(0.0).ceil() as u64
    }

    /// Takes one retry from the budget if there is room.
    pub fn try_withdraw(&self) -> bool {
        let mut window = self.inner.lock().expect("budget lock poisoned");
        let slot = window.advance(Instant::now());
        if window.room() > 0.0 {
            window.retries[slot] += 1;
            true
        } else {
            false
        }
    }
}

impl BudgetWindow {
    /// Retries the window allows beyond those it has sent (negative once over).
    fn room(&self) -> f64 {
        let requests: u64 = self.requests.iter().sum();
        let retries: u64 = self.retries.iter().sum();
        let floor = self.spec.min_per_second as f64 * self.spec.window.0.as_secs_f64();
        self.spec.ratio * requests as f64 + floor - retries as f64
    }

    /// Clears the slots that slid out of the window; returns the current slot.
    fn advance(&mut self, now: Instant) -> usize {
        let slot_length = (self.spec.window.0 / BUDGET_SLOTS as u32).max(Duration::from_millis(1));
        let current = (now.saturating_duration_since(self.started).as_nanos() / slot_length.as_nanos()) as u64;
        let stale = current.saturating_sub(self.newest).min(BUDGET_SLOTS as u64);
        for step in 1..=stale {
            let slot = ((self.newest + step) % BUDGET_SLOTS as u64) as usize;
            self.requests[slot] = 0;
            self.retries[slot] = 0;
        }
        self.newest = self.newest.max(current);
        (current % BUDGET_SLOTS as u64) as usize
    }
}

/// How one try ended, as retry conditions see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TryEnd {
    Status(u16),
    ConnectFailure,
    Reset,
    Timeout,
}

impl TryEnd {
    /// Whether any of `retry_on` covers this ending.
    pub fn is_retryable(self, retry_on: &[RetryOn]) -> bool {
        retry_on.iter().any(|condition| match (condition, self) {
            (RetryOn::FiveXx, TryEnd::Status(s)) => (500..600).contains(&s),
            (RetryOn::GatewayError, TryEnd::Status(s)) => (502..=504).contains(&s),
            (RetryOn::GatewayError, TryEnd::ConnectFailure | TryEnd::Reset) => true,
            (RetryOn::Retriable4xx, TryEnd::Status(409)) => true,
            (RetryOn::ConnectFailure, TryEnd::ConnectFailure) => true,
            (RetryOn::Reset, TryEnd::Reset) => true,
            (RetryOn::Timeout, TryEnd::Timeout) => true,
            _ => false,
        })
    }

    /// The outcome outlier detection and latency tracking record.
    pub fn outcome(self) -> TryOutcome {
        match self {
            TryEnd::Status(s) if s >= 500 => TryOutcome::ServerError(s),
            TryEnd::Status(_) => TryOutcome::Success,
            TryEnd::ConnectFailure => TryOutcome::ConnectFailure,
            TryEnd::Reset | TryEnd::Timeout => TryOutcome::Reset,
        }
    }
}

/// Methods that may be retried without `retryNonIdempotent` (RFC 9110 §9.2.2).
pub fn is_idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

/// The pause before retry number `retry` (1-based): full jitter over an exponentially
/// growing ceiling, as AWS's backoff study recommends, capped at `max`.
pub fn backoff(spec: &BackoffSpec, retry: u32) -> Duration {
    let ceiling = spec.base.0.saturating_mul(1 << (retry.saturating_sub(1)).min(16)).min(spec.max.0);
    if ceiling.is_zero() {
        return ceiling;
    }
    rand::rng().random_range(Duration::ZERO..=ceiling)
}

#[cfg(test)]
mod tests {
    use weft_model::GoDuration;

    use super::*;

    #[test]
    fn budget_allows_ratio_of_requests_plus_floor() {
        let budget = RetryBudget::new(RetryBudgetSpec {
            ratio: 0.2,
            min_per_second: 0,
            window: GoDuration(Duration::from_secs(10)),
        });
        for _ in 0..100 {
            budget.deposit();
        }
        let granted = (0..100).filter(|_| budget.try_withdraw()).count();
        assert_eq!(granted, 20);
        let floor = RetryBudget::new(RetryBudgetSpec {
            ratio: 0.0,
            min_per_second: 2,
            window: GoDuration(Duration::from_secs(10)),
        });
        assert_eq!((0..100).filter(|_| floor.try_withdraw()).count(), 20);
    }

    #[test]
    fn budget_window_slides() {
        let budget = RetryBudget::new(RetryBudgetSpec {
            ratio: 1.0,
            min_per_second: 0,
            window: GoDuration(Duration::from_millis(50)),
        });
        budget.deposit();
        assert!(budget.try_withdraw());
        assert!(!budget.try_withdraw());
        std::thread::sleep(Duration::from_millis(60));
        assert!(!budget.try_withdraw(), "old requests no longer fund retries");
        budget.deposit();
        assert!(budget.try_withdraw());
    }

    #[test]
    fn conditions_and_backoff() {
        assert!(TryEnd::Status(503).is_retryable(&[RetryOn::FiveXx]));
        assert!(!TryEnd::Status(404).is_retryable(&[RetryOn::FiveXx]));
        assert!(TryEnd::ConnectFailure.is_retryable(&[RetryOn::GatewayError]));
        assert!(!TryEnd::Reset.is_retryable(&[RetryOn::ConnectFailure]));
        assert!(!is_idempotent(&Method::POST));
        let spec = BackoffSpec::default();
        for retry in 1..10 {
            assert!(backoff(&spec, retry) <= spec.max.0);
        }
    }
}
