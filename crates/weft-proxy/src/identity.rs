//! The proxy's workload identity: it joins the mesh with a join token, then keeps a
//! short-lived certificate renewed for as long as it runs.
//!
//! The key is made here, in memory, and never leaves the proxy: the control plane sees
//! only a signing request. The first request goes over a TLS connection that trusts only
//! the root named by the token's hash; renewals go over mutual TLS with the current
//! certificate, at about 70% of its life (with jitter, so that a fleet started together
//! does not renew together). A renewed certificate is used from the next handshake;
//! open connections are not touched. If the certificate expires anyway (a control plane
//! unreachable for that long), the proxy joins again with its token.
//!
//! [`control_channel`] is the one way this proxy dials a control plane, for signing and
//! for discovery alike.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    ClientConfig,
};
use tokio::sync::watch;
use tonic::{transport::Channel, Code};
use weft_api::discovery::{identity_client::IdentityClient, SignRequest};
use weft_identity::{
    authority::new_key_and_request,
    tls::{bootstrap_client_config, Credentials, Issued, ALPN_GRPC, WRONG_ROOT},
    token::{Token, TokenKind},
    SpiffeId,
};

/// Renewal happens this far into a certificate's life, give or take [`RENEW_JITTER`].
pub const RENEW_AT: f64 = 0.7;
const RENEW_JITTER: f64 = 0.05;

/// A join token as read from `--token-file`: a secret, never printed.
#[derive(Clone)]
pub struct JoinTokenSecret(String);

impl std::fmt::Debug for JoinTokenSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinTokenSecret(..)")
    }
}

impl JoinTokenSecret {
    /// Checks the token's shape; `source` names where it came from, for the error.
    pub fn new(text: &str, source: &str) -> Result<Self, String> {
        match Token::parse(text) {
            Some(token) if token.kind == TokenKind::Join => Ok(JoinTokenSecret(text.trim().to_string())),
            Some(_) => Err(format!(
                "{source} holds an operator token (wo1.…), which is for the API; a proxy joins with a join token: \
                 weft token create --service NAME"
            )),
            None => Err(format!(
                "{source} does not hold a join token (wj1.…); make one with: weft token create --service NAME"
            )),
        }
    }

    fn root_hash(&self) -> &str {
        Token::parse(&self.0).map(|t| t.root_hash).unwrap_or_default()
    }
}

/// Who this proxy asks to be.
#[derive(Clone, Debug)]
pub struct IdentitySettings {
    pub token: JoinTokenSecret,
    pub namespace: String,
    /// `None`: whatever account the token was made for.
    pub service_account: Option<String>,
}

/// Why a certificate could not be had.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The control plane said no; trying again will not help.
    #[error("the control plane refused this proxy's join token: {0}")]
    Refused(String),
    /// Unreachable, or the answer was unusable; worth another try.
    #[error("{0}")]
    Unavailable(String),
}

pub use weft_api::channel::control_channel;

/// One signing call over `channel`: a fresh key, signed for the identity the token (or
/// the connection's certificate, when `token` is `None`) proves.
async fn sign(
    channel: Channel,
    token: Option<&JoinTokenSecret>,
    settings: &IdentitySettings,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>, Vec<CertificateDer<'static>>), JoinError> {
    let (key_pem, csr) = new_key_and_request().map_err(|e| JoinError::Unavailable(e.to_string()))?;
    let request = SignRequest {
        token: token.map(|t| t.0.clone()).unwrap_or_default(),
        namespace: settings.namespace.clone(),
        service_account: settings.service_account.clone().unwrap_or_default(),
        csr,
    };
    let response = IdentityClient::new(channel).sign(request).await.map_err(|status| match status.code() {
        Code::PermissionDenied | Code::Unauthenticated | Code::InvalidArgument => {
            JoinError::Refused(status.message().to_string())
        }
        _ => JoinError::Unavailable(format!("signing failed: {}", status.message())),
    })?;
    let response = response.into_inner();
    let pems = |text: &str| -> Result<Vec<CertificateDer<'static>>, JoinError> {
        CertificateDer::pem_slice_iter(text.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| JoinError::Unavailable(format!("the control plane sent unreadable certificates: {e}")))
    };
    let chain = pems(&response.certificate_chain)?;
    let roots = pems(&response.trust_bundle)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| JoinError::Unavailable(e.to_string()))?;
    Ok((chain, key, roots))
}

