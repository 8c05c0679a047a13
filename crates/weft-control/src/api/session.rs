//! `/api/v1/session`: the dashboard's login, its session, and logout.
//!
//! `POST` takes `{"token": "<operator token>"}` as JSON (a form of another site cannot
//! send JSON without the browser asking first, so no one logs a victim in behind their
//! back) and answers with the session cookie and its CSRF token; `GET` hands a reloaded
//! page its session and CSRF token again (or says there is none); `DELETE` removes the cookie.

use std::{net::SocketAddr, time::Instant, time::SystemTime};

use axum::{
    extract::{ConnectInfo, Request, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, AppState};
use crate::{
    operator_tokens::Operator,
    sessions::{self, SessionError},
};

#[derive(Deserialize)]
pub(super) struct Login {
    token: String,
}

/// The most a login body may be: a token is about 150 bytes.
const LOGIN_BODY_LIMIT: usize = 4096;

pub(super) async fn login(State(state): State<AppState>, request: Request) -> Response {
    let connection = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|info| info.0);
    let ip = connection.map_or(std::net::IpAddr::from([0, 0, 0, 0]), |address| address.ip());
    let (parts, body) = request.into_parts();
    let headers: HeaderMap = parts.headers;
    let body = axum::body::to_bytes(body, LOGIN_BODY_LIMIT).await.unwrap_or_default();
    let now = Instant::now();
    if let Err(refusal) = state.bad_tokens.check(ip, now) {
        return ApiError::new(StatusCode::TOO_MANY_REQUESTS, refusal.to_string()).into_response();
    }
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let login: Login = match serde_json::from_slice(&body) {
        Ok(login) if is_json => login,
        _ => {
            return ApiError::new(StatusCode::BAD_REQUEST, r#"log in with a JSON body {"token": "<operator token>"}"#)
                .into_response()
        }
    };
    match sessions::open(&state.catalog, &login.token, &state.hub.known_root_hashes(), SystemTime::now()) {
        Ok(opened) => {
            tracing::info!(%ip, token = %opened.operator.token_id, "opened a dashboard session");
            let max_age = opened.expires_at.saturating_sub(weft_identity::unix_seconds(SystemTime::now()));
            let body = session_json(&opened.operator, &opened.csrf, opened.expires_at);
            ([(header::SET_COOKIE, sessions::set_cookie(&opened.cookie, max_age))], Json(body)).into_response()
        }
        Err(SessionError::NoKey) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, SessionError::NoKey.to_string()).into_response()
        }
        Err(error) => {
            if state.bad_tokens.failed(ip, now) {
                tracing::warn!(%ip, "too many bad operator tokens: refusing this client for a while");
            } else {
                tracing::info!(%ip, reason = %error, "refused a dashboard login");
            }
            ApiError::new(StatusCode::UNAUTHORIZED, error.to_string()).into_response()
        }
    }
}

fn session_json(operator: &Operator, csrf: &str, expires_at: u64) -> serde_json::Value {
    json!({
        "operator": {"tokenId": operator.token_id, "name": operator.name, "role": operator.role},
        "csrf": csrf,
        "expiresAt": expires_at,
    })
}

/// The session the request's cookie holds, or `{"operator": null}` (no cookie, or one
/// that is no longer good: the page then shows the login form). It needs no token: it
/// tells a caller only about the cookie it sent.
pub(super) async fn current(State(state): State<AppState>, headers: HeaderMap) -> Json<serde_json::Value> {
    let cookies = headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok());
    let session = sessions::cookie_value(cookies)
        .and_then(|cookie| sessions::check(&state.catalog, cookie, SystemTime::now()).ok());
    Json(match session {
        Some(session) => session_json(&session.operator, &session.csrf, session.expires_at),
        None => json!({"operator": null}),
    })
}

/// Logs out: the browser forgets the cookie. (The cookie stays valid until it expires
/// or its operator token is revoked: revoke the token to end every session made with it.)
pub(super) async fn logout() -> Response {
    ([(header::SET_COOKIE, sessions::set_cookie("", 0))], Json(json!({"loggedOut": true}))).into_response()
}
