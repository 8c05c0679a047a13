//! Opaque TCP forwarding: `--upstream` listeners toward a Service, and inbound
//! connections that are not HTTP.

use std::{sync::Arc, time::Instant};

use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};
use weft_model::snapshot::HostLookupError;

use crate::{
    balance::Backend,
    endpoint::TryOutcome,
    metrics::{TcpBytesLabels, TcpLabels},
    settings::UpstreamListener,
    state::SharedState,
    telemetry::{Direction, OpenConnection, TcpKey},
    transport,
};

/// Tries to connect to different endpoints before giving up on a TCP client.
const CONNECT_TRIES: usize = 3;

/// Copies bytes both ways until both sides close, then counts them; returns them
/// (toward the destination, and back).
pub async fn relay(
    state: &SharedState,
    direction: &'static str,
    destination: Arc<str>,
    mut client: impl AsyncRead + AsyncWrite + Unpin,
    mut upstream: impl AsyncRead + AsyncWrite + Unpin,
) -> (u64, u64) {
    state
        .metrics
        .tcp_connections
        .get_or_create(&TcpLabels { direction, destination_service: destination.clone() })
        .inc();
    let (sent, received) = match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok(counts) => counts,
        Err(error) => {
            tracing::debug!(%error, "TCP relay ended with an error");
            (0, 0)
        }
    };
    let bytes = |flow| TcpBytesLabels { direction, destination_service: destination.clone(), flow };
    state.metrics.tcp_bytes.get_or_create(&bytes("sent")).inc_by(sent);
    state.metrics.tcp_bytes.get_or_create(&bytes("received")).inc_by(received);
    (sent, received)
}

/// Serves one client of an `--upstream` listener: picks an endpoint of the Service
/// (trying others if connects fail) and relays.
pub async fn serve_upstream_client(state: Arc<SharedState>, upstream: Arc<UpstreamListener>, mut client: TcpStream) {
    let config = state.config.load_full();
    let snapshot = &config.snapshot;
    let resolved = snapshot
        .service(&state.settings.namespace, &upstream.service)
        .ok_or(HostLookupError::UnknownHost)
        .and_then(|service| {
            let ports = &snapshot.services[service].ports;
            let port = match upstream.port {
                Some(number) => {
                    ports.iter().position(|p| p.port == number).ok_or(HostLookupError::UnknownPort(number))?
                }
                None => 0,
            };
            Ok((service, port))
        });
    let (service, port) = match resolved {
        Ok(found) => found,
        Err(error) => {
            tracing::warn!(service = %upstream.service, ?error, "--upstream target is not a known service port; closing the client connection");
            let _ = client.shutdown().await;
            return;
        }
    };
    let backend = config.backends[service][port].clone();
    relay_to_backend(&state, &backend, client).await;
}

/// Relays `client` to an endpoint of `backend`, trying others if connects fail.
pub async fn relay_to_backend(state: &SharedState, backend: &Backend, client: TcpStream) {
    let mut avoid: Option<Arc<crate::endpoint::EndpointState>> = None;
    for _ in 0..CONNECT_TRIES {
        let Some(endpoint) = backend.pick(avoid.as_deref()).cloned() else {
            tracing::warn!(service = %backend.name, "no endpoints for TCP upstream; closing the client connection");
            return;
        };
        let started = Instant::now();
        let upstream = transport::Upstream::Endpoint(&endpoint);
        let revoked = state.connector.revocations.current();
        match transport::connect(upstream, transport::Carried::Tcp, state.settings.connect_timeout, &revoked).await {
            Ok(stream) => {
                backend.record_try(&endpoint, TryOutcome::Success, started.elapsed(), &state.metrics);
                let _in_flight = endpoint.start_request();
                let key = state.telemetry.enabled().then(|| TcpKey {
                    direction: Direction::Outbound,
                    peer: endpoint.key.identity.clone(),
                    destination: backend.name.clone(),
                    tls: endpoint.is_meshed(),
                });
                let mut connection = OpenConnection::open(key);
                let peer = stream.peer();
                let relayed = relay(state, "outbound", backend.name.clone(), client, stream);
                match peer {
                    None => {
                        let (sent, received) = relayed.await;
                        connection.relayed(sent, received);
                    }
                    Some(peer) => tokio::select! {
                        (sent, received) = relayed => connection.relayed(sent, received),
                        () = state.connector.revocations.until_revoked(peer.identity.clone(), peer.serial) => {
                            tracing::info!(peer = %peer.identity, "closed a TCP connection to a revoked peer");
                        }
                    },
                }
                return;
            }
            Err(error) => {
                tracing::debug!(endpoint = %endpoint.address, %error, "TCP connect failed; trying another endpoint");
                // A refused connect is not a fast endpoint: it counts the connect timeout.
                let latency = started.elapsed().max(state.settings.connect_timeout);
                backend.record_try(&endpoint, TryOutcome::ConnectFailure, latency, &state.metrics);
                avoid = Some(endpoint);
            }
        }
    }
    tracing::warn!(service = %backend.name, "could not connect to any endpoint; closing the TCP client");
}

/// The `destination_service` label of connections passed through to destinations the
/// mesh does not know (MeshConfig `outboundTrafficPolicy: ALLOW_ANY`).
pub const PASSTHROUGH: &str = "passthrough";

/// Relays a captured `client` to `original`, the destination it was going to before
/// capture, outside the mesh (ALLOW_ANY, or an ExternalService), counted under `label`.
pub async fn relay_passthrough(
    state: &SharedState,
    original: std::net::SocketAddr,
    label: Arc<str>,
    client: TcpStream,
) {
    match transport::connect_tcp(original, state.settings.connect_timeout).await {
        Ok(upstream) => {
            relay(state, "outbound", label, client, upstream).await;
        }
        Err(error) => tracing::debug!(%original, %error, "passthrough connect failed; closing the client"),
    }
}
