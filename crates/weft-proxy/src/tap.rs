//! Tap: the requests an operator is watching, one event each, with why the proxy did
//! what it did (the rule matched, the backend and endpoint chosen, each try and what
//! followed it, the authorization verdict, the proxy's own error).
//!
//! The control plane starts and stops sessions over a stream this proxy keeps open
//! beside its discovery stream ([`watch`]). While no session is active the request path
//! reads one flag ([`Taps::watching`]) and nothing else. While one is, a request that
//! may match is recorded in a [`Tapped`] as it goes; when its response starts, the
//! session's filter is judged whole and its rate (its share of the operator's
//! `--max-rps`) spent; the event is sent when the response body ends, carrying the
//! values of only the headers the operator named, never a body.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::Response;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use weft_api::{
    rate::TokenBucket,
    tap::{
        proxy_tap_message, tap_client::TapClient, tap_command, tap_filter, Direction as WireDirection, Header,
        ProxyTapMessage, TapEvent, TapEvents, TapFilter, TapHello, TapStart, TapTry, MAX_HEADERS,
    },
};

use crate::{
    body::{Body, BoxError},
    endpoint::EndpointState,
    metrics::TapDropLabels,
    state::SharedState,
};

/// Events waiting for the stream to the control plane; beyond this they are dropped.
const QUEUE: usize = 1024;
/// Events sent to the control plane in one message at most.
const BATCH: usize = 256;

/// Which side of the proxy a request passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
}

/// The active sessions of this proxy, and the queue their events leave by.
pub struct Taps {
    /// Whether any session is active: all the request path reads while nobody taps.
    active: AtomicBool,
    sessions: ArcSwap<Vec<Arc<Session>>>,
    queue: Mutex<Option<mpsc::Sender<TapEvent>>>,
    /// Events dropped because the queue was full, not yet reported.
    dropped: AtomicU64,
}

impl Default for Taps {
    fn default() -> Self {
        Taps {
            active: AtomicBool::new(false),
            sessions: ArcSwap::from_pointee(Vec::new()),
            queue: Mutex::new(None),
            dropped: AtomicU64::new(0),
        }
    }
}

/// One operator's session, as this proxy applies it.
pub struct Session {
    id: u64,
    filter: Filter,
    headers: Vec<http::HeaderName>,
    bucket: Mutex<TokenBucket>,
}

/// A session's conditions, parsed once.
#[derive(Debug, PartialEq)]
struct Filter {
    target: Target,
    method: Option<http::Method>,
    path_prefix: Option<String>,
    status: Option<StatusFilter>,
    route: Option<String>,
}

#[derive(Debug, PartialEq)]
enum Target {
    /// `namespace/name` of a Service: outbound requests addressed to it (or sent to it as
    /// a backend), inbound requests when it is this proxy's own Service.
    Service(String),
    /// This proxy's workload: everything it carries.
    Workload,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum StatusFilter {
    Exact(u16),
    /// The hundreds digit.
    Class(u16),
}

impl StatusFilter {
    fn matches(self, status: u16) -> bool {
        match self {
            StatusFilter::Exact(code) => status == code,
            StatusFilter::Class(class) => status / 100 == class,
        }
    }
}

/// Why a session start was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StartError {
    #[error("a tap session needs a target (a Service or this workload)")]
    NoTarget,
    #[error("method {0:?} is not an HTTP method")]
    BadMethod(String),
    #[error("status {0} is neither a class (1-5) nor a code (100-599)")]
    BadStatus(u32),
    #[error("{0:?} is not a header name")]
    BadHeader(String),
    #[error("a session may name at most {MAX_HEADERS} headers")]
    TooManyHeaders,
    #[error("max_rps must be a positive number, not {0}")]
    BadRate(f64),
}

