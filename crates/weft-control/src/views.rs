//! What each proxy is sent: the part of the desired state it needs, as documents.
//!
//! A proxy needs its own Service (for its inbound side) and the Services it calls, which
//! it names as it first calls them; for each of those, the routes attached to it, the
//! Services those routes send to (recursively), the TrafficPolicies of all of them, and the
//! Workloads their selectors pick. Registered workloads join as Workloads; a service that
//! has registrations but no Service resource gets one made up (selector `app: NAME`, the
//! port the registrations declare), so that it is reachable before an operator writes one.
//! An explicit Service of that name always wins.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr},
};

use serde_json::json;
use weft_model::{resource::ResourceSpec, virtual_ip, Resource};

use crate::registry::Registered;

/// The desired state plus registrations, indexed for computing views: a view costs in
/// proportion to what it holds, not to the size of the mesh (a control plane recomputes
/// every connected proxy's view on each change).
pub struct World {
    resources: Vec<Resource>,
    /// Each document's JSON text, rendered once.
    texts: Vec<String>,
    /// `namespace/name` → index, for each kind that a view follows.
    services: HashMap<String, usize>,
    /// Parent Service → (route index, backend Services).
    routes_by_parent: HashMap<String, Vec<(usize, Vec<String>)>>,
    policies_by_target: HashMap<String, Vec<usize>>,
    /// Target Service → AuthorizationPolicies: only in the view of the Service's own
    /// proxies, which enforce them.
    authorization_by_target: HashMap<String, Vec<usize>>,
    /// The MeshConfig, in every view.
    mesh_config: Option<usize>,
    /// The ExternalServices, in every view: egress is judged by every captured proxy.
    external: Vec<usize>,
    /// Workloads by (namespace, `app` label), and all of a namespace's, for selectors
    /// without `app`.
    workloads_by_app: HashMap<(String, String), Vec<usize>>,
    workloads_by_namespace: HashMap<String, Vec<usize>>,
    /// Virtual IPs and workload addresses → the Services reached there, for proxies that
    /// subscribe to an address (`ip/ADDRESS`: a captured connection to it).
    by_address: HashMap<IpAddr, Vec<String>>,
    /// Every Service's virtual IP and where it came from: derived ones are then stored
    /// (see [`crate::virtual_ips`]).
    pub virtual_ips: BTreeMap<(String, String), (Ipv4Addr, VirtualIpOrigin)>,
}

/// Where a Service's virtual IP came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtualIpOrigin {
    /// Its `virtualIP`.
    Declared,
    /// A record the control plane stored when it first gave the address.
    Stored,
    /// Derived from its name, not stored yet.
    Derived,
}

/// The subscription prefix of an address (a captured connection's original destination).
pub const ADDRESS_SUBSCRIPTION: &str = "ip/";

/// One proxy's view.
#[derive(Debug, PartialEq)]
pub struct View {
    /// Multi-document YAML (JSON documents separated by `---`).
    pub text: String,
    /// Subscribed services that do not exist.
    pub missing: Vec<String>,
    /// `namespace/name` of every Service the view was built for (its own, what it
    /// subscribed to, and their routes' backends).
    pub services: BTreeSet<String>,
}

