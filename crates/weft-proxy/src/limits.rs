//! Connection limits of a backend Service (`TrafficPolicy.connectionLimits`): requests
//! in flight, open upstream connections, and requests waiting for a connection. Beyond
//! them requests fail fast with 503 instead of queueing without bound.
//!
//! One [`Limiter`] per Service, kept across configuration swaps (its counters are live
//! state); a swap only updates the maxima.
//!
//! `maxConnections` counts every open upstream connection, idle ones included, across
//! all workers; but each worker's idle connections sit in its own thread-local pool
//! (`pool.rs`), out of the other workers' reach. So a worker that finds the limit reached
//! while connections idle elsewhere asks for them ([`Limiter::reclaim_idle`]): every
//! worker's housekeeping closes idle connections of that limiter, which frees their
//! permits. The limit stays exact and no worker starves behind another's idle pool.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, OnceLock,
    },
    time::Duration,
};

use tokio::sync::{watch, Notify};
use weft_model::spec::ConnectionLimitsSpec;

/// Live counters and maxima for one backend Service.
#[derive(Debug, Default)]
pub struct Limiter {
    max_requests: AtomicUsize,
    max_connections: AtomicUsize,
    max_pending: AtomicUsize,
    requests: AtomicUsize,
    connections: AtomicUsize,
    pending: AtomicUsize,
    /// Pooled connections idle now, in any worker.
    idle: AtomicUsize,
    /// Idle connections some worker waits to see closed.
    reclaim_wanted: AtomicUsize,
    /// Woken when a connection closes or returns idle to the pool.
    connection_freed: Notify,
}

/// Bumped whenever some limiter wants idle connections closed; every worker watches it.
fn reclaim_signal() -> &'static watch::Sender<u64> {
    static SIGNAL: OnceLock<watch::Sender<u64>> = OnceLock::new();
    SIGNAL.get_or_init(|| watch::channel(0).0)
}

/// A worker's view of reclaim requests: [`ReclaimWatch::requested`] completes when some
/// limiter asked for idle connections since the last call.
pub struct ReclaimWatch(watch::Receiver<u64>);

impl ReclaimWatch {
    pub fn new() -> Self {
        ReclaimWatch(reclaim_signal().subscribe())
    }

    pub async fn requested(&mut self) {
        // The sender is static: it never closes.
        let _ = self.0.changed().await;
    }
}

impl Default for ReclaimWatch {
    fn default() -> Self {
        Self::new()
    }
}

/// Counts one pooled connection as idle while it lives.
#[derive(Debug)]
pub struct IdleMark(Arc<Limiter>);

impl IdleMark {
    /// Whether a worker waits for an idle connection of this limiter to close; if so,
    /// that request is taken (the caller closes this connection).
    pub fn reclaim_wanted(&self) -> bool {
        self.0.reclaim_wanted.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| w.checked_sub(1)).is_ok()
    }
}

impl Drop for IdleMark {
    fn drop(&mut self) {
        self.0.idle.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Which limit refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitExceeded {
    MaxRequests(usize),
    MaxPendingRequests(usize),
    MaxConnections(usize),
}

impl std::fmt::Display for LimitExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimitExceeded::MaxRequests(n) => write!(f, "maxRequests ({n}) reached"),
            LimitExceeded::MaxPendingRequests(n) => write!(f, "maxPendingRequests ({n}) reached"),
            LimitExceeded::MaxConnections(n) => write!(f, "maxConnections ({n}) reached and none freed in time"),
        }
    }
}

impl Limiter {
    /// Applies new maxima; counters are untouched.
    pub fn set_limits(&self, spec: &ConnectionLimitsSpec) {
        self.max_requests.store(spec.max_requests as usize, Ordering::Relaxed);
        self.max_connections.store(spec.max_connections as usize, Ordering::Relaxed);
        self.max_pending.store(spec.max_pending_requests as usize, Ordering::Relaxed);
    }

    /// Admits a request if fewer than `maxRequests` are in flight.
    pub fn start_request(self: &Arc<Self>) -> Result<RequestPermit, LimitExceeded> {
        let max = self.max_requests.load(Ordering::Relaxed);
        if self.requests.fetch_add(1, Ordering::AcqRel) >= max {
            self.requests.fetch_sub(1, Ordering::AcqRel);
            return Err(LimitExceeded::MaxRequests(max));
        }
        Ok(RequestPermit(self.clone()))
    }

    /// Reserves a slot for one new upstream connection, if under `maxConnections`.
    pub fn try_open_connection(self: &Arc<Self>) -> Result<ConnectionPermit, LimitExceeded> {
        let max = self.max_connections.load(Ordering::Relaxed);
        if self.connections.fetch_add(1, Ordering::AcqRel) >= max {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            return Err(LimitExceeded::MaxConnections(max));
        }
        Ok(ConnectionPermit(self.clone()))
    }

