//! `weft control`: opens the store, loads the catalog, and serves the API until SIGTERM
//! or Ctrl-C.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::net::TcpListener;

use weft_api::{
    discovery::{discovery_server::DiscoveryServer, identity_server::IdentityServer, replicas_server::ReplicasServer},
    tap::{tap_relay_server::TapRelayServer, tap_server::TapServer},
    telemetry::{aggregates_server::AggregatesServer, telemetry_server::TelemetryServer},
};

use crate::{
    api,
    ca::{self, CaError, CaSettings},
    catalog::Catalog,
    cluster::{etcd::EtcdCluster, local::unix_now, local::LocalCluster, new_replica_id, Cluster, ReplicaInfo},
    control_tls,
    discovery::{DiscoveryService, Hub},
    registry::Registry,
    signing_service::SigningService,
    store::{
        embedded::EmbeddedStore,
        etcd::{EtcdSettings, EtcdStore},
        Store, StoreError,
    },
};

/// The default API address.
pub const DEFAULT_API_ADDR: &str = "127.0.0.1:15080";
/// The default discovery (gRPC) address: every interface, since every call on it is
/// authenticated (TLS; a join token or a workload certificate).
pub const DEFAULT_GRPC_ADDR: &str = "0.0.0.0:15010";
/// How long a registration outlives its proxy's stream.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(15);

/// Where the desired state is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSpec {
    /// A file under `--data-dir`: one control plane.
    Embedded,
    /// An etcd cluster, by client addresses (`host:port`): several replicas may share it.
    Etcd(Vec<String>),
}

impl std::str::FromStr for StoreSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text == "embedded" {
            return Ok(StoreSpec::Embedded);
        }
        match text.strip_prefix("etcd://") {
            Some(list) if !list.is_empty() => {
                let endpoints: Vec<String> = list.split(',').map(|e| e.trim().to_string()).collect();
                if endpoints.iter().any(|e| e.is_empty() || e.contains('/')) {
                    return Err(format!("{text:?}: list etcd client addresses as etcd://HOST:PORT,HOST:PORT"));
                }
                Ok(StoreSpec::Etcd(endpoints))
            }
            _ => Err(format!("{text:?} is not a store; use `embedded` or etcd://HOST:PORT[,HOST:PORT]")),
        }
    }
}

/// How a control plane is run.
#[derive(Clone, Debug)]
pub struct ControlSettings {
    pub api_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    /// How long a registered workload stays after its proxy's stream ends.
    pub lease: Duration,
    pub store: StoreSpec,
    /// TLS to etcd: its CA, and a client certificate and key if it asks for one.
    pub etcd_tls: EtcdTls,
    /// Where the embedded store keeps its file.
    pub data_dir: PathBuf,
    /// Where to write the bound addresses as JSON, for scripts and tests using port 0.
    pub ports_file: Option<PathBuf>,
    /// The certificate authority: trust domain, an operator's CA, the key that encrypts
    /// it in a shared store.
    pub ca: CaSettings,
    /// How long workload certificates last (`--cert-lifetime`).
    pub cert_lifetime: Duration,
    /// HTTPS for the API: the mesh CA's certificate, the operator's, or (loopback only)
    /// plain HTTP.
    pub api_tls: crate::api_tls::ApiTlsSettings,
    /// The host other replicas reach this one at (`--advertise-host`), when the bound
    /// addresses are wildcards.
    pub advertise_host: Option<String>,
    /// How many audit entries, and for how long, are kept.
    pub audit_max_entries: usize,
    pub audit_max_age: Duration,
}

/// Files for TLS to etcd (`--etcd-ca`, `--etcd-cert`, `--etcd-key`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Why the control plane could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("cannot make the control plane's own certificate: {0}")]
    Identity(#[from] weft_identity::IdentityError),
    #[error(transparent)]
    OperatorToken(#[from] crate::operator_tokens::OperatorTokenError),
    #[error("cannot listen on {what} address {addr}: {source}; pick a free port with --{flag}, or stop the process using it")]
    Bind { what: &'static str, flag: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("cannot write the ports file {path}: {source}")]
    PortsFile { path: String, source: std::io::Error },
    #[error("{0}")]
    Settings(String),
    #[error("the API server failed: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    ApiTls(#[from] crate::api_tls::ApiTlsError),
}

/// `$XDG_DATA_HOME/weft`, else `~/.local/share/weft`, else `./weft-data`.
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("weft");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/share/weft"),
        None => PathBuf::from("weft-data"),
    }
}

