//! What the fuzz targets check beyond "no panic": properties a compiled snapshot must
//! have whatever documents it came from.

use std::sync::OnceLock;

use weft_model::{snapshot::BackendTarget, Resource, ResourceKind, Snapshot};

/// The namespace every target compiles in.
pub const NAMESPACE: &str = "default";

/// A real configuration of Services, Workloads, routes and policies (`seeds/routes.yaml`).
pub const ROUTES: &str = include_str!("../seeds/routes.yaml");

/// [`ROUTES`] compiled once, for the targets that route or look hosts up through it.
pub fn routes_snapshot() -> &'static Snapshot {
    static SNAPSHOT: OnceLock<Snapshot> = OnceLock::new();
    SNAPSHOT.get_or_init(|| {
        let resources = weft_model::parse_documents("routes.yaml", ROUTES).expect("the route seed is valid");
        weft_model::compile(&resources, NAMESPACE)
    })
}

/// Checks `snapshot` against the `resources` the validator accepted: every accepted
/// Service is compiled and found by its host name, every resolved backend points at a
/// Service port that exists, every route names its source, and the snapshot renders as
/// the JSON `/config` serves.
pub fn check_snapshot(resources: &[Resource], snapshot: &Snapshot) {
    let services = resources.iter().filter(|r| r.kind() == ResourceKind::Service).count();
    assert_eq!(snapshot.services.len(), services, "every accepted Service is compiled, once");
    for service in &snapshot.services {
        let host = format!("{}.{}", service.name, service.namespace);
        assert!(snapshot.service(&service.namespace, &service.name).is_some(), "{host} is found");
        for port in &service.ports {
            for rule in port.routes.iter().flatten() {
                assert!(!rule.action.route.is_empty(), "a route rule names its route");
                for backend in &rule.action.backends {
                    if let BackendTarget::Resolved { service, port } = backend.target {
                        let target = snapshot.services.get(service).expect("a resolved backend's Service exists");
                        assert!(target.ports.get(port).is_some(), "a resolved backend's port exists");
                    }
                }
            }
        }
    }
    serde_json::to_string(snapshot).expect("a snapshot renders as JSON");
}