impl Session {
    /// The session `start` asks for, checked.
    pub fn new(start: &TapStart) -> Result<Session, StartError> {
        let wire = start.filter.clone().unwrap_or_default();
        let filter = Filter::parse(&wire)?;
        if start.headers.len() > MAX_HEADERS {
            return Err(StartError::TooManyHeaders);
        }
        let headers = start
            .headers
            .iter()
            .map(|name| http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| StartError::BadHeader(name.clone())))
            .collect::<Result<_, _>>()?;
        if !(start.max_rps.is_finite() && start.max_rps > 0.0) {
            return Err(StartError::BadRate(start.max_rps));
        }
        Ok(Session {
            id: start.session,
            filter,
            headers,
            bucket: Mutex::new(TokenBucket::new(start.max_rps, Instant::now())),
        })
    }

    fn take_token(&self, now: Instant) -> bool {
        self.bucket.lock().unwrap_or_else(|e| e.into_inner()).take(now)
    }
}

impl Filter {
    fn parse(wire: &TapFilter) -> Result<Filter, StartError> {
        let target = match &wire.target {
            Some(tap_filter::Target::Service(service)) if !service.is_empty() => Target::Service(service.clone()),
            Some(tap_filter::Target::Workload(_)) => Target::Workload,
            _ => return Err(StartError::NoTarget),
        };
        let method = match wire.method.as_str() {
            "" => None,
            method => Some(
                http::Method::from_bytes(method.to_ascii_uppercase().as_bytes())
                    .map_err(|_| StartError::BadMethod(method.to_string()))?,
            ),
        };
        let status = match (wire.status, wire.status_class) {
            (0, _) => None,
            (class @ 1..=5, true) => Some(StatusFilter::Class(class as u16)),
            (code @ 100..=599, false) => Some(StatusFilter::Exact(code as u16)),
            (other, _) => return Err(StartError::BadStatus(other)),
        };
        Ok(Filter {
            target,
            method,
            path_prefix: Some(wire.path_prefix.clone()).filter(|p| !p.is_empty()),
            status,
            route: Some(wire.route.clone()).filter(|r| !r.is_empty()),
        })
    }

    /// What is known when the request arrives: method and path, and for inbound
    /// requests the target (the outbound target is judged once the backend is known).
    fn admits_head(&self, direction: Direction, own_service: &str, method: &http::Method, path: &str) -> bool {
        if self.method.as_ref().is_some_and(|m| m != method) {
            return false;
        }
        if self.path_prefix.as_deref().is_some_and(|prefix| !path.starts_with(prefix)) {
            return false;
        }
        match (&self.target, direction) {
            (Target::Workload, _) | (Target::Service(_), Direction::Outbound) => true,
            (Target::Service(service), Direction::Inbound) => service == own_service,
        }
    }

    /// The rest, once the response has started.
    fn admits_end(&self, event: &TapEvent, status: u16) -> bool {
        if let Target::Service(service) = &self.target {
            let outbound = event.direction == WireDirection::Outbound as i32;
            if outbound && event.destination_service != *service && event.backend != *service {
                return false;
            }
        }
        if self.status.is_some_and(|filter| !filter.matches(status)) {
            return false;
        }
        match &self.route {
            Some(route) => route_matches(&event.route, route),
            None => true,
        }
    }
}

/// Whether the route label `label` (`HTTPRoute/ns/name` or `HTTPRoute/ns/name#rule`)
/// is the route an operator named: by its label, `ns/name`, or `name`, with or without
/// the rule.
fn route_matches(label: &str, wanted: &str) -> bool {
    if label.is_empty() {
        return false;
    }
    let (route, rule) = match label.split_once('#') {
        Some((route, rule)) => (route, Some(rule)),
        None => (label, None),
    };
    let without_kind = route.split_once('/').map_or(route, |(_, rest)| rest);
    let name = without_kind.rsplit_once('/').map_or(without_kind, |(_, name)| name);
    [route, without_kind, name].iter().any(|form| {
        *form == wanted
            || rule.is_some_and(|rule| wanted.strip_prefix(*form).and_then(|r| r.strip_prefix('#')) == Some(rule))
    })
}

