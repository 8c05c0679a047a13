//! Golden-signal telemetry for the control plane: what this proxy carried, by row
//! (direction, peer identity, destination Service, route, backend, mutual TLS), as
//! request counts, outcomes and a mergeable latency sketch, plus TCP connections and
//! bytes, authorization decisions by policy, and what the proxy learned of its
//! endpoints. The control plane merges every proxy's reports into windows (`weft stat`).
//!
//! The request path records into a table of its own worker thread (a `thread_local`,
//! keyed by the label values' pointers, as `metrics.rs` caches its label sets), so no
//! lock is shared across workers and a hit is a word-hash lookup and a sketch update.
//! Once a second each worker's housekeeping drains its table into [`Telemetry`]'s
//! pending report (one short lock per worker per second, off the request path), and the
//! reporter sends it every `--telemetry-interval` on its own RPC beside the discovery
//! stream. Rows are keyed by pointer on the worker and by value in the pending report,
//! so the same Service under two configuration versions is one row when it leaves.
//!
//! A request ends in one place for telemetry: its route row (what the caller saw, after
//! retries) and the try that produced its response are recorded together, when the
//! response head is ready, or for gRPC when the body ends and `grpc-status` is known
//! (trailers). Tries that did not answer the caller (retried, or failed) are recorded by
//! the retry loop as they end.

use std::{
    cell::RefCell,
    collections::{HashMap, HashSet},
    hash::Hash,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use weft_api::{
    signals::{Outcome, Signals},
    telemetry as proto,
};

use crate::{
    body::{Body, BoxError},
    endpoint::monotonic_nanos,
    state::SharedState,
    word_hash::WordHashBuilder,
};

/// Rows one worker keeps between drains (a second); requests of further rows are
/// counted as dropped. Rows come from configuration (Services, routes, identities), so
/// this is a safety net, not a limit a mesh meets.
const MAX_WORKER_ROWS: usize = 4096;

/// Rows a report holds at most (of each kind): while the control plane cannot be reached
/// they wait here, and beyond it new rows are dropped (and counted) while the ones kept
/// go on counting. A full report is a few MiB, under the control plane's 16 MiB limit.
const MAX_PENDING_ROWS: usize = 16_384;

/// Interned peer identities per worker before the interner starts over.
const MAX_INTERNED: usize = 4096;

/// Which way a request or connection went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the local application to a Service.
    Outbound,
    /// From a caller to the local application.
    Inbound,
}

/// One request row, by reference: what the request path has at hand. A row counts
/// requests as the caller saw them (after retries), and, apart, each try sent to a
/// backend: both under one key, so that a request and the try that answered it cost one
/// lookup.
#[derive(Clone, Copy)]
pub struct RowRef<'a> {
    pub direction: Direction,
    /// The other side's SPIFFE ID (outbound: the endpoint's; inbound: the caller's).
    pub peer: Option<&'a Arc<str>>,
    pub destination: &'a Arc<str>,
    pub route: &'a Arc<str>,
    pub backend: &'a Arc<str>,
    pub tls: bool,
}

/// One request row, owned: what the pending report and deferred records hold.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RowKey {
    pub direction: Direction,
    pub peer: Option<Arc<str>>,
    pub destination: Arc<str>,
    pub route: Arc<str>,
    pub backend: Arc<str>,
    pub tls: bool,
}

impl RowRef<'_> {
    fn owned(&self) -> RowKey {
        RowKey {
            direction: self.direction,
            peer: self.peer.cloned(),
            destination: self.destination.clone(),
            route: self.route.clone(),
            backend: self.backend.clone(),
            tls: self.tls,
        }
    }

    /// The row's identity on this worker: its label values' addresses (the table entry
    /// holds the `Arc`s, so no address is reused while the entry exists).
    fn pointer_id(&self) -> RowPointers {
        RowPointers {
            direction: self.direction,
            peer: self.peer.map_or(0, |peer| Arc::as_ptr(peer) as *const u8 as usize),
            destination: Arc::as_ptr(self.destination) as *const u8 as usize,
            route: Arc::as_ptr(self.route) as *const u8 as usize,
            backend: Arc::as_ptr(self.backend) as *const u8 as usize,
            tls: self.tls,
        }
    }
}

