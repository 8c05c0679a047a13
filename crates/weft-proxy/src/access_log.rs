//! Access logs: one JSON line per request, for the Services whose MeshConfig or
//! TrafficPolicy `accessLog` turns them on.
//!
//! The request path never waits on a file: a finished line is appended to its worker's
//! own buffer, each worker hands its buffer over once a second (its housekeeping tick),
//! and a writer thread appends the buffers to stderr or the configured file, which it
//! reopens after SIGUSR1 (so that logrotate can move the old one away). A worker that
//! fills its buffer, a writer that falls behind and a write that fails drop lines and
//! count them (`weft_access_log_lines_dropped_total`).

use std::{
    cell::RefCell,
    io::Write,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex,
    },
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::Response;
use rand::Rng;
use serde::Serialize;
use weft_model::snapshot::AccessLogRule;

use crate::{
    body::{Body, BoxError},
    metrics::LogDropLabels,
    state::SharedState,
};

/// Bytes of lines one worker holds between housekeeping ticks (one second).
const WORKER_BUFFER: usize = 4 << 20;
/// Worker buffers waiting for the writer.
const QUEUE_CHUNKS: usize = 64;

/// What is known of a request when it arrives, for its line.
pub struct Arrival {
    started: Instant,
    method: String,
    authority: String,
    path: String,
    user_agent: Option<String>,
    request_id: Option<String>,
    /// The request body's length, when it declared one.
    bytes_received: Option<u64>,
    errors_only: bool,
}

/// Whether to log a request under `rule` (sampling is decided here, once).
pub fn wanted(rule: &AccessLogRule) -> bool {
    rule.enabled
        && (rule.sampling_rate >= 1.0 || (rule.sampling_rate > 0.0 && rand::rng().random_bool(rule.sampling_rate)))
}

impl Arrival {
    /// Notes the request's head.
    pub fn of(
        parts: &http::request::Parts,
        authority: &str,
        body_length: Option<u64>,
        rule: &AccessLogRule,
        started: Instant,
    ) -> Box<Arrival> {
        let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        Box::new(Arrival {
            started,
            method: parts.method.to_string(),
            authority: authority.to_string(),
            path: parts.uri.path_and_query().map_or_else(|| parts.uri.path().to_string(), |p| p.as_str().to_string()),
            user_agent: header("user-agent"),
            request_id: header("x-request-id"),
            bytes_received: body_length,
            errors_only: rule.errors_only,
        })
    }
}

/// What became of a request, for its line.
pub struct Outcome {
    pub direction: &'static str,
    pub source_identity: Option<String>,
    pub destination_identity: Option<String>,
    pub source_service: Option<String>,
    pub destination_service: Option<String>,
    /// The `weft-error` reason, when the proxy made the answer.
    pub error: &'static str,
    pub upstream: Option<String>,
    pub route: Option<String>,
    pub retries: u32,
    pub trace_id: Option<String>,
}

/// One line, as written.
#[derive(Serialize)]
struct Line<'a> {
    timestamp: String,
    direction: &'static str,
    source_identity: Option<&'a str>,
    destination_identity: Option<&'a str>,
    source_service: Option<&'a str>,
    destination_service: Option<&'a str>,
    method: &'a str,
    authority: &'a str,
    path: &'a str,
    status: u16,
    weft_error: Option<&'a str>,
    duration_ms: f64,
    bytes_received: Option<u64>,
    bytes_sent: u64,
    upstream: Option<&'a str>,
    route: Option<&'a str>,
    retries: u32,
    trace_id: Option<&'a str>,
    request_id: Option<&'a str>,
    user_agent: Option<&'a str>,
}

/// A request whose line is written when its response ends.
struct Pending {
    arrival: Box<Arrival>,
    outcome: Outcome,
    status: u16,
}

