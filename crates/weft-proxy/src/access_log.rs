//! Access logs: one JSON line per request, for the Services whose MeshConfig or
//! TrafficPolicy `accessLog` turns them on.
//!
//! The request path never waits on a file: a finished line is appended to its worker's
//! own buffer, which the worker hands over whenever it holds 256 KiB and at every
//! housekeeping tick (each second), and a writer thread appends the buffers to stderr or
//! the configured file, which it reopens after SIGUSR1 (so that logrotate can move the
//! old one away). A writer that falls behind makes workers keep their lines, up to 4 MiB
//! each; beyond that, and when a write fails, lines are dropped and counted
//! (`weft_access_log_lines_dropped_total`).

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
use weft_model::snapshot::AccessLogRule;

use crate::{
    body::{Body, BoxError},
    metrics::LogDropLabels,
    state::SharedState,
};

/// Bytes of lines one worker holds between housekeeping ticks (one second).
const WORKER_BUFFER: usize = 4 << 20;
/// Bytes of lines a worker hands to the writer as soon as it has them.
const CHUNK: usize = 256 << 10;
/// Worker buffers waiting for the writer.
const QUEUE_CHUNKS: usize = 64;

/// What is known of a request when it arrives, for its line: the request's own
/// reference-counted parts (method, path, header values), not copies.
pub struct Arrival {
    started: Instant,
    method: http::Method,
    authority: Option<RequestAuthority>,
    path: Option<http::uri::PathAndQuery>,
    user_agent: Option<http::HeaderValue>,
    request_id: Option<http::HeaderValue>,
    /// The request body's length, when it declared one.
    bytes_received: Option<u64>,
    /// Else what it streamed, counted.
    counted: Option<crate::body::Counter>,
    errors_only: bool,
}

/// The request's authority as it came (the URI's, else `Host`), shared, not copied.
enum RequestAuthority {
    Uri(http::uri::Authority),
    Host(http::HeaderValue),
}

impl RequestAuthority {
    fn of(uri: &http::Uri, host: Option<&http::HeaderValue>) -> Option<RequestAuthority> {
        match uri.authority() {
            Some(authority) => Some(RequestAuthority::Uri(authority.clone())),
            None => host.cloned().map(RequestAuthority::Host),
        }
    }
}

/// Whether to log a request under `rule` (sampling is decided here, once).
pub fn wanted(rule: &AccessLogRule) -> bool {
    rule.enabled
        && (rule.sampling_rate >= 1.0 || (rule.sampling_rate > 0.0 && rand::rng().random_bool(rule.sampling_rate)))
}

impl Arrival {
    /// Notes the request's head (as it came: before any route filter changes it).
    pub fn of(
        parts: &http::request::Parts,
        body_length: Result<u64, crate::body::Counter>,
        rule: &AccessLogRule,
        started: Instant,
    ) -> Box<Arrival> {
        // One pass over the headers: comparing names costs less than hashing three.
        let (mut host, mut user_agent, mut request_id) = (None, None, None);
        for (name, value) in &parts.headers {
            if *name == http::header::HOST {
                host = host.or(Some(value));
            } else if *name == http::header::USER_AGENT {
                user_agent = user_agent.or(Some(value));
            } else if *name == crate::trace_context::REQUEST_ID {
                request_id = request_id.or(Some(value));
            }
        }
        Box::new(Arrival {
            started,
            method: parts.method.clone(),
            authority: RequestAuthority::of(&parts.uri, host),
            path: parts.uri.path_and_query().cloned(),
            user_agent: user_agent.cloned(),
            request_id: request_id.cloned(),
            bytes_received: body_length.as_ref().ok().copied(),
            counted: body_length.err(),
            errors_only: rule.errors_only,
        })
    }
}

impl Arrival {
    /// Gives the request an `x-request-id` if it came without one, and notes it.
    pub fn ensure_request_id(&mut self, headers: &mut http::HeaderMap) {
        if self.request_id.is_none() {
            let (id, _) = crate::trace_context::new_request_id();
            headers.insert(crate::trace_context::REQUEST_ID, id.clone());
            self.request_id = Some(id);
        }
    }
}