fn store_path(data_dir: &Path) -> PathBuf {
    data_dir.join("store.redb")
}

/// Discovery's accept queue. Every proxy of a mesh reconnects at once when a control plane
/// restarts; with tokio's default of 1,024, a thousand simultaneous connects to a busy
/// control plane overflowed it and were reset (seen in bench/control-scale).
const DISCOVERY_BACKLOG: i32 = 8192;

fn bind_with_backlog(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(DISCOVERY_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// `addr` as other replicas should dial it: a wildcard address becomes
/// `--advertise-host` (or this host's primary address).
fn advertised(addr: SocketAddr, host: Option<&str>) -> String {
    if !addr.ip().is_unspecified() {
        return addr.to_string();
    }
    let host = host.map(str::to_string).or_else(|| {
        // The address the kernel would use toward a documentation-range address; no
        // packet is sent.
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
        socket.connect("192.0.2.1:9").ok()?;
        Some(socket.local_addr().ok()?.ip().to_string())
    });
    match host {
        Some(host) if host.contains(':') && !host.starts_with('[') => format!("[{host}]:{}", addr.port()),
        Some(host) => format!("{host}:{}", addr.port()),
        None => format!("127.0.0.1:{}", addr.port()),
    }
}

/// On the leading replica, every minute: drops audit entries beyond the configured count
/// or age.
async fn prune_audit_log(hub: Arc<Hub>, max_entries: usize, max_age: Duration) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        if hub.registry.cluster().leadership().borrow().is_none() {
            continue;
        }
        match crate::audit::prune(&hub.catalog, max_entries, max_age, std::time::SystemTime::now()).await {
            Ok(0) => {}
            Ok(pruned) => tracing::info!(pruned, "pruned the audit log"),
            Err(error) => tracing::warn!(%error, "cannot prune the audit log"),
        }
    }
}

/// Every minute, drops telemetry series with nothing left in the hour kept.
async fn sweep_telemetry(hub: Arc<Hub>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        let now = crate::telemetry::service::now_millis();
        let series = hub.aggregator.sweep(now / 1000, now);
        tracing::debug!(series, "telemetry swept");
    }
}

