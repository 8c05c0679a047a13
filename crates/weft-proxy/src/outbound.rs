//! The outbound direction: a request from the local application to a Service.
//!
//! Host → Service port → route rule (Gateway API precedence, precompiled) → filters →
//! weighted backend → balanced endpoint → send, under the request timeout, with
//! budgeted retries. Retries and timeouts come from the Service the caller addressed;
//! balancing, outlier detection and connection limits from the backend Service that owns
//! the endpoint. A backend Service's own routes are not applied again.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Instant,
};

use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use rand::Rng;
use weft_model::{
    matching::RequestView,
    snapshot::{BackendTarget, Destination, Filter, HostLookupError, PathRewrite, RouteAction, WeightedBackend},
    spec::{RetryOn, RetrySpec},
};

use crate::{
    access_log,
    balance::Backend,
    body::{self, Body, Counter},
    endpoint::EndpointState,
    errors::{is_grpc, ProxyFailure},
    forward::{self, wire_for},
    metrics::{empty_label, RequestLabels, RetryLabels},
    pool::{SendError, SendFailure},
    protocol_errors::broken_body,
    retry::{backoff, is_idempotent, RetryBudget, TryEnd},
    spans::{self, Kind, PendingSpan, RequestTrace},
    state::{ServingConfig, SharedState},
    tap,
    telemetry::{self, Answered, Direction, RowRef},
    trace_context,
    transport::Upstream,
};

/// What a request was routed to, for its metrics and telemetry.
pub(crate) struct Routed {
    destination: Arc<str>,
    route: Arc<str>,
    /// The backend Service the request went to (empty until one is chosen).
    backend: Arc<str>,
    /// The try whose response (or failure) the caller gets, as the retry loop last set
    /// it. A lock because the exchange must stay `Send`; it is never contended, and taken
    /// once per try.
    answering: Mutex<AnsweringTry>,
    /// Whether the last try's response is the caller's, so that its try is counted with
    /// the request (the retry loop counts every other try as it ends).
    answered: AtomicBool,
    /// Whether the caller speaks gRPC (its outcome is read from `grpc-status`).
    grpc: bool,
    /// The request's trace, when MeshConfig turns tracing on (boxed, so that requests
    /// without carry one pointer).
    trace: Option<Box<RequestTrace>>,
    /// What a sampled request's spans describe.
    traced: Option<Box<TracedRequest>>,
    /// The request as its access log line describes it, when it is logged.
    logged: Option<Box<access_log::Arrival>>,
    /// The request as tap sessions see it, while an operator taps one it may match.
    tapped: Option<Box<tap::Tapped>>,
    /// Counts a request body of undeclared length for the log line and tap event.
    counted: Option<Counter>,
    /// When the request arrived.
    started: Instant,
}

/// The request as its spans describe it (sampled requests only).
struct TracedRequest {
    method: http::Method,
    path: String,
    authority: String,
    version: http::Version,
    /// The matched rule's path, OpenTelemetry's `http.route`.
    http_route: Option<Arc<str>>,
}

/// The last try of a request.
#[derive(Default)]
struct AnsweringTry {
    endpoint: Option<Arc<EndpointState>>,
    /// Tries sent so far.
    tries: u32,
    /// The answering try's CLIENT span, ended with the response body.
    span: Option<PendingSpan>,
    /// CLIENT spans made for tries.
    spans: u32,
}

impl AnsweringTry {
    /// Whether the hop the caller's response came over was mutual TLS.
    fn tls(&self) -> bool {
        self.endpoint.as_ref().is_some_and(|endpoint| endpoint.is_meshed())
    }
}

/// Serves one connection the application made to the outbound listener itself (HTTP,
/// the Service named by Host or absolute URI).
pub async fn serve_connection(
    state: Arc<SharedState>,
    stream: tokio::net::TcpStream,
    drain: crate::listener::DrainWatch,
) {
    let handler_state = state.clone();
    let service = hyper::service::service_fn(move |request| handle(handler_state.clone(), None, request));
    crate::listener::serve_http(stream, None, service, drain, &state, "outbound").await;
}

