//! Every response the proxy makes itself, in one place.
//!
//! A failure becomes a [`ProxyFailure`]; this module alone decides its HTTP status, the
//! `weft-error` header that says why, and — for gRPC callers — the matching
//! `grpc-status`, so that no code path invents its own error response.

use std::{fmt, net::SocketAddr};

use http::{header, HeaderValue, Response, StatusCode};

use crate::body::{self, Body};

/// The header on every proxy-made response, naming the reason.
pub const WEFT_ERROR: &str = "weft-error";

/// Why the proxy answered instead of the application.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProxyFailure {
    /// The Host names no known Service: the outbound listener is not an open proxy.
    UnknownHost(String),
    /// The Service port is `tcp`; HTTP cannot be routed to it.
    NotHttp(String),
    /// The Service has routes and none matched.
    NoRoute(String),
    /// A matched rule has no backends.
    NoBackends(String),
    /// A backendRef names a Service or port that does not exist.
    UnresolvedBackend(String),
    /// The backend Service has no endpoints (or none with weight).
    NoEndpoints(String),
    /// A connection limit of the backend Service is reached.
    Overloaded(String),
    /// No endpoint could be connected to.
    ConnectFailed { endpoint: SocketAddr, reason: String },
    /// The upstream connection failed before a complete response.
    UpstreamReset { endpoint: SocketAddr, reason: String },
    /// `timeouts.request` (or the policy's request timeout) elapsed.
    RequestTimeout,
    /// A per-try timeout elapsed and no retry was possible.
    TryTimeout,
    /// No application address is configured for inbound traffic.
    NoApplication,
    /// The request itself is malformed (e.g. no Host).
    BadRequest(String),
    /// The caller's request body broke its framing on the way through.
    BrokenRequestBody(String),
    /// An AuthorizationPolicy (or MeshConfig's default) denied the caller.
    Forbidden { caller: String, policy: String },
}

impl ProxyFailure {
    /// A short, stable word for the reason; the `error` metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyFailure::UnknownHost(_) => "unknown-host",
            ProxyFailure::NotHttp(_) => "not-http",
            ProxyFailure::NoRoute(_) => "no-route",
            ProxyFailure::NoBackends(_) => "no-backends",
            ProxyFailure::UnresolvedBackend(_) => "unresolved-backend",
            ProxyFailure::NoEndpoints(_) => "no-endpoints",
            ProxyFailure::Overloaded(_) => "overloaded",
            ProxyFailure::ConnectFailed { .. } => "connect-failed",
            ProxyFailure::UpstreamReset { .. } => "upstream-reset",
            ProxyFailure::RequestTimeout => "request-timeout",
            ProxyFailure::TryTimeout => "per-try-timeout",
            ProxyFailure::NoApplication => "no-application",
            ProxyFailure::BadRequest(_) => "bad-request",
            ProxyFailure::BrokenRequestBody(_) => "request-body-broken",
            ProxyFailure::Forbidden { .. } => "forbidden",
        }
    }

    /// Whether the application gave no response: the connection failed or broke, or a
    /// timeout elapsed. The golden signals count these as transport errors (failures),
    /// apart from the responses the proxy makes for other reasons.
    pub fn is_transport_error(&self) -> bool {
        matches!(
            self,
            ProxyFailure::ConnectFailed { .. }
                | ProxyFailure::UpstreamReset { .. }
                | ProxyFailure::RequestTimeout
                | ProxyFailure::TryTimeout
        )
    }

    /// The HTTP status the caller sees.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyFailure::UnknownHost(_) | ProxyFailure::NoRoute(_) => StatusCode::NOT_FOUND,
            ProxyFailure::BadRequest(_) | ProxyFailure::NotHttp(_) | ProxyFailure::BrokenRequestBody(_) => {
                StatusCode::BAD_REQUEST
            }
            ProxyFailure::UnresolvedBackend(_) | ProxyFailure::NoBackends(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyFailure::ConnectFailed { .. } | ProxyFailure::UpstreamReset { .. } => StatusCode::BAD_GATEWAY,
            ProxyFailure::NoEndpoints(_) | ProxyFailure::Overloaded(_) | ProxyFailure::NoApplication => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyFailure::RequestTimeout | ProxyFailure::TryTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyFailure::Forbidden { .. } => StatusCode::FORBIDDEN,
        }
    }

    /// The gRPC status code for gRPC callers.
    pub fn grpc_status(&self) -> u16 {
        match self.status() {
            StatusCode::NOT_FOUND => 12,             // UNIMPLEMENTED
            StatusCode::BAD_REQUEST => 3,            // INVALID_ARGUMENT
            StatusCode::INTERNAL_SERVER_ERROR => 13, // INTERNAL
            StatusCode::GATEWAY_TIMEOUT => 4,        // DEADLINE_EXCEEDED
            StatusCode::FORBIDDEN => 7,              // PERMISSION_DENIED
            _ => 14,                                 // UNAVAILABLE
        }
    }

    /// Builds the response, as gRPC (HTTP 200, trailers-only) when `grpc` is set.
    pub fn into_response(self, grpc: bool) -> Response<Body> {
        let text = self.to_string();
        let value = HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(self.reason()));
        let mut response = if grpc {
            let mut response = Response::new(body::empty());
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            headers.insert("grpc-status", HeaderValue::from(self.grpc_status()));
            headers.insert("grpc-message", value.clone());
            response
        } else {
            let mut response = Response::new(body::full(format!("{text}\n")));
            *response.status_mut() = self.status();
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
            response
        };
        response.headers_mut().insert(WEFT_ERROR, value);
        response
    }
}

