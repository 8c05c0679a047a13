//! The admin server: `/metrics`, `/ready`, `/live` and `/config`.
//!
//! It may be bound wider than loopback so Prometheus can scrape `/metrics`; everything
//! that reveals configuration or could change state answers loopback clients only.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Instant};

use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::json;

use crate::{
    body::{self, Body},
    endpoint::monotonic_nanos,
    listener::DrainWatch,
    state::SharedState,
};

/// Serves one admin connection.
pub async fn serve_connection(
    state: Arc<SharedState>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    mut drain: DrainWatch,
) {
    let service = hyper::service::service_fn(move |request| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(&state, peer, request)) }
    });
    let connection = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        _ = drain.signaled() => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

fn text(status: StatusCode, content_type: &'static str, body_text: impl Into<bytes::Bytes>) -> Response<Body> {
    let mut response = Response::new(body::full(body_text));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    response
}

fn handle(state: &SharedState, peer: SocketAddr, request: Request<Incoming>) -> Response<Body> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "the admin endpoints are read-only: use GET\n");
    }
    match request.uri().path() {
        "/live" => text(StatusCode::OK, "text/plain", "live\n"),
        "/ready" if state.is_ready() => text(StatusCode::OK, "text/plain", "ready\n"),
        "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n"),
        "/metrics" => {
            text(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", state.metrics.encode())
        }
        "/config" if !peer.ip().is_loopback() => text(
            StatusCode::FORBIDDEN,
            "text/plain",
            "/config answers loopback clients only; query it from the proxy's host\n",
        ),
        "/config" => {
            let mut rendered = serde_json::to_string_pretty(&config_json(state)).unwrap_or_default();
            rendered.push('\n');
            text(StatusCode::OK, "application/json", rendered)
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found: try /metrics, /ready, /live or /config\n"),
    }
}

/// The live configuration and learned endpoint state, as JSON.
pub fn config_json(state: &SharedState) -> serde_json::Value {
    let config = state.config.load_full();
    let now = Instant::now();
    let now_nanos = monotonic_nanos(now);
    let mut endpoints = Vec::new();
    for (service, ports) in config.backends.iter().enumerate() {
        for (port, backend) in ports.iter().enumerate() {
            for endpoint in &backend.endpoints {
                endpoints.push(json!({
                    "service": &*config.service_labels[service],
                    "port": config.snapshot.services[service].ports[port].port,
                    "workload": endpoint.workload,
                    "address": endpoint.state.address,
                    "identity": endpoint.state.key.identity.as_deref(),
                    "weight": endpoint.weight,
                    "rttEstimateMs": endpoint.state.rtt_estimate().as_secs_f64() * 1000.0,
                    "inFlight": endpoint.state.in_flight(),
                    "ejected": endpoint.state.is_ejected(now_nanos),
                }));
            }
        }
    }
    json!({
        "version": config.version,
        "service": state.settings.service,
        "namespace": state.settings.namespace,
        "configFile": state.settings.config_path,
        "control": state.settings.control.as_ref().map(|c| json!({
            "addresses": c.addresses,
            "proxyId": c.proxy_id,
            "registeredAddress": c.registration.as_ref().map(|r| r.address.to_string()),
            "subscriptions": state.discovery.get().map(|d| d.subscriptions()),
            "trustBundle": state.discovery.get().map(|d| d.trust_bundle()),
        })),
        "identity": state.identity.get().map(|credentials| {
            let issued = credentials.current();
            json!({
                "id": issued.identity.to_string(),
                "serial": issued.serial,
                "issuer": issued.issuer,
                "notBefore": weft_identity::unix_seconds(issued.not_before),
                "notAfter": weft_identity::unix_seconds(issued.not_after),
                "expiresInSeconds": issued.not_after.duration_since(std::time::SystemTime::now()).map_or(0, |d| d.as_secs()),
            })
        }),
        "lastReloadError": *state.last_reload_error.lock().expect("lock poisoned"),
        "ports": state.ports.get(),
        "ready": state.is_ready(),
        "snapshot": &*config.snapshot,
        "endpoints": endpoints,
    })
}
