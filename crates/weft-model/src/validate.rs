//! Semantic checks that serde's shapes cannot express: value ranges, regular
//! expressions, Gateway API cross-field rules, and features refused as not implemented.
//!
//! Each check returns the field path (relative to the section) and a message that says
//! what to write instead.

use std::collections::HashSet;

use crate::{
    resource::{Metadata, ResourceSpec},
    spec::*,
};

pub(crate) type FieldError = (String, String);
type Checked = Result<(), FieldError>;

fn fail(path: impl Into<String>, message: impl Into<String>) -> Checked {
    Err((path.into(), message.into()))
}

pub(crate) fn metadata(metadata: &Metadata) -> Checked {
    dns_name("name", &metadata.name)?;
    dns_name("namespace", &metadata.namespace)
}

/// Kubernetes DNS-1123 subdomain rules, so names work as hostnames.
fn dns_name(path: &str, name: &str) -> Checked {
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    if valid {
        Ok(())
    } else {
        fail(
            path,
            format!("{name:?} is not a valid name: use lowercase letters, digits, '-' and '.', starting and ending with a letter or digit"),
        )
    }
}

pub(crate) fn spec(spec: &ResourceSpec) -> Checked {
    match spec {
        ResourceSpec::Service(s) => service(s),
        ResourceSpec::Workload(w) => workload(w),
        ResourceSpec::HttpRoute(r) => http_route(r),
        ResourceSpec::GrpcRoute(r) => grpc_route(r),
        ResourceSpec::TrafficPolicy(p) => traffic_policy(p),
        ResourceSpec::AuthorizationPolicy(p) => authorization_policy(p),
        ResourceSpec::MeshConfig(m) => mesh_config(m),
        ResourceSpec::ExternalService(e) => external_service(e),
    }
}

fn external_service(spec: &ExternalServiceSpec) -> Checked {
    if spec.hosts.is_empty() && spec.addresses.is_empty() {
        return fail("hosts", "an ExternalService lists hosts (DNS names), addresses (CIDRs), or both");
    }
    for (i, host) in spec.hosts.iter().enumerate() {
        let name = host.strip_prefix("*.").unwrap_or(host);
        if name.contains('*') || !name.contains('.') {
            return fail(
                format!("hosts[{i}]"),
                format!("{host:?}: write a DNS name (api.example.com) or a wildcard under one (*.example.com)"),
            );
        }
        dns_name(&format!("hosts[{i}]"), name)?;
    }
    if spec.ports.is_empty() {
        return fail("ports", "list the ports that may be reached, e.g. [{port: 443}]");
    }
    for (i, port) in spec.ports.iter().enumerate() {
        if port.port == 0 {
            return fail(format!("ports[{i}].port"), "port must be 1-65535");
        }
    }
    Ok(())
}

fn authorization_policy(spec: &AuthorizationPolicySpec) -> Checked {
    core_group("targetRef.group", spec.target_ref.group.as_deref())?;
    if spec.target_ref.kind != "Service" {
        return fail("targetRef.kind", "an AuthorizationPolicy targets a Service");
    }
    for (i, rule) in spec.rules.iter().enumerate() {
        let single = AuthorizationPolicySpec { rules: vec![rule.clone()], ..spec.clone() };
        if let Err(error) = crate::authz::Authorizer::new(&[("", &single)], Default::default()) {
            return fail(format!("rules[{i}]"), error.trim_start_matches("AuthorizationPolicy : ").to_string());
        }
    }
    Ok(())
}

fn mesh_config(spec: &MeshConfigSpec) -> Checked {
    if let Some(domain) = &spec.trust_domain {
        if let Err(error) = crate::spiffe::TrustDomain::new(domain) {
            return fail("trustDomain", error.to_string());
        }
    }
    if let Some(tracing) = &spec.tracing {
        if let Err(reason) = otlp_endpoint(&tracing.endpoint) {
            return fail("tracing.endpoint", reason);
        }
        sampling_rate("tracing.samplingRate", tracing.sampling_rate)?;
        for (i, principal) in tracing.force_from.iter().enumerate() {
            if let Err(error) = crate::spiffe::SpiffeId::parse(principal) {
                return fail(format!("tracing.forceFrom[{i}]"), error.to_string());
            }
        }
    }
    if let Some(log) = &spec.access_log {
        if log.path.trim().is_empty() {
            return fail("accessLog.path", "give stderr or a file path");
        }
        sampling_rate("accessLog.samplingRate", log.sampling_rate)?;
    }
    if let Some(range) = &spec.virtual_ip_range {
        if let Err(reason) = range.parse::<crate::virtual_ip::VirtualIpRange>() {
            return fail("virtualIPRange", reason);
        }
    }
    Ok(())
}

