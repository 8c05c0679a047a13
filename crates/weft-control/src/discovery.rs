//! The discovery server: one gRPC stream per proxy, carrying versioned views down and
//! ACKs, NACKs, registrations, subscriptions and health up.
//!
//! [`Hub`] keeps the current [`World`] (desired state plus registrations), rebuilt on
//! every change, and a record of every connected proxy for `weft get proxies`. Each
//! stream recomputes its proxy's view when the world changes and pushes it only if it
//! differs from what that proxy last got.

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::{Hash, Hasher},
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{Request, Response, Status, Streaming};
use weft_api::discovery::{
    control_message, discovery_server::Discovery, proxy_message, Config, ControlMessage, ProxyMessage,
};

use weft_identity::SpiffeId;

use crate::{
    ca::{CaKeeper, CaState},
    catalog::Catalog,
    control_tls::Peer,
    registry::{Health, Registration, Registry},
    views::World,
};

/// At most this many services per proxy: subscriptions come from Host headers, which
/// the proxy's callers control.
const MAX_SUBSCRIPTIONS: usize = 10_000;

/// What `weft get proxies` shows of one proxy.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyRecord {
    pub proxy_id: String,
    pub namespace: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    pub proxy_version: String,
    /// The control-plane replica holding this proxy's stream.
    pub control_plane: String,
    /// Seconds since the Unix epoch when this stream opened.
    pub connected_at: u64,
    pub subscriptions: usize,
    /// The last version pushed, and the last the proxy acknowledged.
    pub sent_version: String,
    pub applied_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_nack: Option<String>,
    /// The SPIFFE ID its certificate proved on this stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// The certificate it says it presents now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateRecord>,
    /// Where its admin listener (`/metrics`) is reached, for Prometheus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_address: Option<String>,
    /// Which stream holds the record: a proxy that reconnects opens a new stream before
    /// the old one has ended, and the old one must not remove the new one's record.
    #[serde(skip)]
    pub stream: u64,
    /// The sequence number of the last telemetry report merged from it: a report sent
    /// again (its reply was lost) is merged once.
    #[serde(skip)]
    pub last_report: u64,
    /// The Services its last pushed view was built for (tap: whom a Service's callers
    /// are).
    #[serde(skip)]
    pub view_services: Arc<BTreeSet<String>>,
    /// The Services it subscribed to (`namespace/name`, those that do not exist yet
    /// included): with its own Service, what its view is computed from (a dry run's
    /// preview computes it again over the changed state).
    #[serde(skip)]
    pub subscribed: Arc<BTreeSet<String>>,
}

/// A proxy's current certificate, as it reports it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateRecord {
    pub serial: String,
    pub issuer: String,
    /// Seconds since the Unix epoch: when the proxy received it, and its expiry.
    pub received: u64,
    pub not_after: u64,
}

/// The shared state of every discovery stream.
pub struct Hub {
    pub catalog: Arc<Catalog>,
    pub registry: Arc<Registry>,
    /// The mesh's CA, and the trust bundle pushed to every proxy; replaced when a root
    /// rotation starts or ends (on any replica).
    ca: ArcSwap<CaState>,
    pub keeper: CaKeeper,
    ca_revision: Mutex<Option<u64>>,
    /// The control plane's own certificate, re-issued when the CA changes.
    pub control_credentials: std::sync::OnceLock<Arc<weft_identity::tls::Credentials>>,
    /// The HTTPS API's certificate, re-issued when the CA changes (if the mesh CA's).
    pub api_certificate: std::sync::OnceLock<Arc<crate::api_tls::ApiCertificate>>,
    /// How long workload certificates last (`--cert-lifetime`).
    pub cert_lifetime: Duration,
    world: ArcSwap<World>,
    world_changed: watch::Sender<u64>,
    /// Connected proxies by (namespace, proxy id).
    proxies: Mutex<BTreeMap<ProxyKey, ProxyRecord>>,
    next_stream: std::sync::atomic::AtomicU64,
    /// What the control plane refused, for its `/metrics`.
    pub metrics: crate::metrics::ControlMetrics,
    /// The golden signals this replica's proxies reported.
    pub aggregator: crate::telemetry::Aggregator,
    /// Proxies' tap streams and the tap sessions this replica holds.
    pub taps: Arc<crate::tap::TapHub>,
}

/// A proxy's (namespace, id): ids are unique per namespace, as Workload names are.
type ProxyKey = (String, String);

