//! SPIFFE IDs, the names of workload identities. weft issues one shape,
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, and reads any
//! well-formed one (peers may come from another SPIFFE issuer), following the SPIFFE ID
//! specification: lowercase trust domain; path segments of letters, digits, `.`, `-` and
//! `_`, none empty, `.` or `..`; no query, fragment, port or user info.
//!
//! They live in the model crate, not with the certificate code, because resources name
//! identities too (`Workload.spec.identity`, authorization principals): validating a
//! document must not pull a TLS stack into every crate that reads one.

use std::fmt;

/// Why a text is not a trust domain or a SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    #[error("{0:?} is not a valid trust domain: use lowercase letters, digits, '.', '-' and '_' (at most 255)")]
    TrustDomain(String),
    #[error("{id:?} is not a SPIFFE ID: {reason}")]
    SpiffeId { id: String, reason: String },
}

/// A trust domain: the scope of one root of trust (`weft.local` by default).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn new(name: &str) -> Result<Self, SpiffeError> {
        let valid = !name.is_empty()
            && name.len() <= 255
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'));
        if valid {
            Ok(TrustDomain(name.to_string()))
        } else {
            Err(SpiffeError::TrustDomain(name.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `spiffe://<trust-domain>`: the identity of the trust domain itself, which the
    /// root certificate carries.
    pub fn id(&self) -> String {
        format!("spiffe://{}", self.0)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The path of the control plane's identity.
const CONTROL_PLANE_PATH: &str = "ns/weft-system/sa/weft-control";

/// A workload identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    /// The path without its leading `/`, e.g. `ns/default/sa/reviews`.
    path: String,
}

fn segment_ok(segment: &str) -> bool {
    !segment.is_empty()
        && segment != "."
        && segment != ".."
        && segment.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

impl SpiffeId {
    /// The identity weft gives a workload: `ns/<namespace>/sa/<service-account>`.
    pub fn workload(trust_domain: &TrustDomain, namespace: &str, account: &str) -> Result<Self, SpiffeError> {
        SpiffeId::parse(&format!("spiffe://{trust_domain}/ns/{namespace}/sa/{account}"))
    }

    /// The control plane's own identity in `trust_domain`, which proxies require of it:
    /// `ns/weft-system/sa/weft-control`.
    pub fn control_plane(trust_domain: &TrustDomain) -> Self {
        SpiffeId { trust_domain: trust_domain.clone(), path: CONTROL_PLANE_PATH.to_string() }
    }

    /// Whether this is a control plane's identity (in any trust domain).
    pub fn is_control_plane(&self) -> bool {
        self.path == CONTROL_PLANE_PATH
    }

    /// Reads a SPIFFE ID from its URI form.
    pub fn parse(text: &str) -> Result<Self, SpiffeError> {
        let fail = |reason: &str| SpiffeError::SpiffeId { id: text.to_string(), reason: reason.to_string() };
        let rest = text.strip_prefix("spiffe://").ok_or_else(|| fail("it must start with spiffe://"))?;
        if rest.contains(['?', '#']) {
            return Err(fail("it cannot have a query or a fragment"));
        }
        let (domain, path) = rest.split_once('/').ok_or_else(|| fail("a workload identity needs a path"))?;
        if domain.contains([':', '@']) {
            return Err(fail("the trust domain cannot have a port or user info"));
        }
        let trust_domain = TrustDomain::new(domain).map_err(|e| fail(&e.to_string()))?;
        if !path.split('/').all(segment_ok) {
            return Err(fail("each path segment must be letters, digits, '.', '-' or '_', and not empty, '.' or '..'"));
        }
        Ok(SpiffeId { trust_domain, path: path.to_string() })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The namespace and service account of a weft workload identity, if it has that
    /// shape.
    pub fn workload_parts(&self) -> Option<(&str, &str)> {
        let mut parts = self.path.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("ns"), Some(namespace), Some("sa"), Some(account), None) => Some((namespace, account)),
            _ => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/{}", self.trust_domain, self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_ids_round_trip() {
        let domain = TrustDomain::new("weft.local").unwrap();
        let id = SpiffeId::workload(&domain, "default", "reviews").unwrap();
        assert_eq!(id.to_string(), "spiffe://weft.local/ns/default/sa/reviews");
        assert_eq!(SpiffeId::parse(&id.to_string()).unwrap(), id);
        assert_eq!(id.workload_parts(), Some(("default", "reviews")));
        assert_eq!(SpiffeId::parse("spiffe://other.org/payments/api").unwrap().workload_parts(), None);
    }

    #[test]
    fn malformed_ids_are_refused_with_the_reason() {
        for (text, reason) in [
            ("https://weft.local/ns/a/sa/b", "spiffe://"),
            ("spiffe://weft.local", "needs a path"),
            ("spiffe://Weft.Local/ns/a/sa/b", "trust domain"),
            ("spiffe://weft.local:8443/ns/a/sa/b", "port"),
            ("spiffe://weft.local/ns/../sa/b", "segment"),
            ("spiffe://weft.local/ns//sa/b", "segment"),
            ("spiffe://weft.local/ns/a/sa/b?x=1", "query"),
            ("spiffe://weft.local/ns/a b/sa/c", "segment"),
        ] {
            let error = SpiffeId::parse(text).unwrap_err().to_string();
            assert!(error.contains(reason), "{text}: {error}");
        }
        assert!(TrustDomain::new("").is_err());
    }
}
