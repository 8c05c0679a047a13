//! The control plane's side of the secure control channel: its own certificate, and the
//! TLS listener that discovery and certificate signing are served on.
//!
//! The control plane proves `spiffe://<trust-domain>/ns/weft-system/sa/weft-control`,
//! with a certificate from its own CA, renewed at half its life. It sends its root along
//! in every handshake, so that a proxy bootstrapping with a join token can pin that root
//! by the hash the token carries. A client certificate is optional at the TLS layer (a
//! first contact has none); the services decide what each call needs, from the
//! [`Peer`] each request carries.

use std::{net::SocketAddr, pin::Pin, sync::Arc, task::Poll, time::Duration};

use rustls::{pki_types::PrivateKeyDer, ServerConfig};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;
use weft_identity::{
    authority::new_key_and_request,
    tls::{ClientCertificate, Credentials, Issued, ALPN_GRPC},
    IdentityError, SpiffeId,
};

use crate::{ca::CaState, discovery::Hub};

/// How long the control plane's own certificate lasts; renewed at half of it.
pub const CONTROL_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// A handshake that takes longer than this is dropped, so idle sockets cannot pile up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A certificate for the control plane's identity, with the bridges and roots appended
/// (for proxies that pin a root by a join token's hash).
pub fn issue_control_certificate(ca: &CaState, lifetime: Duration) -> Result<Issued, IdentityError> {
    let authority = &ca.authority;
    let (key_pem, request) = new_key_and_request()?;
    let id = SpiffeId::control_plane(authority.trust_domain());
    let signed = authority.sign(&request, &id, lifetime, std::time::SystemTime::now())?;
    let mut chain = signed.chain;
    chain.extend(ca.presented.iter().cloned());
    let key = rustls::pki_types::pem::PemObject::from_pem_slice(key_pem.as_bytes())
        .map_err(|e: rustls::pki_types::pem::Error| IdentityError::Authority(e.to_string()))?;
    let key: PrivateKeyDer<'static> = key;
    Issued::new(chain, key, ca.roots.clone())
}

/// The control plane's credentials, renewed in the background for as long as they are
/// in use (and re-issued by the hub when the CA changes).
pub fn control_credentials(hub: &Arc<Hub>, lifetime: Duration) -> Result<Arc<Credentials>, IdentityError> {
    let credentials = Credentials::new(issue_control_certificate(&hub.ca(), lifetime)?);
    let _ = hub.control_credentials.set(credentials.clone());
    let weak = Arc::downgrade(&credentials);
    let hub = Arc::downgrade(hub);
    tokio::spawn(async move {
        loop {
            let Some(credentials) = weak.upgrade() else { return };
            let renew_at = credentials.current().renew_at(0.5);
            drop(credentials);
            let wait = renew_at.duration_since(std::time::SystemTime::now()).unwrap_or(Duration::from_secs(1));
            tokio::time::sleep(wait).await;
            let (Some(credentials), Some(hub)) = (weak.upgrade(), hub.upgrade()) else { return };
            match issue_control_certificate(&hub.ca(), lifetime) {
                Ok(issued) => {
                    tracing::info!(serial = %issued.serial, "renewed the control plane's certificate");
                    credentials.replace(issued);
                }
                Err(error) => {
                    tracing::error!(%error, "cannot renew the control plane's certificate; retrying in 10s");
                    tokio::time::sleep(Duration::from_secs(10)).await;
                }
            }
        }
    });
    Ok(credentials)
}

/// The TLS configuration of the control channel.
pub fn server_config(credentials: &Arc<Credentials>) -> Result<Arc<ServerConfig>, IdentityError> {
    Ok(Arc::new(credentials.server_config(ClientCertificate::Optional, &[ALPN_GRPC])?))
}

/// Who is on the other end of a control-channel connection: available to every gRPC
/// call as a request extension.
#[derive(Clone, Debug)]
pub struct Peer {
    pub remote: SocketAddr,
    /// The identity its client certificate proved; `None` before bootstrap.
    pub identity: Option<SpiffeId>,
    /// That certificate's serial (normalized hex), for revocation checks.
    pub serial: Option<String>,
}

/// One accepted, handshaken connection.
pub struct ControlConnection {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    peer: Peer,
}

impl tonic::transport::server::Connected for ControlConnection {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for ControlConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ControlConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Accepts connections on `listener` and hands over those whose TLS handshake
/// succeeded; handshakes run concurrently, so one slow client delays no one.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> ReceiverStream<std::io::Result<ControlConnection>> {
    let (sender, receiver) = mpsc::channel(256);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (socket, remote) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(%error, "discovery cannot accept connections");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if sender.is_closed() {
                return;
            }
            let _ = socket.set_nodelay(true);
            let acceptor = acceptor.clone();
            let sender = sender.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await {
                    Ok(Ok(stream)) => {
                        let certificates = stream.get_ref().1.peer_certificates();
                        let identity = weft_identity::tls::peer_identity(certificates);
                        let serial = certificates
                            .and_then(|chain| chain.first())
                            .and_then(|leaf| weft_identity::certificate_serial(leaf));
                        let peer = Peer { remote, identity, serial };
                        let _ = sender.send(Ok(ControlConnection { stream, peer })).await;
                    }
                    Ok(Err(error)) => {
                        tracing::info!(%remote, %error, "refused a control-channel connection (TLS); proxies need weft proxy --token-file");
                    }
                    Err(_) => tracing::info!(%remote, "a control-channel TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(receiver)
}