impl RowKey {
    fn as_ref(&self) -> RowRef<'_> {
        RowRef {
            direction: self.direction,
            peer: self.peer.as_ref(),
            destination: &self.destination,
            route: &self.route,
            backend: &self.backend,
            tls: self.tls,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct RowPointers {
    direction: Direction,
    peer: usize,
    destination: usize,
    route: usize,
    backend: usize,
    tls: bool,
}

/// A row's signals: its requests (after retries) and, apart, its tries.
#[derive(Clone, Debug, Default)]
struct RowSignals {
    requests: Signals,
    tries: Signals,
}

impl RowSignals {
    fn merge(&mut self, other: &RowSignals) {
        self.requests.merge(&other.requests);
        self.tries.merge(&other.tries);
    }
}

/// One TCP row: connections to or from the local application, or relayed to a Service.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TcpKey {
    pub direction: Direction,
    pub peer: Option<Arc<str>>,
    pub destination: Arc<str>,
    pub tls: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct TcpPointers {
    direction: Direction,
    peer: usize,
    destination: usize,
    tls: bool,
}

impl TcpKey {
    fn pointer_id(&self) -> TcpPointers {
        TcpPointers {
            direction: self.direction,
            peer: self.peer.as_ref().map_or(0, |peer| Arc::as_ptr(peer) as *const u8 as usize),
            destination: Arc::as_ptr(&self.destination) as *const u8 as usize,
            tls: self.tls,
        }
    }
}

/// Connection counts of one TCP row. `open` is a gauge: it survives reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct TcpCounts {
    opened: u64,
    closed: u64,
    open: i64,
    bytes_sent: u64,
    bytes_received: u64,
}

impl TcpCounts {
    fn merge(&mut self, other: &TcpCounts) {
        self.opened += other.opened;
        self.closed += other.closed;
        self.open += other.open;
        self.bytes_sent += other.bytes_sent;
        self.bytes_received += other.bytes_received;
    }
}

/// What one worker recorded since its last drain.
#[derive(Default)]
struct WorkerTable {
    requests: HashMap<RowPointers, (RowKey, RowSignals), WordHashBuilder>,
    tcp: HashMap<TcpPointers, (TcpKey, TcpCounts), WordHashBuilder>,
    /// Decisions by policy: [allowed, denied].
    authz: HashMap<String, [u64; 2]>,
    dropped: u64,
}

thread_local! {
    static WORKER: RefCell<WorkerTable> = RefCell::new(WorkerTable::default());
    static INTERNED: RefCell<HashSet<Arc<str>>> = RefCell::new(HashSet::new());
}

/// Runs `record` on `row`'s signals in this worker's table: one hash lookup when the row
/// is there (the common case), a second only to insert it.
fn with_row(row: RowRef<'_>, record: impl FnOnce(&mut RowSignals)) {
    WORKER.with(|table| {
        let mut table = table.borrow_mut();
        let id = row.pointer_id();
        if let Some((_, signals)) = table.requests.get_mut(&id) {
            record(signals);
            return;
        }
        if table.requests.len() >= MAX_WORKER_ROWS {
            table.dropped += 1;
            return;
        }
        let (_, signals) = table.requests.entry(id).or_insert_with(|| (row.owned(), RowSignals::default()));
        record(signals);
    });
}

/// Counts one request on `row` that ended with `outcome` after `latency` (to the
/// response's first byte), with `retries` retries sent for it; and, when a try answered
/// it (`answered`), that try with the same outcome. Tries are counted, not timed: each
/// request's latency is on its request row, and a sketch per try would double the cost.
pub fn record_request(row: RowRef<'_>, outcome: Outcome, latency: Duration, retries: u32, answered: bool) {
    with_row(row, |signals| {
        signals.requests.record(outcome, latency);
        signals.requests.retries += u64::from(retries);
        if answered {
            signals.tries.count(outcome);
        }
    });
}

/// Counts one try on `row` that did not answer the caller (it was retried, or failed).
pub fn record_try(row: RowRef<'_>, outcome: Outcome) {
    with_row(row, |signals| signals.tries.count(outcome));
}

/// Counts one authorization decision by its deciding policy.
pub fn record_authz(policy: &str, allowed: bool) {
    WORKER.with(|table| {
        let mut table = table.borrow_mut();
        let index = usize::from(!allowed);
        match table.authz.get_mut(policy) {
            Some(counts) => counts[index] += 1,
            None => {
                let mut counts = [0, 0];
                counts[index] = 1;
                table.authz.insert(policy.to_string(), counts);
            }
        }
    });
}

/// The one `Arc` of this worker for `identity`: a caller's identity is rendered per
/// connection, and rows keyed by pointer must see one allocation per identity, not one
/// per connection.
pub fn intern(identity: &str) -> Arc<str> {
    INTERNED.with(|interned| {
        let mut interned = interned.borrow_mut();
        if let Some(known) = interned.get(identity) {
            return known.clone();
        }
        if interned.len() >= MAX_INTERNED {
            interned.clear();
        }
        let fresh: Arc<str> = identity.into();
        interned.insert(fresh.clone());
        fresh
    })
}

fn update_tcp(key: &TcpKey, change: impl FnOnce(&mut TcpCounts)) {
    WORKER.with(|table| {
        let mut table = table.borrow_mut();
        let id = key.pointer_id();
        if !table.tcp.contains_key(&id) && table.tcp.len() >= MAX_WORKER_ROWS {
            table.dropped += 1;
            return;
        }
        let (_, counts) = table.tcp.entry(id).or_insert_with(|| (key.clone(), TcpCounts::default()));
        change(counts);
    });
}

/// An open connection, counted while it lives: opened when made, closed (with the bytes
/// relayed, if any) when dropped, on the worker that drops it.
pub struct OpenConnection {
    key: Option<TcpKey>,
    bytes: (u64, u64),
}

impl OpenConnection {
    /// Counts a connection on `key` as open; `None` counts nothing (telemetry off).
    pub fn open(key: Option<TcpKey>) -> Self {
        if let Some(key) = &key {
            update_tcp(key, |counts| {
                counts.opened += 1;
                counts.open += 1;
            });
        }
        OpenConnection { key, bytes: (0, 0) }
    }