impl Taps {
    /// Whether any session is active. The one check a request pays while nobody taps.
    #[inline]
    pub fn watching(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Starts a session (replacing one of the same id).
    fn start(&self, session: Session, metrics: &crate::metrics::Metrics) {
        let id = session.id;
        let mut sessions: Vec<Arc<Session>> = self.sessions.load().iter().filter(|s| s.id != id).cloned().collect();
        sessions.push(Arc::new(session));
        metrics.tap_sessions.set(sessions.len() as i64);
        self.sessions.store(Arc::new(sessions));
        self.active.store(true, Ordering::Relaxed);
    }

    fn stop(&self, id: u64, metrics: &crate::metrics::Metrics) {
        let sessions: Vec<Arc<Session>> = self.sessions.load().iter().filter(|s| s.id != id).cloned().collect();
        metrics.tap_sessions.set(sessions.len() as i64);
        self.active.store(!sessions.is_empty(), Ordering::Relaxed);
        self.sessions.store(Arc::new(sessions));
    }

    /// Ends every session: the stream that started them is gone.
    fn stop_all(&self, metrics: &crate::metrics::Metrics) {
        self.active.store(false, Ordering::Relaxed);
        self.sessions.store(Arc::new(Vec::new()));
        *self.queue.lock().unwrap_or_else(|e| e.into_inner()) = None;
        metrics.tap_sessions.set(0);
    }

    /// Begins recording a request that sessions may want (`None` when none can):
    /// `own_service` is this proxy's `namespace/name`, `headers` the request's as the
    /// proxy forwards them (named ones are copied).
    pub fn begin(
        &self,
        direction: Direction,
        own_service: &str,
        parts: &http::request::Parts,
        authority: &str,
        body_length: Result<u64, crate::body::Counter>,
        started: Instant,
    ) -> Option<Box<Tapped>> {
        let path = parts.uri.path();
        let sessions: Vec<Arc<Session>> = self
            .sessions
            .load()
            .iter()
            .filter(|s| s.filter.admits_head(direction, own_service, &parts.method, path))
            .cloned()
            .collect();
        if sessions.is_empty() {
            return None;
        }
        let mut headers = Vec::new();
        for name in sessions.iter().flat_map(|s| &s.headers) {
            if headers.iter().any(|h: &Header| h.name == name.as_str()) {
                continue;
            }
            for value in parts.headers.get_all(name) {
                headers
                    .push(Header { name: name.to_string(), value: String::from_utf8_lossy(value.as_bytes()).into() });
            }
        }
        let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let event = TapEvent {
            unix_millis: since.as_millis() as u64,
            direction: match direction {
                Direction::Outbound => WireDirection::Outbound,
                Direction::Inbound => WireDirection::Inbound,
            } as i32,
            method: parts.method.to_string(),
            authority: authority.to_string(),
            path: parts.uri.path_and_query().map_or_else(|| path.to_string(), |p| p.as_str().to_string()),
            headers,
            bytes_in: *body_length.as_ref().unwrap_or(&0),
            grpc_status: -1,
            ..TapEvent::default()
        };
        Some(Box::new(Tapped { sessions, started, event, tries: Mutex::new(Vec::new()), counted: body_length.err() }))
    }
}

/// A request being recorded for tap sessions.
pub struct Tapped {
    sessions: Vec<Arc<Session>>,
    started: Instant,
    event: TapEvent,
    /// Tries, noted while the request is shared by the retry loop.
    tries: Mutex<Vec<TapTry>>,
    /// What a request body of undeclared length streamed.
    counted: Option<crate::body::Counter>,
}

impl Tapped {
    /// The route rule the request matched.
    pub fn route(&mut self, label: &str, http_route: Option<&str>) {
        self.event.route = label.to_string();
        self.event.http_route = http_route.unwrap_or_default().to_string();
    }

