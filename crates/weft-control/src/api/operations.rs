//! What operators do besides resources: tokens (join and operator), revocations, the
//! CA's rotation, and reading the audit log.

use std::{sync::Arc, time::SystemTime};

use axum::{
    extract::{Extension, Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use serde::Deserialize;
use serde_json::json;

use super::{store_failure, ApiError};
use crate::{
    audit,
    catalog::Catalog,
    discovery::Hub,
    join_tokens::{self, JoinTokenError},
    operator_tokens::{self, Operator, OperatorTokenError, Role},
    revocations::{self, RevocationError, Revoked},
};

/// `POST /api/v1/tokens` body: `service` (a join token) or `role` (an operator token).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct TokenRequest {
    #[serde(default)]
    service: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    /// Defaults to the service's name.
    #[serde(default)]
    service_account: Option<String>,
    #[serde(default)]
    role: Option<Role>,
    #[serde(default)]
    name: Option<String>,
    /// A duration such as `720h`; operator tokens without one never expire.
    #[serde(default)]
    ttl: Option<String>,
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, message)
}

pub(super) async fn create_token(
    State(hub): State<Arc<Hub>>,
    Extension(operator): Extension<Operator>,
    Json(request): Json<TokenRequest>,
) -> Result<Response, ApiError> {
    let ttl = match &request.ttl {
        Some(text) => {
            Some(text.parse::<weft_model::GoDuration>().map_err(|e| bad_request(format!("ttl {text:?}: {e}")))?.get())
        }
        None => None,
    };
    let ca = hub.ca();
    let root = ca.authority.root_hash();
    let now = SystemTime::now();
    match (&request.service, request.role) {
        (Some(_), Some(_)) => {
            Err(bad_request("give either service (a join token, for a proxy) or role (an operator token), not both"))
        }
        (None, None) => Err(bad_request("give service (a join token, for a proxy) or role (an operator token)")),
        (None, Some(role)) => {
            if request.namespace.is_some() || request.service_account.is_some() {
                return Err(bad_request("namespace and serviceAccount belong to join tokens (service)"));
            }
            let name = request.name.as_deref().unwrap_or("");
            let made = operator_tokens::create(&hub.catalog, &root, role, name, ttl, now, &operator)
                .await
                .map_err(operator_token_error)?;
            Ok(Json(json!({"kind": "operator", "token": made.token, "record": made.record})).into_response())
        }
        (Some(service), None) => {
            if request.name.is_some() {
                return Err(bad_request("name belongs to operator tokens (role)"));
            }
            let namespace = request.namespace.as_deref().unwrap_or(weft_model::DEFAULT_NAMESPACE);
            let account = request.service_account.as_deref().unwrap_or(service);
            let ttl = ttl.unwrap_or(join_tokens::DEFAULT_TTL);
            let trust_domain = ca.authority.trust_domain();
            let made = join_tokens::create(&hub.catalog, trust_domain, &root, namespace, account, ttl, now, &operator)
                .await
                .map_err(join_token_error)?;
            Ok(Json(json!({"kind": "join", "token": made.token, "record": made.record})).into_response())
        }
    }
}

/// Both kinds, never a secret or its hash.
pub(super) async fn list_tokens(State(catalog): State<Arc<Catalog>>) -> Json<serde_json::Value> {
    let operators = operator_tokens::list(&catalog).into_iter().map(|r| {
        json!({"kind": "operator", "id": r.id, "name": r.name, "role": r.role, "createdAt": r.created_at,
               "expiresAt": r.expires_at, "revoked": r.revoked})
    });
    let joins = join_tokens::list(&catalog).into_iter().map(|r| {
        json!({"kind": "join", "id": r.id, "identity": r.identity, "expiresAt": r.expires_at, "revoked": r.revoked})
    });
    Json(json!({"items": operators.chain(joins).collect::<Vec<_>>()}))
}

/// Revokes the join or operator token `id`.
pub(super) async fn revoke_token(
    State(catalog): State<Arc<Catalog>>,
    Extension(operator): Extension<Operator>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if join_tokens::exists(&catalog, &id) {
        let record = join_tokens::revoke(&catalog, &id, &operator).await.map_err(join_token_error)?;
        return Ok(Json(json!({"kind": "join", "id": id, "identity": record.identity})).into_response());
    }
    if id == operator_tokens::LEGACY_TOKEN_ID {
        return Err(bad_request(
            "the admin token of an earlier release cannot be revoked by id: delete its file and stop using it, or \
             make admin tokens with weft token create --role admin",
        ));
    }
    let record = operator_tokens::revoke(&catalog, &id, &operator).await.map_err(operator_token_error)?;
    Ok(Json(json!({"kind": "operator", "id": id, "name": record.name, "role": record.role})).into_response())
}

fn join_token_error(error: JoinTokenError) -> ApiError {
    match error {
        JoinTokenError::Store(error) => store_failure(error),
        JoinTokenError::Unknown => ApiError::new(StatusCode::NOT_FOUND, "no such token"),
        other => bad_request(other.to_string()),
    }
}

fn operator_token_error(error: OperatorTokenError) -> ApiError {
    match error {
        OperatorTokenError::Store(error) => store_failure(error),
        OperatorTokenError::Unknown => ApiError::new(StatusCode::NOT_FOUND, "no such token"),
        other => bad_request(other.to_string()),
    }
}

/// Who the presented token is: for the CLI's `weft context` and the dashboard's login.
pub(super) async fn whoami(Extension(operator): Extension<Operator>) -> Json<Operator> {
    Json(operator)
}