    /// Bytes relayed toward the destination and back, counted when the connection ends.
    pub fn relayed(&mut self, sent: u64, received: u64) {
        self.bytes = (sent, received);
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if let Some(key) = &self.key {
            let (sent, received) = self.bytes;
            update_tcp(key, |counts| {
                counts.closed += 1;
                counts.open -= 1;
                counts.bytes_sent += sent;
                counts.bytes_received += received;
            });
        }
    }
}

/// The proxy's telemetry: whether it is on, and the report being gathered.
pub struct Telemetry {
    /// Off without a control plane, or with `--telemetry-interval 0`: then nothing on
    /// the request path records.
    enabled: AtomicBool,
    interval: Duration,
    pending: Mutex<Pending>,
    sequence: AtomicU64,
    /// A report the control plane did not take yet: sent again before any newer one,
    /// by whichever stream comes next.
    unsent: Mutex<Option<proto::ProxyReport>>,
}

/// What the workers drained and the reporter has not sent yet, keyed by value.
struct Pending {
    requests: HashMap<RowKey, RowSignals>,
    tcp: HashMap<TcpKey, TcpCounts>,
    authz: HashMap<String, [u64; 2]>,
    dropped: u64,
    since: Instant,
}

impl Pending {
    fn new() -> Self {
        Pending {
            requests: HashMap::new(),
            tcp: HashMap::new(),
            authz: HashMap::new(),
            dropped: 0,
            since: Instant::now(),
        }
    }
}

impl Telemetry {
    /// Telemetry reported every `interval`; `None` (no control plane, or an interval of
    /// 0) turns it off.
    pub fn new(interval: Option<Duration>) -> Self {
        Telemetry {
            enabled: AtomicBool::new(interval.is_some()),
            interval: interval.unwrap_or(Duration::ZERO),
            pending: Mutex::new(Pending::new()),
            sequence: AtomicU64::new(0),
            unsent: Mutex::new(None),
        }
    }

    /// Whether the request path records.
    #[inline]
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// How often reports are sent.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves what this worker recorded into the pending report. Called by each worker's
    /// housekeeping, on its own thread.
    pub fn drain_worker(&self) {
        if !self.enabled() {
            return;
        }
        let table = WORKER.with(|table| std::mem::take(&mut *table.borrow_mut()));
        if table.requests.is_empty() && table.tcp.is_empty() && table.authz.is_empty() && table.dropped == 0 {
            return;
        }
        let mut pending = self.lock();
        pending.dropped += table.dropped;
        for (_, (key, signals)) in table.requests {
            let full = pending.requests.len() >= MAX_PENDING_ROWS;
            match pending.requests.get_mut(&key) {
                Some(row) => row.merge(&signals),
                None if full => pending.dropped += 1,
                None => {
                    pending.requests.insert(key, signals);
                }
            }
        }
        for (_, (key, counts)) in table.tcp {
            let full = pending.tcp.len() >= MAX_PENDING_ROWS;
            match pending.tcp.get_mut(&key) {
                Some(row) => row.merge(&counts),
                None if full => pending.dropped += 1,
                None => {
                    pending.tcp.insert(key, counts);
                }
            }
        }
        for (policy, counts) in table.authz {
            let row = pending.authz.entry(policy).or_default();
            row[0] += counts[0];
            row[1] += counts[1];
        }
    }