impl fmt::Display for ProxyFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reason = self.reason();
        match self {
            ProxyFailure::UnknownHost(host) => write!(f, "{reason}: {host:?} is not a known service"),
            ProxyFailure::NotHttp(what) => write!(f, "{reason}: {what} is a tcp port; use --upstream for opaque TCP"),
            ProxyFailure::NoRoute(service) => write!(f, "{reason}: no route of {service} matches the request"),
            ProxyFailure::NoBackends(route) => write!(f, "{reason}: {route} has no backends"),
            ProxyFailure::UnresolvedBackend(what) => write!(f, "{reason}: backend Service {what} does not exist"),
            ProxyFailure::NoEndpoints(service) => write!(f, "{reason}: {service} has no available endpoints"),
            ProxyFailure::Overloaded(what) => write!(f, "{reason}: {what}"),
            ProxyFailure::ConnectFailed { endpoint, reason: why } => write!(f, "{reason}: {endpoint}: {why}"),
            ProxyFailure::UpstreamReset { endpoint, reason: why } => write!(f, "{reason}: {endpoint}: {why}"),
            ProxyFailure::RequestTimeout => write!(f, "{reason}: the request timeout elapsed"),
            ProxyFailure::TryTimeout => write!(f, "{reason}: the per-try timeout elapsed"),
            ProxyFailure::NoApplication => write!(f, "{reason}: this proxy has no --app-addr for inbound traffic"),
            ProxyFailure::BadRequest(why) | ProxyFailure::BrokenRequestBody(why) => write!(f, "{reason}: {why}"),
            ProxyFailure::Forbidden { caller, policy } => write!(f, "{reason}: {caller} denied by {policy}"),
        }
    }
}

/// Whether the request is gRPC, so failures are answered as gRPC statuses.
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_headers_follow_the_documented_table() {
        let cases = [
            (ProxyFailure::UnknownHost("x".into()), 404, 12),
            (ProxyFailure::UnresolvedBackend("ns/x:80".into()), 500, 13),
            (
                ProxyFailure::ConnectFailed { endpoint: "127.0.0.1:1".parse().unwrap(), reason: "refused".into() },
                502,
                14,
            ),
            (ProxyFailure::NoEndpoints("ns/x".into()), 503, 14),
            (ProxyFailure::RequestTimeout, 504, 4),
            (ProxyFailure::Forbidden { caller: "a".into(), policy: "default/p".into() }, 403, 7),
        ];
        for (failure, status, grpc) in cases {
            let reason = failure.reason();
            let response = failure.clone().into_response(false);
            assert_eq!(response.status().as_u16(), status);
            assert!(response.headers()[WEFT_ERROR].to_str().unwrap().starts_with(reason));
            let response = failure.into_response(true);
            assert_eq!(response.status(), 200);
            assert_eq!(response.headers()["grpc-status"], grpc.to_string().as_str());
        }
    }
}