/// What became of a request, for its line and its tap event. Shared strings, so that a
/// line costs no allocation beyond its buffer.
pub struct Outcome {
    pub direction: &'static str,
    pub source_identity: Option<Arc<str>>,
    pub destination_identity: Option<Arc<str>>,
    pub source_service: Option<Arc<str>>,
    pub destination_service: Option<Arc<str>>,
    /// The `weft-error` reason, when the proxy made the answer.
    pub error: &'static str,
    pub upstream: Option<std::net::SocketAddr>,
    pub route: Option<Arc<str>>,
    pub retries: u32,
    pub trace_id: Option<String>,
}

/// A request whose line is written when its response ends.
struct Pending {
    arrival: Box<Arrival>,
    outcome: Outcome,
    status: u16,
}

/// `"name":`, preceded by the comma every key but the first has: one copy per key.
macro_rules! key {
    ($name:literal) => {
        concat!(",\"", $name, "\":")
    };
}

impl Pending {
    fn write(self, bytes_sent: u64) {
        let (a, o) = (&self.arrival, &self.outcome);
        BUFFER.with(|buffer| {
            let mut buffer = buffer.borrow_mut();
            if buffer.bytes.len() >= WORKER_BUFFER {
                buffer.dropped += 1;
                return;
            }
            let WorkerBuffer { bytes, lines, clock, addresses, parties, .. } = &mut *buffer;
            bytes.extend_from_slice(b"{\"timestamp\":\"");
            clock.write_now(bytes);
            bytes.push(b'"');
            // Values the proxy made or validated (SPIFFE IDs, names, labels, reasons, an
            // HTTP method) need no escaping; what the client sent is checked.
            bytes.extend_from_slice(parties.text(o));
            let mut line = JsonLine { out: bytes };
            line.trusted(key!("method"), a.method.as_str());
            // Checked: an inbound request is logged even when its Host is refused.
            match &a.authority {
                Some(RequestAuthority::Uri(authority)) => line.text(key!("authority"), authority.as_str()),
                Some(RequestAuthority::Host(host)) => line.header(key!("authority"), Some(host)),
                None => line.trusted(key!("authority"), ""),
            }
            line.text(key!("path"), a.path.as_ref().map_or("/", |p| p.as_str()));
            line.number(key!("status"), self.status as u64);
            line.maybe_trusted(key!("weft_error"), (!o.error.is_empty()).then_some(o.error));
            line.milliseconds(key!("duration_ms"), a.started.elapsed().as_micros() as u64);
            line.number(
                key!("bytes_received"),
                a.bytes_received.unwrap_or_else(|| a.counted.as_ref().map_or(0, |c| c.get())),
            );
            line.number(key!("bytes_sent"), bytes_sent);
            line.maybe_address(key!("upstream"), o.upstream, addresses);
            line.maybe_trusted(key!("route"), o.route.as_deref());
            line.number(key!("retries"), o.retries as u64);
            line.maybe_trusted(key!("trace_id"), o.trace_id.as_deref());
            line.header(key!("request_id"), a.request_id.as_ref());
            line.header(key!("user_agent"), a.user_agent.as_ref());
            line.end();
            *lines += 1;
            if bytes.len() >= CHUNK {
                buffer.hand_over();
            }
        });
    }
}

/// Writes one JSON object of a fixed shape straight into a buffer, after its first key.
/// Inlined, so that each key (a constant) is copied by a few moves, not a `memcpy` call.
/// serde_json's string serializer escapes byte by byte (it was 10,000 instructions per
/// request here); these values almost never need escaping, so they are copied whole,
/// and only a value that needs it goes through serde_json. Keys come whole with their
/// punctuation ([`key!`]).
struct JsonLine<'a> {
    out: &'a mut Vec<u8>,
}