impl Pending {
    fn write(self, bytes_sent: u64) {
        let (a, o) = (&self.arrival, &self.outcome);
        let line = Line {
            timestamp: rfc3339_now(),
            direction: o.direction,
            source_identity: o.source_identity.as_deref(),
            destination_identity: o.destination_identity.as_deref(),
            source_service: o.source_service.as_deref(),
            destination_service: o.destination_service.as_deref(),
            method: &a.method,
            authority: &a.authority,
            path: &a.path,
            status: self.status,
            weft_error: (!o.error.is_empty()).then_some(o.error),
            duration_ms: a.started.elapsed().as_secs_f64() * 1000.0,
            bytes_received: a.bytes_received,
            bytes_sent,
            upstream: o.upstream.as_deref(),
            route: o.route.as_deref(),
            retries: o.retries,
            trace_id: o.trace_id.as_deref(),
            request_id: a.request_id.as_deref(),
            user_agent: a.user_agent.as_deref(),
        };
        BUFFER.with(|buffer| {
            let mut buffer = buffer.borrow_mut();
            if buffer.bytes.len() >= WORKER_BUFFER {
                buffer.dropped += 1;
                return;
            }
            if serde_json::to_writer(&mut buffer.bytes, &line).is_ok() {
                buffer.bytes.push(b'\n');
                buffer.lines += 1;
            }
        });
    }
}

/// Logs the request that got `response`, when its body ends (counting what it sent).
/// With `errors_only`, only a failure: a 5xx, or an answer the proxy made.
pub fn finish(arrival: Box<Arrival>, outcome: Outcome, response: Response<Body>) -> Response<Body> {
    let status = response.status().as_u16();
    if arrival.errors_only && status < 500 && outcome.error.is_empty() {
        return response;
    }
    let pending = Pending { arrival, outcome, status };
    use http_body::Body as _;
    if response.body().is_end_stream() {
        pending.write(0);
        return response;
    }
    response.map(|inner| {
        use http_body_util::BodyExt;
        LogBody { inner, pending: Some(Box::new(pending)), sent: 0 }.boxed_unsync()
    })
}

/// A response body that writes its request's line when it ends (or is dropped).
struct LogBody {
    inner: Body,
    pending: Option<Box<Pending>>,
    sent: u64,
}

impl http_body::Body for LogBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.sent += data.len() as u64;
                }
            }
            std::task::Poll::Ready(None) => {
                if let Some(pending) = self.pending.take() {
                    pending.write(self.sent);
                }
            }
            _ => {}
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

impl Drop for LogBody {
    fn drop(&mut self) {
        if let Some(pending) = self.pending.take() {
            pending.write(self.sent);
        }
    }
}

/// A worker's lines since its last tick.
#[derive(Default)]
struct WorkerBuffer {
    bytes: Vec<u8>,
    lines: u64,
    dropped: u64,
}

thread_local! {
    static BUFFER: RefCell<WorkerBuffer> = RefCell::new(WorkerBuffer::default());
}

/// A worker's lines on their way to the writer.
struct Chunk {
    path: String,
    bytes: Vec<u8>,
    lines: u64,
}

/// The queue from the workers to the writer thread.
pub struct AccessLog {
    queue: mpsc::SyncSender<Chunk>,
    receiver: Mutex<Option<mpsc::Receiver<Chunk>>>,
    /// Set by SIGUSR1: the file is reopened before the next write.
    pub reopen: Arc<AtomicBool>,
}

impl Default for AccessLog {
    fn default() -> Self {
        let (queue, receiver) = mpsc::sync_channel(QUEUE_CHUNKS);
        AccessLog { queue, receiver: Mutex::new(Some(receiver)), reopen: Arc::default() }
    }
}

