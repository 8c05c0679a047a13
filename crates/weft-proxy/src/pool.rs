//! Upstream HTTP connections: a per-thread LIFO pool of HTTP/1.1 connections and one
//! multiplexed HTTP/2 connection per endpoint and thread.
//!
//! Each worker is a single-threaded runtime, so the pool is thread-local: no lock on the
//! hot path. An HTTP/1.1 connection returns to the pool when its response body ends (the
//! most recently used first, as it is the likeliest still open). Pooled connections are
//! keyed by [`EndpointKey`] — address, the identity the peer proved, protocol and the
//! Service port conveyed to it — so configuration swaps keep them, while a connection
//! opened under other security (plaintext before the endpoint was meshed, another
//! identity) is never reused and closes at the next eviction. A request that a stale
//! pooled connection refuses before sending anything is re-sent on a fresh connection.

use std::{
    cell::RefCell,
    collections::HashMap,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::{
    body::{self, Body, BoxError},
    endpoint::EndpointKey,
    limits::{ConnectionPermit, IdleMark, LimitExceeded, Limiter},
    revocation::{PeerCertificate, Revocations},
    transport::{self, Carried, ConnectError, Upstream},
    word_hash::WordHashBuilder,
};

/// The HTTP version spoken to an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Wire {
    Http1,
    Http2,
}

/// Why a request could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made: the request never left the proxy.
    #[error("{0}")]
    Connect(#[from] ConnectError),
    /// A connection limit refused a new connection.
    #[error("{0}")]
    Limit(LimitExceeded),
    /// The connection failed after the request was (possibly) sent.
    #[error("{0}")]
    Reset(hyper::Error),
    /// The per-try timeout elapsed before response headers.
    #[error("no response within the per-try timeout of {0:?}")]
    Timeout(Duration),
    /// The caller's request body broke its framing (an invalid chunk, a body shorter than
    /// announced) while it was being sent: the caller's fault, not the endpoint's.
    #[error("the request body broke off: {0}")]
    RequestBody(hyper::Error),
}

impl SendError {
    /// A failed `send_request`: [`SendError::RequestBody`] when what failed was reading
    /// the downstream body (hyper reports it as the user's body stream failing, with the
    /// server side's error as its cause), else [`SendError::Reset`].
    pub fn of_send(error: hyper::Error) -> SendError {
        let downstream = error.is_user()
            && std::error::Error::source(&error).is_some_and(|cause| cause.downcast_ref::<hyper::Error>().is_some());
        if downstream {
            SendError::RequestBody(error)
        } else {
            SendError::Reset(error)
        }
    }
}

/// A failed send; `unsent` hands the request back when it never left the proxy (no
/// connection could be had), so that it can be sent elsewhere without a copy.
#[derive(Debug)]
pub struct SendFailure {
    pub error: SendError,
    /// Boxed: failures are rare, and a `Result` this large would burden every send.
    pub unsent: Option<Box<Request<Body>>>,
}

impl SendFailure {
    fn sent(error: SendError) -> Self {
        SendFailure { error, unsent: None }
    }
}

/// Connection settings shared by every send.
#[derive(Clone, Debug)]
pub struct Connector {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub h2_keepalive: Duration,
    /// Peers refused at the handshake, and whose open connections are cut off.
    pub revocations: Arc<Revocations>,
}

impl Connector {
    /// Drives an upstream connection until it ends, or until its peer is revoked (then
    /// it is dropped, which closes it, pooled or busy); `permit` is released after.
    fn drive<F>(
        &self,
        address: std::net::SocketAddr,
        peer: Option<PeerCertificate>,
        connection: F,
        permit: ConnectionPermit,
        what: &'static str,
    ) where
        F: std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static,
    {
        let revoked =
            peer.map(|peer| (self.revocations.until_revoked(peer.identity.clone(), peer.serial.clone()), peer));
        tokio::spawn(async move {
            match revoked {
                None => {
                    if let Err(error) = connection.await {
                        tracing::debug!(%address, %error, "upstream {what} connection ended with an error");
                    }
                }
                Some((revoked, peer)) => tokio::select! {
                    ended = connection => if let Err(error) = ended {
                        tracing::debug!(%address, %error, "upstream {what} connection ended with an error");
                    },
                    () = revoked => tracing::info!(%address, peer = %peer.identity, "closed a connection to a revoked peer"),
                },
            }
            drop(permit);
        });
    }
}