impl JsonLine<'_> {
    /// A value known to need no escaping.
    #[inline(always)]
    fn trusted(&mut self, key: &str, value: &str) {
        self.out.extend_from_slice(key.as_bytes());
        self.out.push(b'"');
        self.out.extend_from_slice(value.as_bytes());
        self.out.push(b'"');
    }

    #[inline(always)]
    fn maybe_trusted(&mut self, key: &str, value: Option<&str>) {
        match value {
            Some(value) => self.trusted(key, value),
            None => self.null(key),
        }
    }

    /// A value from the client, escaped when it needs it.
    #[inline(always)]
    fn text(&mut self, key: &str, value: &str) {
        if !needs_escaping(value.as_bytes()) {
            self.trusted(key, value);
        } else {
            self.out.extend_from_slice(key.as_bytes());
            let _ = serde_json::to_writer(&mut *self.out, value);
        }
    }

    #[inline(always)]
    fn maybe_text(&mut self, key: &str, value: Option<&str>) {
        match value {
            Some(value) => self.text(key, value),
            None => self.null(key),
        }
    }

    /// A header's value from the client: copied whole when it is plain ASCII (one pass
    /// over it, where text would need two: `to_str`'s and the escaping check), escaped
    /// when it is other visible text, `null` when it is no text.
    #[inline(always)]
    fn header(&mut self, key: &str, value: Option<&http::HeaderValue>) {
        match value {
            Some(value) if plain_ascii(value.as_bytes()) => {
                self.out.extend_from_slice(key.as_bytes());
                self.out.push(b'"');
                self.out.extend_from_slice(value.as_bytes());
                self.out.push(b'"');
            }
            Some(value) => self.maybe_text(key, value.to_str().ok()),
            None => self.null(key),
        }
    }

    fn maybe_address(&mut self, key: &str, value: Option<std::net::SocketAddr>, addresses: &mut AddressTexts) {
        let Some(address) = value else { return self.null(key) };
        self.out.extend_from_slice(key.as_bytes());
        self.out.push(b'"');
        match address {
            std::net::SocketAddr::V4(v4) => self.out.extend_from_slice(addresses.text(v4)),
            v6 => {
                let _ = write!(self.out, "{v6}");
            }
        }
        self.out.push(b'"');
    }

    #[inline(always)]
    fn number(&mut self, key: &str, value: u64) {
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }

    /// Microseconds as milliseconds with three decimals.
    #[inline(always)]
    fn milliseconds(&mut self, key: &str, micros: u64) {
        self.number(key, micros / 1000);
        let fraction = micros % 1000;
        self.out.extend_from_slice(&[
            b'.',
            b'0' + (fraction / 100) as u8,
            b'0' + (fraction / 10 % 10) as u8,
            b'0' + (fraction % 10) as u8,
        ]);
    }

    #[inline(always)]
    fn null(&mut self, key: &str) {
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"null");
    }

    fn end(self) {
        self.out.extend_from_slice(b"}\n");
    }
}

/// The direction, identities and Services of the lines a worker wrote last, rendered:
/// between one caller and one callee they are the same on every line, and writing the
/// five fields out each time was a fifth of a line's cost. Found by the identity of the
/// shared strings, which a slot holds, so that none can be freed and its address reused
/// by another.
#[derive(Default)]
struct PartyTexts {
    slots: [Option<PartyText>; 8],
}

struct PartyText {
    direction: &'static str,
    source_identity: Option<Arc<str>>,
    destination_identity: Option<Arc<str>>,
    source_service: Option<Arc<str>>,
    destination_service: Option<Arc<str>>,
    /// `,"direction":...,"destination_service":...`
    text: Vec<u8>,
}

impl PartyTexts {
    fn text(&mut self, outcome: &Outcome) -> &[u8] {
        fn address(text: &Option<Arc<str>>) -> usize {
            text.as_ref().map_or(0, |text| Arc::as_ptr(text) as *const u8 as usize)
        }
        let hash = address(&outcome.source_identity)
            ^ address(&outcome.destination_identity) >> 2
            ^ address(&outcome.source_service) >> 4
            ^ address(&outcome.destination_service) >> 6
            ^ outcome.direction.len();
        let slot = &mut self.slots[(hash >> 4 ^ hash >> 8) & 7];
        if !slot.as_ref().is_some_and(|party| party.is_of(outcome)) {
            *slot = Some(PartyText::of(outcome));
        }
        &slot.as_ref().expect("filled above").text
    }
}

