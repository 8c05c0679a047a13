//! Distributed tracing: the sampling decision for each request, the spans a proxy makes
//! (a SERVER span per inbound request, a CLIENT span per outbound try), and their export
//! over OTLP.
//!
//! The decision is head-based and parent-based: a request that arrives with a decision
//! (a `traceparent`, a B3 sampling state) keeps it, and a sampled one carries it on in
//! `traceparent`. One that arrives without is decided by the addressed Service's rate
//! from its trace id, which is its request id's (see `trace_context::sampled_at`): every
//! proxy on its way at the same rate decides the same, so an unsampled request carries
//! nothing but its `x-request-id`, and a Service whose own rate is higher samples the
//! requests it receives at that rate. `x-weft-trace: force` samples regardless, from
//! callers MeshConfig's `forceFrom` names.
//!
//! Spans never touch a shared structure on the request path: a finished span goes into
//! its worker's buffer, the worker's housekeeping tick hands the buffer to the exporter
//! each second, and the exporter sends batches from the proxy's main thread, as
//! OpenTelemetry's batch span processor does (512 at once, else after a delay). Every
//! bound (the worker buffer, the queue, a receiver that is down) drops spans and counts
//! them; none slows a request.

use std::{
    cell::{Cell, RefCell},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{HeaderMap, Response};
use opentelemetry_proto::tonic::{
    common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue},
    resource::v1::Resource,
    trace::v1::{span::SpanKind, status::StatusCode as OtlpStatus},
};
use prost::Message;
use tokio::sync::mpsc;
use weft_model::{snapshot::TracingSettings, spec::OtlpProtocol};

use crate::{
    body::{Body, BoxError},
    metrics::SpanDropLabels,
    span_wire,
    state::SharedState,
    trace_context::{self, B3Form, SpanId, TraceId},
};

/// Spans one worker holds between housekeeping ticks (one second).
const WORKER_BUFFER: usize = 4096;
/// Worker batches waiting for the exporter.
const QUEUE_BATCHES: usize = 32;
/// How long one export may take before its spans are dropped.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The trace of one request at one side of a proxy, decided as the request arrived.
pub struct RequestTrace {
    pub trace_id: TraceId,
    /// The caller's span, the parent of this side's spans.
    pub parent: Option<SpanId>,
    pub sampled: bool,
    b3: Option<B3Form>,
    /// When sampled, the span id this side names to the next hop when it makes no span
    /// of its own per try (a proxy-made answer, an upgrade).
    pub own_span: SpanId,
}

impl RequestTrace {
    /// Decides the trace of a request whose headers said `scanned` (its request id seen
    /// to, so that a request without context has a trace id): the caller's decision if
    /// it made one, else `rate`. `may_force` says whether the caller may force a trace;
    /// it is asked only when the request asks to.
    pub fn begin(scanned: &trace_context::Scanned, rate: f64, may_force: impl FnOnce() -> bool) -> RequestTrace {
        let extracted = &scanned.context;
        let forced = scanned.force && {
            let allowed = may_force();
            if !allowed {
                tracing::debug!(
                    "x-weft-trace: force from a caller MeshConfig's tracing.forceFrom does not name; ignored"
                );
            }
            allowed
        };
        let (trace_id, parent) = match extracted.ids {
            Some((trace, span)) => (trace, Some(span)),
            None => (scanned.request_id.unwrap_or_else(trace_context::new_trace_id), None),
        };
        let sampled = forced || extracted.sampled.unwrap_or_else(|| trace_context::sampled_at(&trace_id, rate));
        RequestTrace {
            trace_id,
            parent,
            sampled,
            b3: extracted.b3,
            own_span: if sampled { trace_context::new_span_id() } else { [0; 8] },
        }
    }

    /// Writes the context the next hop receives when the trace is sampled, naming
    /// `span` (this side's span for the hop). An unsampled request goes on as it came:
    /// with the context it carried, or with its request id alone, from which the next
    /// proxy takes the same trace id and the same decision.
    pub fn propagate(&self, headers: &mut HeaderMap, span: &SpanId) {
        if self.sampled {
            trace_context::inject(headers, &self.trace_id, span, true, self.b3);
        }
    }
}