/// Handles one outbound request end to end, always producing a response.
///
/// `captured` is the original destination of a transparently captured connection: it,
/// not the Host header, chooses the Service (the Host is passed on unchanged).
pub async fn handle(
    state: Arc<SharedState>,
    captured: Option<SocketAddr>,
    request: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let started = Instant::now();
    let mut config = state.config.load_full();
    if let (Some(discovery), None) = (state.discovery.get(), captured) {
        // A service not seen before: ask the control plane, then route with what it sent.
        // Boxed, so that this rare wait does not weigh on every request's future.
        if let Some(authority) = forward::authority_of(&request) {
            if config.snapshot.lookup_host(authority) == Err(HostLookupError::UnknownHost) {
                Box::pin(discovery.discover(&state, authority)).await;
                config = state.config.load_full();
            }
        }
    }
    let grpc = is_grpc(request.headers());
    let mut routed = Routed {
        destination: empty_label(),
        route: empty_label(),
        backend: empty_label(),
        answering: Mutex::default(),
        answered: AtomicBool::new(false),
        grpc,
        trace: None,
        traced: None,
        logged: None,
        tapped: None,
        counted: None,
        started,
    };
    let result = route_request(&state, &config, captured, request, &mut routed).await;
    let (response, error, transport_error) = match result {
        Ok(response) => (response, "", false),
        Err(failure) => {
            let reason = failure.reason();
            tracing::debug!(%failure, "outbound request failed in the proxy");
            let transport_error = failure.is_transport_error();
            (failure.into_response(grpc), reason, transport_error)
        }
    };
    let latency = started.elapsed();
    let mut answering = std::mem::take(routed.answering.get_mut().unwrap_or_else(|e| e.into_inner()));
    let tls = answering.tls();
    let mut response = response;
    if let (Some(trace), Some(traced)) = (&routed.trace, &routed.traced) {
        // The try that answered ends with the body; a request no try was sent for (the
        // proxy answered it, or it was upgraded) gets one span of its own, so that the
        // trace shows what became of it.
        let span = match answering.span.take() {
            Some(span) => Some(span),
            None if answering.spans == 0 => {
                let mut span = client_span(&state, trace, trace.own_span, traced, &routed, started);
                if let Some(endpoint) = &answering.endpoint {
                    describe_endpoint(&mut span, endpoint);
                }
                if !error.is_empty() {
                    span.error(error, format!("the proxy answered: {error}"));
                }
                Some(span)
            }
            None => None,
        };
        if let Some(mut span) = span {
            span.status(response.status().as_u16());
            response = span.finish_with(response);
        }
    }
    if routed.tapped.is_some() || routed.logged.is_some() {
        let endpoint = answering.endpoint.as_ref();
        let outcome = access_log::Outcome {
            direction: "outbound",
            source_identity: state.own_identity(),
            destination_identity: endpoint.and_then(|e| e.key.identity.clone()),
            source_service: (!state.own_label.is_empty()).then(|| state.own_label.clone()),
            destination_service: Some(routed.destination.clone()),
            error,
            upstream: endpoint.map(|e| e.address),
            route: (!routed.route.is_empty()).then(|| routed.route.clone()),
            retries: answering.tries.saturating_sub(1),
            trace_id: routed.trace.as_ref().map(|t| trace_context::hex(&t.trace_id)),
        };
        if let Some(tapped) = routed.tapped.take() {
            response = tapped.finish(&state, &outcome, tls, response);
        }
        if let Some(arrival) = routed.logged.take() {
            response = access_log::finish(arrival, outcome, response);
        }
    }
    let labels = RequestLabels {
        direction: "outbound",
        source_service: state.own_label.clone(),
        destination_service: routed.destination.clone(),
        route: routed.route.clone(),
        status_code: response.status().as_u16(),
        error,
        tls: if tls { "true" } else { "false" },
    };
    state.metrics.record_request(labels, latency.as_secs_f64());
    if !state.telemetry.enabled() {
        return Ok(response);
    }
    let peer = answering.endpoint.as_ref().and_then(|endpoint| endpoint.key.identity.as_ref());
    let row = RowRef {
        direction: Direction::Outbound,
        peer,
        destination: &routed.destination,
        route: &routed.route,
        backend: &routed.backend,
        tls,
    };
    let answered = Answered {
        row,
        latency,
        retries: answering.tries.saturating_sub(1),
        answered: routed.answered.load(Ordering::Relaxed),
    };
    Ok(answered.record(response, grpc, transport_error))
}

impl Routed {
    fn answering(&self) -> std::sync::MutexGuard<'_, AnsweringTry> {
        self.answering.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes the `attempt`-th try, to `endpoint`.
    fn start_try(&self, endpoint: &Arc<EndpointState>, attempt: u32) {
        let mut answering = self.answering();
        answering.endpoint = Some(endpoint.clone());
        answering.tries = attempt;
    }