/// An OTLP receiver's URL: `http://host:port[/path]`.
pub fn otlp_endpoint(endpoint: &str) -> Result<(), String> {
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|_| format!("{endpoint:?} is not a URL; write it as http://HOST:PORT, e.g. http://127.0.0.1:4317"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err("TLS to the trace receiver is not implemented yet in this weft release; use http:// to a \
                        collector on the same host or network"
                .into())
        }
        _ => return Err(format!("{endpoint:?} needs the scheme http://, e.g. http://127.0.0.1:4317")),
    }
    if uri.port_u16().is_none() {
        return Err(format!("{endpoint:?} needs a port: 4317 for OTLP/gRPC, 4318 for OTLP/HTTP"));
    }
    if uri.query().is_some() {
        return Err(format!("{endpoint:?}: a query string is not allowed"));
    }
    Ok(())
}

fn sampling_rate(field: &str, rate: f64) -> Checked {
    if !(0.0..=1.0).contains(&rate) {
        return fail(field, format!("{rate} is not a share of requests: give 0 to 1 (0.01 is 1%)"));
    }
    Ok(())
}

fn service(spec: &ServiceSpec) -> Checked {
    if spec.ports.is_empty() {
        return fail("ports", "a Service needs at least one port");
    }
    if let Some(address) = spec.virtual_ip {
        if address.is_loopback() || address.is_unspecified() || address.is_multicast() || address.is_broadcast() {
            return fail(
                "virtualIP",
                format!("{address} cannot be a Service's address; choose one in MeshConfig's virtualIPRange"),
            );
        }
    }
    let mut numbers = HashSet::new();
    let mut names = HashSet::new();
    for (i, port) in spec.ports.iter().enumerate() {
        if port.port == 0 {
            return fail(format!("ports[{i}].port"), "port must be 1-65535");
        }
        if port.target_port == Some(0) {
            return fail(format!("ports[{i}].targetPort"), "targetPort must be 1-65535");
        }
        if port.proxy_protocol.is_some() && port.protocol != Protocol::Tcp {
            return fail(
                format!("ports[{i}].proxyProtocol"),
                "the PROXY protocol is for tcp ports; HTTP applications get the caller's address in X-Forwarded-For",
            );
        }
        if !numbers.insert(port.port) {
            return fail(format!("ports[{i}].port"), format!("port {} is listed twice", port.port));
        }
        if let Some(name) = &port.name {
            if !names.insert(name) {
                return fail(format!("ports[{i}].name"), format!("port name {name:?} is listed twice"));
            }
        }
    }
    Ok(())
}

fn workload(spec: &WorkloadSpec) -> Checked {
    if let Some(identity) = &spec.identity {
        if let Err(error) = crate::spiffe::SpiffeId::parse(identity) {
            return fail("identity", error.to_string());
        }
    }
    if spec.address.port() == 0 {
        return fail("address", "address needs a port, e.g. 127.0.0.1:9080");
    }
    for (name, port) in &spec.ports {
        if *port == 0 {
            return fail(format!("ports.{name}"), "port must be 1-65535");
        }
    }
    if spec.weight > 1_000_000 {
        return fail("weight", "weight must be at most 1000000");
    }
    Ok(())
}

fn parent_refs(refs: &[ParentRef], hostnames: &[String]) -> Checked {
    if !hostnames.is_empty() {
        return fail(
            "hostnames",
            "routes attached to a Service (GAMMA) match by their parent Service, not by hostname; remove hostnames",
        );
    }
    if refs.is_empty() {
        return fail("parentRefs", "a route needs at least one parentRef of kind Service");
    }
    for (i, parent) in refs.iter().enumerate() {
        let path = format!("parentRefs[{i}]");
        core_group(&format!("{path}.group"), parent.group.as_deref())?;
        if parent.kind.as_deref() != Some("Service") {
            return fail(
                format!("{path}.kind"),
                "weft attaches routes to Services (GAMMA): write kind: Service; Gateway parents are not implemented yet",
            );
        }
        if parent.section_name.is_some() {
            return fail(format!("{path}.sectionName"), "sectionName is not used for Service parents; use port");
        }
        if let Some(ns) = &parent.namespace {
            dns_name(&format!("{path}.namespace"), ns)?;
        }
    }
    Ok(())
}