impl World {
    /// Builds the world from stored documents, registrations and the Services' stored
    /// virtual IPs. Only healthy registrations become endpoints.
    pub fn new(
        stored: Vec<(Resource, serde_json::Value)>,
        registered: &[Registered],
        virtual_ips: &BTreeMap<(String, String), Ipv4Addr>,
    ) -> Self {
        let mut resources = Vec::with_capacity(stored.len() + registered.len());
        let mut documents = Vec::with_capacity(stored.len() + registered.len());
        let mut declared: BTreeSet<(String, String)> = BTreeSet::new();
        for (resource, document) in stored {
            if matches!(resource.spec, ResourceSpec::Service(_)) {
                declared.insert((resource.metadata.namespace.clone(), resource.metadata.name.clone()));
            }
            resources.push(resource);
            documents.push(document);
        }
        // Made-up Services for registrations without one: the first registration's port
        // and protocol decide.
        let mut implied: BTreeMap<(String, String), (u16, String)> = BTreeMap::new();
        for entry in registered {
            let r = &entry.registration;
            let key = (r.namespace.clone(), r.service.clone());
            if !declared.contains(&key) {
                implied.entry(key).or_insert((r.service_port, r.protocol.clone()));
            }
            if entry.healthy {
                push_document(&mut resources, &mut documents, r.workload_document());
            }
        }
        for ((namespace, name), (port, protocol)) in implied {
            let document = json!({
                "apiVersion": weft_model::resource::WEFT_API_VERSION,
                "kind": "Service",
                "metadata": {"name": name, "namespace": namespace, "labels": {"weft.dev/implied": "true"}},
                "spec": {"selector": {"app": name}, "ports": [{"port": port, "protocol": protocol}]},
            });
            push_document(&mut resources, &mut documents, document);
        }

        let virtual_ips = assign_virtual_ips(&mut resources, &mut documents, virtual_ips);

        let mut world = World {
            texts: documents.iter().map(ToString::to_string).collect(),
            resources: Vec::new(),
            services: HashMap::new(),
            routes_by_parent: HashMap::new(),
            policies_by_target: HashMap::new(),
            authorization_by_target: HashMap::new(),
            mesh_config: None,
            external: Vec::new(),
            workloads_by_app: HashMap::new(),
            workloads_by_namespace: HashMap::new(),
            by_address: HashMap::new(),
            virtual_ips,
        };
        for (i, resource) in resources.iter().enumerate() {
            let meta = &resource.metadata;
            match &resource.spec {
                ResourceSpec::Service(_) => {
                    world.services.insert(format!("{}/{}", meta.namespace, meta.name), i);
                }
                ResourceSpec::HttpRoute(_) | ResourceSpec::GrpcRoute(_) => {
                    let (parents, backends) = route_refs(resource);
                    for parent in parents {
                        world.routes_by_parent.entry(parent).or_default().push((i, backends.clone()));
                    }
                }
                ResourceSpec::TrafficPolicy(spec) => {
                    let target_ns = spec.target_ref.namespace.as_deref().unwrap_or(&meta.namespace);
                    world
                        .policies_by_target
                        .entry(format!("{target_ns}/{}", spec.target_ref.name))
                        .or_default()
                        .push(i);
                }
                ResourceSpec::AuthorizationPolicy(spec) => {
                    let target_ns = spec.target_ref.namespace.as_deref().unwrap_or(&meta.namespace);
                    world
                        .authorization_by_target
                        .entry(format!("{target_ns}/{}", spec.target_ref.name))
                        .or_default()
                        .push(i);
                }
                ResourceSpec::MeshConfig(_) => world.mesh_config = Some(i),
                ResourceSpec::ExternalService(_) => world.external.push(i),
                ResourceSpec::Workload(spec) => {
                    if let Some(app) = spec.labels.get("app") {
                        world.workloads_by_app.entry((meta.namespace.clone(), app.clone())).or_default().push(i);
                    }
                    world.workloads_by_namespace.entry(meta.namespace.clone()).or_default().push(i);
                }
            }
        }
        world.resources = resources;
        // Addresses captured connections may be made to: virtual IPs (and twins), and
        // the addresses of the workloads each Service selects.
        let mut by_address: HashMap<IpAddr, Vec<String>> = HashMap::new();
        for (key, &i) in &world.services {
            let ResourceSpec::Service(spec) = &world.resources[i].spec else { continue };
            if let Some(address) = spec.virtual_ip {
                by_address.entry(address.into()).or_default().push(key.clone());
                by_address.entry(virtual_ip::ipv6_twin(address).into()).or_default().push(key.clone());
            }
            for workload in world.selected(&world.resources[i].metadata.namespace, &spec.selector) {
                if let ResourceSpec::Workload(workload) = &world.resources[workload].spec {
                    by_address.entry(workload.address.ip()).or_default().push(key.clone());
                }
            }
        }
        world.by_address = by_address;
        world
    }

