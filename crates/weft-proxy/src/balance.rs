//! Choosing an endpoint of a backend Service: power of two choices over peak-EWMA cost
//! (the default), least-request, or weighted round robin.
//!
//! Weights divide cost (as Linkerd and Envoy do), so a weight-3 endpoint looks three times
//! cheaper. Ejected endpoints are skipped unless fewer than [`PANIC_THRESHOLD_PERCENT`]
//! of the pool's weight is healthy, in which case health is ignored rather than failing
//! everything. Consistent hashing and zone preference will be further [`Algorithm`]s.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use rand::Rng;
use weft_model::spec::{LoadBalancerAlgorithm, OutlierDetectionSpec, Protocol};

use crate::{
    endpoint::{monotonic_nanos, EndpointState, TryOutcome},
    limits::Limiter,
    metrics::{EjectionLabels, Metrics},
};

/// Below this share of healthy weight the balancer ignores ejections: Envoy's default
/// panic threshold. Ejecting most of a pool would only move its load onto the rest.
pub const PANIC_THRESHOLD_PERCENT: u64 = 50;

pub use weft_model::spec::LoadBalancerAlgorithm as Algorithm;

/// One endpoint of a backend, with its weight.
#[derive(Debug)]
pub struct WeightedEndpoint {
    pub state: Arc<EndpointState>,
    pub weight: u32,
    pub workload: String,
}

/// A backend Service port as the balancer sees it.
#[derive(Debug)]
pub struct Backend {
    /// `namespace/name`, for metrics and errors.
    pub name: Arc<str>,
    pub protocol: Protocol,
    pub endpoints: Vec<WeightedEndpoint>,
    pub algorithm: LoadBalancerAlgorithm,
    pub outlier_detection: OutlierDetectionSpec,
    pub limiter: Arc<Limiter>,
    total_weight: u64,
    round_robin: AtomicUsize,
}

impl Backend {
    /// Builds a backend; endpoints with weight 0 are expected to be filtered already.
    pub fn new(
        name: Arc<str>,
        protocol: Protocol,
        endpoints: Vec<WeightedEndpoint>,
        algorithm: LoadBalancerAlgorithm,
        outlier_detection: OutlierDetectionSpec,
        limiter: Arc<Limiter>,
    ) -> Self {
        let total_weight = endpoints.iter().map(|e| e.weight as u64).sum();
        Backend {
            name,
            protocol,
            endpoints,
            algorithm,
            outlier_detection,
            limiter,
            total_weight,
            round_robin: AtomicUsize::new(0),
        }
    }

    /// This backend narrowed to its endpoint at `address` (a captured call by IP): the
    /// same endpoint state, policies and connection limits, no other endpoint.
    pub fn only(&self, address: std::net::SocketAddr) -> Option<Backend> {
        let endpoint = self.endpoints.iter().find(|e| e.state.address == address)?;
        let only = WeightedEndpoint { state: endpoint.state.clone(), weight: 1, workload: endpoint.workload.clone() };
        Some(Backend::new(
            self.name.clone(),
            self.protocol,
            vec![only],
            self.algorithm,
            self.outlier_detection.clone(),
            self.limiter.clone(),
        ))
    }

