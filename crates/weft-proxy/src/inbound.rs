//! The inbound direction: traffic from other services to the local application.
//!
//! The protocol comes from this proxy's own Service declaration when it has only `tcp`
//! ports (server-first protocols must not wait for detection); otherwise detection peeks
//! at the first bytes. HTTP is forwarded request by request over pooled connections to
//! `--app-addr`, with telemetry; anything else is relayed as opaque TCP.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use crate::{
    access_log,
    spans::{self, Kind, PendingSpan, RequestTrace},
    tap,
    telemetry::{self, Answered, Direction, OpenConnection, RowRef, TcpKey},
    trace_context,
};

use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use tokio::net::TcpStream;
use weft_identity::{
    tls::{ALPN_HTTP2, ALPN_TCP},
    SpiffeId,
};
use weft_model::{
    authz::{Call, Caller, Decision},
    spec::{MtlsMode, Protocol},
};

use crate::{
    body::{self, Body, Counter},
    detect::{detect, Detected},
    errors::{is_grpc, ProxyFailure},
    forward,
    listener::{serve_http, serve_http_on, DrainWatch},
    metrics::{empty_label, AuthzLabels, RequestLabels},
    pool::{SendError, Wire},
    protocol_errors::ProtocolError,
    revocation::PeerCertificate,
    state::SharedState,
    tcp,
    transport::{self, Upstream},
};

/// Serves one accepted inbound connection: made to the inbound listener, or `captured`
/// (made to one of the application's ports and redirected by capture's rules).
pub async fn serve_connection(state: Arc<SharedState>, stream: TcpStream, captured: bool, drain: DrainWatch) {
    let Some(mut app) = state.settings.app_addr else { return };
    let mut arrival = Arrival::default();
    if state.settings.capture.is_some() {
        // A captured connection keeps the port it was made to: the application may
        // listen on several.
        if let Some(port) = captured.then(|| crate::capture::original_dst::redirected_port(&stream)).flatten() {
            app.set_port(port);
            arrival.port = Some(port);
            arrival.called = crate::capture::original_dst::original_destination(&stream).ok();
        }
        // The application sees its callers' addresses, as it would without a mesh.
        let caller = stream.peer_addr().ok();
        arrival.forwarded_for = caller.and_then(|peer| HeaderValue::try_from(peer.ip().to_string()).ok());
    }
    // The address called, for a PROXY protocol header: read only when a port wants one.
    let called = match wants_proxy_header(&state) {
        true => arrival.called.or_else(|| stream.local_addr().ok()),
        false => None,
    };
    let arrival = (arrival != Arrival::default()).then(|| Arc::new(arrival));
    let tls = state.inbound_tls();
    let config = state.config.load_full();
    let own = config.own_service.map(|i| &config.snapshot.services[i]);
    let opaque_by_declaration = own.is_some_and(|s| s.ports.iter().all(|p| p.protocol == Protocol::Tcp));
    let strict = own.filter(|s| s.mtls == MtlsMode::Strict).map(|s| format!("{}/{}", s.namespace, s.name));
    // A proxy with an identity must see whether a caller speaks mesh TLS, even on ports
    // declared tcp; a silent (server-first) plaintext client waits out the detect timeout.
    let detected = if opaque_by_declaration && tls.is_none() {
        Detected::Opaque
    } else {
        match detect(&stream, state.settings.detect_timeout).await {
            Ok(detected) => detected,
            Err(error) => {
                tracing::debug!(%error, "inbound connection failed during detection");
                return;
            }
        }
    };
    drop(config);
    if let (Some(service), false) = (&strict, detected == Detected::Tls && tls.is_some()) {
        tracing::info!(remote = ?stream.peer_addr().ok(), %service, "refused a plaintext connection: the Service's mtls is STRICT");
        return;
    }
    match (detected, tls) {
        (Detected::Tls, Some(tls)) => serve_mesh_connection(state, app, arrival, called, stream, tls, drain).await,
        (Detected::Opaque | Detected::TimedOut | Detected::Tls, _) => {
            let mut connection = open_connection(&state, None);
            let port = arrival.as_ref().and_then(|a| a.port);
            let caller = called.and_then(|_| stream.peer_addr().ok());
            relay_to_app(&state, app, None, port, (caller, called), stream, &mut connection).await
        }
        (Detected::Http1 | Detected::Http2, _) => {
            let _connection = open_connection(&state, None);
            let handler_state = state.clone();
            let service = hyper::service::service_fn(move |request| {
                handle(handler_state.clone(), app, None, arrival.clone(), request)
            });
            serve_http(stream, Some(detected), service, drain, &state, "inbound").await;
        }
    }
}

