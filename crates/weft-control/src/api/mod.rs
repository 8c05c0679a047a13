//! The HTTP API (`/api/v1`, JSON) that the CLI and the dashboard use.
//!
//! One security model for every caller: each call presents an operator token
//! ([`auth`]) or a dashboard session made with one, reads need the `viewer` role and changes `admin`; only the liveness
//! endpoint answers without one. Every change lands in the audit log with the token that
//! made it. The API is served over HTTPS (`crate::api_tls`).
//!
//! Writes take YAML text exactly as `weft apply` reads it from files, so that the server
//! judges every document with the same parser the proxies use, and names the source, the
//! document and the field path in its refusal. [`resources`] serves the resources,
//! [`operations`] tokens, revocations, the CA and the audit log, [`proxies`] the
//! connected proxies and workloads (and Prometheus's service discovery of them),
//! [`stat`] the golden signals, [`topology`] the dashboard's graph of them, [`tap`] live requests, [`session`] the
//! dashboard's logins; [`body`] reads write bodies within their limit. The dashboard's
//! pages ([`crate::dashboard`]) are served beside them.
//! `/metrics` (viewer) counts responses by status and refused discovery streams.

mod auth;
mod body;
mod operations;
mod proxies;
mod resources;
mod session;
mod stat;
mod tap;
mod topology;

use std::sync::Arc;

use axum::{
    extract::{FromRef, State},
    http::StatusCode,
    middleware,
    response::{IntoResponse, Response},
    routing::{delete, get, post},
    Json, Router,
};
use serde_json::json;

use crate::{
    catalog::{Catalog, CatalogError},
    discovery::Hub,
    operator_tokens::{BadTokenLimiter, Role},
};

/// What the handlers share.
#[derive(Clone)]
struct AppState {
    catalog: Arc<Catalog>,
    hub: Arc<Hub>,
    bad_tokens: Arc<BadTokenLimiter>,
}

impl FromRef<AppState> for Arc<Catalog> {
    fn from_ref(state: &AppState) -> Self {
        state.catalog.clone()
    }
}

impl FromRef<AppState> for Arc<Hub> {
    fn from_ref(state: &AppState) -> Self {
        state.hub.clone()
    }
}

/// Builds the router over `hub` (and its catalog).
pub fn router(hub: Arc<Hub>) -> Router {
    let state = AppState { catalog: hub.catalog.clone(), hub, bad_tokens: Arc::default() };
    let reads = Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/resources", get(resources::list_all))
        .route("/api/v1/resources/{kind}", get(resources::list_kind))
        .route("/api/v1/resources/{kind}/{namespace}/{name}", get(resources::get_one))
        .route("/api/v1/services/{namespace}/{name}/describe", get(resources::describe))
        .route("/api/v1/authz/matrix", get(resources::authz_matrix))
        .route("/api/v1/workloads/{namespace}/{name}/describe", get(proxies::describe_workload))
        .route("/api/v1/proxies", get(proxies::proxies))
        .route("/api/v1/prometheus/targets", get(proxies::prometheus_targets))
        .route("/api/v1/stat/{view}", get(stat::stat))
        .route("/api/v1/tap", get(tap::tap))
        .route("/api/v1/ca/bundle", get(ca_bundle))
        .route("/api/v1/history", get(operations::history))
        .route("/api/v1/revocations", get(operations::list_revocations))
        .route("/api/v1/whoami", get(operations::whoami))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state((state.clone(), Role::Viewer), auth::require));
    let changes = Router::new()
        .route("/api/v1/apply", post(resources::apply))
        .route("/api/v1/revert", post(resources::revert))
        .route("/api/v1/delete", post(resources::delete_documents))
        .route("/api/v1/resources/{kind}/{namespace}/{name}", delete(resources::delete_one))
        .route("/api/v1/tokens", post(operations::create_token).get(operations::list_tokens))
        .route("/api/v1/tokens/{id}", delete(operations::revoke_token))
        .route("/api/v1/revocations", post(operations::revoke))
        .route("/api/v1/revocations/{id}", delete(operations::undo_revocation))
        .route("/api/v1/ca/rotate", post(operations::rotate_ca))
        .route("/api/v1/ca/rotation/finish", post(operations::finish_rotation))
        .route_layer(middleware::from_fn_with_state((state.clone(), Role::Admin), auth::require));
    // The topology is the dashboard's largest answer (1,000 services, 10,000 edges),
    // and its pages are text: both go gzipped to a client that takes it. At gzip's
    // fastest level: the topology comes every few seconds, and on 1,000 Services the
    // default level spent about 20 ms of CPU a refresh where the fastest spends 2, for
    // 53 KB instead of 88.
    let topology = Router::new()
        .route("/api/v1/topology", get(topology::topology))
        .route_layer(middleware::from_fn_with_state((state.clone(), Role::Viewer), auth::require))
        .merge(crate::dashboard::router())
        .layer(tower_http::compression::CompressionLayer::new().quality(tower_http::CompressionLevel::Fastest));
    Router::new()
        // Liveness only: it says nothing about the mesh, so it needs no token.
        .route("/api/v1/live", get(|| async { Json(json!({"live": true})) }))
        // Logging in and out need no token: they are how a browser gets and drops one.
        .route("/api/v1/session", post(session::login).get(session::current).delete(session::logout))
        .merge(topology)
        .merge(reads)
        .merge(changes)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such API path; see README, HTTP API") })
        .layer(middleware::from_fn_with_state(state.clone(), count_response))
        .with_state(state)
}

