//! Request matching for compiled routes, and the Gateway API precedence order.
//!
//! A Service port's rules from every attached route are flattened into one list, sorted
//! once at compile time by the Gateway API's precedence; per request the first match
//! wins, so the hot path is a short linear scan with no allocation.

use std::{cmp::Reverse, fmt};

use http::{HeaderMap, Method};
use serde::{Serialize, Serializer};

/// A compiled regular expression that serializes as its source text.
#[derive(Clone)]
pub struct Pattern {
    source: String,
    regex: regex::Regex,
}

impl Pattern {
    /// Compiles `source` to match whole values (anchored at both ends), as Envoy and the
    /// Gateway API conformance tests expect.
    pub fn full(source: &str) -> Result<Self, regex::Error> {
        Ok(Pattern { source: source.to_string(), regex: regex::Regex::new(&format!("^(?:{source})$"))? })
    }

    /// Whether the whole of `value` matches.
    pub fn is_match(&self, value: &str) -> bool {
        self.regex.is_match(value)
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}/", self.source)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.source)
    }
}

/// How a request path is matched.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", content = "value")]
pub enum PathMatcher {
    Exact(String),
    /// Element-wise prefix: `/foo` matches `/foo`, `/foo/` and `/foo/bar`, not `/foobar`.
    PathPrefix(String),
    RegularExpression(Pattern),
}

impl PathMatcher {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatcher::Exact(value) => path == value,
            PathMatcher::PathPrefix(prefix) => {
                let prefix = prefix.trim_end_matches('/');
                path.starts_with(prefix) && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/'))
            }
            PathMatcher::RegularExpression(pattern) => pattern.is_match(path),
        }
    }
}

/// How a header or query parameter value is matched.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", content = "value")]
pub enum ValueMatcher {
    Exact(String),
    RegularExpression(Pattern),
}

impl ValueMatcher {
    fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatcher::Exact(expected) => value == expected,
            ValueMatcher::RegularExpression(pattern) => pattern.is_match(value),
        }
    }
}

/// A named condition on a header (case-insensitive name) or query parameter.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NamedMatcher {
    pub name: String,
    #[serde(flatten)]
    pub value: ValueMatcher,
}

/// All conditions of one Gateway API match.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RequestMatcher {
    pub path: PathMatcher,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "serialize_method")]
    pub method: Option<Method>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<NamedMatcher>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<NamedMatcher>,
}

fn serialize_method<S: Serializer>(method: &Option<Method>, serializer: S) -> Result<S::Ok, S::Error> {
    match method {
        Some(m) => serializer.serialize_str(m.as_str()),
        None => serializer.serialize_none(),
    }
}

/// The parts of a request that routes can match on.
pub struct RequestView<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

impl RequestMatcher {
    /// Matches every request (`PathPrefix /`), the Gateway API default.
    pub fn any() -> Self {
        RequestMatcher {
            path: PathMatcher::PathPrefix("/".into()),
            method: None,
            headers: vec![],
            query_params: vec![],
        }
    }

    /// Whether every condition holds for `request`.
    pub fn matches(&self, request: &RequestView<'_>) -> bool {
        if let Some(method) = &self.method {
            if method != request.method {
                return false;
            }
        }
        if !self.path.matches(request.path) {
            return false;
        }
        for header in &self.headers {
            // A header that appears several times matches on any of its values.
            let found = request
                .headers
                .get_all(header.name.as_str())
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| header.value.matches(v)));
            if !found {
                return false;
            }
        }
        if !self.query_params.is_empty() {
            let query = request.query.unwrap_or("");
            for param in &self.query_params {
                // The Gateway API takes the first value of a repeated parameter.
                let value = query.split('&').find_map(|pair| {
                    let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                    (name == param.name).then_some(value)
                });
                if !value.is_some_and(|v| param.value.matches(&percent_decode(v))) {
                    return false;
                }
            }
        }
        true
    }

    /// The Gateway API precedence key: smaller sorts first. Exact path, then regular
    /// expression (implementation-specific in the spec; weft ranks it between exact and
    /// prefix), then the longest prefix; then a method match; then the most header
    /// matches; then the most query matches. Ties keep route and rule order.
    pub fn precedence(&self) -> impl Ord {
        let (kind, length) = match &self.path {
            PathMatcher::Exact(v) => (0u8, v.len()),
            PathMatcher::RegularExpression(p) => (1, p.source.len()),
            PathMatcher::PathPrefix(v) => (2, v.trim_end_matches('/').len()),
        };
        (kind, Reverse(length), self.method.is_none(), Reverse(self.headers.len()), Reverse(self.query_params.len()))
    }
}

