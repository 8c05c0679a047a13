//! Who may call: the middleware in front of every API route but liveness.
//!
//! It reads `Authorization: Bearer <operator token>` or, from the dashboard, a session
//! cookie ([`crate::sessions`]; a change made with one must carry its CSRF token), checks
//! the token against the store and the route's role, and hands the handlers an
//! [`Operator`] (for the audit log).
//! A refusal says why, with 401 (no usable token), 403 (the role is too weak) or 429 (too
//! many bad tokens from one address: the client is refused outright for a while, and
//! logged once when it gets there).

use std::{
    net::SocketAddr,
    time::{Instant, SystemTime},
};

use axum::{
    extract::{ConnectInfo, Request, State},
    http::{header, Method, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};

use super::{ApiError, AppState};
use crate::{
    operator_tokens::{self, Operator, Refusal, Role},
    sessions::{self, SessionError},
};

/// Why a call was refused: a bad token, or a session that cannot be used.
enum Denial {
    Token(Refusal),
    Session(SessionError),
    NoCsrf,
}

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
    let judged = identify(&state, &request)
        .and_then(|operator| operator_tokens::authorize(&operator, needs).map(|()| operator).map_err(Denial::Token));
    match judged {
        Ok(operator) => {
            request.extensions_mut().insert::<Operator>(operator);
            next.run(request).await
        }
        Err(denial) => {
            // A missing token, a weak role or a missing CSRF token is no guess at a
            // secret; anything else is.
            let guess = !matches!(
                denial,
                Denial::Token(Refusal::Missing | Refusal::WrongRole { .. })
                    | Denial::NoCsrf
                    | Denial::Session(SessionError::Expired | SessionError::NoKey)
            );
            if guess && state.bad_tokens.failed(ip, now) {
                tracing::warn!(%ip, "too many bad operator tokens: refusing this client for a while");
            } else {
                tracing::info!(%ip, path = %request.uri().path(), reason = %denial.message(), "refused an API call");
            }
            denial.into_response()
        }
    }
}

/// Who a request comes from: its bearer token, else its session cookie (for a change,
/// with the session's CSRF token).
fn identify(state: &AppState, request: &Request) -> Result<Operator, Denial> {
    let headers = request.headers();
    let bearer =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if let Some(token) = bearer {
        return operator_tokens::authenticate(&state.catalog, token, &state.hub.known_root_hashes(), SystemTime::now())
            .map_err(Denial::Token);
    }
    let cookies = headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok());
    let Some(cookie) = sessions::cookie_value(cookies) else {
        return Err(Denial::Token(Refusal::Missing));
    };
    let session = sessions::check(&state.catalog, cookie, SystemTime::now()).map_err(Denial::Session)?;
    let safe = matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !safe {
        let presented = headers.get(sessions::CSRF_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default();
        if !sessions::csrf_matches(&session, presented) {
            return Err(Denial::NoCsrf);
        }
    }
    Ok(session.operator)
}

impl Denial {
    fn message(&self) -> String {
        match self {
            Denial::Token(refusal) => refusal.to_string(),
            Denial::Session(error) => error.to_string(),
            Denial::NoCsrf => format!(
                "a change made with a dashboard session must carry the session's CSRF token in {}",
                sessions::CSRF_HEADER
            ),
        }
    }

    fn into_response(self) -> Response {
        let status = match &self {
            Denial::Token(Refusal::WrongRole { .. }) | Denial::NoCsrf => StatusCode::FORBIDDEN,
            Denial::Token(Refusal::RateLimited { .. }) => StatusCode::TOO_MANY_REQUESTS,
            Denial::Session(SessionError::NoKey) => StatusCode::SERVICE_UNAVAILABLE,
            Denial::Session(SessionError::Token(Refusal::RateLimited { .. })) => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::UNAUTHORIZED,
        };
        ApiError::new(status, self.message()).into_response()
    }
}

/// A refusal before any token was judged (a client refused for too many bad ones).
fn refused(refusal: Refusal) -> Response {
    Denial::Token(refusal).into_response()
}
