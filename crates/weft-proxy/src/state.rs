//! The proxy's shared state: the serving configuration swapped whole on every change,
//! and the learned state (endpoints, limiters, retry budgets) that outlives swaps.
//!
//! [`SharedState::install`] builds a new [`ServingConfig`] from a compiled snapshot
//! outside any lock, reusing the `Arc`s of endpoint state, limiters and budgets by key,
//! and publishes it with one atomic store. Requests in flight keep the config they
//! started with.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, OnceLock,
    },
};

use arc_swap::ArcSwap;
use weft_identity::tls::{ClientCertificate, ALPN_HTTP2, ALPN_TCP};
use weft_model::{snapshot::ServicePolicy, Snapshot};

use crate::{
    balance::{Backend, WeightedEndpoint},
    endpoint::{EndpointKey, EndpointRegistry},
    limits::Limiter,
    metrics::Metrics,
    pool::Connector,
    proxy::BoundPorts,
    retry::RetryBudget,
    settings::ProxySettings,
    transport::{MeshPeer, PeerSecurity},
};

/// One immutable serving configuration.
pub struct ServingConfig {
    pub snapshot: Arc<Snapshot>,
    /// Backends indexed `[service][port]`, parallel to the snapshot's services.
    pub backends: Vec<Vec<Arc<Backend>>>,
    /// Retry budget of each service (as the addressed service).
    pub budgets: Vec<Arc<RetryBudget>>,
    /// `namespace/name` of each service, the metric label.
    pub service_labels: Vec<Arc<str>>,
    /// This proxy's own Service, if `--service` names one in the snapshot.
    pub own_service: Option<usize>,
    /// A hash of the configuration source, shown on `/config`.
    pub version: String,
}

/// State shared by every worker of one proxy.
pub struct SharedState {
    pub settings: ProxySettings,
    pub config: ArcSwap<ServingConfig>,
    pub endpoints: EndpointRegistry,
    pub metrics: Metrics,
    /// Golden signals for the control plane (off without one).
    pub telemetry: crate::telemetry::Telemetry,
    /// Finished spans on their way to the trace receiver.
    pub spans: crate::spans::Spans,
    /// Access log lines on their way to the writer thread.
    pub access_log: crate::access_log::AccessLog,
    /// The tap sessions operators hold on this proxy (none, nearly always).
    pub taps: Arc<crate::tap::Taps>,
    pub connector: Connector,
    /// `namespace/service` of this proxy, the metric label for its own side.
    pub own_label: Arc<str>,
    /// Limiter for inbound traffic to the local application: effectively unlimited.
    pub inbound_limiter: Arc<Limiter>,
    pub ready: AtomicBool,
    pub ports: OnceLock<BoundPorts>,
    /// Addresses the DNS responder saw ExternalServices' names resolve to (capture).
    pub resolved_external: crate::capture::external::ResolvedExternal,
    pub last_reload_error: Mutex<Option<String>>,
    /// Set when the proxy takes configuration from a control plane.
    pub discovery: OnceLock<Arc<crate::discovery::DiscoveryHandle>>,
    /// This proxy's certificate, key and trust bundle, once it has joined the mesh.
    pub identity: OnceLock<Arc<weft_identity::tls::Credentials>>,
    /// This proxy's SPIFFE ID as text, rendered once (renewals keep the identity).
    own_identity: OnceLock<Arc<str>>,
    limiters: Mutex<HashMap<String, Arc<Limiter>>>,
    budgets: Mutex<HashMap<String, Arc<RetryBudget>>>,
    /// How each peer identity is reached, built once per identity (TLS configurations
    /// keep their session caches), and plaintext for the unmeshed.
    peers: Mutex<HashMap<Arc<str>, Arc<PeerSecurity>>>,
    plaintext: Arc<PeerSecurity>,
    /// The inbound side's TLS configuration, built on first use from `identity`.
    inbound_tls: OnceLock<Arc<rustls::ServerConfig>>,
    /// Whether the STRICT-but-reachable-application warning was given.
    warned_open_app: AtomicBool,
}