impl Hub {
    /// A hub over `catalog` and `registry`, with its world built once.
    pub fn new(
        catalog: Arc<Catalog>,
        registry: Arc<Registry>,
        ca: CaState,
        keeper: CaKeeper,
        cert_lifetime: Duration,
    ) -> Arc<Self> {
        let world = build_world(&catalog, &registry, &crate::virtual_ips::records(&catalog));
        let metrics = crate::metrics::ControlMetrics::new(catalog.commit_histogram());
        let (world_changed, _) = watch::channel(0);
        let ca_revision = Mutex::new(keeper.revision(&catalog));
        Arc::new(Hub {
            catalog,
            registry,
            ca: ArcSwap::from_pointee(ca),
            keeper,
            ca_revision,
            control_credentials: std::sync::OnceLock::new(),
            api_certificate: std::sync::OnceLock::new(),
            cert_lifetime,
            world: ArcSwap::from_pointee(world),
            world_changed,
            proxies: Mutex::default(),
            next_stream: std::sync::atomic::AtomicU64::new(1),
            metrics,
            aggregator: crate::telemetry::Aggregator::default(),
            taps: Arc::default(),
        })
    }

    /// Who sent a telemetry report for `proxy_id`: the proxy that [`Hub::vouch`] finds.
    /// `Ok(None)`: a report already merged (its `sequence` is not newer than the last).
    pub fn telemetry_reporter(
        &self,
        namespace: &str,
        proxy_id: &str,
        identity: &str,
        sequence: u64,
    ) -> Result<Option<crate::telemetry::series::Reporter>, Status> {
        self.vouch(namespace, proxy_id, identity, |record| {
            if sequence != 0 && sequence <= record.last_report {
                return None;
            }
            record.last_report = sequence;
            Some(crate::telemetry::series::Reporter {
                workload: format!("{namespace}/{proxy_id}"),
                service: record.service.as_ref().map(|service| format!("{namespace}/{service}")),
                identity: identity.to_string(),
            })
        })
    }

    /// Runs `with` on the record of the proxy of `namespace` called `proxy_id` whose
    /// discovery stream this replica holds, if it is `identity`: a proxy's side calls
    /// (telemetry, tap) are taken only from the proxy itself, and only where its view
    /// comes from.
    pub fn vouch<T>(
        &self,
        namespace: &str,
        proxy_id: &str,
        identity: &str,
        with: impl FnOnce(&mut ProxyRecord) -> T,
    ) -> Result<T, Status> {
        let mut proxies = self.lock_proxies();
        let record = proxies.get_mut(&(namespace.to_string(), proxy_id.to_string())).ok_or_else(|| {
            Status::failed_precondition(format!(
                "proxy {namespace}/{proxy_id} has no discovery stream on this replica; call where the stream is"
            ))
        })?;
        if record.identity.as_deref() != Some(identity) {
            return Err(Status::permission_denied(format!(
                "proxy {namespace}/{proxy_id} is {}; this is {identity}",
                record.identity.as_deref().unwrap_or("?")
            )));
        }
        Ok(with(record))
    }

    /// Proxies whose discovery streams this replica holds.
    pub fn local_proxy_count(&self) -> usize {
        self.lock_proxies().len()
    }

    /// The CA in use.
    pub fn ca(&self) -> Arc<CaState> {
        self.ca.load_full()
    }

    /// SHA-256 of every root this mesh trusts now or trusted before a finished rotation:
    /// an operator token made under any of them is this mesh's.
    pub fn known_root_hashes(&self) -> Vec<String> {
        self.ca.load().known_root_hashes()
    }

    /// The mesh's roots (PEM), pushed to every proxy.
    pub fn trust_bundle(&self) -> String {
        self.ca.load().bundle_pem.clone()
    }

    /// Puts `ca` in use: signing, the control plane's own certificate, and the bundle
    /// pushed to every proxy.
    pub fn install_ca(&self, ca: CaState) {
        let roots = ca.root_hashes();
        if let Some(credentials) = self.control_credentials.get() {
            match crate::control_tls::issue_control_certificate(&ca, crate::control_tls::CONTROL_CERT_LIFETIME) {
                Ok(issued) => credentials.replace(issued),
                Err(error) => tracing::error!(%error, "cannot re-issue the control plane's certificate"),
            }
        }
        if let Some(certificate) = self.api_certificate.get() {
            certificate.reissue(&ca);
        }
        self.ca.store(Arc::new(ca));
        *self.ca_revision.lock().unwrap_or_else(|e| e.into_inner()) = self.keeper.revision(&self.catalog);
        tracing::info!(?roots, "the CA changed; pushing the new trust bundle");
        self.world_changed.send_modify(|g| *g += 1);
    }

