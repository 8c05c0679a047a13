//! Compiling resources into the immutable [`Snapshot`] a proxy serves from.
//!
//! Everything a request needs is precomputed here: the host table, each port's endpoint
//! list, each port's route rules in precedence order with resolved backends, and each
//! Service's effective policy with defaults filled in. The proxy swaps whole snapshots
//! atomically; it never edits one.
//!
//! Dangling references are not errors: a backendRef to an unknown Service compiles to
//! [`BackendTarget::Unresolved`] (requests get 500) and is listed in
//! [`Snapshot::unresolved`], so a configuration can be written in any order.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use serde::Serialize;

use crate::{
    authz::Authorizer,
    matching::{NamedMatcher, PathMatcher, Pattern, RequestMatcher, ValueMatcher},
    resource::{Resource, ResourceSpec},
    spec::*,
};

/// Everything one proxy needs, compiled from resources.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    /// The namespace short host names (`reviews`) resolve in.
    pub namespace: String,
    pub services: Vec<CompiledService>,
    /// References that point at nothing, with where they come from.
    pub unresolved: Vec<String>,
    /// MeshConfig's tracing; `None` when tracing is off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracing: Option<Arc<TracingSettings>>,
    /// Where access log lines go (`stderr` or a file), when any Service's requests are
    /// logged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_log_path: Option<String>,
    /// MeshConfig's `outboundTrafficPolicy.mode`: what captured connections to unknown
    /// destinations get.
    pub outbound_traffic: OutboundTrafficMode,
    /// MeshConfig's `virtualIPRange`, which capture routes.
    #[serde(skip)]
    pub virtual_ip_range: crate::virtual_ip::VirtualIpRange,
    /// The ExternalServices: what captured connections may reach outside the mesh.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub external: Vec<CompiledExternal>,
    #[serde(skip)]
    hosts: HashMap<String, usize>,
    /// Virtual IPs (and their IPv6 twins) → Service.
    #[serde(skip)]
    virtual_ips: HashMap<IpAddr, usize>,
    /// Endpoint IPs → every (Service, port, endpoint) they serve, in Service order.
    #[serde(skip)]
    endpoint_ips: HashMap<IpAddr, Vec<(usize, usize, usize)>>,
}

/// An ExternalService, as captured connections are judged against it.
#[derive(Debug, Serialize)]
pub struct CompiledExternal {
    /// `namespace/name`, the metric label of its connections.
    pub name: String,
    /// Lowercase DNS names; `*.example.com` stands for every name under example.com.
    pub hosts: Vec<String>,
    pub addresses: Vec<crate::cidr::Cidr>,
    pub ports: Vec<u16>,
}

impl CompiledExternal {
    /// Whether `name` (lowercase, no trailing dot) is one of its hosts.
    pub fn names(&self, name: &str) -> bool {
        self.hosts.iter().any(|host| match host.strip_prefix('*') {
            Some(suffix) => name.ends_with(suffix) && name.len() > suffix.len(),
            None => host == name,
        })
    }
}

/// Where a captured connection's original destination leads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// A Service's virtual IP: the Service port, balanced over its endpoints.
    Service { service: usize, port: usize },
    /// The address of one endpoint (a call by IP): that endpoint, as its Service's.
    Endpoint { service: usize, port: usize, endpoint: usize },
}

impl Destination {
    /// The Service and port index it belongs to.
    pub fn service_port(&self) -> (usize, usize) {
        match *self {
            Destination::Service { service, port } | Destination::Endpoint { service, port, .. } => (service, port),
        }
    }
}

/// Why an original destination leads to no Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DestinationError {
    /// Neither a virtual IP nor an endpoint's address.
    Unknown,
    /// A Service's virtual IP, on a port the Service does not declare.
    UnknownPort { service: usize, port: u16 },
}

/// Whether and how requests to one Service are logged: MeshConfig's `accessLog` with the
/// Service's TrafficPolicy over it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessLogRule {
    pub enabled: bool,
    pub sampling_rate: f64,
    pub errors_only: bool,
}

/// Where spans go and how traces start, mesh-wide.
#[derive(Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TracingSettings {
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    pub sampling_rate: f64,
    /// SPIFFE IDs allowed to force a trace.
    pub force_from: Vec<String>,
}

impl TracingSettings {
    /// Whether `principal` may force a trace.
    pub fn may_force(&self, principal: &str) -> bool {
        self.force_from.iter().any(|p| p == principal)
    }
}

/// A Service with its ports, endpoints, routes and effective policy.
#[derive(Debug, Serialize)]
pub struct CompiledService {
    pub namespace: String,
    pub name: String,
    /// Where captured applications reach it (declared, or derived from the name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub virtual_ip: Option<Ipv4Addr>,
    pub ports: Vec<CompiledPort>,
    pub policy: ServicePolicy,
    /// Whether its inbound side accepts plaintext: the Service's own `mtls`, else
    /// MeshConfig's.
    pub mtls: MtlsMode,
    /// The AuthorizationPolicies judging its inbound requests, by name.
    pub authorization_policies: Vec<String>,
    /// Those policies compiled, with MeshConfig's default.
    #[serde(skip)]
    pub authorizer: Arc<Authorizer>,
}

/// One Service port.
#[derive(Debug, Serialize)]
pub struct CompiledPort {
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub protocol: Protocol,
    /// Whether the application expects a PROXY protocol v2 header on this port.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub proxy_protocol: bool,
    /// Where the application listens for this port (else `--app-addr`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
    pub endpoints: Vec<Endpoint>,
    /// `None`: no route attached, every request goes to this port's own endpoints.
    /// `Some`: the first matching rule decides; no match is a 404.
    pub routes: Option<Vec<RouteRule>>,
}

/// One address that serves a Service port.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Endpoint {
    pub workload: String,
    pub address: SocketAddr,
    pub weight: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// The SPIFFE ID the endpoint's proxy proves: callers speak mutual TLS to it and
    /// refuse any other identity. `None` for an unmeshed endpoint (plaintext).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<Arc<str>>,
}

/// One match of one route rule, in precedence order within its port.
#[derive(Debug, Serialize)]
pub struct RouteRule {
    #[serde(rename = "match")]
    pub matcher: RequestMatcher,
    /// The match's path as a route template, OpenTelemetry's `http.route`: spans are
    /// named by it. `None` for a regular expression, which is no template.
    #[serde(skip)]
    pub http_route: Option<Arc<str>>,
    pub action: Arc<RouteAction>,
}