struct IdleConnection {
    sender: http1::SendRequest<Body>,
    idle_since: Instant,
    /// Counts it as idle for its limiter (see `limits.rs`: idle connections reclaimed).
    mark: IdleMark,
}

thread_local! {
    static IDLE_HTTP1: RefCell<HashMap<EndpointKey, Vec<IdleConnection>, WordHashBuilder>> = RefCell::new(HashMap::default());
    static HTTP2: RefCell<HashMap<EndpointKey, http2::SendRequest<Body>, WordHashBuilder>> = RefCell::new(HashMap::default());
}

impl Connector {
    /// Sends `request` to `address` over `wire`, reusing a pooled connection if one is
    /// idle. Opening a new connection counts against `limiter`'s `maxConnections`.
    ///
    /// This future is nested in every request's, and an awaited future is moved into
    /// its caller's state whole, whatever part of it is live: so what only a new
    /// connection needs is boxed, and the future a pooled request awaits stays small
    /// (`bench/cachegrind.py` counts the data writes this saves).
    pub async fn send(
        &self,
        upstream: Upstream<'_>,
        wire: Wire,
        limiter: &Arc<Limiter>,
        request: Request<Body>,
    ) -> Result<Response<Body>, SendFailure> {
        match wire {
            Wire::Http1 => self.send_http1(upstream, limiter, request).await,
            Wire::Http2 => self.send_http2(upstream, limiter, request).await,
        }
    }

