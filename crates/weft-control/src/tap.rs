//! Tap sessions: an operator watching live requests (`weft tap`, `weft top`).
//!
//! A session is held by the replica the operator's API call reached, for as long as
//! that call lasts. [`TapHub::open`] tells the proxies concerned, over the tap stream
//! each keeps beside its discovery stream ([`TapService`]), to record what the filter
//! matches at their share of the session's rate; the replica also asks every other
//! replica ([`TapRelayService`]) to do the same with its proxies. Events come back here,
//! pass the session's own rate limit (so the operator never gets more than asked for,
//! however many proxies and replicas answered) and go to the caller. When the caller
//! goes, [`TapSession`] is dropped, and every proxy is told to stop.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{Request, Response, Status, Streaming};
use weft_api::{
    rate::TokenBucket,
    tap::{
        proxy_tap_message, tap_command, tap_filter, tap_relay_client::TapRelayClient, tap_relay_server::TapRelay,
        tap_server::Tap, ProxyTapMessage, TapCommand, TapEvent, TapFilter, TapStart, TapStop,
    },
};

use crate::{control_tls::Peer, discovery::Hub};

/// Events waiting for a session's caller; beyond this they are dropped and counted.
const SESSION_QUEUE: usize = 1024;
/// How long a new tap stream may take to send its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// What a session's caller receives.
#[derive(Debug)]
pub enum Delivery {
    Event(Box<TapEvent>),
    /// Something the operator should know (a replica that could not be asked).
    Notice(String),
}

/// A proxy's tap stream on this replica.
struct Link {
    /// Tells streams of one proxy apart: a reconnecting proxy's new stream must not be
    /// removed by its old one ending.
    id: u64,
    commands: mpsc::Sender<Result<TapCommand, Status>>,
}

/// A session as this replica delivers it.
struct Sink {
    /// What each proxy is told (its rate is each proxy's share).
    start: TapStart,
    deliveries: mpsc::Sender<Delivery>,
    bucket: Mutex<TokenBucket>,
    counts: Arc<SessionCounts>,
}

/// What a session delivered and held back, for its caller's heartbeat.
#[derive(Debug, Default)]
pub struct SessionCounts {
    pub delivered: AtomicU64,
    /// Beyond the session's rate (here or on the proxies, as they reported).
    pub limited: AtomicU64,
    /// Lost on the way: a queue that was full.
    pub dropped: AtomicU64,
}

/// The tap streams of this replica's proxies, and the sessions it holds.
#[derive(Default)]
pub struct TapHub {
    links: Mutex<HashMap<(String, String), Link>>,
    sessions: Mutex<HashMap<u64, Arc<Sink>>>,
    next_id: AtomicU64,
}