fn core_group(path: &str, group: Option<&str>) -> Checked {
    match group {
        None | Some("") | Some("core") => Ok(()),
        Some(other) => fail(path, format!("group {other:?} is not supported: Services are in the core group (\"\")")),
    }
}

fn backend_refs(path: &str, refs: &[BackendRef]) -> Checked {
    for (i, backend) in refs.iter().enumerate() {
        let path = format!("{path}[{i}]");
        core_group(&format!("{path}.group"), backend.group.as_deref())?;
        if !matches!(backend.kind.as_deref(), None | Some("Service")) {
            return fail(format!("{path}.kind"), "backendRefs must point to a Service");
        }
        if backend.port.is_none() {
            return fail(format!("{path}.port"), "port is required for a Service backend, as in the Gateway API");
        }
        if backend.weight > 1_000_000 {
            return fail(format!("{path}.weight"), "weight must be at most 1000000");
        }
        filters(&format!("{path}.filters"), &backend.filters, None)?;
    }
    Ok(())
}

fn http_route(spec: &HttpRouteSpec) -> Checked {
    parent_refs(&spec.parent_refs, &spec.hostnames)?;
    for (r, rule) in spec.rules.iter().enumerate() {
        let path = format!("rules[{r}]");
        for (m, matcher) in rule.matches.iter().enumerate() {
            http_match(&format!("{path}.matches[{m}]"), matcher)?;
        }
        let prefix_only = !rule.matches.is_empty()
            && rule.matches.iter().all(|m| m.path.as_ref().is_some_and(|p| p.kind == PathMatchType::PathPrefix));
        let prefix_ok = rule.matches.is_empty() || prefix_only;
        filters(&format!("{path}.filters"), &rule.filters, Some(prefix_ok))?;
        backend_refs(&format!("{path}.backendRefs"), &rule.backend_refs)?;
        if let Some(timeouts) = &rule.timeouts {
            if let (Some(request), Some(backend)) = (timeouts.request, timeouts.backend_request) {
                if !request.0.is_zero() && backend.0 > request.0 {
                    return fail(
                        format!("{path}.timeouts.backendRequest"),
                        "backendRequest must not be longer than request (Gateway API rule)",
                    );
                }
            }
        }
    }
    Ok(())
}

fn http_match(path: &str, matcher: &HttpRouteMatch) -> Checked {
    if let Some(p) = &matcher.path {
        match p.kind {
            PathMatchType::Exact | PathMatchType::PathPrefix => {
                if !p.value.starts_with('/') {
                    return fail(format!("{path}.path.value"), "path must start with '/'");
                }
            }
            PathMatchType::RegularExpression => regex(&format!("{path}.path.value"), &p.value)?,
        }
    }
    value_matches(&format!("{path}.headers"), &matcher.headers, true)?;
    value_matches(&format!("{path}.queryParams"), &matcher.query_params, false)?;
    if let Some(method) = &matcher.method {
        const METHODS: [&str; 9] = ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];
        if !METHODS.contains(&method.as_str()) {
            return fail(
                format!("{path}.method"),
                format!("{method:?} is not a method the Gateway API allows ({})", METHODS.join(", ")),
            );
        }
    }
    Ok(())
}

fn value_matches(path: &str, matches: &[ValueMatch], headers: bool) -> Checked {
    let mut names = HashSet::new();
    for (i, m) in matches.iter().enumerate() {
        if headers && http::HeaderName::from_bytes(m.name.as_bytes()).is_err() {
            return fail(format!("{path}[{i}].name"), format!("{:?} is not a valid header name", m.name));
        }
        if m.name.is_empty() {
            return fail(format!("{path}[{i}].name"), "name must not be empty");
        }
        if !names.insert(m.name.to_ascii_lowercase()) {
            return fail(format!("{path}[{i}].name"), format!("{:?} is matched twice in one match", m.name));
        }
        if m.kind == ValueMatchType::RegularExpression {
            regex(&format!("{path}[{i}].value"), &m.value)?;
        }
    }
    Ok(())
}

fn regex(path: &str, pattern: &str) -> Checked {
    match regex::Regex::new(pattern) {
        Ok(_) => Ok(()),
        Err(e) => fail(path, format!("invalid regular expression: {e}")),
    }
}