    /// Every resource, for describing and listing.
    pub fn resources(&self) -> &[Resource] {
        &self.resources
    }

    /// Whether the Service `namespace/name` exists, declared or implied by a registration.
    pub fn has_service(&self, service: &str) -> bool {
        self.services.contains_key(service)
    }

    /// The view of a proxy that serves `own` (if any) and calls `subscriptions`, each
    /// `namespace/name`.
    /// A subscription `ip/ADDRESS` stands for the Services reached at that address.
    pub fn view(&self, own: Option<&str>, subscriptions: &BTreeSet<String>) -> View {
        let by_address = |subscription: &str| {
            let address = subscription.strip_prefix(ADDRESS_SUBSCRIPTION)?.parse::<IpAddr>().ok()?;
            self.by_address.get(&address)
        };
        let mut wanted: Vec<String> = own
            .into_iter()
            .map(str::to_string)
            .chain(subscriptions.iter().flat_map(|s| match by_address(s) {
                Some(services) => services.clone(),
                None => vec![s.clone()],
            }))
            .collect();
        let mut seen: BTreeSet<String> = BTreeSet::new();
        let mut included: BTreeSet<usize> = BTreeSet::new();
        // Its own inbound side: who may call it, and the mesh-wide defaults.
        included.extend(self.mesh_config);
        included.extend(self.external.iter().copied());
        if let Some(own) = own {
            included.extend(self.authorization_by_target.get(own).into_iter().flatten());
        }
        while let Some(service) = wanted.pop() {
            if !seen.insert(service.clone()) {
                continue;
            }
            if let Some(&i) = self.services.get(&service) {
                included.insert(i);
                if let ResourceSpec::Service(spec) = &self.resources[i].spec {
                    included.extend(self.selected(&self.resources[i].metadata.namespace, &spec.selector));
                }
            }
            for (route, backends) in self.routes_by_parent.get(&service).into_iter().flatten() {
                included.insert(*route);
                wanted.extend(backends.iter().cloned());
            }
            included.extend(self.policies_by_target.get(&service).into_iter().flatten());
        }
        let missing = subscriptions
            .iter()
            .filter(|s| !self.services.contains_key(*s) && by_address(s).is_none())
            .cloned()
            .collect();
        // Document order is the world's, so equal views render to equal text.
        let text = included.iter().map(|&i| self.texts[i].as_str()).collect::<Vec<_>>().join("\n---\n");
        View { text, missing, services: seen }
    }

    /// Workloads in `namespace` whose labels include `selector` (none for an empty one).
    fn selected<'a>(
        &'a self,
        namespace: &str,
        selector: &'a BTreeMap<String, String>,
    ) -> impl Iterator<Item = usize> + 'a {
        let candidates = match selector.get("app") {
            _ if selector.is_empty() => None,
            Some(app) => self.workloads_by_app.get(&(namespace.to_string(), app.clone())),
            None => self.workloads_by_namespace.get(namespace),
        };
        candidates.into_iter().flatten().copied().filter(move |&i| match &self.resources[i].spec {
            ResourceSpec::Workload(spec) => selector.iter().all(|(k, v)| spec.labels.get(k) == Some(v)),
            _ => false,
        })
    }
}

