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
use weft_model::{snapshot::ServicePolicy, Snapshot};

use crate::{
    balance::{Backend, WeightedEndpoint},
    endpoint::EndpointRegistry,
    limits::Limiter,
    metrics::Metrics,
    pool::Connector,
    proxy::BoundPorts,
    retry::RetryBudget,
    settings::ProxySettings,
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
    pub connector: Connector,
    /// `namespace/service` of this proxy, the metric label for its own side.
    pub own_label: Arc<str>,
    /// Limiter for inbound traffic to the local application: effectively unlimited.
    pub inbound_limiter: Arc<Limiter>,
    pub ready: AtomicBool,
    pub ports: OnceLock<BoundPorts>,
    pub last_reload_error: Mutex<Option<String>>,
    /// Set when the proxy takes configuration from a control plane.
    pub discovery: OnceLock<Arc<crate::discovery::DiscoveryHandle>>,
    /// This proxy's certificate, key and trust bundle, once it has joined the mesh.
    pub identity: OnceLock<Arc<weft_identity::tls::Credentials>>,
    limiters: Mutex<HashMap<String, Arc<Limiter>>>,
    budgets: Mutex<HashMap<String, Arc<RetryBudget>>>,
}

impl SharedState {
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
        };
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
            connector,
            own_label,
            inbound_limiter,
            ready: AtomicBool::new(false),
            ports: OnceLock::new(),
            last_reload_error: Mutex::new(None),
            discovery: OnceLock::new(),
            identity: OnceLock::new(),
            limiters: Mutex::new(HashMap::new()),
            budgets: Mutex::new(HashMap::new()),
        });
        state.install(snapshot, version);
        state
    }

    /// Builds a serving config from `snapshot` and publishes it atomically.
    pub fn install(&self, snapshot: Snapshot, version: String) {
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
                            .map(|e| WeightedEndpoint {
                                state: self.endpoints.get(e.address),
                                weight: e.weight,
                                workload: e.workload.clone(),
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
        let previous = self.config.swap(Arc::new(ServingConfig {
            snapshot: Arc::new(snapshot),
            backends,
            budgets,
            service_labels,
            own_service,
            version,
        }));
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
