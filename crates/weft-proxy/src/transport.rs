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

use crate::endpoint::EndpointState;

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
}

/// An upstream connection: plaintext or mutual TLS.
pub enum UpstreamIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Connects to `address` within `timeout`, with Nagle's algorithm off (requests and
/// responses are written whole; delaying small writes only adds latency).
pub async fn connect_tcp(address: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(address))
        .await
        .map_err(|_| ConnectError::Timeout(timeout))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Connects to `upstream` for `carried`, with mutual TLS when it is meshed; the whole
/// handshake counts against `timeout`.
pub async fn connect(upstream: Upstream<'_>, carried: Carried, timeout: Duration) -> Result<UpstreamIo, ConnectError> {
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
    let handshake = async {
        let stream = connect_tcp(address, timeout).await?;
        // The verifier checks the SPIFFE identity; the name only feeds session resumption.
        let name = ServerName::IpAddress(address.ip().into());
        tokio_rustls::TlsConnector::from(peer.config(carried).clone())
            .connect(name, stream)
            .await
            .map_err(|error| ConnectError::Tls { identity: peer.identity.clone(), reason: error.to_string() })
    };
    let stream = tokio::time::timeout(timeout, handshake).await.map_err(|_| ConnectError::Timeout(timeout))??;
    Ok(UpstreamIo::Tls(Box::new(stream)))
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