impl AccessLog {
    /// Hands what this worker logged to the writer (each housekeeping tick).
    pub fn drain_worker(&self, state: &SharedState) {
        let taken = BUFFER.with(|buffer| std::mem::take(&mut *buffer.borrow_mut()));
        let metrics = &state.metrics;
        if taken.dropped > 0 {
            metrics.log_lines_dropped.get_or_create(&LogDropLabels { reason: "buffer_full" }).inc_by(taken.dropped);
        }
        if taken.bytes.is_empty() {
            return;
        }
        let path = state.config.load().snapshot.access_log_path.clone().unwrap_or_else(|| "stderr".into());
        let lines = taken.lines;
        if self.queue.try_send(Chunk { path, bytes: taken.bytes, lines }).is_err() {
            metrics.log_lines_dropped.get_or_create(&LogDropLabels { reason: "queue_full" }).inc_by(lines);
        }
    }
}

/// Starts the writer thread, for the proxy's lifetime.
pub fn start_writer(state: Arc<SharedState>) {
    let Some(receiver) = state.access_log.receiver.lock().unwrap_or_else(|e| e.into_inner()).take() else { return };
    let spawned = std::thread::Builder::new().name("weft-access-log".into()).spawn(move || {
        let mut writer = Writer { open: None, failing: false };
        while let Ok(chunk) = receiver.recv() {
            writer.write(&state, chunk);
        }
    });
    if let Err(error) = spawned {
        tracing::warn!(%error, "cannot start the access log writer; access log lines are dropped");
    }
}

/// The open destination: stderr, or a file opened for appending.
struct Writer {
    open: Option<(String, Box<dyn Write + Send>)>,
    failing: bool,
}

impl Writer {
    fn write(&mut self, state: &SharedState, chunk: Chunk) {
        let reopen = state.access_log.reopen.swap(false, Ordering::AcqRel);
        if reopen || self.open.as_ref().is_none_or(|(path, _)| *path != chunk.path) {
            self.open = match open(&chunk.path) {
                Ok(out) => Some((chunk.path.clone(), out)),
                Err(error) => {
                    self.fail(state, &chunk, &format!("cannot open it: {error}"));
                    return;
                }
            };
        }
        let (_, out) = self.open.as_mut().expect("opened above");
        match out.write_all(&chunk.bytes).and_then(|()| out.flush()) {
            Ok(()) => {
                state.metrics.log_lines.inc_by(chunk.lines);
                if std::mem::take(&mut self.failing) {
                    tracing::info!(path = %chunk.path, "access log lines are written again");
                }
            }
            Err(error) => {
                self.open = None;
                self.fail(state, &chunk, &error.to_string());
            }
        }
    }

    fn fail(&mut self, state: &SharedState, chunk: &Chunk, error: &str) {
        state.metrics.log_lines_dropped.get_or_create(&LogDropLabels { reason: "write_failed" }).inc_by(chunk.lines);
        if !std::mem::replace(&mut self.failing, true) {
            tracing::warn!(path = %chunk.path, %error, "cannot write the access log; lines are dropped and counted (weft_access_log_lines_dropped_total)");
        }
    }
}

fn open(path: &str) -> std::io::Result<Box<dyn Write + Send>> {
    if path == "stderr" {
        return Ok(Box::new(std::io::stderr()));
    }
    let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    Ok(Box::new(file))
}

/// Now, as RFC 3339 in UTC with milliseconds (`2026-12-05T10:04:05.123Z`).
fn rfc3339_now() -> String {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let (days, seconds) = (since.as_secs() / 86_400, since.as_secs() % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        seconds / 3600,
        seconds % 3600 / 60,
        seconds % 60,
        since.subsec_millis()
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_792), (2026, 12, 5));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        let now = rfc3339_now();
        assert_eq!(now.len(), 24, "{now}");
        assert!(now.ends_with('Z'));
    }

    #[test]
    fn sampling_and_switch() {
        let on = AccessLogRule { enabled: true, sampling_rate: 1.0, errors_only: false };
        assert!(wanted(&on));
        assert!(!wanted(&AccessLogRule { sampling_rate: 0.0, ..on }));
        assert!(!wanted(&AccessLogRule { enabled: false, ..on }));
    }
}
