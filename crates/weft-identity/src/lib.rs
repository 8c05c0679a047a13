//! Workload identities for weft: who a proxy is, proven by a certificate the mesh's own
//! certificate authority signed.
//!
//! [`spiffe`] (re-exported from `weft-model`) names identities (`spiffe://<trust-domain>/ns/<namespace>/sa/<account>`);
//! [`authority`] is the CA the control plane runs: it makes or loads a root, and signs a
//! proxy's key into a short-lived certificate carrying the identity the control plane
//! vouches for, never the one the request asks for; [`verify`] checks a peer's chain
//! against a trust bundle and reads its one SPIFFE identity, as both ends of a mesh TLS
//! connection must; [`tls`] builds the rustls configurations of both ends on it.
//!
//! [`token`] is the format of the bearer tokens: join tokens (proxies) and operator
//! tokens (the API).
//!
//! Keys are ECDSA P-256 throughout, signed and verified with ring.

#![forbid(unsafe_code)]

pub mod authority;
pub mod token;
/// SPIFFE IDs and trust domains, defined with the resource model (which names them too).
pub mod spiffe {
    pub use weft_model::spiffe::*;
}
pub mod tls;
pub mod verify;

pub use authority::{Authority, SignedCertificate};
pub use spiffe::{SpiffeId, TrustDomain};
pub use verify::verify_workload_certificate;

/// Seconds since the Unix epoch, as certificates, tokens and the API state times (0
/// for a clock before 1970).
pub fn unix_seconds(time: std::time::SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A certificate serial as weft shows and compares it: lowercase hex without leading
/// zeros (DER may prefix a zero byte that the issuer's own rendering lacks).
pub fn normalize_serial(serial: &str) -> String {
    let lower = serial.trim().to_ascii_lowercase();
    let trimmed = lower.trim_start_matches('0');
    if trimmed.is_empty() && !lower.is_empty() {
        "0".to_string()
    } else {
        trimmed.to_string()
    }
}

/// The serial of a DER certificate, normalized ([`normalize_serial`]).
pub fn certificate_serial(der: &[u8]) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(normalize_serial(&hex::encode(parsed.raw_serial())))
}

/// `time` as RFC 3339 in UTC to the second (`2026-12-02T08:00:26Z`), as logs and the
/// CLI show certificate and token times.
pub fn rfc3339(time: std::time::SystemTime) -> String {
    let format = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    time::OffsetDateTime::from(time).format(format).unwrap_or_else(|_| format!("{}s", unix_seconds(time)))
}

/// `unix_millis` as RFC 3339 in UTC with milliseconds (`2026-12-05T10:04:05.123Z`).
pub fn rfc3339_millis(unix_millis: u64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_millis);
    let format =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    time::OffsetDateTime::from(time).format(format).unwrap_or_else(|_| format!("{unix_millis}ms"))
}

/// Why an identity could not be made, signed or verified.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Spiffe(#[from] weft_model::SpiffeError),
    #[error("the CA certificate or key is unusable: {0}")]
    Authority(String),
    #[error("the certificate signing request is unusable: {0}")]
    Request(String),
    #[error("the peer's certificate is refused: {0}")]
    Refused(String),
}

/// What the tests of every module share.
#[cfg(test)]
pub(crate) mod testing {
    use crate::{SpiffeId, TrustDomain};

    pub fn domain() -> TrustDomain {
        TrustDomain::new("weft.local").unwrap()
    }

    #[test]
    fn times_are_shown_as_rfc3339() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_198_426);
        assert_eq!(crate::rfc3339(at), "2026-12-02T08:00:26Z");
    }

    /// `spiffe://weft.local/ns/default/sa/<account>`.
    pub fn id(account: &str) -> SpiffeId {
        SpiffeId::workload(&domain(), "default", account).unwrap()
    }
}