    /// Counts a try that did not answer the caller (retried, or failed) on its row.
    fn record_try_span(&self, span: PendingSpan, answers: bool) {
        let mut answering = self.answering();
        answering.spans += 1;
        if answers {
            answering.span = Some(span);
        } else {
            span.finish();
        }
    }

    fn record_try(&self, endpoint: &EndpointState, outcome: weft_api::signals::Outcome) {
        let row = RowRef {
            direction: Direction::Outbound,
            peer: endpoint.key.identity.as_ref(),
            destination: &self.destination,
            route: &self.route,
            backend: &self.backend,
            tls: endpoint.is_meshed(),
        };
        telemetry::record_try(row, outcome);
    }
}

async fn route_request(
    state: &SharedState,
    config: &ServingConfig,
    captured: Option<SocketAddr>,
    mut request: Request<Incoming>,
    routed: &mut Routed,
) -> Result<Response<Body>, ProxyFailure> {
    let downstream_upgrade = forward::is_upgrade(&request).then(|| hyper::upgrade::on(&mut request));
    let (mut parts, incoming) = request.into_parts();
    let mut authority = forward::checked_authority(&parts)
        .map_err(|reason| ProxyFailure::BadRequest(reason.into()))?
        .ok_or_else(|| ProxyFailure::BadRequest("the request has no Host".into()))?
        .to_string();
    let snapshot = &config.snapshot;
    // A captured call by IP goes to the endpoint it named (`pinned`), past the routes.
    let (service_index, port_index, pinned) = match captured {
        None => {
            let (service, port) = snapshot.lookup_host(&authority).map_err(|e| match e {
                HostLookupError::UnknownHost => ProxyFailure::UnknownHost(authority.clone()),
                HostLookupError::UnknownPort(port) => {
                    ProxyFailure::UnknownHost(format!("{authority} (the service has no port {port})"))
                }
                HostLookupError::NotHttp(port) => ProxyFailure::NotHttp(format!("{authority} port {port}")),
            })?;
            (service, port, None)
        }
        Some(original) => match snapshot.lookup_destination(original) {
            Ok(Destination::Service { service, port }) => (service, port, None),
            Ok(Destination::Endpoint { service, port, endpoint }) => {
                (service, port, Some(snapshot.services[service].ports[port].endpoints[endpoint].address))
            }
            Err(_) => {
                return Err(ProxyFailure::UnknownHost(format!(
                    "{original} (no longer a Service's or endpoint's address)"
                )))
            }
        },
    };
    routed.destination = config.service_labels[service_index].clone();
    let service = &snapshot.services[service_index];
    let port = &service.ports[port_index];
    // A request id is made only when something records it: it costs 1,200 instructions
    // per request on HTTP/1 and 5,700 on HTTP/2 (HPACK cannot index a fresh value).
    let scanned = snapshot.tracing.as_ref().map(|_| {
        let mut scanned = trace_context::scan(&parts.headers);
        trace_context::ensure_request_id(&mut parts.headers, &mut scanned);
        scanned
    });
    if access_log::wanted(&service.policy.access_log) {
        let length = Counter::length_or(incoming.size_hint().exact(), &mut routed.counted);
        let mut arrival = access_log::Arrival::of(&parts, length, &service.policy.access_log, routed.started);
        // Without tracing, nothing has looked for a request id yet: the log's own pass
        // over the headers does.
        arrival.ensure_request_id(&mut parts.headers);
        routed.logged = Some(arrival);
    }
    if state.taps.watching() {
        let length = Counter::length_or(incoming.size_hint().exact(), &mut routed.counted);
        routed.tapped =
            state.taps.begin(tap::Direction::Outbound, &state.own_label, &parts, &authority, length, routed.started);
    }
    if let (Some(settings), Some(scanned)) = (&snapshot.tracing, &scanned) {
        // The local application's identity is this proxy's.
        let may_force = || state.own_identity().is_some_and(|identity| settings.may_force(&identity));
        let trace = RequestTrace::begin(scanned, spans::rate_for(settings, service.policy.trace_sampling), may_force);
        if trace.sampled {
            routed.traced = Some(Box::new(TracedRequest {
                method: parts.method.clone(),
                path: parts.uri.path().to_string(),
                authority: authority.clone(),
                version: parts.version,
                http_route: None,
            }));
        }
        routed.trace = Some(Box::new(trace));
    }

    // The route rule, or the port itself when no route is attached.
    let action: Option<&Arc<RouteAction>> = match &port.routes {
        _ if pinned.is_some() => None,
        None => None,
        Some(rules) => {
            let view = RequestView {
                method: &parts.method,
                path: parts.uri.path(),
                query: parts.uri.query(),
                headers: &parts.headers,
            };
            let rule = rules
                .iter()
                .find(|rule| rule.matcher.matches(&view))
                .ok_or_else(|| ProxyFailure::NoRoute(routed.destination.to_string()))?;
            routed.route = rule.action.route.clone();
            if let Some(traced) = routed.traced.as_mut() {
                traced.http_route = rule.http_route.clone();
            }
            if let Some(tapped) = routed.tapped.as_mut() {
                tapped.route(&rule.action.route, rule.http_route.as_deref());
            }
            Some(&rule.action)
        }
    };
    let mut response_filters: Vec<&Filter> = Vec::new();
    // The chosen backend's weight and the rule's total, for tap (none without a route).
    let mut split = (0, 0);
    let (target, request_timeout, try_timeout) = match action {
        None => {
            (BackendTarget::Resolved { service: service_index, port: port_index }, service.policy.request_timeout, None)
        }
        Some(action) => {
            for filter in &action.filters {
                if let Filter::RequestRedirect { .. } = filter {
                    return Ok(redirect(filter, &parts, &authority));
                }
                apply_request_filter(filter, &mut parts, &mut authority, &mut response_filters);
            }
            let backend =
                pick_weighted(&action.backends).ok_or_else(|| ProxyFailure::NoBackends(action.route.to_string()))?;
            if routed.tapped.is_some() {
                split = (backend.weight, action.backends.iter().map(|b| b.weight).sum());
            }
            for filter in &backend.filters {
                apply_request_filter(filter, &mut parts, &mut authority, &mut response_filters);
            }
            (
                backend.target.clone(),
                action.timeouts.request.or(service.policy.request_timeout),
                action.timeouts.backend_request,
            )
        }
    };
    let (backend_service, backend_port) = match target {
        BackendTarget::Resolved { service, port } => (service, port),
        BackendTarget::Unresolved(what) => return Err(ProxyFailure::UnresolvedBackend(what)),
    };
    let mut backend = config.backends[backend_service][backend_port].clone();
    if let Some(address) = pinned {
        let only = backend.only(address).ok_or_else(|| ProxyFailure::NoEndpoints(format!("{address}")))?;
        backend = Arc::new(only);
    }
    routed.backend = backend.name.clone();
    if let Some(tapped) = routed.tapped.as_mut() {
        tapped.backend(&backend.name, split.0, split.1);
    }
    // Each try notes its endpoint in `routed`: the `tls` label and the telemetry rows
    // describe the hop the response (or failure) came from.
    let routed = &*routed;
    let retries = service.policy.retries.as_ref();
    let try_timeout = try_timeout.or(retries.and_then(|r| r.per_try_timeout).map(|d| d.0));
    let budget = &config.budgets[service_index];

    let exchange = async {
        if let Some(downstream_upgrade) = downstream_upgrade {
            // Boxed: upgrades are rare, and their future would otherwise size every
            // request's (see `Connector::send`).
            return Box::pin(send_upgrade(state, &backend, parts, incoming, &authority, downstream_upgrade, routed))
                .await;
        }
        send_with_retries(state, &backend, budget, retries, try_timeout, parts, incoming, &authority, routed).await
    };
    let result = match request_timeout {
        Some(limit) => tokio::time::timeout(limit, exchange).await.unwrap_or(Err(ProxyFailure::RequestTimeout)),
        None => exchange.await,
    };
    let mut response = result?;
    for filter in response_filters {
        if let Filter::ResponseHeaderModifier(modifier) = filter {
            modify_headers(response.headers_mut(), modifier);
        }
    }
    Ok(response)
}

