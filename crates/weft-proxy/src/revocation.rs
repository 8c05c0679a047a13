//! Peers the operator revoked (`weft revoke identity|certificate`): refused on every new
//! connection, in both directions, and cut off on the connections already open.
//!
//! The control plane pushes the list with every view. A new list wakes every open mesh
//! connection's guard ([`Revocations::until_revoked`]), which ends the connection if its
//! peer is on it: within moments of the push, not at certificate expiry.

use std::{collections::HashSet, sync::Arc};

use tokio::sync::watch;

/// What is revoked now.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Revoked {
    identities: HashSet<String>,
    /// Normalized serials (lowercase hex, no leading zeros).
    serials: HashSet<String>,
}

impl Revoked {
    /// A list of SPIFFE IDs and certificate serials.
    pub fn new(identities: impl IntoIterator<Item = String>, serials: impl IntoIterator<Item = String>) -> Self {
        Revoked {
            identities: identities.into_iter().collect(),
            serials: serials.into_iter().map(|s| weft_identity::normalize_serial(&s)).collect(),
        }
    }

    /// Whether a peer proving `identity` with the certificate `serial` is revoked.
    pub fn refuses(&self, identity: &str, serial: Option<&str>) -> bool {
        self.identities.contains(identity) || serial.is_some_and(|serial| self.serials.contains(serial))
    }

    /// Whether `identity` itself is revoked (endpoints with it get no traffic).
    pub fn refuses_identity(&self, identity: &str) -> bool {
        self.identities.contains(identity)
    }

    pub fn is_empty(&self) -> bool {
        self.identities.is_empty() && self.serials.is_empty()
    }

    /// How many identities and certificates are revoked.
    pub fn len(&self) -> usize {
        self.identities.len() + self.serials.len()
    }
}

/// The current list, watched by every open mesh connection.
#[derive(Debug)]
pub struct Revocations {
    current: watch::Sender<Arc<Revoked>>,
}

impl Default for Revocations {
    fn default() -> Self {
        Revocations { current: watch::channel(Arc::new(Revoked::default())).0 }
    }
}

impl Revocations {
    /// The list now.
    pub fn current(&self) -> Arc<Revoked> {
        self.current.borrow().clone()
    }

    /// Takes a pushed list; `true` when it changed (the guards are woken).
    pub fn set(&self, revoked: Revoked) -> bool {
        self.current.send_if_modified(|current| {
            if **current == revoked {
                return false;
            }
            *current = Arc::new(revoked);
            true
        })
    }

    /// Completes once the peer `identity` with certificate `serial` is revoked (at once
    /// if it is already): race a connection against it to cut the connection off.
    pub fn until_revoked(&self, identity: Arc<str>, serial: Option<Arc<str>>) -> impl std::future::Future<Output = ()> {
        let mut watch = self.current.subscribe();
        async move {
            loop {
                if watch.borrow_and_update().refuses(&identity, serial.as_deref()) {
                    return;
                }
                if watch.changed().await.is_err() {
                    // The proxy is shutting down: nothing will be revoked any more.
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

/// The identity and certificate serial a verified peer presented.
#[derive(Clone, Debug)]
pub struct PeerCertificate {
    pub identity: Arc<str>,
    pub serial: Option<Arc<str>>,
}

impl PeerCertificate {
    /// Read from a connection whose handshake verified `certificates` (leaf first).
    pub fn of(certificates: Option<&[rustls::pki_types::CertificateDer<'_>]>) -> Option<Self> {
        let identity = weft_identity::tls::peer_identity(certificates)?;
        let serial = certificates?.first().and_then(|leaf| weft_identity::certificate_serial(leaf));
        Some(PeerCertificate { identity: identity.to_string().into(), serial: serial.map(Arc::from) })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn an_open_connection_is_cut_off_when_its_peer_is_revoked() {
        let revocations = Revocations::default();
        let web: Arc<str> = "spiffe://weft.local/ns/default/sa/web".into();
        let guard = revocations.until_revoked(web.clone(), Some("ab12".into()));
        tokio::pin!(guard);
        assert!(tokio::time::timeout(Duration::from_millis(20), &mut guard).await.is_err(), "not revoked yet");
        assert!(!revocations.set(Revoked::default()), "the same list wakes nobody");
        assert!(revocations.set(Revoked::new([], ["00AB12".to_string()])));
        tokio::time::timeout(Duration::from_secs(1), guard).await.expect("a revoked certificate ends it");
        assert!(revocations.current().refuses("spiffe://weft.local/ns/default/sa/other", Some("ab12")));
        assert!(!revocations.current().refuses(&web, Some("ab13")));
        revocations.set(Revoked::new([web.to_string()], []));
        tokio::time::timeout(Duration::from_secs(1), revocations.until_revoked(web, None)).await.expect("at once");
    }
}
