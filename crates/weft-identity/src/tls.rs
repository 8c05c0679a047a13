//! TLS with workload identities: between meshed proxies, and between proxies and the
//! control plane. TLS 1.3 only; both sides present certificates the mesh's CA signed, and
//! each checks the other's SPIFFE identity rather than a host name.
//!
//! A [`Credentials`] holds what one party presents and trusts: its certificate chain and
//! key, and the trust bundle. It is swapped whole when the certificate is renewed or the
//! bundle changes, and every configuration built on it uses the new one from its next
//! handshake, so renewal never touches an open connection.
//!
//! The calling side knows which identity its peer must have (from the control plane, for
//! a workload; the control plane's fixed one otherwise) and refuses any other
//! ([`SpiffeServerVerifier`]). The called side accepts any identity of the trust domain
//! and hands it to authorization ([`SpiffeClientVerifier`]; read it back with
//! [`peer_identity`]). Both go through [`verify_workload_certificate`]: a chain to the
//! bundle, exactly one SPIFFE URI SAN, no CA certificate as a leaf.
//!
//! A proxy's first contact with the control plane has no bundle yet: it pins the root by
//! the hash its join token carries ([`bootstrap_client_config`]), as kubeadm's join does.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        ResolvesClientCert,
    },
    crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        ClientHello, ResolvesServerCert,
    },
    sign::CertifiedKey,
    ClientConfig, DigitallySignedStruct, DistinguishedName, Error as TlsError, ServerConfig, SignatureScheme,
};

use crate::{
    verify::{verify_workload_certificate, Usage},
    IdentityError, SpiffeId, TrustDomain,
};

/// ALPN identifiers between proxies: the application protocol rides in the handshake,
/// so the inbound side needs no sniffing for meshed traffic.
pub const ALPN_HTTP2: &[u8] = b"weft/h2";
pub const ALPN_TCP: &[u8] = b"weft/tcp";
/// Why a bootstrap handshake failed when the control plane's root is not the token's:
/// a wrong `--control` address or a token of another mesh, which no retry fixes.
pub const WRONG_ROOT: &str =
    "the control plane's CA is not the one the join token names: check --control and the token";

/// ALPN of the control channel (gRPC over HTTP/2).
pub const ALPN_GRPC: &[u8] = b"h2";

/// The one crypto provider every weft TLS configuration uses (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn unusable(error: impl std::fmt::Display) -> IdentityError {
    IdentityError::Authority(format!("the certificate or key is unusable: {error}"))
}

/// One issued certificate with its key and the bundle it was issued under.
#[derive(Debug)]
pub struct Issued {
    /// What the certificate proves.
    pub identity: SpiffeId,
    /// The chain presented in handshakes, with the key that signs them.
    pub certified: Arc<CertifiedKey>,
    /// The roots peers' certificates must chain to.
    pub roots: Vec<CertificateDer<'static>>,
    /// Hex serial, as tools print it.
    pub serial: String,
    /// The issuing certificate's subject.
    pub issuer: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// When this party received it: `notBefore` is backdated for clock skew, so the life
    /// left is counted from here.
    pub received: SystemTime,
}

impl Issued {
    /// Reads `chain` (leaf first) and checks that `key` belongs to it. The identity is the
    /// leaf's one SPIFFE URI SAN.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, IdentityError> {
        let leaf = chain.first().ok_or_else(|| unusable("the chain is empty"))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf).map_err(unusable)?;
        let identity = peer_identity(Some(&chain[..1])).ok_or_else(|| unusable("it names no SPIFFE ID"))?;
        let time = |t: x509_parser::time::ASN1Time| {
            let seconds = t.timestamp();
            SystemTime::UNIX_EPOCH + Duration::from_secs(seconds.max(0) as u64)
        };
        let validity = parsed.validity();
        let certified = CertifiedKey::from_der(chain.clone(), key, &provider()).map_err(unusable)?;
        Ok(Issued {
            identity,
            serial: crate::normalize_serial(&hex::encode(parsed.raw_serial())),
            issuer: parsed.issuer().to_string(),
            not_before: time(validity.not_before),
            not_after: time(validity.not_after),
            certified: Arc::new(certified),
            roots,
            received: SystemTime::now(),
        })
    }

    /// The trust domain of this identity, which peers must share.
    pub fn trust_domain(&self) -> &TrustDomain {
        self.identity.trust_domain()
    }

    /// The moment to renew: `share` of the way from receipt to expiry.
    pub fn renew_at(&self, share: f64) -> SystemTime {
        let start = self.received.max(self.not_before);
        let life = self.not_after.duration_since(start).unwrap_or_default();
        start + life.mul_f64(share.clamp(0.0, 1.0))
    }
}