/// What a matched rule does; shared by all the rule's matches.
#[derive(Debug, Serialize)]
pub struct RouteAction {
    /// `HTTPRoute/ns/name` (plus `#rule` when named), the `route` metric label.
    pub route: Arc<str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Filter>,
    pub backends: Vec<WeightedBackend>,
    pub timeouts: RouteTimeouts,
}

/// Timeouts set by a route rule.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct RouteTimeouts {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_request: Option<Duration>,
}

/// A backend with its weight and backend-level filters.
#[derive(Debug, Serialize)]
pub struct WeightedBackend {
    pub target: BackendTarget,
    pub weight: u32,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Filter>,
}

/// Where a backendRef points.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum BackendTarget {
    /// Indexes into [`Snapshot::services`] and that service's ports.
    Resolved { service: usize, port: usize },
    /// `ns/name:port` of a Service (or port) that does not exist.
    Unresolved(String),
}

/// A compiled request or response transformation.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type")]
pub enum Filter {
    RequestHeaderModifier(HeaderModifier),
    ResponseHeaderModifier(HeaderModifier),
    #[serde(rename = "URLRewrite")]
    UrlRewrite {
        #[serde(skip_serializing_if = "Option::is_none")]
        hostname: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        path: Option<PathRewrite>,
    },
    RequestRedirect {
        #[serde(skip_serializing_if = "Option::is_none")]
        scheme: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        hostname: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        path: Option<PathRewrite>,
        #[serde(skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
        status_code: u16,
    },
}

/// A path rewrite; `ReplacePrefixMatch` carries the prefix it replaces.
#[derive(Clone, Debug, Serialize)]
pub enum PathRewrite {
    ReplaceFullPath(String),
    ReplacePrefixMatch { matched_prefix: String, replacement: String },
}

impl PathRewrite {
    /// Applies the rewrite to `path` (without query).
    pub fn apply(&self, path: &str) -> String {
        match self {
            PathRewrite::ReplaceFullPath(full) => full.clone(),
            PathRewrite::ReplacePrefixMatch { matched_prefix, replacement } => {
                let prefix = matched_prefix.trim_end_matches('/');
                let rest = path.get(prefix.len()..).unwrap_or("");
                let replacement = replacement.trim_end_matches('/');
                match (replacement.is_empty(), rest.is_empty()) {
                    (true, true) => "/".to_string(),
                    (true, false) => rest.to_string(),
                    _ => format!("{replacement}{rest}"),
                }
            }
        }
    }
}

/// A Service's effective TrafficPolicy, defaults filled in.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePolicy {
    /// The TrafficPolicy this came from, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    pub load_balancer: LoadBalancerAlgorithm,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetrySpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<Duration>,
    pub outlier_detection: OutlierDetectionSpec,
    pub connection_limits: ConnectionLimitsSpec,
    /// The share of requests to this Service that start a trace, in place of
    /// MeshConfig's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_sampling: Option<f64>,
    /// Access logging of requests to this Service.
    pub access_log: AccessLogRule,
    /// The TrafficPolicy's own `accessLog`, merged over MeshConfig's into `access_log`.
    #[serde(skip)]
    pub access_log_override: Option<ServiceAccessLogSpec>,
}

impl Default for ServicePolicy {
    fn default() -> Self {
        ServicePolicy {
            source: None,
            load_balancer: LoadBalancerAlgorithm::P2cEwma,
            // One retry of a request that never reached the endpoint is always safe.
            retries: Some(RetrySpec {
                attempts: 1,
                per_try_timeout: None,
                retry_on: vec![RetryOn::ConnectFailure],
                budget: RetryBudgetSpec::default(),
                backoff: BackoffSpec::default(),
                retry_non_idempotent: false,
            }),
            request_timeout: None,
            outlier_detection: OutlierDetectionSpec::default(),
            connection_limits: ConnectionLimitsSpec::default(),
            trace_sampling: None,
            access_log: AccessLogRule::default(),
            access_log_override: None,
        }
    }
}

/// Why a host did not resolve to a Service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostLookupError {
    UnknownHost,
    UnknownPort(u16),
    NotHttp(u16),
}

impl Snapshot {
    /// A snapshot with nothing in it, for a proxy that has no configuration yet.
    pub fn empty(namespace: &str) -> Self {
        Snapshot {
            namespace: namespace.to_string(),
            services: vec![],
            unresolved: vec![],
            tracing: None,
            access_log_path: None,
            outbound_traffic: OutboundTrafficMode::default(),
            virtual_ip_range: Default::default(),
            external: vec![],
            hosts: HashMap::new(),
            virtual_ips: HashMap::new(),
            endpoint_ips: HashMap::new(),
        }
    }

    /// The Service a DNS name or Host (without port) names: `reviews` in this snapshot's
    /// namespace, `reviews.NS`, `reviews.NS.svc`, `reviews.NS.svc.cluster.local`.
    pub fn service_by_host(&self, host: &str) -> Option<usize> {
        let host = host.strip_suffix('.').unwrap_or(host);
        match host.bytes().any(|b| b.is_ascii_uppercase()) {
            true => self.hosts.get(&host.to_ascii_lowercase()).copied(),
            false => self.hosts.get(host).copied(),
        }
    }

    /// The ExternalService whose addresses and ports hold `original`.
    pub fn external_at(&self, original: SocketAddr) -> Option<usize> {
        self.external.iter().position(|external| {
            external.ports.contains(&original.port()) && external.addresses.iter().any(|c| c.contains(original.ip()))
        })
    }

    /// The ExternalService one of whose hosts is the DNS name `name`.
    pub fn external_named(&self, name: &str) -> Option<usize> {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        self.external.iter().position(|external| external.names(&name))
    }