/// Gives every Service its virtual IP, in its resource and in the document proxies are
/// sent: computed here over every Service of the mesh and the addresses stored for them,
/// so that every proxy, and every replica (they share the store), agrees, whichever
/// Services a proxy's view holds.
fn assign_virtual_ips(
    resources: &mut [Resource],
    documents: &mut [serde_json::Value],
    stored: &BTreeMap<(String, String), Ipv4Addr>,
) -> BTreeMap<(String, String), (Ipv4Addr, VirtualIpOrigin)> {
    let range = resources
        .iter()
        .find_map(|r| match &r.spec {
            ResourceSpec::MeshConfig(mesh) => mesh.virtual_ip_range.as_deref()?.parse().ok(),
            _ => None,
        })
        .unwrap_or_default();
    let declared = resources
        .iter()
        .filter_map(|r| match &r.spec {
            ResourceSpec::Service(spec) => {
                Some(((r.metadata.namespace.clone(), r.metadata.name.clone()), spec.virtual_ip))
            }
            _ => None,
        })
        .collect();
    let (assigned, problems) = virtual_ip::assign(&declared, stored, range);
    for problem in problems {
        tracing::warn!("{problem}");
    }
    let mut origins = BTreeMap::new();
    for (resource, document) in resources.iter_mut().zip(documents.iter_mut()) {
        let key = (resource.metadata.namespace.clone(), resource.metadata.name.clone());
        if let (ResourceSpec::Service(spec), Some(&address)) = (&mut resource.spec, assigned.get(&key)) {
            let origin = match (spec.virtual_ip, stored.get(&key)) {
                (Some(_), _) => VirtualIpOrigin::Declared,
                (None, Some(&kept)) if kept == address => VirtualIpOrigin::Stored,
                (None, _) => VirtualIpOrigin::Derived,
            };
            origins.insert(key, (address, origin));
            spec.virtual_ip = Some(address);
            if let Some(spec) = document.get_mut("spec").and_then(|spec| spec.as_object_mut()) {
                spec.insert("virtualIP".into(), json!(address.to_string()));
            }
        }
    }
    origins
}

fn push_document(resources: &mut Vec<Resource>, documents: &mut Vec<serde_json::Value>, document: serde_json::Value) {
    match weft_model::parse_documents("registry", &document.to_string()) {
        Ok(mut parsed) if parsed.len() == 1 => {
            resources.push(parsed.remove(0));
            documents.push(document);
        }
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "a registration does not make a valid resource; it is not served"),
    }
}