/// A party's current certificate, key and trust bundle, replaced whole on renewal.
#[derive(Debug)]
pub struct Credentials {
    current: ArcSwap<Issued>,
}

impl Credentials {
    pub fn new(issued: Issued) -> Arc<Self> {
        Arc::new(Credentials { current: ArcSwap::from_pointee(issued) })
    }

    /// What is presented and trusted now.
    pub fn current(&self) -> Arc<Issued> {
        self.current.load_full()
    }

    /// Takes a renewed certificate or a new bundle; handshakes from now on use it.
    pub fn replace(&self, issued: Issued) {
        self.current.store(Arc::new(issued));
    }

    /// Trusts `roots` from now on, keeping the certificate: the control plane pushed a new
    /// bundle (a root rotation adds a root, and later drops the old one). `false` when
    /// nothing changed.
    pub fn set_roots(&self, roots: Vec<CertificateDer<'static>>) -> bool {
        let current = self.current.load_full();
        if roots.is_empty() || current.roots == roots {
            return false;
        }
        self.current.store(Arc::new(Issued {
            identity: current.identity.clone(),
            certified: current.certified.clone(),
            roots,
            serial: current.serial.clone(),
            issuer: current.issuer.clone(),
            not_before: current.not_before,
            not_after: current.not_after,
            received: current.received,
        }));
        true
    }

    /// The calling side's configuration for peers that must prove `expected`.
    pub fn client_config(self: &Arc<Self>, expected: SpiffeId, alpn: &[&[u8]]) -> Result<ClientConfig, IdentityError> {
        let verifier = SpiffeServerVerifier {
            trust: Trust::new(Bundle::Credentials(self.clone())),
            expected: Expected::Exactly(expected),
        };
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(unusable)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(Presented(self.clone())));
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }

    /// The called side's configuration: callers present a certificate of this trust
    /// domain, required unless `client_certificate` is [`ClientCertificate::Optional`]
    /// (the control plane, which proxies first reach with a join token instead).
    pub fn server_config(
        self: &Arc<Self>,
        client_certificate: ClientCertificate,
        alpn: &[&[u8]],
    ) -> Result<ServerConfig, IdentityError> {
        let verifier = SpiffeClientVerifier {
            trust: Trust::new(Bundle::Credentials(self.clone())),
            mandatory: client_certificate == ClientCertificate::Required,
        };
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(unusable)?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(Arc::new(Presented(self.clone())));
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }
}

/// Whether the called side requires a client certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientCertificate {
    Required,
    Optional,
}

/// Presents the current certificate, in either role.
#[derive(Debug)]
struct Presented(Arc<Credentials>);

impl ResolvesServerCert for Presented {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current.load().certified.clone())
    }
}

impl ResolvesClientCert for Presented {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current.load().certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Where a verifier finds the roots it trusts.
#[derive(Debug)]
enum Bundle {
    /// A party's own current bundle (follows renewals and rotations).
    Credentials(Arc<Credentials>),
    /// A root pinned by its hash at bootstrap: set by the first handshake that presents it.
    Pinned { sha256: String, found: Mutex<Option<CertificateDer<'static>>> },
}

/// What every verifier shares: the bundle and how signatures are checked.
#[derive(Debug)]
struct Trust {
    bundle: Bundle,
    algorithms: WebPkiSupportedAlgorithms,
}

impl Trust {
    fn new(bundle: Bundle) -> Self {
        Trust { bundle, algorithms: provider().signature_verification_algorithms }
    }

    /// The peer's identity, if `end_entity` and `intermediates` chain to the bundle.
    fn identity(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: Usage,
    ) -> Result<SpiffeId, TlsError> {
        let mut chain = Vec::with_capacity(1 + intermediates.len());
        chain.push(end_entity.clone());
        chain.extend(intermediates.iter().cloned());
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(now.as_secs());
        let refused = |error: IdentityError| TlsError::General(error.to_string());
        match &self.bundle {
            Bundle::Credentials(credentials) => {
                let current = credentials.current.load();
                verify_workload_certificate(&chain, &current.roots, current.trust_domain(), now, usage).map_err(refused)
            }
            Bundle::Pinned { sha256, found } => {
                // The peer sends the root along; it is trusted only if it is the pinned one.
                let root = intermediates
                    .iter()
                    .find(|c| hex::encode(ring::digest::digest(&ring::digest::SHA256, c)) == *sha256)
                    .ok_or_else(|| TlsError::General(WRONG_ROOT.into()))?;
                let claimed = peer_identity(Some(&chain[..1]))
                    .ok_or_else(|| TlsError::General("the control plane's certificate names no SPIFFE ID".into()))?;
                let roots = [root.clone().into_owned()];
                let id =
                    verify_workload_certificate(&chain, &roots, claimed.trust_domain(), now, usage).map_err(refused)?;
                *found.lock().unwrap_or_else(|e| e.into_inner()) = Some(roots[0].clone());
                Ok(id)
            }
        }
    }

    fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }
}

/// The handshake-signature methods both verifier traits ask for, answered by the
/// verifier's `trust` alike.
macro_rules! signature_checks_by_trust {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, TlsError> {
            self.trust.tls12(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, TlsError> {
            self.trust.tls13(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.trust.algorithms.supported_schemes()
        }
    };
}

/// What a caller requires of the server.
#[derive(Debug)]
enum Expected {
    Exactly(SpiffeId),
    /// A control plane of whatever trust domain the pinned root serves.
    ControlPlane,
}

/// Accepts a server only if it proves the expected identity.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    trust: Trust,
    expected: Expected,
}

impl SpiffeServerVerifier {
    fn check(&self, id: SpiffeId) -> Result<ServerCertVerified, TlsError> {
        let fine = match &self.expected {
            Expected::Exactly(expected) => &id == expected,
            Expected::ControlPlane => id.is_control_plane(),
        };
        if !fine {
            let wanted = match &self.expected {
                Expected::Exactly(expected) => expected.to_string(),
                Expected::ControlPlane => "a weft control plane".to_string(),
            };
            return Err(TlsError::General(format!("the server is {id}, not {wanted} as the mesh says")));
        }
        Ok(ServerCertVerified::assertion())
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let id = self.trust.identity(end_entity, intermediates, now, Usage::Server)?;
        self.check(id)
    }

    signature_checks_by_trust!();
}

/// Checks a caller's certificate: any identity of the trust domain.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    trust: Trust,
    mandatory: bool,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        self.trust.identity(end_entity, intermediates, now, Usage::Client)?;
        Ok(ClientCertVerified::assertion())
    }

    signature_checks_by_trust!();
}

/// The root a bootstrap connection pinned, once its handshake succeeded.
#[derive(Clone, Debug)]
pub struct PinnedRoot(Arc<SpiffeServerVerifier>);

impl PinnedRoot {
    pub fn root(&self) -> Option<CertificateDer<'static>> {
        match &self.0.trust.bundle {
            Bundle::Pinned { found, .. } => found.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            Bundle::Credentials(_) => None,
        }
    }
}

/// A proxy's first connection to the control plane, before it has a certificate or a
/// bundle: no client certificate, and the server must present a control-plane identity
/// chaining to the root whose SHA-256 (hex, of its DER) is `root_sha256`, sent along in
/// its chain. The returned handle gives that root once the handshake succeeded.
pub fn bootstrap_client_config(root_sha256: &str) -> Result<(ClientConfig, PinnedRoot), IdentityError> {
    pinned_control_plane_config(root_sha256, &[ALPN_GRPC])
}

/// As [`bootstrap_client_config`], with the ALPN protocols `alpn`: the CLI verifying the
/// control plane's HTTPS API by the root hash its operator token carries.
pub fn pinned_control_plane_config(
    root_sha256: &str,
    alpn: &[&[u8]],
) -> Result<(ClientConfig, PinnedRoot), IdentityError> {
    let bundle = Bundle::Pinned { sha256: root_sha256.to_ascii_lowercase(), found: Mutex::new(None) };
    let verifier = Arc::new(SpiffeServerVerifier { trust: Trust::new(bundle), expected: Expected::ControlPlane });
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(unusable)?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok((config, PinnedRoot(verifier)))
}