    /// Where a captured connection to `original` goes: a Service's virtual IP (IPv4 or
    /// its IPv6 twin) on one of its ports, or an endpoint's IP. For an endpoint's IP the
    /// port is the Service port of that number, else the one its endpoint listens on
    /// with that number; any other port is unknown.
    pub fn lookup_destination(&self, original: SocketAddr) -> Result<Destination, DestinationError> {
        let port_number = original.port();
        if let Some(&service) = self.virtual_ips.get(&original.ip()) {
            let ports = &self.services[service].ports;
            return match ports.iter().position(|p| p.port == port_number) {
                Some(port) => Ok(Destination::Service { service, port }),
                None => Err(DestinationError::UnknownPort { service, port: port_number }),
            };
        }
        let serving = self.endpoint_ips.get(&original.ip()).ok_or(DestinationError::Unknown)?;
        let by_service_port =
            |&&(service, port, _): &&(usize, usize, usize)| self.services[service].ports[port].port == port_number;
        let by_endpoint_port = |&&(service, port, endpoint): &&(usize, usize, usize)| {
            self.services[service].ports[port].endpoints[endpoint].address.port() == port_number
        };
        // Any other port of that address is not the mesh's to guess: the application
        // may serve more than its Services declare.
        let &(service, port, endpoint) = serving
            .iter()
            .find(by_service_port)
            .or_else(|| serving.iter().find(by_endpoint_port))
            .ok_or(DestinationError::Unknown)?;
        Ok(Destination::Endpoint { service, port, endpoint })
    }

    /// Resolves a `Host` header or URI authority (`reviews`, `reviews.default:80`,
    /// `reviews.default.svc.cluster.local`) to an HTTP port of a Service.
    pub fn lookup_host(&self, authority: &str) -> Result<(usize, usize), HostLookupError> {
        let (host, port) = split_host_port(authority);
        let service = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            self.hosts.get(&host.to_ascii_lowercase())
        } else {
            self.hosts.get(host)
        };
        let &service = service.ok_or(HostLookupError::UnknownHost)?;
        let ports = &self.services[service].ports;
        let index = match port {
            Some(port) => ports.iter().position(|p| p.port == port).ok_or(HostLookupError::UnknownPort(port))?,
            // Without a port: 80 if declared, else the first HTTP port.
            None => ports
                .iter()
                .position(|p| p.port == 80)
                .or_else(|| ports.iter().position(|p| p.protocol.is_http()))
                .ok_or(HostLookupError::NotHttp(ports[0].port))?,
        };
        if !ports[index].protocol.is_http() {
            return Err(HostLookupError::NotHttp(ports[index].port));
        }
        Ok((service, index))
    }

    /// Finds a Service by namespace and name.
    pub fn service(&self, namespace: &str, name: &str) -> Option<usize> {
        self.services.iter().position(|s| s.namespace == namespace && s.name == name)
    }
}

fn split_host_port(authority: &str) -> (&str, Option<u16>) {
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => match port.parse() {
            Ok(port) => (host, Some(port)),
            Err(_) => (authority, None),
        },
        _ => (authority, None),
    }
}

/// Whether a Service selects a workload, and if not, why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selection {
    Selected,
    /// Another namespace, labels that lack the selector's, or an empty selector.
    NotMatching,
    /// The labels match, but the workload is meshed and its identity may not serve the
    /// Service.
    IdentityMayNotServe,
}

/// Whether the Service in `service_namespace` with `selector` selects a workload of
/// `workload_namespace` with `labels` and `identity`.
///
/// Labels alone decide for an unmeshed workload, as in Kubernetes. A meshed one (a weft
/// identity `spiffe://TD/ns/NS/sa/ACCOUNT`) is selected only by Services of its own
/// namespace whose selector says `app: ACCOUNT`: a proxy registers with labels it chooses
/// itself (`--labels`), and without that pin a proxy of `web` could claim `tier: backend`
/// and take the traffic of a Service selecting `{tier: backend}`. Registered workloads
/// always carry `app: SERVICE`, and their identity's account is that service's name.
pub fn selects(
    service_namespace: &str,
    selector: &BTreeMap<String, String>,
    workload_namespace: &str,
    labels: &BTreeMap<String, String>,
    identity: Option<&str>,
) -> Selection {
    let matches = !selector.is_empty()
        && service_namespace == workload_namespace
        && selector.iter().all(|(k, v)| labels.get(k) == Some(v));
    if !matches {
        return Selection::NotMatching;
    }
    let identity = identity.and_then(|id| crate::spiffe::SpiffeId::parse(id).ok());
    let may_serve = match identity.as_ref().and_then(|id| id.workload_parts()) {
        // An identity of another shape (another SPIFFE issuer's, declared by the operator)
        // names no account to pin.
        None => true,
        Some((namespace, account)) => {
            namespace == service_namespace && selector.get("app").is_some_and(|app| app == account)
        }
    };
    if may_serve {
        Selection::Selected
    } else {
        Selection::IdentityMayNotServe
    }
}

