//! What the proxy learns about each endpoint at run time: a peak-EWMA latency estimate,
//! the requests in flight, and outlier-detection (ejection) state.
//!
//! One [`EndpointState`] exists per [`EndpointKey`] (the address, the identity the peer
//! must prove, the protocol, and the Service port conveyed to a meshed peer) and is
//! shared by every Service and snapshot that lists that endpoint; [`EndpointRegistry`]
//! hands out the same `Arc` across configuration swaps, so nothing learned is reset by a
//! config change. Two Workloads at one address with different identities are two
//! endpoints: neither's security can leak into the other's, and pooled connections are
//! keyed the same way (`pool.rs`).

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, OnceLock, Weak,
    },
    time::{Duration, Instant},
};

use weft_model::spec::{OutlierDetectionSpec, Protocol};

/// RTT assumed for an endpoint never measured: optimistic enough that new endpoints are
/// tried soon, pessimistic enough that one slow first response is not chased.
pub const DEFAULT_RTT: Duration = Duration::from_millis(10);
/// Peak-EWMA decay time, Linkerd's default: an estimate halves in ~7s without traffic,
/// so a slow endpoint is re-probed now and then rather than abandoned for good.
pub const EWMA_DECAY: Duration = Duration::from_secs(10);

/// Nanoseconds on a process-wide monotonic clock, cheap to store in an atomic.
pub fn monotonic_nanos(at: Instant) -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    at.saturating_duration_since(base).as_nanos() as u64 + 1
}

/// How one try against an endpoint ended, as outlier detection and EWMA see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TryOutcome {
    /// A response that is not a 5xx.
    Success,
    /// A 5xx response, with its status.
    ServerError(u16),
    /// The connection could not be made.
    ConnectFailure,
    /// The connection broke or timed out before a response.
    Reset,
}

impl TryOutcome {
    fn is_gateway_error(self) -> bool {
        matches!(self, TryOutcome::ServerError(502..=504) | TryOutcome::ConnectFailure | TryOutcome::Reset)
    }
}

/// What makes one endpoint distinct from another: two endpoints that differ in any part
/// share no learned state and no connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointKey {
    pub address: SocketAddr,
    /// The SPIFFE ID the peer must prove over mutual TLS; `None`: plaintext.
    pub identity: Option<Arc<str>>,
    /// What the Service port carries.
    pub protocol: Protocol,
    /// The Service port the caller resolved, conveyed to a meshed peer inside the TLS
    /// session (so that its authorization judges the real port); 0 for plaintext, which
    /// conveys nothing.
    pub service_port: u16,
}

impl EndpointKey {
    /// The key of an endpoint reached over `protocol` through Service port `port`.
    pub fn new(address: SocketAddr, identity: Option<Arc<str>>, protocol: Protocol, port: u16) -> Self {
        let service_port = if identity.is_some() { port } else { 0 };
        EndpointKey { address, identity, protocol, service_port }
    }

    /// The local application: plaintext, HTTP.
    pub fn app(address: SocketAddr) -> Self {
        EndpointKey { address, identity: None, protocol: Protocol::Http, service_port: 0 }
    }
}

/// The identity stays out of the hash (equal keys still hash alike): keys that differ by
/// identity alone are rare, and hashing a SPIFFE ID on every pool lookup is not free.
impl Hash for EndpointKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.address.hash(state);
        self.service_port.hash(state);
        self.protocol.hash(state);
    }
}

/// Runtime state of one endpoint.
#[derive(Debug)]
pub struct EndpointState {
    pub key: EndpointKey,
    pub address: SocketAddr,
    in_flight: AtomicUsize,
    /// 0 when not ejected, else [`monotonic_nanos`] of the ejection's end.
    ejected_until: AtomicU64,
    rtt: Mutex<RttEstimate>,
    outlier: Mutex<OutlierState>,
    /// How the key's identity is reached: plaintext, mutual TLS, or not yet possible (no
    /// credentials of this proxy's own yet); only ever changes within the key's identity.
    security: arc_swap::ArcSwap<crate::transport::PeerSecurity>,
}

#[derive(Debug)]
struct RttEstimate {
    nanos: f64,
    updated: Instant,
    measured: bool,
}

#[derive(Debug, Default)]
struct OutlierState {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    times_ejected: u32,
    /// When `times_ejected` was last raised or decayed.
    last_change: Option<Instant>,
}

impl EndpointState {
    fn new(key: EndpointKey) -> Self {
        EndpointState {
            address: key.address,
            key,
            in_flight: AtomicUsize::new(0),
            ejected_until: AtomicU64::new(0),
            rtt: Mutex::new(RttEstimate {
                nanos: DEFAULT_RTT.as_nanos() as f64,
                updated: Instant::now(),
                measured: false,
            }),
            outlier: Mutex::new(OutlierState::default()),
            security: arc_swap::ArcSwap::from_pointee(crate::transport::PeerSecurity::Plaintext),
        }
    }

