//! The mesh's certificate authority. The control plane makes a self-signed root at first
//! start (or loads a root or intermediate the operator provides) and signs proxies' keys
//! into short-lived workload certificates.
//!
//! What a signed certificate says is decided here, not by the request: the proxy's
//! certificate signing request contributes its public key and nothing else (its names and
//! extensions are ignored), so a proxy can never ask its way into another identity.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
    PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::{pem::PemObject, CertificateDer, CertificateSigningRequestDer};
use time::OffsetDateTime;

use crate::{IdentityError, SpiffeId, TrustDomain};

/// How far back a workload certificate's `notBefore` is set, so that a peer whose clock
/// is a little behind does not refuse a fresh certificate.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
/// How long a root made by [`Authority::generate`] is valid.
pub const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A workload certificate, as issued.
#[derive(Clone, Debug)]
pub struct SignedCertificate {
    /// The leaf, then any intermediates up to (not including) the root: what the proxy
    /// presents in its handshakes.
    pub chain_pem: String,
    pub chain: Vec<CertificateDer<'static>>,
    /// Hex, as tools print it.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// The mesh's CA.
pub struct Authority {
    trust_domain: TrustDomain,
    /// The signing certificate, then the certificates above it up to the root (for a
    /// root, just itself).
    certificates: Vec<CertificateDer<'static>>,
    key_pem: String,
    not_after: SystemTime,
    issuer: Issuer<'static, KeyPair>,
}

/// Shows what the authority is, never its key.
impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("trust_domain", &self.trust_domain)
            .field("root_hash", &self.root_hash())
            .field("certificates", &self.certificates.len())
            .finish_non_exhaustive()
    }
}