impl SharedState {
    /// This proxy's SPIFFE ID, once it has joined the mesh.
    pub fn own_identity(&self) -> Option<Arc<str>> {
        let credentials = self.identity.get()?;
        Some(self.own_identity.get_or_init(|| credentials.current().identity.to_string().into()).clone())
    }

    /// State serving `snapshot` (version `version`).
    pub fn new(settings: ProxySettings, snapshot: Snapshot, version: String) -> Arc<Self> {
        let own_label: Arc<str> = match &settings.service {
            Some(service) => format!("{}/{service}", settings.namespace).into(),
            None => crate::metrics::empty_label(),
        };
        let connector = Connector {
            connect_timeout: settings.connect_timeout,
            idle_timeout: settings.idle_timeout,
            h2_keepalive: settings.h2_keepalive,
            revocations: Arc::default(),
        };
        let telemetry_interval =
            Some(settings.telemetry_interval).filter(|i| settings.control.is_some() && !i.is_zero());
        let telemetry = crate::telemetry::Telemetry::new(telemetry_interval);
        let inbound_limiter = Arc::new(Limiter::default());
        inbound_limiter.set_limits(&weft_model::spec::ConnectionLimitsSpec {
            max_connections: u32::MAX,
            max_pending_requests: u32::MAX,
            max_requests: u32::MAX,
        });
        let state = Arc::new(SharedState {
            settings,
            config: ArcSwap::from_pointee(ServingConfig {
                snapshot: Arc::new(Snapshot::empty("default")),
                backends: vec![],
                budgets: vec![],
                service_labels: vec![],
                own_service: None,
                version: String::new(),
            }),
            endpoints: EndpointRegistry::default(),
            metrics: Metrics::new(),
            telemetry,
            spans: crate::spans::Spans::default(),
            access_log: crate::access_log::AccessLog::default(),
            taps: Arc::default(),
            connector,
            own_label,
            inbound_limiter,
            ready: AtomicBool::new(false),
            ports: OnceLock::new(),
            resolved_external: Default::default(),
            own_identity: OnceLock::new(),
            last_reload_error: Mutex::new(None),
            discovery: OnceLock::new(),
            identity: OnceLock::new(),
            limiters: Mutex::new(HashMap::new()),
            budgets: Mutex::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
            plaintext: Arc::new(PeerSecurity::Plaintext),
            inbound_tls: OnceLock::new(),
            warned_open_app: AtomicBool::new(false),
        });
        state.install(snapshot, version);
        state
    }

