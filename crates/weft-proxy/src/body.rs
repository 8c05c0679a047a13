//! The one body type the proxy hands to hyper, and helpers to make it.

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};

/// Any error a body can fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Request and response bodies as the proxy forwards them: upstream streams, buffered
/// replays and proxy-made responses all become this one type.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A body of fixed bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

/// Boxes any body whose errors convert into [`BoxError`].
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// A body that keeps `guard` alive until the body is finished or dropped: in-flight
/// counts and request permits last as long as the response streams.
pub struct Guarded<G> {
    inner: Body,
    _guard: G,
}

impl<G: Send + Unpin + 'static> Guarded<G> {
    /// Wraps `inner`, holding `guard` for its lifetime.
    pub fn wrap(inner: Body, guard: G) -> Body {
        Guarded { inner, _guard: guard }.boxed_unsync()
    }
}

impl<G> http_body::Body for Guarded<G>
where
    G: Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// What a [`Watched`] body tells its watcher: every frame as it passes, and the end
/// (the last frame read, or the body dropped unfinished), exactly once. Telemetry, spans
/// and access logs each finish their record of a request this way, when its response
/// body ends.
pub trait Watch: Send + Unpin + 'static {
    /// A frame, or the error the body failed with.
    fn frame(&mut self, _frame: &Result<http_body::Frame<Bytes>, BoxError>) {}

    /// The body ended or was dropped.
    fn end(self);
}

/// A body that shows its frames and its end to a [`Watch`].
pub struct Watched<W: Watch> {
    inner: Body,
    watch: Option<W>,
}

impl<W: Watch> Watched<W> {
    /// Wraps `inner`, reporting it to `watch`.
    pub fn wrap(inner: Body, watch: W) -> Body {
        Watched { inner, watch: Some(watch) }.boxed_unsync()
    }
}

impl<W: Watch> http_body::Body for Watched<W> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(frame)) => {
                if let Some(watch) = self.watch.as_mut() {
                    watch.frame(frame);
                }
            }
            std::task::Poll::Ready(None) => {
                if let Some(watch) = self.watch.take() {
                    watch.end();
                }
            }
            std::task::Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<W: Watch> Drop for Watched<W> {
    fn drop(&mut self) {
        if let Some(watch) = self.watch.take() {
            watch.end();
        }
    }
}

/// The bytes a request body has streamed so far, for an access log line or a tap event
/// whose request did not declare its length: shared by the watcher on the body and the
/// record that reads it when the response ends.
#[derive(Clone, Debug, Default)]
pub struct Counter(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl Counter {
    /// A body's declared length, or else `counter` (made on first use) to count it.
    pub fn length_or(declared: Option<u64>, counter: &mut Option<Counter>) -> Result<u64, Counter> {
        declared.ok_or_else(|| counter.get_or_insert_with(Counter::default).clone())
    }

    /// `body`, counted when `counter` is set.
    pub fn maybe_count(counter: Option<&Counter>, body: Body) -> Body {
        match counter {
            Some(counter) => counter.count(body),
            None => body,
        }
    }

    /// Counts `bytes` more (a body that was read whole before it was sent).
    pub fn add(&self, bytes: u64) {
        self.0.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// The bytes counted so far.
    pub fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `body`, counted as it streams.
    pub fn count(&self, body: Body) -> Body {
        Watched::wrap(body, self.clone())
    }
}

impl Watch for Counter {
    fn frame(&mut self, frame: &Result<http_body::Frame<Bytes>, BoxError>) {
        if let Some(data) = frame.as_ref().ok().and_then(|frame| frame.data_ref()) {
            self.add(data.len() as u64);
        }
    }

    fn end(self) {}
}