/// `namespace/name` of a route's parent Services and backend Services.
pub(crate) fn route_refs(resource: &Resource) -> (Vec<String>, Vec<String>) {
    let route_ns = &resource.metadata.namespace;
    let name_of =
        |namespace: &Option<String>, name: &str| format!("{}/{name}", namespace.as_deref().unwrap_or(route_ns));
    match &resource.spec {
        ResourceSpec::HttpRoute(spec) => (
            spec.parent_refs.iter().map(|p| name_of(&p.namespace, &p.name)).collect(),
            spec.rules.iter().flat_map(|r| &r.backend_refs).map(|b| name_of(&b.namespace, &b.name)).collect(),
        ),
        ResourceSpec::GrpcRoute(spec) => (
            spec.parent_refs.iter().map(|p| name_of(&p.namespace, &p.name)).collect(),
            spec.rules.iter().flat_map(|r| &r.backend_refs).map(|b| name_of(&b.namespace, &b.name)).collect(),
        ),
        _ => (vec![], vec![]),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::registry::Registration;

    const MESH: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: reviews}
spec: {selector: {app: reviews}, ports: [{port: 80, protocol: http}]}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: reviews-v2}
spec: {selector: {app: reviews, version: v2}, ports: [{port: 80, protocol: http}]}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: billing}
spec: {selector: {app: billing}, ports: [{port: 80, protocol: http}]}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: reviews-2}
spec: {labels: {app: reviews, version: v2}, address: "127.0.0.1:9082"}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: billing-1}
spec: {labels: {app: billing}, address: "127.0.0.1:9090"}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: to-v2}
spec:
  parentRefs: [{kind: Service, name: reviews, port: 80}]
  rules: [{backendRefs: [{name: reviews-v2, port: 80}]}]
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews-v2}
spec: {targetRef: {kind: Service, name: reviews-v2}, loadBalancer: {algorithm: round-robin}}
"#;

    fn world(registered: &[Registered]) -> World {
        let stored = weft_model::parse_with_documents("mesh", MESH)
            .unwrap()
            .into_iter()
            .map(|d| (d.resource, d.document))
            .collect();
        World::new(stored, registered, &BTreeMap::new())
    }

    fn names(view: &View) -> Vec<String> {
        weft_model::parse_documents("view", &view.text)
            .unwrap()
            .into_iter()
            .map(|r| format!("{} {}", r.kind().as_str(), r.metadata.name))
            .collect()
    }

    #[test]
    fn a_view_follows_routes_to_backends_with_their_policies_and_workloads_only() {
        let view = world(&[]).view(None, &BTreeSet::from(["default/reviews".to_string(), "default/nope".to_string()]));
        let names = names(&view);
        for expected in [
            "Service reviews",
            "Service reviews-v2",
            "HTTPRoute to-v2",
            "TrafficPolicy reviews-v2",
            "Workload reviews-2",
        ] {
            assert!(names.contains(&expected.to_string()), "{expected} missing from {names:?}");
        }
        assert!(!names.iter().any(|n| n.contains("billing")), "{names:?}");
        assert_eq!(view.missing, vec!["default/nope"]);
    }

    #[test]
    fn registrations_imply_a_service_unless_one_is_declared() {
        let registration = |id: &str, service: &str| Registered {
            registration: Registration {
                proxy_id: id.into(),
                namespace: "default".into(),
                service: service.into(),
                labels: BTreeMap::from([("app".to_string(), service.to_string())]),
                address: "127.0.0.1:7000".into(),
                zone: None,
                weight: 1,
                protocol: "grpc".into(),
                service_port: 9000,
                health: crate::registry::Health { healthy: true, detail: String::new() },
                identity: None,
            },
            healthy: true,
            health_detail: String::new(),
            expires: None,
        };
        let mut sick = registration("billing-2", "billing");
        sick.healthy = false;
        let world = world(&[registration("payments-1", "payments"), sick]);
        let view = world.view(None, &BTreeSet::from(["default/payments".to_string(), "default/billing".to_string()]));
        assert!(view.text.contains(r#""weft.dev/implied":"true""#), "{}", view.text);
        assert!(view.text.contains(r#""port":9000,"protocol":"grpc""#), "{}", view.text);
        let names = names(&view);
        assert!(names.contains(&"Workload payments-1".to_string()), "{names:?}");
        assert!(!names.contains(&"Workload billing-2".to_string()), "an unhealthy registration is no endpoint");
        assert_eq!(names.iter().filter(|n| *n == "Service billing").count(), 1, "the declared Service wins");
    }

    #[test]
    fn every_service_gets_a_virtual_ip_and_addresses_can_be_subscribed_to() {
        let world = world(&[]);
        // Every proxy is sent the same address for a Service, whatever else it sees.
        let alone = world.view(None, &BTreeSet::from(["default/billing".to_string()]));
        let billing = weft_model::compile(&weft_model::parse_documents("view", &alone.text).unwrap(), "default");
        let address = billing.services[billing.service("default", "billing").unwrap()].virtual_ip.expect("assigned");
        let everything = world.view(None, &world.services.keys().cloned().collect());
        let all = weft_model::compile(&weft_model::parse_documents("view", &everything.text).unwrap(), "default");
        assert_eq!(all.services[all.service("default", "billing").unwrap()].virtual_ip, Some(address));
        // A captured connection's destination names what is there: a virtual IP (or its
        // twin) its Service, a workload's address the Services selecting it.
        for subscription in [format!("ip/{address}"), format!("ip/{}", virtual_ip::ipv6_twin(address))] {
            let view = world.view(None, &BTreeSet::from([subscription.clone()]));
            assert!(names(&view).contains(&"Service billing".to_string()), "{subscription}: {:?}", names(&view));
            assert!(view.missing.is_empty());
        }
        let by_workload = world.view(None, &BTreeSet::from(["ip/127.0.0.1".to_string()]));
        let names = names(&by_workload);
        assert!(names.contains(&"Service billing".to_string()) && names.contains(&"Service reviews-v2".to_string()));
        let nothing = world.view(None, &BTreeSet::from(["ip/192.0.2.1".to_string()]));
        assert_eq!(nothing.missing, ["ip/192.0.2.1"]);
    }
}