/// Chooses one backend by weight; `None` when every weight is 0 or there are none.
fn pick_weighted(backends: &[WeightedBackend]) -> Option<&WeightedBackend> {
    let total: u64 = backends.iter().map(|b| b.weight as u64).sum();
    if total == 0 {
        return None;
    }
    if backends.len() == 1 {
        return backends.first();
    }
    let mut slot = rand::rng().random_range(0..total);
    for backend in backends {
        if slot < backend.weight as u64 {
            return Some(backend);
        }
        slot -= backend.weight as u64;
    }
    None
}

fn apply_request_filter<'a>(
    filter: &'a Filter,
    parts: &mut http::request::Parts,
    authority: &mut String,
    response_filters: &mut Vec<&'a Filter>,
) {
    match filter {
        Filter::RequestHeaderModifier(modifier) => modify_headers(&mut parts.headers, modifier),
        Filter::ResponseHeaderModifier(_) => response_filters.push(filter),
        Filter::UrlRewrite { hostname, path } => {
            if let Some(hostname) = hostname {
                *authority = hostname.clone();
            }
            if let Some(rewrite) = path {
                let new_path = rewrite.apply(parts.uri.path());
                let path_and_query = match parts.uri.query() {
                    Some(query) => format!("{new_path}?{query}"),
                    None => new_path,
                };
                if let Ok(uri) = http::Uri::try_from(path_and_query) {
                    parts.uri = uri;
                }
            }
        }
        Filter::RequestRedirect { .. } => {}
    }
}