    async fn send_http1(
        &self,
        upstream: Upstream<'_>,
        limiter: &Arc<Limiter>,
        mut request: Request<Body>,
    ) -> Result<Response<Body>, SendFailure> {
        let key = upstream.key();
        // Pooled connections first; one that turns out closed hands the request back.
        while let Some(mut sender) = self.checkout_http1(&key) {
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(self.pooled_response(&key, sender, limiter.clone(), response)),
                Err(mut error) => match error.take_message() {
                    Some(unsent) => request = unsent,
                    None => return Err(SendFailure::sent(SendError::of_send(error.into_error()))),
                },
            }
        }
        // Boxed: opening a connection is the cold path, and its future (a TCP or TLS
        // connect, a handshake: ~1.6 KiB) would otherwise be part of every request's
        // future, copied at each await on the way down (see `send`).
        let mut sender = match Box::pin(self.open_http1(upstream, limiter)).await {
            Ok(sender) => sender,
            Err(error) => return Err(SendFailure { error, unsent: Some(Box::new(request)) }),
        };
        let response = sender.send_request(request).await.map_err(|e| SendFailure::sent(SendError::of_send(e)))?;
        Ok(self.pooled_response(&key, sender, limiter.clone(), response))
    }

    fn checkout_http1(&self, key: &EndpointKey) -> Option<http1::SendRequest<Body>> {
        IDLE_HTTP1.with(|pool| {
            let mut pool = pool.borrow_mut();
            let idle = pool.get_mut(key)?;
            while let Some(connection) = idle.pop() {
                if connection.sender.is_closed() || connection.idle_since.elapsed() > self.idle_timeout {
                    continue; // dropping the sender closes the connection
                }
                return Some(connection.sender);
            }
            None
        })
    }

    async fn open_http1(
        &self,
        upstream: Upstream<'_>,
        limiter: &Arc<Limiter>,
    ) -> Result<http1::SendRequest<Body>, SendError> {
        let address = upstream.address();
        let permit = loop {
            if let Ok(permit) = limiter.try_open_connection() {
                break permit;
            }
            limiter.reclaim_idle();
            limiter.wait_for_connection(self.connect_timeout).await.map_err(SendError::Limit)?;
            if let Some(sender) = self.checkout_http1(&upstream.key()) {
                return Ok(sender);
            }
        };
        let io =
            transport::connect(upstream, Carried::Http1, self.connect_timeout, &self.revocations.current()).await?;
        let peer = io.peer();
        // Flattened writes: see listener.rs for the measurement.
        let (sender, connection) =
            http1::Builder::new().writev(false).handshake(TokioIo::new(io)).await.map_err(SendError::Reset)?;
        self.drive(address, peer, connection, permit, "HTTP/1.1");
        Ok(sender)
    }

    fn pooled_response(
        &self,
        key: &EndpointKey,
        sender: http1::SendRequest<Body>,
        limiter: Arc<Limiter>,
        response: Response<Incoming>,
    ) -> Response<Body> {
        response.map(|incoming| {
            body::boxed(PooledBody { inner: incoming, home: Some((sender, limiter)), key: key.clone() })
        })
    }

    async fn send_http2(
        &self,
        upstream: Upstream<'_>,
        limiter: &Arc<Limiter>,
        request: Request<Body>,
    ) -> Result<Response<Body>, SendFailure> {
        let mut sender = match self.http2_connection(upstream, limiter).await {
            Ok(sender) => sender,
            Err(error) => return Err(SendFailure { error, unsent: Some(Box::new(request)) }),
        };
        if let Err(error) = sender.ready().await {
            return Err(SendFailure { error: SendError::Reset(error), unsent: Some(Box::new(request)) });
        }
        let response = sender.send_request(request).await.map_err(|e| SendFailure::sent(SendError::of_send(e)))?;
        Ok(response.map(body::boxed))
    }

    /// This thread's multiplexed connection to `address`, opened if there is none.
    async fn http2_connection(
        &self,
        upstream: Upstream<'_>,
        limiter: &Arc<Limiter>,
    ) -> Result<http2::SendRequest<Body>, SendError> {
        let existing = HTTP2.with(|pool| pool.borrow().get(&*upstream.key()).filter(|s| !s.is_closed()).cloned());
        match existing {
            Some(sender) => Ok(sender),
            // Boxed, as in `send_http1`: the cold path stays out of every request's future.
            None => Box::pin(self.open_http2(upstream, limiter)).await,
        }
    }

    /// Opens this thread's multiplexed connection to `address` and keeps it for the
    /// requests that follow.
    async fn open_http2(
        &self,
        upstream: Upstream<'_>,
        limiter: &Arc<Limiter>,
    ) -> Result<http2::SendRequest<Body>, SendError> {
        let address = upstream.address();
        let key = upstream.key();
        let permit = loop {
            if let Ok(permit) = limiter.try_open_connection() {
                break permit;
            }
            limiter.reclaim_idle();
            limiter.wait_for_connection(self.connect_timeout).await.map_err(SendError::Limit)?;
        };
        let io =
            transport::connect(upstream, Carried::Http2, self.connect_timeout, &self.revocations.current()).await?;
        let peer = io.peer();
        let (sender, connection) = http2::Builder::new(BoxingExecutor)
            .timer(TokioTimer::new())
            .keep_alive_interval(self.h2_keepalive)
            .keep_alive_timeout(self.h2_keepalive * 2)
            .handshake(TokioIo::new(io))
            .await
            .map_err(SendError::Reset)?;
        self.drive(address, peer, connection, permit, "HTTP/2");
        HTTP2.with(|pool| pool.borrow_mut().insert(key.into_owned(), sender.clone()));
        Ok(sender)
    }

    /// Sends an HTTP/1.1 `Upgrade` request (e.g. WebSocket) on a connection of its own,
    /// which becomes the upgraded tunnel and is never pooled.
    pub async fn send_upgrade(
        &self,
        upstream: Upstream<'_>,
        limiter: &Arc<Limiter>,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        let address = upstream.address();
        let permit = limiter.try_open_connection().map_err(SendError::Limit)?;
        let io =
            transport::connect(upstream, Carried::Http1, self.connect_timeout, &self.revocations.current()).await?;
        let peer = io.peer();
        let (mut sender, connection) = http1::handshake(TokioIo::new(io)).await.map_err(SendError::Reset)?;
        self.drive(address, peer, connection.with_upgrades(), permit, "upgraded");
        sender.send_request(request).await.map_err(SendError::of_send)
    }
}

