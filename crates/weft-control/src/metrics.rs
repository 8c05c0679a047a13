//! The control plane's own Prometheus metrics, served on the API's `/metrics` (viewer
//! token): what it refused and why, how fast its pushes are acknowledged and its store
//! commits, what it signs, and the telemetry it takes in, so that an operator sees a
//! misbehaving client or proxy, or a slow store, without reading logs.
//!
//! Labels are bounded: HTTP status codes, and fixed sets of reasons and results.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Labels of `weft_control_api_responses_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiResponseLabels {
    pub status: u16,
}

/// Labels of `weft_control_discovery_refusals_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DiscoveryRefusalLabels {
    /// `bad_message` (undecodable, oversized, or out of order), `revoked`, `refused_hello`.
    pub reason: &'static str,
}

/// Labels of `weft_control_certificates_signed_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SignedLabels {
    /// `join` (a first certificate, for a join token) or `renewal`.
    pub kind: &'static str,
}

/// Labels of `weft_control_telemetry_reports_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReportLabels {
    /// `accepted`, `duplicate` (sent again after a lost reply; merged once) or `refused`.
    pub result: &'static str,
}

/// Buckets from 1 ms to ~16 s, doubling: pushes and store commits on a healthy control
/// plane take milliseconds; seconds mean trouble.
pub fn latency_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15))
}

/// Every family the control plane counts.
pub struct ControlMetrics {
    registry: Registry,
    pub api_responses: Family<ApiResponseLabels, Counter>,
    pub discovery_refusals: Family<DiscoveryRefusalLabels, Counter>,
    /// Set when scraped, from the proxies this replica holds.
    pub connected_proxies: Gauge,
    /// Tap sessions this replica holds (its operators' and other replicas').
    pub tap_sessions: Gauge,
    pub push_ack_seconds: Histogram,
    pub nacks: Counter,
    pub certificates_signed: Family<SignedLabels, Counter>,
    /// Store commits, timed by the catalog (a clone of its histogram).
    pub store_commit_seconds: Histogram,
    pub telemetry_reports: Family<ReportLabels, Counter>,
    pub telemetry_rows_dropped: Counter,
    /// Set when scraped: the series this replica keeps, and their memory.
    pub telemetry_series: Gauge,
    pub telemetry_bytes: Gauge,
}

impl ControlMetrics {
    /// Creates and registers every family; store commits are observed into
    /// `store_commit_seconds` (the catalog's).
    pub fn new(store_commit_seconds: Histogram) -> Self {
        let mut registry = Registry::with_prefix("weft_control");
        let api_responses = Family::default();
        registry.register(
            "api_responses",
            "HTTP API responses by status: 4xx are refusals (400 bad body, 401 bad token, 413 body over the limit, 422 invalid documents, 429 rate limited)",
            api_responses.clone(),
        );
        let discovery_refusals = Family::default();
        registry.register(
            "discovery_refusals",
            "Discovery streams the control plane ended because of what the proxy sent or is",
            discovery_refusals.clone(),
        );
        let connected_proxies = Gauge::default();
        registry.register(
            "connected_proxies",
            "Proxies whose discovery streams this replica holds",
            connected_proxies.clone(),
        );
        let tap_sessions = Gauge::default();
        registry.register("tap_sessions", "Tap sessions this replica holds", tap_sessions.clone());
        let push_ack_seconds = latency_histogram();
        registry.register(
            "push_ack_seconds",
            "Time from pushing a configuration to a proxy to its ACK",
            push_ack_seconds.clone(),
        );
        let nacks = Counter::default();
        registry.register("nacks", "Configurations proxies refused (NACK)", nacks.clone());
        let certificates_signed = Family::default();
        registry.register(
            "certificates_signed",
            "Workload certificates signed, for join tokens and renewals",
            certificates_signed.clone(),
        );
        registry.register(
            "store_commit_seconds",
            "Time to commit a change to the store (fsync, or etcd's quorum)",
            store_commit_seconds.clone(),
        );
        let telemetry_reports = Family::default();
        registry.register(
            "telemetry_reports",
            "Telemetry reports received from proxies, by result",
            telemetry_reports.clone(),
        );
        let telemetry_rows_dropped = Counter::default();
        registry.register(
            "telemetry_rows_dropped",
            "Telemetry rows dropped: past the series cap here, or a proxy's full table",
            telemetry_rows_dropped.clone(),
        );
        let telemetry_series = Gauge::default();
        registry.register("telemetry_series", "Telemetry series this replica keeps", telemetry_series.clone());
        let telemetry_bytes = Gauge::default();
        registry.register(
            "telemetry_bytes",
            "Estimated memory of the telemetry series this replica keeps",
            telemetry_bytes.clone(),
        );
        ControlMetrics {
            registry,
            api_responses,
            discovery_refusals,
            connected_proxies,
            tap_sessions,
            push_ack_seconds,
            nacks,
            certificates_signed,
            store_commit_seconds,
            telemetry_reports,
            telemetry_rows_dropped,
            telemetry_series,
            telemetry_bytes,
        }
    }

    /// Counts one discovery stream ended for `reason`.
    pub fn discovery_refused(&self, reason: &'static str) {
        self.discovery_refusals.get_or_create(&DiscoveryRefusalLabels { reason }).inc();
    }

    /// Observes one push acknowledged after `elapsed`.
    pub fn push_acked(&self, elapsed: std::time::Duration) {
        self.push_ack_seconds.observe(elapsed.as_secs_f64());
    }

    /// Counts one telemetry report by `result`.
    pub fn telemetry_report(&self, result: &'static str) {
        self.telemetry_reports.get_or_create(&ReportLabels { result }).inc();
    }

    /// Counts telemetry rows dropped.
    pub fn telemetry_rows_dropped(&self, rows: u64) {
        if rows > 0 {
            self.telemetry_rows_dropped.inc_by(rows);
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl Default for ControlMetrics {
    fn default() -> Self {
        Self::new(latency_histogram())
    }
}