    /// Takes the pending report (the counts since the last one; open-connection gauges
    /// stay), with the endpoints' learned state as of now.
    pub fn take_report(&self, state: &SharedState, proxy_id: &str) -> proto::ProxyReport {
        let mut pending = self.lock();
        let now = Instant::now();
        let interval = now.duration_since(pending.since);
        pending.since = now;
        let mut requests = Vec::new();
        for (key, signals) in std::mem::take(&mut pending.requests) {
            let row = |kind: proto::RowKind, signals: &Signals| proto::RequestRow {
                direction: wire_direction(key.direction) as i32,
                kind: kind as i32,
                peer_identity: key.peer.as_deref().unwrap_or_default().to_string(),
                destination: key.destination.to_string(),
                route: key.route.to_string(),
                backend: key.backend.to_string(),
                tls: key.tls,
                signals: Some(signals.into()),
            };
            if signals.requests.requests > 0 {
                requests.push(row(proto::RowKind::Request, &signals.requests));
            }
            if signals.tries.requests > 0 {
                requests.push(row(proto::RowKind::Try, &signals.tries));
            }
        }
        let mut tcp = Vec::new();
        pending.tcp.retain(|key, counts| {
            if *counts != TcpCounts::default() {
                tcp.push(proto::TcpRow {
                    direction: wire_direction(key.direction) as i32,
                    peer_identity: key.peer.as_deref().unwrap_or_default().to_string(),
                    destination: key.destination.to_string(),
                    tls: key.tls,
                    opened: counts.opened,
                    closed: counts.closed,
                    open: counts.open.max(0) as u64,
                    bytes_sent: counts.bytes_sent,
                    bytes_received: counts.bytes_received,
                });
            }
            *counts = TcpCounts { open: counts.open, ..TcpCounts::default() };
            counts.open > 0
        });
        let authz = std::mem::take(&mut pending.authz)
            .into_iter()
            .map(|(policy, [allowed, denied])| proto::AuthzRow { policy, allowed, denied })
            .collect();
        let dropped_rows = std::mem::take(&mut pending.dropped);
        drop(pending);
        proto::ProxyReport {
            proxy_id: proxy_id.to_string(),
            sequence: self.sequence.fetch_add(1, Ordering::Relaxed) + 1,
            interval_millis: interval.as_millis() as u64,
            requests,
            tcp,
            authz,
            endpoints: endpoint_rows(state),
            dropped_rows,
        }
    }
}

fn wire_direction(direction: Direction) -> proto::Direction {
    match direction {
        Direction::Outbound => proto::Direction::Outbound,
        Direction::Inbound => proto::Direction::Inbound,
    }
}

/// What this proxy has learned of every endpoint it sends to, now.
fn endpoint_rows(state: &SharedState) -> Vec<proto::EndpointRow> {
    let config = state.config.load_full();
    let now_nanos = monotonic_nanos(Instant::now());
    let mut rows = Vec::new();
    for (service, ports) in config.backends.iter().enumerate() {
        for (port, backend) in ports.iter().enumerate() {
            for endpoint in &backend.endpoints {
                let learned = &endpoint.state;
                rows.push(proto::EndpointRow {
                    service: config.service_labels[service].to_string(),
                    port: u32::from(config.snapshot.services[service].ports[port].port),
                    address: learned.address.to_string(),
                    workload: endpoint.workload.clone(),
                    identity: learned.key.identity.as_deref().unwrap_or_default().to_string(),
                    latency_estimate_micros: learned.rtt_estimate().as_micros() as u64,
                    in_flight: learned.in_flight() as u64,
                    ejected_for_millis: learned.ejected_for(now_nanos).map_or(0, |d| d.as_millis() as u64),
                });
            }
        }
    }
    rows
}

/// The outcome of a response as the signals judge it, from its status and, for gRPC,
/// the `grpc-status` of its head (a trailers-only gRPC response carries it there). Other
/// responses are not searched for it: a header lookup is not free.
pub fn outcome_of(status: u16, headers: &http::HeaderMap, grpc: bool) -> Outcome {
    Outcome::Response { status, grpc_status: if grpc { grpc_status(headers) } else { None } }
}

/// The `grpc-status` of response headers or trailers.
pub(crate) fn grpc_status(headers: &http::HeaderMap) -> Option<u32> {
    headers.get("grpc-status").and_then(|value| value.to_str().ok()).and_then(|text| text.parse().ok())
}

/// A finished request, as its row will count it.
pub struct Answered<'a> {
    pub row: RowRef<'a>,
    /// To the response's first byte.
    pub latency: Duration,
    pub retries: u32,
    /// Whether a try answered it (it is counted with the request).
    pub answered: bool,
}

