//! What the outbound listener does with a connection under capture: its original
//! destination decides.
//!
//! - The listener's own address: the application addressed the proxy explicitly (Host
//!   or `HTTP_PROXY`), served as without capture.
//! - A Service's virtual IP, or an endpoint's address (a call by IP): into the mesh. A
//!   `tcp` port is relayed at once (server-first protocols never wait on detection);
//!   otherwise HTTP is served request by request, routed by the original destination, and
//!   anything else is relayed as opaque TCP, over mutual TLS (`weft/tcp`) to meshed
//!   endpoints.
//! - A Service's virtual IP on a port it does not declare: refused.
//! - An ExternalService's (by address, or an address its host resolved to through the
//!   DNS responder, on a port it lists): passed through, labelled with its name.
//! - Anything else: MeshConfig's `outboundTrafficPolicy`: passed through to the original
//!   destination (`ALLOW_ANY`, the default) or refused (`REGISTRY_ONLY`); counted either
//!   way.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;
use weft_model::{
    snapshot::{Destination, DestinationError},
    spec::{OutboundTrafficMode, Protocol},
};

use crate::{
    detect::{self, Detected},
    listener::{serve_http, DrainWatch},
    metrics::CapturedLabels,
    outbound,
    state::SharedState,
    tcp,
};

/// Serves one connection accepted on the outbound listener while capture is on.
pub async fn serve_connection(state: Arc<SharedState>, stream: TcpStream, drain: DrainWatch) {
    let original = super::original_dst::original_destination(&stream).ok();
    let local = stream.local_addr().ok();
    let original = match original {
        // Not redirected: the application dialled the listener itself.
        None => None,
        Some(original) if Some(original) == local => None,
        Some(original) => Some(unmapped(original)),
    };
    let Some(original) = original else {
        count(&state, "explicit", "meshed");
        return outbound::serve_connection(state, stream, drain).await;
    };
    let mut config = state.config.load_full();
    if let Some(discovery) = state.discovery.get() {
        // An address not seen before may be a Service's this proxy has not discovered.
        if config.snapshot.lookup_destination(original) == Err(DestinationError::Unknown) {
            discovery.discover_address(&state, original).await;
            config = state.config.load_full();
        }
    }
    match config.snapshot.lookup_destination(original) {
        Ok(destination) => {
            let kind = match destination {
                Destination::Service { .. } => "service",
                Destination::Endpoint { .. } => "endpoint",
            };
            count(&state, kind, "meshed");
            let (service, port) = destination.service_port();
            let protocol = config.snapshot.services[service].ports[port].protocol;
            let mut backend = config.backends[service][port].clone();
            if let Destination::Endpoint { endpoint, .. } = destination {
                let address = config.snapshot.services[service].ports[port].endpoints[endpoint].address;
                match backend.only(address) {
                    Some(only) => backend = Arc::new(only),
                    None => {
                        tracing::debug!(%original, "a call by IP to an endpoint that takes no traffic now; closed");
                        return;
                    }
                }
            }
            drop(config);
            let detected = match protocol {
                Protocol::Tcp => Detected::Opaque,
                _ => match detect::detect(&stream, state.settings.detect_timeout).await {
                    Ok(detected) => detected,
                    Err(_) => return,
                },
            };
            match detected {
                Detected::Http1 | Detected::Http2 => {
                    let handler_state = state.clone();
                    let service = hyper::service::service_fn(move |request| {
                        outbound::handle(handler_state.clone(), Some(original), request)
                    });
                    serve_http(stream, Some(detected), service, drain, &state, "outbound").await;
                }
                Detected::Tls | Detected::Opaque | Detected::TimedOut => {
                    let _drain = drain;
                    tcp::relay_to_backend(&state, &backend, stream).await;
                }
            }
        }
        Err(DestinationError::UnknownPort { service, port }) => {
            let name = config.service_labels[service].clone();
            count(&state, "service", "refused_unknown_port");
            tracing::info!(%original, service = %name, port, "refused a captured connection: the Service has no such port");
        }
        Err(DestinationError::Unknown) => {
            let external = state.resolved_external.external_for(&config.snapshot, original);
            match (external, config.snapshot.outbound_traffic) {
                (Some(index), _) => {
                    let label: Arc<str> = config.snapshot.external[index].name.as_str().into();
                    drop(config);
                    count(&state, "external", "passthrough");
                    let _drain = drain;
                    tcp::relay_passthrough(&state, original, label, stream).await;
                }
                (None, OutboundTrafficMode::AllowAny) => {
                    drop(config);
                    count(&state, "unknown", "passthrough");
                    let _drain = drain;
                    tcp::relay_passthrough(&state, original, tcp::PASSTHROUGH.into(), stream).await;
                }
                (None, OutboundTrafficMode::RegistryOnly) => {
                    count(&state, "unknown", "refused_registry_only");
                    tracing::info!(%original, "refused a captured connection outside the mesh (outboundTrafficPolicy REGISTRY_ONLY; declare an ExternalService to let it out)");
                }
            }
        }
    }
}

/// An IPv4 destination as a dual-stack socket may report it (`::ffff:a.b.c.d`).
fn unmapped(address: SocketAddr) -> SocketAddr {
    match address {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => address,
        },
        SocketAddr::V4(_) => address,
    }
}

fn count(state: &SharedState, destination: &'static str, outcome: &'static str) {
    state.metrics.captured.get_or_create(&CapturedLabels { destination, outcome }).inc();
}