/// Whether any port of this proxy's own Service asks for a PROXY protocol header.
fn wants_proxy_header(state: &SharedState) -> bool {
    let config = state.config.load();
    config.own_service.is_some_and(|own| config.snapshot.services[own].ports.iter().any(|p| p.proxy_protocol))
}

/// The `targetPort` of this proxy's own Service's `port`, if it declares one.
fn target_port(state: &SharedState, port: u16) -> Option<u16> {
    let config = state.config.load();
    let own = &config.snapshot.services[config.own_service?];
    own.ports.iter().find(|p| p.port == port)?.target_port
}

/// What capture tells about an inbound connection, learnt once per connection.
#[derive(Debug, Default, PartialEq)]
struct Arrival {
    /// The caller's address, passed on as `X-Forwarded-For`.
    forwarded_for: Option<HeaderValue>,
    /// The address and port the caller connected to (for a plaintext caller, the port
    /// authorization judges).
    called: Option<SocketAddr>,
    port: Option<u16>,
}

/// The PROXY protocol v2 header for a connection from `caller` to `called` on `port` of
/// this proxy's own Service (its only port when `port` is unknown), if that port asks
/// for one.
fn proxy_header(state: &SharedState, port: Option<u16>, caller: SocketAddr, called: SocketAddr) -> Option<Vec<u8>> {
    use ppp::v2::{Builder, Command, IPv4, IPv6, Protocol as Transport, Version};
    let config = state.config.load();
    let own = &config.snapshot.services[config.own_service?];
    let declared = match port {
        Some(port) => own.ports.iter().find(|p| p.port == port)?,
        None if own.ports.len() == 1 => &own.ports[0],
        None => return None,
    };
    if !declared.proxy_protocol {
        return None;
    }
    let unmapped = |address: SocketAddr| match address {
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().map_or(address, |v4| SocketAddr::new(v4.into(), v6.port())),
        v4 => v4,
    };
    let version = Version::Two | Command::Proxy;
    let built = match (unmapped(caller), unmapped(called)) {
        (SocketAddr::V4(from), SocketAddr::V4(to)) => {
            Builder::with_addresses(version, Transport::Stream, IPv4::new(*from.ip(), *to.ip(), from.port(), to.port()))
                .build()
        }
        (from, to) => {
            let six = |a: SocketAddr| match a.ip() {
                std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                std::net::IpAddr::V6(v6) => v6,
            };
            Builder::with_addresses(version, Transport::Stream, IPv6::new(six(from), six(to), from.port(), to.port()))
                .build()
        }
    };
    built.ok()
}

/// Counts an inbound connection from `peer` (`None`: plaintext) while it is open.
fn open_connection(state: &SharedState, peer: Option<&MeshCaller>) -> OpenConnection {
    let key = state.telemetry.enabled().then(|| TcpKey {
        direction: Direction::Inbound,
        peer: peer.map(|p| p.principal.clone()),
        destination: state.own_label.clone(),
        tls: peer.is_some(),
    });
    OpenConnection::open(key)
}