/// Runs the control plane until `shutdown` completes.
pub async fn run(
    settings: ControlSettings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ControlError> {
    let uses_etcd_tls = settings.etcd_tls != EtcdTls::default();
    if settings.store == StoreSpec::Embedded && uses_etcd_tls {
        return Err(ControlError::Settings(
            "--etcd-ca, --etcd-cert and --etcd-key apply to an etcd store; add --store etcd://HOST:PORT".into(),
        ));
    }
    let listener = TcpListener::bind(settings.api_addr).await.map_err(|source| ControlError::Bind {
        what: "API",
        flag: "api-addr",
        addr: settings.api_addr,
        source,
    })?;
    let api_addr = listener.local_addr().map_err(ControlError::Serve)?;
    if settings.api_tls == crate::api_tls::ApiTlsSettings::Plaintext && !api_addr.ip().is_loopback() {
        return Err(crate::api_tls::ApiTlsError::PlaintextBeyondLoopback(api_addr).into());
    }
    let grpc_listener = bind_with_backlog(settings.grpc_addr).map_err(|source| ControlError::Bind {
        what: "discovery",
        flag: "grpc-addr",
        addr: settings.grpc_addr,
        source,
    })?;
    let grpc_addr = grpc_listener.local_addr().map_err(ControlError::Serve)?;
    if settings.cert_lifetime < Duration::from_secs(10) {
        return Err(ControlError::Settings(format!(
            "--cert-lifetime {:?} is too short for proxies to renew in time; use at least 10s",
            settings.cert_lifetime
        )));
    }

    let info = ReplicaInfo {
        id: new_replica_id(),
        api: advertised(api_addr, settings.advertise_host.as_deref()),
        grpc: advertised(grpc_addr, settings.advertise_host.as_deref()),
        started_at: unix_now(),
    };
    let (store, cluster): (Arc<dyn Store>, Arc<dyn Cluster>) = match &settings.store {
        StoreSpec::Embedded => {
            let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&store_path(&settings.data_dir))?);
            (store.clone(), Arc::new(LocalCluster::new(info.clone(), store)))
        }
        StoreSpec::Etcd(endpoints) => {
            let etcd = EtcdSettings {
                endpoints: endpoints.clone(),
                ca: settings.etcd_tls.ca.clone(),
                cert: settings.etcd_tls.cert.clone(),
                key: settings.etcd_tls.key.clone(),
            };
            let store = Arc::new(EtcdStore::connect(&etcd).await?);
            if let Err(error) = store.finish_records().await {
                tracing::warn!(%error, "cannot finish copying a large apply left by a crash; it stays in force");
            }
            let cluster = EtcdCluster::join(store.client(), info.clone()).await?;
            (store, cluster)
        }
    };
    let catalog = Catalog::load(store.clone()).await?;
    let shared_store = matches!(settings.store, StoreSpec::Etcd(_));
    let (ca, keeper) =
        ca::establish(&catalog, store.as_ref(), &settings.ca, shared_store, std::time::SystemTime::now()).await?;
    catalog.set_trust_domain(ca.authority.trust_domain().as_str());
    crate::operator_tokens::establish(&catalog, store.as_ref(), &settings.data_dir, &ca.authority.root_hash()).await?;
    crate::sessions::establish(&catalog, store.as_ref()).await?;
    let registry = Registry::new(catalog.clone(), cluster, settings.lease);
    let hub = Hub::new(catalog.clone(), registry, ca, keeper, settings.cert_lifetime);
    tokio::spawn(hub.clone().maintain());
    let credentials = control_tls::control_credentials(&hub, control_tls::CONTROL_CERT_LIFETIME)?;
    let tls = control_tls::server_config(&credentials)?;

    let api_tls = crate::api_tls::setup(&settings.api_tls, api_addr, &hub.ca())?;
    let scheme = if api_tls.is_some() { "https" } else { "http" };
    if let Some((_, certificate)) = &api_tls {
        let _ = hub.api_certificate.set(certificate.clone());
        let hub = Arc::downgrade(&hub);
        crate::api_tls::keep_renewed(certificate, move || {
            hub.upgrade().map(|hub| hub.ca()).expect("the hub outlives its API")
        });
    }
    tokio::spawn(prune_audit_log(hub.clone(), settings.audit_max_entries, settings.audit_max_age));
    tokio::spawn(sweep_telemetry(hub.clone()));

    if let Some(path) = &settings.ports_file {
        let text = serde_json::json!({
            "api": api_addr.to_string(),
            "grpc": grpc_addr.to_string(),
            "server": format!("{scheme}://{api_addr}"),
        })
        .to_string();
        std::fs::write(path, text)
            .map_err(|source| ControlError::PortsFile { path: path.display().to_string(), source })?;
    }
    let (stop_grpc, grpc_stopped) = tokio::sync::oneshot::channel::<()>();
    let grpc = tonic::transport::Server::builder()
        .add_service(DiscoveryServer::new(DiscoveryService::new(hub.clone())))
        .add_service(IdentityServer::new(SigningService::new(hub.clone(), settings.cert_lifetime)))
        .add_service(ReplicasServer::new(crate::replicas::ReplicasService::new(hub.clone())))
        // A report of a proxy's most rows (16,384 of each kind) is a few MiB.
        .add_service(
            TelemetryServer::new(crate::telemetry::service::TelemetryService::new(hub.clone()))
                .max_decoding_message_size(16 * 1024 * 1024),
        )
        .add_service(TapServer::new(crate::tap::TapService::new(hub.clone())))
        .add_service(TapRelayServer::new(crate::tap::TapRelayService::new(hub.clone())))
        .add_service(
            AggregatesServer::new(crate::telemetry::service::AggregatesService::new(hub.clone()))
                .max_encoding_message_size(256 * 1024 * 1024),
        )
        .serve_with_incoming_shutdown(control_tls::incoming(grpc_listener, tls), async {
            let _ = grpc_stopped.await;
        });
    let grpc = tokio::spawn(grpc);
    tracing::info!(api = %format!("{scheme}://{api_addr}"), %grpc_addr, replica = %info.id, store = %catalog.store_description(), lease = ?settings.lease, cert_lifetime = ?settings.cert_lifetime, "control plane ready");
    crate::api_tls::serve(listener, api::router(hub), api_tls.map(|(config, _)| config), shutdown).await;
    let _ = stop_grpc.send(());
    // Open discovery streams never end by themselves; do not wait on them for long.
    let _ = tokio::time::timeout(Duration::from_secs(2), grpc).await;
    tracing::info!("control plane stopped");
    Ok(())
}