/// `POST /api/v1/revocations` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RevokeRequest {
    kind: Revoked,
    value: String,
}

pub(super) async fn revoke(
    State(hub): State<Arc<Hub>>,
    Extension(operator): Extension<Operator>,
    Json(request): Json<RevokeRequest>,
) -> Result<Json<revocations::RevocationRecord>, ApiError> {
    let record =
        revocations::revoke(&hub.catalog, request.kind, &request.value, &operator).await.map_err(revocation_error)?;
    Ok(Json(record))
}

pub(super) async fn undo_revocation(
    State(hub): State<Arc<Hub>>,
    Extension(operator): Extension<Operator>,
    Path(what): Path<String>,
) -> Result<Json<revocations::RevocationRecord>, ApiError> {
    Ok(Json(revocations::undo(&hub.catalog, &what, &operator).await.map_err(revocation_error)?))
}

pub(super) async fn list_revocations(State(catalog): State<Arc<Catalog>>) -> Json<serde_json::Value> {
    Json(json!({"items": revocations::list(&catalog)}))
}

fn revocation_error(error: RevocationError) -> ApiError {
    match error {
        RevocationError::Store(error) => store_failure(error),
        RevocationError::Unknown => ApiError::new(StatusCode::NOT_FOUND, error.to_string()),
        RevocationError::Invalid(message) => bad_request(message),
    }
}

/// `POST /api/v1/ca/rotation/finish` query.
#[derive(Deserialize)]
pub(super) struct FinishParams {
    #[serde(default)]
    force: bool,
}

fn rotation_answer(ca: &crate::ca::CaState) -> serde_json::Value {
    json!({"caRoot": ca.authority.root_hash(), "caRoots": ca.root_hashes(), "caRotatedAt": ca.rotated_at})
}

/// Records a CA change in the audit log, by its roots before and after.
async fn audit_ca(hub: &Hub, operator: &Operator, action: &str, before: serde_json::Value, after: serde_json::Value) {
    let subject =
        audit::Subject { kind: "CertificateAuthority".into(), namespace: "default".into(), name: "mesh".into() };
    let entry = audit::record(operator, action, subject, Some(before), Some(after), SystemTime::now());
    if let Err(error) = audit::write(&hub.catalog, entry).await {
        tracing::error!(%error, action, "the CA changed but the audit log could not record it");
    }
}

pub(super) async fn rotate_ca(
    State(hub): State<Arc<Hub>>,
    Extension(operator): Extension<Operator>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let before = rotation_answer(&hub.ca());
    let ca = hub
        .keeper
        .rotate(&hub.catalog, &hub.ca(), SystemTime::now())
        .await
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, e.to_string()))?;
    let answer = rotation_answer(&ca);
    hub.install_ca(ca);
    audit_ca(&hub, &operator, "ca.rotate", before, answer.clone()).await;
    Ok(Json(answer))
}

pub(super) async fn finish_rotation(
    State(hub): State<Arc<Hub>>,
    Extension(operator): Extension<Operator>,
    Query(params): Query<FinishParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let before = rotation_answer(&hub.ca());
    let ca = hub
        .keeper
        .finish_rotation(&hub.catalog, &hub.ca(), hub.cert_lifetime, params.force, SystemTime::now())
        .await
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, e.to_string()))?;
    let answer = rotation_answer(&ca);
    hub.install_ca(ca);
    audit_ca(&hub, &operator, "ca.finish-rotation", before, answer.clone()).await;
    Ok(Json(answer))
}

/// `GET /api/v1/history` query.
#[derive(Deserialize)]
pub(super) struct HistoryParams {
    kind: Option<String>,
    name: Option<String>,
    #[serde(default = "default_limit")]
    limit: usize,
    /// `yaml`: each entry also carries its documents as YAML (`beforeYaml`,
    /// `afterYaml`), for a diff to be read as the resource was written.
    output: Option<String>,
}

fn default_limit() -> usize {
    100
}

/// The audit log, oldest first: the newest `limit` entries, of one kind (and name).
pub(super) async fn history(
    State(catalog): State<Arc<Catalog>>,
    Query(params): Query<HistoryParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let kind = match params.kind.as_deref() {
        None => None,
        Some(word) => Some(match crate::kinds::parse_kind(word) {
            Ok(kind) => kind.as_str().to_string(),
            // Internal kinds are named as the log names them.
            Err(_)
                if ["OperatorToken", "JoinToken", "Revocation", "CertificateAuthority"]
                    .iter()
                    .any(|k| k.eq_ignore_ascii_case(word)) =>
            {
                word.to_string()
            }
            Err(message) => return Err(bad_request(message)),
        }),
    };
    let entries = audit::list(&catalog, kind.as_deref(), params.name.as_deref(), params.limit.clamp(1, 10_000));
    let yaml = match params.output.as_deref() {
        None | Some("json") => false,
        Some("yaml") => true,
        Some(other) => return Err(bad_request(format!("output={other}: use json or yaml"))),
    };
    let mut items = serde_json::to_value(&entries).unwrap_or_default();
    if yaml {
        for (item, entry) in items.as_array_mut().into_iter().flatten().zip(&entries) {
            let text = |document: &Option<serde_json::Value>| {
                document.as_ref().and_then(|document| serde_norway::to_string(document).ok())
            };
            item["beforeYaml"] = json!(text(&entry.before));
            item["afterYaml"] = json!(text(&entry.after));
        }
    }
    Ok(Json(json!({"items": items})))
}
