//! The `Identity` gRPC service: certificate signing over the control channel, on the
//! discovery port. The policy is [`crate::signing`]'s; this module only reads the proof
//! from the call (a join token in the request, or the client certificate of the
//! connection) and maps refusals to gRPC statuses a proxy can log as they are.

use std::{sync::Arc, time::Duration};

use tonic::{Request, Response, Status};
use weft_api::discovery::{identity_server::Identity, SignRequest, SignResponse};

use crate::{
    control_tls::Peer,
    discovery::Hub,
    join_tokens::JoinTokenError,
    signing::{self, Proof, SigningError},
};

/// Signs proxies' keys.
pub struct SigningService {
    hub: Arc<Hub>,
    lifetime: Duration,
}

impl SigningService {
    /// Issues certificates lasting `lifetime` (`weft control --cert-lifetime`).
    pub fn new(hub: Arc<Hub>, lifetime: Duration) -> Self {
        SigningService { hub, lifetime }
    }
}

#[tonic::async_trait]
impl Identity for SigningService {
    async fn sign(&self, request: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let peer = request.extensions().get::<Peer>().cloned();
        let request = request.into_inner();
        let namespace = if request.namespace.is_empty() { weft_model::DEFAULT_NAMESPACE } else { &request.namespace };
        let presented = peer.as_ref().and_then(|p| p.identity.clone());
        let kind = if request.token.is_empty() { "renewal" } else { "join" };
        let proof = if !request.token.is_empty() {
            let account = (!request.service_account.is_empty()).then_some(request.service_account.as_str());
            Proof::Token { token: &request.token, namespace, account }
        } else {
            match &presented {
                Some(identity) if !identity.is_control_plane() => {
                    Proof::Certificate { identity, serial: peer.as_ref().and_then(|p| p.serial.as_deref()) }
                }
                _ => return Err(Status::unauthenticated(
                    "a first certificate needs a join token (weft proxy --token-file; make one with weft token create)",
                )),
            }
        };
        let now = std::time::SystemTime::now();
        let (_, signed) = signing::issue(&self.hub.catalog, &self.hub.ca(), proof, &request.csr, self.lifetime, now)
            .map_err(|error| {
                let remote = peer.as_ref().map(|p| p.remote.to_string()).unwrap_or_default();
                tracing::warn!(%remote, %error, "refused to sign a certificate");
                match error {
                    SigningError::Token(JoinTokenError::Store(_)) => Status::unavailable(error.to_string()),
                    SigningError::Token(_) | SigningError::OtherMesh | SigningError::Revoked(_) => {
                        Status::permission_denied(error.to_string())
                    }
                    SigningError::Identity(_) => Status::invalid_argument(error.to_string()),
                }
            })?;
        self.hub.metrics.certificates_signed.get_or_create(&crate::metrics::SignedLabels { kind }).inc();
        Ok(Response::new(SignResponse {
            certificate_chain: signed.chain_pem,
            trust_bundle: self.hub.trust_bundle().to_string(),
        }))
    }
}