    /// Follows a CA changed in the store by another replica.
    fn follow_ca(&self) {
        let revision = self.keeper.revision(&self.catalog);
        if revision == *self.ca_revision.lock().unwrap_or_else(|e| e.into_inner()) {
            return;
        }
        match self.keeper.current(&self.catalog) {
            Some(Ok(ca)) => self.install_ca(ca),
            Some(Err(error)) => {
                tracing::error!(%error, "the stored CA changed but cannot be read; signing with the previous one")
            }
            None => {}
        }
    }

    /// The current world.
    pub fn world(&self) -> Arc<World> {
        self.world.load_full()
    }

    /// Every connected proxy.
    pub fn proxies(&self) -> Vec<ProxyRecord> {
        self.lock_proxies().values().cloned().collect()
    }

    fn lock_proxies(&self) -> std::sync::MutexGuard<'_, BTreeMap<ProxyKey, ProxyRecord>> {
        self.proxies.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, key: &ProxyKey, stream: u64, change: impl FnOnce(&mut ProxyRecord)) {
        if let Some(record) = self.lock_proxies().get_mut(key).filter(|r| r.stream == stream) {
            change(record);
        }
    }

    /// Records a new stream for `record`'s proxy, if its identity may hold that proxy id:
    /// a registration, a connected proxy and a declared Workload of that name each belong
    /// to whoever made them, and no other identity may take, overwrite or remove them.
    /// The check and the record are one step under the lock, so two streams racing for
    /// one id cannot both pass. Returns the stream's number.
    fn claim_proxy(&self, mut record: ProxyRecord) -> Result<u64, Status> {
        let identity = record.identity.clone().unwrap_or_default();
        let key = (record.namespace.clone(), record.proxy_id.clone());
        let mut proxies = self.lock_proxies();
        let taken_by = |owner: Option<&str>| owner.is_some_and(|owner| owner != identity);
        let refusal = |what: &str| {
            Status::permission_denied(format!(
                "proxy id {} in namespace {} is {what}; this proxy is {identity}: give it another --id",
                record.proxy_id, record.namespace
            ))
        };
        if let Some(live) = proxies.get(&key).filter(|live| taken_by(live.identity.as_deref())) {
            return Err(refusal(&format!("connected as {}", live.identity.as_deref().unwrap_or("?"))));
        }
        let stored = self.catalog.registration(&crate::catalog::registration_key(&key.0, &key.1));
        if let Some(stored) = stored.filter(|stored| taken_by(stored.identity.as_deref())) {
            return Err(refusal(&format!(
                "registered by {}",
                stored.identity.as_deref().unwrap_or("an unmeshed proxy")
            )));
        }
        let declared = crate::store::ObjectKey::new(weft_model::ResourceKind::Workload, &key.0, &key.1);
        if self.catalog.get(&declared).is_some() {
            return Err(refusal("the name of a declared Workload resource"));
        }
        record.stream = self.next_stream.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stream = record.stream;
        proxies.insert(key, record);
        Ok(stream)
    }

    /// Rebuilds the world whenever the catalog changes (registrations and their health are
    /// stored, so they change it too); every second, notes detached registrations and, on
    /// the leader, expires lapsed ones. Runs until the process ends.
    pub async fn maintain(self: Arc<Self>) {
        let mut catalog_changed = self.catalog.subscribe();
        // Services that have no stored address yet (made before this release, or while
        // no control plane ran) get one now.
        crate::virtual_ips::settle(&self.catalog, &self.world(), &crate::virtual_ips::records(&self.catalog)).await;
        let mut sweep = tokio::time::interval(Duration::from_secs(1));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                changed = catalog_changed.changed() => if changed.is_err() { return },
                _ = sweep.tick() => {
                    for expired in self.registry.sweep(Instant::now()).await {
                        tracing::info!(proxy_id = %expired.name, namespace = %expired.namespace, "lease lapsed: endpoint removed");
                    }
                    continue;
                }
            }
            self.follow_ca();
            let records = crate::virtual_ips::records(&self.catalog);
            let world = Arc::new(build_world(&self.catalog, &self.registry, &records));
            self.world.store(world.clone());
            self.world_changed.send_modify(|g| *g += 1);
            // Derived virtual IPs are stored; the commit comes back as a change and the
            // world is built again, the same but for where its addresses came from.
            crate::virtual_ips::settle(&self.catalog, &world, &records).await;
        }
    }
}

