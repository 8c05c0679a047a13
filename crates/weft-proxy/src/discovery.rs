//! The proxy's side of the discovery stream (`--control`): registers this proxy's
//! workload, receives versioned views and ACKs or NACKs each one, subscribes to services
//! as the application first calls them, and reports the application's health.
//!
//! A proxy that cannot reach any control plane keeps serving on its last good view and
//! reconnects with backoff, trying each `--control` address in turn. A NACKed view
//! changes nothing. A view that would suddenly take a service port below half of its
//! endpoints is held back for one lease period, serving the endpoints it had (the panic
//! threshold): a control plane that lost its registrations, or a burst of lease expiries,
//! must not empty the mesh.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::revocation::Revoked;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use weft_api::discovery::{
    control_message, discovery_client::DiscoveryClient, proxy_message, Ack, Config, Goodbye, Health, Hello, Nack,
    ProxyMessage, Subscribe, Workload,
};
use weft_model::{compile, parse_documents, snapshot::HostLookupError, Snapshot};

use crate::state::SharedState;

/// A port keeps its endpoints when a view would leave fewer than this share of them.
pub const PANIC_THRESHOLD: f64 = 0.5;
/// How long a request for a service not seen before waits for the control plane's view.
pub const DISCOVERY_WAIT: Duration = Duration::from_secs(3);

/// What this proxy registers.
#[derive(Clone, Debug)]
pub struct Registration {
    pub service: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub address: std::net::SocketAddr,
    pub zone: Option<String>,
    pub weight: u32,
    pub protocol: String,
    pub service_port: u16,
}

/// Discovery settings of a proxy.
#[derive(Clone, Debug)]
pub struct ControlSettings {
    /// Control-plane discovery addresses, tried in turn.
    pub addresses: Vec<String>,
    /// This proxy's id: unique per process, and its workload's name.
    pub proxy_id: String,
    pub registration: Option<Registration>,
    /// The join token and the identity this proxy asks for.
    pub identity: crate::identity::IdentitySettings,
}

enum Outgoing {
    Subscribe(Vec<String>),
    Health(bool, String),
}

/// The data path's handle on discovery.
pub struct DiscoveryHandle {
    outgoing: mpsc::UnboundedSender<Outgoing>,
    subscribed: Mutex<BTreeSet<String>>,
    missing: Mutex<BTreeSet<String>>,
    /// Bumped after every view applied (or refused), so waiting requests look again.
    applied: watch::Sender<u64>,
    health: watch::Sender<(bool, String)>,
    /// The mesh's root certificates (PEM), as the control plane last pushed them: what
    /// peers' workload certificates must chain to.
    trust_bundle: Mutex<String>,
}