impl PartyText {
    fn of(outcome: &Outcome) -> PartyText {
        let mut text = Vec::with_capacity(256);
        let mut line = JsonLine { out: &mut text };
        line.trusted(key!("direction"), outcome.direction);
        line.maybe_trusted(key!("source_identity"), outcome.source_identity.as_deref());
        line.maybe_trusted(key!("destination_identity"), outcome.destination_identity.as_deref());
        line.maybe_trusted(key!("source_service"), outcome.source_service.as_deref());
        line.maybe_trusted(key!("destination_service"), outcome.destination_service.as_deref());
        PartyText {
            direction: outcome.direction,
            source_identity: outcome.source_identity.clone(),
            destination_identity: outcome.destination_identity.clone(),
            source_service: outcome.source_service.clone(),
            destination_service: outcome.destination_service.clone(),
            text,
        }
    }

    fn is_of(&self, outcome: &Outcome) -> bool {
        fn same(a: &Option<Arc<str>>, b: &Option<Arc<str>>) -> bool {
            match (a, b) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
        }
        self.direction == outcome.direction
            && same(&self.source_identity, &outcome.source_identity)
            && same(&self.destination_identity, &outcome.destination_identity)
            && same(&self.source_service, &outcome.source_service)
            && same(&self.destination_service, &outcome.destination_service)
    }
}

/// The text of the IPv4 addresses a worker logged last, by a hash of the address: a
/// proxy logs the same few upstreams over and over, and writing one out costs more than
/// finding it here.
#[derive(Default)]
struct AddressTexts {
    slots: [Option<(std::net::SocketAddrV4, AddressText)>; 16],
}

/// `255.255.255.255:65535` at most.
#[derive(Clone, Copy)]
struct AddressText {
    bytes: [u8; 21],
    length: u8,
}

impl AddressTexts {
    fn text(&mut self, address: std::net::SocketAddrV4) -> &[u8] {
        let hash = u32::from(*address.ip()) ^ address.port() as u32;
        let slot = &mut self.slots[((hash ^ hash >> 8 ^ hash >> 16) & 15) as usize];
        if slot.is_none_or(|(cached, _)| cached != address) {
            *slot = Some((address, AddressText::of(address)));
        }
        let (_, text) = slot.as_ref().expect("filled above");
        &text.bytes[..text.length as usize]
    }
}

impl AddressText {
    /// By hand: `Display` for an address goes through the formatter's padding machinery
    /// (1,500 instructions).
    fn of(address: std::net::SocketAddrV4) -> AddressText {
        let mut text = AddressText { bytes: [0; 21], length: 0 };
        let mut put = |bytes: &[u8]| {
            let at = text.length as usize;
            text.bytes[at..at + bytes.len()].copy_from_slice(bytes);
            text.length += bytes.len() as u8;
        };
        for (i, octet) in address.ip().octets().iter().enumerate() {
            if i > 0 {
                put(b".");
            }
            let (digits, length) = OCTETS[*octet as usize];
            put(&digits[..length as usize]);
        }
        put(b":");
        put(itoa::Buffer::new().format(address.port()).as_bytes());
        text
    }
}

/// Each octet's decimal digits and their count.
const OCTETS: [([u8; 3], u8); 256] = {
    let mut table = [([0u8; 3], 0u8); 256];
    let mut n = 0;
    while n < 256 {
        table[n] = match n {
            0..=9 => ([b'0' + n as u8, 0, 0], 1),
            10..=99 => ([b'0' + (n / 10) as u8, b'0' + (n % 10) as u8, 0], 2),
            _ => ([b'0' + (n / 100) as u8, b'0' + (n / 10 % 10) as u8, b'0' + (n % 10) as u8], 3),
        };
        n += 1;
    }
    table
};