/// A connection from another proxy: mutual TLS, then the protocol its ALPN names.
async fn serve_mesh_connection(
    state: Arc<SharedState>,
    app: SocketAddr,
    arrival: Option<Arc<Arrival>>,
    called: Option<SocketAddr>,
    stream: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    drain: DrainWatch,
) {
    let remote = stream.peer_addr().ok();
    let accepted =
        tokio::time::timeout(state.settings.tls_handshake_timeout, tokio_rustls::TlsAcceptor::from(tls).accept(stream))
            .await;
    let stream = match accepted {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            tracing::info!(?remote, %error, "refused an inbound TLS connection");
            if let Some(violation) = ProtocolError::of_tls_handshake(&error) {
                state.metrics.protocol_error("inbound", violation);
            }
            return;
        }
        Err(_) => {
            tracing::info!(?remote, "an inbound TLS handshake timed out");
            state.metrics.protocol_error("inbound", ProtocolError::TlsHandshakeTimeout);
            return;
        }
    };
    let (_, connection) = stream.get_ref();
    let port = transport::conveyed_port(connection.server_name());
    // A Service port the application serves on a port of its own (`targetPort`).
    let mut app = app;
    if let Some(target) = port.and_then(|port| target_port(&state, port)) {
        app.set_port(target);
    }
    let Some(certificate) = PeerCertificate::of(connection.peer_certificates()) else {
        tracing::info!(?remote, "a mesh TLS connection proved no identity; closed");
        state.metrics.protocol_error("inbound", ProtocolError::TlsBadCertificate);
        return;
    };
    let revocations = state.connector.revocations.clone();
    if revocations.current().refuses(&certificate.identity, certificate.serial.as_deref()) {
        tracing::info!(?remote, peer = %certificate.identity, serial = ?certificate.serial, "refused a revoked peer");
        return;
    }
    let peer = Some(Arc::new(MeshCaller::new(&certificate.identity, port)));
    let mut open = open_connection(&state, peer.as_deref());
    let alpn = connection.alpn_protocol().map(<[u8]>::to_vec);
    let served = async {
        match alpn.as_deref() {
            Some(ALPN_HTTP2) | Some(transport::ALPN_HTTP1) => {
                let http2 = alpn.as_deref() == Some(ALPN_HTTP2);
                let handler_state = state.clone();
                let service = hyper::service::service_fn(move |request| {
                    handle(handler_state.clone(), app, peer.clone(), arrival.clone(), request)
                });
                serve_http_on(stream, http2, service, drain, &state, "inbound").await;
            }
            Some(ALPN_TCP) => {
                let port = peer.as_ref().and_then(|p| p.port);
                relay_to_app(&state, app, peer.as_deref(), port, (remote, called), stream, &mut open).await
            }
            _ => {
                tracing::info!(?remote, "a mesh TLS connection named no weft protocol (ALPN); closed");
                state.metrics.protocol_error("inbound", ProtocolError::TlsUnknownAlpn);
            }
        }
    };
    // The operator may revoke the peer while the connection is open: then it ends.
    tokio::select! {
        () = served => {}
        () = revocations.until_revoked(certificate.identity.clone(), certificate.serial.clone()) => {
            tracing::info!(?remote, peer = %certificate.identity, "closed the connection of a peer revoked meanwhile");
        }
    }
}

/// A meshed caller as its certificate proved it, rendered once per connection: every
/// request on it is judged on these strings, and on the Service port its proxy conveyed
/// in the TLS server name. The port is the caller proxy's word, never the application's:
/// a `Host` header is written by the application, so it decides nothing here.
struct MeshCaller {
    /// The caller's SPIFFE ID, interned per worker (telemetry rows are keyed by it).
    principal: Arc<str>,
    namespace: Option<String>,
    /// `None` when the caller's proxy conveyed no port (then port rules fail closed).
    port: Option<u16>,
}

impl MeshCaller {
    fn new(identity: &str, port: Option<u16>) -> Self {
        let namespace = SpiffeId::parse(identity).ok().and_then(|id| id.workload_parts().map(|(ns, _)| ns.to_string()));
        MeshCaller { principal: telemetry::intern(identity), namespace, port }
    }
}