    /// The backend chosen, with its weight among the rule's.
    pub fn backend(&mut self, name: &str, weight: u32, total_weight: u32) {
        self.event.backend = name.to_string();
        self.event.backend_weight = weight;
        self.event.total_weight = total_weight;
    }

    /// The authorization verdict (`allow` or `deny`) and what decided it.
    pub fn authz(&mut self, verdict: &str, policy: &str) {
        self.event.authz = verdict.to_string();
        self.event.authz_policy = policy.to_string();
    }

    /// Notes try `number`, to `endpoint`, as the balancer saw it when choosing;
    /// `ejected` are the backend's endpoints outlier detection had set aside.
    pub fn try_started(&self, number: u32, endpoint: &EndpointState, ejected: Vec<String>) {
        let tried = TapTry {
            number,
            endpoint: endpoint.address.to_string(),
            identity: endpoint.key.identity.as_deref().unwrap_or_default().to_string(),
            estimate_micros: endpoint.rtt_estimate().as_micros() as u64,
            // Before this try's own request is counted.
            in_flight: endpoint.in_flight() as u32,
            skipped_ejected: ejected,
            ..TapTry::default()
        };
        self.tries.lock().unwrap_or_else(|e| e.into_inner()).push(tried);
    }

    /// How the latest try ended: its status or error, its duration, the ejection it
    /// caused, and what the proxy did next (with the retry budget left after a retry).
    pub fn try_ended(&self, end: TryEnd<'_>) {
        let mut tries = self.tries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(last) = tries.last_mut() {
            last.status = u32::from(end.status);
            last.error = end.error.to_string();
            last.duration_micros = end.duration.as_micros() as u64;
            last.ejected_millis = end.ejected.map_or(0, |d| d.as_millis() as u64);
            last.then = end.then.to_string();
            last.budget_left = end.budget_left;
        }
    }

    /// Judges the sessions' whole filters on the finished request and spends their
    /// rate; returns the response with the event sent when its body ends. `outcome` is
    /// what the direction knows (as its access log line says it), `tls` whether the hop
    /// between proxies was mutual TLS.
    pub fn finish(
        mut self: Box<Self>,
        state: &SharedState,
        outcome: &crate::access_log::Outcome,
        tls: bool,
        response: Response<Body>,
    ) -> Response<Body> {
        let status = response.status().as_u16();
        let text = |value: &Option<Arc<str>>| value.as_deref().unwrap_or_default().to_string();
        let event = &mut self.event;
        event.status = u32::from(status);
        event.error = outcome.error.to_string();
        event.source_identity = text(&outcome.source_identity);
        event.destination_identity = text(&outcome.destination_identity);
        event.source_service = text(&outcome.source_service);
        event.destination_service = text(&outcome.destination_service);
        event.endpoint = outcome.upstream.map(|address| address.to_string()).unwrap_or_default();
        event.trace_id = outcome.trace_id.clone().unwrap_or_default();
        event.tls = tls;
        if let Some(code) = crate::telemetry::grpc_status(response.headers()) {
            event.grpc_status = code as i32;
        }
        let now = Instant::now();
        let mut admitted = Vec::with_capacity(self.sessions.len());
        for session in &self.sessions {
            if !session.filter.admits_end(&self.event, status) {
                continue;
            }
            if session.take_token(now) {
                admitted.push(session.clone());
            } else {
                state.metrics.tap_events_dropped.get_or_create(&TapDropLabels { reason: "rate" }).inc();
            }
        }
        if admitted.is_empty() {
            return response;
        }
        self.sessions = admitted;
        self.event.tries = std::mem::take(self.tries.get_mut().unwrap_or_else(|e| e.into_inner()));
        use http_body::Body as _;
        let pending = SendOnEnd { tapped: self, sent: 0, taps: state.taps.clone(), metrics: state.metrics.tap() };
        if response.body().is_end_stream() {
            crate::body::Watch::end(pending);
            return response;
        }
        response.map(|inner| crate::body::Watched::wrap(inner, pending))
    }
}

/// How one try ended, for [`Tapped::try_ended`].
pub struct TryEnd<'a> {
    pub status: u16,
    pub error: &'a str,
    pub duration: Duration,
    pub ejected: Option<Duration>,
    pub then: &'static str,
    pub budget_left: u64,
}