/// Whether JSON needs any of `bytes` escaped: a control character, `"` or `\`. Eight
/// bytes at a time (the classic "has a zero byte" bit trick), since every value of
/// every line passes here.
fn needs_escaping(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let has_zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let x = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        // Bytes below 0x20 (ASCII only: a byte with its high bit set is part of a UTF-8
        // sequence, never a control character).
        let control = x.wrapping_sub(0x20 * ONES) & !x & HIGHS;
        let quote = has_zero(x ^ (b'"' as u64 * ONES));
        let backslash = has_zero(x ^ (b'\\' as u64 * ONES));
        if control | quote | backslash != 0 {
            return true;
        }
    }
    chunks.remainder().iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

/// Whether `bytes` are printable ASCII (space to `~`) other than `"` and `\\`: text a
/// JSON string holds as it is. Eight bytes at a time, as [`needs_escaping`].
fn plain_ascii(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let has_zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let x = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let high = x & HIGHS;
        let control = x.wrapping_sub(0x20 * ONES) & !x & HIGHS;
        let delete = has_zero(x ^ (0x7f * ONES));
        let quote = has_zero(x ^ (b'"' as u64 * ONES));
        let backslash = has_zero(x ^ (b'\\' as u64 * ONES));
        if high | control | delete | quote | backslash != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
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
    response.map(|inner| crate::body::Watched::wrap(inner, LogOnEnd { pending, sent: 0 }))
}

/// Counts what a response body sends and writes its request's line when it ends (or
/// is dropped).
struct LogOnEnd {
    pending: Pending,
    sent: u64,
}

impl crate::body::Watch for LogOnEnd {
    fn frame(&mut self, frame: &Result<http_body::Frame<Bytes>, BoxError>) {
        if let Some(data) = frame.as_ref().ok().and_then(|frame| frame.data_ref()) {
            self.sent += data.len() as u64;
        }
    }

    fn end(self) {
        self.pending.write(self.sent);
    }
}

/// A worker's lines not yet handed over.
#[derive(Default)]
struct WorkerBuffer {
    bytes: Vec<u8>,
    lines: u64,
    dropped: u64,
    clock: Clock,
    addresses: AddressTexts,
    parties: PartyTexts,
    /// The writer's queue and the path lines go to, as of the last tick (none before).
    writer: Option<(mpsc::SyncSender<Chunk>, String)>,
    /// Set when the writer's queue was full: lines wait for the next tick.
    writer_behind: bool,
}

impl WorkerBuffer {
    /// Hands the lines to the writer now, unless it is behind.
    fn hand_over(&mut self) {
        let Some((queue, path)) = &self.writer else { return };
        if self.writer_behind {
            return;
        }
        let bytes = std::mem::replace(&mut self.bytes, Vec::with_capacity(CHUNK + CHUNK / 8));
        let chunk = Chunk { path: path.clone(), bytes, lines: std::mem::take(&mut self.lines) };
        if let Err(mpsc::TrySendError::Full(chunk) | mpsc::TrySendError::Disconnected(chunk)) = queue.try_send(chunk) {
            self.bytes = chunk.bytes;
            self.lines = chunk.lines;
            self.writer_behind = true;
        }
    }
}

/// Timestamps, with the date and time of the current second formatted once.
#[derive(Default)]
struct Clock {
    second: u64,
    /// `YYYY-MM-DDTHH:MM:SS` of `second`.
    prefix: String,
}