/// The sampling rate for requests to a Service with override `service_rate`.
pub fn rate_for(settings: &TracingSettings, service_rate: Option<f64>) -> f64 {
    service_rate.unwrap_or(settings.sampling_rate)
}

/// Which side of a hop a span describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The inbound side: a request received for the local application.
    Server,
    /// The outbound side: one try sent to an endpoint.
    Client,
}

/// A span being made: its ids, name and attributes so far, and when it started.
pub struct PendingSpan {
    /// Boxed: a pending span rides in request futures, which stay small when unsampled.
    span: Box<Draft>,
    kind: Kind,
    started: Instant,
}

/// What a span holds until it ends; its attributes already encoded.
struct Draft {
    trace_id: TraceId,
    span_id: SpanId,
    parent: Option<SpanId>,
    flags: u32,
    name: String,
    start_unix_nanos: u64,
    attributes: span_wire::Attributes,
    /// An error status and its message.
    error: Option<String>,
}

impl PendingSpan {
    /// A span of `trace` with id `id`, started at `started`.
    pub fn start(trace: &RequestTrace, id: SpanId, kind: Kind, name: String, started: Instant) -> PendingSpan {
        let since = started.elapsed();
        let start_unix = SystemTime::now().checked_sub(since).unwrap_or(UNIX_EPOCH);
        let span = Box::new(Draft {
            trace_id: trace.trace_id,
            span_id: id,
            parent: trace.parent,
            // Sampled; and whether the parent is remote is known (it is, when there is one).
            flags: 0x1 | 0x100 | if trace.parent.is_some() { 0x200 } else { 0 },
            name,
            start_unix_nanos: unix_nanos(start_unix),
            attributes: span_wire::Attributes::default(),
            error: None,
        });
        PendingSpan { span, kind, started }
    }

    /// Adds a string attribute.
    pub fn text(&mut self, key: &'static str, value: impl AsRef<str>) {
        self.span.attributes.text(key, value.as_ref());
    }

    /// Adds an integer attribute.
    pub fn int(&mut self, key: &'static str, value: i64) {
        self.span.attributes.int(key, value);
    }

    /// The request's attributes, as OpenTelemetry's HTTP conventions name them.
    pub fn request(&mut self, method: &http::Method, path: &str, authority: &str, version: http::Version) {
        self.text("http.request.method", method.as_str());
        self.text("url.path", path);
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => (host, port.parse::<i64>().ok()),
            _ => (authority, None),
        };
        self.text("server.address", host);
        if let Some(port) = port {
            self.int("server.port", port);
        }
        let version = match version {
            http::Version::HTTP_10 => "1.0",
            http::Version::HTTP_2 => "2",
            _ => "1.1",
        };
        self.text("network.protocol.version", version);
    }

    /// The response status. A server span is an error on 5xx; a client span on 4xx too
    /// (the request it sent was refused).
    pub fn status(&mut self, status: u16) {
        self.int("http.response.status_code", status as i64);
        let failed = status >= 500 || (self.kind == Kind::Client && status >= 400);
        if failed && self.span.error.is_none() {
            self.text("error.type", itoa::Buffer::new().format(status));
            self.span.error = Some(String::new());
        }
    }

    /// The proxy's own reason for failing the request (the `weft-error` header).
    pub fn error(&mut self, reason: &str, message: String) {
        self.text("weft.error", reason);
        self.text("error.type", reason);
        self.span.error = Some(message);
    }

    /// Ends the span now.
    pub fn finish(self) {
        let end_unix_nanos = self.span.start_unix_nanos + self.started.elapsed().as_nanos() as u64;
        let span = &*self.span;
        let fields = span_wire::SpanFields {
            trace_id: &span.trace_id,
            span_id: &span.span_id,
            parent: span.parent.as_ref(),
            name: &span.name,
            kind: match self.kind {
                Kind::Server => SpanKind::Server,
                Kind::Client => SpanKind::Client,
            } as i32,
            start_unix_nanos: span.start_unix_nanos,
            end_unix_nanos,
            status: span.error.as_deref().map(|message| (OtlpStatus::Error as i32, message)),
            flags: span.flags,
        };
        push(&fields, &span.attributes);
    }

    /// Ends the span when `response`'s body ends (with its `grpc-status` from trailers),
    /// or now when there is no body to wait for.
    pub fn finish_with(self, response: Response<Body>) -> Response<Body> {
        use http_body::Body as _;
        if response.body().is_end_stream() {
            let mut this = self;
            if let Some(status) = crate::telemetry::grpc_status(response.headers()) {
                this.grpc_status(status);
            }
            this.finish();
            return response;
        }
        response.map(|inner| crate::body::Watched::wrap(inner, self))
    }

    fn grpc_status(&mut self, status: u32) {
        self.int("rpc.grpc.status_code", status as i64);
        let failed = match self.kind {
            // As OpenTelemetry's gRPC conventions: a server fails on the statuses that
            // say it broke, a client on any status but OK.
            Kind::Server => matches!(status, 2 | 4 | 12 | 13 | 14 | 15),
            Kind::Client => status != 0,
        };
        if failed && self.span.error.is_none() {
            self.span.error = Some(format!("grpc-status {status}"));
        }
    }
}