/// Compiles `resources` into the view of a proxy in `namespace`.
pub fn compile(resources: &[Resource], namespace: &str) -> Snapshot {
    let mut unresolved = Vec::new();
    let mut services: Vec<CompiledService> = Vec::new();
    let mut workloads = Vec::new();
    let mut policies: BTreeMap<(String, String), Vec<(&str, &TrafficPolicySpec)>> = BTreeMap::new();
    let mut authorization: BTreeMap<(String, String), Vec<(&str, &AuthorizationPolicySpec)>> = BTreeMap::new();
    let mut mesh = MeshConfigSpec::default();
    let mut own_mtls: Vec<Option<MtlsMode>> = Vec::new();
    let mut routes: Vec<(&Resource, RouteSource)> = Vec::new();
    let mut external: Vec<CompiledExternal> = Vec::new();

    for resource in resources {
        let meta = &resource.metadata;
        match &resource.spec {
            ResourceSpec::Service(spec) => {
                own_mtls.push(spec.mtls);
                services.push(CompiledService {
                    namespace: meta.namespace.clone(),
                    name: meta.name.clone(),
                    // Settled below: declared, or derived once every Service is known.
                    virtual_ip: spec.virtual_ip,
                    ports: spec
                        .ports
                        .iter()
                        .map(|p| CompiledPort {
                            port: p.port,
                            proxy_protocol: p.proxy_protocol.is_some(),
                            target_port: p.target_port,
                            name: p.name.clone(),
                            protocol: p.protocol,
                            endpoints: vec![],
                            routes: None,
                        })
                        .collect(),
                    policy: ServicePolicy::default(),
                    // Settled below, once MeshConfig is known.
                    mtls: spec.mtls.unwrap_or(MtlsMode::Permissive),
                    authorization_policies: Vec::new(),
                    authorizer: Arc::default(),
                })
            }
            ResourceSpec::Workload(spec) => workloads.push((meta, spec)),
            ResourceSpec::HttpRoute(spec) => routes.push((resource, RouteSource::Http(spec))),
            ResourceSpec::GrpcRoute(spec) => routes.push((resource, RouteSource::Grpc(spec))),
            ResourceSpec::TrafficPolicy(spec) => {
                let ns = spec.target_ref.namespace.clone().unwrap_or_else(|| meta.namespace.clone());
                policies.entry((ns, spec.target_ref.name.clone())).or_default().push((&meta.name, spec));
            }
            ResourceSpec::AuthorizationPolicy(spec) => {
                let ns = spec.target_ref.namespace.clone().unwrap_or_else(|| meta.namespace.clone());
                authorization.entry((ns, spec.target_ref.name.clone())).or_default().push((&meta.name, spec));
            }
            ResourceSpec::MeshConfig(spec) => mesh = spec.clone(),
            ResourceSpec::ExternalService(spec) => external.push(CompiledExternal {
                name: format!("{}/{}", meta.namespace, meta.name),
                hosts: spec.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
                addresses: spec.addresses.clone(),
                ports: spec.ports.iter().map(|p| p.port).collect(),
            }),
        }
    }
    services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

    // Endpoints: workloads in the Service's namespace whose labels include the selector
    // (and, when meshed, whose identity may serve the Service: see `selects`).
    let selectors: HashMap<(&str, &str), &BTreeMap<String, String>> = resources
        .iter()
        .filter_map(|r| match &r.spec {
            ResourceSpec::Service(s) => Some(((r.metadata.namespace.as_str(), r.metadata.name.as_str()), &s.selector)),
            _ => None,
        })
        .collect();
    for service in &mut services {
        let selector = selectors[&(service.namespace.as_str(), service.name.as_str())];
        if selector.is_empty() {
            continue; // as in Kubernetes: no selector, no endpoints
        }
        for (meta, workload) in &workloads {
            let selection =
                selects(&service.namespace, selector, &meta.namespace, &workload.labels, workload.identity.as_deref());
            if selection == Selection::IdentityMayNotServe {
                unresolved.push(format!(
                    "Workload {}/{}: matches the selector of Service {}/{}, but its identity {} may serve only \
                     Services whose selector names its service account as app; not selected",
                    meta.namespace,
                    meta.name,
                    service.namespace,
                    service.name,
                    workload.identity.as_deref().unwrap_or_default()
                ));
            }
            if selection != Selection::Selected || workload.weight == 0 {
                continue;
            }
            for port in &mut service.ports {
                let target_port = port
                    .name
                    .as_ref()
                    .and_then(|name| workload.ports.get(name))
                    .copied()
                    .unwrap_or(workload.address.port());
                port.endpoints.push(Endpoint {
                    workload: meta.name.clone(),
                    address: SocketAddr::new(workload.address.ip(), target_port),
                    weight: workload.weight,
                    zone: workload.zone.clone(),
                    identity: workload.identity.as_deref().map(Arc::from),
                });
            }
        }
    }

    // Policies: one per Service; several is a conflict settled by name order, reported.
    for ((ns, name), mut list) in policies {
        list.sort_by_key(|(policy_name, _)| *policy_name);
        let Some(index) = services.iter().position(|s| s.namespace == ns && s.name == name) else {
            for (policy_name, _) in &list {
                unresolved.push(format!(
                    "TrafficPolicy {ns}/{policy_name}: targets Service {ns}/{name}, which does not exist"
                ));
            }
            continue;
        };
        for (policy_name, _) in list.iter().skip(1) {
            unresolved.push(format!(
                "TrafficPolicy {ns}/{policy_name}: ignored, Service {ns}/{name} already has TrafficPolicy {ns}/{}",
                list[0].0
            ));
        }
        services[index].policy = effective_policy(list[0].0, &ns, list[0].1);
    }

    // Routes, flattened per parent port and sorted by precedence.
    // Per (service, port): each rule with its route key and rule index, for tie-breaks.
    let mut tables: HashMap<(usize, usize), Vec<RankedRule>> = HashMap::new();
    for (resource, source) in &routes {
        let route_ns = &resource.metadata.namespace;
        let route_key = format!("{}/{route_ns}/{}", resource.kind().as_str(), resource.metadata.name);
        let compiled = compile_route_rules(source, &route_key, route_ns, &services, &mut unresolved);
        for parent in source.parent_refs() {
            let parent_ns = parent.namespace.as_deref().unwrap_or(route_ns);
            let Some(service) = services.iter().position(|s| s.namespace == parent_ns && s.name == parent.name) else {
                unresolved.push(format!("{route_key}: parent Service {parent_ns}/{} does not exist", parent.name));
                continue;
            };
            let ports: Vec<usize> = match parent.port {
                Some(port) => match services[service].ports.iter().position(|p| p.port == port) {
                    Some(i) => vec![i],
                    None => {
                        unresolved.push(format!(
                            "{route_key}: parent Service {parent_ns}/{} has no port {port}",
                            parent.name
                        ));
                        continue;
                    }
                },
                None => (0..services[service].ports.len())
                    .filter(|&i| services[service].ports[i].protocol.is_http())
                    .collect(),
            };
            for port in ports {
                let table = tables.entry((service, port)).or_default();
                for (rule_index, (matchers, action)) in compiled.iter().enumerate() {
                    for matcher in matchers {
                        table.push((
                            RouteRule {
                                http_route: http_route(&matcher.path),
                                matcher: matcher.clone(),
                                action: action.clone(),
                            },
                            route_key.clone(),
                            rule_index,
                        ));
                    }
                }
            }
        }
    }
    for ((service, port), mut table) in tables {
        // Stable sort: equal precedence keeps route-name then rule order.
        table.sort_by(|a, b| a.1.cmp(&b.1).then(a.2.cmp(&b.2)));
        table.sort_by_key(|(rule, _, _)| rule.matcher.precedence());
        services[service].ports[port].routes = Some(table.into_iter().map(|(rule, _, _)| rule).collect());
    }

    // Inbound security: the mode, and who may call.
    for (service, own) in services.iter_mut().zip(own_mtls) {
        service.mtls = own.unwrap_or(mesh.mtls);
    }
    let default_authorizer = Arc::new(Authorizer::new(&[], mesh.default_policy).expect("no policies compile"));
    for service in &mut services {
        service.authorizer = default_authorizer.clone();
    }
    for ((ns, name), mut list) in authorization {
        list.sort_by_key(|(policy_name, _)| *policy_name);
        let Some(service) = services.iter_mut().find(|s| s.namespace == ns && s.name == name) else {
            for (policy_name, _) in &list {
                unresolved.push(format!(
                    "AuthorizationPolicy {ns}/{policy_name}: targets Service {ns}/{name}, which does not exist"
                ));
            }
            continue;
        };
        service.authorization_policies = list.iter().map(|(policy_name, _)| format!("{ns}/{policy_name}")).collect();
        let named: Vec<(&str, &AuthorizationPolicySpec)> =
            list.iter().zip(&service.authorization_policies).map(|((_, spec), name)| (name.as_str(), *spec)).collect();
        service.authorizer = Arc::new(Authorizer::new(&named, mesh.default_policy).unwrap_or_else(|error| {
            // Validation refuses malformed patterns, so this is a document from another
            // release: deny everything rather than let a policy we cannot read allow.
            unresolved.push(format!("{error}: every request to {ns}/{name} is denied"));
            Authorizer::deny_all(error)
        }));
    }

    let mut hosts = HashMap::new();
    for (index, service) in services.iter().enumerate() {
        let (name, ns) = (&service.name, &service.namespace);
        if ns == namespace {
            hosts.insert(name.clone(), index);
        }
        for host in [format!("{name}.{ns}"), format!("{name}.{ns}.svc"), format!("{name}.{ns}.svc.cluster.local")] {
            hosts.insert(host, index);
        }
    }
    let range = mesh.virtual_ip_range.as_deref().and_then(|r| r.parse().ok()).unwrap_or_default();
    let declared = services.iter().map(|s| ((s.namespace.clone(), s.name.clone()), s.virtual_ip)).collect();
    let (mut assigned, problems) = crate::virtual_ip::assign(&declared, &BTreeMap::new(), range);
    unresolved.extend(problems);
    let mut virtual_ips = HashMap::new();
    let mut endpoint_ips: HashMap<IpAddr, Vec<(usize, usize, usize)>> = HashMap::new();
    for (index, service) in services.iter_mut().enumerate() {
        service.virtual_ip = assigned.remove(&(service.namespace.clone(), service.name.clone()));
        if let Some(address) = service.virtual_ip {
            virtual_ips.insert(IpAddr::V4(address), index);
            virtual_ips.insert(IpAddr::V6(crate::virtual_ip::ipv6_twin(address)), index);
        }
        for (port_index, port) in service.ports.iter().enumerate() {
            for (endpoint_index, endpoint) in port.endpoints.iter().enumerate() {
                endpoint_ips.entry(endpoint.address.ip()).or_default().push((index, port_index, endpoint_index));
            }
        }
    }
    let tracing = mesh.tracing.as_ref().map(|t| {
        Arc::new(TracingSettings {
            endpoint: t.endpoint.clone(),
            protocol: t.protocol,
            sampling_rate: t.sampling_rate,
            force_from: t.force_from.clone(),
        })
    });
    if tracing.is_none() {
        for service in services.iter().filter(|s| s.policy.trace_sampling.is_some()) {
            unresolved.push(format!(
                "{}: sets tracing.samplingRate for Service {}/{}, but MeshConfig has no tracing endpoint; no trace \
                 is started until one is set",
                service.policy.source.as_deref().map_or_else(String::new, |s| format!("TrafficPolicy {s}")),
                service.namespace,
                service.name
            ));
        }
    }
    let mesh_log = mesh.access_log.as_ref().map_or(AccessLogRule::default(), |log| AccessLogRule {
        enabled: log.enabled,
        sampling_rate: log.sampling_rate,
        errors_only: log.errors_only,
    });
    for service in &mut services {
        let own = service.policy.access_log_override.clone().unwrap_or_default();
        service.policy.access_log = AccessLogRule {
            enabled: own.enabled.unwrap_or(mesh_log.enabled),
            // A Service that turns logging on where the mesh has none logs everything.
            sampling_rate: own.sampling_rate.unwrap_or(if mesh.access_log.is_some() {
                mesh_log.sampling_rate
            } else {
                1.0
            }),
            errors_only: own.errors_only.unwrap_or(mesh_log.errors_only),
        };
    }
    let access_log_path = match &mesh.access_log {
        Some(log) => Some(log.path.clone()),
        None => services.iter().any(|s| s.policy.access_log.enabled).then(|| "stderr".to_string()),
    };
    unresolved.sort();
    Snapshot {
        namespace: namespace.to_string(),
        services,
        unresolved,
        tracing,
        access_log_path,
        outbound_traffic: mesh.outbound_traffic_policy.map(|p| p.mode).unwrap_or_default(),
        virtual_ip_range: range,
        external,
        hosts,
        virtual_ips,
        endpoint_ips,
    }
}