/// A refusal: `{"error": "...", "details": [...]}` with a fitting status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    details: Vec<String>,
    /// Refused documents, each with its source, document, field, line and column (for
    /// an editor to mark), beside `details`' text.
    errors: Option<Box<serde_json::Value>>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), details: Vec::new(), errors: None }
    }
}

impl From<CatalogError> for ApiError {
    fn from(error: CatalogError) -> Self {
        match error {
            CatalogError::Invalid(errors) => ApiError {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                message: format!("refused: {} invalid document(s); nothing was changed", errors.0.len()),
                details: errors.0.iter().map(ToString::to_string).collect(),
                errors: serde_json::to_value(&errors.0).ok().map(Box::new),
            },
            CatalogError::Empty(message) => ApiError::new(StatusCode::BAD_REQUEST, message),
            CatalogError::NotFound(key) => ApiError::new(StatusCode::NOT_FOUND, format!("{key} not found")),
            CatalogError::Store(error) => store_failure(error),
        }
    }
}

/// A store failure, logged; the caller is told nothing changed.
fn store_failure(error: impl std::fmt::Display) -> ApiError {
    tracing::error!(%error, "store failure");
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("{error}; nothing was changed"))
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": self.message, "details": self.details});
        if let Some(errors) = self.errors {
            body["errors"] = *errors;
        }
        (self.status, Json(body)).into_response()
    }
}

/// The control plane's own metrics, in Prometheus text format.
async fn metrics(State(hub): State<Arc<Hub>>) -> impl IntoResponse {
    hub.metrics.connected_proxies.set(hub.local_proxy_count() as i64);
    hub.metrics.tap_sessions.set(hub.taps.session_count() as i64);
    let (series, bytes) = hub.aggregator.footprint();
    hub.metrics.telemetry_series.set(series as i64);
    hub.metrics.telemetry_bytes.set(bytes as i64);
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], hub.metrics.encode())
}

/// Counts every response by status, refusals included (they are how a hostile or broken
/// client shows up).
async fn count_response(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    let response = next.run(request).await;
    let labels = crate::metrics::ApiResponseLabels { status: response.status().as_u16() };
    state.hub.metrics.api_responses.get_or_create(&labels).inc();
    response
}

/// The mesh's root certificates (`{"bundle": PEM}`): what Prometheus (or any client that
/// is not the CLI) needs to verify the API's certificate when the mesh CA issued it.
/// `weft ca bundle` prints the PEM.
async fn ca_bundle(State(hub): State<Arc<Hub>>) -> Json<serde_json::Value> {
    Json(json!({"bundle": hub.trust_bundle(), "caRoots": hub.ca().root_hashes()}))
}

async fn status(State(hub): State<Arc<Hub>>) -> Json<serde_json::Value> {
    let cluster = hub.registry.cluster();
    let replicas = cluster.replicas().await.unwrap_or_else(|error| {
        tracing::warn!(%error, "cannot list control-plane replicas");
        Vec::new()
    });
    let leader = cluster.leadership().borrow().is_some();
    let ca = hub.ca();
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "store": hub.catalog.store_description(),
        "revision": hub.catalog.revision(),
        "replica": cluster.replica(),
        "trustDomain": ca.authority.trust_domain().as_str(),
        "caRoot": ca.authority.root_hash(),
        "caRoots": ca.root_hashes(),
        "caRotatedAt": ca.rotated_at,
        "leader": leader,
        "replicas": replicas,
    }))
}
