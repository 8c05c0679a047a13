//! Opening connections: the one place where proxy-to-proxy mutual TLS plugs in.
//!
//! Every upstream connection, HTTP or opaque TCP, outbound or to the local app, is made
//! here. An endpoint the control plane gave an identity (a meshed proxy's inbound port)
//! is reached over TLS 1.3 with this proxy's certificate, and must prove exactly that
//! identity; the application protocol rides in ALPN (`weft/h2`, `weft/h1` for upgrades,
//! `weft/tcp`), so the inbound side needs no sniffing. Anything else (the local app, an
//! unmeshed endpoint) is plaintext. Nothing above this module knows which it got.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use rustls::{pki_types::ServerName, ClientConfig};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use weft_identity::{
    tls::{Credentials, ALPN_HTTP2, ALPN_TCP},
    SpiffeId,
};

use crate::{
    endpoint::{EndpointKey, EndpointState},
    revocation::{PeerCertificate, Revoked},
};

/// ALPN of HTTP/1.1 between proxies (kept as the application spoke it, so upgrades
/// such as WebSocket work unchanged).
pub const ALPN_HTTP1: &[u8] = b"weft/h1";

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("mutual TLS with {identity} failed: {reason}")]
    Tls { identity: Arc<str>, reason: String },
    #[error("{0}")]
    NoIdentity(Arc<str>),
}

/// What a connection will carry, which picks the ALPN identifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carried {
    Http2,
    Http1,
    Tcp,
}

/// How this proxy reaches one endpoint.
#[derive(Debug)]
pub enum PeerSecurity {
    /// Not meshed: plaintext.
    Plaintext,
    /// A meshed proxy: mutual TLS, requiring its identity.
    Mutual(Arc<MeshPeer>),
    /// Meshed, but this proxy cannot speak mutual TLS to it (the reason says why).
    Unavailable(Arc<str>),
}

/// The TLS configurations for one peer identity, one per ALPN.
#[derive(Debug)]
pub struct MeshPeer {
    pub identity: Arc<str>,
    http2: Arc<ClientConfig>,
    http1: Arc<ClientConfig>,
    tcp: Arc<ClientConfig>,
}

impl MeshPeer {
    /// Configurations requiring `identity`, presenting `credentials` (renewals included).
    pub fn new(identity: &str, credentials: &Arc<Credentials>) -> Result<Self, String> {
        let expected = SpiffeId::parse(identity).map_err(|e| e.to_string())?;
        let config =
            |alpn: &[u8]| credentials.client_config(expected.clone(), &[alpn]).map(Arc::new).map_err(|e| e.to_string());
        Ok(MeshPeer {
            identity: identity.into(),
            http2: config(ALPN_HTTP2)?,
            http1: config(ALPN_HTTP1)?,
            tcp: config(ALPN_TCP)?,
        })
    }

    fn config(&self, carried: Carried) -> &Arc<ClientConfig> {
        match carried {
            Carried::Http2 => &self.http2,
            Carried::Http1 => &self.http1,
            Carried::Tcp => &self.tcp,
        }
    }
}

/// The DNS suffix of the server names that convey a Service port to a meshed peer
/// (`.invalid` is reserved: no real host has such a name).
const PORT_NAME_SUFFIX: &str = ".weft.invalid";

/// The TLS server name a caller sends a meshed endpoint: the Service port it resolved,
/// which the inbound side's authorization judges (`port-80.`), then the endpoint's
/// address, so that session resumption stays per endpoint.
///
/// The caller's application cannot touch it: it only writes a Host header, which the
/// inbound side no longer reads for the port.
fn port_server_name(port: u16, address: SocketAddr) -> ServerName<'static> {
    let ip = match address.ip() {
        std::net::IpAddr::V4(ip) => hex(&ip.octets()),
        std::net::IpAddr::V6(ip) => hex(&ip.octets()),
    };
    let name = format!("port-{port}.a{ip}-{}{PORT_NAME_SUFFIX}", address.port());
    ServerName::try_from(name).unwrap_or_else(|_| ServerName::IpAddress(address.ip().into()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The Service port a meshed caller conveyed in its TLS server name, if any.
pub fn conveyed_port(server_name: Option<&str>) -> Option<u16> {
    let name = server_name?.strip_suffix(PORT_NAME_SUFFIX)?;
    let (first, _) = name.split_once('.')?;
    first.strip_prefix("port-")?.parse().ok().filter(|&port| port != 0)
}

/// Where a connection goes.
#[derive(Clone, Copy)]
pub enum Upstream<'a> {
    /// The local application: always plaintext, on loopback.
    App(SocketAddr),
    /// An endpoint of a Service, with its security.
    Endpoint(&'a EndpointState),
}

impl Upstream<'_> {
    pub fn address(&self) -> SocketAddr {
        match self {
            Upstream::App(address) => *address,
            Upstream::Endpoint(endpoint) => endpoint.address,
        }
    }

    /// What pooled connections to this upstream are keyed by.
    pub fn key(&self) -> std::borrow::Cow<'_, EndpointKey> {
        match self {
            Upstream::App(address) => std::borrow::Cow::Owned(EndpointKey::app(*address)),
            Upstream::Endpoint(endpoint) => std::borrow::Cow::Borrowed(&endpoint.key),
        }
    }
}

