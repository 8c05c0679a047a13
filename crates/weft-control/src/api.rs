//! The HTTP API (`/api/v1`, JSON) that the CLI and the dashboard use.
//!
//! Writes take YAML text exactly as `weft apply` reads it from files, so that the server
//! judges every document with the same parser the proxies use, and names the source, the
//! document and the field path in its refusal.

use std::sync::Arc;

use axum::{
    extract::{FromRef, Path, Query, Request, State},
    http::{header, HeaderMap, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
    Json, Router,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use weft_model::ResourceKind;

use crate::{
    admin_token::AdminToken,
    catalog::{parse_sources, Catalog, CatalogError, Entry, Source},
    describe::describe_service,
    discovery::{Hub, ProxyRecord},
    join_tokens::{self, JoinTokenError},
    kinds::{parse_kind, plural},
    store::ObjectKey,
};

/// What the handlers share.
#[derive(Clone)]
struct AppState {
    catalog: Arc<Catalog>,
    hub: Arc<Hub>,
    admin: Arc<AdminToken>,
}

impl FromRef<AppState> for Arc<AdminToken> {
    fn from_ref(state: &AppState) -> Self {
        state.admin.clone()
    }
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

/// Builds the router over `hub` (and its catalog). Every call that changes the mesh needs
/// the admin token.
pub fn router(hub: Arc<Hub>, admin: Arc<AdminToken>) -> Router {
    let state = AppState { catalog: hub.catalog.clone(), hub, admin };
    let writes = Router::new()
        .route("/api/v1/apply", post(apply))
        .route("/api/v1/delete", post(delete_documents))
        .route("/api/v1/resources/{kind}/{namespace}/{name}", delete(delete_one))
        .route("/api/v1/tokens", post(create_token).get(list_tokens))
        .route("/api/v1/tokens/{id}", delete(revoke_token))
        .route("/api/v1/ca/rotate", post(rotate_ca))
        .route("/api/v1/ca/rotation/finish", post(finish_rotation))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin));
    Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/resources", get(list_all))
        .route("/api/v1/resources/{kind}", get(list_kind))
        .route("/api/v1/resources/{kind}/{namespace}/{name}", get(get_one))
        .route("/api/v1/services/{namespace}/{name}/describe", get(describe))
        .route("/api/v1/workloads/{namespace}/{name}/describe", get(describe_workload))
        .route("/api/v1/proxies", get(proxies))
        .merge(writes)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such API path; see README, HTTP API") })
        .with_state(state)
}

/// `POST /api/v1/tokens` body.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TokenRequest {
    service: String,
    #[serde(default)]
    namespace: Option<String>,
    /// Defaults to the service's name.
    #[serde(default)]
    service_account: Option<String>,
    /// A duration such as `720h`.
    #[serde(default)]
    ttl: Option<String>,
}

async fn create_token(State(hub): State<Arc<Hub>>, Json(request): Json<TokenRequest>) -> Result<Response, ApiError> {
    let ttl = match &request.ttl {
        Some(text) => text
            .parse::<weft_model::GoDuration>()
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("ttl {text:?}: {e}")))?
            .get(),
        None => join_tokens::DEFAULT_TTL,
    };
    let namespace = request.namespace.as_deref().unwrap_or(weft_model::DEFAULT_NAMESPACE);
    let account = request.service_account.as_deref().unwrap_or(&request.service);
    let ca = hub.ca();
    let authority = &ca.authority;
    let made = join_tokens::create(
        &hub.catalog,
        authority.trust_domain(),
        &authority.root_hash(),
        namespace,
        account,
        ttl,
        std::time::SystemTime::now(),
    )
    .await
    .map_err(token_error)?;
    Ok(Json(made).into_response())
}

/// `POST /api/v1/ca/rotation/finish` query.
#[derive(Deserialize)]
struct FinishParams {
    #[serde(default)]
    force: bool,
}

fn rotation_answer(ca: &crate::ca::CaState) -> Json<serde_json::Value> {
    Json(json!({"caRoot": ca.authority.root_hash(), "caRoots": ca.root_hashes(), "caRotatedAt": ca.rotated_at}))
}

async fn rotate_ca(State(hub): State<Arc<Hub>>) -> Result<Json<serde_json::Value>, ApiError> {
    let ca = hub
        .keeper
        .rotate(&hub.catalog, &hub.ca(), std::time::SystemTime::now())
        .await
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, e.to_string()))?;
    let answer = rotation_answer(&ca);
    hub.install_ca(ca);
    Ok(answer)
}

