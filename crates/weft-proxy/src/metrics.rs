//! The proxy's Prometheus metrics, served on the admin port's `/metrics`.
//!
//! Label values are `Arc<str>` taken from the serving config (service and route names),
//! so recording a request clones pointers instead of allocating strings. Cardinality is
//! bounded by configuration: services, routes, status codes and a fixed set of reasons.

use std::{cell::RefCell, collections::HashMap, hash::Hash, sync::Arc};

use crate::word_hash::WordHashBuilder;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// The empty label value, shared: label values are cached by pointer, so every "none"
/// must be the same allocation.
pub fn empty_label() -> Arc<str> {
    static EMPTY: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    EMPTY.get_or_init(|| "".into()).clone()
}

/// Label sets cached per thread before the cache is cleared; a safety net should label
/// values ever stop being shared (recording stays correct, only slower).
const MAX_CACHED_LABEL_SETS: usize = 4096;

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
    /// `true` when the hop between proxies was mutual TLS.
    pub tls: &'static str,
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

/// Labels of `weft_ejections_total`. `destination_service`, not `service`: Prometheus
/// service discovery labels every target with its own `service`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EjectionLabels {
    pub destination_service: Arc<str>,
    pub endpoint: String,
}

/// Labels of `weft_authz_decisions_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    /// `allow` or `deny`.
    pub decision: &'static str,
    /// The policy that decided, or what did when none matched (`(default: deny)`, ...);
    /// empty when the default allowed.
    pub policy: String,
}

/// Labels of `weft_config_reloads_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: &'static str,
}

/// Labels of `weft_protocol_errors_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolErrorLabels {
    /// The listener: `outbound` (the application's side) or `inbound` (callers').
    pub direction: &'static str,
    /// A [`crate::protocol_errors::ProtocolError`] label.
    pub reason: &'static str,
}

/// Labels of `weft_trace_spans_dropped_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SpanDropLabels {
    /// `buffer_full` (a worker made more spans in a second than it holds),
    /// `queue_full` (the exporter is behind) or `export_failed` (the receiver did not
    /// take them).
    pub reason: &'static str,
}

/// Labels of `weft_access_log_lines_dropped_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LogDropLabels {
    /// `buffer_full` (a worker logged more than 4 MiB in a second), `queue_full` (the
    /// writer is behind) or `write_failed` (the file could not be opened or written).
    pub reason: &'static str,
}

/// Labels of `weft_tap_events_dropped_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TapDropLabels {
    /// `rate` (beyond the session's share of `--max-rps`) or `queue` (the stream to
    /// the control plane is behind).
    pub reason: &'static str,
}

/// Labels of `weft_captured_connections_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CapturedLabels {
    /// What the original destination was: `service` (a virtual IP), `endpoint` (a call
    /// by IP), `external` (an ExternalService's), `unknown` (outside the mesh) or
    /// `explicit` (the listener itself).
    pub destination: &'static str,
    /// `meshed`, `passthrough` (ALLOW_ANY), `refused_registry_only`, `refused_unknown_port`.
    pub outcome: &'static str,
}