fn authority_error(error: impl std::fmt::Display) -> IdentityError {
    IdentityError::Authority(error.to_string())
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // A positive INTEGER, never zero.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

/// Certificates as PEM, one block each.
pub fn pem_of(certificates: &[CertificateDer<'_>]) -> String {
    let pems: Vec<pem::Pem> = certificates.iter().map(|der| pem::Pem::new("CERTIFICATE", der.to_vec())).collect();
    pem::encode_many_config(&pems, pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF))
}

impl Authority {
    /// Makes a new self-signed root for `trust_domain`: ECDSA P-256, valid for
    /// [`ROOT_LIFETIME`], carrying the trust domain's own SPIFFE ID.
    pub fn generate(trust_domain: &TrustDomain, now: SystemTime) -> Result<Self, IdentityError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(authority_error)?;
        let params = root_params(trust_domain, now)?;
        let certificate = params.self_signed(&key).map_err(authority_error)?;
        Ok(Authority {
            trust_domain: trust_domain.clone(),
            certificates: vec![certificate.der().clone()],
            key_pem: key.serialize_pem(),
            not_after: now + ROOT_LIFETIME,
            issuer: Issuer::new(params, key),
        })
    }

    /// Makes the root that replaces this CA's in a rotation, and a bridge: the new root's
    /// subject and key, certified by this CA. A party that trusts only the old root (a
    /// proxy joining with a token made before the rotation) verifies new chains through
    /// the bridge.
    pub fn successor(&self, now: SystemTime) -> Result<(Authority, CertificateDer<'static>), IdentityError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(authority_error)?;
        let params = root_params(&self.trust_domain, now)?;
        let certificate = params.self_signed(&key).map_err(authority_error)?;
        // The bridge cannot outlive the CA that vouches for it.
        let bridge_params = {
            let mut bridge = root_params(&self.trust_domain, now)?;
            bridge.distinguished_name = params.distinguished_name.clone();
            bridge.serial_number = Some(random_serial());
            bridge.not_after = OffsetDateTime::from((now + ROOT_LIFETIME).min(self.not_after));
            bridge.use_authority_key_identifier_extension = true;
            bridge
        };
        let bridge = bridge_params.signed_by(&key, &self.issuer).map_err(authority_error)?;
        let next = Authority {
            trust_domain: self.trust_domain.clone(),
            certificates: vec![certificate.der().clone()],
            key_pem: key.serialize_pem(),
            not_after: now + ROOT_LIFETIME,
            issuer: Issuer::from_ca_cert_der(certificate.der(), key).map_err(authority_error)?,
        };
        Ok((next, bridge.der().clone()))
    }

    /// Loads a CA: `certificates_pem` holds the signing certificate first, then, for an
    /// intermediate, the certificates above it up to the root; `key_pem` is the signing
    /// certificate's ECDSA P-256 key.
    pub fn from_pem(
        trust_domain: &TrustDomain,
        certificates_pem: &str,
        key_pem: &str,
        now: SystemTime,
    ) -> Result<Self, IdentityError> {
        let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(certificates_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| authority_error(format!("cannot read the certificates: {e}")))?;
        let Some(signing) = certificates.first() else {
            return Err(authority_error("the certificate file holds no certificate"));
        };
        if key_pem.contains("BEGIN EC PRIVATE KEY") {
            return Err(authority_error(
                "the key is in SEC1 form (BEGIN EC PRIVATE KEY); convert it to PKCS#8 with: openssl pkcs8 -topk8 \
                 -nocrypt -in KEY -out KEY.pkcs8",
            ));
        }
        let key = KeyPair::from_pem(key_pem).map_err(|e| authority_error(format!("cannot read the key: {e}")))?;
        if key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(authority_error("the key must be ECDSA P-256"));
        }
        let (_, parsed) = x509_parser::parse_x509_certificate(signing)
            .map_err(|e| authority_error(format!("cannot parse the CA certificate: {e}")))?;
        if !parsed.is_ca() {
            return Err(authority_error("the certificate is not a CA certificate (basicConstraints cA is not set)"));
        }
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(authority_error("the key does not belong to the certificate"));
        }
        let not_before = from_unix(parsed.validity().not_before.timestamp());
        let not_after = from_unix(parsed.validity().not_after.timestamp());
        if now < not_before || now >= not_after {
            return Err(authority_error("the CA certificate is not valid now (check its dates and this host's clock)"));
        }
        let root = certificates.last().expect("not empty");
        let (_, root_parsed) = x509_parser::parse_x509_certificate(root)
            .map_err(|e| authority_error(format!("cannot parse a certificate of the chain: {e}")))?;
        if root_parsed.subject() != root_parsed.issuer() {
            return Err(authority_error(
                "the chain does not end at a root: append the issuing certificates up to the self-signed root",
            ));
        }
        let issuer = Issuer::from_ca_cert_der(signing, key).map_err(authority_error)?;
        Ok(Authority {
            trust_domain: trust_domain.clone(),
            key_pem: key_pem.to_string(),
            certificates,
            not_after,
            issuer,
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The signing certificate and the chain above it, PEM (to store, with the key).
    pub fn certificates_pem(&self) -> String {
        pem_of(&self.certificates)
    }

    /// The signing key, PEM. Secret: the store keeps it, the API never shows it.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The root every workload certificate chains to: the trust bundle.
    pub fn root(&self) -> &CertificateDer<'static> {
        self.certificates.last().expect("an authority has a certificate")
    }

    /// SHA-256 of the root certificate (hex): what a join token carries so that a proxy
    /// can check, on first contact, that it talks to the right control plane.
    pub fn root_hash(&self) -> String {
        hex::encode(ring::digest::digest(&ring::digest::SHA256, self.root()))
    }

    /// Signs the key in `request` (a DER PKCS#10 request, ECDSA P-256) into a certificate
    /// for `id`, valid from [`CLOCK_SKEW`] ago for `lifetime` (never past the CA's own
    /// expiry).
    pub fn sign(
        &self,
        request: &[u8],
        id: &SpiffeId,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<SignedCertificate, IdentityError> {
        self.sign_with_names(request, id, &[], lifetime, now)
    }

    /// As [`Authority::sign`], with DNS names and IP addresses (`names`) as further SANs:
    /// the control plane's HTTPS certificate, which browsers and Prometheus check by name
    /// while weft's CLI checks the SPIFFE ID.
    pub fn sign_with_names(
        &self,
        request: &[u8],
        id: &SpiffeId,
        names: &[String],
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<SignedCertificate, IdentityError> {
        if id.trust_domain() != &self.trust_domain {
            return Err(IdentityError::Request(format!(
                "{id} is outside this CA's trust domain {}",
                self.trust_domain
            )));
        }
        let request = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(request))
            .map_err(|e| IdentityError::Request(e.to_string()))?;
        if request.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(IdentityError::Request("the key must be ECDSA P-256".into()));
        }
        let not_before = now - CLOCK_SKEW;
        let not_after = (now + lifetime).min(self.not_after);
        let mut params = CertificateParams::default();
        // SPIFFE: the identity is the URI SAN alone; with an empty subject the SAN
        // extension is critical.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names =
            vec![SanType::URI(id.to_string().try_into().map_err(|e| IdentityError::Request(format!("{e}")))?)];
        for name in names {
            let san = match name.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    name.clone().try_into().map_err(|e| IdentityError::Request(format!("name {name:?}: {e}")))?,
                ),
            };
            params.subject_alt_names.push(san);
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = OffsetDateTime::from(not_before);
        params.not_after = OffsetDateTime::from(not_after);
        let serial = random_serial();
        let serial_hex = crate::normalize_serial(&hex::encode(serial.as_ref()));
        params.serial_number = Some(serial);
        params.use_authority_key_identifier_extension = true;
        let leaf = params.signed_by(&request.public_key, &self.issuer).map_err(authority_error)?;
        // The presented chain: the leaf and every intermediate, not the root.
        let mut chain = vec![leaf.der().clone()];
        chain.extend(self.certificates[..self.certificates.len() - 1].iter().cloned());
        Ok(SignedCertificate { chain_pem: pem_of(&chain), chain, serial: serial_hex, not_before, not_after })
    }
}

