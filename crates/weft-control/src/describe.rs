//! `weft describe service`: one Service as the mesh sees it — its ports, the routes
//! attached to it, its effective policy, its endpoints, and every reference around it
//! that points at nothing.

use serde::Serialize;
use weft_model::{
    resource::ResourceSpec,
    snapshot::{compile, Endpoint, ServicePolicy},
    spec::ServicePort,
    Resource,
};

use crate::registry::Registered;

/// The description of one Service.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceDescription {
    pub namespace: String,
    pub name: String,
    pub selector: std::collections::BTreeMap<String, String>,
    /// Where captured applications reach it (`virtualIP`, declared or assigned).
    #[serde(rename = "virtualIP", skip_serializing_if = "Option::is_none")]
    pub virtual_ip: Option<std::net::Ipv4Addr>,
    pub ports: Vec<ServicePort>,
    /// `HTTPRoute ns/name` of every route whose parentRefs name this Service.
    pub routes: Vec<String>,
    pub policy: ServicePolicy,
    pub endpoints: Vec<EndpointDescription>,
    /// Dangling references from or to this Service's routes and policies.
    pub unresolved: Vec<String>,
}

/// One endpoint of one port.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointDescription {
    pub port: u16,
    #[serde(flatten)]
    pub endpoint: Endpoint,
    /// Health as last reported; `unknown` for workloads listed by hand, whose proxies
    /// report nothing. A registered workload whose proxy is connected to no control plane
    /// says so, with about when its lease lapses.
    pub health: String,
}

/// Describes Service `namespace/name` among `resources`, with the health of registered
/// workloads from `registered`; `None` if there is no such Service.
pub fn describe_service(
    resources: &[Resource],
    registered: &[Registered],
    namespace: &str,
    name: &str,
) -> Option<ServiceDescription> {
    let service = resources.iter().find_map(|r| match &r.spec {
        ResourceSpec::Service(spec) if r.metadata.namespace == namespace && r.metadata.name == name => Some(spec),
        _ => None,
    })?;
    let snapshot = compile(resources, namespace);
    let compiled = &snapshot.services[snapshot.service(namespace, name)?];

    let mut routes = Vec::new();
    for resource in resources {
        let parents = match &resource.spec {
            ResourceSpec::HttpRoute(spec) => &spec.parent_refs,
            ResourceSpec::GrpcRoute(spec) => &spec.parent_refs,
            _ => continue,
        };
        let route_ns = &resource.metadata.namespace;
        if parents.iter().any(|p| p.name == name && p.namespace.as_deref().unwrap_or(route_ns) == namespace) {
            routes.push(format!("{} {route_ns}/{}", resource.kind().as_str(), resource.metadata.name));
        }
    }
    let policies: Vec<String> = resources
        .iter()
        .filter_map(|r| match &r.spec {
            ResourceSpec::TrafficPolicy(spec)
                if spec.target_ref.kind == "Service"
                    && spec.target_ref.name == name
                    && spec.target_ref.namespace.as_deref().unwrap_or(&r.metadata.namespace) == namespace =>
            {
                Some(format!("TrafficPolicy {}/{}", r.metadata.namespace, r.metadata.name))
            }
            _ => None,
        })
        .collect();
    let service_ref = format!("Service {namespace}/{name}");
    let unresolved = snapshot
        .unresolved
        .iter()
        .filter(|line| {
            line.contains(&service_ref)
                || routes.iter().chain(&policies).any(|owner| line.starts_with(&owner.replacen(' ', "/", 1)))
        })
        .cloned()
        .collect();

    let now = std::time::Instant::now();
    let health = |workload: &str| {
        let Some(entry) = registered.iter().find(|r| r.registration.proxy_id == workload) else {
            return "unknown".to_string();
        };
        let state = if entry.healthy { "healthy" } else { "unhealthy" };
        match entry.expires {
            Some(at) => {
                format!("{state}, proxy disconnected, expires in ~{}s", at.saturating_duration_since(now).as_secs())
            }
            None => state.to_string(),
        }
    };
    let mut endpoints: Vec<EndpointDescription> = compiled
        .ports
        .iter()
        .flat_map(|port| {
            port.endpoints.iter().map(move |endpoint| EndpointDescription {
                port: port.port,
                endpoint: endpoint.clone(),
                health: health(&endpoint.workload),
            })
        })
        .collect();
    // Unhealthy registered workloads receive no traffic, so they are not endpoints of the
    // compiled service; show them anyway, as an operator looking for them would expect.
    for entry in registered.iter().filter(|e| !e.healthy) {
        let health = health(&entry.registration.proxy_id);
        let r = &entry.registration;
        let selection =
            weft_model::snapshot::selects(namespace, &service.selector, &r.namespace, &r.labels, r.identity.as_deref());
        if selection == weft_model::snapshot::Selection::Selected {
            if let (Ok(address), Some(port)) = (r.address.parse(), compiled.ports.first()) {
                endpoints.push(EndpointDescription {
                    port: port.port,
                    endpoint: Endpoint {
                        workload: r.proxy_id.clone(),
                        address,
                        weight: r.weight,
                        zone: r.zone.clone(),
                        identity: r.identity.as_deref().map(Into::into),
                    },
                    health,
                });
            }
        }
    }
    Some(ServiceDescription {
        namespace: namespace.to_string(),
        name: name.to_string(),
        selector: service.selector.clone(),
        virtual_ip: compiled.virtual_ip,
        ports: service.ports.clone(),
        routes,
        policy: compiled.policy.clone(),
        endpoints,
        unresolved,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESH: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: reviews}
spec: {selector: {app: reviews}, ports: [{port: 80, protocol: http}]}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: reviews-1}
spec: {labels: {app: reviews}, address: "127.0.0.1:9080", zone: a}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: canary}
spec:
  parentRefs: [{kind: Service, name: reviews, port: 80}]
  rules: [{backendRefs: [{name: reviews-v2, port: 80}]}]
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews}
spec: {targetRef: {kind: Service, name: reviews}, loadBalancer: {algorithm: round-robin}}
"#;

    #[test]
    fn shows_routes_policy_endpoints_and_what_is_unresolved() {
        let resources = weft_model::parse_documents("mesh", MESH).unwrap();
        let described = describe_service(&resources, &[], "default", "reviews").unwrap();
        assert_eq!(described.routes, vec!["HTTPRoute default/canary"]);
        assert_eq!(described.policy.source.as_deref(), Some("default/reviews"));
        assert_eq!(described.endpoints.len(), 1);
        assert_eq!(described.endpoints[0].endpoint.zone.as_deref(), Some("a"));
        assert_eq!(described.unresolved.len(), 1, "{:?}", described.unresolved);
        assert!(described.unresolved[0].contains("reviews-v2"), "{:?}", described.unresolved);
        assert!(describe_service(&resources, &[], "default", "ratings").is_none());
    }
}
