//! Binding listeners, accepting connections, serving HTTP on them, and draining.
//!
//! Each worker thread gets its own socket per listener, bound with `SO_REUSEPORT` to the
//! same address, so the kernel spreads connections over workers with no shared accept
//! queue. Draining: every connection task holds a [`DrainWatch`]; on shutdown the watch
//! fires (accept loops stop, HTTP connections finish their in-flight requests and close)
//! and [`Drain::wait`] returns once every watch is dropped or the timeout passes.

use std::{future::Future, io, net::SocketAddr, pin::Pin, time::Duration};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use socket2::{Domain, Socket, Type};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};

use crate::{
    batched_writes::{BatchedWrites, SendAfterPoll},
    body::Body,
    detect::{self, Detected},
    protocol_errors::ProtocolError,
    state::SharedState,
};

/// The largest HTTP/1 request head (line and headers) accepted; larger ones get a 431,
/// request targets over 64 KiB a 414 (hyper's limit). Envoy's default is 60 KiB and
/// nginx's 32 KiB: 96 KiB is above both, so nothing that works behind them breaks here.
/// Heads up to hyper's read buffer (~400 KiB) are read whole before the refusal, so the
/// peer gets its 431 instead of a reset.
const MAX_REQUEST_HEAD: usize = 96 * 1024;

/// HTTP/2 limits a server connection enforces, set here rather than left to hyper's
/// defaults so that an upgrade of the codec cannot loosen them unnoticed.
mod h2_limits {
    /// Streams open at once per connection; more are refused (REFUSED_STREAM).
    pub const MAX_CONCURRENT_STREAMS: u32 = 200;
    /// Streams a client may open and reset before the proxy has accepted them; beyond
    /// it the connection ends with ENHANCE_YOUR_CALM (rapid reset, CVE-2023-44487).
    pub const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
    /// Streams the proxy may reset for the client's protocol errors before it ends the
    /// connection.
    pub const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 256;
    /// Decoded header block size (the HPACK bomb's target); larger ones get a 431.
    pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
}

/// Why a listener could not be bound; the message names the flag to change.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {address} ({what}, set with {flag}): {source}{hint}")]
pub struct BindError {
    pub what: &'static str,
    pub flag: &'static str,
    pub address: SocketAddr,
    pub source: io::Error,
    hint: &'static str,
}