impl DiscoveryHandle {
    /// The trust bundle last received (PEM; empty before the first view).
    pub fn trust_bundle(&self) -> String {
        self.trust_bundle.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Makes sure the services `authority` may name are subscribed, and waits (at most
    /// [`DISCOVERY_WAIT`]) until the view has them or the control plane says they do not
    /// exist. Returns at once for names already known to be missing.
    pub async fn discover(&self, state: &SharedState, authority: &str) {
        let candidates = candidates(authority, &state.settings.namespace);
        let known =
            |snapshot: &weft_model::Snapshot| snapshot.lookup_host(authority) != Err(HostLookupError::UnknownHost);
        self.subscribe_and_wait(state, candidates, known).await;
    }

    /// [`Self::discover`] for a DNS name: waits until the view has the Service it names.
    pub async fn discover_name(&self, state: &SharedState, name: &str) {
        let candidates = candidates(name, &state.settings.namespace);
        self.subscribe_and_wait(state, candidates, |snapshot| snapshot.service_by_host(name).is_some()).await;
    }

    /// Subscribes to whatever is reached at `address` (a captured connection's original
    /// destination: a virtual IP or a workload's address), and waits until the view has
    /// it or the control plane says nothing is there.
    pub async fn discover_address(&self, state: &SharedState, address: std::net::SocketAddr) {
        let key = format!("ip/{}", address.ip());
        let known = |snapshot: &weft_model::Snapshot| {
            snapshot.lookup_destination(address) != Err(weft_model::snapshot::DestinationError::Unknown)
        };
        self.subscribe_and_wait(state, vec![key], known).await;
    }

    async fn subscribe_and_wait(
        &self,
        state: &SharedState,
        candidates: Vec<String>,
        known: impl Fn(&weft_model::Snapshot) -> bool,
    ) {
        let fresh: Vec<String> = {
            let mut subscribed = self.subscribed.lock().unwrap_or_else(|e| e.into_inner());
            candidates.iter().filter(|c| subscribed.insert((*c).clone())).cloned().collect()
        };
        if !fresh.is_empty() {
            let _ = self.outgoing.send(Outgoing::Subscribe(fresh));
        }
        let mut applied = self.applied.subscribe();
        let deadline = tokio::time::Instant::now() + DISCOVERY_WAIT;
        loop {
            let known = known(&state.config.load().snapshot);
            let all_missing = {
                let missing = self.missing.lock().unwrap_or_else(|e| e.into_inner());
                candidates.iter().all(|c| missing.contains(c))
            };
            if known || all_missing {
                return;
            }
            if tokio::time::timeout_at(deadline, applied.changed()).await.is_err() {
                return;
            }
        }
    }

    /// The services subscribed so far (`namespace/name`), for `/config`.
    pub fn subscriptions(&self) -> Vec<String> {
        self.subscribed.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }

    /// Reports the local application's health (sent now, and again on reconnect).
    pub fn report_health(&self, healthy: bool, detail: String) {
        let changed = self.health.send_if_modified(|current| {
            let changed = current.0 != healthy;
            *current = (healthy, detail.clone());
            changed
        });
        if changed {
            let _ = self.outgoing.send(Outgoing::Health(healthy, detail));
        }
    }
}

/// `namespace/name` keys a Host may mean: `reviews` (this namespace), `reviews.ns`,
/// `reviews.ns.svc[.cluster.local]`; a dotted name may also be a name in this namespace.
fn candidates(authority: &str, namespace: &str) -> Vec<String> {
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    };
    let host = host.to_ascii_lowercase();
    let host = host.strip_suffix(".svc.cluster.local").or_else(|| host.strip_suffix(".svc")).unwrap_or(&host);
    let mut keys = vec![format!("{namespace}/{host}")];
    if let Some((name, ns)) = host.split_once('.') {
        if !ns.contains('.') {
            keys.push(format!("{ns}/{name}"));
        }
    }
    keys
}

/// Starts discovery: returns the handle the data path uses, and the task to run until
/// `shutdown` fires (it then says goodbye, so the workload is deregistered at once).
pub fn start(
    state: Arc<SharedState>,
    settings: ControlSettings,
    shutdown: watch::Receiver<bool>,
) -> (Arc<DiscoveryHandle>, impl std::future::Future<Output = ()>) {
    let (outgoing, requests) = mpsc::unbounded_channel();
    let (applied, _) = watch::channel(0);
    let (health, _) = watch::channel((false, "not checked yet".to_string()));
    // The Services `--upstream` listeners relay to are known from the start: a TCP
    // client names no host to discover them by.
    let upstreams = state.settings.upstreams.iter().flat_map(|u| candidates(&u.service, &state.settings.namespace));
    let handle = Arc::new(DiscoveryHandle {
        outgoing,
        subscribed: Mutex::new(upstreams.collect()),
        missing: Mutex::new(BTreeSet::new()),
        applied,
        health,
        trust_bundle: Mutex::default(),
    });
    let task = run(state, settings, handle.clone(), requests, shutdown);
    (handle, task)
}

struct Applier {
    /// When each `(service, port)` first had a drop held back.
    held_since: HashMap<(String, u16), Instant>,
    /// The last view received, re-applied when a hold expires.
    last: Option<Config>,
    lease: Duration,
}

async fn run(
    state: Arc<SharedState>,
    settings: ControlSettings,
    handle: Arc<DiscoveryHandle>,
    mut requests: mpsc::UnboundedReceiver<Outgoing>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut applier = Applier { held_since: HashMap::new(), last: None, lease: Duration::from_secs(15) };
    let mut backoff = Duration::from_millis(100);
    let mut attempt = 0usize;
    loop {
        let address = &settings.addresses[attempt % settings.addresses.len()];
        attempt += 1;
        let started = Instant::now();
        match session(&state, &settings, &handle, address, &mut requests, &mut shutdown, &mut applier).await {
            Ok(()) => return,
            Err(error) => {
                // A stream that lived a while was a working control plane: start over quickly.
                if started.elapsed() > Duration::from_secs(10) {
                    backoff = Duration::from_millis(100);
                }
                let pause = backoff.mul_f64(0.5 + rand::random::<f64>());
                tracing::warn!(control = %address, %error, retry_in = ?pause, "discovery stream unavailable; serving the last good configuration");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// One stream to one control plane; `Ok` when the proxy is shutting down.
async fn session(
    state: &Arc<SharedState>,
    settings: &ControlSettings,
    handle: &DiscoveryHandle,
    address: &str,
    requests: &mut mpsc::UnboundedReceiver<Outgoing>,
    shutdown: &mut watch::Receiver<bool>,
    applier: &mut Applier,
) -> Result<(), String> {
    let credentials = state.identity.get().ok_or("this proxy has no certificate yet")?;
    let config = crate::identity::control_client_config(credentials)?;
    let channel = crate::identity::control_channel(address, config).await?;
    // Telemetry goes to the same control plane over the same connection, on its own
    // RPC, so that reports never wait behind pushes and ACKs (or hold them up); it
    // stops with this stream.
    let _reporter = state.telemetry.enabled().then(|| {
        AbortOnDrop(tokio::spawn(crate::telemetry::report(state.clone(), channel.clone(), settings.proxy_id.clone())))
    });
    let mut client = DiscoveryClient::new(channel.clone());
    let (sender, receiver) = mpsc::channel::<ProxyMessage>(16);
    let send = |message: proxy_message::Message| ProxyMessage { message: Some(message) };
    let subscriptions: Vec<String> =
        handle.subscribed.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect();
    let hello = Hello {
        proxy_id: settings.proxy_id.clone(),
        namespace: state.settings.namespace.clone(),
        workload: settings.registration.as_ref().map(|r| Workload {
            service: r.service.clone(),
            labels: r.labels.clone().into_iter().collect(),
            address: r.address.to_string(),
            zone: r.zone.clone().unwrap_or_default(),
            weight: r.weight,
            protocol: r.protocol.clone(),
            service_port: u32::from(r.service_port),
        }),
        subscriptions,
        serving_version: state.config.load().version.clone(),
        proxy_version: env!("CARGO_PKG_VERSION").to_string(),
        admin_address: admin_address(state, settings),
    };
    let _ = sender.send(send(proxy_message::Message::Hello(hello))).await;
    let (healthy, detail) = handle.health.borrow().clone();
    let _ = sender.send(send(proxy_message::Message::Health(Health { healthy, detail }))).await;
    let mut inbound = client
        .stream(ReceiverStream::new(receiver))
        .await
        .map_err(|status| format!("the control plane refused the stream: {}", status.message()))?
        .into_inner();
    tracing::info!(control = %address, "discovery stream open");
    // Tap sessions come from the replica holding this stream (it vouches for the
    // proxy), and end with it.
    let _tap = AbortOnDrop(tokio::spawn(crate::tap::watch(state.clone(), channel.clone(), settings.proxy_id.clone())));
    // The certificate presented now, and again whenever renewal changes it.
    let certificate = |issued: &weft_identity::tls::Issued| weft_api::discovery::Certificate {
        serial: issued.serial.clone(),
        issuer: issued.issuer.clone(),
        received: weft_identity::unix_seconds(issued.received),
        not_after: weft_identity::unix_seconds(issued.not_after),
    };
    let mut reported = credentials.current().serial.clone();
    let _ = sender.send(send(proxy_message::Message::Certificate(certificate(&credentials.current())))).await;
    let mut hold_check = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            message = inbound.message() => {
                let config = match message {
                    Ok(Some(weft_api::discovery::ControlMessage { message: Some(control_message::Message::Config(config)) })) => config,
                    Ok(Some(_)) => continue,
                    Ok(None) => return Err("the control plane closed the stream".into()),
                    Err(status) => return Err(format!("stream failed: {}", status.message())),
                };
                let reply = match applier.apply(state, handle, config.clone()) {
                    Ok(()) => proxy_message::Message::Ack(Ack { version: config.version, nonce: config.nonce }),
                    Err(error) => proxy_message::Message::Nack(Nack { version: config.version, nonce: config.nonce, error }),
                };
                if sender.send(send(reply)).await.is_err() {
                    return Err("the stream closed".into());
                }
            }
            Some(request) = requests.recv() => {
                let message = match request {
                    Outgoing::Subscribe(services) => proxy_message::Message::Subscribe(Subscribe { services }),
                    Outgoing::Health(healthy, detail) => proxy_message::Message::Health(Health { healthy, detail }),
                };
                if sender.send(send(message)).await.is_err() {
                    return Err("the stream closed".into());
                }
            }
            _ = hold_check.tick() => {
                let current = credentials.current();
                if current.serial != reported {
                    reported = current.serial.clone();
                    let _ = sender.send(send(proxy_message::Message::Certificate(certificate(&current)))).await;
                }
                if applier.hold_expired() {
                    if let Some(config) = applier.last.clone() {
                        let _ = applier.apply(state, handle, config);
                    }
                }
            }
            _ = shutdown.changed() => {
                // The last interval's telemetry (as the workers drained it, within the
                // second), before the stream that vouches for it ends.
                if state.telemetry.enabled() {
                    crate::telemetry::flush(state, channel.clone(), &settings.proxy_id).await;
                }
                let _ = sender.send(send(proxy_message::Message::Goodbye(Goodbye {}))).await;
                drop(sender);
                // Let the goodbye reach the control plane before the connection closes.
                let _ = tokio::time::timeout(Duration::from_secs(1), async { while let Ok(Some(_)) = inbound.message().await {} }).await;
                return Ok(());
            }
        }
    }
}

/// Where Prometheus reaches this proxy's `/metrics`: the admin listener as bound, with a
/// wildcard address replaced by the registered address's host (callers reach that).
fn admin_address(state: &SharedState, settings: &ControlSettings) -> String {
    let Some(mut admin) = state.ports.get().map(|ports| ports.admin) else { return String::new() };
    if admin.ip().is_unspecified() {
        match &settings.registration {
            Some(registration) => admin.set_ip(registration.address.ip()),
            None => return String::new(),
        }
    }
    admin.to_string()
}

/// Ends a task when dropped: a session's reporter lives as long as its stream.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Makes the pushed bundle the one peers are verified against (a root rotation adds a
/// root before certificates from it appear, and drops the old one after).
fn apply_trust_bundle(state: &SharedState, bundle: &str) {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let Some(credentials) = state.identity.get() else { return };
    match CertificateDer::pem_slice_iter(bundle.as_bytes()).collect::<Result<Vec<_>, _>>() {
        Ok(roots) => {
            if credentials.set_roots(roots) {
                tracing::info!("the mesh's trust bundle changed; peers are verified against the new one");
            }
        }
        Err(error) => tracing::warn!(%error, "the pushed trust bundle is unreadable; keeping the current one"),
    }
}

/// The snapshot a pushed view compiles to, or why it is refused (NACKed): the part of
/// applying a view that depends on nothing but the message, and what the discovery fuzz
/// target drives.
pub fn compile_view(config: &Config, namespace: &str) -> Result<weft_model::Snapshot, weft_model::ConfigErrors> {
    parse_documents("control plane view", &config.resources).map(|resources| compile(&resources, namespace))
}

impl Applier {
    fn apply(&mut self, state: &SharedState, handle: &DiscoveryHandle, config: Config) -> Result<(), String> {
        if config.lease_seconds > 0 {
            self.lease = Duration::from_secs(u64::from(config.lease_seconds));
        }
        let result = compile_view(&config, &state.settings.namespace).map(|mut snapshot| {
            let held = self.hold_sudden_drops(&state.config.load().snapshot, &mut snapshot);
            (snapshot, held)
        });
        let outcome = match result {
            Ok((snapshot, held)) => {
                // Before the install, so that revoked identities lose their endpoints in it.
                let revocations = config.revocations.clone().unwrap_or_default();
                let revoked = Revoked::new(revocations.identities, revocations.serials);
                let count = revoked.len();
                if state.connector.revocations.set(revoked) {
                    tracing::warn!(
                        revoked = count,
                        "the revocation list changed: revoked peers are refused and cut off"
                    );
                }
                tracing::info!(version = %config.version, services = snapshot.services.len(), held, "configuration applied");
                state.install(snapshot, config.version.clone());
                *state.last_reload_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
                *handle.missing.lock().unwrap_or_else(|e| e.into_inner()) = config.missing.iter().cloned().collect();
                if !config.trust_bundle.is_empty() {
                    *handle.trust_bundle.lock().unwrap_or_else(|e| e.into_inner()) = config.trust_bundle.clone();
                    apply_trust_bundle(state, &config.trust_bundle);
                }
                state.ready.store(true, std::sync::atomic::Ordering::Release);
                Ok(())
            }
            Err(errors) => {
                let error = errors.to_string();
                tracing::error!(version = %config.version, "configuration refused (NACK); the previous one keeps serving:\n{error}");
                *state.last_reload_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.clone());
                Err(error)
            }
        };
        self.last = Some(config);
        handle.applied.send_modify(|g| *g += 1);
        outcome
    }

    /// Keeps a port's current endpoints where `next` would suddenly leave fewer than
    /// [`PANIC_THRESHOLD`] of them, for at most one lease period. Returns how many ports
    /// were held.
    fn hold_sudden_drops(&mut self, current: &Snapshot, next: &mut Snapshot) -> usize {
        let now = Instant::now();
        let mut held = 0;
        let mut still_held = HashMap::new();
        for service in &mut next.services {
            let Some(old) = current.service(&service.namespace, &service.name).map(|i| &current.services[i]) else {
                continue;
            };
            for port in &mut service.ports {
                let Some(old_port) = old.ports.iter().find(|p| p.port == port.port) else { continue };
                let before = old_port.endpoints.len();
                let after = port.endpoints.len();
                if before >= 2 && (after as f64) < before as f64 * PANIC_THRESHOLD {
                    let key = (format!("{}/{}", service.namespace, service.name), port.port);
                    let since = *self.held_since.get(&key).unwrap_or(&now);
                    if now.duration_since(since) < self.lease {
                        tracing::warn!(service = %key.0, port = key.1, before, after, "endpoint set dropped suddenly; keeping the current endpoints for now (panic threshold)");
                        port.endpoints = old_port.endpoints.clone();
                        still_held.insert(key, since);
                        held += 1;
                    }
                }
            }
        }
        self.held_since = still_held;
        held
    }

    fn hold_expired(&self) -> bool {
        let now = Instant::now();
        self.held_since.values().any(|since| now.duration_since(*since) >= self.lease)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_map_to_the_services_they_may_mean() {
        assert_eq!(candidates("reviews", "default"), vec!["default/reviews"]);
        assert_eq!(candidates("reviews:80", "shop"), vec!["shop/reviews"]);
        assert_eq!(
            candidates("reviews.prod.svc.cluster.local:8080", "default"),
            vec!["default/reviews.prod", "prod/reviews"]
        );
        assert_eq!(candidates("Reviews.Prod", "default"), vec!["default/reviews.prod", "prod/reviews"]);
    }

    fn view(addresses: &[&str]) -> String {
        let mut text = String::from(
            "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: reviews}\nspec: {selector: {app: reviews}, ports: [{port: 80}]}\n",
        );
        for (i, address) in addresses.iter().enumerate() {
            text.push_str(&format!(
                "---\napiVersion: weft.dev/v1alpha1\nkind: Workload\nmetadata: {{name: r{i}}}\nspec: {{labels: {{app: reviews}}, address: \"{address}\"}}\n"
            ));
        }
        text
    }

    fn config(version: &str, resources: String) -> Config {
        Config { version: version.into(), nonce: "1".into(), resources, lease_seconds: 0, ..Default::default() }
    }

    fn setup(lease: Duration) -> (Arc<SharedState>, Arc<DiscoveryHandle>, Applier) {
        let state =
            SharedState::new(crate::settings::ProxySettings::new(None), Snapshot::empty("default"), String::new());
        let (handle, _task) = start(
            state.clone(),
            ControlSettings {
                addresses: vec![],
                proxy_id: "t".into(),
                registration: None,
                identity: crate::identity::IdentitySettings {
                    token: crate::identity::JoinTokenSecret::new(&format!("wj1.t.s.{}", "0".repeat(64)), "test")
                        .unwrap(),
                    namespace: "default".into(),
                    service_account: None,
                },
            },
            watch::channel(false).1,
        );
        (state, handle, Applier { held_since: HashMap::new(), last: None, lease })
    }

    fn endpoints(state: &SharedState) -> usize {
        state.config.load().snapshot.services[0].ports[0].endpoints.len()
    }

    #[test]
    fn a_view_that_does_not_parse_is_refused_and_changes_nothing() {
        let (state, handle, mut applier) = setup(Duration::from_secs(15));
        applier.apply(&state, &handle, config("v1", view(&["127.0.0.1:1"]))).unwrap();
        let error = applier
            .apply(&state, &handle, config("v2", view(&["127.0.0.1:1"]).replace("port: 80", "port: eighty")))
            .unwrap_err();
        assert!(error.contains("spec.ports[0].port"), "{error}");
        assert_eq!(state.config.load().version, "v1");
        assert!(state.is_ready());
    }

    #[test]
    fn a_sudden_drop_is_held_for_one_lease_then_accepted() {
        let (state, handle, mut applier) = setup(Duration::from_millis(50));
        let four = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"];
        applier.apply(&state, &handle, config("v1", view(&four))).unwrap();
        // Down to one of four: held back, the four keep serving.
        applier.apply(&state, &handle, config("v2", view(&four[..1]))).unwrap();
        assert_eq!(endpoints(&state), 4);
        assert!(!applier.hold_expired());
        // A lease later, the smaller set is accepted.
        std::thread::sleep(Duration::from_millis(60));
        assert!(applier.hold_expired());
        let last = applier.last.clone().unwrap();
        applier.apply(&state, &handle, last).unwrap();
        assert_eq!(endpoints(&state), 1);
        applier.apply(&state, &handle, config("v3", view(&four[..2]))).unwrap();
        assert_eq!(endpoints(&state), 2);
    }
}