fn modify_headers(headers: &mut http::HeaderMap, modifier: &weft_model::spec::HeaderModifier) {
    // Validation guarantees names and values parse.
    for h in &modifier.set {
        if let (Ok(name), Ok(value)) =
            (header::HeaderName::from_bytes(h.name.as_bytes()), HeaderValue::from_str(&h.value))
        {
            headers.insert(name, value);
        }
    }
    for h in &modifier.add {
        if let (Ok(name), Ok(value)) =
            (header::HeaderName::from_bytes(h.name.as_bytes()), HeaderValue::from_str(&h.value))
        {
            headers.append(name, value);
        }
    }
    for name in &modifier.remove {
        headers.remove(name.as_str());
    }
}

fn redirect(filter: &Filter, parts: &http::request::Parts, authority: &str) -> Response<Body> {
    let Filter::RequestRedirect { scheme, hostname, path, port, status_code } = filter else {
        unreachable!("called for redirects only")
    };
    let (current_host, current_port) = match authority.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => (host, Some(port)),
        _ => (authority, None),
    };
    let scheme = scheme.as_deref().unwrap_or("http");
    let host = hostname.as_deref().unwrap_or(current_host);
    // The Gateway API: an explicit port, else the default port of the scheme is omitted.
    let port = match port {
        Some(p) => Some(p.to_string()),
        None if scheme.is_empty() => current_port.map(str::to_string),
        None => None,
    };
    let path = match path {
        Some(PathRewrite::ReplaceFullPath(full)) => full.clone(),
        Some(rewrite) => rewrite.apply(parts.uri.path()),
        None => parts.uri.path().to_string(),
    };
    let default_port = matches!((scheme, port.as_deref()), ("http", Some("80")) | ("https", Some("443")));
    let mut location = format!("{scheme}://{host}");
    if let (Some(port), false) = (port, default_port) {
        location.push(':');
        location.push_str(&port);
    }
    location.push_str(&path);
    if let Some(query) = parts.uri.query() {
        location.push('?');
        location.push_str(query);
    }
    let mut response = Response::new(body::empty());
    *response.status_mut() = StatusCode::from_u16(*status_code).unwrap_or(StatusCode::FOUND);
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// Sends one request with retries. A connect failure hands the request back unsent, so
/// retrying it needs no copy and works for any method and body. Retrying after the
/// request was sent (5xx, reset, timeout) replays it: only for idempotent methods (or
/// `retryNonIdempotent`) and bodies small enough to buffer.
#[allow(clippy::too_many_arguments)]
async fn send_with_retries(
    state: &SharedState,
    backend: &Arc<Backend>,
    budget: &RetryBudget,
    retries: Option<&RetrySpec>,
    try_timeout: Option<std::time::Duration>,
    parts: http::request::Parts,
    incoming: Incoming,
    authority: &str,
    routed: &Routed,
) -> Result<Response<Body>, ProxyFailure> {
    let retry_on = retries.map(|r| r.retry_on.as_slice()).unwrap_or(&[]);
    let attempts = retries.map_or(0, |r| r.attempts);
    if attempts > 0 {
        budget.deposit();
    }
    let replays_sent_requests = attempts > 0
        && retry_on.iter().any(|condition| *condition != RetryOn::ConnectFailure)
        && retries.is_some_and(|r| r.retry_non_idempotent || is_idempotent(&parts.method));
    let bufferable = incoming.is_end_stream()
        || incoming.size_hint().exact().is_some_and(|len| len as usize <= state.settings.max_replay_body);
    let (replay, mut streaming) = if replays_sent_requests && bufferable {
        let bytes =
            incoming.collect().await.map_err(|e| broken_body(&state.metrics, "outbound", e.to_string()))?.to_bytes();
        if let Some(counted) = &routed.counted {
            counted.add(bytes.len() as u64);
        }
        (Some(bytes), None)
    } else {
        (None, Some(incoming))
    };
    let max_tries = 1 + attempts;
    let wire = wire_for(backend.protocol, is_grpc(&parts.headers));
    let mut template = Some(parts);
    let mut unsent: Option<Box<Request<Body>>> = None;
    let mut avoid: Option<Arc<crate::endpoint::EndpointState>> = None;
    let mut attempt = 1;
    loop {
        let permit =
            backend.limiter.start_request().map_err(|e| ProxyFailure::Overloaded(format!("{}: {e}", backend.name)))?;
        let endpoint =
            backend.pick(avoid.as_deref()).ok_or_else(|| ProxyFailure::NoEndpoints(backend.name.to_string()))?.clone();
        let request = match unsent.take() {
            Some(request) => *request,
            None => {
                // Copy the head only while a replay may still follow; the last try takes it.
                let mut head = if replay.is_some() && attempt < max_tries { template.clone() } else { template.take() }
                    .expect("a request head is kept while a try may need it");
                forward::prepare(&mut head, authority, wire, false);
                let body = match &replay {
                    Some(bytes) if bytes.is_empty() => body::empty(),
                    Some(bytes) => body::full(bytes.clone()),
                    None => Counter::maybe_count(
                        routed.counted.as_ref(),
                        body::boxed(streaming.take().expect("a streaming body is sent once")),
                    ),
                };
                Request::from_parts(head, body)
            }
        };
        let mut request = request;
        let started = Instant::now();
        let span = try_span(state, routed, &endpoint, attempt, request.headers_mut(), started);
        if let Some(tapped) = routed.tapped.as_deref() {
            tapped.try_started(attempt, &endpoint, backend.ejected());
        }
        let in_flight = endpoint.start_request();
        routed.start_try(&endpoint, attempt);
        let send = state.connector.send(Upstream::Endpoint(&endpoint), wire, &backend.limiter, request);
        let result = match try_timeout {
            Some(limit) => tokio::time::timeout(limit, send)
                .await
                .unwrap_or_else(|_| Err(SendFailure { error: SendError::Timeout(limit), unsent: None })),
            None => send.await,
        };
        let (result, returned) = match result {
            Ok(response) => (Ok(response), None),
            Err(failure) => (Err(failure.error), failure.unsent),
        };
        let end = match &result {
            Ok(response) => TryEnd::Status(response.status().as_u16()),
            Err(SendError::Connect(_) | SendError::Limit(_)) => TryEnd::ConnectFailure,
            Err(SendError::Timeout(_)) => TryEnd::Timeout,
            Err(SendError::Reset(_)) => TryEnd::Reset,
            // The caller broke its own body: nothing to learn of the endpoint, nothing to
            // retry (the body is gone).
            Err(SendError::RequestBody(error)) => {
                return Err(broken_body(&state.metrics, "outbound", error.to_string()))
            }
        };
        // A limit refusal says nothing about the endpoint, and sent nothing.
        let elapsed = started.elapsed();
        let mut ejected = None;
        if !matches!(result, Err(SendError::Limit(_))) {
            let latency = observed_latency(end, elapsed, state.settings.connect_timeout);
            ejected = backend.record_try(&endpoint, end.outcome(), latency, &state.metrics);
        }
        let resendable = returned.is_some() || template.is_some();
        let retryable = end.is_retryable(retry_on);
        let retrying = attempt < max_tries && resendable && retryable;
        if state.telemetry.enabled() && !matches!(result, Err(SendError::Limit(_))) {
            // The try that answers the caller is counted with the request, when its
            // outcome is known (a gRPC status may come in trailers); every other now.
            match &result {
                Ok(_) if !retrying => routed.answered.store(true, Ordering::Relaxed),
                Ok(response) => {
                    let outcome = telemetry::outcome_of(response.status().as_u16(), response.headers(), routed.grpc);
                    routed.record_try(&endpoint, outcome)
                }
                Err(_) => routed.record_try(&endpoint, weft_api::signals::Outcome::TransportError),
            }
        }
        if let Some(mut span) = span {
            let answers = result.is_ok() && !retrying;
            match &result {
                Ok(response) if !answers => span.status(response.status().as_u16()),
                Ok(_) => {}
                Err(error) => span.error(try_error_reason(error), error.to_string()),
            }
            routed.record_try_span(span, answers);
        }
        let granted = retrying && budget.try_withdraw();
        if let Some(tapped) = routed.tapped.as_deref() {
            let then = match (retrying, granted) {
                (true, true) => "retried",
                (true, false) => "budget_exhausted",
                _ if retryable && attempt >= max_tries => "attempts_exhausted",
                _ if retryable => "not_replayable",
                _ => "answered",
            };
            tapped.try_ended(tap::TryEnd {
                status: result.as_ref().map_or(0, |response| response.status().as_u16()),
                error: result.as_ref().err().map_or("", try_error_reason),
                duration: elapsed,
                ejected,
                then,
                budget_left: if granted { budget.headroom() } else { 0 },
            });
        }
        if retrying {
            if granted {
                state
                    .metrics
                    .retries
                    .get_or_create(&RetryLabels { destination_service: backend.name.clone(), outcome: "retried" })
                    .inc();
                drop((result, in_flight, permit));
                let pause = backoff(&retries.expect("retries configured").backoff, attempt);
                tokio::time::sleep(pause).await;
                unsent = returned;
                avoid = Some(endpoint);
                attempt += 1;
                continue;
            }
            state
                .metrics
                .retries
                .get_or_create(&RetryLabels { destination_service: backend.name.clone(), outcome: "budget_exhausted" })
                .inc();
        }
        return match result {
            Ok(mut response) => {
                forward::prepare_response(&mut response, false);
                Ok(response.map(|b| body::Guarded::wrap(b, (in_flight, permit))))
            }
            Err(SendError::Connect(error)) => {
                Err(ProxyFailure::ConnectFailed { endpoint: endpoint.address, reason: error.to_string() })
            }
            Err(SendError::Limit(error)) => Err(ProxyFailure::Overloaded(format!("{}: {error}", backend.name))),
            Err(SendError::Timeout(_)) => Err(ProxyFailure::TryTimeout),
            Err(SendError::Reset(error)) => {
                Err(ProxyFailure::UpstreamReset { endpoint: endpoint.address, reason: error.to_string() })
            }
            Err(SendError::RequestBody(error)) => Err(broken_body(&state.metrics, "outbound", error.to_string())),
        };
    }
}

