//! `Service` and `Workload`: what can be called, and the instances that serve it.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
};

use serde::{Deserialize, Serialize};

/// A named service: a label selector over workloads, and its ports.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Workloads whose labels include all of these belong to the service.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// At least one port.
    pub ports: Vec<ServicePort>,
    /// Overrides MeshConfig's `mtls` for this Service's inbound side, so that a mesh can
    /// move to STRICT one Service at a time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<super::MtlsMode>,
    /// The address captured applications reach this Service at (its name resolves to it
    /// through the proxy's DNS responder). Without it, one is derived from the name
    /// within MeshConfig's `virtualIPRange`, the same on every proxy.
    #[serde(default, rename = "virtualIP", skip_serializing_if = "Option::is_none")]
    pub virtual_ip: Option<Ipv4Addr>,
}

/// One port of a service.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    /// Names the port for multi-port workloads (`Workload.spec.ports`) and for routes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The port clients address (`reviews:80`).
    pub port: u16,
    /// What the port speaks; `tcp` skips protocol detection.
    #[serde(default)]
    pub protocol: Protocol,
    /// The port the application listens on for this Service port, when it serves
    /// several: meshed callers of this port are delivered there (on `--app-addr`'s IP).
    /// Without it, `--app-addr` itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
    /// `v2`: the application's connections on this `tcp` port begin with a PROXY
    /// protocol v2 header carrying the caller's address (HTTP ports get
    /// `X-Forwarded-For` instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyProtocol>,
}

/// The PROXY protocol versions a `tcp` port may ask for.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub enum ProxyProtocol {
    #[serde(rename = "v2")]
    V2,
}

/// The application protocol of a port.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1, or HTTP/2 when the client speaks it.
    #[default]
    Http,
    /// HTTP/2 (cleartext prior knowledge) to the endpoints.
    Http2,
    /// gRPC: HTTP/2 to the endpoints, proxy-made errors as gRPC statuses.
    Grpc,
    /// Opaque TCP: no detection, no HTTP features; for server-first protocols.
    Tcp,
}

impl Protocol {
    /// True for protocols routed per request.
    pub fn is_http(self) -> bool {
        !matches!(self, Protocol::Tcp)
    }
}

/// One instance of a service.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSpec {
    /// Matched by Service selectors.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Where this instance, or its proxy's inbound listener, listens.
    pub address: SocketAddr,
    /// Per named service port, the port on `address`'s IP that serves it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u16>,
    /// Failure domain; shown today, used by zone-aware balancing later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Relative share of traffic; 0 drains the instance.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// The SPIFFE ID its proxy proves, so callers use mutual TLS to it; set by the control
    /// plane for registered workloads. Without it the workload is reached in plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

fn default_weight() -> u32 {
    1
}

/// Destinations outside the mesh that captured applications may reach when MeshConfig's
/// `outboundTrafficPolicy` is `REGISTRY_ONLY` (Istio's ServiceEntry, reduced to what
/// egress needs): by the names they resolve, by address, or both, on the ports listed.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExternalServiceSpec {
    /// DNS names (`api.example.com`, or `*.example.com` for any name under it): the
    /// addresses the proxy's DNS responder forwards answers for are let through.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Networks (`192.0.2.0/24`, `2001:db8::/32`, or one address) let through.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<crate::cidr::Cidr>,
    /// The ports let through; at least one.
    pub ports: Vec<ExternalPort>,
}

/// One port of an ExternalService.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExternalPort {
    pub port: u16,
}