impl Answered<'_> {
    /// Counts the request on its row: now, as a transport error (no response from the
    /// application: connect failure, reset, timeout) when `transport_error`; now, by its
    /// status, for any other response; or, for a gRPC response whose `grpc-status` is
    /// still to come in trailers, when its body ends (see [`RecordOnEnd`]).
    pub fn record(self, response: http::Response<Body>, grpc: bool, transport_error: bool) -> http::Response<Body> {
        let status = response.status().as_u16();
        let outcome =
            if transport_error { Outcome::TransportError } else { outcome_of(status, response.headers(), grpc) };
        if grpc && outcome == (Outcome::Response { status: 200, grpc_status: None }) {
            let deferred = Deferred {
                row: self.row.owned(),
                latency: self.latency,
                retries: self.retries,
                answered: self.answered,
            };
            let watch = RecordOnEnd { finished: deferred, grpc_status: None, broken: false };
            return response.map(|inner| crate::body::Watched::wrap(inner, watch));
        }
        record_request(self.row, outcome, self.latency, self.retries, self.answered);
        response
    }
}

/// An [`Answered`] whose outcome comes when the body ends.
struct Deferred {
    row: RowKey,
    latency: Duration,
    retries: u32,
    answered: bool,
}

/// A gRPC response's request, recorded when its body ends: with the `grpc-status` of its
/// trailers, as a transport error if it broke, or as it stood if the caller went away (a
/// cancelled call is the caller's choice, not a failure).
struct RecordOnEnd {
    finished: Deferred,
    grpc_status: Option<u32>,
    broken: bool,
}

impl crate::body::Watch for RecordOnEnd {
    fn frame(&mut self, frame: &Result<http_body::Frame<Bytes>, BoxError>) {
        match frame {
            Ok(frame) => {
                if let Some(trailers) = frame.trailers_ref() {
                    self.grpc_status = grpc_status(trailers);
                }
            }
            Err(_) => self.broken = true,
        }
    }

    fn end(self) {
        let outcome = if self.broken {
            Outcome::TransportError
        } else {
            Outcome::Response { status: 200, grpc_status: self.grpc_status }
        };
        let finished = self.finished;
        record_request(finished.row.as_ref(), outcome, finished.latency, finished.retries, finished.answered);
    }
}

/// Sends the pending report every interval over `channel` until the task is dropped. A
/// report the control plane did not take is sent again, as it was (same sequence
/// number, so it is merged once), before anything newer; what the proxy carries
/// meanwhile waits in the next.
pub async fn report(state: Arc<SharedState>, channel: tonic::transport::Channel, proxy_id: String) {
    let mut client = proto::telemetry_client::TelemetryClient::new(channel);
    let mut tick = tokio::time::interval(state.telemetry.interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        send_one(&state, &mut client, &proxy_id, state.telemetry.interval().max(Duration::from_secs(1))).await;
    }
}

/// Sends what is pending now, within a second: a proxy stopping cleanly reports its last
/// interval before it says goodbye.
pub async fn flush(state: &SharedState, channel: tonic::transport::Channel, proxy_id: &str) {
    let mut client = proto::telemetry_client::TelemetryClient::new(channel);
    send_one(state, &mut client, proxy_id, Duration::from_secs(1)).await;
}

