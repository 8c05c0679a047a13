//! The connected proxies (on every replica) and `describe workload` (with, for a proxy
//! held by this replica, the configuration it is sent, as YAML).

use std::sync::Arc;

use axum::{
    extract::{Path, Query, State},
    http::StatusCode,
    Json,
};
use serde::Deserialize;
use serde_json::json;

use super::ApiError;
use crate::discovery::{Hub, ProxyRecord};

#[derive(Deserialize)]
pub(super) struct ProxiesParams {
    /// `local`: only the proxies whose streams this replica holds.
    scope: Option<String>,
}

/// Every connected proxy: those on this replica, and those on every other replica,
/// asked through its API. A replica that cannot be asked is named in
/// `unreachableReplicas`, with its proxies listed from presence alone.
pub(super) async fn proxies(
    State(hub): State<Arc<Hub>>,
    Query(params): Query<ProxiesParams>,
) -> Json<serde_json::Value> {
    if params.scope.as_deref() == Some("local") {
        return Json(json!({"items": hub.proxies()}));
    }
    let (items, unreachable) = every_proxy(&hub).await;
    Json(json!({"items": items, "unreachableReplicas": unreachable}))
}

/// The proxies of every replica (asked through their APIs), and the replicas that did
/// not answer (their proxies as presence knows them).
async fn every_proxy(hub: &Hub) -> (Vec<ProxyRecord>, Vec<serde_json::Value>) {
    let mut items = hub.proxies();
    let cluster = hub.registry.cluster();
    let mut unreachable = Vec::new();
    for replica in cluster.replicas().await.unwrap_or_default() {
        if replica.id == cluster.replica() {
            continue;
        }
        match crate::replicas::peer_proxies(hub, &replica.grpc).await {
            Ok(mut found) => items.append(&mut found),
            Err(reason) => {
                tracing::warn!(replica = %replica.id, grpc = %replica.grpc, %reason, "cannot list the proxies of another replica");
                unreachable.push(json!({"replica": replica.id, "grpc": replica.grpc, "reason": reason}));
                items.extend(present_on(hub, &replica.id));
            }
        }
    }
    items.sort_by(|a, b| (&a.namespace, &a.proxy_id).cmp(&(&b.namespace, &b.proxy_id)));
    (items, unreachable)
}

/// `GET /api/v1/prometheus/targets`: every connected proxy's admin address, in
/// Prometheus's HTTP service-discovery format, labelled with its namespace, Service,
/// workload (proxy id) and zone, and the replica that holds it. Prometheus presents a
/// viewer token as its bearer credential (`http_sd_configs.authorization`).
pub(super) async fn prometheus_targets(State(hub): State<Arc<Hub>>) -> Json<serde_json::Value> {
    let (proxies, _) = every_proxy(&hub).await;
    let zones: std::collections::HashMap<(String, String), Option<String>> = hub
        .registry
        .entries()
        .into_iter()
        .map(|e| ((e.registration.namespace, e.registration.proxy_id), e.registration.zone))
        .collect();
    let groups: Vec<serde_json::Value> = proxies
        .into_iter()
        .filter_map(|proxy| {
            let address = proxy.admin_address.clone()?;
            let zone = zones.get(&(proxy.namespace.clone(), proxy.proxy_id.clone())).cloned().flatten();
            Some(json!({
                "targets": [address],
                "labels": {
                    "namespace": proxy.namespace,
                    "service": proxy.service.unwrap_or_default(),
                    "workload": proxy.proxy_id,
                    "zone": zone.unwrap_or_default(),
                    "control_plane": proxy.control_plane,
                },
            }))
        })
        .collect();
    Json(serde_json::Value::Array(groups))
}

/// One workload: its resource (registered or declared), its registration's health, and
/// its proxy with the identity and certificate it presents.
pub(super) async fn describe_workload(
    State(hub): State<Arc<Hub>>,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let world = hub.world();
    let resource = world
        .resources()
        .iter()
        .find(|r| {
            r.kind() == weft_model::ResourceKind::Workload
                && r.metadata.namespace == namespace
                && r.metadata.name == name
        })
        .cloned();
    let registered = hub
        .registry
        .entries()
        .into_iter()
        .find(|e| e.registration.namespace == namespace && e.registration.proxy_id == name);
    let (proxies, _) = every_proxy(&hub).await;
    let proxy = proxies.into_iter().find(|p| p.namespace == namespace && p.proxy_id == name);
    if resource.is_none() && registered.is_none() && proxy.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("workload {namespace}/{name} not found (see weft get workloads, weft get proxies)"),
        ));
    }
    let registration = registered.map(|e| {
        json!({
            "service": e.registration.service,
            "address": e.registration.address,
            "healthy": e.healthy,
            "health": e.health_detail,
            "identity": e.registration.identity,
        })
    });
    // The configuration it runs: the view this replica sends it, as YAML (a proxy held
    // by another replica is described by that one).
    let configuration = hub.proxies().into_iter().find(|p| p.namespace == namespace && p.proxy_id == name).map(|p| {
        let own = p.service.as_ref().map(|service| format!("{}/{service}", p.namespace));
        let view = world.view(own.as_deref(), &p.subscribed);
        let yaml: Vec<String> = view
            .text
            .split("\n---\n")
            .filter_map(|text| serde_json::from_str::<serde_json::Value>(text).ok())
            .filter_map(|document| serde_norway::to_string(&document).ok())
            .collect();
        json!({"version": p.sent_version, "applied": p.applied_version, "yaml": yaml.join("---\n"), "missing": view.missing})
    });
    Ok(Json(json!({
        "workload": {
            "namespace": namespace,
            "name": name,
            "resource": resource,
            "registration": registration,
            "proxy": proxy,
            "configuration": configuration,
        }
    })))
}

/// What presence says of the proxies attached to `replica`.
fn present_on(hub: &Hub, replica: &str) -> Vec<ProxyRecord> {
    let presence = hub.registry.cluster().presence().borrow().clone();
    hub.registry
        .entries()
        .into_iter()
        .filter(|entry| {
            presence.get(&entry.registration.key()).is_some_and(|token| token.split('/').next() == Some(replica))
        })
        .map(|entry| ProxyRecord {
            proxy_id: entry.registration.proxy_id,
            namespace: entry.registration.namespace,
            service: Some(entry.registration.service),
            address: Some(entry.registration.address),
            proxy_version: String::new(),
            control_plane: replica.to_string(),
            connected_at: 0,
            subscriptions: 0,
            sent_version: String::new(),
            applied_version: String::new(),
            last_nack: None,
            identity: entry.registration.identity,
            certificate: None,
            admin_address: None,
            stream: 0,
            last_report: 0,
            view_services: Default::default(),
            subscribed: Default::default(),
        })
        .collect()
}