/// A root's fields: ECDSA P-256, valid for [`ROOT_LIFETIME`], carrying the trust domain's
/// own SPIFFE ID, named with its making time and a random tag (so that the roots of a
/// rotation differ, even within a second).
fn root_params(trust_domain: &TrustDomain, now: SystemTime) -> Result<CertificateParams, IdentityError> {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "weft");
    let made = OffsetDateTime::from(now);
    name.push(
        DnType::CommonName,
        format!(
            "weft root CA for {trust_domain} ({:04}-{:02}-{:02} {:02}:{:02}:{:02}, {})",
            made.year(),
            u8::from(made.month()),
            made.day(),
            made.hour(),
            made.minute(),
            made.second(),
            hex::encode(rand::random::<[u8; 4]>())
        ),
    );
    params.distinguished_name = name;
    let uri = trust_domain.id().try_into().map_err(authority_error)?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = OffsetDateTime::from(now - CLOCK_SKEW);
    params.not_after = OffsetDateTime::from(now + ROOT_LIFETIME);
    params.serial_number = Some(random_serial());
    Ok(params)
}

fn from_unix(seconds: i64) -> SystemTime {
    if seconds >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds as u64)
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(seconds.unsigned_abs())
    }
}

/// Makes a fresh ECDSA P-256 key and a request for it, as a proxy does: the key stays
/// with the caller. Returns (key PEM, request DER).
pub fn new_key_and_request() -> Result<(String, Vec<u8>), IdentityError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(authority_error)?;
    let request = CertificateParams::default().serialize_request(&key).map_err(authority_error)?;
    Ok((key.serialize_pem(), request.der().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        testing::{domain, id},
        verify::{verify_workload_certificate, Usage},
    };

    #[test]
    fn a_successor_is_trusted_through_its_bridge_by_those_who_know_only_the_old_root() {
        let now = SystemTime::now();
        let old = Authority::generate(&domain(), now).unwrap();
        let (next, bridge) = old.successor(now).unwrap();
        assert_ne!(next.root_hash(), old.root_hash());
        let (_, request) = new_key_and_request().unwrap();
        let signed = next.sign(&request, &id("reviews"), Duration::from_secs(3600), now).unwrap();
        let verify = |chain: &[CertificateDer<'static>], root: &CertificateDer<'static>| {
            verify_workload_certificate(chain, std::slice::from_ref(root), &domain(), now, Usage::Server)
        };
        assert_eq!(verify(&signed.chain, next.root()).unwrap(), id("reviews"));
        assert!(verify(&signed.chain, old.root()).is_err(), "the old root alone does not know the new one");
        let mut bridged = signed.chain.clone();
        bridged.push(bridge);
        assert_eq!(verify(&bridged, old.root()).unwrap(), id("reviews"));
    }

    #[test]
    fn a_signed_certificate_carries_the_given_identity_not_the_requested_one() {
        let now = SystemTime::now();
        let authority = Authority::generate(&domain(), now).unwrap();
        // A request that asks for another identity, and to be a CA.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut asked = CertificateParams::new(vec![]).unwrap();
        asked.subject_alt_names = vec![SanType::URI("spiffe://weft.local/ns/default/sa/admin".try_into().unwrap())];
        let request = asked.serialize_request(&key).unwrap();

        let day = Duration::from_secs(24 * 3600);
        let signed = authority.sign(request.der(), &id("reviews"), day, now).unwrap();
        let verified =
            verify_workload_certificate(&signed.chain, &[authority.root().clone()], &domain(), now, Usage::Client)
                .unwrap();
        assert_eq!(verified, id("reviews"));
        assert_eq!(signed.not_after.duration_since(now).unwrap(), day);
        assert_eq!(now.duration_since(signed.not_before).unwrap(), CLOCK_SKEW);
        let (_, parsed) = x509_parser::parse_x509_certificate(&signed.chain[0]).unwrap();
        assert!(!parsed.is_ca());
        // Serials are compared normalized everywhere (no leading zero nibbles), as the
        // proxies read them from a peer's certificate; a raw encoding may start with 0.
        assert_eq!(crate::certificate_serial(&signed.chain[0]).unwrap(), signed.serial);
        assert_eq!(crate::normalize_serial(&hex::encode(parsed.raw_serial())), signed.serial);
    }

    #[test]
    fn a_request_outside_the_trust_domain_or_with_another_key_type_is_refused() {
        let now = SystemTime::now();
        let authority = Authority::generate(&domain(), now).unwrap();
        let (_, request) = new_key_and_request().unwrap();
        let foreign = SpiffeId::parse("spiffe://other.org/ns/default/sa/reviews").unwrap();
        assert!(authority.sign(&request, &foreign, Duration::from_secs(60), now).is_err());
        let ed25519 = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let request = CertificateParams::default().serialize_request(&ed25519).unwrap();
        let error = authority.sign(request.der(), &id("a"), Duration::from_secs(60), now).unwrap_err();
        assert!(error.to_string().contains("P-256"), "{error}");
        assert!(authority.sign(b"not a request", &id("a"), Duration::from_secs(60), now).is_err());
    }

    #[test]
    fn a_stored_authority_loads_back_and_signs_for_the_same_root() {
        let now = SystemTime::now();
        let made = Authority::generate(&domain(), now).unwrap();
        let loaded = Authority::from_pem(&domain(), &made.certificates_pem(), made.key_pem(), now).unwrap();
        assert_eq!(loaded.root_hash(), made.root_hash());
        let (_, request) = new_key_and_request().unwrap();
        let signed = loaded.sign(&request, &id("ratings"), Duration::from_secs(3600), now).unwrap();
        let roots = [made.root().clone()];
        assert!(verify_workload_certificate(&signed.chain, &roots, &domain(), now, Usage::Server).is_ok());
    }

    #[test]
    fn an_operator_intermediate_signs_with_its_chain() {
        let now = SystemTime::now();
        let root = Authority::generate(&domain(), now).unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "weft intermediate");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let intermediate = params.signed_by(&key, &root.issuer).unwrap();
        let bundle = format!("{}{}", intermediate.pem(), root.certificates_pem());
        let authority = Authority::from_pem(&domain(), &bundle, &key.serialize_pem(), now).unwrap();
        assert_eq!(authority.root_hash(), root.root_hash());
        let (_, request) = new_key_and_request().unwrap();
        let signed = authority.sign(&request, &id("web"), Duration::from_secs(3600), now).unwrap();
        assert_eq!(signed.chain.len(), 2, "leaf and intermediate");
        let roots = [root.root().clone()];
        assert_eq!(
            verify_workload_certificate(&signed.chain, &roots, &domain(), now, Usage::Client).unwrap(),
            id("web")
        );

        // Without the root at the end, the chain cannot be checked: refused with advice.
        let error = Authority::from_pem(&domain(), &intermediate.pem(), &key.serialize_pem(), now).unwrap_err();
        assert!(error.to_string().contains("up to the self-signed root"), "{error}");
    }

    #[test]
    fn unusable_operator_material_is_refused_with_the_reason() {
        let now = SystemTime::now();
        let made = Authority::generate(&domain(), now).unwrap();
        let other = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let error = Authority::from_pem(&domain(), &made.certificates_pem(), &other.serialize_pem(), now).unwrap_err();
        assert!(error.to_string().contains("does not belong"), "{error}");
        // A workload certificate is no CA.
        let (key, request) = new_key_and_request().unwrap();
        let leaf = made.sign(&request, &id("a"), Duration::from_secs(60), now).unwrap();
        let error = Authority::from_pem(&domain(), &leaf.chain_pem, &key, now).unwrap_err();
        assert!(error.to_string().contains("not a CA"), "{error}");
        let error = Authority::from_pem(&domain(), "", made.key_pem(), now).unwrap_err();
        assert!(error.to_string().contains("no certificate"), "{error}");
    }

    #[test]
    fn pem_encoding_reads_back() {
        let made = Authority::generate(&domain(), SystemTime::now()).unwrap();
        let pem = made.certificates_pem();
        let read: Vec<CertificateDer> =
            CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<_, _>>().unwrap();
        assert_eq!(read, made.certificates);
    }
}