    /// The TLS configuration meshed callers are served with; `None` until this proxy
    /// has an identity.
    pub fn inbound_tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        let credentials = self.identity.get()?;
        if let Some(config) = self.inbound_tls.get() {
            return Some(config.clone());
        }
        let alpn = [ALPN_HTTP2, crate::transport::ALPN_HTTP1, ALPN_TCP];
        match credentials.server_config(ClientCertificate::Required, &alpn) {
            Ok(config) => Some(self.inbound_tls.get_or_init(|| Arc::new(config)).clone()),
            Err(error) => {
                tracing::error!(%error, "cannot build the inbound TLS configuration");
                None
            }
        }
    }

    /// How to reach a peer with `identity` (`None`: an unmeshed endpoint).
    fn peer_security(&self, identity: Option<&Arc<str>>) -> Arc<PeerSecurity> {
        let Some(identity) = identity else { return self.plaintext.clone() };
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(known) = peers.get(identity) {
            return known.clone();
        }
        let security = match self.identity.get() {
            Some(credentials) => match MeshPeer::new(identity, credentials) {
                Ok(peer) => PeerSecurity::Mutual(Arc::new(peer)),
                Err(error) => PeerSecurity::Unavailable(format!("endpoint identity {identity}: {error}").into()),
            },
            None => PeerSecurity::Unavailable(
                format!(
                    "the endpoint is meshed ({identity}) and needs mutual TLS, but this proxy has no workload \
                     identity: run it with --control and --token-file"
                )
                .into(),
            ),
        };
        let security = Arc::new(security);
        // Only usable answers are kept: an identity may arrive later.
        if matches!(*security, PeerSecurity::Mutual(_)) {
            peers.insert(identity.clone(), security.clone());
        }
        security
    }

    /// Builds a serving config from `snapshot` and publishes it atomically.
    pub fn install(&self, snapshot: Snapshot, version: String) {
        let revoked = self.connector.revocations.current();
        let mut backends = Vec::with_capacity(snapshot.services.len());
        let mut budgets = Vec::with_capacity(snapshot.services.len());
        let mut service_labels = Vec::with_capacity(snapshot.services.len());
        for service in &snapshot.services {
            let label: Arc<str> = format!("{}/{}", service.namespace, service.name).into();
            let limiter = self.limiter(&label, &service.policy);
            budgets.push(self.budget(&label, &service.policy));
            backends.push(
                service
                    .ports
                    .iter()
                    .map(|port| {
                        let endpoints = port
                            .endpoints
                            .iter()
                            // A revoked identity gets no traffic (and is refused anyway).
                            .filter(|e| !e.identity.as_deref().is_some_and(|id| revoked.refuses_identity(id)))
                            .map(|e| {
                                let key = EndpointKey::new(e.address, e.identity.clone(), port.protocol, port.port);
                                let state = self.endpoints.get(key);
                                state.set_security(self.peer_security(e.identity.as_ref()));
                                WeightedEndpoint { state, weight: e.weight, workload: e.workload.clone() }
                            })
                            .collect();
                        Arc::new(Backend::new(
                            label.clone(),
                            port.protocol,
                            endpoints,
                            service.policy.load_balancer,
                            service.policy.outlier_detection.clone(),
                            limiter.clone(),
                        ))
                    })
                    .collect(),
            );
            service_labels.push(label);
        }
        let own_service =
            self.settings.service.as_deref().and_then(|name| snapshot.service(&self.settings.namespace, name));
        for unresolved in &snapshot.unresolved {
            tracing::warn!(reference = %unresolved, "unresolved reference: requests that need it get 500");
        }
        let strict = own_service.is_some_and(|i| snapshot.services[i].mtls == weft_model::spec::MtlsMode::Strict);
        if let (true, Some(app)) = (strict, self.settings.app_addr) {
            if !app.ip().is_loopback() && !self.warned_open_app.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(%app, "this Service's mtls is STRICT, but its application listens on a non-loopback address: callers that reach it directly bypass mutual TLS and authorization; bind the application to 127.0.0.1");
            }
        }
        let range = snapshot.virtual_ip_range;
        let previous = self.config.swap(Arc::new(ServingConfig {
            snapshot: Arc::new(snapshot),
            backends,
            budgets,
            service_labels,
            own_service,
            version,
        }));
        if previous.snapshot.virtual_ip_range != range && self.settings.capture.as_ref().is_some_and(|c| c.install) {
            // MeshConfig moved the Services' addresses to another range (a control plane's
            // arrives after start): route it as at start, off the serving path; the
            // routes go with the table on exit.
            std::thread::spawn(move || match crate::capture::routes::install(range, &[]) {
                Ok(()) => tracing::info!(%range, "virtual-IP range routed"),
                Err(error) => tracing::warn!(%error, %range, "cannot route the new virtual-IP range"),
            });
        }
        drop(previous);
        self.endpoints.prune();
    }

    fn limiter(&self, label: &str, policy: &ServicePolicy) -> Arc<Limiter> {
        let mut limiters = self.limiters.lock().expect("limiters lock poisoned");
        let limiter = limiters.entry(label.to_string()).or_default().clone();
        limiter.set_limits(&policy.connection_limits);
        limiter
    }

    fn budget(&self, label: &str, policy: &ServicePolicy) -> Arc<RetryBudget> {
        let spec = policy.retries.as_ref().map(|r| r.budget.clone()).unwrap_or_default();
        let mut budgets = self.budgets.lock().expect("budgets lock poisoned");
        let budget =
            budgets.entry(label.to_string()).or_insert_with(|| Arc::new(RetryBudget::new(spec.clone()))).clone();
        budget.set_spec(&spec);
        budget
    }

    /// Whether the proxy is ready to serve (listeners bound, config loaded).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}