/// Propagates the request's trace on one try and, when it is sampled, starts the try's
/// CLIENT span (whose id the endpoint's side names as its parent).
fn try_span(
    state: &SharedState,
    routed: &Routed,
    endpoint: &EndpointState,
    attempt: u32,
    headers: &mut http::HeaderMap,
    started: Instant,
) -> Option<PendingSpan> {
    let trace = routed.trace.as_ref()?;
    // Unsampled: the request goes on with what it carried (see `RequestTrace::propagate`).
    let traced = routed.traced.as_deref()?;
    let id = trace_context::new_span_id();
    trace.propagate(headers, &id);
    let mut span = client_span(state, trace, id, traced, routed, started);
    describe_endpoint(&mut span, endpoint);
    if attempt > 1 {
        span.int("http.request.resend_count", (attempt - 1) as i64);
    }
    span.int("weft.try", attempt as i64);
    Some(span)
}

/// A CLIENT span of the request, with what every try shares.
fn client_span(
    state: &SharedState,
    trace: &RequestTrace,
    id: trace_context::SpanId,
    traced: &TracedRequest,
    routed: &Routed,
    started: Instant,
) -> PendingSpan {
    let name = match &traced.http_route {
        Some(route) => format!("{} {route}", traced.method),
        None => traced.method.to_string(),
    };
    let mut span = PendingSpan::start(trace, id, Kind::Client, name, started);
    span.request(&traced.method, &traced.path, &traced.authority, traced.version);
    if let Some(route) = &traced.http_route {
        span.text("http.route", &**route);
    }
    span.text("weft.destination_service", &*routed.destination);
    if !routed.route.is_empty() {
        span.text("weft.route", &*routed.route);
    }
    if !routed.backend.is_empty() {
        span.text("weft.backend", &*routed.backend);
    }
    if let Some(identity) = state.own_identity() {
        span.text("weft.source_identity", &*identity);
    }
    span.text("weft.source_service", &*state.own_label);
    span
}

