//! Turning a downstream request into an upstream one and back: hop-by-hop headers, the
//! URI form each HTTP version needs, and tunnels for `Upgrade` (e.g. WebSocket).

use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response, Uri, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::{body::Body, pool::Wire};

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Whether `name` describes one connection and is never forwarded (RFC 9110 §7.6.1).
/// Comparing `HeaderName`s, not strings: a standard name never equals a custom one, so
/// the common case is a few tag comparisons.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::PROXY_AUTHORIZATION
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

/// Hop-by-hop names a message can carry at once, at most.
const MAX_HOP_BY_HOP: usize = 7;

/// Whether the request asks to switch protocols (HTTP/1.1 `Upgrade`) to one the proxy
/// tunnels. Never to `h2c`: that would hand the caller a raw HTTP/2 connection to the
/// application, whose requests no routing, authorization or telemetry would see (h2c
/// smuggling). Such a request is served as a plain one, its `Upgrade` stripped.
pub fn is_upgrade(request: &Request<impl Sized>) -> bool {
    request.version() == Version::HTTP_11
        && request.headers().get(header::UPGRADE).is_some_and(|protocols| {
            protocols.to_str().is_ok_and(|p| !p.split(',').any(|token| token.trim().eq_ignore_ascii_case("h2c")))
        })
        && connection_has(request.headers(), "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers, including those the `Connection` header names. `TE:
/// trailers` survives, since gRPC needs it end to end.
///
/// One pass of cheap comparisons finds what is present; only those names are removed.
/// Most requests carry none, and this runs twice per proxied request.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let mut present: [Option<HeaderName>; MAX_HOP_BY_HOP] = Default::default();
    let mut count = 0;
    for name in headers.keys() {
        if count < MAX_HOP_BY_HOP && is_hop_by_hop(name) && !present[..count].iter().any(|p| p.as_ref() == Some(name)) {
            present[count] = Some(name.clone());
            count += 1;
        }
    }
    if count == 0 {
        return;
    }
    let has_connection = present.iter().flatten().any(|name| name == header::CONNECTION);
    let named: Vec<HeaderName> = if !has_connection {
        Vec::new()
    } else {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !t.eq_ignore_ascii_case("keep-alive") && !t.eq_ignore_ascii_case("close") && !t.is_empty())
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect()
    };
    let te_trailers = headers.get(header::TE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    let upgrade = if keep_upgrade { headers.get(header::UPGRADE).cloned() } else { None };
    for name in present.iter().flatten().chain(named.iter()) {
        headers.remove(name);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(upgrade) = upgrade {
        headers.insert(header::UPGRADE, upgrade);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// The request's authority, borrowed: the URI's or the Host header's.
pub fn authority_of<B>(request: &http::Request<B>) -> Option<&str> {
    authority_in(request.uri(), request.headers())
}

fn authority_in<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    match uri.authority() {
        Some(authority) => Some(authority.as_str()),
        None => headers.get(header::HOST).and_then(|h| h.to_str().ok()),
    }
}

/// Refuses a request whose authority is ambiguous, before anything routes or judges it:
/// more than one `Host` header (RFC 9112 §3.2 requires 400), or an HTTP/2 request whose
/// `Host` names another authority than its `:authority` (RFC 9113 §8.3.1). Either would
/// let one part of the mesh route on one name while another judges the other.
///
/// An HTTP/1.1 absolute-form request may carry a different `Host`: its URI wins and the
/// `Host` sent on is rewritten from it ([`prepare`]), as RFC 9112 §3.2.2 has proxies do.
///
/// Returns the authority (the URI's, else the Host header's) from the same single look
/// at the headers: this runs on every request.
pub fn checked_authority(parts: &http::request::Parts) -> Result<Option<&str>, &'static str> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err("the request has more than one Host header");
    }
    match (parts.uri.authority(), host) {
        (Some(authority), Some(host))
            if parts.version == Version::HTTP_2
                && !host.as_bytes().eq_ignore_ascii_case(authority.as_str().as_bytes()) =>
        {
            Err("the request's Host header and :authority disagree")
        }
        (Some(authority), _) => Ok(Some(authority.as_str())),
        (None, Some(host)) if !is_host_and_port(host.as_bytes()) => {
            Err("the Host header is not a host[:port] (RFC 9110 §7.2)")
        }
        (None, host) => Ok(host.and_then(|h| h.to_str().ok())),
    }
}

/// Whether `value` can be a `Host`: a name, IPv4 or bracketed IPv6 address, and a port;
/// no user info, path, spaces or control characters. A byte scan, since it runs on every
/// request (the URI's authority was already checked by the parser).
fn is_host_and_port(value: &[u8]) -> bool {
    !value.is_empty()
        && value
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'[' | b']' | b'%'))
}

