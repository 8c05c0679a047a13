//! The resources: list, get, apply, delete, and `describe service`.

use std::sync::Arc;

use axum::{
    extract::{Extension, Path, Query, State},
    http::{header, HeaderMap, StatusCode},
    response::IntoResponse,
    Json,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use weft_model::ResourceKind;

use super::{body::TextBody, ApiError};
use crate::{
    catalog::{parse_sources, Catalog, CatalogError, Entry, Source},
    describe::describe_service,
    discovery::Hub,
    kinds::{parse_kind, plural},
    operator_tokens::Operator,
    store::ObjectKey,
};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct WriteParams {
    #[serde(default)]
    dry_run: bool,
    /// The file name to use in error messages.
    source: Option<String>,
}

#[derive(Deserialize)]
pub(super) struct ListParams {
    namespace: Option<String>,
}

/// One resource as the API returns it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Item {
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

/// Applies documents; a dry run also answers with its preview: the Services, routes
/// and proxies the change would touch ([`crate::preview`]).
pub(super) async fn apply(
    State(hub): State<Arc<Hub>>,
    Extension(operator): Extension<Operator>,
    Query(params): Query<WriteParams>,
    headers: HeaderMap,
    TextBody(body): TextBody,
) -> Result<impl IntoResponse, ApiError> {
    let sources = sources(&headers, &params, body)?;
    let report = hub.catalog.apply(&sources, params.dry_run, &operator).await?;
    let mut answer =
        serde_json::to_value(&report).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if params.dry_run {
        let parsed = parse_sources(&sources)?;
        answer["preview"] = json!(crate::preview::preview(&hub, &parsed));
    }
    Ok(Json(answer))
}

pub(super) async fn delete_documents(
    State(catalog): State<Arc<Catalog>>,
    Extension(operator): Extension<Operator>,
    Query(params): Query<WriteParams>,
    headers: HeaderMap,
    TextBody(body): TextBody,
) -> Result<impl IntoResponse, ApiError> {
    // The documents must be valid to name what to delete: a typo must not delete the
    // wrong thing, and must not silently delete nothing.
    let documents = parse_sources(&sources(&headers, &params, body)?)?;
    let keys = documents
        .iter()
        .map(|d| ObjectKey::new(d.resource.kind(), &d.resource.metadata.namespace, &d.resource.metadata.name))
        .collect();
    Ok(Json(catalog.delete(keys, true, params.dry_run, &operator).await?))
}

pub(super) async fn list_all(
    State(catalog): State<Arc<Catalog>>,
    Query(params): Query<ListParams>,
) -> Json<serde_json::Value> {
    let (revision, entries) = catalog.list(None, params.namespace.as_deref());
    let items: Vec<Item> = entries.into_iter().map(|(k, e)| item(k, e)).collect();
    Json(json!({"revision": revision, "items": items}))
}

pub(super) async fn list_kind(
    State(catalog): State<Arc<Catalog>>,
    Path(word): Path<String>,
    Query(params): Query<ListParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let kind = kind(&word)?;
    let (revision, entries) = catalog.list(Some(kind), params.namespace.as_deref());
    let items: Vec<Item> = entries.into_iter().map(|(k, e)| item(k, e)).collect();
    Ok(Json(json!({"revision": revision, "kind": plural(kind), "items": items})))
}

#[derive(Deserialize)]
pub(super) struct GetParams {
    /// `yaml`: the answer also carries the document as YAML text (`yaml`), as `weft get
    /// -o yaml` prints it; what the dashboard's editor shows.
    output: Option<String>,
}

pub(super) async fn get_one(
    State(catalog): State<Arc<Catalog>>,
    Path((word, namespace, name)): Path<(String, String, String)>,
    Query(params): Query<GetParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let key = ObjectKey::new(kind(&word)?, &namespace, &name);
    let entry = catalog.get(&key).ok_or_else(|| ApiError::from(CatalogError::NotFound(key.clone())))?;
    let item = item(key, entry);
    let yaml = match params.output.as_deref() {
        None | Some("json") => None,
        Some("yaml") => Some(
            serde_norway::to_string(&item.document)
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?,
        ),
        Some(other) => {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, format!("output={other}: use json or yaml")));
        }
    };
    let mut answer =
        serde_json::to_value(item).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if let Some(yaml) = yaml {
        answer["yaml"] = json!(yaml);
    }
    Ok(Json(answer))
}