/// Judges one request (or, with no method, a TCP connection) from `peer` against this
/// proxy's own Service, and counts the decision. Without an own Service nothing applies.
/// The Service port is the one `peer`'s proxy conveyed; a plaintext caller's is unknown.
fn authorize(
    state: &SharedState,
    peer: Option<&MeshCaller>,
    method: &str,
    path: &str,
    headers: Option<&http::HeaderMap>,
    port: Option<u16>,
    tapped: Option<&mut tap::Tapped>,
) -> Result<(), ProxyFailure> {
    let config = state.config.load();
    let Some(own) = config.own_service else { return Ok(()) };
    let service = &config.snapshot.services[own];
    let caller =
        Caller { principal: peer.map(|p| &*p.principal), namespace: peer.and_then(|p| p.namespace.as_deref()) };
    let header = |name: &str| headers.and_then(|h| h.get(name)).and_then(|v| v.to_str().ok());
    let decision = service.authorizer.decide(&caller, &Call { method, path, port, header: &header });
    let (label, policy) = match &decision {
        Decision::Allow { policy } => ("allow", policy.clone().unwrap_or_default()),
        Decision::Deny { policy } => ("deny", policy.clone()),
    };
    if state.telemetry.enabled() {
        telemetry::record_authz(&policy, label == "allow");
    }
    if let Some(tapped) = tapped {
        tapped.authz(label, &policy);
    }
    state.metrics.authz_decisions.get_or_create(&AuthzLabels { decision: label, policy: policy.clone() }).inc();
    match decision {
        Decision::Allow { .. } => Ok(()),
        Decision::Deny { policy } => {
            let caller =
                peer.map_or_else(|| "an unauthenticated (plaintext) caller".into(), |p| p.principal.to_string());
            tracing::debug!(%caller, %policy, "request denied by authorization");
            Err(ProxyFailure::Forbidden { caller, policy })
        }
    }
}

/// Relays an opaque TCP connection from `peer` to the application, if authorization
/// allows it, made to the Service `port`. `addresses` (the caller's, and the one it
/// called) go first in a PROXY protocol header when that port asks for one.
async fn relay_to_app(
    state: &SharedState,
    app: SocketAddr,
    peer: Option<&MeshCaller>,
    port: Option<u16>,
    addresses: (Option<SocketAddr>, Option<SocketAddr>),
    stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    connection: &mut OpenConnection,
) {
    if !authorize_connection(state, peer, port) {
        return;
    }
    let header = match addresses {
        (Some(caller), Some(called)) => proxy_header(state, port, caller, called),
        _ => None,
    };
    match transport::connect_tcp(app, state.settings.connect_timeout).await {
        Ok(mut upstream) => {
            if let Some(header) = header {
                use tokio::io::AsyncWriteExt;
                if let Err(error) = upstream.write_all(&header).await {
                    tracing::debug!(%app, %error, "the application closed before the PROXY protocol header");
                    return;
                }
            }
            let (sent, received) = tcp::relay(state, "inbound", state.own_label.clone(), stream, upstream).await;
            connection.relayed(sent, received);
        }
        Err(error) => {
            tracing::warn!(%app, %error, "cannot connect to the local application; closing the inbound TCP connection")
        }
    }
}

/// [`authorize`] for an opaque TCP connection: HTTP-only conditions (methods, paths,
/// headers) never match it. A denied connection is closed.
fn authorize_connection(state: &SharedState, peer: Option<&MeshCaller>, port: Option<u16>) -> bool {
    match authorize(state, peer, "", "/", None, port, None) {
        Ok(()) => true,
        Err(failure) => {
            tracing::info!(%failure, "closed an inbound TCP connection");
            false
        }
    }
}