/// A compiled rule with the route key and rule index that break precedence ties.
type RankedRule = (RouteRule, String, usize);

enum RouteSource<'a> {
    Http(&'a HttpRouteSpec),
    Grpc(&'a GrpcRouteSpec),
}

impl RouteSource<'_> {
    fn parent_refs(&self) -> &[ParentRef] {
        match self {
            RouteSource::Http(spec) => &spec.parent_refs,
            RouteSource::Grpc(spec) => &spec.parent_refs,
        }
    }
}

type CompiledRule = (Vec<RequestMatcher>, Arc<RouteAction>);

fn compile_route_rules(
    source: &RouteSource<'_>,
    route_key: &str,
    route_ns: &str,
    services: &[CompiledService],
    unresolved: &mut Vec<String>,
) -> Vec<CompiledRule> {
    let mut out = Vec::new();
    let mut backends = |refs: &[BackendRef], rule_label: &str| -> Vec<WeightedBackend> {
        refs.iter()
            .map(|b| {
                let ns = b.namespace.as_deref().unwrap_or(route_ns);
                let port = b.port.unwrap_or(0);
                let target = services
                    .iter()
                    .position(|s| s.namespace == ns && s.name == b.name)
                    .and_then(|service| {
                        services[service]
                            .ports
                            .iter()
                            .position(|p| p.port == port)
                            .map(|port| BackendTarget::Resolved { service, port })
                    })
                    .unwrap_or_else(|| {
                        let what = format!("{ns}/{}:{port}", b.name);
                        unresolved.push(format!("{rule_label}: backendRef Service {what} does not exist"));
                        BackendTarget::Unresolved(what)
                    });
                WeightedBackend {
                    target,
                    weight: b.weight,
                    filters: b.filters.iter().map(compile_filter_unscoped).collect(),
                }
            })
            .collect()
    };
    match source {
        RouteSource::Http(spec) => {
            for (index, rule) in spec.rules.iter().enumerate() {
                let label = rule_label(route_key, rule.name.as_deref(), index);
                let matchers: Vec<RequestMatcher> = if rule.matches.is_empty() {
                    vec![RequestMatcher::any()]
                } else {
                    rule.matches.iter().map(http_matcher).collect()
                };
                let matched_prefix = rule
                    .matches
                    .first()
                    .and_then(|m| m.path.as_ref())
                    .map(|p| p.value.clone())
                    .unwrap_or_else(|| "/".to_string());
                let timeouts = rule.timeouts.as_ref().map_or(RouteTimeouts::default(), |t| RouteTimeouts {
                    request: t.request.map(|d| d.0).filter(|d| !d.is_zero()),
                    backend_request: t.backend_request.map(|d| d.0).filter(|d| !d.is_zero()),
                });
                let action = RouteAction {
                    route: label.as_str().into(),
                    filters: rule.filters.iter().map(|f| compile_filter(f, &matched_prefix)).collect(),
                    backends: backends(&rule.backend_refs, &label),
                    timeouts,
                };
                out.push((matchers, Arc::new(action)));
            }
        }
        RouteSource::Grpc(spec) => {
            for (index, rule) in spec.rules.iter().enumerate() {
                let label = rule_label(route_key, rule.name.as_deref(), index);
                let matchers: Vec<RequestMatcher> = if rule.matches.is_empty() {
                    vec![RequestMatcher::any()]
                } else {
                    rule.matches.iter().map(grpc_matcher).collect()
                };
                let action = RouteAction {
                    route: label.as_str().into(),
                    filters: rule.filters.iter().map(compile_filter_unscoped).collect(),
                    backends: backends(&rule.backend_refs, &label),
                    timeouts: RouteTimeouts::default(),
                };
                out.push((matchers, Arc::new(action)));
            }
        }
    }
    out
}

