//! What each proxy is sent: the part of the desired state it needs, as documents.
//!
//! A proxy needs its own Service (for its inbound side) and the Services it calls, which
//! it names as it first calls them; for each of those, the routes attached to it, the
//! Services those routes send to (recursively), the TrafficPolicies of all of them, and the
//! Workloads their selectors pick. Registered workloads join as Workloads; a service that
//! has registrations but no Service resource gets one made up (selector `app: NAME`, the
//! port the registrations declare), so that it is reachable before an operator writes one.
//! An explicit Service of that name always wins.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::json;
use weft_model::{resource::ResourceSpec, Resource};

use crate::registry::Registered;

/// The desired state plus registrations, indexed for computing views.
pub struct World {
    resources: Vec<Resource>,
    documents: Vec<serde_json::Value>,
}

/// One proxy's view.
#[derive(Debug, PartialEq)]
pub struct View {
    /// Multi-document YAML (JSON documents separated by `---`).
    pub text: String,
    /// Subscribed services that do not exist.
    pub missing: Vec<String>,
}

impl World {
    /// Builds the world from stored documents and registrations. Only healthy
    /// registrations become endpoints.
    pub fn new(stored: Vec<(Resource, serde_json::Value)>, registered: &[Registered]) -> Self {
        let mut resources = Vec::with_capacity(stored.len() + registered.len());
        let mut documents = Vec::with_capacity(stored.len() + registered.len());
        let mut services: BTreeSet<(String, String)> = BTreeSet::new();
        for (resource, document) in stored {
            if matches!(resource.spec, ResourceSpec::Service(_)) {
                services.insert((resource.metadata.namespace.clone(), resource.metadata.name.clone()));
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
            if !services.contains(&key) {
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
        World { resources, documents }
    }

    /// Every resource, for describing and listing.
    pub fn resources(&self) -> &[Resource] {
        &self.resources
    }

    /// The view of a proxy that serves `own` (if any) and calls `subscriptions`, each
    /// `namespace/name`.
    pub fn view(&self, own: Option<&str>, subscriptions: &BTreeSet<String>) -> View {
        let mut wanted: Vec<String> =
            own.into_iter().map(str::to_string).chain(subscriptions.iter().cloned()).collect();
        let mut services: BTreeSet<String> = BTreeSet::new();
        let mut include = vec![false; self.resources.len()];
        while let Some(service) = wanted.pop() {
            if !services.insert(service.clone()) {
                continue;
            }
            let Some((namespace, name)) = service.split_once('/') else { continue };
            for (i, resource) in self.resources.iter().enumerate() {
                let meta = &resource.metadata;
                match &resource.spec {
                    ResourceSpec::Service(_) if meta.namespace == namespace && meta.name == name => include[i] = true,
                    ResourceSpec::HttpRoute(_) | ResourceSpec::GrpcRoute(_) => {
                        let (parents, backends) = route_refs(resource);
                        if parents.iter().any(|p| p == &service) {
                            include[i] = true;
                            wanted.extend(backends);
                        }
                    }
                    ResourceSpec::TrafficPolicy(spec) => {
                        let target_ns = spec.target_ref.namespace.as_deref().unwrap_or(&meta.namespace);
                        if target_ns == namespace && spec.target_ref.name == name {
                            include[i] = true;
                        }
                    }
                    _ => {}
                }
            }
        }
        // Workloads picked by an included Service's selector.
        let selectors: Vec<(&str, &BTreeMap<String, String>)> = self
            .resources
            .iter()
            .enumerate()
            .filter(|(i, _)| include[*i])
            .filter_map(|(_, r)| match &r.spec {
                ResourceSpec::Service(spec) if !spec.selector.is_empty() => {
                    Some((r.metadata.namespace.as_str(), &spec.selector))
                }
                _ => None,
            })
            .collect();
        for (i, resource) in self.resources.iter().enumerate() {
            if let ResourceSpec::Workload(spec) = &resource.spec {
                include[i] = selectors.iter().any(|(ns, selector)| {
                    *ns == resource.metadata.namespace && selector.iter().all(|(k, v)| spec.labels.get(k) == Some(v))
                });
            }
        }
        let existing: BTreeSet<String> = self
            .resources
            .iter()
            .filter(|r| matches!(r.spec, ResourceSpec::Service(_)))
            .map(|r| format!("{}/{}", r.metadata.namespace, r.metadata.name))
            .collect();
        let missing = subscriptions.iter().filter(|s| !existing.contains(*s)).cloned().collect();
        let text = self
            .documents
            .iter()
            .zip(&include)
            .filter(|(_, included)| **included)
            .map(|(document, _)| document.to_string())
            .collect::<Vec<_>>()
            .join("\n---\n");
        View { text, missing }
    }
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
fn route_refs(resource: &Resource) -> (Vec<String>, Vec<String>) {
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