async fn finish_rotation(
    State(hub): State<Arc<Hub>>,
    Query(params): Query<FinishParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let ca = hub
        .keeper
        .finish_rotation(&hub.catalog, &hub.ca(), hub.cert_lifetime, params.force, std::time::SystemTime::now())
        .await
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, e.to_string()))?;
    let answer = rotation_answer(&ca);
    hub.install_ca(ca);
    Ok(answer)
}

async fn list_tokens(State(hub): State<Arc<Hub>>) -> Json<serde_json::Value> {
    Json(json!({"items": join_tokens::list(&hub.catalog)}))
}

async fn revoke_token(State(hub): State<Arc<Hub>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    Ok(Json(join_tokens::revoke(&hub.catalog, &id).await.map_err(token_error)?).into_response())
}

fn token_error(error: JoinTokenError) -> ApiError {
    match error {
        JoinTokenError::Store(error) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("{error}")),
        JoinTokenError::Unknown => ApiError::new(StatusCode::NOT_FOUND, "no such join token"),
        other => ApiError::new(StatusCode::BAD_REQUEST, other.to_string()),
    }
}

/// Lets a request through only with `Authorization: Bearer <admin token>`.
async fn require_admin(State(admin): State<Arc<AdminToken>>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(token) if admin.accepts(token) => next.run(request).await,
        Some(_) => {
            ApiError::new(StatusCode::UNAUTHORIZED, "the admin token is wrong; nothing was changed").into_response()
        }
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "changing the mesh needs the admin token: give the CLI --admin-token-file (or WEFT_TOKEN_FILE, or \
             WEFT_TOKEN); the control plane wrote it to <data-dir>/admin-token on the host where it first started; \
             nothing was changed",
        )
        .into_response(),
    }
}

/// A refusal: `{"error": "...", "details": [...]}` with a fitting status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    details: Vec<String>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), details: Vec::new() }
    }
}

impl From<CatalogError> for ApiError {
    fn from(error: CatalogError) -> Self {
        match error {
            CatalogError::Invalid(errors) => ApiError {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                message: format!("refused: {} invalid document(s); nothing was changed", errors.0.len()),
                details: errors.0.iter().map(ToString::to_string).collect(),
            },
            CatalogError::Empty(message) => ApiError::new(StatusCode::BAD_REQUEST, message),
            CatalogError::NotFound(key) => ApiError::new(StatusCode::NOT_FOUND, format!("{key} not found")),
            CatalogError::Store(error) => {
                tracing::error!(%error, "store failure");
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("{error}; nothing was changed"))
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"error": self.message, "details": self.details}))).into_response()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WriteParams {
    #[serde(default)]
    dry_run: bool,
    /// The file name to use in error messages.
    source: Option<String>,
}

#[derive(Deserialize)]
struct ListParams {
    namespace: Option<String>,
}

/// One resource as the API returns it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Item {
    kind: String,
    namespace: String,
    name: String,
    revision: u64,
    created_revision: u64,
    document: serde_json::Value,
    /// False for a stored document this release cannot read.
    readable: bool,
}

fn item(key: ObjectKey, entry: Entry) -> Item {
    Item {
        kind: key.kind,
        namespace: key.namespace,
        name: key.name,
        revision: entry.stored.revision,
        created_revision: entry.stored.created_revision,
        document: entry.stored.document,
        readable: entry.resource.is_some(),
    }
}

fn kind(word: &str) -> Result<ResourceKind, ApiError> {
    parse_kind(word).map_err(|m| ApiError::new(StatusCode::BAD_REQUEST, m))
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

/// Write bodies: JSON `{"sources": [{"name", "text"}]}` (what the CLI sends, one entry
/// per file), or bare YAML (for curl), named by `?source=`.
fn sources(headers: &HeaderMap, params: &WriteParams, body: String) -> Result<Vec<Source>, ApiError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !is_json {
        return Ok(vec![Source::new(params.source.as_deref().unwrap_or("request body"), body)]);
    }
    #[derive(Deserialize)]
    struct Sources {
        sources: Vec<Source>,
    }
    serde_json::from_str::<Sources>(&body).map(|s| s.sources).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("a JSON body must be {{\"sources\": [{{\"name\", \"text\"}}]}}: {e}"),
        )
    })
}

async fn apply(
    State(catalog): State<Arc<Catalog>>,
    Query(params): Query<WriteParams>,
    headers: HeaderMap,
    body: String,
) -> Result<impl IntoResponse, ApiError> {
    let sources = sources(&headers, &params, body)?;
    Ok(Json(catalog.apply(&sources, params.dry_run).await?))
}