/// Shapes a request for `wire`: origin-form URI and a Host header for HTTP/1.1, an
/// absolute URI (`:scheme`, `:authority`) for HTTP/2.
pub fn prepare(parts: &mut http::request::Parts, authority: &str, wire: Wire, upgrade: bool) {
    strip_hop_by_hop(&mut parts.headers, upgrade);
    match wire {
        Wire::Http1 => {
            parts.version = Version::HTTP_11;
            // Most requests already arrive in origin form with the right Host: leave them.
            if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
                let path_and_query = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
                parts.uri = Uri::try_from(path_and_query).unwrap_or_else(|_| Uri::from_static("/"));
            }
            if parts.headers.get(header::HOST).is_none_or(|host| host.as_bytes() != authority.as_bytes()) {
                if let Ok(host) = HeaderValue::from_str(authority) {
                    parts.headers.insert(header::HOST, host);
                }
            }
        }
        Wire::Http2 => {
            parts.version = Version::HTTP_2;
            let same_authority = parts.uri.authority().is_some_and(|a| a.as_str() == authority);
            if !same_authority || parts.uri.scheme().is_none() {
                let scheme = parts.uri.scheme_str().unwrap_or("http");
                let path_and_query = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
                if let Ok(uri) = Uri::try_from(format!("{scheme}://{authority}{path_and_query}")) {
                    parts.uri = uri;
                }
            }
            // HTTP/2 carries the authority in the URI; a Host header would duplicate it.
            parts.headers.remove(header::HOST);
        }
    }
}

/// Shapes an upstream response for the downstream connection.
pub fn prepare_response(response: &mut Response<Body>, upgrade: bool) {
    strip_hop_by_hop(response.headers_mut(), upgrade);
}

/// Joins the downstream and upstream halves of an upgraded connection and copies bytes
/// both ways until either side closes.
pub fn spawn_tunnel(downstream: OnUpgrade, upstream: OnUpgrade) {
    tokio::spawn(async move {
        let (downstream, upstream) = match tokio::try_join!(downstream, upstream) {
            Ok(pair) => pair,
            Err(error) => {
                tracing::debug!(%error, "upgrade did not complete");
                return;
            }
        };
        let mut downstream = TokioIo::new(downstream);
        let mut upstream = TokioIo::new(upstream);
        if let Err(error) = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
            tracing::debug!(%error, "upgraded tunnel ended with an error");
        }
    });
}

/// The wire to use toward an endpoint: HTTP/2 when the port declares `http2`/`grpc` or
/// the request is gRPC (which needs HTTP/2 trailers); HTTP/1.1 otherwise, since an `http`
/// port promises nothing more and every HTTP/2 request can be carried as HTTP/1.1.
pub fn wire_for(protocol: weft_model::spec::Protocol, grpc: bool) -> Wire {
    use weft_model::spec::Protocol;
    match protocol {
        Protocol::Http2 | Protocol::Grpc => Wire::Http2,
        _ if grpc => Wire::Http2,
        _ => Wire::Http1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed_but_te_trailers_kept() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "keep-alive, x-private".parse().unwrap());
        headers.insert("x-private", "1".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert(header::TE, "trailers".parse().unwrap());
        headers.insert("x-end-to-end", "1".parse().unwrap());
        strip_hop_by_hop(&mut headers, false);
        assert!(!headers.contains_key("x-private"));
        assert!(!headers.contains_key("keep-alive"));
        assert!(!headers.contains_key(header::CONNECTION));
        assert_eq!(headers[header::TE], "trailers");
        assert_eq!(headers["x-end-to-end"], "1");
    }

    #[test]
    fn ambiguous_authorities_are_refused() {
        let parts = |request: http::request::Builder| request.body(()).unwrap().into_parts().0;
        let two_hosts = parts(Request::get("/").header("host", "a").header("host", "b"));
        assert!(checked_authority(&two_hosts).unwrap_err().contains("more than one Host"));
        let h2 = |host: &str| parts(Request::get("http://reviews/").version(Version::HTTP_2).header("host", host));
        assert!(checked_authority(&h2("reviews:8080")).unwrap_err().contains("disagree"));
        assert_eq!(checked_authority(&h2("REVIEWS")), Ok(Some("reviews")), "host names compare without case");
        let absolute = parts(Request::get("http://reviews/").header("host", "other"));
        assert_eq!(checked_authority(&absolute), Ok(Some("reviews")), "HTTP/1.1 absolute form: the URI wins");
        assert_eq!(checked_authority(&parts(Request::get("/").header("host", "reviews"))), Ok(Some("reviews")));
        // Found by fuzzing: a Host with a path and a tab was taken as an authority.
        for bad in ["vs.default.sv/:C\t", "user@reviews", "reviews x", ""] {
            let request = parts(Request::get("/").header("host", bad));
            assert!(checked_authority(&request).unwrap_err().contains("not a host[:port]"), "{bad:?}");
        }
        for good in ["reviews:8080", "10.0.0.1:80", "[::1]:80", "reviews.default.svc"] {
            assert_eq!(checked_authority(&parts(Request::get("/").header("host", good))), Ok(Some(good)));
        }
    }

    #[test]
    fn absolute_form_becomes_origin_form_for_http1_and_absolute_for_http2() {
        let (mut parts, ()) = Request::get("http://reviews/a?b=1").body(()).unwrap().into_parts();
        prepare(&mut parts, "reviews", Wire::Http1, false);
        assert_eq!(parts.uri, "/a?b=1");
        assert_eq!(parts.headers[header::HOST], "reviews");
        prepare(&mut parts, "reviews:80", Wire::Http2, false);
        assert_eq!(parts.uri, "http://reviews:80/a?b=1");
        assert!(!parts.headers.contains_key(header::HOST));
    }
}