/// `prefix_match`: whether ReplacePrefixMatch is allowed (every match is a PathPrefix);
/// `None` for backend-level filters, where only header modifiers make sense.
fn filters(path: &str, filters: &[HttpRouteFilter], prefix_match: Option<bool>) -> Checked {
    let mut kinds = HashSet::new();
    for (i, filter) in filters.iter().enumerate() {
        let path = format!("{path}[{i}]");
        let set = [
            filter.request_header_modifier.is_some(),
            filter.response_header_modifier.is_some(),
            filter.url_rewrite.is_some(),
            filter.request_redirect.is_some(),
            filter.request_mirror.is_some(),
            filter.extension_ref.is_some(),
        ];
        let expected = match filter.kind.as_str() {
            "RequestHeaderModifier" => 0,
            "ResponseHeaderModifier" => 1,
            "URLRewrite" => 2,
            "RequestRedirect" => 3,
            "RequestMirror" | "ExtensionRef" | "CORS" => {
                return fail(
                    format!("{path}.type"),
                    format!("filter {} is not implemented yet in this weft release", filter.kind),
                )
            }
            other => return fail(format!("{path}.type"), format!("unknown filter type {other:?}")),
        };
        if !set[expected] || set.iter().filter(|s| **s).count() != 1 {
            return fail(
                path,
                format!(
                    "a {} filter needs exactly its own field (e.g. requestHeaderModifier for RequestHeaderModifier)",
                    filter.kind
                ),
            );
        }
        if prefix_match.is_none() && expected >= 2 {
            return fail(
                format!("{path}.type"),
                format!("{} is not allowed on a backendRef; put it on the rule", filter.kind),
            );
        }
        if !kinds.insert(expected) && expected != 0 && expected != 1 {
            return fail(format!("{path}.type"), format!("{} may appear once per rule", filter.kind));
        }
        if let Some(m) = filter.request_header_modifier.as_ref().or(filter.response_header_modifier.as_ref()) {
            header_modifier(&path, m)?;
        }
        let modifier = filter
            .url_rewrite
            .as_ref()
            .and_then(|u| u.path.as_ref())
            .or(filter.request_redirect.as_ref().and_then(|r| r.path.as_ref()));
        if let Some(modifier) = modifier {
            let field = if filter.url_rewrite.is_some() { "urlRewrite.path" } else { "requestRedirect.path" };
            path_modifier(&format!("{path}.{field}"), modifier, prefix_match.unwrap_or(false))?;
        }
        if let Some(redirect) = &filter.request_redirect {
            if let Some(scheme) = &redirect.scheme {
                if scheme != "http" && scheme != "https" {
                    return fail(format!("{path}.requestRedirect.scheme"), "scheme must be http or https");
                }
            }
            if let Some(code) = redirect.status_code {
                if code != 301 && code != 302 {
                    return fail(format!("{path}.requestRedirect.statusCode"), "statusCode must be 301 or 302");
                }
            }
        }
    }
    if kinds.contains(&2) && kinds.contains(&3) {
        return fail(path, "URLRewrite and RequestRedirect cannot be used together (Gateway API rule)");
    }
    Ok(())
}

fn header_modifier(path: &str, modifier: &HeaderModifier) -> Checked {
    for (i, h) in modifier.set.iter().chain(&modifier.add).enumerate() {
        if http::HeaderName::from_bytes(h.name.as_bytes()).is_err() || http::HeaderValue::from_str(&h.value).is_err() {
            return fail(format!("{path}[{i}]"), format!("invalid header {:?}: {:?}", h.name, h.value));
        }
    }
    for (i, name) in modifier.remove.iter().enumerate() {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return fail(format!("{path}.remove[{i}]"), format!("{name:?} is not a valid header name"));
        }
    }
    Ok(())
}

fn path_modifier(path: &str, modifier: &PathModifier, prefix_match: bool) -> Checked {
    match modifier.kind {
        PathModifierType::ReplaceFullPath => match &modifier.replace_full_path {
            Some(p) if p.starts_with('/') => Ok(()),
            _ => fail(format!("{path}.replaceFullPath"), "ReplaceFullPath needs replaceFullPath starting with '/'"),
        },
        PathModifierType::ReplacePrefixMatch => {
            if !prefix_match {
                return fail(
                    path,
                    "ReplacePrefixMatch needs the rule's matches to be PathPrefix matches (Gateway API rule)",
                );
            }
            match &modifier.replace_prefix_match {
                Some(p) if p.starts_with('/') => Ok(()),
                _ => fail(
                    format!("{path}.replacePrefixMatch"),
                    "ReplacePrefixMatch needs replacePrefixMatch starting with '/'",
                ),
            }
        }
    }
}