/// Decodes `%XX` escapes and `+` in a query value; invalid escapes are kept verbatim.
fn percent_decode(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.contains(['%', '+']) {
        return value.into();
    }
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push(high << 4 | low);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned().into()
}

fn hex(digit: u8) -> Option<u8> {
    (digit as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(method: &'a Method, path: &'a str, query: Option<&'a str>, headers: &'a HeaderMap) -> RequestView<'a> {
        RequestView { method, path, query, headers }
    }

    #[test]
    fn prefix_matches_whole_segments() {
        let m = PathMatcher::PathPrefix("/foo".into());
        assert!(m.matches("/foo"));
        assert!(m.matches("/foo/"));
        assert!(m.matches("/foo/bar"));
        assert!(!m.matches("/foobar"));
        assert!(PathMatcher::PathPrefix("/foo/".into()).matches("/foo"));
        assert!(PathMatcher::PathPrefix("/".into()).matches("/anything"));
    }

    #[test]
    fn headers_query_and_method_all_must_hold() {
        let matcher = RequestMatcher {
            path: PathMatcher::PathPrefix("/".into()),
            method: Some(Method::GET),
            headers: vec![NamedMatcher { name: "x-canary".into(), value: ValueMatcher::Exact("true".into()) }],
            query_params: vec![NamedMatcher {
                name: "q".into(),
                value: ValueMatcher::RegularExpression(Pattern::full("a b|c").unwrap()),
            }],
        };
        let mut headers = HeaderMap::new();
        headers.insert("x-canary", "true".parse().unwrap());
        assert!(matcher.matches(&view(&Method::GET, "/", Some("x=1&q=a+b"), &headers)));
        assert!(matcher.matches(&view(&Method::GET, "/", Some("q=a%20b"), &headers)));
        assert!(!matcher.matches(&view(&Method::POST, "/", Some("q=c"), &headers)));
        assert!(!matcher.matches(&view(&Method::GET, "/", Some("q=cc"), &headers)));
        assert!(!matcher.matches(&view(&Method::GET, "/", None, &headers)));
        assert!(!matcher.matches(&view(&Method::GET, "/", Some("q=c"), &HeaderMap::new())));
    }

    #[test]
    fn precedence_orders_exact_then_longest_prefix_then_method_then_headers() {
        let prefix = |p: &str| RequestMatcher { path: PathMatcher::PathPrefix(p.into()), ..RequestMatcher::any() };
        let exact = RequestMatcher { path: PathMatcher::Exact("/a".into()), ..RequestMatcher::any() };
        let with_method = RequestMatcher { method: Some(Method::GET), ..prefix("/a") };
        let with_header = RequestMatcher {
            headers: vec![NamedMatcher { name: "h".into(), value: ValueMatcher::Exact("v".into()) }],
            ..prefix("/a")
        };
        let mut all =
            [prefix("/"), with_header.clone(), prefix("/a/b"), with_method.clone(), exact.clone(), prefix("/a")];
        all.sort_by_key(|m| m.precedence());
        assert_eq!(all[0], exact);
        assert_eq!(all[1], prefix("/a/b"));
        assert_eq!(all[2], with_method);
        assert_eq!(all[3], with_header);
        assert_eq!(all[4], prefix("/a"));
        assert_eq!(all[5], prefix("/"));
    }
}