/// Counts a response body and sends its request's event when it ends.
struct SendOnEnd {
    tapped: Box<Tapped>,
    sent: u64,
    taps: Arc<Taps>,
    metrics: crate::metrics::TapMetrics,
}

impl crate::body::Watch for SendOnEnd {
    fn frame(&mut self, frame: &Result<http_body::Frame<Bytes>, BoxError>) {
        if let Some(data) = frame.as_ref().ok().and_then(|frame| frame.data_ref()) {
            self.sent += data.len() as u64;
        }
    }

    fn end(self) {
        let mut tapped = self.tapped;
        tapped.event.duration_micros = tapped.started.elapsed().as_micros() as u64;
        if let Some(counted) = &tapped.counted {
            tapped.event.bytes_in = counted.get();
        }
        tapped.event.bytes_out = self.sent;
        let queue = self.taps.queue.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(queue) = queue else { return };
        let count = tapped.sessions.len();
        for (i, session) in tapped.sessions.iter().enumerate() {
            let mut event = if i + 1 == count { std::mem::take(&mut tapped.event) } else { tapped.event.clone() };
            event.session = session.id;
            // Only the headers this session named.
            event.headers.retain(|h| session.headers.iter().any(|name| name.as_str() == h.name));
            if queue.try_send(event).is_ok() {
                self.metrics.events.inc();
            } else {
                self.taps.dropped.fetch_add(1, Ordering::Relaxed);
                self.metrics.dropped_queue.inc();
            }
        }
    }
}