/// The executor of upstream HTTP/2 connections: tokio's spawn, with each future boxed
/// first.
///
/// hyper's HTTP/2 client spawns a task per request (it waits for the response and hands
/// it to the caller), typed as one enum with the connection's own task, so every such
/// task is as large as the connection's: ~1.5 KiB, copied half a dozen times on its way
/// into tokio's task cell and again when it finishes. Boxed, it is copied once and tokio
/// moves a pointer (gate: ~1,600 fewer instructions per request and upstream HTTP/2
/// connection, -2.0% on the h2c hop and pair, -2.8% on the gRPC pair).
#[derive(Clone, Copy, Debug)]
struct BoxingExecutor;

impl<F> hyper::rt::Executor<F> for BoxingExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        tokio::spawn(Box::pin(future));
    }
}

/// A response body that puts its HTTP/1.1 connection back in the pool when it ends.
struct PooledBody {
    inner: Incoming,
    /// The connection and its limiter, until the body ends and it goes back to the pool.
    home: Option<(http1::SendRequest<Body>, Arc<Limiter>)>,
    key: EndpointKey,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some((sender, limiter)) = self.home.take() {
            // No count cap here: every pooled connection still holds its `maxConnections`
            // permit, and idle ones expire after `idle_timeout`. A fixed cap below the
            // concurrency closed and reopened connections on every burst (a 320-stream
            // h2c load opened ~1,000 upstream connections in 3 s behind a cap of 256).
            let connection = IdleConnection { sender, idle_since: Instant::now(), mark: limiter.connection_returned() };
            IDLE_HTTP1.with(|pool| pool.borrow_mut().entry(self.key.clone()).or_default().push(connection));
        }
    }
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.release(),
            Poll::Ready(Some(Err(_))) => this.home = None,
            _ => {}
        }
        polled.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // Bodies that are empty by nature (HEAD, 204, 304) may never be polled.
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}

/// Closes this thread's idle HTTP/1.1 connections that a worker at `maxConnections`
/// waits for (`limits.rs`), so that their permits free.
pub fn reclaim_idle() {
    IDLE_HTTP1.with(|pool| {
        let mut pool = pool.borrow_mut();
        for idle in pool.values_mut() {
            idle.retain(|connection| !connection.mark.reclaim_wanted());
        }
        pool.retain(|_, idle| !idle.is_empty());
    });
}

/// Closes this thread's idle HTTP/1.1 connections older than `idle_timeout` or to an
/// endpoint that is no longer `current` (its address now has another identity, say),
/// and drops HTTP/2 connections that have closed or are no longer current (open
/// streams finish: hyper closes the connection once the last one ends).
pub fn evict_idle(idle_timeout: Duration, current: impl Fn(&EndpointKey) -> bool) {
    IDLE_HTTP1.with(|pool| {
        let mut pool = pool.borrow_mut();
        for (key, idle) in pool.iter_mut() {
            if !current(key) {
                idle.clear();
            }
            idle.retain(|c| !c.sender.is_closed() && c.idle_since.elapsed() <= idle_timeout);
        }
        pool.retain(|_, idle| !idle.is_empty());
    });
    HTTP2.with(|pool| pool.borrow_mut().retain(|key, sender| !sender.is_closed() && current(key)));
}