    /// Waits (at most `wait`) for a connection to free up, counting as a pending
    /// request; fails fast when `maxPendingRequests` are already waiting.
    pub async fn wait_for_connection(&self, wait: Duration) -> Result<(), LimitExceeded> {
        let max_pending = self.max_pending.load(Ordering::Relaxed);
        if self.pending.fetch_add(1, Ordering::AcqRel) >= max_pending {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(LimitExceeded::MaxPendingRequests(max_pending));
        }
        let woken = tokio::time::timeout(wait, self.connection_freed.notified()).await;
        self.pending.fetch_sub(1, Ordering::AcqRel);
        woken.map_err(|_| LimitExceeded::MaxConnections(self.max_connections.load(Ordering::Relaxed)))
    }

    /// Tells one waiter that a pooled connection became idle; the mark counts it idle
    /// until the connection is checked out or closed.
    pub fn connection_returned(self: &Arc<Self>) -> IdleMark {
        self.idle.fetch_add(1, Ordering::AcqRel);
        self.connection_freed.notify_one();
        IdleMark(self.clone())
    }

    /// Called at `maxConnections`: if connections of this limiter idle (in this worker's
    /// pool or another's), asks every worker to close one, so that its permit frees.
    pub fn reclaim_idle(&self) {
        let idle = self.idle.load(Ordering::Acquire);
        if idle == 0 {
            return;
        }
        // At most as many requests as there are idle connections.
        let _ = self.reclaim_wanted.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| (w < idle).then_some(w + 1));
        reclaim_signal().send_modify(|generation| *generation = generation.wrapping_add(1));
    }
}

/// Held for the life of one request.
#[derive(Debug)]
pub struct RequestPermit(Arc<Limiter>);

impl Drop for RequestPermit {
    fn drop(&mut self) {
        self.0.requests.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Held for the life of one upstream connection.
#[derive(Debug)]
pub struct ConnectionPermit(Arc<Limiter>);

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
        self.0.connection_freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(requests: u32, connections: u32, pending: u32) -> Arc<Limiter> {
        let limiter = Arc::new(Limiter::default());
        limiter.set_limits(&ConnectionLimitsSpec {
            max_connections: connections,
            max_pending_requests: pending,
            max_requests: requests,
        });
        limiter
    }

    #[test]
    fn requests_beyond_the_maximum_fail_fast() {
        let limiter = limiter(2, 1, 1);
        let a = limiter.start_request().unwrap();
        let _b = limiter.start_request().unwrap();
        assert_eq!(limiter.start_request().unwrap_err(), LimitExceeded::MaxRequests(2));
        drop(a);
        assert!(limiter.start_request().is_ok());
    }

    #[tokio::test]
    async fn connections_are_capped_and_waiters_are_woken() {
        let limiter = limiter(10, 1, 1);
        let permit = limiter.try_open_connection().unwrap();
        assert_eq!(limiter.try_open_connection().unwrap_err(), LimitExceeded::MaxConnections(1));
        let waiter = {
            let limiter = limiter.clone();
            tokio::spawn(async move { limiter.wait_for_connection(Duration::from_secs(5)).await })
        };
        tokio::task::yield_now().await;
        // A second waiter exceeds maxPendingRequests at once.
        assert_eq!(
            limiter.wait_for_connection(Duration::from_secs(5)).await,
            Err(LimitExceeded::MaxPendingRequests(1))
        );
        drop(permit);
        assert_eq!(waiter.await.unwrap(), Ok(()));
        assert!(limiter.try_open_connection().is_ok());
    }

    #[tokio::test]
    async fn a_waiter_asks_workers_to_close_idle_connections() {
        let limiter = limiter(10, 1, 1);
        let mut reclaim = ReclaimWatch::new();
        limiter.reclaim_idle();
        let nothing_idle = tokio::time::timeout(Duration::from_millis(50), reclaim.requested()).await;
        assert!(nothing_idle.is_err(), "with nothing idle, nobody is asked");
        let idle = limiter.connection_returned();
        assert!(!idle.reclaim_wanted());
        limiter.reclaim_idle();
        limiter.reclaim_idle();
        reclaim.requested().await;
        assert!(idle.reclaim_wanted(), "one idle connection is asked for");
        assert!(!idle.reclaim_wanted(), "and only as many as are idle");
        drop(idle);
        assert_eq!(limiter.idle.load(Ordering::Relaxed), 0);
    }
}