async fn handle(
    state: Arc<SharedState>,
    app: SocketAddr,
    // The caller's identity, proven by mutual TLS; `None` for a plaintext caller.
    peer: Option<Arc<MeshCaller>>,
    // The caller's address, passed on as `X-Forwarded-For` (under capture).
    captured: Option<Arc<Arrival>>,
    mut request: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let started = Instant::now();
    if let Some(client) = captured.as_ref().and_then(|a| a.forwarded_for.clone()) {
        request.headers_mut().append(http::header::HeaderName::from_static("x-forwarded-for"), client);
    }
    let grpc = is_grpc(request.headers());
    let upgrade = forward::is_upgrade(&request).then(|| hyper::upgrade::on(&mut request));
    let (mut parts, incoming) = request.into_parts();
    let (mut span, trace_id) = begin_span(&state, peer.as_deref(), &mut parts, started);
    // Counts a request body of undeclared length for the log line and tap event.
    let mut counted = None;
    let logged = arrival(&state, &mut parts, &incoming, &mut counted, started);
    let mut tapped = if state.taps.watching() {
        use http_body::Body as _;
        let authority = forward::checked_authority(&parts).ok().flatten().unwrap_or_default().to_string();
        let length = Counter::length_or(incoming.size_hint().exact(), &mut counted);
        state.taps.begin(tap::Direction::Inbound, &state.own_label, &parts, &authority, length, started)
    } else {
        None
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let checked = forward::checked_authority(&parts).map(|a| a.map_or_else(|| app.to_string(), str::to_string));
    let judged = checked.map_err(|reason| ProxyFailure::BadRequest(reason.into())).and_then(|authority| {
        let tapped = tapped.as_deref_mut();
        let port = peer.as_ref().and_then(|p| p.port).or(captured.as_ref().and_then(|a| a.port));
        authorize(&state, peer.as_deref(), parts.method.as_str(), path, Some(&parts.headers), port, tapped)
            .map(|()| authority)
    });
    let authority = match judged {
        Ok(authority) => authority,
        Err(failure) => {
            let reason = failure.reason();
            if let Some(span) = span.as_mut() {
                span.error(reason, failure.to_string());
            }
            let response = failure.into_response(grpc);
            let watchers = Watchers { span, trace_id, logged, tapped };
            return Ok(observe(&state, peer.as_deref(), response, reason, false, grpc, started, watchers));
        }
    };
    let wire = if parts.version == http::Version::HTTP_2 { Wire::Http2 } else { Wire::Http1 };
    forward::prepare(&mut parts, &authority, wire, upgrade.is_some());
    let request = Request::from_parts(parts, Counter::maybe_count(counted.as_ref(), body::boxed(incoming)));
    let result = match upgrade {
        Some(downstream) => {
            // Boxed: rare, and its future would otherwise size every request's.
            Box::pin(state.connector.send_upgrade(Upstream::App(app), &state.inbound_limiter, request)).await.map(
                |mut response| {
                    if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                        forward::spawn_tunnel(downstream, hyper::upgrade::on(&mut response));
                        let mut response = response.map(body::boxed);
                        forward::prepare_response(&mut response, true);
                        response
                    } else {
                        response.map(body::boxed)
                    }
                },
            )
        }
        None => state
            .connector
            .send(Upstream::App(app), wire, &state.inbound_limiter, request)
            .await
            .map_err(|f| f.error)
            .map(|mut response| {
                forward::prepare_response(&mut response, false);
                response
            }),
    };
    let (response, error, transport_error) = match result {
        Ok(response) => (response, "", false),
        Err(error) => {
            let failure = match error {
                SendError::Connect(e) => ProxyFailure::ConnectFailed { endpoint: app, reason: e.to_string() },
                SendError::Reset(e) => ProxyFailure::UpstreamReset { endpoint: app, reason: e.to_string() },
                SendError::Limit(e) => ProxyFailure::Overloaded(e.to_string()),
                SendError::Timeout(_) => ProxyFailure::TryTimeout,
                SendError::RequestBody(e) => {
                    crate::protocol_errors::broken_body(&state.metrics, "inbound", e.to_string())
                }
            };
            tracing::debug!(%failure, "inbound request failed");
            let reason = failure.reason();
            if let Some(span) = span.as_mut() {
                span.error(reason, failure.to_string());
            }
            let transport_error = failure.is_transport_error();
            (failure.into_response(grpc), reason, transport_error)
        }
    };
    let watchers = Watchers { span, trace_id, logged, tapped };
    Ok(observe(&state, peer.as_deref(), response, error, transport_error, grpc, started, watchers))
}

/// The request as its access log line describes it, when this proxy's own Service logs
/// it.
fn arrival(
    state: &SharedState,
    parts: &mut http::request::Parts,
    incoming: &Incoming,
    counted: &mut Option<Counter>,
    started: Instant,
) -> Option<Box<access_log::Arrival>> {
    use http_body::Body as _;
    let config = state.config.load();
    let own = &config.snapshot.services[config.own_service?];
    if !access_log::wanted(&own.policy.access_log) {
        return None;
    }
    let length = Counter::length_or(incoming.size_hint().exact(), counted);
    let mut arrival = access_log::Arrival::of(parts, length, &own.policy.access_log, started);
    if config.snapshot.tracing.is_none() {
        // With tracing on, `begin_span` made it.
        arrival.ensure_request_id(&mut parts.headers);
    }
    Some(arrival)
}