/// Joins through `address` with the token: TLS that trusts only the token's root.
async fn join_once(address: &str, settings: &IdentitySettings) -> Result<Issued, JoinError> {
    let (config, pinned) =
        bootstrap_client_config(settings.token.root_hash()).map_err(|e| JoinError::Unavailable(e.to_string()))?;
    let channel = control_channel(address, Arc::new(config)).await.map_err(|error| {
        if error.contains(WRONG_ROOT) {
            JoinError::Refused(format!("{address}: {WRONG_ROOT}"))
        } else {
            JoinError::Unavailable(error)
        }
    })?;
    let (chain, key, roots) = sign(channel, Some(&settings.token), settings).await?;
    // The bundle came over a connection to the pinned root; it must hold that root.
    let pinned = pinned.root().ok_or_else(|| JoinError::Unavailable("the handshake pinned no root".into()))?;
    if !roots.contains(&pinned) {
        return Err(JoinError::Unavailable("the control plane's trust bundle lacks its own root".into()));
    }
    Issued::new(chain, key, roots).map_err(|e| JoinError::Unavailable(e.to_string()))
}

/// Renews through `address`, authenticated by the current certificate.
async fn renew_once(
    address: &str,
    credentials: &Arc<Credentials>,
    settings: &IdentitySettings,
) -> Result<Issued, JoinError> {
    let config = control_client_config(credentials).map_err(JoinError::Unavailable)?;
    let channel = control_channel(address, config).await.map_err(JoinError::Unavailable)?;
    let (chain, key, roots) = sign(channel, None, settings).await?;
    Issued::new(chain, key, roots).map_err(|e| JoinError::Unavailable(e.to_string()))
}

/// mTLS to a control plane of this proxy's trust domain.
pub fn control_client_config(credentials: &Arc<Credentials>) -> Result<Arc<ClientConfig>, String> {
    let control = SpiffeId::control_plane(credentials.current().trust_domain());
    credentials.client_config(control, &[ALPN_GRPC]).map(Arc::new).map_err(|e| e.to_string())
}

/// Joins the mesh: tries each control plane in turn, with backoff, until one signs a
/// certificate. Fails at once when the token is refused (unknown, expired, revoked, for
/// another workload or another mesh).
pub async fn join(addresses: &[String], settings: &IdentitySettings) -> Result<Arc<Credentials>, JoinError> {
    let mut backoff = Duration::from_millis(100);
    for attempt in 0.. {
        let address = &addresses[attempt % addresses.len()];
        match join_once(address, settings).await {
            Ok(issued) => {
                tracing::info!(identity = %issued.identity, serial = %issued.serial, expires = %weft_identity::rfc3339(issued.not_after), "joined the mesh");
                return Ok(Credentials::new(issued));
            }
            Err(JoinError::Refused(reason)) => return Err(JoinError::Refused(reason)),
            Err(JoinError::Unavailable(error)) => {
                let pause = backoff.mul_f64(0.5 + rand::random::<f64>());
                tracing::warn!(control = %address, %error, retry_in = ?pause, "cannot get a certificate yet");
                tokio::time::sleep(pause).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    unreachable!("the loop above returns")
}

/// Keeps `credentials` renewed until `shutdown` fires.
pub async fn keep_renewed(
    addresses: Vec<String>,
    credentials: Arc<Credentials>,
    settings: IdentitySettings,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut attempt = 0usize;
    loop {
        let share = RENEW_AT + RENEW_JITTER * (2.0 * rand::random::<f64>() - 1.0);
        let due = credentials.current().renew_at(share);
        let wait = due.duration_since(SystemTime::now()).unwrap_or_default();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
        let mut backoff = Duration::from_millis(200);
        loop {
            let address = &addresses[attempt % addresses.len()];
            attempt += 1;
            let expired = credentials.current().not_after <= SystemTime::now();
            // An expired certificate proves nothing: join again with the token.
            let result = if expired {
                join_once(address, &settings).await
            } else {
                renew_once(address, &credentials, &settings).await
            };
            match result {
                Ok(issued) => {
                    tracing::info!(serial = %issued.serial, expires = %weft_identity::rfc3339(issued.not_after), "renewed this proxy's certificate");
                    credentials.replace(issued);
                    break;
                }
                Err(error) => {
                    let remaining =
                        credentials.current().not_after.duration_since(SystemTime::now()).unwrap_or_default();
                    // Retry well within what is left, and never slower than every 30s.
                    let pause = backoff.min(remaining / 4).max(Duration::from_millis(100)).min(Duration::from_secs(30));
                    tracing::warn!(control = %address, %error, ?remaining, retry_in = ?pause, "cannot renew this proxy's certificate");
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = shutdown.changed() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}
