//! Replicas asking each other what only one of them knows: the proxies whose discovery
//! streams it holds (their applied versions, NACKs, certificates), for `weft get proxies`
//! on any replica.
//!
//! The call goes to the other replica's discovery port over mutual TLS with this
//! replica's own certificate (`spiffe://TD/ns/weft-system/sa/weft-control`), never with an
//! operator's token: a replica is answered because of what it is, and an operator's
//! token stays with the replica it was presented to.

use std::{sync::Arc, time::Duration};

use tonic::{Request, Response, Status};
use weft_api::discovery::{
    replicas_client::ReplicasClient, replicas_server::Replicas, Certificate, LocalProxiesRequest, LocalProxiesResponse,
    ProxyStatus,
};
use weft_identity::{tls::ALPN_GRPC, SpiffeId};

use crate::{
    control_tls::Peer,
    discovery::{CertificateRecord, Hub, ProxyRecord},
};

/// How long another replica may take to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// The gRPC service other replicas call.
pub struct ReplicasService {
    hub: Arc<Hub>,
}

impl ReplicasService {
    pub fn new(hub: Arc<Hub>) -> Self {
        ReplicasService { hub }
    }
}

#[tonic::async_trait]
impl Replicas for ReplicasService {
    async fn local_proxies(
        &self,
        request: Request<LocalProxiesRequest>,
    ) -> Result<Response<LocalProxiesResponse>, Status> {
        require_replica(&self.hub, request.extensions(), "this replica's proxies")?;
        let proxies = self.hub.proxies().into_iter().map(status_of).collect();
        Ok(Response::new(LocalProxiesResponse { proxies }))
    }
}

/// Refuses a call from anyone but another control-plane replica of this mesh (proved by
/// its certificate on the connection), naming `what` was asked for.
pub fn require_replica(hub: &Hub, extensions: &tonic::Extensions, what: &str) -> Result<(), Status> {
    let ours = SpiffeId::control_plane(hub.ca().authority.trust_domain());
    let peer = extensions.get::<Peer>().and_then(|peer| peer.identity.clone());
    if peer.as_ref() != Some(&ours) {
        return Err(Status::permission_denied(format!(
            "only control-plane replicas of this mesh ({ours}) may ask for {what}"
        )));
    }
    Ok(())
}

/// The proxies the replica at `grpc` (its discovery address) holds, asked over mutual TLS
/// with this replica's certificate.
pub async fn peer_proxies(hub: &Hub, grpc: &str) -> Result<Vec<ProxyRecord>, String> {
    let ask = async {
        let channel = dial(hub, grpc).await?;
        let answer = ReplicasClient::new(channel)
            .local_proxies(LocalProxiesRequest {})
            .await
            .map_err(|status| status.message().to_string())?;
        Ok(answer.into_inner().proxies.into_iter().map(record_of).collect())
    };
    tokio::time::timeout(ASK_TIMEOUT, ask).await.map_err(|_| format!("no answer within {ASK_TIMEOUT:?}"))?
}

/// A channel to the replica at `grpc` (its discovery address), over mutual TLS with this
/// replica's certificate, verifying that the peer is a control plane of this mesh.
pub async fn dial(hub: &Hub, grpc: &str) -> Result<tonic::transport::Channel, String> {
    let credentials = hub.control_credentials.get().ok_or("this replica has no certificate yet")?;
    let expected = SpiffeId::control_plane(hub.ca().authority.trust_domain());
    let config = credentials.client_config(expected, &[ALPN_GRPC]).map_err(|e| e.to_string())?;
    weft_api::channel::control_channel(grpc, Arc::new(config)).await
}

fn status_of(record: ProxyRecord) -> ProxyStatus {
    ProxyStatus {
        proxy_id: record.proxy_id,
        namespace: record.namespace,
        service: record.service.unwrap_or_default(),
        address: record.address.unwrap_or_default(),
        proxy_version: record.proxy_version,
        control_plane: record.control_plane,
        connected_at: record.connected_at,
        subscriptions: record.subscriptions as u32,
        sent_version: record.sent_version,
        applied_version: record.applied_version,
        last_nack: record.last_nack.unwrap_or_default(),
        identity: record.identity.unwrap_or_default(),
        admin_address: record.admin_address.unwrap_or_default(),
        certificate: record.certificate.map(|c| Certificate {
            serial: c.serial,
            issuer: c.issuer,
            received: c.received,
            not_after: c.not_after,
        }),
    }
}

fn record_of(status: ProxyStatus) -> ProxyRecord {
    let some = |text: String| (!text.is_empty()).then_some(text);
    ProxyRecord {
        proxy_id: status.proxy_id,
        namespace: status.namespace,
        service: some(status.service),
        address: some(status.address),
        proxy_version: status.proxy_version,
        control_plane: status.control_plane,
        connected_at: status.connected_at,
        subscriptions: status.subscriptions as usize,
        sent_version: status.sent_version,
        applied_version: status.applied_version,
        last_nack: some(status.last_nack),
        identity: some(status.identity),
        admin_address: some(status.admin_address),
        certificate: status.certificate.map(|c| CertificateRecord {
            serial: c.serial,
            issuer: c.issuer,
            received: c.received,
            not_after: c.not_after,
        }),
        stream: 0,
        last_report: 0,
        view_services: Arc::default(),
        subscribed: Arc::default(),
    }
}
