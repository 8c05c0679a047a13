//! Who may call: the middleware in front of every API route but liveness.
//!
//! It reads `Authorization: Bearer <operator token>`, checks the token against the store
//! and the route's role, and hands the handlers an [`Operator`] (for the audit log).
//! A refusal says why, with 401 (no usable token), 403 (the role is too weak) or 429 (too
//! many bad tokens from one address: the client is refused outright for a while, and
//! logged once when it gets there).

use std::{
    net::SocketAddr,
    time::{Instant, SystemTime},
};

use axum::{
    extract::{ConnectInfo, Request, State},
    http::{header, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};

use super::{ApiError, AppState};
use crate::operator_tokens::{self, Operator, Refusal, Role};

/// Admits a request whose operator token has at least `needs`.
pub(super) async fn require(
    State((state, needs)): State<(AppState, Role)>,
    mut request: Request,
    next: Next,
) -> Response {
    let client = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|info| info.0);
    let ip = client.map_or(std::net::IpAddr::from([0, 0, 0, 0]), |addr| addr.ip());
    let now = Instant::now();
    if let Err(refusal) = state.bad_tokens.check(ip, now) {
        return refused(refusal);
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let judged = match presented {
        None => Err(Refusal::Missing),
        Some(token) => {
            operator_tokens::authenticate(&state.catalog, &token, &state.hub.known_root_hashes(), SystemTime::now())
        }
    };
    match judged.and_then(|operator| operator_tokens::authorize(&operator, needs).map(|()| operator)) {
        Ok(operator) => {
            request.extensions_mut().insert::<Operator>(operator);
            next.run(request).await
        }
        Err(refusal) => {
            // A missing token or a weak role is no guess at a secret; anything else is.
            let guess = !matches!(refusal, Refusal::Missing | Refusal::WrongRole { .. });
            if guess && state.bad_tokens.failed(ip, now) {
                tracing::warn!(%ip, "too many bad operator tokens: refusing this client for a while");
            } else {
                tracing::info!(%ip, path = %request.uri().path(), reason = %refusal, "refused an API call");
            }
            refused(refusal)
        }
    }
}

fn refused(refusal: Refusal) -> Response {
    let status = match refusal {
        Refusal::WrongRole { .. } => StatusCode::FORBIDDEN,
        Refusal::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::UNAUTHORIZED,
    };
    ApiError::new(status, refusal.to_string()).into_response()
}