fn rule_label(route_key: &str, name: Option<&str>, index: usize) -> String {
    match name {
        Some(name) => format!("{route_key}#{name}"),
        None if index == 0 => route_key.to_string(),
        None => format!("{route_key}#{index}"),
    }
}

fn named(matches: &[ValueMatch]) -> Vec<NamedMatcher> {
    matches
        .iter()
        .map(|m| NamedMatcher {
            name: m.name.clone(),
            value: match m.kind {
                ValueMatchType::Exact => ValueMatcher::Exact(m.value.clone()),
                ValueMatchType::RegularExpression => {
                    ValueMatcher::RegularExpression(Pattern::full(&m.value).expect("validated"))
                }
            },
        })
        .collect()
}

fn http_matcher(m: &HttpRouteMatch) -> RequestMatcher {
    let path = match &m.path {
        None => PathMatcher::PathPrefix("/".into()),
        Some(p) => match p.kind {
            PathMatchType::Exact => PathMatcher::Exact(p.value.clone()),
            PathMatchType::PathPrefix => PathMatcher::PathPrefix(p.value.clone()),
            PathMatchType::RegularExpression => {
                PathMatcher::RegularExpression(Pattern::full(&p.value).expect("validated"))
            }
        },
    };
    RequestMatcher {
        path,
        method: m.method.as_ref().map(|m| m.parse().expect("validated")),
        headers: named(&m.headers),
        query_params: named(&m.query_params),
    }
}

/// gRPC methods are HTTP/2 paths `/<service>/<method>`.
fn grpc_matcher(m: &GrpcRouteMatch) -> RequestMatcher {
    let path = match &m.method {
        None => PathMatcher::PathPrefix("/".into()),
        Some(method) => match (method.kind, &method.service, &method.method) {
            (ValueMatchType::Exact, Some(s), Some(m)) => PathMatcher::Exact(format!("/{s}/{m}")),
            (ValueMatchType::Exact, Some(s), None) => PathMatcher::PathPrefix(format!("/{s}")),
            (ValueMatchType::Exact, None, Some(m)) => {
                PathMatcher::RegularExpression(Pattern::full(&format!("/[^/]+/{}", regex::escape(m))).expect("escaped"))
            }
            (ValueMatchType::RegularExpression, s, m) => {
                let s = s.as_deref().unwrap_or("[^/]+");
                let m = m.as_deref().unwrap_or("[^/]+");
                PathMatcher::RegularExpression(Pattern::full(&format!("/(?:{s})/(?:{m})")).expect("validated parts"))
            }
            (ValueMatchType::Exact, None, None) => PathMatcher::PathPrefix("/".into()),
        },
    };
    RequestMatcher { path, method: None, headers: named(&m.headers), query_params: vec![] }
}

fn compile_filter_unscoped(filter: &HttpRouteFilter) -> Filter {
    compile_filter(filter, "/")
}

fn compile_filter(filter: &HttpRouteFilter, matched_prefix: &str) -> Filter {
    let rewrite = |m: &PathModifier| match m.kind {
        PathModifierType::ReplaceFullPath => {
            PathRewrite::ReplaceFullPath(m.replace_full_path.clone().unwrap_or_default())
        }
        PathModifierType::ReplacePrefixMatch => PathRewrite::ReplacePrefixMatch {
            matched_prefix: matched_prefix.to_string(),
            replacement: m.replace_prefix_match.clone().unwrap_or_default(),
        },
    };
    if let Some(m) = &filter.request_header_modifier {
        Filter::RequestHeaderModifier(m.clone())
    } else if let Some(m) = &filter.response_header_modifier {
        Filter::ResponseHeaderModifier(m.clone())
    } else if let Some(u) = &filter.url_rewrite {
        Filter::UrlRewrite { hostname: u.hostname.clone(), path: u.path.as_ref().map(rewrite) }
    } else if let Some(r) = &filter.request_redirect {
        Filter::RequestRedirect {
            scheme: r.scheme.clone(),
            hostname: r.hostname.clone(),
            path: r.path.as_ref().map(rewrite),
            port: r.port,
            status_code: r.status_code.unwrap_or(302),
        }
    } else {
        unreachable!("validation admits only implemented filters")
    }
}

