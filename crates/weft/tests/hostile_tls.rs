//! Hostile mesh-TLS callers on a proxy's inbound listener: a handshake that stalls, a
//! client chain of hundreds of certificates, and ALPN protocols weft does not speak.
//! Each is refused, bounded (the stall by the handshake timeout), counted, and the proxy
//! keeps serving the mesh.

mod support;

use std::{sync::Arc, time::Duration};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
    DigitallySignedStruct, SignatureScheme,
};
use support::hostile::{counted, exchange, protocol_errors, rss_kb, survived, Mesh};

/// Accepts any server: the attacker does not care who answers.
#[derive(Debug)]
struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider().signature_verification_algorithms.supported_schemes()
    }
}

/// A client that presents `copies` copies of a self-signed certificate as its chain (none
/// when 0) and offers `alpn`.
fn attacker(copies: usize, alpn: &[&[u8]]) -> rustls::ClientConfig {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer));
    let mut config = if copies == 0 {
        builder.with_no_client_auth()
    } else {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["attacker.example".to_string()]).unwrap();
        let certificate = params.self_signed(&key).unwrap();
        let chain = vec![certificate.der().clone(); copies];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        builder.with_client_auth_cert(chain, key).unwrap()
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// Runs one handshake against `address`; true when it completed and the proxy then kept
/// the connection open for a request.
async fn handshake(address: std::net::SocketAddr, config: rustls::ClientConfig) -> Result<(), String> {
    let stream = tokio::net::TcpStream::connect(address).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from("reviews.weft.invalid").unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, stream))
        .await
        .map_err(|_| "the handshake hung".to_string())?
        .map_err(|e| e.to_string())?;
    // TLS 1.3 clients learn of a refused client certificate on their first read.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tls.write_all(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n").await;
    let mut answer = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer)).await {
        Ok(Ok(_)) if answer.is_empty() => Err("closed without an answer".into()),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tls_callers_are_refused_bounded_and_counted() {
    let mesh = Mesh::start("hostile-tls").await;
    let inbound = mesh.reviews.inbound.unwrap();
    let pid = mesh.reviews.child.id();
    let baseline = rss_kb(pid);

    // A handshake that stalls after the first bytes of a ClientHello: closed at the
    // handshake timeout (2 s here), counted, with normal callers served meanwhile.
    let case = "a stalled handshake";
    let before = protocol_errors(&mesh.reviews, "inbound", "tls_handshake_timeout").await;
    let stalled = exchange(inbound, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", Duration::from_secs(10)).await;
    assert!(stalled.closed && stalled.answer.is_empty(), "{case}: {stalled:?}");
    counted(&mesh.reviews, "inbound", "tls_handshake_timeout", before, case).await;
    survived(&mesh, pid, baseline, case).await;

    // A client chain of hundreds of certificates: refused before path building, whether it
    // fits in one handshake message (150) or not (400).
    for copies in [150, 400] {
        let case = format!("a client chain of {copies} certificates");
        let reasons = ["tls_bad_certificate", "tls_handshake_failed"];
        let mut before = 0.0;
        for reason in reasons {
            before += protocol_errors(&mesh.reviews, "inbound", reason).await;
        }
        let result = handshake(inbound, attacker(copies, &[weft_identity::tls::ALPN_HTTP2])).await;
        assert!(result.is_err(), "{case}: accepted");
        support::eventually(Duration::from_secs(10), &format!("{case}: counted"), || async {
            let mut now = 0.0;
            for reason in reasons {
                now += protocol_errors(&mesh.reviews, "inbound", reason).await;
            }
            (now > before).then_some(())
        })
        .await;
        assert!(
            mesh.reviews.log().contains("a mesh chain has at most 8") || copies > 150,
            "{case}: refused for another reason: {}",
            mesh.reviews.log()
        );
        survived(&mesh, pid, baseline, &case).await;
    }

    // ALPN protocols weft does not speak: refused in the handshake, whoever the caller.
    let case = "an unknown ALPN";
    let before = protocol_errors(&mesh.reviews, "inbound", "tls_unknown_alpn").await;
    let result = handshake(inbound, attacker(0, &[b"evil/1", b"http/1.1"])).await;
    let error = result.expect_err("an unknown ALPN is refused");
    assert!(error.contains("NoApplicationProtocol") || error.contains("no_application_protocol"), "{case}: {error}");
    counted(&mesh.reviews, "inbound", "tls_unknown_alpn", before, case).await;
    survived(&mesh, pid, baseline, case).await;
}