/// The SPIFFE identity of a peer whose certificate a verifier above accepted.
pub fn peer_identity(peer_certificates: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    let leaf = peer_certificates?.first()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) => SpiffeId::parse(uri).ok(),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::{
        authority::{new_key_and_request, Authority},
        testing::{domain, id},
    };

    /// A workload `account` signed by `authority` at `issued` for `lifetime`, trusting
    /// `roots`' root.
    fn issued_at(
        authority: &Authority,
        id: &SpiffeId,
        lifetime: Duration,
        roots: &Authority,
        issued: SystemTime,
    ) -> Issued {
        let (key_pem, request) = new_key_and_request().unwrap();
        let signed = authority.sign(&request, id, lifetime, issued).unwrap();
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        Issued::new(signed.chain, key, vec![roots.root().clone()]).unwrap()
    }

    fn workload_issued(
        authority: &Authority,
        account: &str,
        lifetime: Duration,
        roots: &Authority,
        issued: SystemTime,
    ) -> Arc<Credentials> {
        Credentials::new(issued_at(authority, &id(account), lifetime, roots, issued))
    }

    fn workload(authority: &Authority, account: &str, lifetime: Duration, roots: &Authority) -> Arc<Credentials> {
        workload_issued(authority, account, lifetime, roots, SystemTime::now())
    }

    /// One handshake over loopback TCP, then a byte each way; the server's verdict, the
    /// client's, and who the server saw.
    async fn exchange(
        client: ClientConfig,
        server: ServerConfig,
    ) -> (Result<(), String>, Result<(), String>, Option<SpiffeId>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let serving = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            match acceptor.accept(socket).await {
                Ok(mut stream) => {
                    let peer = peer_identity(stream.get_ref().1.peer_certificates());
                    let mut byte = [0u8; 1];
                    let _ = stream.read_exact(&mut byte).await;
                    let _ = stream.write_all(b"!").await;
                    (Ok(()), peer)
                }
                Err(error) => (Err(error.to_string()), None),
            }
        });
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let socket = tokio::net::TcpStream::connect(address).await.unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let client_result = match connector.connect(name, socket).await {
            Ok(mut stream) => {
                // TLS 1.3: the server judges the client's certificate after the client's
                // handshake ends, so a refusal shows on the first exchange.
                let mut byte = [0u8; 1];
                match stream.write_all(b"?").await {
                    Ok(()) => stream.read_exact(&mut byte).await.map(|_| ()).map_err(|e| e.to_string()),
                    Err(error) => Err(error.to_string()),
                }
            }
            Err(error) => Err(error.to_string()),
        };
        let (server_result, peer) = serving.await.unwrap();
        (server_result, client_result, peer)
    }

    async fn handshake(
        client: &Arc<Credentials>,
        expected: SpiffeId,
        server: &Arc<Credentials>,
    ) -> (Result<(), String>, Result<(), String>, Option<SpiffeId>) {
        let client = client.client_config(expected, &[ALPN_HTTP2]).unwrap();
        let server = server.server_config(ClientCertificate::Required, &[ALPN_HTTP2, ALPN_TCP]).unwrap();
        exchange(client, server).await
    }

    #[tokio::test]
    async fn two_workloads_of_one_mesh_authenticate_each_other() {
        let ca = Authority::generate(&domain(), SystemTime::now()).unwrap();
        let web = workload(&ca, "web", Duration::from_secs(3600), &ca);
        let reviews = workload(&ca, "reviews", Duration::from_secs(3600), &ca);
        let (server, client, peer) = handshake(&web, id("reviews"), &reviews).await;
        assert_eq!((server, client), (Ok(()), Ok(())));
        assert_eq!(peer, Some(id("web")), "the inbound side learns who called");
    }

    #[tokio::test]
    async fn a_server_with_the_wrong_identity_is_refused_by_the_caller() {
        let ca = Authority::generate(&domain(), SystemTime::now()).unwrap();
        let web = workload(&ca, "web", Duration::from_secs(3600), &ca);
        let impostor = workload(&ca, "ratings", Duration::from_secs(3600), &ca);
        let (_, client, _) = handshake(&web, id("reviews"), &impostor).await;
        let error = client.unwrap_err();
        assert!(error.contains("not spiffe://weft.local/ns/default/sa/reviews"), "{error}");
    }

    #[tokio::test]
    async fn a_caller_from_another_ca_or_with_an_expired_certificate_is_refused() {
        let ca = Authority::generate(&domain(), SystemTime::now()).unwrap();
        let other = Authority::generate(&domain(), SystemTime::now()).unwrap();
        let reviews = workload(&ca, "reviews", Duration::from_secs(3600), &ca);
        // Its certificate is from another CA, though it trusts ours.
        let stranger = workload(&other, "web", Duration::from_secs(3600), &ca);
        let (server, client, _) = handshake(&stranger, id("reviews"), &reviews).await;
        assert!(server.unwrap_err().contains("not issued by this mesh's CA"));
        assert!(client.is_err());

        let long_ago = SystemTime::now() - Duration::from_secs(7200);
        let expired = workload_issued(&ca, "web", Duration::from_secs(60), &ca, long_ago);
        let (server, _, _) = handshake(&expired, id("reviews"), &reviews).await;
        assert!(server.unwrap_err().contains("expired"));
    }

    #[tokio::test]
    async fn a_renewed_certificate_is_presented_from_the_next_handshake() {
        let ca = Authority::generate(&domain(), SystemTime::now()).unwrap();
        let web = workload(&ca, "web", Duration::from_secs(3600), &ca);
        let reviews = workload(&ca, "reviews", Duration::from_secs(3600), &ca);
        let server = reviews.server_config(ClientCertificate::Required, &[ALPN_HTTP2]).unwrap();
        let client = web.client_config(id("reviews"), &[ALPN_HTTP2]).unwrap();
        let (_, _, peer) = exchange(client.clone(), server.clone()).await;
        assert_eq!(peer, Some(id("web")));
        let first = web.current().serial.clone();
        web.replace(issued_at(&ca, &id("web"), Duration::from_secs(3600), &ca, SystemTime::now()));
        assert_ne!(web.current().serial, first);
        let (server_result, client_result, peer) = exchange(client, server).await;
        assert_eq!((server_result, client_result, peer), (Ok(()), Ok(()), Some(id("web"))));
    }

    #[tokio::test]
    async fn a_bootstrapping_proxy_trusts_only_the_root_its_token_names() {
        let ca = Authority::generate(&domain(), SystemTime::now()).unwrap();
        let control_id = SpiffeId::control_plane(&domain());
        let mut control = issued_at(&ca, &control_id, Duration::from_secs(3600), &ca, SystemTime::now());
        // The control plane sends its root along, for bootstrapping proxies to pin.
        let mut chain = control.certified.cert.clone();
        chain.push(ca.root().clone());
        control.certified = Arc::new(CertifiedKey::new(chain, control.certified.key.clone()));
        let control = Credentials::new(control);
        let server = || control.server_config(ClientCertificate::Optional, &[ALPN_GRPC]).unwrap();

        let (client, pinned) = bootstrap_client_config(&ca.root_hash()).unwrap();
        let (server_result, client_result, peer) = exchange(client, server()).await;
        assert_eq!((server_result, client_result, peer), (Ok(()), Ok(()), None));
        assert_eq!(pinned.root().as_ref(), Some(ca.root()));

        let other = Authority::generate(&domain(), SystemTime::now()).unwrap();
        let (client, pinned) = bootstrap_client_config(&other.root_hash()).unwrap();
        let (_, client_result, _) = exchange(client, server()).await;
        assert!(client_result.unwrap_err().contains("not the one the join token names"));
        assert_eq!(pinned.root(), None);

        // A workload of the mesh cannot pose as the control plane.
        let mut impostor = issued_at(&ca, &id("web"), Duration::from_secs(3600), &ca, SystemTime::now());
        let mut chain = impostor.certified.cert.clone();
        chain.push(ca.root().clone());
        impostor.certified = Arc::new(CertifiedKey::new(chain, impostor.certified.key.clone()));
        let impostor = Credentials::new(impostor);
        let (client, _) = bootstrap_client_config(&ca.root_hash()).unwrap();
        let server = impostor.server_config(ClientCertificate::Optional, &[ALPN_GRPC]).unwrap();
        let (_, client_result, _) = exchange(client, server).await;
        assert!(client_result.unwrap_err().contains("not a weft control plane"));
    }

    #[tokio::test]
    async fn a_new_bundle_admits_peers_of_a_new_root_alongside_the_old() {
        let old = Authority::generate(&domain(), SystemTime::now()).unwrap();
        let new = Authority::generate(&domain(), SystemTime::now()).unwrap();
        let reviews = workload(&old, "reviews", Duration::from_secs(3600), &old);
        // A caller renewed under the new root (and trusting both) is refused by a server
        // that trusts only the old root, until the server receives the overlap bundle.
        let web = workload(&new, "web", Duration::from_secs(3600), &new);
        assert!(web.set_roots(vec![new.root().clone(), old.root().clone()]));
        let (server, _, _) = handshake(&web, id("reviews"), &reviews).await;
        assert!(server.unwrap_err().contains("not issued by this mesh's CA"));
        assert!(reviews.set_roots(vec![old.root().clone(), new.root().clone()]));
        assert!(!reviews.set_roots(vec![old.root().clone(), new.root().clone()]), "unchanged");
        let (server, client, peer) = handshake(&web, id("reviews"), &reviews).await;
        assert_eq!((server, client, peer), (Ok(()), Ok(()), Some(id("web"))));
    }
}
