//! The Kubernetes-style envelope (`apiVersion`, `kind`, `metadata`, `spec`) and the set of
//! kinds weft understands.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::spec::{
    AuthorizationPolicySpec, ExternalServiceSpec, GrpcRouteSpec, HttpRouteSpec, MeshConfigSpec, ServiceSpec,
    TrafficPolicySpec, WorkloadSpec,
};

/// The API group of weft's own kinds.
pub const WEFT_API_VERSION: &str = "weft.dev/v1alpha1";
/// The Gateway API version whose field names and semantics the route kinds keep.
pub const GATEWAY_API_VERSION: &str = "gateway.networking.k8s.io/v1";

/// `metadata` of every resource.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Metadata {
    /// Unique within its kind and namespace.
    pub name: String,
    /// Defaults to [`crate::DEFAULT_NAMESPACE`].
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Free-form labels; informational for every kind today.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Free-form annotations; informational.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

fn default_namespace() -> String {
    crate::DEFAULT_NAMESPACE.to_string()
}

/// The kinds weft implements, each with its `apiVersion`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum ResourceKind {
    Service,
    Workload,
    #[serde(rename = "HTTPRoute")]
    HttpRoute,
    #[serde(rename = "GRPCRoute")]
    GrpcRoute,
    TrafficPolicy,
    AuthorizationPolicy,
    MeshConfig,
    ExternalService,
}

/// The name of the one MeshConfig.
pub const MESH_CONFIG_NAME: &str = "mesh";

impl ResourceKind {
    /// The kind's name as written in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::Service => "Service",
            ResourceKind::Workload => "Workload",
            ResourceKind::HttpRoute => "HTTPRoute",
            ResourceKind::GrpcRoute => "GRPCRoute",
            ResourceKind::TrafficPolicy => "TrafficPolicy",
            ResourceKind::AuthorizationPolicy => "AuthorizationPolicy",
            ResourceKind::MeshConfig => "MeshConfig",
            ResourceKind::ExternalService => "ExternalService",
        }
    }

    /// The `apiVersion` documents of this kind must carry.
    pub fn api_version(self) -> &'static str {
        match self {
            ResourceKind::HttpRoute | ResourceKind::GrpcRoute => GATEWAY_API_VERSION,
            _ => WEFT_API_VERSION,
        }
    }

    /// Looks a kind up by its YAML name; `Err` explains kinds that are known but not
    /// implemented yet, so the user learns why rather than seeing them vanish.
    pub fn from_name(kind: &str) -> Result<Self, String> {
        Ok(match kind {
            "Service" => ResourceKind::Service,
            "Workload" => ResourceKind::Workload,
            "HTTPRoute" => ResourceKind::HttpRoute,
            "GRPCRoute" => ResourceKind::GrpcRoute,
            "TrafficPolicy" => ResourceKind::TrafficPolicy,
            "AuthorizationPolicy" => ResourceKind::AuthorizationPolicy,
            "MeshConfig" => ResourceKind::MeshConfig,
            "ExternalService" => ResourceKind::ExternalService,
            other => {
                return Err(format!(
                    "unknown kind {other:?}; weft understands Service, Workload, HTTPRoute, \
                     GRPCRoute, TrafficPolicy, AuthorizationPolicy, MeshConfig and ExternalService"
                ))
            }
        })
    }
}

/// One parsed, validated resource.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Resource {
    pub metadata: Metadata,
    #[serde(flatten)]
    pub spec: ResourceSpec,
}

/// The typed `spec` of each kind.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(tag = "kind", content = "spec")]
pub enum ResourceSpec {
    Service(ServiceSpec),
    Workload(WorkloadSpec),
    #[serde(rename = "HTTPRoute")]
    HttpRoute(Box<HttpRouteSpec>),
    #[serde(rename = "GRPCRoute")]
    GrpcRoute(Box<GrpcRouteSpec>),
    TrafficPolicy(Box<TrafficPolicySpec>),
    AuthorizationPolicy(Box<AuthorizationPolicySpec>),
    MeshConfig(MeshConfigSpec),
    ExternalService(ExternalServiceSpec),
}

impl Resource {
    /// The resource's kind.
    pub fn kind(&self) -> ResourceKind {
        match self.spec {
            ResourceSpec::Service(_) => ResourceKind::Service,
            ResourceSpec::Workload(_) => ResourceKind::Workload,
            ResourceSpec::HttpRoute(_) => ResourceKind::HttpRoute,
            ResourceSpec::GrpcRoute(_) => ResourceKind::GrpcRoute,
            ResourceSpec::TrafficPolicy(_) => ResourceKind::TrafficPolicy,
            ResourceSpec::AuthorizationPolicy(_) => ResourceKind::AuthorizationPolicy,
            ResourceSpec::MeshConfig(_) => ResourceKind::MeshConfig,
            ResourceSpec::ExternalService(_) => ResourceKind::ExternalService,
        }
    }

    /// `namespace/name`, the key of a resource within its kind.
    pub fn key(&self) -> String {
        format!("{}/{}", self.metadata.namespace, self.metadata.name)
    }
}
