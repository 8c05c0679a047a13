//! `AuthorizationPolicy` and `MeshConfig`: who may call a Service, and the mesh-wide
//! defaults (trust domain, mutual TLS mode, the decision when no policy applies).
//!
//! The shapes follow Istio's AuthorizationPolicy, which operators know: a policy targets
//! one Service, has an action, and rules; a rule matches when any of its sources, any of
//! its operations and all of its conditions match. A rule `{}` matches every request; a
//! policy with no rules matches none (so an ALLOW policy with no rules allows nothing).

use serde::{Deserialize, Serialize};

use super::PolicyTargetRef;

/// Who may call a Service.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// The Service whose inbound requests the policy judges.
    pub target_ref: PolicyTargetRef,
    pub action: AuthorizationAction,
    #[serde(default)]
    pub rules: Vec<AuthorizationRule>,
}

/// What a matching policy does. DENY policies are judged before ALLOW ones.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub enum AuthorizationAction {
    #[serde(rename = "ALLOW")]
    Allow,
    #[serde(rename = "DENY")]
    Deny,
}

/// One rule: any source, any operation, every condition.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationRule {
    /// Who calls (any of them); empty: anyone.
    #[serde(default)]
    pub from: Vec<AuthorizationSource>,
    /// What is called (any of them); empty: anything.
    #[serde(default)]
    pub to: Vec<AuthorizationOperation>,
    /// Request header conditions, all of which must hold.
    #[serde(default)]
    pub when: Vec<HeaderCondition>,
}

/// A caller, by mesh identity. Both lists, where given, must match.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationSource {
    /// SPIFFE IDs: exact, `*` (any authenticated caller), `prefix*` or `*suffix`.
    #[serde(default)]
    pub principals: Vec<String>,
    /// The caller's namespace (from its SPIFFE ID): exact or `*`.
    #[serde(default)]
    pub namespaces: Vec<String>,
}

/// A request, by method, path and port. Each list, where given, must match.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationOperation {
    /// HTTP methods, exact (`GET`).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Paths, exact or `prefix*`, matched after normalisation (`..`, `.`, `//` resolved;
    /// percent-encoded slashes refused).
    #[serde(default)]
    pub paths: Vec<String>,
    /// The Service ports called.
    #[serde(default)]
    pub ports: Vec<u16>,
}

/// A request header that must have one of `values` (exact, or `prefix*`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderCondition {
    pub header: String,
    pub values: Vec<String>,
}

/// The one mesh-wide configuration, named `mesh`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshConfigSpec {
    /// Must be the trust domain the CA was made with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<String>,
    #[serde(default)]
    pub mtls: MtlsMode,
    #[serde(default)]
    pub default_policy: DefaultPolicy,
    /// Distributed tracing; off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<super::MeshTracingSpec>,
    /// Access logging; off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<super::MeshAccessLogSpec>,
    /// Where Services' derived virtual IPs come from (IPv4 CIDR); 240.240.0.0/16 when
    /// absent.
    #[serde(default, rename = "virtualIPRange", skip_serializing_if = "Option::is_none")]
    pub virtual_ip_range: Option<String>,
    /// What a captured connection to an address the mesh does not know gets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound_traffic_policy: Option<OutboundTrafficPolicySpec>,
}

/// MeshConfig's `outboundTrafficPolicy`, as Istio spells it.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutboundTrafficPolicySpec {
    #[serde(default)]
    pub mode: OutboundTrafficMode,
}

/// Whether captured traffic may leave the mesh for destinations it does not know.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum OutboundTrafficMode {
    /// Passed through to the original destination, and counted.
    #[default]
    #[serde(rename = "ALLOW_ANY")]
    AllowAny,
    /// Refused and counted.
    #[serde(rename = "REGISTRY_ONLY")]
    RegistryOnly,
}

/// Whether inbound listeners accept plaintext.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum MtlsMode {
    /// Mutual TLS and plaintext both (to migrate unmeshed clients).
    #[default]
    #[serde(rename = "PERMISSIVE")]
    Permissive,
    /// Mutual TLS only.
    #[serde(rename = "STRICT")]
    Strict,
}

/// The decision for a Service no AuthorizationPolicy targets.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DefaultPolicy {
    #[default]
    Allow,
    Deny,
    /// Any caller with a valid mesh identity.
    Authenticated,
}