async fn delete_documents(
    State(catalog): State<Arc<Catalog>>,
    Query(params): Query<WriteParams>,
    headers: HeaderMap,
    body: String,
) -> Result<impl IntoResponse, ApiError> {
    // The documents must be valid to name what to delete: a typo must not delete the
    // wrong thing, and must not silently delete nothing.
    let documents = parse_sources(&sources(&headers, &params, body)?)?;
    let keys = documents
        .iter()
        .map(|d| ObjectKey::new(d.resource.kind(), &d.resource.metadata.namespace, &d.resource.metadata.name))
        .collect();
    Ok(Json(catalog.delete(keys, true, params.dry_run).await?))
}

async fn list_all(State(catalog): State<Arc<Catalog>>, Query(params): Query<ListParams>) -> Json<serde_json::Value> {
    let (revision, entries) = catalog.list(None, params.namespace.as_deref());
    let items: Vec<Item> = entries.into_iter().map(|(k, e)| item(k, e)).collect();
    Json(json!({"revision": revision, "items": items}))
}

async fn list_kind(
    State(catalog): State<Arc<Catalog>>,
    Path(word): Path<String>,
    Query(params): Query<ListParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let kind = kind(&word)?;
    let (revision, entries) = catalog.list(Some(kind), params.namespace.as_deref());
    let items: Vec<Item> = entries.into_iter().map(|(k, e)| item(k, e)).collect();
    Ok(Json(json!({"revision": revision, "kind": plural(kind), "items": items})))
}

async fn get_one(
    State(catalog): State<Arc<Catalog>>,
    Path((word, namespace, name)): Path<(String, String, String)>,
) -> Result<Json<Item>, ApiError> {
    let key = ObjectKey::new(kind(&word)?, &namespace, &name);
    let entry = catalog.get(&key).ok_or_else(|| ApiError::from(CatalogError::NotFound(key.clone())))?;
    Ok(Json(item(key, entry)))
}

async fn delete_one(
    State(catalog): State<Arc<Catalog>>,
    Path((word, namespace, name)): Path<(String, String, String)>,
    Query(params): Query<WriteParams>,
) -> Result<impl IntoResponse, ApiError> {
    let key = ObjectKey::new(kind(&word)?, &namespace, &name);
    Ok(Json(catalog.delete(vec![key], false, params.dry_run).await?))
}

async fn describe(
    State(hub): State<Arc<Hub>>,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let revision = hub.catalog.revision();
    let world = hub.world();
    let description = describe_service(world.resources(), &hub.registry.entries(), &namespace, &name)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("Service {namespace}/{name} not found")))?;
    Ok(Json(json!({"revision": revision, "service": description})))
}

#[derive(Deserialize)]
struct ProxiesParams {
    /// `local`: only the proxies whose streams this replica holds.
    scope: Option<String>,
}

/// Every connected proxy: those on this replica, and those on every other replica,
/// asked through its API. A replica that cannot be asked is named in
/// `unreachableReplicas`, with its proxies listed from presence alone.
async fn proxies(State(hub): State<Arc<Hub>>, Query(params): Query<ProxiesParams>) -> Json<serde_json::Value> {
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
        match peer_proxies(&replica.api).await {
            Ok(mut found) => items.append(&mut found),
            Err(reason) => {
                tracing::warn!(replica = %replica.id, api = %replica.api, %reason, "cannot list the proxies of another replica");
                unreachable.push(json!({"replica": replica.id, "api": replica.api, "reason": reason}));
                items.extend(present_on(hub, &replica.id));
            }
        }
    }
    items.sort_by(|a, b| (&a.namespace, &a.proxy_id).cmp(&(&b.namespace, &b.proxy_id)));
    (items, unreachable)
}

/// One workload: its resource (registered or declared), its registration's health, and
/// its proxy with the identity and certificate it presents.
async fn describe_workload(
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
    Ok(Json(json!({
        "workload": {
            "namespace": namespace,
            "name": name,
            "resource": resource,
            "registration": registration,
            "proxy": proxy,
        }
    })))
}

/// The proxies another replica holds, from its own API.
async fn peer_proxies(api: &str) -> Result<Vec<ProxyRecord>, String> {
    use http_body_util::BodyExt;
    let uri: axum::http::Uri =
        format!("http://{api}/api/v1/proxies?scope=local").parse().map_err(|e| format!("{e}"))?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let ask = async {
        let response = client.get(uri).await.map_err(|e| e.to_string())?;
        let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        let answer: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        serde_json::from_value(answer["items"].clone()).map_err(|e| e.to_string())
    };
    tokio::time::timeout(std::time::Duration::from_secs(2), ask).await.map_err(|_| "no answer within 2s".to_string())?
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
            stream: 0,
        })
        .collect()
}