    /// Picks an endpoint, avoiding `avoid` (the endpoint a retry just failed on) when
    /// another is available. `None` only when there are no endpoints at all.
    pub fn pick(&self, avoid: Option<&EndpointState>) -> Option<&Arc<EndpointState>> {
        let now = Instant::now();
        let now_nanos = monotonic_nanos(now);
        let avoided = |e: &WeightedEndpoint| avoid.is_some_and(|a| std::ptr::eq(a, &*e.state));
        let usable = |e: &WeightedEndpoint| !e.state.is_ejected(now_nanos) && !avoided(e);
        if self.endpoints.iter().all(usable) {
            return self.pick_from(self.endpoints.iter().enumerate().map(|(i, _)| i), self.endpoints.len(), now);
        }
        let healthy: Vec<usize> = (0..self.endpoints.len()).filter(|&i| usable(&self.endpoints[i])).collect();
        let healthy_weight: u64 = healthy.iter().map(|&i| self.endpoints[i].weight as u64).sum();
        if healthy.is_empty() || healthy_weight * 100 < self.total_weight * PANIC_THRESHOLD_PERCENT {
            // Panic mode: too little is healthy; spread over everything but the avoided.
            let others: Vec<usize> = (0..self.endpoints.len()).filter(|&i| !avoided(&self.endpoints[i])).collect();
            if others.is_empty() {
                return self.endpoints.first().map(|e| &e.state);
            }
            return self.pick_from(others.iter().copied(), others.len(), now);
        }
        self.pick_from(healthy.iter().copied(), healthy.len(), now)
    }

    /// Feeds one try's result back: the latency estimate, then outlier detection; an
    /// ejection is logged and counted in `weft_ejections_total`, and its length returned.
    pub fn record_try(
        &self,
        endpoint: &EndpointState,
        outcome: TryOutcome,
        latency: Duration,
        metrics: &Metrics,
    ) -> Option<Duration> {
        let now = Instant::now();
        endpoint.observe_rtt(latency, now);
        let ejected = endpoint.record_outcome(outcome, &self.outlier_detection, now, || self.may_eject());
        if let Some(length) = ejected {
            tracing::warn!(service = %self.name, endpoint = %endpoint.address, ?length, "endpoint ejected by outlier detection");
            let labels =
                EjectionLabels { destination_service: self.name.clone(), endpoint: endpoint.address.to_string() };
            metrics.ejections.get_or_create(&labels).inc();
        }
        ejected
    }

    /// The endpoints outlier detection has set aside now (for tap).
    pub fn ejected(&self) -> Vec<String> {
        let now_nanos = monotonic_nanos(Instant::now());
        self.endpoints.iter().filter(|e| e.state.is_ejected(now_nanos)).map(|e| e.state.address.to_string()).collect()
    }

    /// Whether ejecting one more endpoint stays within `maxEjectionPercent` (at least
    /// one ejection is always allowed when the percentage is above zero, as Envoy does).
    pub fn may_eject(&self) -> bool {
        let percent = self.outlier_detection.max_ejection_percent as usize;
        if percent == 0 {
            return false;
        }
        let now_nanos = monotonic_nanos(Instant::now());
        let ejected = self.endpoints.iter().filter(|e| e.state.is_ejected(now_nanos)).count();
        let allowed = (self.endpoints.len() * percent / 100).max(1);
        ejected < allowed
    }

    fn pick_from(
        &self,
        candidates: impl Iterator<Item = usize> + Clone,
        count: usize,
        now: Instant,
    ) -> Option<&Arc<EndpointState>> {
        let nth = |n: usize| candidates.clone().nth(n).expect("n < count");
        let index = match count {
            0 => return None,
            1 => nth(0),
            _ => match self.algorithm {
                LoadBalancerAlgorithm::RoundRobin => {
                    let weight: u64 = candidates.clone().map(|i| self.endpoints[i].weight as u64).sum();
                    let mut slot = (self.round_robin.fetch_add(1, Ordering::Relaxed) as u64) % weight.max(1);
                    let mut chosen = nth(0);
                    for i in candidates.clone() {
                        let w = self.endpoints[i].weight as u64;
                        if slot < w {
                            chosen = i;
                            break;
                        }
                        slot -= w;
                    }
                    chosen
                }
                LoadBalancerAlgorithm::P2cEwma
                | LoadBalancerAlgorithm::LeastRequest
                | LoadBalancerAlgorithm::ConsistentHash => {
                    let mut rng = rand::rng();
                    let a = rng.random_range(0..count);
                    let mut b = rng.random_range(0..count - 1);
                    if b >= a {
                        b += 1;
                    }
                    let (a, b) = (nth(a), nth(b));
                    if self.cost(a, now) <= self.cost(b, now) {
                        a
                    } else {
                        b
                    }
                }
            },
        };
        Some(&self.endpoints[index].state)
    }