    /// How connections to this endpoint are secured.
    pub fn security(&self) -> Arc<crate::transport::PeerSecurity> {
        self.security.load_full()
    }

    /// Whether connections to this endpoint use mutual TLS (per request: no clone).
    pub fn is_meshed(&self) -> bool {
        !matches!(**self.security.load(), crate::transport::PeerSecurity::Plaintext)
    }

    /// Sets how connections to this endpoint are secured, from a new configuration.
    pub fn set_security(&self, security: Arc<crate::transport::PeerSecurity>) {
        self.security.store(security);
    }

    /// Requests currently in flight to this endpoint.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Marks a request as started; the guard ends it.
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Whether the endpoint is ejected at `now_nanos`.
    pub fn is_ejected(&self, now_nanos: u64) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && until > now_nanos
    }

    /// How much longer the endpoint stays ejected at `now_nanos`; `None` when it is not.
    pub fn ejected_for(&self, now_nanos: u64) -> Option<Duration> {
        let until = self.ejected_until.load(Ordering::Relaxed);
        (until != 0 && until > now_nanos).then(|| Duration::from_nanos(until - now_nanos))
    }

    /// The peak-EWMA cost: the decayed latency estimate × (in-flight + 1), in nanoseconds.
    pub fn ewma_cost(&self, now: Instant) -> f64 {
        let mut rtt = self.rtt.lock().expect("rtt lock poisoned");
        rtt.decay_to(now, 0.0);
        rtt.nanos * (self.in_flight() as f64 + 1.0)
    }

    /// The current latency estimate, decayed to now (for `/config`).
    pub fn rtt_estimate(&self) -> Duration {
        let mut rtt = self.rtt.lock().expect("rtt lock poisoned");
        rtt.decay_to(Instant::now(), 0.0);
        Duration::from_nanos(rtt.nanos as u64)
    }

    /// Records a latency observation: peaks are taken at once, drops are smoothed.
    pub fn observe_rtt(&self, rtt: Duration, now: Instant) {
        let observed = rtt.as_nanos() as f64;
        let mut estimate = self.rtt.lock().expect("rtt lock poisoned");
        if !estimate.measured || observed > estimate.nanos {
            estimate.nanos = observed;
            estimate.updated = now;
            estimate.measured = true;
        } else {
            estimate.decay_to(now, observed);
        }
    }

    /// Feeds outlier detection. `may_eject` says whether the Service's
    /// `maxEjectionPercent` allows one more ejection; returns the ejection length if
    /// this outcome ejected the endpoint.
    pub fn record_outcome(
        &self,
        outcome: TryOutcome,
        policy: &OutlierDetectionSpec,
        now: Instant,
        may_eject: impl FnOnce() -> bool,
    ) -> Option<Duration> {
        let mut state = self.outlier.lock().expect("outlier lock poisoned");
        match outcome {
            TryOutcome::Success => {
                state.consecutive_5xx = 0;
                state.consecutive_gateway = 0;
                // Envoy's decay: each healthy interval forgives one past ejection, so a
                // recovered endpoint's next ejection is short again.
                if state.times_ejected > 0 && !self.is_ejected(monotonic_nanos(now)) {
                    if let Some(last) = state.last_change {
                        if now.duration_since(last) >= policy.interval.0 {
                            state.times_ejected -= 1;
                            state.last_change = Some(now);
                        }
                    }
                }
                return None;
            }
            TryOutcome::ServerError(_) => state.consecutive_5xx += 1,
            _ => {}
        }
        if outcome.is_gateway_error() {
            state.consecutive_gateway += 1;
        }
        let tripped = (policy.consecutive5xx > 0 && state.consecutive_5xx >= policy.consecutive5xx)
            || (policy.consecutive_gateway_errors > 0
                && state.consecutive_gateway >= policy.consecutive_gateway_errors);
        if !tripped || self.is_ejected(monotonic_nanos(now)) || !may_eject() {
            return None;
        }
        state.times_ejected += 1;
        state.consecutive_5xx = 0;
        state.consecutive_gateway = 0;
        state.last_change = Some(now);
        let length = policy
            .base_ejection_time
            .0
            .saturating_mul(state.times_ejected)
            .min(policy.max_ejection_time.0.max(policy.base_ejection_time.0));
        self.ejected_until.store(monotonic_nanos(now + length), Ordering::Relaxed);
        Some(length)
    }
}

impl RttEstimate {
    /// Moves the estimate toward `toward` by the time elapsed since the last update.
    fn decay_to(&mut self, now: Instant, toward: f64) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        if elapsed <= 0.0 {
            return;
        }
        let keep = (-elapsed / EWMA_DECAY.as_secs_f64()).exp();
        self.nanos = self.nanos * keep + toward * (1.0 - keep);
        self.updated = now;
    }
}

