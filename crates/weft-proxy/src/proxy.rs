//! Starting and stopping a proxy: load the configuration, bind every listener, run the
//! workers, and drain on SIGTERM.

use std::{
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
};

use serde::Serialize;
use weft_model::Snapshot;

use crate::{
    admin,
    app::{self, App, SpawnError},
    capture::{
        rules::{CaptureRules, InboundPorts, ProxyTraffic},
        Installed,
    },
    discovery, health, identity, inbound,
    listener::{self, accept_loop, BindError, Drain},
    outbound, reload,
    settings::{CaptureSettings, ProxySettings},
    state::SharedState,
    tcp,
};

/// The addresses the proxy actually bound (port 0 resolved), as logged, served on
/// `/config` and written to `--ports-file`.
#[derive(Clone, Debug, Serialize)]
pub struct BoundPorts {
    pub outbound: SocketAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inbound: Option<SocketAddr>,
    /// Where capture's rules send connections made to the application's ports.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub captured_inbound: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub upstreams: std::collections::BTreeMap<String, SocketAddr>,
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Config(#[from] reload::LoadError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("cannot write --ports-file {path}: {source}")]
    PortsFile { path: String, source: std::io::Error },
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    App(#[from] SpawnError),
    #[error("{0}")]
    Join(String),
    #[error("transparent capture: {0}")]
    Capture(String),
}

/// The capture table for this proxy: its listeners as bound, its admin port left alone,
/// the control plane's addresses let through.
fn capture_rules(settings: &ProxySettings, capture: &CaptureSettings, ports: &BoundPorts) -> CaptureRules {
    let mut exclude_inbound_ports = capture.exclude_inbound_ports.clone();
    exclude_inbound_ports.push(ports.admin.port());
    let exclude_destinations = settings
        .control
        .iter()
        .flat_map(|control| control.addresses.iter())
        .filter_map(|address| std::net::ToSocketAddrs::to_socket_addrs(address).ok())
        .flatten()
        .collect();
    CaptureRules {
        outbound_port: ports.outbound.port(),
        inbound: ports
            .inbound
            .zip(ports.captured_inbound)
            .map(|(mesh, captured)| InboundPorts { mesh: mesh.port(), captured: captured.port() }),
        dns_port: Some(capture.dns_port),
        proxy_traffic: capture.proxy_traffic,
        exclude_inbound_ports,
        exclude_outbound_ports: capture.exclude_ports.clone(),
        exclude_cidrs: capture.exclude_cidrs.clone(),
        exclude_destinations,
        untrack: true,
    }
}

/// Runs a proxy until SIGTERM or SIGINT, then drains in-flight requests (at most the
/// drain timeout) and returns. Fails before serving anything if the configuration is
/// invalid or a listener cannot be bound.
/// Returns the application's exit code when the proxy ran one (`--` command).
pub fn run(mut settings: ProxySettings) -> Result<Option<i32>, ProxyError> {
    if settings.control.is_some() && settings.config_path.is_some() {
        return Err(ProxyError::Conflict(
            "--config and --control both given; a proxy takes its configuration from one".into(),
        ));
    }
    let (snapshot, version, text) = match &settings.config_path {
        Some(path) => reload::load(path, &settings.namespace)?,
        None => (Snapshot::empty(&settings.namespace), String::new(), String::new()),
    };
    let workers = settings.workers.max(1);
    let outbound_listeners = listener::bind(settings.outbound_addr, workers, "outbound listener", "--outbound-addr")?;
    let inbound_listeners = match settings.app_addr {
        Some(_) => Some(listener::bind(settings.inbound_addr, workers, "inbound listener", "--inbound-addr")?),
        None => None,
    };
    let mut upstream_listeners = Vec::new();
    for upstream in &settings.upstreams {
        upstream_listeners.push((
            Arc::new(upstream.clone()),
            listener::bind(upstream.listen, workers, "TCP upstream listener", "--upstream")?,
        ));
    }
    let admin_listener = listener::bind(settings.admin_addr, 1, "admin listener", "--admin-addr")?.remove(0);
    // Under capture, the rules redirect to 127.0.0.1 or ::1 at the outbound port, and
    // send DNS to the responder: both loopbacks listen.
    let mut outbound_v6_listeners = None;
    let mut captured_inbound_listeners = None;
    let mut dns_sockets = Vec::new();
    if let Some(capture) = &settings.capture {
        // Captured inbound connections get a listener of their own: the mesh port's
        // traffic then needs no connection tracking (see capture::rules).
        if settings.app_addr.is_some() {
            let address = SocketAddr::new(settings.inbound_addr.ip(), capture.inbound_port);
            captured_inbound_listeners =
                Some(listener::bind(address, workers, "captured-inbound listener", "--capture-inbound-port")?);
        }
        let port = outbound_listeners[0].local_addr().map_err(ProxyError::Runtime)?.port();
        let ipv6 = crate::capture::dns::ipv6_enabled();
        if ipv6 && settings.outbound_addr.ip() == std::net::Ipv4Addr::LOCALHOST {
            let v6 = SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), port);
            outbound_v6_listeners = Some(listener::bind(v6, workers, "outbound listener (IPv6)", "--outbound-addr")?);
        }
        let mut dns_addresses = vec![SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), capture.dns_port)];
        if ipv6 {
            dns_addresses.push(SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), capture.dns_port));
        }
        for address in dns_addresses {
            let bound = crate::capture::dns::bind(address).map_err(|source| {
                ProxyError::Capture(format!(
                    "cannot listen on {address} (the DNS responder, set with --capture-dns-port): {source}"
                ))
            })?;
            dns_sockets.push(bound);
        }
    }

    let local = |listeners: &[std::net::TcpListener]| listeners[0].local_addr().expect("bound listener has an address");
    let ports = BoundPorts {
        outbound: local(&outbound_listeners),
        inbound: inbound_listeners.as_deref().map(local),
        captured_inbound: captured_inbound_listeners.as_deref().map(local),
        admin: admin_listener.local_addr().expect("bound listener has an address"),
        // `SERVICE`, or `SERVICE:PORT` for an upstream to one port of it.
        upstreams: upstream_listeners
            .iter()
            .map(|(u, l)| (u.port.map_or_else(|| u.service.clone(), |port| format!("{}:{port}", u.service)), local(l)))
            .collect(),
    };
    if let Some(path) = &settings.ports_file {
        let json = serde_json::to_string_pretty(&ports).expect("ports serialize");
        std::fs::write(path, json)
            .map_err(|source| ProxyError::PortsFile { path: path.display().to_string(), source })?;
    }
    tracing::info!(outbound = %ports.outbound, inbound = ?ports.inbound, captured_inbound = ?ports.captured_inbound, admin = %ports.admin, upstreams = ?ports.upstreams, workers, "listening");
    if settings.app_addr.is_none() {
        tracing::info!("no --app-addr: the inbound listener is not started");
    }

    // The registered address: --advertise-addr, else the inbound listener as bound.
    if let Some(registration) = settings.control.as_mut().and_then(|c| c.registration.as_mut()) {
        let inbound = ports.inbound.expect("a registration needs --app-addr, hence an inbound listener");
        if registration.address.port() == 0 {
            registration.address.set_port(inbound.port());
        }
        if registration.address.ip().is_unspecified() {
            return Err(ProxyError::Conflict(format!(
                "the inbound listener is bound to {inbound}, which other proxies cannot dial; give --advertise-addr \
                 IP:PORT (the address callers should use), or bind --inbound-addr to a specific IP"
            )));
        }
    }
    // Install capture last, once everything it redirects to listens; before anything
    // connects, so that every socket of the proxy carries the mark.
    let capture_rules =
        settings.capture.as_ref().map(|capture| (capture.install, capture_rules(&settings, capture, &ports)));
    let range = snapshot.virtual_ip_range;
    let state = SharedState::new(settings, snapshot, version);
    let _ = state.ports.set(ports);
    let _installed = match capture_rules {
        None => None,
        Some((install, rules)) => {
            if let ProxyTraffic::Mark(mark) = rules.proxy_traffic {
                match crate::capture::can_mark(mark) {
                    Ok(()) => {
                        crate::capture::mark_proxy_sockets(mark);
                        // The mesh port's connections inherit the listener's mark, so
                        // their replies skip connection tracking too.
                        for listener in inbound_listeners.iter().flatten() {
                            crate::capture::original_dst::mark_as_proxy(listener, mark).map_err(|error| {
                                ProxyError::Capture(format!("cannot mark the inbound listener: {error}"))
                            })?;
                        }
                    }
                    // Rules an init step installed may leave this proxy out by uid
                    // instead (`weft capture install --proxy-uid`): then no mark is needed.
                    Err(error) if !install => tracing::info!(
                        %error,
                        "cannot mark the proxy's sockets (no CAP_NET_ADMIN); the capture rules must leave out this \
                         proxy's uid (weft capture install --proxy-uid UID)"
                    ),
                    Err(error) => {
                        return Err(ProxyError::Capture(format!(
                            "cannot mark the proxy's sockets ({error}); capture needs root or CAP_NET_ADMIN"
                        )))
                    }
                }
            }
            match install {
                true => {
                    Some(Installed::install(&rules, range).map_err(|error| ProxyError::Capture(error.to_string()))?)
                }
                false => None,
            }
        }
    };
    // The resolvers the DNS responder forwards to, read once (only under capture).
    let upstreams = (!dns_sockets.is_empty()).then(|| Arc::new(crate::capture::dns::Upstreams::from_host()));
    let drain = Drain::new();

    // Worker threads: one single-threaded runtime each, with its own sockets.
    let mut inbound_listeners = inbound_listeners.map(|l| l.into_iter());
    let mut captured_inbound_listeners = captured_inbound_listeners.map(|l| l.into_iter());
    let mut outbound_listeners = outbound_listeners.into_iter();
    let mut outbound_v6_listeners = outbound_v6_listeners.map(|l| l.into_iter());
    let capturing = state.settings.capture.is_some();
    let mut upstream_iters: Vec<_> = upstream_listeners.into_iter().map(|(u, l)| (u, l.into_iter())).collect();
    for worker in 0..workers {
        let outbound_listener = outbound_listeners.next().expect("one per worker");
        let outbound_v6_listener = outbound_v6_listeners.as_mut().and_then(|l| l.next());
        let inbound_listener = inbound_listeners.as_mut().and_then(|l| l.next());
        let captured_inbound_listener = captured_inbound_listeners.as_mut().and_then(|l| l.next());
        let upstreams: Vec<_> =
            upstream_iters.iter_mut().map(|(u, l)| (u.clone(), l.next().expect("one per worker"))).collect();
        let state = state.clone();
        let watch = drain.watch();
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(ProxyError::Runtime)?;
        std::thread::Builder::new()
            .name(format!("weft-worker-{worker}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let mut tasks = tokio::task::JoinSet::new();
                    tasks.spawn(housekeeping(state.clone(), watch.clone()));
                    let outbound_state = state.clone();
                    if capturing {
                        for listener in std::iter::once(outbound_listener).chain(outbound_v6_listener) {
                            let state = outbound_state.clone();
                            tasks.spawn(accept_loop(listener, watch.clone(), move |stream, _peer, drain| {
                                crate::capture::outbound::serve_connection(state.clone(), stream, drain)
                            }));
                        }
                    } else {
                        tasks.spawn(accept_loop(outbound_listener, watch.clone(), move |stream, _peer, drain| {
                            outbound::serve_connection(outbound_state.clone(), stream, drain)
                        }));
                    }
                    let inbound = [(inbound_listener, false), (captured_inbound_listener, true)];
                    for (listener, captured) in inbound.into_iter().filter_map(|(l, c)| Some((l?, c))) {
                        let inbound_state = state.clone();
                        tasks.spawn(accept_loop(listener, watch.clone(), move |stream, _peer, drain| {
                            inbound::serve_connection(inbound_state.clone(), stream, captured, drain)
                        }));
                    }
                    for (upstream, listener) in upstreams {
                        let upstream_state = state.clone();
                        tasks.spawn(accept_loop(listener, watch.clone(), move |stream, _peer, drain| {
                            let state = upstream_state.clone();
                            let upstream = upstream.clone();
                            async move {
                                let _drain = drain;
                                tcp::serve_upstream_client(state, upstream, stream).await;
                            }
                        }));
                    }
                    drop(watch);
                    while tasks.join_next().await.is_some() {}
                    // Connection tasks keep running on this runtime until the process exits.
                    std::future::pending::<()>().await;
                });
            })
            .map_err(ProxyError::Runtime)?;
    }

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(ProxyError::Runtime)?;
    runtime.block_on(async move {
        tokio::spawn(crate::spans::export(state.clone()));
        crate::access_log::start_writer(state.clone());
        let reopen = state.access_log.reopen.clone();
        tokio::spawn(async move {
            // SIGUSR1: reopen the access log file (after logrotate moved it away).
            let Ok(mut signals) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()) else {
                return;
            };
            while signals.recv().await.is_some() {
                tracing::info!("SIGUSR1: the access log file is reopened before the next line");
                reopen.store(true, Ordering::Release);
            }
        });
        for (udp, tcp) in dns_sockets {
            let upstreams = upstreams.clone().expect("read when the responder listens");
            tokio::spawn(crate::capture::dns::serve_udp(state.clone(), udp, upstreams.clone(), drain.watch()));
            tokio::spawn(crate::capture::dns::serve_tcp(state.clone(), tcp, upstreams, drain.watch()));
        }
        let admin_state = state.clone();
        tokio::spawn(accept_loop(admin_listener, drain.watch(), move |stream, peer, drain| {
            admin::serve_connection(admin_state.clone(), stream, peer, drain)
        }));
        let (stop_discovery, discovery_stopped) = tokio::sync::watch::channel(false);
        let mut discovery_task = None;
        match state.settings.control.clone() {
            None => {
                tokio::spawn(reload::watch(state.clone(), text));
                state.ready.store(true, Ordering::Release);
                tracing::info!("proxy ready");
            }
            Some(control) => {
                // First a certificate: the discovery stream, and every meshed connection,
                // authenticate with it. Nothing is ready before it.
                let credentials = tokio::select! {
                    joined = identity::join(&control.addresses, &control.identity) => {
                        joined.map_err(|error| ProxyError::Join(error.to_string()))?
                    }
                    _ = wait_for_shutdown_signal() => return Ok(None),
                };
                let _ = state.identity.set(credentials.clone());
                tokio::spawn(identity::keep_renewed(
                    control.addresses.clone(),
                    credentials,
                    control.identity.clone(),
                    discovery_stopped.clone(),
                ));
                // Ready once the first view from the control plane is applied.
                let (handle, task) = discovery::start(state.clone(), control, discovery_stopped);
                let _ = state.discovery.set(handle.clone());
                discovery_task = Some(tokio::spawn(task));
                match state.settings.app_addr {
                    Some(app) => {
                        tokio::spawn(health::run(
                            state.settings.health_check.clone(),
                            app,
                            state.settings.health_interval,
                            handle,
                        ));
                    }
                    None => handle.report_health(true, "no application".into()),
                }
            }
        }
        let shutdown = wait_for_shutdown_signal();
        tokio::pin!(shutdown);
        let mut app = None;
        let mut exit_code = None;
        if !state.settings.app_command.is_empty() {
            // The application starts only once the proxy serves (in control mode: once the
            // first view is applied), so that its first request never meets a cold proxy.
            let ready = async {
                while !state.is_ready() {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            };
            tokio::select! {
                _ = ready => {
                    let ports = state.ports.get().expect("ports are set before serving");
                    let settings = &state.settings;
                    app = Some(App::spawn(&settings.app_command, ports, capturing, settings.app_user)?);
                }
                _ = &mut shutdown => {}
            }
        }
        match app.as_mut() {
            Some(running) => tokio::select! {
                _ = &mut shutdown => {}
                status = running.wait() => {
                    let code = status.map(app::exit_code).unwrap_or(1);
                    tracing::info!(code, "the application exited; the proxy stops too");
                    exit_code = Some(code);
                }
            },
            None => shutdown.await,
        }
        // Deregister first, so that callers stop choosing this proxy while it drains.
        let _ = stop_discovery.send(true);
        if let Some(task) = discovery_task {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), task).await;
        }
        // Then the application, while the outbound listener still serves its last calls.
        if let (Some(running), None) = (app.as_mut(), exit_code) {
            let status = running.stop(state.settings.drain_timeout).await;
            exit_code = Some(status.map(app::exit_code).unwrap_or(1));
        }
        state.ready.store(false, Ordering::Release);
        let timeout = state.settings.drain_timeout;
        tracing::info!(?timeout, "shutting down: no new connections, draining in-flight requests");
        if drain.wait(timeout).await {
            tracing::info!("drained");
        } else {
            tracing::warn!(?timeout, "drain timeout elapsed with requests still in flight; exiting anyway");
        }
        Ok(exit_code)
    })
}