fn effective_policy(name: &str, namespace: &str, spec: &TrafficPolicySpec) -> ServicePolicy {
    let defaults = ServicePolicy::default();
    ServicePolicy {
        source: Some(format!("{namespace}/{name}")),
        load_balancer: spec.load_balancer.as_ref().map_or(defaults.load_balancer, |lb| lb.algorithm),
        retries: match &spec.retries {
            Some(r) if r.attempts == 0 => None,
            Some(r) => Some(r.clone()),
            None => defaults.retries,
        },
        request_timeout: spec.timeouts.as_ref().and_then(|t| t.request).map(|d| d.0).filter(|d| !d.is_zero()),
        outlier_detection: spec.outlier_detection.clone().unwrap_or_default(),
        connection_limits: spec.connection_limits.clone().unwrap_or_default(),
        trace_sampling: spec.tracing.as_ref().map(|t| t.sampling_rate),
        access_log: AccessLogRule::default(),
        access_log_override: spec.access_log.clone(),
    }
}

/// OpenTelemetry's `http.route` for a path match: its path, when it is one.
fn http_route(path: &PathMatcher) -> Option<Arc<str>> {
    match path {
        PathMatcher::Exact(path) | PathMatcher::PathPrefix(path) => Some(path.as_str().into()),
        PathMatcher::RegularExpression(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_documents;

    const MESH: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: reviews}
spec: {selector: {app: reviews}, ports: [{port: 80}]}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: reviews-v2}
spec: {selector: {app: reviews, version: v2}, ports: [{port: 80}]}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: r1}
spec: {labels: {app: reviews, version: v1}, address: "127.0.0.1:9081"}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: r2}
spec: {labels: {app: reviews, version: v2}, address: "127.0.0.1:9082", zone: a, weight: 3}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: canary}
spec:
  parentRefs: [{kind: Service, name: reviews, port: 80}]
  rules:
  - matches: [{headers: [{name: x-canary, value: "true"}]}]
    backendRefs: [{name: reviews-v2, port: 80}]
  - backendRefs: [{name: reviews-v1, port: 80, weight: 90}, {name: reviews-v2, port: 80, weight: 10}]