/// The tap counters a finished event needs, cloned out of [`Metrics`].
pub struct TapMetrics {
    pub events: Counter,
    pub dropped_queue: Counter,
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
    pub authz_decisions: Family<AuthzLabels, Counter>,
    pub protocol_errors: Family<ProtocolErrorLabels, Counter>,
    pub spans_exported: Counter,
    pub spans_dropped: Family<SpanDropLabels, Counter>,
    pub log_lines: Counter,
    pub log_lines_dropped: Family<LogDropLabels, Counter>,
    pub tap_sessions: Gauge,
    pub tap_events: Counter,
    pub tap_events_dropped: Family<TapDropLabels, Counter>,
    pub captured: Family<CapturedLabels, Counter>,
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
        let authz_decisions = Family::default();
        registry.register(
            "authz_decisions",
            "Inbound requests and connections judged by authorization, by decision and deciding policy",
            authz_decisions.clone(),
        );
        let protocol_errors = Family::default();
        registry.register(
            "protocol_errors",
            "Connections and requests refused for breaking their protocol (HTTP/1, HTTP/2, mesh TLS), by listener and reason",
            protocol_errors.clone(),
        );
        let spans_exported = Counter::default();
        registry.register("trace_spans_exported", "Spans the trace receiver took", spans_exported.clone());
        let spans_dropped = Family::default();
        registry.register(
            "trace_spans_dropped",
            "Spans dropped instead of slowing requests, by reason",
            spans_dropped.clone(),
        );
        let log_lines = Counter::default();
        registry.register("access_log_lines", "Access log lines written", log_lines.clone());
        let log_lines_dropped = Family::default();
        registry.register(
            "access_log_lines_dropped",
            "Access log lines dropped instead of slowing requests, by reason",
            log_lines_dropped.clone(),
        );
        let tap_sessions = Gauge::default();
        registry.register("tap_sessions", "Tap sessions this proxy is recording for", tap_sessions.clone());
        let tap_events = Counter::default();
        registry.register("tap_events", "Tap events sent to the control plane", tap_events.clone());
        let tap_events_dropped = Family::default();
        registry.register(
            "tap_events_dropped",
            "Requests a tap session matched but did not get, by reason",
            tap_events_dropped.clone(),
        );
        let captured = Family::default();
        registry.register(
            "captured_connections",
            "Connections transparent capture brought to the outbound listener, by original destination and outcome",
            captured.clone(),
        );
        Metrics {
            captured,
            registry,
            tap_sessions,
            tap_events,
            tap_events_dropped,
            log_lines,
            log_lines_dropped,
            spans_exported,
            spans_dropped,
            requests,
            request_duration,
            tcp_connections,
            tcp_bytes,
            retries,
            ejections,
            config_reloads,
            authz_decisions,
            protocol_errors,
        }
    }

    /// Counts one refused protocol violation on `direction`'s listener.
    pub fn protocol_error(&self, direction: &'static str, error: crate::protocol_errors::ProtocolError) {
        self.protocol_errors.get_or_create(&ProtocolErrorLabels { direction, reason: error.as_str() }).inc();
    }

    /// The tap counters, for an event that finishes later.
    pub fn tap(&self) -> TapMetrics {
        TapMetrics {
            events: self.tap_events.clone(),
            dropped_queue: self.tap_events_dropped.get_or_create(&TapDropLabels { reason: "queue" }).clone(),
        }
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

/// The identity of one request's label set: the label values' pointers (the cache entry
/// holds the `Arc`s, so no address is reused while it exists), status and reason.
#[derive(PartialEq, Eq, Hash)]
struct RequestKey {
    metrics: usize,
    direction: (usize, usize),
    source: usize,
    destination: usize,
    route: usize,
    status: u16,
    /// Pointer and length: an empty literal may start where another one does.
    error: (usize, usize),
    tls: bool,
}

/// Cached handles of one label set, and the `Arc`s that keep its key unique.
struct CachedRequestMetrics {
    counter: Counter,
    histogram: Histogram,
    _pinned: (Arc<str>, Arc<str>, Arc<str>),
}

thread_local! {
    static REQUEST_METRICS: RefCell<HashMap<RequestKey, CachedRequestMetrics, WordHashBuilder>> =
        RefCell::new(HashMap::default());
}

impl Metrics {
    /// Counts one request and observes its latency. The families are looked up once per
    /// label set and thread; afterwards recording is a pointer-keyed map hit and two
    /// atomic updates.
    pub fn record_request(&self, labels: RequestLabels, seconds: f64) {
        let key = RequestKey {
            metrics: self as *const Metrics as usize,
            direction: (labels.direction.as_ptr() as usize, labels.direction.len()),
            source: Arc::as_ptr(&labels.source_service) as *const u8 as usize,
            destination: Arc::as_ptr(&labels.destination_service) as *const u8 as usize,
            route: Arc::as_ptr(&labels.route) as *const u8 as usize,
            status: labels.status_code,
            error: (labels.error.as_ptr() as usize, labels.error.len()),
            tls: labels.tls == "true",
        };
        REQUEST_METRICS.with(|cache| {
            let mut cache = cache.borrow_mut();
            if cache.len() >= MAX_CACHED_LABEL_SETS && !cache.contains_key(&key) {
                cache.clear();
            }
            let entry = cache.entry(key).or_insert_with(|| {
                let duration_labels = DurationLabels {
                    direction: labels.direction,
                    source_service: labels.source_service.clone(),
                    destination_service: labels.destination_service.clone(),
                    route: labels.route.clone(),
                };
                CachedRequestMetrics {
                    counter: self.requests.get_or_create_owned(&labels),
                    histogram: self.request_duration.get_or_create_owned(&duration_labels),
                    _pinned: (labels.source_service.clone(), labels.destination_service.clone(), labels.route.clone()),
                }
            });
            entry.counter.inc();
            entry.histogram.observe(seconds);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(destination: &Arc<str>, status: u16) -> RequestLabels {
        RequestLabels {
            direction: "outbound",
            source_service: empty_label(),
            destination_service: destination.clone(),
            route: empty_label(),
            status_code: status,
            error: "",
            tls: "false",
        }
    }

    #[test]
    fn cached_recording_counts_per_label_set() {
        let metrics = Metrics::new();
        let (a, b): (Arc<str>, Arc<str>) = ("ns/a".into(), "ns/b".into());
        for _ in 0..3 {
            metrics.record_request(labels(&a, 200), 0.001);
        }
        metrics.record_request(labels(&a, 503), 0.001);
        metrics.record_request(labels(&b, 200), 0.001);
        // Equal strings in different allocations are one series.
        metrics.record_request(labels(&"ns/b".into(), 200), 0.001);
        // The same request over mutual TLS is a series of its own.
        metrics.record_request(RequestLabels { tls: "true", ..labels(&a, 200) }, 0.001);
        REQUEST_METRICS.with(|cache| assert_eq!(cache.borrow().len(), 5, "one entry per label identity"));
        let text = metrics.encode();
        assert!(
            text.contains(r#"destination_service="ns/a",route="",status_code="200",error="",tls="false"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"destination_service="ns/a",route="",status_code="503",error="",tls="false"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"destination_service="ns/b",route="",status_code="200",error="",tls="false"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"destination_service="ns/a",route="",status_code="200",error="",tls="true"} 1"#),
            "{text}"
        );
    }
}