/// An upstream connection: plaintext or mutual TLS.
pub enum UpstreamIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Connects to `address` within `timeout`, with Nagle's algorithm off (requests and
/// responses are written whole; delaying small writes only adds latency).
/// Under capture by mark, the socket carries the proxy's mark so that the rules let it
/// through instead of sending it back to the proxy.
pub async fn connect_tcp(address: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let connect = async {
        match crate::capture::proxy_mark() {
            None => TcpStream::connect(address).await,
            Some(mark) => {
                let socket = match address {
                    SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                    SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
                };
                crate::capture::original_dst::mark_as_proxy(&socket, mark)?;
                socket.connect(address).await
            }
        }
    };
    let stream = tokio::time::timeout(timeout, connect).await.map_err(|_| ConnectError::Timeout(timeout))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The connector of the proxy's own HTTP and gRPC clients (the trace exporter): name
/// resolution, then [`connect_tcp`], so that their sockets carry capture's mark too.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProxyConnector;

/// How long [`ProxyConnector`] waits for one address to accept.
const CLIENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

impl tower_service::Service<http::Uri> for ProxyConnector {
    type Response = hyper_util::rt::TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        Box::pin(async move {
            let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
            let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
            let mut failure = io::Error::new(io::ErrorKind::NotFound, format!("{host} resolves to no address"));
            for address in tokio::net::lookup_host((host.as_str(), port)).await? {
                match connect_tcp(address, CLIENT_CONNECT_TIMEOUT).await {
                    Ok(stream) => return Ok(hyper_util::rt::TokioIo::new(stream)),
                    Err(error) => failure = io::Error::other(error.to_string()),
                }
            }
            Err(failure)
        })
    }
}

/// Connects to `upstream` for `carried`, with mutual TLS when it is meshed; the whole
/// handshake counts against `timeout`. A peer on the `revoked` list is refused even
/// though its certificate verifies.
pub async fn connect(
    upstream: Upstream<'_>,
    carried: Carried,
    timeout: Duration,
    revoked: &Revoked,
) -> Result<UpstreamIo, ConnectError> {
    let security = match upstream {
        Upstream::App(_) => None,
        Upstream::Endpoint(endpoint) => Some(endpoint.security()),
    };
    let peer = match security.as_deref() {
        None | Some(PeerSecurity::Plaintext) => {
            return Ok(UpstreamIo::Plain(connect_tcp(upstream.address(), timeout).await?));
        }
        Some(PeerSecurity::Unavailable(reason)) => return Err(ConnectError::NoIdentity(reason.clone())),
        Some(PeerSecurity::Mutual(peer)) => peer.clone(),
    };
    let address = upstream.address();
    let port = match upstream {
        Upstream::Endpoint(endpoint) => endpoint.key.service_port,
        Upstream::App(_) => 0,
    };
    let handshake = async {
        let stream = connect_tcp(address, timeout).await?;
        // The verifier checks the SPIFFE identity; the name conveys the Service port.
        let name = port_server_name(port, address);
        tokio_rustls::TlsConnector::from(peer.config(carried).clone())
            .connect(name, stream)
            .await
            .map_err(|error| ConnectError::Tls { identity: peer.identity.clone(), reason: error.to_string() })
    };
    let stream = tokio::time::timeout(timeout, handshake).await.map_err(|_| ConnectError::Timeout(timeout))??;
    let io = UpstreamIo::Tls(Box::new(stream));
    if let Some(seen) = io.peer().filter(|seen| revoked.refuses(&seen.identity, seen.serial.as_deref())) {
        return Err(ConnectError::Tls {
            identity: peer.identity.clone(),
            reason: format!(
                "the peer's identity or certificate {} is revoked (weft revoke list)",
                seen.serial.as_deref().unwrap_or("?")
            ),
        });
    }
    Ok(io)
}

impl UpstreamIo {
    /// The verified identity and certificate of a mutual-TLS peer.
    pub fn peer(&self) -> Option<PeerCertificate> {
        match self {
            UpstreamIo::Plain(_) => None,
            UpstreamIo::Tls(stream) => PeerCertificate::of(stream.get_ref().1.peer_certificates()),
        }
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            UpstreamIo::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            UpstreamIo::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(stream) => stream.is_write_vectored(),
            UpstreamIo::Tls(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(stream) => Pin::new(stream).poll_flush(cx),
            UpstreamIo::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            UpstreamIo::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_port_survives_the_server_name() {
        for address in ["10.0.0.7:15006", "[fd00::7]:15006"] {
            let name = match port_server_name(8080, address.parse().unwrap()) {
                ServerName::DnsName(name) => name.as_ref().to_string(),
                other => panic!("{other:?}"),
            };
            assert_eq!(conveyed_port(Some(&name)), Some(8080), "{name}");
        }
        for forged in [None, Some("reviews"), Some("port-80.example.com"), Some("port-x.a-1.weft.invalid")] {
            assert_eq!(conveyed_port(forged), None, "{forged:?}");
        }
    }
}