/// Sends the unsent report, or else a new one, waiting at most `limit`; keeps it as
/// unsent unless the control plane took it or refused it for good.
async fn send_one(
    state: &SharedState,
    client: &mut proto::telemetry_client::TelemetryClient<tonic::transport::Channel>,
    proxy_id: &str,
    limit: Duration,
) {
    let telemetry = &state.telemetry;
    let unsent = telemetry.unsent.lock().unwrap_or_else(|e| e.into_inner()).take();
    let report = unsent.unwrap_or_else(|| telemetry.take_report(state, proxy_id));
    let kept = match tokio::time::timeout(limit, client.report(report.clone())).await {
        Ok(Ok(_)) => None,
        Ok(Err(status)) if matches!(status.code(), tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted) => {
            // A report the control plane refuses (malformed, or too large) would be
            // refused again.
            tracing::warn!(error = %status.message(), "the control plane refused a telemetry report; dropped");
            None
        }
        Ok(Err(status)) => {
            tracing::debug!(error = %status.message(), "telemetry report not delivered; it is sent again");
            Some(report)
        }
        Err(_) => {
            tracing::debug!("telemetry report timed out; it is sent again");
            Some(report)
        }
    };
    *telemetry.unsent.lock().unwrap_or_else(|e| e.into_inner()) = kept;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::empty_label;

    fn key(destination: &Arc<str>) -> RowKey {
        let empty = empty_label();
        RowRef { direction: Direction::Outbound, peer: None, destination, route: &empty, backend: &empty, tls: false }
            .owned()
    }

    #[test]
    fn a_worker_counts_rows_by_value_once_drained() {
        let state = SharedState::new(
            crate::settings::ProxySettings::new(None),
            weft_model::Snapshot::empty("default"),
            String::new(),
        );
        let telemetry = Telemetry::new(Some(Duration::from_secs(5)));
        // Equal destinations in two allocations (two configuration versions).
        let (a, a_again): (Arc<str>, Arc<str>) = ("ns/a".into(), "ns/a".into());
        let ok = Outcome::Response { status: 200, grpc_status: None };
        record_request(key(&a).as_ref(), ok, Duration::from_millis(3), 0, true);
        record_request(key(&a_again).as_ref(), Outcome::TransportError, Duration::from_millis(9), 2, false);
        record_try(key(&a).as_ref(), Outcome::TransportError);
        record_authz("ns/p", true);
        record_authz("ns/p", false);
        record_authz("ns/p", false);
        let peer = intern("spiffe://td/ns/x/sa/y");
        assert!(Arc::ptr_eq(&peer, &intern("spiffe://td/ns/x/sa/y")), "one Arc per identity");
        let tcp = TcpKey { direction: Direction::Inbound, peer: Some(peer), destination: a.clone(), tls: true };
        let kept = OpenConnection::open(Some(tcp.clone()));
        let mut ended = OpenConnection::open(Some(tcp));
        ended.relayed(10, 20);
        drop(ended);
        telemetry.drain_worker();

        let report = telemetry.take_report(&state, "p1");
        assert_eq!(report.sequence, 1);
        assert_eq!(report.requests.len(), 2, "{:?}", report.requests);
        let request =
            report.requests.iter().find(|r| r.kind == proto::RowKind::Request as i32).expect("the request row");
        let signals = request.signals.as_ref().unwrap();
        assert_eq!((signals.requests, signals.failures, signals.retries), (2, 1, 2));
        let tries = report.requests.iter().find(|r| r.kind == proto::RowKind::Try as i32).expect("the try row");
        let signals = tries.signals.as_ref().unwrap();
        assert_eq!((signals.requests, signals.failures), (2, 1), "the answering try and the failed one");
        assert_eq!(report.authz, [proto::AuthzRow { policy: "ns/p".into(), allowed: 1, denied: 2 }]);
        assert_eq!(report.tcp.len(), 1);
        let row = &report.tcp[0];
        assert_eq!((row.opened, row.closed, row.open, row.bytes_sent, row.bytes_received), (2, 1, 1, 10, 20));

        // The next report: no requests, but the connection still open is still counted.
        let report = telemetry.take_report(&state, "p1");
        assert_eq!(report.sequence, 2);
        assert!(report.requests.is_empty() && report.authz.is_empty());
        assert_eq!(report.tcp.len(), 1, "the connection still open is reported");
        assert_eq!((report.tcp[0].opened, report.tcp[0].open), (0, 1));
        drop(kept);
        telemetry.drain_worker();
        let report = telemetry.take_report(&state, "p1");
        assert_eq!((report.tcp[0].closed, report.tcp[0].open), (1, 0));
        assert!(telemetry.lock().tcp.is_empty(), "a row with nothing open is forgotten");
    }
}
