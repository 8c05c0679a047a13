//! The proxy's Prometheus metrics, served on the admin port's `/metrics`.
//!
//! Label values are `Arc<str>` taken from the serving config (service and route names),
//! so recording a request clones pointers instead of allocating strings. Cardinality is
//! bounded by configuration: services, routes, status codes and a fixed set of reasons.

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

/// Labels of `weft_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: &'static str,
    pub source_service: Arc<str>,
    pub destination_service: Arc<str>,
    pub route: Arc<str>,
    pub status_code: u16,
    /// Empty when the application answered; else the proxy's reason.
    pub error: &'static str,
}

/// Labels of `weft_request_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DurationLabels {
    pub direction: &'static str,
    pub source_service: Arc<str>,
    pub destination_service: Arc<str>,
    pub route: Arc<str>,
}

/// Labels of the TCP metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub direction: &'static str,
    pub destination_service: Arc<str>,
}

/// Labels of `weft_tcp_bytes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpBytesLabels {
    pub direction: &'static str,
    pub destination_service: Arc<str>,
    /// `sent` (toward the destination) or `received`.
    pub flow: &'static str,
}

/// Labels of `weft_retries_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub destination_service: Arc<str>,
    /// `retried`, or `budget_exhausted` when the budget refused a retry.
    pub outcome: &'static str,
}

/// Labels of `weft_ejections_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EjectionLabels {
    pub service: Arc<str>,
    pub endpoint: String,
}

/// Labels of `weft_config_reloads_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: &'static str,
}

/// All of the proxy's metric families.
pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<DurationLabels, Histogram>,
    pub tcp_connections: Family<TcpLabels, Counter>,
    pub tcp_bytes: Family<TcpBytesLabels, Counter>,
    pub retries: Family<RetryLabels, Counter>,
    pub ejections: Family<EjectionLabels, Counter>,
    pub config_reloads: Family<ReloadLabels, Counter>,
}

/// Latency buckets from 0.5 ms to ~33 s, doubling: covers sidecar-added microseconds
/// through slow backends with 17 buckets.
fn duration_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 17))
}

impl Metrics {
    /// Creates and registers every family.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("weft");
        let requests = Family::default();
        registry.register(
            "requests",
            "HTTP requests handled, by direction, services, route, status and proxy error",
            requests.clone(),
        );
        let request_duration =
            Family::<DurationLabels, Histogram>::new_with_constructor(duration_histogram as fn() -> Histogram);
        registry.register(
            "request_duration_seconds",
            "Time from request to response headers",
            request_duration.clone(),
        );
        let tcp_connections = Family::default();
        registry.register("tcp_connections", "Opaque TCP connections forwarded", tcp_connections.clone());
        let tcp_bytes = Family::default();
        registry.register("tcp_bytes", "Bytes forwarded on opaque TCP connections", tcp_bytes.clone());
        let retries = Family::default();
        registry.register("retries", "Retries sent, and retries the budget refused", retries.clone());
        let ejections = Family::default();
        registry.register("ejections", "Endpoints ejected by outlier detection", ejections.clone());
        let config_reloads = Family::default();
        registry.register("config_reloads", "Configuration loads, by result", config_reloads.clone());
        Metrics { registry, requests, request_duration, tcp_connections, tcp_bytes, retries, ejections, config_reloads }
    }

    /// The Prometheus text exposition of every family.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
