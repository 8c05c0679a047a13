//! Serving the HTTP API over HTTPS (TLS 1.3), on every replica.
//!
//! The certificate is, by default, one the mesh's CA issues to the control plane: its
//! SPIFFE ID (`…/ns/weft-system/sa/weft-control`), which the CLI verifies against the
//! root its operator token names, and the DNS names and addresses of `--api-addr` and
//! every `--api-san`, which browsers and Prometheus check. It is renewed at half its life
//! and re-issued when the CA changes; its chain carries the CA's lineage (every bridge
//! and retired root), so a token made before a root rotation still verifies it. Or it is
//! the operator's own (`--api-cert`, `--api-key`), trusted through the operator's PKI.
//!
//! Plain HTTP is allowed on loopback only (`--api-http`), where nothing crosses a
//! network.

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use axum::{extract::ConnectInfo, Router};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
    ServerConfig,
};
use tokio::net::TcpListener;
use tower::Service;
use weft_identity::{authority::new_key_and_request, IdentityError, SpiffeId};

use crate::ca::CaState;

/// How long the API's mesh certificate lasts; renewed at half of it.
pub const API_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// A handshake that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight API calls may take to finish on shutdown.
const DRAIN: Duration = Duration::from_secs(5);

/// How the API is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiTlsSettings {
    /// A certificate from the mesh CA with these extra names (`--api-san`).
    Mesh { extra_names: Vec<String> },
    /// The operator's certificate chain and key (PEM).
    Operator { cert: PathBuf, key: PathBuf },
    /// Plain HTTP, on loopback only (`--api-http`).
    Plaintext,
}

/// Why the API's TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ApiTlsError {
    #[error(
        "the API would be plain HTTP on {0}, beyond loopback: operator tokens would cross the network in the clear; \
         drop --api-http (the API is HTTPS by default), or bind --api-addr to 127.0.0.1"
    )]
    PlaintextBeyondLoopback(SocketAddr),
    #[error("cannot read {flag} {path}: {reason}")]
    Read { flag: &'static str, path: String, reason: String },
    #[error("the API's certificate is unusable: {0}")]
    Unusable(String),
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// The certificate the API presents now, swapped whole on renewal.
#[derive(Debug)]
pub struct ApiCertificate {
    current: ArcSwap<CertifiedKey>,
    /// For a mesh certificate: the names it carries, to re-issue it with.
    names: Option<Vec<String>>,
}

impl ResolvesServerCert for ApiCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl ApiCertificate {
    /// Re-issues a mesh certificate under `ca` (renewal, or a CA that changed); an
    /// operator's certificate stays as it is.
    pub fn reissue(&self, ca: &CaState) {
        let Some(names) = &self.names else { return };
        match issue(ca, names) {
            Ok(certified) => self.current.store(certified),
            Err(error) => tracing::error!(%error, "cannot re-issue the API's certificate; serving the previous one"),
        }
    }
}

/// The names a mesh certificate for an API bound to `addr` carries: its address (or,
/// for a wildcard, loopback and this host's name), and `extra`.
pub fn names_for(addr: SocketAddr, extra: &[String]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    if addr.ip().is_unspecified() || addr.ip().is_loopback() {
        names.extend(["localhost", "127.0.0.1", "::1"].map(String::from));
    } else {
        names.push(addr.ip().to_string());
    }
    if addr.ip().is_unspecified() {
        if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
            let host = host.trim();
            if !host.is_empty() {
                names.push(host.to_string());
            }
        }
    }
    for name in extra {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    names
}

fn issue(ca: &CaState, names: &[String]) -> Result<Arc<CertifiedKey>, ApiTlsError> {
    let (key_pem, request) = new_key_and_request()?;
    let id = SpiffeId::control_plane(ca.authority.trust_domain());
    let signed = ca.authority.sign_with_names(&request, &id, names, API_CERT_LIFETIME, std::time::SystemTime::now())?;
    let mut chain = signed.chain;
    chain.extend(ca.presented.iter().cloned());
    chain.extend(ca.lineage.iter().cloned());
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| ApiTlsError::Unusable(e.to_string()))?;
    certified(chain, key)
}

fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, ApiTlsError> {
    CertifiedKey::from_der(chain, key, &weft_identity::tls::provider())
        .map(Arc::new)
        .map_err(|e| ApiTlsError::Unusable(e.to_string()))
}

fn read(flag: &'static str, path: &PathBuf) -> Result<Vec<u8>, ApiTlsError> {
    std::fs::read(path).map_err(|e| ApiTlsError::Read { flag, path: path.display().to_string(), reason: e.to_string() })
}

/// The API's TLS configuration and the certificate it presents.
pub type ApiServerTls = (Arc<ServerConfig>, Arc<ApiCertificate>);

/// The API's TLS configuration (`None`: plain HTTP, checked to be on loopback) and its
/// certificate, which the caller keeps renewed.
pub fn setup(settings: &ApiTlsSettings, addr: SocketAddr, ca: &CaState) -> Result<Option<ApiServerTls>, ApiTlsError> {
    let certificate = match settings {
        ApiTlsSettings::Plaintext if addr.ip().is_loopback() => return Ok(None),
        ApiTlsSettings::Plaintext => return Err(ApiTlsError::PlaintextBeyondLoopback(addr)),
        ApiTlsSettings::Mesh { extra_names } => {
            let names = names_for(addr, extra_names);
            ApiCertificate { current: ArcSwap::new(issue(ca, &names)?), names: Some(names) }
        }
        ApiTlsSettings::Operator { cert, key } => {
            let chain = CertificateDer::pem_slice_iter(&read("--api-cert", cert)?)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ApiTlsError::Unusable(format!("--api-cert {}: {e}", cert.display())))?;
            if chain.is_empty() {
                return Err(ApiTlsError::Unusable(format!("--api-cert {} holds no certificate", cert.display())));
            }
            let key = PrivateKeyDer::from_pem_slice(&read("--api-key", key)?)
                .map_err(|e| ApiTlsError::Unusable(format!("--api-key {}: {e}", key.display())))?;
            ApiCertificate { current: ArcSwap::new(certified(chain, key)?), names: None }
        }
    };
    let certificate = Arc::new(certificate);
    let mut config = ServerConfig::builder_with_provider(weft_identity::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ApiTlsError::Unusable(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(certificate.clone());
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some((Arc::new(config), certificate)))
}

/// Keeps a mesh certificate renewed at half its life, for as long as it is in use.
pub fn keep_renewed(certificate: &Arc<ApiCertificate>, ca: impl Fn() -> Arc<CaState> + Send + 'static) {
    if certificate.names.is_none() {
        return;
    }
    let weak = Arc::downgrade(certificate);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(API_CERT_LIFETIME / 2).await;
            let Some(certificate) = weak.upgrade() else { return };
            certificate.reissue(&ca());
            tracing::info!("renewed the API's certificate");
        }
    });
}

/// Serves `router` on `listener` (over TLS with `tls`, else plain HTTP) until
/// `shutdown`, then lets in-flight calls finish for a few seconds. Every request carries
/// its client's address (`ConnectInfo`), which the token checks rate-limit by.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<ServerConfig>>,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::pin!(shutdown);
    loop {
        let (socket, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "the API cannot accept connections");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(remote));
            let mut router = router.clone();
            async move { router.call(request).await }
        });
        let (builder, watcher, acceptor) = (builder.clone(), graceful.watcher(), acceptor.clone());
        tokio::spawn(async move {
            let _ = socket.set_nodelay(true);
            match acceptor {
                None => {
                    let _ = watcher.watch(builder.serve_connection(TokioIo::new(socket), service).into_owned()).await;
                }
                Some(acceptor) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await {
                    Ok(Ok(stream)) => {
                        let _ =
                            watcher.watch(builder.serve_connection(TokioIo::new(stream), service).into_owned()).await;
                    }
                    Ok(Err(error)) => tracing::debug!(%remote, %error, "refused an API connection (TLS)"),
                    Err(_) => tracing::debug!(%remote, "an API TLS handshake timed out"),
                },
            }
        });
    }
    if tokio::time::timeout(DRAIN, graceful.shutdown()).await.is_err() {
        tracing::info!("API calls still open after {DRAIN:?}; closing them");
    }
}