    fn cost(&self, index: usize, now: Instant) -> f64 {
        let endpoint = &self.endpoints[index];
        let raw = match self.algorithm {
            LoadBalancerAlgorithm::LeastRequest => endpoint.state.in_flight() as f64 + 1.0,
            _ => endpoint.state.ewma_cost(now),
        };
        raw / endpoint.weight.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::EndpointRegistry;

    fn backend(registry: &EndpointRegistry, weights: &[u32], algorithm: LoadBalancerAlgorithm) -> Backend {
        let endpoints = weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| WeightedEndpoint {
                state: registry.get(crate::endpoint::EndpointKey::app(std::net::SocketAddr::from((
                    [127, 0, 0, 1],
                    1000 + i as u16,
                )))),
                weight,
                workload: format!("w{i}"),
            })
            .collect();
        let policy = OutlierDetectionSpec { consecutive5xx: 1, ..Default::default() };
        Backend::new("default/svc".into(), Protocol::Http, endpoints, algorithm, policy, Arc::default())
    }

    fn shares(backend: &Backend, picks: usize) -> Vec<usize> {
        let mut counts = vec![0; backend.endpoints.len()];
        for _ in 0..picks {
            let chosen = backend.pick(None).unwrap().address;
            counts[backend.endpoints.iter().position(|e| e.state.address == chosen).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn p2c_ewma_avoids_the_slow_endpoint() {
        let registry = EndpointRegistry::default();
        let backend = backend(&registry, &[1, 1, 1], LoadBalancerAlgorithm::P2cEwma);
        let now = Instant::now();
        backend.endpoints[0].state.observe_rtt(Duration::from_millis(200), now);
        backend.endpoints[1].state.observe_rtt(Duration::from_millis(5), now);
        backend.endpoints[2].state.observe_rtt(Duration::from_millis(5), now);
        let counts = shares(&backend, 3000);
        // P2C never picks the worst of two, so the slow one only wins against itself: never.
        assert_eq!(counts[0], 0, "{counts:?}");
    }

    #[test]
    fn weighted_round_robin_honours_weights() {
        let registry = EndpointRegistry::default();
        let backend = backend(&registry, &[3, 1], LoadBalancerAlgorithm::RoundRobin);
        assert_eq!(shares(&backend, 400), vec![300, 100]);
    }

    #[test]
    fn ejected_endpoints_are_skipped_until_panic() {
        let registry = EndpointRegistry::default();
        let backend = backend(&registry, &[1, 1, 1, 1], LoadBalancerAlgorithm::LeastRequest);
        let eject = |i: usize| {
            backend.endpoints[i].state.record_outcome(
                TryOutcome::ServerError(500),
                &backend.outlier_detection,
                Instant::now(),
                || true,
            )
        };
        assert!(eject(0).is_some());
        assert_eq!(shares(&backend, 200)[0], 0, "ejected endpoint gets nothing");
        assert!(eject(1).is_some());
        assert_eq!(shares(&backend, 200)[..2], [0, 0], "half the weight healthy: still no panic");
        assert!(eject(2).is_some());
        let counts = shares(&backend, 400);
        assert!(counts.iter().all(|&c| c > 0), "panic mode spreads over all: {counts:?}");
    }

    #[test]
    fn a_retry_avoids_the_endpoint_that_failed() {
        let registry = EndpointRegistry::default();
        let backend = backend(&registry, &[1, 1], LoadBalancerAlgorithm::P2cEwma);
        let first = &backend.endpoints[0].state;
        for _ in 0..50 {
            assert!(!Arc::ptr_eq(backend.pick(Some(first)).unwrap(), first));
        }
    }
}