/// The world as of now. `records` are read before the documents, so that every Service
/// a record names is among them unless it was deleted since.
fn build_world(catalog: &Catalog, registry: &Registry, records: &[crate::virtual_ips::VirtualIpRecord]) -> World {
    let (_, documents) = catalog.documents();
    World::new(documents, &registry.entries(), &crate::virtual_ips::stored(records))
}

/// The tonic service.
pub struct DiscoveryService {
    hub: Arc<Hub>,
}

impl DiscoveryService {
    pub fn new(hub: Arc<Hub>) -> Self {
        DiscoveryService { hub }
    }
}

type ControlStream = Pin<Box<dyn Stream<Item = Result<ControlMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type StreamStream = ControlStream;

    async fn stream(&self, request: Request<Streaming<ProxyMessage>>) -> Result<Response<Self::StreamStream>, Status> {
        let opened = self.open_stream(request).await;
        if let Err(status) = &opened {
            tracing::info!(%status, "refused a discovery stream");
            self.hub.metrics.discovery_refused("refused_hello");
        }
        opened
    }
}

/// How long a new discovery stream may take to send its Hello; a stream that sends
/// nothing must not hold a task for ever.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

impl DiscoveryService {
    /// Checks the peer and its Hello, claims the proxy's record and starts serving it.
    async fn open_stream(&self, request: Request<Streaming<ProxyMessage>>) -> Result<Response<ControlStream>, Status> {
        let serial = request.extensions().get::<Peer>().and_then(|peer| peer.serial.clone());
        let identity = request.extensions().get::<Peer>().and_then(|peer| peer.identity.clone());
        let identity =
            match identity {
                Some(identity) if !identity.is_control_plane() && identity.workload_parts().is_some() => identity,
                _ => return Err(Status::unauthenticated(
                    "the discovery stream needs the proxy's workload certificate: start the proxy with --token-file",
                )),
            };
        if crate::revocations::current(&self.hub.catalog).refuses(Some(&identity.to_string()), serial.as_deref()) {
            return Err(Status::permission_denied(format!(
                "{identity} (certificate {}) is revoked: see weft revoke list",
                serial.as_deref().unwrap_or("?")
            )));
        }
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded(format!("no Hello within {HELLO_TIMEOUT:?}")))?;
        let hello = match first? {
            Some(ProxyMessage { message: Some(proxy_message::Message::Hello(hello)) }) => hello,
            _ => return Err(Status::invalid_argument("the first message on a discovery stream must be Hello")),
        };
        if hello.proxy_id.is_empty() {
            return Err(Status::invalid_argument("Hello needs a proxy_id"));
        }
        let (namespace, account) = identity.workload_parts().expect("checked above");
        let asked = if hello.namespace.is_empty() { weft_model::DEFAULT_NAMESPACE } else { &hello.namespace };
        if asked != namespace {
            return Err(Status::permission_denied(format!(
                "this proxy is {identity}, so it belongs to namespace {namespace}, not {asked}: check --namespace"
            )));
        }
        if let Some(workload) = hello.workload.as_ref().filter(|w| w.service != account) {
            return Err(Status::permission_denied(format!(
                "this proxy is {identity}, so it may register service {account}, not {}: use a join token made with \
                 weft token create --service {}",
                workload.service, workload.service
            )));
        }
        let namespace = asked.to_string();
        let registration = match hello.workload.as_ref() {
            Some(workload) => {
                Some(registration(&hello.proxy_id, &namespace, workload, &identity).map_err(Status::invalid_argument)?)
            }
            None => None,
        };
        let stream = self.hub.claim_proxy(ProxyRecord {
            proxy_id: hello.proxy_id.clone(),
            namespace: namespace.clone(),
            service: registration.as_ref().map(|r| r.service.clone()),
            address: registration.as_ref().map(|r| r.address.clone()),
            proxy_version: hello.proxy_version.clone(),
            control_plane: self.hub.registry.cluster().replica().to_string(),
            connected_at: weft_identity::unix_seconds(SystemTime::now()),
            subscriptions: hello.subscriptions.len(),
            sent_version: String::new(),
            applied_version: hello.serving_version.clone(),
            last_nack: None,
            identity: Some(identity.to_string()),
            certificate: None,
            admin_address: (!hello.admin_address.is_empty()).then(|| hello.admin_address.clone()),
            stream: 0,
            last_report: 0,
            view_services: Arc::default(),
            subscribed: Arc::new(hello.subscriptions.iter().filter(|s| s.contains('/')).cloned().collect()),
        })?;
        let (sender, receiver) = mpsc::channel(4);
        let hub = self.hub.clone();
        let key = (namespace, hello.proxy_id.clone());
        tokio::spawn(async move {
            let peer = (identity.to_string(), serial);
            if let Err(error) = serve_proxy(hub, hello, key, stream, registration, peer, inbound, sender).await {
                tracing::debug!(%error, "discovery stream ended");
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}

/// Serves one proxy's stream, whose record `claim_proxy` made (`stream`), for the peer
/// `(identity, certificate serial)`; ends it if the operator revokes either.
#[allow(clippy::too_many_arguments)]
async fn serve_proxy(
    hub: Arc<Hub>,
    hello: weft_api::discovery::Hello,
    key: ProxyKey,
    stream: u64,
    registration: Option<Registration>,
    (identity, serial): (String, Option<String>),
    mut inbound: Streaming<ProxyMessage>,
    sender: mpsc::Sender<Result<ControlMessage, Status>>,
) -> Result<(), Status> {
    let proxy_id = key.1.clone();
    let own = registration.as_ref().map(|r| format!("{}/{}", r.namespace, r.service));
    let mut attached = match &registration {
        Some(registration) => {
            tracing::info!(%proxy_id, service = %registration.service, address = %registration.address, "workload registered");
            Some(hub.registry.attach(registration.clone()).await)
        }
        None => None,
    };
    let mut subscriptions: BTreeSet<String> = hello.subscriptions.iter().filter(|s| s.contains('/')).cloned().collect();
    let mut world_changed = hub.world_changed.subscribe();
    let mut last_sent: Option<u64> = None;
    let mut nonce = 0u64;
    // When the push awaiting an answer went out, by nonce: push → ACK latency.
    let mut awaiting: Option<(String, Instant)> = None;
    let mut goodbye = false;
    let result = loop {
        let view = hub.world().view(own.as_deref(), &subscriptions);
        let trust_bundle = hub.trust_bundle();
        let revoked = crate::revocations::current(&hub.catalog);
        if revoked.refuses(Some(&identity), serial.as_deref()) {
            tracing::warn!(%proxy_id, %identity, "closing the discovery stream of a revoked proxy");
            hub.metrics.discovery_refused("revoked");
            break Err(Status::permission_denied(format!(
                "{identity} (certificate {}) is revoked: see weft revoke list",
                serial.as_deref().unwrap_or("?")
            )));
        }
        let digest = digest(&view.text, &view.missing, &trust_bundle, &revoked);
        if last_sent != Some(digest) {
            nonce += 1;
            let version = format!("{digest:016x}");
            let config = Config {
                version: version.clone(),
                nonce: nonce.to_string(),
                resources: view.text,
                missing: view.missing,
                lease_seconds: hub.registry.lease().as_secs() as u32,
                trust_bundle,
                revocations: Some(weft_api::discovery::Revocations {
                    identities: revoked.identities.into_iter().collect(),
                    serials: revoked.serials.into_iter().collect(),
                }),
            };
            if sender
                .send(Ok(ControlMessage { message: Some(control_message::Message::Config(config)) }))
                .await
                .is_err()
            {
                break Ok(());
            }
            let services = Arc::new(view.services);
            hub.update(&key, stream, |r| {
                r.sent_version = version;
                r.view_services = services;
            });
            awaiting = Some((nonce.to_string(), Instant::now()));
            last_sent = Some(digest);
        }
        tokio::select! {
            changed = world_changed.changed() => if changed.is_err() { break Ok(()) },
            message = inbound.message() => match message {
                Ok(Some(ProxyMessage { message: Some(message) })) => match message {
                    proxy_message::Message::Ack(ack) => {
                        if let Some((_, sent)) = awaiting.take_if(|(nonce, _)| *nonce == ack.nonce) {
                            hub.metrics.push_acked(sent.elapsed());
                        }
                        hub.update(&key, stream, |r| r.applied_version = ack.version)
                    }
                    proxy_message::Message::Nack(nack) => {
                        hub.metrics.nacks.inc();
                        tracing::warn!(%proxy_id, version = %nack.version, error = %nack.error, "proxy refused a configuration");
                        hub.update(&key, stream, |r| r.last_nack = Some(format!("{}: {}", nack.version, nack.error)));
                    }
                    proxy_message::Message::Subscribe(subscribe) => {
                        for service in subscribe.services {
                            if subscriptions.len() < MAX_SUBSCRIPTIONS && service.contains('/') {
                                subscriptions.insert(service);
                            }
                        }
                        let count = subscriptions.len();
                        let subscribed = Arc::new(subscriptions.clone());
                        hub.update(&key, stream, |r| {
                            r.subscriptions = count;
                            r.subscribed = subscribed;
                        });
                    }
                    proxy_message::Message::Health(health) => {
                        if let Some(attached) = attached.as_mut() {
                            hub.registry.set_health(attached, health.healthy, health.detail);
                        }
                    }
                    proxy_message::Message::Certificate(certificate) => hub.update(&key, stream, |r| {
                        r.certificate = Some(CertificateRecord {
                            serial: certificate.serial,
                            issuer: certificate.issuer,
                            received: certificate.received,
                            not_after: certificate.not_after,
                        })
                    }),
                    proxy_message::Message::Goodbye(_) => {
                        goodbye = true;
                        break Ok(());
                    }
                    proxy_message::Message::Hello(_) => {
                        hub.metrics.discovery_refused("bad_message");
                        break Err(Status::invalid_argument("Hello is sent once per stream"));
                    }
                },
                Ok(Some(ProxyMessage { message: None })) => {}
                Ok(None) => break Ok(()),
                // Undecodable or oversized messages; a stream the proxy reset is not one.
                Err(status) => {
                    if status.code() != tonic::Code::Cancelled && status.code() != tonic::Code::Unknown {
                        tracing::info!(%proxy_id, %status, "ended a discovery stream that sent a bad message");
                        hub.metrics.discovery_refused("bad_message");
                    }
                    break Err(status);
                }
            },
        }
    };
    {
        let mut proxies = hub.lock_proxies();
        if proxies.get(&key).is_some_and(|r| r.stream == stream) {
            proxies.remove(&key);
            hub.aggregator.forget_endpoints(&format!("{}/{}", key.0, key.1));
        }
    }
    if let Some(attached) = attached {
        hub.registry.detach(attached, goodbye).await;
        if goodbye {
            tracing::info!(%proxy_id, "proxy stopped cleanly: endpoint removed");
        } else {
            tracing::info!(%proxy_id, lease = ?hub.registry.lease(), "proxy disconnected: its endpoint stays until the lease lapses");
        }
    }
    // The proxy is told why its stream ends (when it still reads): a revocation, a bad
    // message.
    if let Err(status) = &result {
        let _ = sender.try_send(Err(status.clone()));
    }
    result
}

fn registration(
    proxy_id: &str,
    namespace: &str,
    workload: &weft_api::discovery::Workload,
    identity: &SpiffeId,
) -> Result<Registration, String> {
    if workload.service.is_empty() {
        return Err("a registered workload needs its service".into());
    }
    let mut labels: BTreeMap<String, String> = workload.labels.clone().into_iter().collect();
    labels.insert("app".into(), workload.service.clone());
    let port = u16::try_from(workload.service_port).map_err(|_| "service_port must be 1-65535".to_string())?;
    Ok(Registration {
        proxy_id: proxy_id.to_string(),
        namespace: namespace.to_string(),
        service: workload.service.clone(),
        labels,
        address: workload.address.clone(),
        zone: (!workload.zone.is_empty()).then(|| workload.zone.clone()),
        weight: if workload.weight == 0 { 1 } else { workload.weight },
        protocol: if workload.protocol.is_empty() { "http".into() } else { workload.protocol.clone() },
        service_port: if port == 0 { 80 } else { port },
        health: Health::not_reported(),
        identity: Some(identity.to_string()),
    })
}

fn digest(text: &str, missing: &[String], trust_bundle: &str, revoked: &crate::revocations::RevocationList) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    missing.hash(&mut hasher);
    trust_bundle.hash(&mut hasher);
    revoked.hash(&mut hasher);
    hasher.finish()
}