/// Per-worker upkeep: once a second, closes pooled connections that expired or whose
/// endpoint is gone (or now has other security) and hands what the worker recorded for
/// telemetry to the reporter; at once, idle connections another worker at
/// `maxConnections` waits for.
///
/// The tick also keeps the worker's timer wheel armed within a second, which matters on
/// the hot path: tokio wakes its driver through an eventfd write whenever a new timer is
/// due sooner than the driver's next wake, so without a nearer timer every request's
/// 30s header-read timeout would cost a syscall and an extra loop turn.
async fn housekeeping(state: Arc<SharedState>, mut drain: listener::DrainWatch) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reclaim = crate::limits::ReclaimWatch::new();
    let app = state.settings.app_addr.map(crate::endpoint::EndpointKey::app);
    let current = |key: &crate::endpoint::EndpointKey| app.as_ref() == Some(key) || state.endpoints.is_current(key);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                crate::pool::evict_idle(state.settings.idle_timeout, current);
                state.telemetry.drain_worker();
                state.spans.drain_worker(&state.metrics);
                state.access_log.drain_worker(&state);
            }
            _ = reclaim.requested() => crate::pool::reclaim_idle(),
            _ = drain.signaled() => return,
        }
    }
}

async fn wait_for_shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler installs");
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
}