impl Clock {
    /// Writes now, as RFC 3339 in UTC with milliseconds (`2026-12-05T10:04:05.123Z`).
    fn write_now(&mut self, out: &mut Vec<u8>) {
        let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        if self.prefix.is_empty() || since.as_secs() != self.second {
            self.second = since.as_secs();
            self.prefix = second_prefix(self.second);
        }
        let millis = since.subsec_millis();
        out.extend_from_slice(self.prefix.as_bytes());
        out.extend_from_slice(&[
            b'.',
            b'0' + (millis / 100) as u8,
            b'0' + (millis / 10 % 10) as u8,
            b'0' + (millis % 10) as u8,
            b'Z',
        ]);
    }
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
        let path = state.config.load().snapshot.access_log_path.clone().unwrap_or_else(|| "stderr".into());
        let (bytes, lines, dropped) = BUFFER.with(|buffer| {
            let mut buffer = buffer.borrow_mut();
            buffer.writer = Some((self.queue.clone(), path.clone()));
            buffer.writer_behind = false;
            // The next buffer starts at this one's size (up to a chunk), not growing from empty.
            let capacity = (buffer.bytes.len() + buffer.bytes.len() / 2).min(CHUNK + CHUNK / 8);
            (
                std::mem::replace(&mut buffer.bytes, Vec::with_capacity(capacity)),
                std::mem::take(&mut buffer.lines),
                std::mem::take(&mut buffer.dropped),
            )
        });
        let metrics = &state.metrics;
        if dropped > 0 {
            metrics.log_lines_dropped.get_or_create(&LogDropLabels { reason: "buffer_full" }).inc_by(dropped);
        }
        if bytes.is_empty() {
            return;
        }
        if self.queue.try_send(Chunk { path, bytes, lines }).is_err() {
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

/// `YYYY-MM-DDTHH:MM:SS` of a Unix second, in UTC.
fn second_prefix(second: u64) -> String {
    let (days, seconds) = (second / 86_400, second % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}", seconds / 3600, seconds % 3600 / 60, seconds % 60)
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
        let mut now = Vec::new();
        Clock::default().write_now(&mut now);
        let now = String::from_utf8(now).unwrap();
        assert_eq!(now.len(), 24, "{now}");
        assert!(now.ends_with('Z'));
        assert_eq!(second_prefix(1_764_929_045), "2025-12-05T10:04:05");
    }

    #[test]
    fn the_parties_of_a_line_are_written_out_once() {
        let outcome = |source: &Arc<str>, destination: Option<&Arc<str>>| Outcome {
            direction: "outbound",
            source_identity: Some(source.clone()),
            destination_identity: destination.cloned(),
            source_service: Some(Arc::from("default/web")),
            destination_service: None,
            error: "",
            upstream: None,
            route: None,
            retries: 0,
            trace_id: None,
        };
        let (web, reviews): (Arc<str>, Arc<str>) = (Arc::from("spiffe://a/web"), Arc::from("spiffe://a/reviews"));
        let mut parties = PartyTexts::default();
        let first = outcome(&web, Some(&reviews));
        let text = String::from_utf8(parties.text(&first).to_vec()).unwrap();
        assert_eq!(
            text,
            ",\"direction\":\"outbound\",\"source_identity\":\"spiffe://a/web\",\"destination_identity\":\
             \"spiffe://a/reviews\",\"source_service\":\"default/web\",\"destination_service\":null"
        );
        assert_eq!(parties.text(&first), text.as_bytes(), "the same parties, from the cache");
        // Other strings with the same text are other keys, and any change shows.
        let other = outcome(&Arc::from("spiffe://a/web"), None);
        assert!(String::from_utf8(parties.text(&other).to_vec()).unwrap().contains("\"destination_identity\":null"));
        let inbound = Outcome { direction: "inbound", ..outcome(&web, Some(&reviews)) };
        assert!(parties.text(&inbound).starts_with(b",\"direction\":\"inbound\""));
    }

    #[test]
    fn plain_ascii_is_printable_ascii_without_quotes_or_backslashes() {
        assert!(plain_ascii(b"h2load nghttp2/1.64.0 (curl-compatible) ~ 12345678"));
        assert!(plain_ascii(b""));
        for bad in [&b"a\"b"[..], b"a\\b", b"tab\there", b"\x7f", "caf\u{e9} au lait, long enough".as_bytes()] {
            assert!(!plain_ascii(bad), "{bad:?}");
            let mut padded = b"01234567".to_vec();
            padded.extend_from_slice(bad);
            assert!(!plain_ascii(&padded), "in a later word: {padded:?}");
        }
        // Every single byte, alone and in a full word.
        for b in 0..=255u8 {
            let plain = (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\';
            assert_eq!(plain_ascii(&[b]), plain, "{b:#x}");
            assert_eq!(plain_ascii(&[b'a', b'b', b'c', b, b'd', b'e', b'f', b'g']), plain, "{b:#x}");
        }
    }

    #[test]
    fn addresses_are_written_out_once() {
        let mut texts = AddressTexts::default();
        for address in ["10.0.0.7:15006", "127.0.0.1:8080", "255.255.255.255:65535", "0.0.0.0:0"] {
            let parsed: std::net::SocketAddrV4 = address.parse().unwrap();
            assert_eq!(texts.text(parsed), address.as_bytes());
            assert_eq!(texts.text(parsed), address.as_bytes(), "from the cache");
        }
        // Two addresses in one slot take turns, each still right.
        let (a, b): (std::net::SocketAddrV4, std::net::SocketAddrV4) =
            ("10.0.0.1:80".parse().unwrap(), "10.0.0.1:81".parse().unwrap());
        for _ in 0..2 {
            assert_eq!(texts.text(a), b"10.0.0.1:80");
            assert_eq!(texts.text(b), b"10.0.0.1:81");
        }
    }

    #[test]
    fn lines_are_json_with_typed_values() {
        let mut out = b"{\"first\":1".to_vec();
        let mut line = JsonLine { out: &mut out };
        line.text(key!("plain"), "GET");
        line.text(key!("quoted"), "a \"b\"\\\n");
        line.maybe_text(key!("none"), None);
        line.trusted(key!("trusted"), "spiffe://weft.local/ns/a/sa/b");
        line.number(key!("status"), 200);
        line.milliseconds(key!("duration_ms"), 4_021);
        line.maybe_address(key!("v4"), Some("10.0.0.255:15006".parse().unwrap()), &mut AddressTexts::default());
        line.maybe_address(key!("v6"), Some("[::1]:80".parse().unwrap()), &mut AddressTexts::default());
        line.end();
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"first": 1, "plain": "GET", "quoted": "a \"b\"\\\n", "none": null,
                "trusted": "spiffe://weft.local/ns/a/sa/b", "status": 200, "duration_ms": 4.021,
                "v4": "10.0.0.255:15006", "v6": "[::1]:80"})
        );
        assert!(out.ends_with(b"}\n"));
    }

    #[test]
    fn escaping_is_found_wherever_it_is() {
        let clean = "spiffe://weft.local/ns/default/sa/web-2 é GET /a?b=c";
        assert!(!needs_escaping(clean.as_bytes()));
        for bad in ["\"", "\\", "\n", "\u{1f}", "\t"] {
            for at in 0..clean.len().min(17) {
                if !clean.is_char_boundary(at) {
                    continue;
                }
                let text = format!("{}{bad}{}", &clean[..at], &clean[at..]);
                assert!(needs_escaping(text.as_bytes()), "{text:?}");
            }
        }
    }

    #[test]
    fn a_full_chunk_goes_to_the_writer_at_once_unless_it_is_behind() {
        let (queue, writer) = mpsc::sync_channel(1);
        let mut buffer = WorkerBuffer { writer: Some((queue, "out.log".into())), ..WorkerBuffer::default() };
        buffer.bytes = vec![b'x'; CHUNK];
        buffer.lines = 400;
        buffer.hand_over();
        let chunk = writer.try_recv().expect("handed over");
        assert_eq!((chunk.bytes.len(), chunk.lines, chunk.path.as_str()), (CHUNK, 400, "out.log"));
        assert!(buffer.bytes.is_empty() && buffer.lines == 0);
        // The queue holds one: the second is handed, the third stays with the worker.
        for expected_behind in [false, true] {
            buffer.bytes = vec![b'y'; CHUNK];
            buffer.lines = 1;
            buffer.hand_over();
            assert_eq!(buffer.writer_behind, expected_behind);
        }
        assert_eq!((buffer.bytes.len(), buffer.lines), (CHUNK, 1), "kept for the next tick, not lost");
    }

    #[test]
    fn sampling_and_switch() {
        let on = AccessLogRule { enabled: true, sampling_rate: 1.0, errors_only: false };
        assert!(wanted(&on));
        assert!(!wanted(&AccessLogRule { sampling_rate: 0.0, ..on }));
        assert!(!wanted(&AccessLogRule { enabled: false, ..on }));
    }
}