fn unix_nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// Ends its span when the response body ends (or is dropped), with the body's
/// `grpc-status` or breakage.
impl crate::body::Watch for PendingSpan {
    fn frame(&mut self, frame: &Result<http_body::Frame<Bytes>, BoxError>) {
        match frame {
            Ok(frame) => {
                if let Some(status) = frame.trailers_ref().and_then(crate::telemetry::grpc_status) {
                    self.grpc_status(status);
                }
            }
            Err(error) => self.span.error = Some(format!("response body broke: {error}")),
        }
    }

    fn end(self) {
        self.finish();
    }
}

/// Finished spans, encoded (see `span_wire`), and how many.
#[derive(Default)]
pub struct Encoded {
    bytes: Vec<u8>,
    spans: usize,
}

impl Encoded {
    fn append(&mut self, other: Encoded) {
        if self.bytes.is_empty() {
            *self = other;
        } else {
            self.bytes.extend_from_slice(&other.bytes);
            self.spans += other.spans;
        }
    }

    /// Empty, with room for what `last` held (up to a full buffer's worth), so that a
    /// worker's next second of spans is written without growing from nothing.
    fn room_for(last: &Encoded) -> Encoded {
        Encoded { bytes: Vec::with_capacity(last.bytes.len().min(WORKER_BUFFER * 1024)), spans: 0 }
    }
}

thread_local! {
    /// Finished spans of this worker, until its next housekeeping tick.
    static BUFFER: RefCell<Encoded> = RefCell::new(Encoded::default());
    /// Spans this worker dropped because its buffer was full.
    static OVERFLOWED: Cell<u64> = const { Cell::new(0) };
}

fn push(span: &span_wire::SpanFields<'_>, attributes: &span_wire::Attributes) {
    BUFFER.with(|buffer| {
        let mut buffer = buffer.borrow_mut();
        if buffer.spans < WORKER_BUFFER {
            span_wire::encode_span(&mut buffer.bytes, span, attributes);
            buffer.spans += 1;
        } else {
            OVERFLOWED.with(|dropped| dropped.set(dropped.get() + 1));
        }
    });
}

/// The queue from the workers to the exporter.
pub struct Spans {
    queue: mpsc::Sender<Encoded>,
    receiver: Mutex<Option<mpsc::Receiver<Encoded>>>,
}

impl Default for Spans {
    fn default() -> Self {
        let (queue, receiver) = mpsc::channel(QUEUE_BATCHES);
        Spans { queue, receiver: Mutex::new(Some(receiver)) }
    }
}

impl Spans {
    /// Hands what this worker finished to the exporter (each housekeeping tick).
    pub fn drain_worker(&self, metrics: &crate::metrics::Metrics) {
        let overflowed = OVERFLOWED.with(|dropped| dropped.replace(0));
        if overflowed > 0 {
            metrics.spans_dropped.get_or_create(&SpanDropLabels { reason: "buffer_full" }).inc_by(overflowed);
        }
        let batch = BUFFER.with(|buffer| {
            let mut buffer = buffer.borrow_mut();
            let next = Encoded::room_for(&buffer);
            std::mem::replace(&mut *buffer, next)
        });
        if batch.spans == 0 {
            return;
        }
        if let Err(refused) = self.queue.try_send(batch) {
            let count = match &refused {
                mpsc::error::TrySendError::Full(batch) | mpsc::error::TrySendError::Closed(batch) => batch.spans,
            };
            metrics.spans_dropped.get_or_create(&SpanDropLabels { reason: "queue_full" }).inc_by(count as u64);
        }
    }
}

