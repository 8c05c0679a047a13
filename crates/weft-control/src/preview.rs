//! What a change would touch, before it is made: the preview a dry run answers with.
//!
//! The control plane builds the world as it would be after the change and compares, for
//! every proxy connected to this replica, the view it would be sent with the view it has:
//! a proxy whose view changes is one the change reaches. Beside them, the Services whose
//! behaviour the change concerns (a route's parents and backends, a policy's target, a
//! Service itself) and the routes attached to those Services. An operator sees the blast
//! radius of an edit before applying it, instead of after.

use std::collections::BTreeSet;

use serde::Serialize;
use weft_model::{resource::ResourceSpec, ParsedDocument, Resource};

use crate::{
    discovery::Hub,
    views::{route_refs, World},
};

/// The preview of one change.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Preview {
    /// `namespace/name` of the Services the changed documents concern.
    pub services: BTreeSet<String>,
    /// `Kind namespace/name` of the routes attached to those Services, after the change.
    pub routes: BTreeSet<String>,
    /// `namespace/proxy id` of the proxies (on this replica) whose view would change.
    pub proxies: BTreeSet<String>,
    /// Proxies on this replica whose view would not change.
    pub proxies_unchanged: usize,
    /// Whether a MeshConfig is among the changes: it is in every proxy's view.
    pub mesh_wide: bool,
}

/// What applying `changed` to the current state would touch.
pub fn preview(hub: &Hub, changed: &[ParsedDocument]) -> Preview {
    let (_, mut documents) = hub.catalog.documents();
    for document in changed {
        let key = identity(&document.resource);
        match documents.iter_mut().find(|(resource, _)| identity(resource) == key) {
            Some(slot) => *slot = (document.resource.clone(), document.document.clone()),
            None => documents.push((document.resource.clone(), document.document.clone())),
        }
    }
    let stored = crate::virtual_ips::stored(&crate::virtual_ips::records(&hub.catalog));
    let after = World::new(documents, &hub.registry.entries(), &stored);
    let before = hub.world();
    let mut preview = Preview::default();
    for document in changed {
        concerned(&document.resource, &mut preview);
    }
    for resource in after.resources() {
        let (parents, _) = route_refs(resource);
        if parents.iter().any(|parent| preview.services.contains(parent)) {
            preview.routes.insert(format!(
                "{} {}/{}",
                resource.kind().as_str(),
                resource.metadata.namespace,
                resource.metadata.name
            ));
        }
    }
    for proxy in hub.proxies() {
        let own = proxy.service.as_ref().map(|service| format!("{}/{service}", proxy.namespace));
        let was = before.view(own.as_deref(), &proxy.subscribed);
        let will = after.view(own.as_deref(), &proxy.subscribed);
        if was.text != will.text || was.missing != will.missing {
            preview.proxies.insert(format!("{}/{}", proxy.namespace, proxy.proxy_id));
        } else {
            preview.proxies_unchanged += 1;
        }
    }
    preview
}

fn identity(resource: &Resource) -> (&'static str, &str, &str) {
    (resource.kind().as_str(), resource.metadata.namespace.as_str(), resource.metadata.name.as_str())
}

/// Adds the Services `resource` concerns to `preview`.
fn concerned(resource: &Resource, preview: &mut Preview) {
    let namespace = &resource.metadata.namespace;
    let qualified = |other: &Option<String>, name: &str| format!("{}/{name}", other.as_deref().unwrap_or(namespace));
    match &resource.spec {
        ResourceSpec::Service(_) => {
            preview.services.insert(format!("{namespace}/{}", resource.metadata.name));
        }
        ResourceSpec::TrafficPolicy(spec) if spec.target_ref.kind == "Service" => {
            preview.services.insert(qualified(&spec.target_ref.namespace, &spec.target_ref.name));
        }
        ResourceSpec::AuthorizationPolicy(spec) if spec.target_ref.kind == "Service" => {
            preview.services.insert(qualified(&spec.target_ref.namespace, &spec.target_ref.name));
        }
        ResourceSpec::MeshConfig(_) | ResourceSpec::ExternalService(_) => preview.mesh_wide = true,
        _ => {
            let (parents, backends) = route_refs(resource);
            preview.services.extend(parents);
            preview.services.extend(backends);
        }
    }
}
