//! `GET /api/v1/tap`: a live tap session, streamed as JSON lines for as long as the
//! caller reads (viewer token).
//!
//! The first line says what is tapped (`{"tapping": ...}`), then one line per request
//! (`{"event": ...}`, see [`crate::tap::event_json`]), a `{"heartbeat": ...}` every two
//! seconds with what the session delivered and held back (which also notices a caller
//! that went away), and `{"notice": ...}` when a replica cannot be asked. Header values
//! appear only for headers the caller names; credentials (`authorization`, cookies)
//! only for an admin.

use std::{convert::Infallible, sync::atomic::Ordering, sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes},
    extract::{Extension, Query, State},
    http::{header, StatusCode},
    response::Response,
};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use weft_api::tap::{tap_filter, TapFilter};

use super::ApiError;
use crate::{
    discovery::Hub,
    operator_tokens::{Operator, Role},
    tap::{Delivery, TapRequest},
};

/// The rate a session gets when the caller names none (requests a second, in total).
pub const DEFAULT_MAX_RPS: f64 = 100.0;
/// The most a session may ask for: events cross the control plane one by one.
const MOST_RPS: f64 = 1000.0;
/// How often a session says it is alive (and finds out whether its caller is).
const HEARTBEAT: Duration = Duration::from_secs(2);
/// Headers whose values are credentials: only an admin may tap them.
const CREDENTIALS: &[&str] = &["authorization", "proxy-authorization", "cookie", "set-cookie"];

/// The query string of `/api/v1/tap`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct TapQuery {
    /// `namespace/name` of a Service.
    service: Option<String>,
    /// `namespace/name` of a workload (its proxy id).
    workload: Option<String>,
    method: Option<String>,
    path_prefix: Option<String>,
    /// A code (`503`) or a class (`5xx`).
    status: Option<String>,
    route: Option<String>,
    max_rps: Option<f64>,
    /// Header names, comma-separated.
    headers: Option<String>,
}

pub(super) async fn tap(
    State(hub): State<Arc<Hub>>,
    Extension(operator): Extension<Operator>,
    Query(query): Query<TapQuery>,
) -> Result<Response, ApiError> {
    let request = tap_request(&hub, &query, operator.role)?;
    let mut session = crate::tap::open_mesh_wide(&hub, &request).await;
    tracing::info!(operator = %operator.name, session = session.id, filter = ?request.filter, max_rps = request.max_rps, "tap session opened");
    let target = match &request.filter.target {
        Some(tap_filter::Target::Service(service)) => json!({"service": service}),
        Some(tap_filter::Target::Workload(workload)) => json!({"workload": workload}),
        None => serde_json::Value::Null,
    };
    let opening = json!({"tapping": {
        "session": session.id,
        "target": target,
        "maxRps": request.max_rps,
        "proxies": session.proxies,
        "perProxyRps": session.per_proxy_rps,
        "replica": hub.registry.cluster().replica(),
    }});
    let (lines, receiver) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    let line = |value: serde_json::Value| Ok(Bytes::from(format!("{value}\n")));
    let _ = lines.try_send(line(opening));
    tokio::spawn(async move {
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.tick().await;
        loop {
            let next = tokio::select! {
                delivery = session.deliveries.recv() => match delivery {
                    Some(Delivery::Event(event)) => json!({"event": crate::tap::event_json(&event)}),
                    Some(Delivery::Notice(notice)) => json!({"notice": notice}),
                    None => break,
                },
                _ = heartbeat.tick() => {
                    let counts = &session.counts;
                    json!({"heartbeat": {
                        "delivered": counts.delivered.load(Ordering::Relaxed),
                        "limited": counts.limited.load(Ordering::Relaxed),
                        "dropped": counts.dropped.load(Ordering::Relaxed),
                    }})
                }
                () = lines.closed() => break,
            };
            if lines.send(line(next)).await.is_err() {
                break;
            }
        }
        tracing::info!(session = session.id, "tap session closed: its caller went away");
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::from_stream(ReceiverStream::new(receiver)))
        .map_err(|error| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))
}

/// The session `query` asks for, checked: a clear refusal for anything the proxies
/// would not understand.
fn tap_request(hub: &Hub, query: &TapQuery, role: Role) -> Result<TapRequest, ApiError> {
    let bad = |message: String| ApiError::new(StatusCode::BAD_REQUEST, message);
    let split = |what: &str, value: &str| -> Result<(String, String), ApiError> {
        match value.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok((ns.to_string(), name.to_string()))
            }
            _ => Err(bad(format!("{what} must be namespace/name, not {value:?}"))),
        }
    };
    let target = match (&query.service, &query.workload) {
        (Some(service), None) => {
            let (ns, name) = split("service", service)?;
            if !hub.world().has_service(&format!("{ns}/{name}")) {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("no Service {ns}/{name}: see weft get services -A"),
                ));
            }
            tap_filter::Target::Service(format!("{ns}/{name}"))
        }
        (None, Some(workload)) => {
            let (ns, name) = split("workload", workload)?;
            tap_filter::Target::Workload(format!("{ns}/{name}"))
        }
        _ => return Err(bad("name what to tap: service=namespace/name or workload=namespace/name".into())),
    };
    let method = query.method.clone().unwrap_or_default().to_ascii_uppercase();
    if !method.is_empty() && axum::http::Method::from_bytes(method.as_bytes()).is_err() {
        return Err(bad(format!("method {method:?} is not an HTTP method")));
    }
    let path_prefix = query.path_prefix.clone().unwrap_or_default();
    if !path_prefix.is_empty() && !path_prefix.starts_with('/') {
        return Err(bad(format!("pathPrefix must start with /, not {path_prefix:?}")));
    }
    let (status, status_class) = match query.status.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None | Some("") => (0, false),
        Some(class) if class.len() == 3 && class.ends_with("xx") => match class.as_bytes()[0] {
            digit @ b'1'..=b'5' => (u32::from(digit - b'0'), true),
            _ => return Err(bad(format!("status class {class:?} must be 1xx to 5xx"))),
        },
        Some(code) => match code.parse::<u32>() {
            Ok(code @ 100..=599) => (code, false),
            _ => return Err(bad(format!("status {code:?} must be a code (100-599) or a class such as 5xx"))),
        },
    };
    let max_rps = query.max_rps.unwrap_or(DEFAULT_MAX_RPS);
    if !(max_rps.is_finite() && max_rps > 0.0 && max_rps <= MOST_RPS) {
        return Err(bad(format!("maxRps must be above 0 and at most {MOST_RPS}, not {max_rps}")));
    }
    let mut headers = Vec::new();
    for name in query.headers.as_deref().unwrap_or_default().split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let name = name.to_ascii_lowercase();
        if axum::http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(bad(format!("{name:?} is not a header name")));
        }
        if CREDENTIALS.contains(&name.as_str()) && role != Role::Admin {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("the {name} header carries credentials: tapping its values needs an admin token"),
            ));
        }
        if !headers.contains(&name) {
            headers.push(name);
        }
    }
    if headers.len() > weft_api::tap::MAX_HEADERS {
        return Err(bad(format!("name at most {} headers", weft_api::tap::MAX_HEADERS)));
    }
    let filter = TapFilter {
        target: Some(target),
        method,
        path_prefix,
        status,
        status_class,
        route: query.route.clone().unwrap_or_default(),
    };
    Ok(TapRequest { filter, max_rps, headers })
}