/// Sends queued spans to MeshConfig's receiver for the proxy's lifetime: as soon as
/// [`FULL_EXPORT`] are waiting, else when the oldest has waited the schedule delay (see
/// [`schedule_delay`]), so that light traffic does not pay for an export each second.
/// The receiver is read from the serving configuration for each export, so a changed
/// endpoint applies at once.
pub async fn export(state: Arc<SharedState>) {
    let Some(mut receiver) = state.spans.receiver.lock().unwrap_or_else(|e| e.into_inner()).take() else { return };
    let delay = schedule_delay(std::env::var(SCHEDULE_DELAY_VAR).ok().as_deref());
    let mut exporter = Exporter::new(&state);
    let mut waiting = Encoded::default();
    let mut due: Option<tokio::time::Instant> = None;
    loop {
        let arrived = match due {
            Some(at) => tokio::select! {
                batch = receiver.recv() => batch,
                () = tokio::time::sleep_until(at) => {
                    exporter.send_all(&state, &mut waiting).await;
                    due = None;
                    continue;
                }
            },
            None => receiver.recv().await,
        };
        let Some(batch) = arrived else {
            // The proxy is stopping: what waits goes now.
            exporter.send_all(&state, &mut waiting).await;
            return;
        };
        waiting.append(batch);
        due.get_or_insert_with(|| tokio::time::Instant::now() + delay);
        if waiting.spans >= FULL_EXPORT {
            exporter.send_all(&state, &mut waiting).await;
            due = None;
        }
    }
}

/// The environment variable OpenTelemetry's SDKs read for their batch span processor's
/// delay; the proxy reads it too, so operators set it as they know it.
pub const SCHEDULE_DELAY_VAR: &str = "OTEL_BSP_SCHEDULE_DELAY";
/// Spans that are sent without waiting for the delay (the SDKs' default batch size).
const FULL_EXPORT: usize = 512;

/// How long a finished span may wait to be sent with others: `OTEL_BSP_SCHEDULE_DELAY`
/// in milliseconds, or 5 s, the SDKs' default. A value that is no number of
/// milliseconds is reported and the default used.
fn schedule_delay(value: Option<&str>) -> Duration {
    const DEFAULT: Duration = Duration::from_secs(5);
    match value.map(|v| v.trim().parse::<u64>()) {
        None => DEFAULT,
        Some(Ok(millis)) => Duration::from_millis(millis),
        Some(Err(_)) => {
            tracing::warn!(
                "{SCHEDULE_DELAY_VAR}={:?} is not a number of milliseconds; spans are sent every {DEFAULT:?}",
                value.unwrap_or_default()
            );
            DEFAULT
        }
    }
}

/// The export side: the resource and scope every span shares, encoded once, and a
/// client per protocol.
struct Exporter {
    resource: Vec<u8>,
    scope: Vec<u8>,
    grpc: Option<(String, tonic::client::Grpc<tonic::transport::Channel>)>,
    http: hyper_util::client::legacy::Client<crate::transport::ProxyConnector, http_body_util::Full<Bytes>>,
    /// Whether the last export failed, so a receiver that is down is reported once, not
    /// every second.
    failing: bool,
}