/// Ends an in-flight request when dropped, whatever path the request took.
#[derive(Debug)]
pub struct InFlight(Arc<EndpointState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Hands out one shared [`EndpointState`] per key for as long as any snapshot uses it.
#[derive(Debug, Default)]
pub struct EndpointRegistry {
    states: Mutex<HashMap<EndpointKey, Weak<EndpointState>>>,
}

impl EndpointRegistry {
    /// The state for `key`, the same `Arc` as before if it is still in use.
    pub fn get(&self, key: EndpointKey) -> Arc<EndpointState> {
        let mut states = self.states.lock().expect("registry lock poisoned");
        if let Some(state) = states.get(&key).and_then(Weak::upgrade) {
            return state;
        }
        let state = Arc::new(EndpointState::new(key.clone()));
        states.insert(key, Arc::downgrade(&state));
        state
    }

    /// Forgets endpoints no snapshot uses any more.
    pub fn prune(&self) {
        self.states.lock().expect("registry lock poisoned").retain(|_, state| state.strong_count() > 0);
    }

    /// Whether some snapshot still uses the endpoint `key`: pooled connections of keys
    /// that are gone are closed rather than kept for their idle timeout.
    pub fn is_current(&self, key: &EndpointKey) -> bool {
        self.states.lock().expect("registry lock poisoned").get(key).is_some_and(|state| state.strong_count() > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> OutlierDetectionSpec {
        OutlierDetectionSpec { consecutive5xx: 3, ..OutlierDetectionSpec::default() }
    }

    fn key(identity: Option<&str>) -> EndpointKey {
        EndpointKey::new("127.0.0.1:1".parse().unwrap(), identity.map(Arc::from), Protocol::Http, 80)
    }

    #[test]
    fn registry_keeps_state_across_lookups() {
        let registry = EndpointRegistry::default();
        let a = registry.get(key(None));
        a.observe_rtt(Duration::from_millis(50), Instant::now());
        let again = registry.get(key(None));
        assert!(Arc::ptr_eq(&a, &again));
        assert!(registry.is_current(&key(None)));
        drop((a, again));
        registry.prune();
        assert!(registry.states.lock().unwrap().is_empty());
        assert!(!registry.is_current(&key(None)));
    }

    #[test]
    fn one_address_with_other_security_is_another_endpoint() {
        let registry = EndpointRegistry::default();
        let plaintext = registry.get(key(None));
        let reviews = registry.get(key(Some("spiffe://weft.local/ns/default/sa/reviews")));
        let ratings = registry.get(key(Some("spiffe://weft.local/ns/default/sa/ratings")));
        assert!(!Arc::ptr_eq(&plaintext, &reviews) && !Arc::ptr_eq(&reviews, &ratings));
        assert_eq!(plaintext.key.service_port, 0, "plaintext conveys no port");
        assert_eq!(reviews.key.service_port, 80);
        let grpc = EndpointKey { protocol: Protocol::Grpc, ..reviews.key.clone() };
        assert!(!Arc::ptr_eq(&registry.get(grpc), &reviews), "another protocol is another endpoint");
    }

    #[test]
    fn peak_is_taken_at_once_and_decays_slowly() {
        let state = EndpointState::new(key(None));
        let now = Instant::now();
        state.observe_rtt(Duration::from_millis(100), now);
        state.observe_rtt(Duration::from_millis(1), now + Duration::from_millis(10));
        let cost = state.ewma_cost(now + Duration::from_millis(10));
        assert!(cost > 90e6, "a drop is smoothed, not taken: {cost}");
        let later = state.ewma_cost(now + Duration::from_secs(60));
        assert!(later < 1e6, "the estimate decays without traffic: {later}");
    }

    #[test]
    fn consecutive_errors_eject_with_growing_length_and_success_resets() {
        let state = EndpointState::new(key(None));
        let policy = policy();
        let now = Instant::now();
        for _ in 0..2 {
            assert_eq!(state.record_outcome(TryOutcome::ServerError(500), &policy, now, || true), None);
        }
        state.record_outcome(TryOutcome::Success, &policy, now, || true);
        for _ in 0..2 {
            assert_eq!(state.record_outcome(TryOutcome::ServerError(500), &policy, now, || true), None);
        }
        assert_eq!(
            state.record_outcome(TryOutcome::ServerError(500), &policy, now, || true),
            Some(Duration::from_secs(30))
        );
        assert!(state.is_ejected(monotonic_nanos(now)));
        assert!(!state.is_ejected(monotonic_nanos(now + Duration::from_secs(31))));
        let later = now + Duration::from_secs(31);
        for _ in 0..2 {
            state.record_outcome(TryOutcome::ServerError(503), &policy, later, || true);
        }
        assert_eq!(
            state.record_outcome(TryOutcome::ServerError(503), &policy, later, || true),
            Some(Duration::from_secs(60))
        );
    }

    #[test]
    fn max_ejection_percent_is_respected() {
        let state = EndpointState::new(key(None));
        let policy = policy();
        for _ in 0..5 {
            assert_eq!(state.record_outcome(TryOutcome::ConnectFailure, &policy, Instant::now(), || false), None);
        }
        assert!(!state.is_ejected(monotonic_nanos(Instant::now())));
    }
}
