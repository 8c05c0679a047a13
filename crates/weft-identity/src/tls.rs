//! TLS between meshed proxies: TLS 1.3 only, both sides present workload certificates,
//! and each side checks the other's SPIFFE identity rather than a host name.
//!
//! The outbound side knows, from the control plane, which identity the endpoint it dials
//! must have, and refuses any other ([`SpiffeServerVerifier`]). The inbound side accepts
//! any identity of the trust domain and hands it to authorization
//! ([`SpiffeClientVerifier`]; read it back with [`peer_identity`]). Both go through
//! [`verify_workload_certificate`]: a chain to the bundle, exactly one SPIFFE URI SAN, no
//! CA certificate as a leaf.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
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

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What both verifiers share: the bundle and how signatures are checked.
#[derive(Debug)]
struct Trust {
    roots: Vec<CertificateDer<'static>>,
    trust_domain: TrustDomain,
    algorithms: WebPkiSupportedAlgorithms,
}

impl Trust {
    fn new(roots: Vec<CertificateDer<'static>>, trust_domain: TrustDomain) -> Self {
        Trust { roots, trust_domain, algorithms: provider().signature_verification_algorithms }
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
        verify_workload_certificate(&chain, &self.roots, &self.trust_domain, now, usage)
            .map_err(|error| TlsError::General(error.to_string()))
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

/// Accepts a server only if it proves `expected`.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    trust: Trust,
    expected: SpiffeId,
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
        if id != self.expected {
            return Err(TlsError::General(format!("the server is {id}, not {} as the mesh says", self.expected)));
        }
        Ok(ServerCertVerified::assertion())
    }

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
}

/// Requires a client certificate proving any identity of the trust domain.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    trust: Trust,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
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
}

/// A proxy's own certificate and key, and the bundle it trusts.
pub struct WorkloadTls {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub roots: Vec<CertificateDer<'static>>,
    pub trust_domain: TrustDomain,
}

impl WorkloadTls {
    /// The outbound side's configuration for one peer, which must prove `expected`.
    pub fn client_config(&self, expected: SpiffeId, alpn: &[u8]) -> Result<ClientConfig, IdentityError> {
        let verifier =
            SpiffeServerVerifier { trust: Trust::new(self.roots.clone(), self.trust_domain.clone()), expected };
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| IdentityError::Authority(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| IdentityError::Authority(format!("this proxy's certificate or key is unusable: {e}")))?;
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(config)
    }

    /// The inbound side's configuration: every meshed caller must present a workload
    /// certificate of this trust domain.
    pub fn server_config(&self) -> Result<ServerConfig, IdentityError> {
        let verifier = SpiffeClientVerifier { trust: Trust::new(self.roots.clone(), self.trust_domain.clone()) };
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| IdentityError::Authority(e.to_string()))?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| IdentityError::Authority(format!("this proxy's certificate or key is unusable: {e}")))?;
        config.alpn_protocols = vec![ALPN_HTTP2.to_vec(), ALPN_TCP.to_vec()];
        Ok(config)
    }
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
    fn workload_issued(
        authority: &Authority,
        account: &str,
        lifetime: Duration,
        roots: &Authority,
        issued: SystemTime,
    ) -> WorkloadTls {
        let (key_pem, request) = new_key_and_request().unwrap();
        let signed = authority.sign(&request, &id(account), lifetime, issued).unwrap();
        WorkloadTls {
            chain: signed.chain,
            key: PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap(),
            roots: vec![roots.root().clone()],
            trust_domain: domain(),
        }
    }

    fn workload(authority: &Authority, account: &str, lifetime: Duration, roots: &Authority) -> WorkloadTls {
        workload_issued(authority, account, lifetime, roots, SystemTime::now())
    }

    /// One handshake over loopback TCP, then a byte each way; the server's verdict, the
    /// client's, and who the server saw.
    async fn handshake(
        client: &WorkloadTls,
        expected: SpiffeId,
        server: &WorkloadTls,
    ) -> (Result<(), String>, Result<(), String>, Option<SpiffeId>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server.server_config().unwrap()));
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
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client.client_config(expected, ALPN_HTTP2).unwrap()));
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
}