fn grpc_route(spec: &GrpcRouteSpec) -> Checked {
    parent_refs(&spec.parent_refs, &spec.hostnames)?;
    for (r, rule) in spec.rules.iter().enumerate() {
        let path = format!("rules[{r}]");
        for (m, matcher) in rule.matches.iter().enumerate() {
            let path = format!("{path}.matches[{m}]");
            if let Some(method) = &matcher.method {
                if method.service.is_none() && method.method.is_none() {
                    return fail(format!("{path}.method"), "a method match needs service, method, or both");
                }
                for (field, value) in [("service", &method.service), ("method", &method.method)] {
                    let Some(value) = value else { continue };
                    match method.kind {
                        ValueMatchType::Exact if value.is_empty() || value.contains('/') => {
                            return fail(format!("{path}.method.{field}"), "must be non-empty and contain no '/'")
                        }
                        ValueMatchType::RegularExpression => regex(&format!("{path}.method.{field}"), value)?,
                        _ => {}
                    }
                }
            }
            value_matches(&format!("{path}.headers"), &matcher.headers, true)?;
        }
        for (i, filter) in rule.filters.iter().enumerate() {
            if !matches!(filter.kind.as_str(), "RequestHeaderModifier" | "ResponseHeaderModifier") {
                return fail(
                    format!("{path}.filters[{i}].type"),
                    format!("filter {} is not implemented for GRPCRoute; use RequestHeaderModifier or ResponseHeaderModifier", filter.kind),
                );
            }
        }
        filters(&format!("{path}.filters"), &rule.filters, Some(false))?;
        backend_refs(&format!("{path}.backendRefs"), &rule.backend_refs)?;
    }
    Ok(())
}

fn traffic_policy(spec: &TrafficPolicySpec) -> Checked {
    core_group("targetRef.group", spec.target_ref.group.as_deref())?;
    if spec.target_ref.kind != "Service" {
        return fail("targetRef.kind", "a TrafficPolicy targets a Service");
    }
    if spec.rate_limit.is_some() {
        return fail("rateLimit", "rate limits are not implemented yet in this weft release; remove the field");
    }
    if spec.fault_injection.is_some() {
        return fail("faultInjection", "fault injection is not implemented yet in this weft release; remove the field");
    }
    if let Some(tracing) = &spec.tracing {
        sampling_rate("tracing.samplingRate", tracing.sampling_rate)?;
    }
    if let Some(rate) = spec.access_log.as_ref().and_then(|log| log.sampling_rate) {
        sampling_rate("accessLog.samplingRate", rate)?;
    }
    if let Some(lb) = &spec.load_balancer {
        if lb.algorithm == LoadBalancerAlgorithm::ConsistentHash {
            return fail(
                "loadBalancer.algorithm",
                "consistent-hash is not implemented yet in this weft release; use p2c-ewma, round-robin or least-request",
            );
        }
    }
    if let Some(retries) = &spec.retries {
        if retries.attempts > 10 {
            return fail("retries.attempts", "at most 10 retries");
        }
        let ratio = retries.budget.ratio;
        if !(0.0..=1.0).contains(&ratio) {
            return fail("retries.budget.ratio", "ratio must be between 0 and 1");
        }
        if retries.budget.window.0.is_zero() {
            return fail("retries.budget.window", "window must be longer than 0s");
        }
        if retries.backoff.base.0 > retries.backoff.max.0 {
            return fail("retries.backoff.base", "base must not exceed max");
        }
    }
    if let Some(outlier) = &spec.outlier_detection {
        if outlier.max_ejection_percent > 100 {
            return fail("outlierDetection.maxEjectionPercent", "a percentage: 0-100");
        }
        if outlier.interval.0.is_zero() {
            return fail("outlierDetection.interval", "interval must be longer than 0s");
        }
        if outlier.base_ejection_time.0.is_zero() {
            return fail("outlierDetection.baseEjectionTime", "baseEjectionTime must be longer than 0s");
        }
    }
    if let Some(limits) = &spec.connection_limits {
        for (field, value) in [
            ("maxConnections", limits.max_connections),
            ("maxPendingRequests", limits.max_pending_requests),
            ("maxRequests", limits.max_requests),
        ] {
            if value == 0 {
                return fail(format!("connectionLimits.{field}"), "must be at least 1");
            }
        }
    }
    Ok(())
}