/// Decides the request's trace, by this proxy's own Service's sampling rate, and when it
/// is sampled starts its SERVER span, whose id the application receives as its parent;
/// returns the span and the trace id (sampled or not, for logs and tap). With tracing
/// on, a request without `x-request-id` gets one.
fn begin_span(
    state: &SharedState,
    peer: Option<&MeshCaller>,
    parts: &mut http::request::Parts,
    started: Instant,
) -> (Option<PendingSpan>, Option<trace_context::TraceId>) {
    let config = state.config.load();
    let Some(settings) = config.snapshot.tracing.as_ref() else { return (None, None) };
    let mut scanned = trace_context::scan(&parts.headers);
    trace_context::ensure_request_id(&mut parts.headers, &mut scanned);
    let own = config.own_service.map(|i| &config.snapshot.services[i]);
    let rate = spans::rate_for(settings, own.and_then(|s| s.policy.trace_sampling));
    let trace = RequestTrace::begin(&scanned, rate, || peer.is_some_and(|p| settings.may_force(&p.principal)));
    if !trace.sampled {
        return (None, Some(trace.trace_id));
    }
    let id = trace_context::new_span_id();
    let mut span = PendingSpan::start(&trace, id, Kind::Server, parts.method.to_string(), started);
    let authority = forward::checked_authority(parts).ok().flatten().unwrap_or_default().to_string();
    span.request(&parts.method, parts.uri.path(), &authority, parts.version);
    if let Some(peer) = peer {
        span.text("weft.source_identity", &*peer.principal);
        span.text("weft.peer_identity", &*peer.principal);
    }
    if let Some(identity) = state.own_identity() {
        span.text("weft.destination_identity", &*identity);
    }
    span.text("weft.destination_service", &*state.own_label);
    if let Some(id) = parts.headers.get(trace_context::REQUEST_ID).and_then(|v| v.to_str().ok()) {
        span.text("weft.request_id", id);
    }
    trace.propagate(&mut parts.headers, &id);
    (Some(span), Some(trace.trace_id))
}

/// What records a request beyond its metrics, each when asked for: its SERVER span, its
/// access log line, its tap event.
struct Watchers {
    span: Option<PendingSpan>,
    /// The request's trace, sampled or not.
    trace_id: Option<trace_context::TraceId>,
    logged: Option<Box<access_log::Arrival>>,
    tapped: Option<Box<tap::Tapped>>,
}

/// Counts one inbound request from `peer` (`None`: plaintext): in Prometheus, and on
/// the caller's telemetry row.
#[allow(clippy::too_many_arguments)]
fn observe(
    state: &SharedState,
    peer: Option<&MeshCaller>,
    mut response: Response<Body>,
    error: &'static str,
    transport_error: bool,
    grpc: bool,
    started: Instant,
    Watchers { span, trace_id, logged, tapped }: Watchers,
) -> Response<Body> {
    let latency = started.elapsed();
    let trace_id = trace_id.filter(|_| tapped.is_some() || logged.is_some()).map(|id| trace_context::hex(&id));
    if let Some(mut span) = span {
        span.status(response.status().as_u16());
        response = span.finish_with(response);
    }
    if tapped.is_some() || logged.is_some() {
        let outcome = access_log::Outcome {
            direction: "inbound",
            source_identity: peer.map(|p| p.principal.clone()),
            destination_identity: state.own_identity(),
            source_service: None,
            destination_service: Some(state.own_label.clone()),
            error,
            upstream: state.settings.app_addr,
            route: None,
            retries: 0,
            trace_id,
        };
        if let Some(tapped) = tapped {
            response = tapped.finish(state, &outcome, peer.is_some(), response);
        }
        if let Some(arrival) = logged {
            response = access_log::finish(arrival, outcome, response);
        }
    }
    let labels = RequestLabels {
        direction: "inbound",
        source_service: empty_label(),
        destination_service: state.own_label.clone(),
        route: empty_label(),
        status_code: response.status().as_u16(),
        error,
        tls: if peer.is_some() { "true" } else { "false" },
    };
    state.metrics.record_request(labels, latency.as_secs_f64());
    if !state.telemetry.enabled() {
        return response;
    }
    let empty = empty_label();
    let row = RowRef {
        direction: Direction::Inbound,
        peer: peer.map(|p| &p.principal),
        destination: &state.own_label,
        route: &empty,
        backend: &empty,
        tls: peer.is_some(),
    };
    Answered { row, latency, retries: 0, answered: false }.record(response, grpc, transport_error)
}