/// Binds `count` sockets to `address`, with `SO_REUSEPORT` when `count > 1` (port 0 is
/// resolved by the first bind and reused by the others).
pub fn bind(
    address: SocketAddr,
    count: usize,
    what: &'static str,
    flag: &'static str,
) -> Result<Vec<std::net::TcpListener>, BindError> {
    let fail = |address, source: io::Error| {
        let hint = if source.kind() == io::ErrorKind::AddrInUse {
            "; another process (perhaps another weft proxy) uses this port: stop it or choose another port"
        } else if source.kind() == io::ErrorKind::PermissionDenied {
            "; ports below 1024 need privileges: choose a higher port"
        } else {
            ""
        };
        BindError { what, flag, address, source, hint }
    };
    let mut listeners = Vec::with_capacity(count);
    let mut resolved = address;
    for _ in 0..count.max(1) {
        let socket = Socket::new(Domain::for_address(resolved), Type::STREAM, None).map_err(|e| fail(resolved, e))?;
        socket.set_reuse_address(true).map_err(|e| fail(resolved, e))?;
        // Only with several workers: SO_REUSEPORT would also let a second proxy of the same
        // user share the port silently instead of failing with "address in use".
        if count > 1 {
            socket.set_reuse_port(true).map_err(|e| fail(resolved, e))?;
        }
        socket.set_nonblocking(true).map_err(|e| fail(resolved, e))?;
        socket.bind(&resolved.into()).map_err(|e| fail(resolved, e))?;
        socket.listen(1024).map_err(|e| fail(resolved, e))?;
        let listener: std::net::TcpListener = socket.into();
        resolved = listener.local_addr().map_err(|e| fail(resolved, e))?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Starts a drain: created once per process; hand out [`Drain::watch`]es.
pub struct Drain {
    signal: watch::Sender<bool>,
    guard: Option<mpsc::Sender<()>>,
    done: mpsc::Receiver<()>,
}

/// Held by every accept loop and connection; says when to stop.
#[derive(Clone)]
pub struct DrainWatch {
    signal: watch::Receiver<bool>,
    _guard: mpsc::Sender<()>,
}

impl Drain {
    /// A drain not yet signalled.
    pub fn new() -> Self {
        let (signal, _) = watch::channel(false);
        let (guard, done) = mpsc::channel(1);
        Drain { signal, guard: Some(guard), done }
    }

    /// A new watch on this drain.
    pub fn watch(&self) -> DrainWatch {
        DrainWatch { signal: self.signal.subscribe(), _guard: self.guard.clone().expect("watch() after wait()") }
    }

    /// Signals every watch and waits until all are dropped or `timeout` passes; returns
    /// whether everything finished in time.
    pub async fn wait(mut self, timeout: Duration) -> bool {
        let _ = self.signal.send(true);
        self.guard = None;
        tokio::time::timeout(timeout, self.done.recv()).await.is_ok()
    }
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl DrainWatch {
    /// Resolves when the drain starts.
    pub async fn signaled(&mut self) {
        let _ = self.signal.wait_for(|draining| *draining).await;
    }
}

/// Accepts connections until the drain starts, spawning `serve` for each.
pub async fn accept_loop<F, Fut>(listener: std::net::TcpListener, mut drain: DrainWatch, serve: F)
where
    F: Fn(TcpStream, SocketAddr, DrainWatch) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, "cannot register listener with the runtime");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = drain.signaled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(serve(stream, peer, drain.clone()));
                }
                Err(error) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Serves HTTP/1.1 (with upgrades) or HTTP/2 on one connection until it closes or the
/// drain starts, then finishes in-flight requests and closes gracefully.
///
/// The version comes from a peek at the first bytes (`detected`, or peeked here), and
/// the matching hyper connection type serves it directly: cheaper per read than a
/// server that sniffs the preface through a rewinding wrapper.
pub async fn serve_http<S>(
    stream: TcpStream,
    detected: Option<Detected>,
    service: S,
    mut drain: DrainWatch,
    state: &SharedState,
    direction: &'static str,
) where
    S: ProxyService,
    S::Future: Send + 'static,
{
    let detected = match detected {
        Some(detected) => detected,
        // Only HTTP/1.1 versus HTTP/2 is at stake here, so wait as long as hyper's header
        // timeout would for a client that connects early and speaks later.
        None => match detect::detect(&stream, state.settings.header_read_timeout).await {
            Ok(Detected::TimedOut) => {
                state.metrics.protocol_error(direction, ProtocolError::HeaderReadTimeout);
                return;
            }
            Ok(detected) => detected,
            Err(_) => return,
        },
    };
    if detected == Detected::Http2 {
        // Plaintext HTTP/2: the connection's writes leave once per poll (batched_writes.rs).
        let (io, sender) = BatchedWrites::new(stream);
        let connection = SendAfterPoll::new(http2_connection(io, service, state), sender);
        report_end(serve_until_drained(connection, &mut drain).await, state, direction);
    } else {
        serve_http_on(stream, false, service, drain, state, direction).await;
    }
}

/// Serves HTTP/2 (`http2`) or HTTP/1.1 on any connection, TLS ones included, and counts
/// the protocol violation it ends with, if any, under `direction`.
pub async fn serve_http_on<I, S>(
    stream: I,
    http2: bool,
    service: S,
    mut drain: DrainWatch,
    state: &SharedState,
    direction: &'static str,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: ProxyService,
    S::Future: Send + 'static,
{
    let settings = &state.settings;
    let result = if http2 {
        serve_until_drained(http2_connection(stream, service, state), &mut drain).await
    } else {
        let io = TokioIo::new(stream);
        // Flattened writes (headers and small bodies copied into one buffer, one write)
        // measured cheaper than vectored writes for proxied responses: 3% fewer
        // instructions and ~5% less CPU per request against nginx with 1 KiB bodies.
        let connection = hyper::server::conn::http1::Builder::new()
            .writev(false)
            .timer(TokioTimer::new())
            .header_read_timeout(Some(settings.header_read_timeout))
            .max_header_size(MAX_REQUEST_HEAD)
            .serve_connection(io, service)
            .with_upgrades();
        serve_until_drained(connection, &mut drain).await
    };
    report_end(result, state, direction);
}

/// A server connection speaking HTTP/2 on `stream`, with the proxy's limits.
fn http2_connection<I, S>(
    stream: I,
    service: S,
    state: &SharedState,
) -> hyper::server::conn::http2::Connection<TokioIo<I>, BoxedRequests<S>, TokioExecutor>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: ProxyService,
    S::Future: Send + 'static,
{
    let settings = &state.settings;
    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(settings.h2_keepalive))
        .keep_alive_timeout(settings.h2_keepalive * 2)
        .max_concurrent_streams(h2_limits::MAX_CONCURRENT_STREAMS)
        .max_pending_accept_reset_streams(h2_limits::MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(h2_limits::MAX_LOCAL_ERROR_RESET_STREAMS)
        .max_header_list_size(h2_limits::MAX_HEADER_LIST_SIZE)
        .serve_connection(TokioIo::new(stream), BoxedRequests(service))
}

/// Counts the protocol violation a downstream connection ended with, if any.
fn report_end(result: Result<(), hyper::Error>, state: &SharedState, direction: &'static str) {
    if let Err(error) = result {
        match ProtocolError::of_connection(&error) {
            Some(violation) => {
                tracing::debug!(%error, direction, reason = violation.as_str(), "refused a protocol violation");
                state.metrics.protocol_error(direction, violation);
            }
            None => tracing::debug!(%error, direction, "downstream connection ended with an error"),
        }
    }
}

/// A hyper server connection that can be asked to finish its in-flight requests and close.
trait GracefulConnection: Future<Output = Result<(), hyper::Error>> {
    fn start_graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S> GracefulConnection for hyper::server::conn::http1::UpgradeableConnection<TokioIo<I>, S>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: ProxyService,
    S::Future: Send + 'static,
{
    fn start_graceful_shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<C: GracefulConnection> GracefulConnection for SendAfterPoll<C> {
    fn start_graceful_shutdown(self: Pin<&mut Self>) {
        self.connection().start_graceful_shutdown();
    }
}

impl<I, S> GracefulConnection for hyper::server::conn::http2::Connection<TokioIo<I>, S, TokioExecutor>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: ProxyService,
    S::Future: Send + 'static,
{
    fn start_graceful_shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// `service` with its request future boxed, for HTTP/2 connections. hyper runs every
/// HTTP/2 stream as a task that holds the request future, and the task is moved as it is
/// spawned and again as tokio changes its stage: for a future of several KiB (the proxy's
/// is ~5 KiB, the largest of its states) those copies were most of the memcpy in an h2c
/// request. Boxed, the future is written once and the task moves a pointer. HTTP/1.1
/// polls its future in place inside the connection, so it is not boxed there (boxing
/// cost HTTP/1.1 3% more instructions).
struct BoxedRequests<S>(S);

impl<S> hyper::service::Service<Request<Incoming>> for BoxedRequests<S>
where
    S: ProxyService,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<S::Future>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        Box::pin(self.0.call(request))
    }
}

/// The request handlers the proxy serves connections with.
pub trait ProxyService:
    hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = std::convert::Infallible> + Send + 'static
{
}

impl<S> ProxyService for S where
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = std::convert::Infallible>
        + Send
        + 'static
{
}

/// Drives `connection` until it ends, or until the drain starts and it has finished its
/// in-flight requests.
async fn serve_until_drained(connection: impl GracefulConnection, drain: &mut DrainWatch) -> Result<(), hyper::Error> {
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => result,
        _ = drain.signaled() => {
            connection.as_mut().start_graceful_shutdown();
            connection.await
        }
    }
}