/// The endpoint a try went to.
fn describe_endpoint(span: &mut PendingSpan, endpoint: &EndpointState) {
    span.text("weft.endpoint", endpoint.address.to_string());
    if let Some(identity) = &endpoint.key.identity {
        span.text("weft.peer_identity", &**identity);
        span.text("weft.destination_identity", &**identity);
    }
}

/// The `weft-error` reason a failed try would give, for its span and tap.
fn try_error_reason(error: &SendError) -> &'static str {
    match error {
        SendError::Connect(_) => "connect-failed",
        SendError::Limit(_) => "overloaded",
        SendError::Timeout(_) => "per-try-timeout",
        SendError::Reset(_) => "upstream-reset",
        SendError::RequestBody(_) => "request-body-broken",
    }
}

/// The latency a try teaches the balancer. Failures count at least the connect timeout:
/// a refused connection or a quick 503 is not a fast endpoint, and without the penalty
/// latency-aware balancing would pour traffic into it (the "black hole" effect).
fn observed_latency(end: TryEnd, elapsed: std::time::Duration, penalty: std::time::Duration) -> std::time::Duration {
    match end {
        TryEnd::Status(status) if !(502..=504).contains(&status) => elapsed,
        _ => elapsed.max(penalty),
    }
}

#[allow(clippy::too_many_arguments)]
async fn send_upgrade(
    state: &SharedState,
    backend: &Arc<Backend>,
    mut parts: http::request::Parts,
    incoming: Incoming,
    authority: &str,
    downstream_upgrade: hyper::upgrade::OnUpgrade,
    routed: &Routed,
) -> Result<Response<Body>, ProxyFailure> {
    let permit =
        backend.limiter.start_request().map_err(|e| ProxyFailure::Overloaded(format!("{}: {e}", backend.name)))?;
    let endpoint = backend.pick(None).ok_or_else(|| ProxyFailure::NoEndpoints(backend.name.to_string()))?.clone();
    routed.start_try(&endpoint, 1);
    if let Some(trace) = &routed.trace {
        // No span per try here: the request's one span (see `handle`) is the parent.
        trace.propagate(&mut parts.headers, &trace.own_span);
    }
    // One try, whose answer (or failure) is the caller's.
    routed.answered.store(true, Ordering::Relaxed);
    forward::prepare(&mut parts, authority, crate::pool::Wire::Http1, true);
    let request = Request::from_parts(parts, body::boxed(incoming));
    let mut response =
        state.connector.send_upgrade(Upstream::Endpoint(&endpoint), &backend.limiter, request).await.map_err(|e| {
            match e {
                SendError::Connect(error) => {
                    ProxyFailure::ConnectFailed { endpoint: endpoint.address, reason: error.to_string() }
                }
                SendError::Limit(error) => ProxyFailure::Overloaded(format!("{}: {error}", backend.name)),
                SendError::Reset(error) => {
                    ProxyFailure::UpstreamReset { endpoint: endpoint.address, reason: error.to_string() }
                }
                SendError::Timeout(_) => ProxyFailure::TryTimeout,
                SendError::RequestBody(error) => broken_body(&state.metrics, "outbound", error.to_string()),
            }
        })?;
    drop(permit);
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        forward::spawn_tunnel(downstream_upgrade, upstream_upgrade);
        let mut response = response.map(body::boxed);
        forward::prepare_response(&mut response, true);
        return Ok(response);
    }
    let mut response = response.map(body::boxed);
    forward::prepare_response(&mut response, false);
    Ok(response)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn failures_are_never_cheaper_than_the_connect_timeout() {
        let penalty = Duration::from_secs(1);
        let quick = Duration::from_micros(200);
        assert_eq!(observed_latency(TryEnd::Status(200), quick, penalty), quick);
        assert_eq!(observed_latency(TryEnd::Status(500), quick, penalty), quick, "an app error is the app's answer");
        for end in [TryEnd::Status(503), TryEnd::ConnectFailure, TryEnd::Reset, TryEnd::Timeout] {
            assert_eq!(observed_latency(end, quick, penalty), penalty, "{end:?}");
        }
        assert_eq!(observed_latency(TryEnd::Timeout, Duration::from_secs(3), penalty), Duration::from_secs(3));
    }
}
