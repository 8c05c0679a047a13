//! The authorization matrix: which identity may call which Service, computed by the
//! control plane from the AuthorizationPolicies, MeshConfig's default and each Service's
//! mutual-TLS mode, as every proxy would judge their requests. The answer to "who can
//! reach the payments Service?" without reading every policy.
//!
//! The identities are those the mesh knows (every registered workload's, every
//! endpoint's), any the operator asks about, and a plaintext caller.

use std::collections::BTreeSet;

use serde::Serialize;
use weft_model::{
    authz::{Caller, Reach},
    snapshot::compile,
    spec::MtlsMode,
    spiffe::SpiffeId,
    Resource,
};

use crate::registry::Registered;

/// Every Service (of a namespace, or all) against every identity.
#[derive(Debug, Serialize)]
pub struct Matrix {
    /// The columns: SPIFFE IDs, then `null` for a plaintext caller.
    pub identities: Vec<Option<String>>,
    pub services: Vec<ServiceRow>,
}

/// One Service's row: a cell per identity, in the order of [`Matrix::identities`].
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRow {
    pub namespace: String,
    pub name: String,
    pub mtls: MtlsMode,
    pub cells: Vec<Reach>,
}

/// The matrix of `resources` (with `registered` workloads' identities and `asked`
/// ones), for the Services of `namespace` or of every namespace.
pub fn matrix(resources: &[Resource], registered: &[Registered], asked: &[String], namespace: Option<&str>) -> Matrix {
    let snapshot = compile(resources, namespace.unwrap_or("default"));
    let mut known: BTreeSet<String> = asked.iter().cloned().collect();
    known.extend(registered.iter().filter_map(|r| r.registration.identity.clone()));
    for service in &snapshot.services {
        for port in &service.ports {
            known.extend(port.endpoints.iter().filter_map(|e| e.identity.as_deref().map(str::to_string)));
        }
    }
    let identities: Vec<Option<String>> = known.into_iter().map(Some).chain([None]).collect();
    let callers: Vec<(Option<&str>, Option<String>)> = identities
        .iter()
        .map(|identity| {
            let namespace = identity.as_deref().and_then(|id| {
                SpiffeId::parse(id).ok().and_then(|id| id.workload_parts().map(|(ns, _)| ns.to_string()))
            });
            (identity.as_deref(), namespace)
        })
        .collect();
    let services = snapshot
        .services
        .iter()
        .filter(|service| namespace.is_none_or(|ns| service.namespace == ns))
        .map(|service| ServiceRow {
            namespace: service.namespace.clone(),
            name: service.name.clone(),
            mtls: service.mtls,
            cells: callers
                .iter()
                .map(|(principal, namespace)| match principal {
                    None if service.mtls == MtlsMode::Strict => {
                        Reach::None { policy: "(mTLS STRICT: plaintext refused)".into() }
                    }
                    _ => service.authorizer.reach(&Caller { principal: *principal, namespace: namespace.as_deref() }),
                })
                .collect(),
        })
        .collect();
    Matrix { identities, services }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources(yaml: &str) -> Vec<Resource> {
        weft_model::parse::parse_documents("test.yaml", yaml).expect("valid documents")
    }

    #[test]
    fn every_service_against_every_identity_and_a_plaintext_caller() {
        let documents = resources(
            r#"
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: reviews}
spec: {selector: {app: reviews}, ports: [{port: 80}]}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: payments, namespace: shop}
spec: {selector: {app: payments}, ports: [{port: 80}], mtls: STRICT}
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: reviews-readers}
spec:
  targetRef: {kind: Service, name: reviews}
  action: ALLOW
  rules:
  - from: [{principals: ["spiffe://weft.local/ns/default/sa/web"]}]
    to: [{methods: [GET]}]
  - from: [{namespaces: [ops]}]
"#,
        );
        let asked = ["spiffe://weft.local/ns/default/sa/web".to_string(), "spiffe://weft.local/ns/ops/sa/admin".into()];
        let all = matrix(&documents, &[], &asked, None);
        assert_eq!(all.identities, [Some(asked[0].clone()), Some(asked[1].clone()), None], "sorted, then plaintext");
        let row = |name: &str| all.services.iter().find(|s| s.name == name).expect("a row");
        assert_eq!(
            row("reviews").cells,
            [
                Reach::Some { allow: vec!["default/reviews-readers".into()], deny: vec![] },
                Reach::All { policy: Some("default/reviews-readers".into()) },
                Reach::None { policy: "(no ALLOW policy matched)".into() },
            ]
        );
        assert_eq!(row("payments").mtls, MtlsMode::Strict);
        assert_eq!(row("payments").cells[0], Reach::All { policy: None }, "no policy, the default allows");
        assert_eq!(row("payments").cells[2], Reach::None { policy: "(mTLS STRICT: plaintext refused)".into() });

        let shop = matrix(&documents, &[], &[], Some("shop"));
        assert_eq!(shop.services.len(), 1);
        assert_eq!(shop.services[0].name, "payments");
        assert_eq!(shop.identities, [None], "no identity known but the plaintext caller's");
    }
}
