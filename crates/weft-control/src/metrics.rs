//! The control plane's own Prometheus metrics, served on the API's `/metrics` (viewer
//! token): what it refused and why, so that an operator sees a misbehaving client or
//! proxy without reading logs.
//!
//! Labels are bounded: HTTP status codes, and a fixed set of discovery reasons.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
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

/// Every family the control plane counts.
pub struct ControlMetrics {
    registry: Registry,
    pub api_responses: Family<ApiResponseLabels, Counter>,
    pub discovery_refusals: Family<DiscoveryRefusalLabels, Counter>,
}

impl ControlMetrics {
    /// Creates and registers every family.
    pub fn new() -> Self {
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
        ControlMetrics { registry, api_responses, discovery_refusals }
    }

    /// Counts one discovery stream ended for `reason`.
    pub fn discovery_refused(&self, reason: &'static str) {
        self.discovery_refusals.get_or_create(&DiscoveryRefusalLabels { reason }).inc();
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
        Self::new()
    }
}
