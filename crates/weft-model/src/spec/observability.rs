//! Tracing settings: MeshConfig's mesh-wide `tracing` (where spans go, how many requests
//! start a trace, who may force one) and a TrafficPolicy's per-Service sampling override.

use serde::{Deserialize, Serialize};

/// MeshConfig `tracing`: proxies start and continue traces and export their spans here.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshTracingSpec {
    /// The OTLP receiver: `http://host:port` (gRPC, usually port 4317), or for
    /// `protocol: http` a base URL to which `/v1/traces` is added (usually port 4318)
    /// unless the URL already has a path.
    pub endpoint: String,
    #[serde(default)]
    pub protocol: OtlpProtocol,
    /// Share of requests that start a trace, 0-1. 0.01: Istio's long-standing default,
    /// enough to see every busy route in a minute of traffic at negligible cost.
    #[serde(default = "default_sampling_rate")]
    pub sampling_rate: f64,
    /// SPIFFE IDs whose requests may force a trace with `x-weft-trace: force`. Anyone
    /// else's header is ignored: forcing bypasses sampling, so it is a privilege.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub force_from: Vec<String>,
}

fn default_sampling_rate() -> f64 {
    0.01
}

/// How spans are sent to the receiver.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OtlpProtocol {
    /// OTLP over gRPC (`opentelemetry.proto.collector.trace.v1.TraceService/Export`).
    #[default]
    Grpc,
    /// OTLP over HTTP with protobuf bodies (`POST /v1/traces`).
    Http,
}

/// TrafficPolicy `tracing`: the sampling rate of requests to the targeted Service, in
/// place of MeshConfig's.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceTracingSpec {
    pub sampling_rate: f64,
}

/// MeshConfig `accessLog`: the mesh-wide default of access logging, and where lines go.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshAccessLogSpec {
    /// `stderr`, or a file each proxy appends to (reopened on SIGUSR1, for rotation).
    #[serde(default = "default_log_path")]
    pub path: String,
    /// Whether requests are logged unless a Service's TrafficPolicy says otherwise.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Share of requests logged, 0-1.
    #[serde(default = "default_log_sampling")]
    pub sampling_rate: f64,
    /// Log only failed requests (5xx, a proxy-made answer, a transport error).
    #[serde(default)]
    pub errors_only: bool,
}

fn default_log_path() -> String {
    "stderr".into()
}

fn default_true() -> bool {
    true
}

fn default_log_sampling() -> f64 {
    1.0
}

/// TrafficPolicy `accessLog`: the logging of requests to the targeted Service; each
/// field given replaces MeshConfig's.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceAccessLogSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errors_only: Option<bool>,
}