pub(super) async fn delete_one(
    State(catalog): State<Arc<Catalog>>,
    Extension(operator): Extension<Operator>,
    Path((word, namespace, name)): Path<(String, String, String)>,
    Query(params): Query<WriteParams>,
) -> Result<impl IntoResponse, ApiError> {
    let key = ObjectKey::new(kind(&word)?, &namespace, &name);
    Ok(Json(catalog.delete(vec![key], false, params.dry_run, &operator).await?))
}

pub(super) async fn describe(
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
pub(super) struct MatrixParams {
    /// Only this namespace's Services.
    namespace: Option<String>,
    /// Identities to include beside the known ones: SPIFFE IDs, comma-separated.
    identities: Option<String>,
}

/// `GET /api/v1/authz/matrix`: which identity may call which Service.
pub(super) async fn authz_matrix(
    State(hub): State<Arc<Hub>>,
    Query(params): Query<MatrixParams>,
) -> Result<impl IntoResponse, ApiError> {
    let asked: Vec<String> = params
        .identities
        .iter()
        .flat_map(|list| list.split(','))
        .map(str::trim)
        .filter(|id| !id.is_empty())
        .map(String::from)
        .collect();
    for identity in &asked {
        if let Err(error) = weft_model::spiffe::SpiffeId::parse(identity) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("identity {identity:?} is no SPIFFE ID ({error}); write spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/ACCOUNT"),
            ));
        }
    }
    let revision = hub.catalog.revision();
    let world = hub.world();
    let matrix =
        crate::authz_matrix::matrix(world.resources(), &hub.registry.entries(), &asked, params.namespace.as_deref());
    Ok(Json(json!({"revision": revision, "matrix": matrix})))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RevertRequest {
    /// The store revision of the change to undo (`weft history` shows it).
    revision: u64,
    #[serde(default)]
    dry_run: bool,
}

/// `POST /api/v1/revert` (`{"revision": N}`): puts every resource the change at store
/// revision N touched back as it was before (one it created is deleted, one it deleted
/// comes back), judged like any apply and recorded in the audit log as the caller's.
/// What the dashboard's revert button and `weft revert` do.
pub(super) async fn revert(
    State(catalog): State<Arc<Catalog>>,
    Extension(operator): Extension<Operator>,
    Json(request): Json<RevertRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let revision = request.revision;
    let entries: Vec<_> = crate::audit::list(&catalog, None, None, usize::MAX)
        .into_iter()
        .filter(|entry| entry.revision == revision)
        .collect();
    if entries.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no change has store revision {revision} in the audit log (see weft history)"),
        ));
    }
    let mut restore = Vec::new();
    let mut remove = Vec::new();
    for entry in &entries {
        let subject = &entry.subject;
        let Ok(kind) = parse_kind(&subject.kind) else {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "revision {revision} changed {} {}, which is not a resource: only resource changes can be \
                     reverted",
                    subject.kind, subject.name
                ),
            ));
        };
        match &entry.before {
            Some(before) => restore.push(Source::new(
                format!("revision {revision}: {} {}/{}", subject.kind, subject.namespace, subject.name),
                serde_json::to_string(before).unwrap_or_default(),
            )),
            None => remove.push(ObjectKey::new(kind, &subject.namespace, &subject.name)),
        }
    }
    let mut results = Vec::new();
    let mut last = catalog.revision();
    if !restore.is_empty() {
        let report = catalog.apply(&restore, request.dry_run, &operator).await?;
        last = report.revision;
        results.extend(report.results);
    }
    if !remove.is_empty() {
        let report = catalog.delete(remove, true, request.dry_run, &operator).await?;
        last = report.revision;
        results.extend(report.results);
    }
    Ok(Json(json!({"revision": last, "dryRun": request.dry_run, "reverted": revision, "results": results})))
}