"#;

    fn snapshot() -> Snapshot {
        compile(&parse_documents("mesh.yaml", MESH).unwrap(), "default")
    }

    #[test]
    fn a_meshed_workload_serves_only_services_that_pin_its_account() {
        let labels = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let web_backend = labels(&[("app", "web"), ("tier", "backend")]);
        let web = Some("spiffe://weft.local/ns/default/sa/web");
        let tier = labels(&[("tier", "backend")]);
        let pinned = labels(&[("app", "web")]);
        assert_eq!(selects("default", &tier, "default", &web_backend, None), Selection::Selected, "unmeshed: labels");
        assert_eq!(selects("default", &tier, "default", &web_backend, web), Selection::IdentityMayNotServe);
        assert_eq!(selects("default", &pinned, "default", &web_backend, web), Selection::Selected);
        assert_eq!(selects("shop", &pinned, "shop", &web_backend, web), Selection::IdentityMayNotServe, "other ns");
        assert_eq!(selects("default", &pinned, "shop", &web_backend, None), Selection::NotMatching);
        let foreign = Some("spiffe://other.org/payments/api");
        assert_eq!(selects("default", &tier, "default", &web_backend, foreign), Selection::Selected);
        assert_eq!(selects("default", &BTreeMap::new(), "default", &web_backend, None), Selection::NotMatching);
    }

    #[test]
    fn selectors_pick_endpoints_with_weight_and_zone() {
        let snap = snapshot();
        let reviews = &snap.services[snap.service("default", "reviews").unwrap()];
        assert_eq!(reviews.ports[0].endpoints.len(), 2);
        let v2 = &snap.services[snap.service("default", "reviews-v2").unwrap()];
        assert_eq!(
            v2.ports[0].endpoints,
            vec![Endpoint {
                workload: "r2".into(),
                address: "127.0.0.1:9082".parse().unwrap(),
                weight: 3,
                zone: Some("a".into()),
                identity: None,
            }]
        );
    }

    #[test]
    fn external_services_are_checked_and_matched_by_address_and_host() {
        let doc = |spec: &str| {
            format!("apiVersion: weft.dev/v1alpha1\nkind: ExternalService\nmetadata: {{name: api}}\nspec: {spec}\n")
        };
        for (spec, says) in [
            ("{ports: [{port: 443}]}", "lists hosts"),
            ("{hosts: [api.example.com], ports: []}", "list the ports"),
            ("{hosts: ['api.*.com'], ports: [{port: 443}]}", "wildcard under one"),
            ("{addresses: [300.0.0.0/8], ports: [{port: 443}]}", "is not a CIDR"),
        ] {
            let error = parse_documents("f", &doc(spec)).unwrap_err().to_string();
            assert!(error.contains(says), "{spec}: {error}");
        }
        let snap = compile(
            &parse_documents(
                "f",
                &doc("{hosts: ['*.example.com', api.other.org], addresses: [192.0.2.0/24], ports: [{port: 443}]}"),
            )
            .unwrap(),
            "default",
        );
        assert_eq!(snap.external_at("192.0.2.7:443".parse().unwrap()), Some(0));
        assert_eq!(snap.external_at("192.0.2.7:80".parse().unwrap()), None);
        assert_eq!(snap.external_named("www.Example.com."), Some(0));
        assert_eq!(snap.external_named("example.com"), None, "a wildcard is for names under it");
        assert_eq!(snap.external_named("api.other.org"), Some(0));
    }

    #[test]
    fn the_proxy_protocol_is_for_tcp_ports_with_their_own_target_port() {
        let doc = |ports: &str| {
            format!("apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {{name: db}}\nspec: {{ports: {ports}}}\n")
        };
        let error = parse_documents("f", &doc("[{port: 80, proxyProtocol: v2}]")).unwrap_err().to_string();
        assert!(error.contains("ports[0].proxyProtocol") && error.contains("X-Forwarded-For"), "{error}");
        assert!(parse_documents("f", &doc("[{port: 5432, protocol: tcp, proxyProtocol: v1}]")).is_err());
        assert!(parse_documents("f", &doc("[{port: 5432, targetPort: 0}]")).is_err());
        let snap = compile(
            &parse_documents("f", &doc("[{port: 5432, protocol: tcp, targetPort: 6432, proxyProtocol: v2}]")).unwrap(),
            "default",
        );
        let port = &snap.services[0].ports[0];
        assert!(port.proxy_protocol);
        assert_eq!(port.target_port, Some(6432));
    }

    #[test]
    fn captured_destinations_lead_to_services_and_endpoints() {
        let docs = format!(
            "{MESH}---\napiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {{name: db}}\n\
             spec: {{selector: {{app: db}}, virtualIP: 10.96.0.5, ports: [{{port: 5432, protocol: tcp}}]}}\n---\n\
             apiVersion: weft.dev/v1alpha1\nkind: Workload\nmetadata: {{name: db1}}\n\
             spec: {{labels: {{app: db}}, address: \"10.0.0.9:15006\"}}\n"
        );
        let snap = compile(&parse_documents("f", &docs).unwrap(), "default");
        let (reviews, db) = (snap.service("default", "reviews").unwrap(), snap.service("default", "db").unwrap());
        // The declared address, and a derived one for the others, with IPv6 twins.
        assert_eq!(snap.services[db].virtual_ip, Some(Ipv4Addr::new(10, 96, 0, 5)));
        let vip = snap.services[reviews].virtual_ip.expect("derived");
        assert!(crate::virtual_ip::VirtualIpRange::default().contains(vip));
        let at = |ip: IpAddr, port| snap.lookup_destination(SocketAddr::new(ip, port));
        assert_eq!(at(vip.into(), 80), Ok(Destination::Service { service: reviews, port: 0 }));
        let twin = crate::virtual_ip::ipv6_twin(vip);
        assert_eq!(at(twin.into(), 80), Ok(Destination::Service { service: reviews, port: 0 }));
        assert_eq!(at(vip.into(), 81), Err(DestinationError::UnknownPort { service: reviews, port: 81 }));
        // A call by IP: the Service port of that number, or the endpoint's own port.
        let by_ip = at("10.0.0.9".parse().unwrap(), 5432).unwrap();
        assert!(matches!(by_ip, Destination::Endpoint { service, port: 0, .. } if service == db), "{by_ip:?}");
        assert!(matches!(at("10.0.0.9".parse().unwrap(), 15006), Ok(Destination::Endpoint { .. })));
        assert_eq!(at("10.0.0.9".parse().unwrap(), 3306), Err(DestinationError::Unknown));
        assert_eq!(at("192.0.2.1".parse().unwrap(), 80), Err(DestinationError::Unknown));
        // DNS names, with or without the root's dot.
        assert_eq!(snap.service_by_host("db.default.svc.cluster.local."), Some(db));
        assert_eq!(snap.service_by_host("Reviews"), Some(reviews));
        assert_eq!(snap.service_by_host("nothing.default.svc.cluster.local"), None);
    }

    #[test]
    fn host_forms_resolve_and_unknown_hosts_do_not() {
        let snap = snapshot();
        let reviews = snap.service("default", "reviews").unwrap();
        for host in
            ["reviews", "reviews:80", "reviews.default", "Reviews.default.svc", "reviews.default.svc.cluster.local:80"]
        {
            assert_eq!(snap.lookup_host(host), Ok((reviews, 0)), "{host}");
        }
        assert_eq!(snap.lookup_host("reviews:81"), Err(HostLookupError::UnknownPort(81)));
        assert_eq!(snap.lookup_host("example.com"), Err(HostLookupError::UnknownHost));
        assert_eq!(
            compile(&parse_documents("m", MESH).unwrap(), "other").lookup_host("reviews"),
            Err(HostLookupError::UnknownHost)
        );
    }

    #[test]
    fn routes_sorted_by_precedence_with_unresolved_backends_reported() {
        let snap = snapshot();
        let reviews = &snap.services[snap.service("default", "reviews").unwrap()];
        let routes = reviews.ports[0].routes.as_ref().unwrap();
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[0].matcher.headers.len(), 1, "the header match sorts first");
        assert_eq!(routes[1].action.backends[0].target, BackendTarget::Unresolved("default/reviews-v1:80".into()));
        assert!(snap.unresolved.iter().any(|u| u.contains("reviews-v1")), "{:?}", snap.unresolved);
    }

    #[test]
    fn prefix_rewrite_replaces_only_the_matched_prefix() {
        let rewrite = |prefix: &str, with: &str, path: &str| {
            PathRewrite::ReplacePrefixMatch { matched_prefix: prefix.into(), replacement: with.into() }.apply(path)
        };
        assert_eq!(rewrite("/api", "/v2", "/api/users"), "/v2/users");
        assert_eq!(rewrite("/api/", "/", "/api/users"), "/users");
        assert_eq!(rewrite("/api", "/", "/api"), "/");
    }

    #[test]
    fn access_logging_is_meshconfig_with_each_services_fields_over_it() {
        let docs = r#"
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: a}
spec: {selector: {app: a}, ports: [{port: 80}]}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: b}
spec: {selector: {app: b}, ports: [{port: 80}]}
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: b}
spec: {targetRef: {kind: Service, name: b}, accessLog: {errorsOnly: true}, tracing: {samplingRate: 0.5}}
"#;
        let quiet = compile(&parse_documents("f", docs).unwrap(), "default");
        assert_eq!(quiet.access_log_path, None, "no MeshConfig, no Service turning it on: off");
        assert!(quiet.unresolved.iter().any(|u| u.contains("no tracing endpoint")), "{:?}", quiet.unresolved);
        let mesh = "---\napiVersion: weft.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {accessLog: {path: /tmp/x.log, samplingRate: 0.5}}\n";
        let snapshot = compile(&parse_documents("f", &format!("{docs}{mesh}")).unwrap(), "default");
        assert_eq!(snapshot.access_log_path.as_deref(), Some("/tmp/x.log"));
        let rule = |name: &str| snapshot.services.iter().find(|s| s.name == name).unwrap().policy.access_log;
        assert_eq!(rule("a"), AccessLogRule { enabled: true, sampling_rate: 0.5, errors_only: false });
        assert_eq!(rule("b"), AccessLogRule { enabled: true, sampling_rate: 0.5, errors_only: true });
    }
}
