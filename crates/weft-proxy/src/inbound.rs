//! The inbound direction: traffic from other services to the local application.
//!
//! The protocol comes from this proxy's own Service declaration when it has only `tcp`
//! ports (server-first protocols must not wait for detection); otherwise detection peeks
//! at the first bytes. HTTP is forwarded request by request over pooled connections to
//! `--app-addr`, with telemetry; anything else is relayed as opaque TCP.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::net::TcpStream;
use weft_model::spec::Protocol;

use crate::{
    body::{self, Body},
    detect::{detect, Detected},
    errors::{is_grpc, ProxyFailure},
    forward,
    listener::{serve_http, DrainWatch},
    metrics::empty_label,
    outbound::{record, Routed},
    pool::{SendError, Wire},
    state::SharedState,
    tcp, transport,
};

/// Serves one accepted inbound connection.
pub async fn serve_connection(state: Arc<SharedState>, stream: TcpStream, drain: DrainWatch) {
    let Some(app) = state.settings.app_addr else { return };
    let config = state.config.load_full();
    let own = config.own_service.map(|i| &config.snapshot.services[i]);
    let opaque_by_declaration = own.is_some_and(|s| s.ports.iter().all(|p| p.protocol == Protocol::Tcp));
    let detected = if opaque_by_declaration {
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
    match detected {
        Detected::Opaque => match transport::connect(app, state.settings.connect_timeout).await {
            Ok(upstream) => tcp::relay(&state, "inbound", state.own_label.clone(), stream, upstream).await,
            Err(error) => {
                tracing::warn!(%app, %error, "cannot connect to the local application; closing the inbound TCP connection")
            }
        },
        Detected::Http1 | Detected::Http2 => {
            let handler_state = state.clone();
            let service = hyper::service::service_fn(move |request| handle(handler_state.clone(), app, request));
            serve_http(stream, Some(detected), service, drain, &state.settings).await;
        }
    }
}

async fn handle(
    state: Arc<SharedState>,
    app: SocketAddr,
    mut request: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let started = Instant::now();
    let grpc = is_grpc(request.headers());
    let upgrade = forward::is_upgrade(&request).then(|| hyper::upgrade::on(&mut request));
    let (mut parts, incoming) = request.into_parts();
    let authority = forward::authority(&parts).unwrap_or_else(|| app.to_string());
    let wire = if parts.version == http::Version::HTTP_2 { Wire::Http2 } else { Wire::Http1 };
    forward::prepare(&mut parts, &authority, wire, upgrade.is_some());
    let request = Request::from_parts(parts, body::boxed(incoming));
    let result = match upgrade {
        Some(downstream) => {
            state.connector.send_upgrade(app, &state.inbound_limiter, request).await.map(|mut response| {
                if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                    forward::spawn_tunnel(downstream, hyper::upgrade::on(&mut response));
                    let mut response = response.map(body::boxed);
                    forward::prepare_response(&mut response, true);
                    response
                } else {
                    response.map(body::boxed)
                }
            })
        }
        None => state.connector.send(app, wire, &state.inbound_limiter, request).await.map_err(|f| f.error).map(
            |mut response| {
                forward::prepare_response(&mut response, false);
                response
            },
        ),
    };
    let (response, error) = match result {
        Ok(response) => (response, ""),
        Err(error) => {
            let failure = match error {
                SendError::Connect(e) => ProxyFailure::ConnectFailed { endpoint: app, reason: e.to_string() },
                SendError::Reset(e) => ProxyFailure::UpstreamReset { endpoint: app, reason: e.to_string() },
                SendError::Limit(e) => ProxyFailure::Overloaded(e.to_string()),
                SendError::Timeout(_) => ProxyFailure::TryTimeout,
            };
            tracing::debug!(%failure, "inbound request failed");
            let reason = failure.reason();
            (failure.into_response(grpc), reason)
        }
    };
    record(
        &state,
        "inbound",
        empty_label(),
        Routed::new(state.own_label.clone()),
        response.status().as_u16(),
        error,
        started,
    );
    Ok(response)
}
