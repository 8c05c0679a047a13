//! Checking a peer's workload certificate, as both ends of a mesh connection do: the
//! chain must lead to a root of the trust bundle, be valid now and fit the use (client or
//! server), and the leaf must be a workload's (not a CA) and name exactly one SPIFFE
//! identity, in the expected trust domain. The chain itself is checked by webpki, the
//! verifier rustls uses; the identity rules are the SPIFFE X.509-SVID ones.

use std::time::SystemTime;

use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::extensions::GeneralName;

use crate::{IdentityError, SpiffeId, TrustDomain};

/// Which side the certificate authenticates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// The calling proxy (checked by the inbound side).
    Client,
    /// The called proxy (checked by the outbound side).
    Server,
}

fn refused(reason: impl Into<String>) -> IdentityError {
    IdentityError::Refused(reason.into())
}

/// The most certificates a peer's chain may hold: a leaf, intermediates, and the roots
/// and bridges a rotation sends along are a handful; a chain of hundreds is an attack on
/// path building, refused before any signature is checked.
pub const MAX_CHAIN: usize = 8;

/// Verifies `chain` (leaf first) against `roots` at `now` and returns the identity it
/// proves.
pub fn verify_workload_certificate(
    chain: &[CertificateDer<'_>],
    roots: &[CertificateDer<'_>],
    trust_domain: &TrustDomain,
    now: SystemTime,
    usage: Usage,
) -> Result<SpiffeId, IdentityError> {
    let leaf = chain.first().ok_or_else(|| refused("no certificate was presented"))?;
    if chain.len() > MAX_CHAIN {
        return Err(refused(format!(
            "a chain of {} certificates was presented; a mesh chain has at most {MAX_CHAIN}",
            chain.len()
        )));
    }
    let anchors = roots
        .iter()
        .map(|root| webpki::anchor_from_trusted_cert(root).map(|anchor| anchor.to_owned()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| refused(format!("the trust bundle holds an unusable root: {e}")))?;
    let end_entity =
        webpki::EndEntityCert::try_from(leaf).map_err(|e| refused(format!("the certificate cannot be read: {e}")))?;
    let time = UnixTime::since_unix_epoch(now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default());
    let key_usage = match usage {
        Usage::Client => webpki::KeyUsage::client_auth(),
        Usage::Server => webpki::KeyUsage::server_auth(),
    };
    end_entity
        .verify_for_usage(webpki::ALL_VERIFICATION_ALGS, &anchors, &chain[1..], time, key_usage, None, None)
        .map_err(|error| {
            refused(match error {
                webpki::Error::CertExpired { .. } => "the certificate has expired".to_string(),
                webpki::Error::CertNotValidYet { .. } => "the certificate is not valid yet".to_string(),
                // Another CA with the same name as ours fails on the signature instead.
                webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
                    "the certificate was not issued by this mesh's CA".to_string()
                }
                webpki::Error::CaUsedAsEndEntity => "a CA certificate cannot be a workload's".to_string(),
                webpki::Error::InvalidCertValidity => {
                    "the certificate's validity period is malformed (notAfter before notBefore)".to_string()
                }
                other => format!("the certificate chain does not verify: {other}"),
            })
        })?;

    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| refused(format!("the certificate cannot be read: {e}")))?;
    if parsed.is_ca() {
        return Err(refused("a CA certificate cannot be a workload's"));
    }
    let names = parsed
        .subject_alternative_name()
        .map_err(|e| refused(format!("the subject alternative names cannot be read: {e}")))?
        .map(|san| san.value.general_names.clone())
        .unwrap_or_default();
    let uris: Vec<&str> = names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    let [uri] = uris.as_slice() else {
        return Err(refused(format!(
            "a workload certificate names exactly one SPIFFE ID; this one has {}",
            uris.len()
        )));
    };
    let id = SpiffeId::parse(uri)?;
    if id.trust_domain() != trust_domain {
        return Err(refused(format!("{id} is not in this mesh's trust domain {trust_domain}")));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rcgen::{CertificateParams, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};

    use super::*;
    use crate::{
        authority::{new_key_and_request, Authority},
        testing::{domain, id},
    };

    fn signed(authority: &Authority, now: SystemTime, lifetime: Duration) -> Vec<CertificateDer<'static>> {
        let (_, request) = new_key_and_request().unwrap();
        authority.sign(&request, &id("reviews"), lifetime, now).unwrap().chain
    }

    #[test]
    fn another_cas_certificate_is_refused() {
        let now = SystemTime::now();
        let ours = Authority::generate(&domain(), now).unwrap();
        let theirs = Authority::generate(&domain(), now).unwrap();
        let chain = signed(&theirs, now, Duration::from_secs(3600));
        let error = verify_workload_certificate(&chain, &[ours.root().clone()], &domain(), now, Usage::Client)
            .unwrap_err()
            .to_string();
        assert!(error.contains("not issued by this mesh's CA"), "{error}");
    }

    #[test]
    fn an_expired_or_future_certificate_is_refused() {
        let now = SystemTime::now();
        let authority = Authority::generate(&domain(), now).unwrap();
        let roots = [authority.root().clone()];
        let chain = signed(&authority, now, Duration::from_secs(10));
        let later = now + Duration::from_secs(11);
        let error = verify_workload_certificate(&chain, &roots, &domain(), later, Usage::Server).unwrap_err();
        assert!(error.to_string().contains("expired"), "{error}");
        let earlier = now - Duration::from_secs(3600);
        let error = verify_workload_certificate(&chain, &roots, &domain(), earlier, Usage::Server).unwrap_err();
        assert!(error.to_string().contains("not valid yet"), "{error}");
    }

    #[test]
    fn a_root_presented_as_a_workload_is_refused() {
        let now = SystemTime::now();
        let authority = Authority::generate(&domain(), now).unwrap();
        let roots = [authority.root().clone()];
        let error = verify_workload_certificate(&roots, &roots, &domain(), now, Usage::Client).unwrap_err();
        assert!(error.to_string().contains("CA certificate"), "{error}");
    }

    #[test]
    fn two_identities_or_none_or_a_foreign_trust_domain_are_refused() {
        let now = SystemTime::now();
        // A CA that would sign anything (as a compromised or careless one might).
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca = CertificateParams::default();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let root = ca.self_signed(&key).unwrap();
        let issuer = rcgen::Issuer::new(ca, key);
        let leaf = |uris: &[&str]| {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
            let mut params = CertificateParams::default();
            params.subject_alt_names = uris.iter().map(|u| SanType::URI((*u).try_into().unwrap())).collect();
            vec![params.signed_by(&key, &issuer).unwrap().der().clone()]
        };
        let roots = [root.der().clone()];
        let check = |uris: &[&str]| {
            verify_workload_certificate(&leaf(uris), &roots, &domain(), now, Usage::Client).map_err(|e| e.to_string())
        };
        let a = "spiffe://weft.local/ns/default/sa/a";
        assert!(check(&[a]).is_ok());
        assert!(check(&[a, "spiffe://weft.local/ns/default/sa/b"]).unwrap_err().contains("exactly one"));
        assert!(check(&[]).unwrap_err().contains("exactly one"));
        assert!(check(&["spiffe://other.org/ns/default/sa/a"]).unwrap_err().contains("trust domain"));
        assert!(check(&["https://weft.local/a"]).unwrap_err().contains("not a SPIFFE ID"));
    }
}
