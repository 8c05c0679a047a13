//! Issuing a workload certificate to a proxy: the control plane's half of a proxy joining
//! the mesh, independent of the transport that will carry it.
//!
//! A first request carries a join token; the identity comes from the token's record,
//! never from the request, and must be the workload the proxy says it runs. A renewal
//! carries no token: the identity is the one the proxy's current certificate proved on
//! the connection (so a running proxy outlives its token's expiry, as a restarted one
//! does not).

use std::time::{Duration, SystemTime};

use weft_identity::{SignedCertificate, SpiffeId};

use crate::{
    ca::CaState,
    catalog::Catalog,
    join_tokens::{self, JoinTokenError},
};

/// How long a workload certificate lasts unless `weft control --cert-lifetime` says
/// otherwise.
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// How a proxy proves who it is when it asks for a certificate.
pub enum Proof<'a> {
    /// A join token, for the workload `namespace`/`account` (`None`: the token's own
    /// account).
    Token { token: &'a str, namespace: &'a str, account: Option<&'a str> },
    /// The identity its current certificate proved on this connection, and that
    /// certificate's serial.
    Certificate { identity: &'a SpiffeId, serial: Option<&'a str> },
}

/// Why no certificate was issued.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error(transparent)]
    Token(#[from] JoinTokenError),
    #[error("the join token is for another mesh (its root hash is not this CA's): check --control and the token")]
    OtherMesh,
    #[error("{0}")]
    Identity(#[from] weft_identity::IdentityError),
    #[error("{0} is revoked: no certificate is issued for it (weft revoke list)")]
    Revoked(String),
}

/// Signs the key in `request` (DER PKCS#10) for the identity `proof` establishes.
pub fn issue(
    catalog: &Catalog,
    ca: &CaState,
    proof: Proof<'_>,
    request: &[u8],
    lifetime: Duration,
    now: SystemTime,
) -> Result<(SpiffeId, SignedCertificate), SigningError> {
    let revoked = crate::revocations::current(catalog);
    let identity = match proof {
        Proof::Token { token, namespace, account } => {
            // During a rotation, tokens of the old root still join.
            let presented = join_tokens::parse(token)?.root_hash;
            if !ca.root_hashes().iter().any(|hash| hash == presented) {
                return Err(SigningError::OtherMesh);
            }
            join_tokens::check(catalog, token, namespace, account, now)?
        }
        Proof::Certificate { identity, serial } => {
            if revoked.refuses(None, serial) {
                return Err(SigningError::Revoked(format!("the certificate {}", serial.unwrap_or_default())));
            }
            identity.clone()
        }
    };
    if revoked.refuses(Some(&identity.to_string()), None) {
        return Err(SigningError::Revoked(identity.to_string()));
    }
    let signed = ca.authority.sign(request, &identity, lifetime, now)?;
    tracing::info!(%identity, serial = %signed.serial, "issued a workload certificate");
    Ok((identity, signed))
}

#[cfg(test)]
mod tests {
    use weft_identity::{authority::new_key_and_request, verify::Usage, Authority, TrustDomain};

    use super::*;
    use crate::catalog::test_catalog;

    #[tokio::test]
    async fn the_identity_comes_from_the_token_and_renewals_keep_it() {
        let dir = tempfile::tempdir().unwrap();
        let (catalog, _) = test_catalog(dir.path()).await;
        let domain = TrustDomain::new("weft.local").unwrap();
        let now = SystemTime::now();
        let ca = CaState::from_authority(Authority::generate(&domain, now).unwrap());
        let authority = &ca.authority;
        let made = join_tokens::create(
            &catalog,
            &domain,
            &authority.root_hash(),
            "default",
            "reviews",
            DEFAULT_CERT_LIFETIME,
            now,
            &crate::operator_tokens::Operator::control_plane("test"),
        )
        .await
        .unwrap();

        let (_, request) = new_key_and_request().unwrap();
        let proof = Proof::Token { token: &made.token, namespace: "default", account: Some("reviews") };
        let (identity, signed) = issue(&catalog, &ca, proof, &request, DEFAULT_CERT_LIFETIME, now).unwrap();
        assert_eq!(identity.to_string(), "spiffe://weft.local/ns/default/sa/reviews");
        let roots = [authority.root().clone()];
        let proved =
            weft_identity::verify_workload_certificate(&signed.chain, &roots, &domain, now, Usage::Client).unwrap();
        assert_eq!(proved, identity);

        // A renewal on the strength of the certificate: same identity, new key.
        let (_, request) = new_key_and_request().unwrap();
        let (renewed, _) = issue(
            &catalog,
            &ca,
            Proof::Certificate { identity: &proved, serial: None },
            &request,
            DEFAULT_CERT_LIFETIME,
            now,
        )
        .unwrap();
        assert_eq!(renewed, identity);

        // The token does not admit another workload, nor a proxy of another mesh.
        let proof = Proof::Token { token: &made.token, namespace: "default", account: Some("admin") };
        let error = issue(&catalog, &ca, proof, &request, DEFAULT_CERT_LIFETIME, now).unwrap_err();
        assert!(matches!(error, SigningError::Token(JoinTokenError::OtherIdentity { .. })), "{error}");
        let other = CaState::from_authority(Authority::generate(&domain, now).unwrap());
        let proof = Proof::Token { token: &made.token, namespace: "default", account: Some("reviews") };
        let error = issue(&catalog, &other, proof, &request, DEFAULT_CERT_LIFETIME, now).unwrap_err();
        assert!(matches!(error, SigningError::OtherMesh), "{error}");

        // Once revoked, the token admits no one.
        join_tokens::revoke(&catalog, &made.record.id, &crate::operator_tokens::Operator::control_plane("test"))
            .await
            .unwrap();
        let proof = Proof::Token { token: &made.token, namespace: "default", account: Some("reviews") };
        let error = issue(&catalog, &ca, proof, &request, DEFAULT_CERT_LIFETIME, now).unwrap_err();
        assert!(matches!(error, SigningError::Token(JoinTokenError::Revoked(_))), "{error}");
    }
}
