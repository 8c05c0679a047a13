//! Opening connections to endpoints: the one place where proxy-to-proxy TLS will plug in.
//!
//! Every upstream connection, HTTP or opaque TCP, outbound or to the local app, is made
//! by [`connect`]; when mutual TLS arrives it wraps the stream here, choosing the
//! application protocol by ALPN, and nothing above this module changes.

use std::{io, net::SocketAddr, time::Duration};

use tokio::net::TcpStream;

/// The stream type upstream connections use.
pub type UpstreamIo = TcpStream;

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Connects to `address` within `timeout`, with Nagle's algorithm off (requests and
/// responses are written whole; delaying small writes only adds latency).
pub async fn connect(address: SocketAddr, timeout: Duration) -> Result<UpstreamIo, ConnectError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(address))
        .await
        .map_err(|_| ConnectError::Timeout(timeout))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}