impl Exporter {
    fn new(state: &SharedState) -> Self {
        let text = |key: &str, value: String| KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(any_value::Value::StringValue(value)) }),
            ..Default::default()
        };
        let mut attributes = vec![
            text("service.name", state.settings.service.clone().unwrap_or_else(|| "weft-proxy".into())),
            text("service.namespace", state.settings.namespace.clone()),
        ];
        if let Some(proxy) = state.settings.control.as_ref().map(|c| c.proxy_id.clone()) {
            attributes.push(text("service.instance.id", proxy));
        }
        let scope = InstrumentationScope {
            name: "weft-proxy".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        };
        // The proxy's connector: under capture its sockets carry the mark, so that
        // exports are never captured back into the proxy.
        let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(crate::transport::ProxyConnector);
        Exporter {
            resource: Resource { attributes, ..Default::default() }.encode_to_vec(),
            scope: scope.encode_to_vec(),
            grpc: None,
            http,
            failing: false,
        }
    }

    /// Sends every span waiting, unless tracing was turned off since they were made
    /// (then nobody wants them). The exporter sends once 512 wait, and a worker hands
    /// over at most 4,096 a second, so one request carries them all.
    async fn send_all(&mut self, state: &SharedState, waiting: &mut Encoded) {
        let spans = std::mem::take(waiting);
        if spans.spans == 0 {
            return;
        }
        let Some(settings) = state.config.load().snapshot.tracing.clone() else { return };
        self.send(state, &settings, spans).await;
    }

    async fn send(&mut self, state: &SharedState, settings: &TracingSettings, spans: Encoded) {
        let count = spans.spans as u64;
        let request = span_wire::export_request(&self.resource, &self.scope, &spans.bytes);
        drop(spans);
        let sent = match settings.protocol {
            OtlpProtocol::Grpc => self.send_grpc(&settings.endpoint, request).await,
            OtlpProtocol::Http => self.send_http(&settings.endpoint, request).await,
        };
        match sent {
            Ok(()) => {
                state.metrics.spans_exported.inc_by(count);
                if std::mem::take(&mut self.failing) {
                    tracing::info!(endpoint = %settings.endpoint, "the trace receiver takes spans again");
                }
            }
            Err(error) => {
                state.metrics.spans_dropped.get_or_create(&SpanDropLabels { reason: "export_failed" }).inc_by(count);
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::warn!(
                        endpoint = %settings.endpoint, protocol = ?settings.protocol, %error,
                        "cannot export spans to the trace receiver; they are dropped and counted \
                         (weft_trace_spans_dropped_total) until it takes them"
                    );
                }
            }
        }
    }

    async fn send_grpc(&mut self, endpoint: &str, request: Vec<u8>) -> Result<(), String> {
        if self.grpc.as_ref().is_none_or(|(current, _)| current != endpoint) {
            let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
                .map_err(|e| format!("bad endpoint: {e}"))?
                .connect_timeout(Duration::from_secs(2))
                .timeout(EXPORT_TIMEOUT)
                .connect_with_connector_lazy(crate::transport::ProxyConnector);
            self.grpc = Some((endpoint.to_string(), tonic::client::Grpc::new(channel)));
        }
        let (_, client) = self.grpc.as_mut().expect("made above");
        let path = http::uri::PathAndQuery::from_static("/opentelemetry.proto.collector.trace.v1.TraceService/Export");
        let export = async {
            client.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            client.unary(tonic::Request::new(request), path, span_wire::EncodedExport).await
        };
        match tokio::time::timeout(EXPORT_TIMEOUT, export).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) => Err(format!("{}: {}", status.code(), status.message())),
            Err(_) => Err(format!("no answer in {EXPORT_TIMEOUT:?}")),
        }
    }

    async fn send_http(&mut self, endpoint: &str, request: Vec<u8>) -> Result<(), String> {
        let url = http_traces_url(endpoint);
        let body = http_body_util::Full::new(Bytes::from(request));
        let post = http::Request::post(&url)
            .header(http::header::CONTENT_TYPE, "application/x-protobuf")
            .body(body)
            .map_err(|e| format!("bad endpoint {url}: {e}"))?;
        let response = match tokio::time::timeout(EXPORT_TIMEOUT, self.http.request(post)).await {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => return Err(format!("POST {url}: {error}")),
            Err(_) => return Err(format!("POST {url}: no answer in {EXPORT_TIMEOUT:?}")),
        };
        let status = response.status();
        // Read the answer, so the connection is reused.
        let _ = tokio::time::timeout(EXPORT_TIMEOUT, http_body_util::BodyExt::collect(response.into_body())).await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("POST {url}: {status}"))
        }
    }
}

