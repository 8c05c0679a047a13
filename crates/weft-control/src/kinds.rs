//! The names operators type for kinds (`svc`, `services`, `httproutes`, ...), shared by
//! the HTTP API and the CLI so that both accept exactly the same words.

use weft_model::ResourceKind;

/// Every kind, in the order `weft get all` lists them.
pub const ALL_KINDS: [ResourceKind; 8] = [
    ResourceKind::Service,
    ResourceKind::Workload,
    ResourceKind::HttpRoute,
    ResourceKind::GrpcRoute,
    ResourceKind::TrafficPolicy,
    ResourceKind::AuthorizationPolicy,
    ResourceKind::MeshConfig,
    ResourceKind::ExternalService,
];

/// Resolves a kind as typed on a command line or in a URL: the YAML name in any case,
/// its plural, or a short name (kubectl's habits).
pub fn parse_kind(word: &str) -> Result<ResourceKind, String> {
    let lower = word.to_ascii_lowercase();
    let kind = match lower.as_str() {
        "service" | "services" | "svc" => ResourceKind::Service,
        "workload" | "workloads" | "wl" => ResourceKind::Workload,
        "httproute" | "httproutes" => ResourceKind::HttpRoute,
        "grpcroute" | "grpcroutes" => ResourceKind::GrpcRoute,
        "trafficpolicy" | "trafficpolicies" | "tp" => ResourceKind::TrafficPolicy,
        "authorizationpolicy" | "authorizationpolicies" | "ap" => ResourceKind::AuthorizationPolicy,
        "meshconfig" | "meshconfigs" => ResourceKind::MeshConfig,
        "externalservice" | "externalservices" | "es" => ResourceKind::ExternalService,
        _ => {
            return Err(format!(
                "unknown kind {word:?}; use one of services (svc), workloads (wl), httproutes, grpcroutes, \
                 trafficpolicies (tp), authorizationpolicies (ap), meshconfigs, externalservices (es)"
            ))
        }
    };
    Ok(kind)
}

/// The plural used in URLs and table headings.
pub fn plural(kind: ResourceKind) -> &'static str {
    match kind {
        ResourceKind::Service => "services",
        ResourceKind::Workload => "workloads",
        ResourceKind::HttpRoute => "httproutes",
        ResourceKind::GrpcRoute => "grpcroutes",
        ResourceKind::TrafficPolicy => "trafficpolicies",
        ResourceKind::AuthorizationPolicy => "authorizationpolicies",
        ResourceKind::MeshConfig => "meshconfigs",
        ResourceKind::ExternalService => "externalservices",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_yaml_names_plurals_and_short_names() {
        for kind in ALL_KINDS {
            assert_eq!(parse_kind(kind.as_str()), Ok(kind));
            assert_eq!(parse_kind(plural(kind)), Ok(kind));
        }
        assert_eq!(parse_kind("svc"), Ok(ResourceKind::Service));
        assert!(parse_kind("pods").unwrap_err().contains("services (svc)"));
    }
}