/// An open session; dropping it ends the session on every proxy.
pub struct TapSession {
    pub id: u64,
    pub deliveries: mpsc::Receiver<Delivery>,
    pub counts: Arc<SessionCounts>,
    /// Proxies of this replica the session concerns, and each one's rate.
    pub proxies: usize,
    pub per_proxy_rps: f64,
    taps: Arc<TapHub>,
    relays: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for TapSession {
    fn drop(&mut self) {
        for relay in &self.relays {
            relay.abort();
        }
        self.taps.close(self.id);
    }
}

/// What an operator asks to watch, checked.
#[derive(Clone, Debug)]
pub struct TapRequest {
    pub filter: TapFilter,
    pub max_rps: f64,
    pub headers: Vec<String>,
}

impl TapHub {
    fn lock_links(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Link>> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Sink>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a session on this replica's proxies. The session's rate is split among the
    /// proxies it concerns (a Service's own workloads and those whose view holds it; a
    /// workload's own proxy); every proxy whose requests it may match is told.
    pub fn open(self: &Arc<Self>, hub: &Hub, request: &TapRequest) -> TapSession {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let concerned = hub.proxies().iter().filter(|record| concerns(&request.filter, record)).count();
        let per_proxy_rps = request.max_rps / concerned.max(1) as f64;
        let start = TapStart {
            session: id,
            filter: Some(request.filter.clone()),
            max_rps: per_proxy_rps,
            headers: request.headers.clone(),
        };
        let (deliveries, receiver) = mpsc::channel(SESSION_QUEUE);
        let counts = Arc::new(SessionCounts::default());
        let sink = Arc::new(Sink {
            start: start.clone(),
            deliveries,
            bucket: Mutex::new(TokenBucket::new(request.max_rps, Instant::now())),
            counts: counts.clone(),
        });
        self.lock_sessions().insert(id, sink);
        for ((namespace, proxy_id), link) in self.lock_links().iter() {
            if reaches(&request.filter, namespace, proxy_id) {
                send(link, tap_command::Command::Start(start.clone()));
            }
        }
        TapSession {
            id,
            deliveries: receiver,
            counts,
            proxies: concerned,
            per_proxy_rps,
            taps: self.clone(),
            relays: Vec::new(),
        }
    }

    /// Ends session `id` on every proxy it was sent to.
    fn close(&self, id: u64) {
        if self.lock_sessions().remove(&id).is_none() {
            return;
        }
        for link in self.lock_links().values() {
            send(link, tap_command::Command::Stop(TapStop { session: id }));
        }
    }

    /// Passes an event to its session, within the session's rate.
    fn deliver(&self, session: u64, event: TapEvent) {
        let Some(sink) = self.lock_sessions().get(&session).cloned() else { return };
        sink.deliver(event);
    }

    /// Counts what a proxy could not send for every session it holds (it does not say
    /// which: its queue is shared).
    fn proxy_dropped(&self, dropped: u64) {
        for sink in self.lock_sessions().values() {
            sink.counts.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
    }

    /// Attaches a proxy's tap stream and starts the sessions that reach it.
    fn attach(&self, key: (String, String), commands: mpsc::Sender<Result<TapCommand, Status>>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let link = Link { id, commands };
        for sink in self.lock_sessions().values() {
            if let Some(filter) = &sink.start.filter {
                if reaches(filter, &key.0, &key.1) {
                    send(&link, tap_command::Command::Start(sink.start.clone()));
                }
            }
        }
        self.lock_links().insert(key, link);
        id
    }

    fn detach(&self, key: &(String, String), id: u64) {
        let mut links = self.lock_links();
        if links.get(key).is_some_and(|link| link.id == id) {
            links.remove(key);
        }
    }

    /// Sessions held now.
    pub fn session_count(&self) -> usize {
        self.lock_sessions().len()
    }
}

impl Sink {
    fn deliver(&self, event: TapEvent) {
        let admitted = self.bucket.lock().unwrap_or_else(|e| e.into_inner()).take(Instant::now());
        if !admitted {
            self.counts.limited.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match self.deliveries.try_send(Delivery::Event(Box::new(event))) {
            Ok(()) => self.counts.delivered.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.counts.dropped.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// A command to one proxy; a proxy too slow to take it misses it (its stream is
/// bounded, and a session must not wait on one proxy).
fn send(link: &Link, command: tap_command::Command) {
    if link.commands.try_send(Ok(TapCommand { command: Some(command) })).is_err() {
        tracing::warn!("a proxy's tap stream is full; it misses a session command");
    }
}

/// Whether a session with `filter` is sent to the proxy `namespace/proxy_id`: a
/// Service's session goes to every proxy (any may call it), a workload's to its own.
fn reaches(filter: &TapFilter, namespace: &str, proxy_id: &str) -> bool {
    match &filter.target {
        Some(tap_filter::Target::Workload(workload)) => {
            workload.split_once('/').is_some_and(|(ns, name)| ns == namespace && name == proxy_id)
        }
        Some(tap_filter::Target::Service(_)) => true,
        None => false,
    }
}

/// Whether the proxy of `record` is expected to see requests `filter` matches: the
/// Service's own workloads and the proxies whose view holds it; a workload's own proxy.
fn concerns(filter: &TapFilter, record: &crate::discovery::ProxyRecord) -> bool {
    match &filter.target {
        Some(tap_filter::Target::Workload(_)) => reaches(filter, &record.namespace, &record.proxy_id),
        Some(tap_filter::Target::Service(service)) => {
            record.service.as_ref().is_some_and(|own| format!("{}/{own}", record.namespace) == *service)
                || record.view_services.contains(service)
        }
        None => false,
    }
}

/// Opens `request` on this replica and relays it to every other replica; the returned
/// session delivers from all of them.
pub async fn open_mesh_wide(hub: &Arc<Hub>, request: &TapRequest) -> TapSession {
    let mut session = hub.taps.open(hub, request);
    let cluster = hub.registry.cluster();
    let replicas = cluster.replicas().await.unwrap_or_else(|error| {
        tracing::warn!(%error, "cannot list control-plane replicas; tapping this replica's proxies only");
        Vec::new()
    });
    for replica in replicas.into_iter().filter(|r| r.id != cluster.replica()) {
        let hub = hub.clone();
        let taps = hub.taps.clone();
        let id = session.id;
        let start = TapStart {
            session: id,
            filter: Some(request.filter.clone()),
            max_rps: request.max_rps,
            headers: request.headers.clone(),
        };
        session.relays.push(tokio::spawn(async move {
            let relayed = async {
                let channel = crate::replicas::dial(&hub, &replica.grpc).await?;
                let mut events = TapRelayClient::new(channel)
                    .relay(start)
                    .await
                    .map_err(|status| status.message().to_string())?
                    .into_inner();
                loop {
                    match events.message().await {
                        Ok(Some(mut event)) => {
                            event.session = id;
                            taps.deliver(id, event);
                        }
                        Ok(None) => return Err::<(), String>("it ended the relay".to_string()),
                        Err(status) => return Err(status.message().to_string()),
                    }
                }
            };
            if let Err(reason) = relayed.await {
                tracing::warn!(replica = %replica.id, %reason, "cannot tap the proxies of another replica");
                let notice = format!("replica {} ({}): {reason}; its proxies are not tapped", replica.id, replica.grpc);
                if let Some(sink) = taps.lock_sessions().get(&id) {
                    let _ = sink.deliveries.try_send(Delivery::Notice(notice));
                }
            }
        }));
    }
    session
}

/// Proxies' tap streams.
pub struct TapService {
    hub: Arc<Hub>,
}

impl TapService {
    pub fn new(hub: Arc<Hub>) -> Self {
        TapService { hub }
    }
}

type CommandStream = Pin<Box<dyn Stream<Item = Result<TapCommand, Status>> + Send>>;

#[tonic::async_trait]
impl Tap for TapService {
    type WatchStream = CommandStream;

    async fn watch(&self, request: Request<Streaming<ProxyTapMessage>>) -> Result<Response<Self::WatchStream>, Status> {
        let identity = request.extensions().get::<Peer>().and_then(|peer| peer.identity.clone());
        let identity = match identity {
            Some(identity) if !identity.is_control_plane() && identity.workload_parts().is_some() => identity,
            _ => return Err(Status::unauthenticated("a tap stream needs the proxy's workload certificate")),
        };
        let namespace = identity.workload_parts().expect("checked above").0.to_string();
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded(format!("no Hello within {HELLO_TIMEOUT:?}")))??;
        let hello = match first {
            Some(ProxyTapMessage { message: Some(proxy_tap_message::Message::Hello(hello)) }) => hello,
            _ => return Err(Status::invalid_argument("the first message on a tap stream must be Hello")),
        };
        self.hub.vouch(&namespace, &hello.proxy_id, &identity.to_string(), |_| ())?;
        let key = (namespace, hello.proxy_id);
        let (commands, receiver) = mpsc::channel(64);
        let link = self.hub.taps.attach(key.clone(), commands);
        let hub = self.hub.clone();
        tokio::spawn(async move {
            let proxy = format!("{}/{}", key.0, key.1);
            while let Ok(Some(message)) = inbound.message().await {
                let Some(proxy_tap_message::Message::Events(batch)) = message.message else { continue };
                if batch.dropped > 0 {
                    hub.taps.proxy_dropped(batch.dropped);
                }
                for mut event in batch.events {
                    event.proxy = proxy.clone();
                    hub.taps.deliver(event.session, event);
                }
            }
            hub.taps.detach(&key, link);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}

/// Other replicas' sessions, started on this replica's proxies.
pub struct TapRelayService {
    hub: Arc<Hub>,
}

impl TapRelayService {
    pub fn new(hub: Arc<Hub>) -> Self {
        TapRelayService { hub }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<TapEvent, Status>> + Send>>;

#[tonic::async_trait]
impl TapRelay for TapRelayService {
    type RelayStream = EventStream;

    async fn relay(&self, request: Request<TapStart>) -> Result<Response<Self::RelayStream>, Status> {
        crate::replicas::require_replica(&self.hub, request.extensions(), "a tap of this replica's proxies")?;
        let start = request.into_inner();
        let filter = start.filter.ok_or_else(|| Status::invalid_argument("a relayed tap needs its filter"))?;
        if !(start.max_rps.is_finite() && start.max_rps > 0.0) {
            return Err(Status::invalid_argument("a relayed tap needs a positive rate"));
        }
        let request = TapRequest { filter, max_rps: start.max_rps, headers: start.headers };
        let mut session = self.hub.taps.open(&self.hub, &request);
        let (events, receiver) = mpsc::channel(SESSION_QUEUE);
        tokio::spawn(async move {
            // The session lives as long as the asking replica reads.
            loop {
                tokio::select! {
                    delivery = session.deliveries.recv() => match delivery {
                        Some(Delivery::Event(event)) => {
                            if events.send(Ok(*event)).await.is_err() {
                                break;
                            }
                        }
                        Some(Delivery::Notice(_)) => {}
                        None => break,
                    },
                    () = events.closed() => break,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}

/// An event as the API shows it: typed JSON, `why` holding the mesh's decisions.
pub fn event_json(event: &TapEvent) -> serde_json::Value {
    use serde_json::{json, Value};
    let text = |s: &str| if s.is_empty() { Value::Null } else { Value::from(s) };
    let millis = |micros: u64| micros as f64 / 1000.0;
    let direction = match event.direction {
        1 => "outbound",
        2 => "inbound",
        _ => "unknown",
    };
    let mut headers = serde_json::Map::new();
    for header in &event.headers {
        match headers.get_mut(&header.name) {
            Some(Value::Array(values)) => values.push(Value::from(header.value.clone())),
            Some(first) => *first = json!([first.clone(), header.value]),
            None => {
                headers.insert(header.name.clone(), Value::from(header.value.clone()));
            }
        }
    }
    let tries: Vec<Value> = event
        .tries
        .iter()
        .map(|t| {
            json!({
                "number": t.number,
                "endpoint": text(&t.endpoint),
                "identity": text(&t.identity),
                "estimateMs": millis(t.estimate_micros),
                "inFlight": t.in_flight,
                "skippedEjected": t.skipped_ejected,
                "status": if t.status == 0 { Value::Null } else { Value::from(t.status) },
                "error": text(&t.error),
                "durationMs": millis(t.duration_micros),
                "then": t.then,
                "budgetLeft": if t.then == "retried" { Value::from(t.budget_left) } else { Value::Null },
                "ejectedMs": if t.ejected_millis == 0 { Value::Null } else { Value::from(t.ejected_millis) },
            })
        })
        .collect();
    let authz = if event.authz.is_empty() {
        Value::Null
    } else {
        json!({"verdict": event.authz, "policy": text(&event.authz_policy)})
    };
    json!({
        "session": event.session,
        "time": weft_identity::rfc3339_millis(event.unix_millis),
        "unixMillis": event.unix_millis,
        "direction": direction,
        "proxy": text(&event.proxy),
        "source": {"identity": text(&event.source_identity), "service": text(&event.source_service)},
        "destination": {"identity": text(&event.destination_identity), "service": text(&event.destination_service)},
        "method": event.method,
        "authority": event.authority,
        "path": event.path,
        "status": event.status,
        "grpcStatus": if event.grpc_status < 0 { Value::Null } else { Value::from(event.grpc_status) },
        "error": text(&event.error),
        "durationMs": millis(event.duration_micros),
        "bytesIn": event.bytes_in,
        "bytesOut": event.bytes_out,
        "tls": event.tls,
        "traceId": text(&event.trace_id),
        "headers": headers,
        "why": {
            "route": text(&event.route),
            "httpRoute": text(&event.http_route),
            "backend": text(&event.backend),
            "backendWeight": if event.total_weight == 0 { Value::Null } else { Value::from(event.backend_weight) },
            "totalWeight": if event.total_weight == 0 { Value::Null } else { Value::from(event.total_weight) },
            "endpoint": text(&event.endpoint),
            "tries": tries,
            "authz": authz,
            "error": text(&event.error),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(target: tap_filter::Target) -> TapFilter {
        TapFilter { target: Some(target), ..TapFilter::default() }
    }

    #[test]
    fn a_service_session_reaches_every_proxy_and_a_workload_session_its_own() {
        let service = filter(tap_filter::Target::Service("shop/reviews".into()));
        assert!(reaches(&service, "shop", "front-1"));
        assert!(reaches(&service, "other", "x"));
        let workload = filter(tap_filter::Target::Workload("shop/front-1".into()));
        assert!(reaches(&workload, "shop", "front-1"));
        assert!(!reaches(&workload, "shop", "front-2"));
        assert!(!reaches(&workload, "other", "front-1"));
        assert!(!reaches(&TapFilter::default(), "shop", "front-1"));
    }

    #[test]
    fn a_session_delivers_within_its_rate_and_counts_the_rest() {
        let (deliveries, mut receiver) = mpsc::channel(16);
        let sink = Sink {
            start: TapStart::default(),
            deliveries,
            bucket: Mutex::new(TokenBucket::new(3.0, Instant::now())),
            counts: Arc::default(),
        };
        for _ in 0..10 {
            sink.deliver(TapEvent::default());
        }
        let mut received = 0;
        while receiver.try_recv().is_ok() {
            received += 1;
        }
        assert_eq!(received, 3);
        assert_eq!(sink.counts.delivered.load(Ordering::Relaxed), 3);
        assert_eq!(sink.counts.limited.load(Ordering::Relaxed), 7);
    }

    #[test]
    fn events_render_as_typed_json_with_why() {
        let event = TapEvent {
            direction: 1,
            method: "GET".into(),
            status: 503,
            grpc_status: -1,
            route: "HTTPRoute/shop/split".into(),
            backend: "shop/reviews-v2".into(),
            backend_weight: 10,
            total_weight: 100,
            tries: vec![weft_api::tap::TapTry {
                number: 1,
                endpoint: "127.0.0.1:1".into(),
                status: 503,
                then: "retried".into(),
                budget_left: 4,
                duration_micros: 1500,
                ..Default::default()
            }],
            headers: vec![
                weft_api::tap::Header { name: "x-a".into(), value: "1".into() },
                weft_api::tap::Header { name: "x-a".into(), value: "2".into() },
            ],
            ..TapEvent::default()
        };
        let json = event_json(&event);
        assert_eq!(json["direction"], "outbound");
        assert_eq!(json["status"], 503);
        assert_eq!(json["grpcStatus"], serde_json::Value::Null);
        assert_eq!(json["why"]["backendWeight"], 10);
        assert_eq!(json["why"]["tries"][0]["then"], "retried");
        assert_eq!(json["why"]["tries"][0]["budgetLeft"], 4);
        assert_eq!(json["why"]["tries"][0]["durationMs"], 1.5);
        assert_eq!(json["headers"]["x-a"], serde_json::json!(["1", "2"]));
        assert_eq!(json["why"]["authz"], serde_json::Value::Null);
    }
}
