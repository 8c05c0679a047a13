//! `TrafficPolicy`: how callers treat one Service — balancing, retries, timeouts,
//! outlier detection and connection limits.
//!
//! Defaults live here, next to the fields, with the reason for each value.

use serde::{Deserialize, Serialize};

use crate::GoDuration;

/// `spec` of a `TrafficPolicy`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    pub target_ref: PolicyTargetRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetrySpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<PolicyTimeouts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetectionSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_limits: Option<ConnectionLimitsSpec>,
    /// The sampling rate of traces started by requests to this Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<super::ServiceTracingSpec>,
    /// Access logging of requests to this Service, over MeshConfig's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<super::ServiceAccessLogSpec>,
    /// Declared so it can be refused by name: not implemented yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<serde_json::Value>,
    /// Declared so it can be refused by name: not implemented yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault_injection: Option<serde_json::Value>,
}

/// The Service a policy applies to.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyTargetRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// Endpoint selection.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadBalancerSpec {
    #[serde(default)]
    pub algorithm: LoadBalancerAlgorithm,
}

/// Balancing algorithms.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum LoadBalancerAlgorithm {
    /// Power of two choices over peak-EWMA latency × in-flight, divided by weight: sends
    /// little traffic to slow endpoints without herding onto one fast one.
    #[default]
    P2cEwma,
    /// Weighted round robin.
    RoundRobin,
    /// Power of two choices over in-flight requests ÷ weight.
    LeastRequest,
    /// Declared so it can be refused by name: arrives with zone awareness.
    ConsistentHash,
}

/// Retries, set on the Service the caller addressed.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetrySpec {
    /// Retries after the first try; 0 disables.
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<GoDuration>,
    /// Conditions; `[connect-failure]` when omitted.
    #[serde(default = "default_retry_on")]
    pub retry_on: Vec<RetryOn>,
    #[serde(default)]
    pub budget: RetryBudgetSpec,
    #[serde(default)]
    pub backoff: BackoffSpec,
    /// Retry POST, PATCH and other non-idempotent methods too. Off by default: a retried
    /// POST may run twice on the server.
    #[serde(default)]
    pub retry_non_idempotent: bool,
}

fn default_retry_on() -> Vec<RetryOn> {
    vec![RetryOn::ConnectFailure]
}

/// What makes a try retryable.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    /// Any 5xx response.
    #[serde(rename = "5xx")]
    FiveXx,
    /// 502, 503 or 504.
    GatewayError,
    /// The endpoint could not be connected to (the request never reached it).
    ConnectFailure,
    /// The connection was reset or closed before a response.
    Reset,
    /// 409 Conflict.
    #[serde(rename = "retriable-4xx")]
    Retriable4xx,
    /// The per-try timeout fired.
    Timeout,
}

/// Retries may add at most `ratio` of the requests seen over `window`, plus
/// `minPerSecond`, so retries cannot multiply the load on a failing service.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryBudgetSpec {
    /// 0.2: Linkerd's and Finagle's long-standing default.
    #[serde(default = "default_budget_ratio")]
    pub ratio: f64,
    /// 10 per second, so that low-traffic services can still retry.
    #[serde(default = "default_budget_min")]
    pub min_per_second: u32,
    /// 10s, long enough to smooth bursts, short enough to react.
    #[serde(default = "default_budget_window")]
    pub window: GoDuration,
}

fn default_budget_ratio() -> f64 {
    0.2
}
fn default_budget_min() -> u32 {
    10
}
fn default_budget_window() -> GoDuration {
    GoDuration(std::time::Duration::from_secs(10))
}

impl Default for RetryBudgetSpec {
    fn default() -> Self {
        RetryBudgetSpec {
            ratio: default_budget_ratio(),
            min_per_second: default_budget_min(),
            window: default_budget_window(),
        }
    }
}

/// Exponential backoff with full jitter between tries.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackoffSpec {
    /// 25ms: Envoy's default base interval.
    #[serde(default = "default_backoff_base")]
    pub base: GoDuration,
    /// 250ms: ten times the base, as Envoy does.
    #[serde(default = "default_backoff_max")]
    pub max: GoDuration,
}

fn default_backoff_base() -> GoDuration {
    GoDuration(std::time::Duration::from_millis(25))
}
fn default_backoff_max() -> GoDuration {
    GoDuration(std::time::Duration::from_millis(250))
}

impl Default for BackoffSpec {
    fn default() -> Self {
        BackoffSpec { base: default_backoff_base(), max: default_backoff_max() }
    }
}

/// Timeouts for requests to a Service that no route's `timeouts` cover.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyTimeouts {
    /// Whole exchange until response headers, retries included; none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<GoDuration>,
}

/// Ejects endpoints that keep failing (circuit breaking per endpoint).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutlierDetectionSpec {
    /// Consecutive 5xx responses that eject; 0 disables. Default 5, as Envoy.
    #[serde(default = "default_consecutive")]
    pub consecutive5xx: u32,
    /// Consecutive 502/503/504 or connect failures that eject; 0 disables. Default 5.
    #[serde(default = "default_consecutive")]
    pub consecutive_gateway_errors: u32,
    /// How often ejections are re-evaluated. Default 10s, as Envoy.
    #[serde(default = "default_interval")]
    pub interval: GoDuration,
    /// Ejection lasts this × times ejected. Default 30s, as Envoy.
    #[serde(default = "default_base_ejection")]
    pub base_ejection_time: GoDuration,
    /// Cap on one ejection. Default 300s, as Envoy.
    #[serde(default = "default_max_ejection")]
    pub max_ejection_time: GoDuration,
    /// Never eject more than this share of a service's endpoints. Default 50.
    #[serde(default = "default_max_percent")]
    pub max_ejection_percent: u32,
}

fn default_consecutive() -> u32 {
    5
}
fn default_interval() -> GoDuration {
    GoDuration(std::time::Duration::from_secs(10))
}
fn default_base_ejection() -> GoDuration {
    GoDuration(std::time::Duration::from_secs(30))
}
fn default_max_ejection() -> GoDuration {
    GoDuration(std::time::Duration::from_secs(300))
}
fn default_max_percent() -> u32 {
    50
}

impl Default for OutlierDetectionSpec {
    fn default() -> Self {
        OutlierDetectionSpec {
            // Without a policy only gateway errors eject: an app's own 500 on bad input
            // should not take an instance out of rotation unless the operator asks.
            consecutive5xx: 0,
            consecutive_gateway_errors: default_consecutive(),
            interval: default_interval(),
            base_ejection_time: default_base_ejection(),
            max_ejection_time: default_max_ejection(),
            max_ejection_percent: default_max_percent(),
        }
    }
}

/// Per-proxy limits toward a Service's endpoints; beyond them requests fail fast (503).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConnectionLimitsSpec {
    /// Open upstream connections. Default 1024, as Envoy.
    #[serde(default = "default_limit")]
    pub max_connections: u32,
    /// Requests waiting for a connection. Default 1024, as Envoy.
    #[serde(default = "default_limit")]
    pub max_pending_requests: u32,
    /// Requests in flight. Default 1024, as Envoy.
    #[serde(default = "default_limit")]
    pub max_requests: u32,
}

fn default_limit() -> u32 {
    1024
}

impl Default for ConnectionLimitsSpec {
    fn default() -> Self {
        ConnectionLimitsSpec {
            max_connections: default_limit(),
            max_pending_requests: default_limit(),
            max_requests: default_limit(),
        }
    }
}