/// Keeps a tap stream open to the control plane at `channel` for as long as the
/// discovery stream that spawned it: applies the sessions it is told to start and stop,
/// and sends their events. Every session ends when the stream does.
pub async fn watch(state: Arc<SharedState>, channel: tonic::transport::Channel, proxy_id: String) {
    struct StopAll(Arc<SharedState>);
    impl Drop for StopAll {
        fn drop(&mut self) {
            self.0.taps.stop_all(&self.0.metrics);
        }
    }
    let _stop = StopAll(state.clone());
    let mut pause = Duration::from_millis(200);
    loop {
        let started = Instant::now();
        if let Err(error) = watch_once(&state, channel.clone(), &proxy_id).await {
            tracing::debug!(%error, "tap stream ended");
        }
        state.taps.stop_all(&state.metrics);
        if started.elapsed() > Duration::from_secs(10) {
            pause = Duration::from_millis(200);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

async fn watch_once(state: &SharedState, channel: tonic::transport::Channel, proxy_id: &str) -> Result<(), String> {
    let (outgoing, receiver) = mpsc::channel::<ProxyTapMessage>(8);
    let hello = proxy_tap_message::Message::Hello(TapHello { proxy_id: proxy_id.to_string() });
    let _ = outgoing.send(ProxyTapMessage { message: Some(hello) }).await;
    let mut commands = TapClient::new(channel)
        .watch(ReceiverStream::new(receiver))
        .await
        .map_err(|status| format!("the control plane refused the tap stream: {}", status.message()))?
        .into_inner();
    let (queue, mut events) = mpsc::channel::<TapEvent>(QUEUE);
    *state.taps.queue.lock().unwrap_or_else(|e| e.into_inner()) = Some(queue);
    loop {
        tokio::select! {
            command = commands.message() => {
                let command = match command {
                    Ok(Some(command)) => command,
                    Ok(None) => return Ok(()),
                    Err(status) => return Err(status.message().to_string()),
                };
                match command.command {
                    Some(tap_command::Command::Start(start)) => match Session::new(&start) {
                        Ok(session) => {
                            tracing::info!(session = start.session, filter = ?session.filter, "tap session started");
                            state.taps.start(session, &state.metrics);
                        }
                        Err(error) => tracing::warn!(session = start.session, %error, "refused a tap session"),
                    },
                    Some(tap_command::Command::Stop(stop)) => {
                        tracing::info!(session = stop.session, "tap session stopped");
                        state.taps.stop(stop.session, &state.metrics);
                    }
                    None => {}
                }
            }
            Some(first) = events.recv() => {
                let mut batch = vec![first];
                while batch.len() < BATCH {
                    match events.try_recv() {
                        Ok(event) => batch.push(event),
                        Err(_) => break,
                    }
                }
                let dropped = state.taps.dropped.swap(0, Ordering::Relaxed);
                let message = proxy_tap_message::Message::Events(TapEvents { events: batch, dropped });
                if outgoing.send(ProxyTapMessage { message: Some(message) }).await.is_err() {
                    return Err("the tap stream closed".into());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(filter: TapFilter, rate: f64) -> TapStart {
        TapStart { session: 7, filter: Some(filter), max_rps: rate, headers: vec!["x-request-id".into()] }
    }

    fn service(name: &str) -> TapFilter {
        TapFilter { target: Some(tap_filter::Target::Service(name.into())), ..TapFilter::default() }
    }

    #[test]
    fn routes_are_named_by_label_namespace_and_name_with_or_without_the_rule() {
        for wanted in ["HTTPRoute/shop/split", "shop/split", "split", "split#canary", "shop/split#canary"] {
            assert!(route_matches("HTTPRoute/shop/split#canary", wanted), "{wanted}");
        }
        assert!(route_matches("HTTPRoute/shop/split", "split"));
        assert!(!route_matches("HTTPRoute/shop/split#canary", "split#stable"));
        assert!(!route_matches("HTTPRoute/shop/split", "splits"));
        assert!(!route_matches("", "split"));
    }

    #[test]
    fn a_filter_is_judged_on_the_head_then_on_the_end() {
        let mut wire = service("shop/reviews");
        wire.method = "get".into();
        wire.path_prefix = "/api".into();
        wire.status = 5;
        wire.status_class = true;
        let session = Session::new(&start(wire, 10.0)).expect("valid");
        let filter = &session.filter;
        assert!(filter.admits_head(Direction::Outbound, "shop/front", &http::Method::GET, "/api/1"));
        assert!(!filter.admits_head(Direction::Outbound, "shop/front", &http::Method::POST, "/api/1"));
        assert!(!filter.admits_head(Direction::Outbound, "shop/front", &http::Method::GET, "/other"));
        assert!(!filter.admits_head(Direction::Inbound, "shop/front", &http::Method::GET, "/api/1"));
        assert!(filter.admits_head(Direction::Inbound, "shop/reviews", &http::Method::GET, "/api/1"));
        let mut event = TapEvent {
            direction: WireDirection::Outbound as i32,
            destination_service: "shop/reviews".into(),
            ..TapEvent::default()
        };
        assert!(filter.admits_end(&event, 503));
        assert!(!filter.admits_end(&event, 200));
        event.destination_service = "shop/gateway".into();
        assert!(!filter.admits_end(&event, 503), "neither addressed nor chosen as backend");
        event.backend = "shop/reviews".into();
        assert!(filter.admits_end(&event, 503), "chosen as the backend");
    }

    #[test]
    fn bad_sessions_are_refused_with_the_reason() {
        assert_eq!(Session::new(&start(TapFilter::default(), 1.0)).err(), Some(StartError::NoTarget));
        let mut wire = service("a/b");
        wire.status = 42;
        assert_eq!(Session::new(&start(wire, 1.0)).err(), Some(StartError::BadStatus(42)));
        assert_eq!(Session::new(&start(service("a/b"), 0.0)).err(), Some(StartError::BadRate(0.0)));
        let mut bad_header = start(service("a/b"), 1.0);
        bad_header.headers = vec!["not a header".into()];
        assert!(matches!(Session::new(&bad_header), Err(StartError::BadHeader(_))));
    }
}