/// OTLP/HTTP's URL for traces: the endpoint as given when it has a path, else with
/// `/v1/traces` added (as `OTEL_EXPORTER_OTLP_ENDPOINT` is read).
fn http_traces_url(endpoint: &str) -> String {
    let trimmed = endpoint.trim_end_matches('/');
    match endpoint.parse::<http::Uri>() {
        Ok(uri) if uri.path() != "/" && !uri.path().is_empty() => endpoint.to_string(),
        _ => format!("{trimmed}/v1/traces"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_wait_the_delay_otel_names() {
        assert_eq!(schedule_delay(None), Duration::from_secs(5));
        assert_eq!(schedule_delay(Some("200")), Duration::from_millis(200));
        assert_eq!(schedule_delay(Some("soon")), Duration::from_secs(5), "reported, and the default used");
    }

    #[test]
    fn http_receivers_get_v1_traces_unless_a_path_is_given() {
        assert_eq!(http_traces_url("http://127.0.0.1:4318"), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(http_traces_url("http://127.0.0.1:4318/"), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(http_traces_url("http://collector:4318/custom/traces"), "http://collector:4318/custom/traces");
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(n, v)| (http::header::HeaderName::from_bytes(n.as_bytes()).unwrap(), v.parse().unwrap()))
            .collect()
    }

    /// `headers` scanned, with a request id seen to, as the proxies begin a trace.
    fn scanned(headers: &mut HeaderMap) -> trace_context::Scanned {
        let mut scanned = trace_context::scan(headers);
        trace_context::ensure_request_id(headers, &mut scanned);
        scanned
    }

    #[test]
    fn the_caller_decides_when_it_has_decided() {
        let mut sampled = headers(&[("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]);
        let trace = RequestTrace::begin(&scanned(&mut sampled), 0.0, || false);
        assert!(trace.sampled, "a sampled trace is continued at rate 0");
        assert_eq!(trace_context::hex(&trace.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(trace.parent.map(|p| trace_context::hex(&p)).as_deref(), Some("00f067aa0ba902b7"));

        let mut unsampled = headers(&[("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")]);
        let trace = RequestTrace::begin(&scanned(&mut unsampled), 1.0, || false);
        assert!(!trace.sampled, "an unsampled trace stays unsampled");
        // An unsampled request goes on unchanged.
        let mut forwarded = unsampled.clone();
        trace.propagate(&mut forwarded, &trace_context::new_span_id());
        assert_eq!(forwarded, unsampled);
    }

    #[test]
    fn a_new_trace_is_its_request_ids_and_decided_alike_at_each_hop() {
        let mut first = HeaderMap::new();
        let trace = RequestTrace::begin(&scanned(&mut first), 0.0, || false);
        assert!(!trace.sampled);
        let id = first["x-request-id"].to_str().unwrap().replace('-', "");
        assert_eq!(trace_context::hex(&trace.trace_id), id);
        let mut sent = first.clone();
        trace.propagate(&mut sent, &trace_context::new_span_id());
        assert_eq!(sent, first, "nothing but the request id travels on");
        // The next hop: the same trace, and at any rate the same decision as the first.
        for rate in [0.0, 0.01, 0.5, 1.0] {
            let here = RequestTrace::begin(&scanned(&mut first.clone()), rate, || false);
            let next = RequestTrace::begin(&scanned(&mut sent.clone()), rate, || false);
            assert_eq!((here.trace_id, here.sampled), (next.trace_id, next.sampled), "at {rate}");
        }
        let sampled = RequestTrace::begin(&scanned(&mut first.clone()), 1.0, || false);
        let span = trace_context::new_span_id();
        let mut out = first.clone();
        sampled.propagate(&mut out, &span);
        let carried = trace_context::extract(&out);
        assert_eq!(carried.ids, Some((trace.trace_id, span)));
        assert_eq!(carried.sampled, Some(true), "a sampled trace goes on in traceparent");
    }

    #[test]
    fn forcing_takes_a_caller_allowed_to() {
        let forced = headers(&[("x-weft-trace", "force")]);
        assert!(RequestTrace::begin(&scanned(&mut forced.clone()), 0.0, || true).sampled);
        assert!(
            !RequestTrace::begin(&scanned(&mut forced.clone()), 0.0, || false).sampled,
            "a caller not in forceFrom cannot force"
        );
        let mut asked = false;
        RequestTrace::begin(&scanned(&mut HeaderMap::new()), 0.0, || {
            asked = true;
            true
        });
        assert!(!asked, "the caller's right is looked up only when it asks");
    }
}
