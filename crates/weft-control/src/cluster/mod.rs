//! What control-plane replicas agree on beyond the stored resources: which replica holds
//! which proxy's discovery stream (presence), which replicas are running, and which one
//! does the singleton work of expiring lapsed registrations (leadership).
//!
//! Presence is what makes a registration's lease run: a registered workload whose proxy
//! is attached to no replica loses its endpoint a lease period later. With etcd, presence
//! keys live under each replica's own etcd lease, so the death of a replica detaches its
//! proxies without anyone else having to notice; with the embedded store there is one
//! replica, and presence is its memory.

pub mod etcd;
pub mod local;

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::store::{ObjectKey, StoreError};

/// A running control-plane replica, as announced to the others.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaInfo {
    pub id: String,
    /// Its HTTP API and discovery addresses, as bound.
    pub api: String,
    pub grpc: String,
    /// Seconds since the Unix epoch when it started.
    pub started_at: u64,
}

/// Which replica holds each attached proxy: registration key → replica id.
pub type Presence = Arc<BTreeMap<ObjectKey, String>>;

/// One replica's claim on one proxy's stream; give it back with [`Cluster::detach`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub key: ObjectKey,
    /// Tells this stream's claim from a later stream's claim of the same proxy, so that
    /// an old stream ending late never detaches the new one.
    pub token: String,
}

/// Replica coordination.
#[async_trait]
pub trait Cluster: Send + Sync + 'static {
    /// This replica's id.
    fn replica(&self) -> &str;

    /// Records that this replica holds the stream of the proxy registered as `key`. A
    /// claim that cannot be written now is retried in the background until it is, or
    /// until it is detached.
    async fn attach(&self, key: &ObjectKey) -> Claim;

    /// Gives a claim back: the proxy's lease starts running (unless another stream has
    /// claimed it since).
    async fn detach(&self, claim: &Claim);

    /// Every attached proxy, across replicas, kept current.
    fn presence(&self) -> watch::Receiver<Presence>;

    /// `Some(since)` while this replica leads, `since` being when it took over.
    fn leadership(&self) -> watch::Receiver<Option<Instant>>;

    /// Deletes the registrations `keys` whose proxies are still attached nowhere, only
    /// if this replica still leads; returns those it deleted.
    async fn expire(&self, keys: &[ObjectKey]) -> Result<Vec<ObjectKey>, StoreError>;

    /// Every running replica.
    async fn replicas(&self) -> Result<Vec<ReplicaInfo>, StoreError>;
}

/// Notes `claim` in this replica's copy of presence.
fn note_claim(presence: &watch::Sender<Presence>, claim: &Claim) {
    presence.send_modify(|presence| {
        Arc::make_mut(presence).insert(claim.key.clone(), claim.token.clone());
    });
}

/// Drops `claim` from this replica's copy of presence, unless a later claim replaced it.
fn drop_claim(presence: &watch::Sender<Presence>, claim: &Claim) {
    presence.send_if_modified(|presence| {
        if presence.get(&claim.key) != Some(&claim.token) {
            return false;
        }
        Arc::make_mut(presence).remove(&claim.key);
        true
    });
}

/// A replica id unique across hosts and restarts: `host-pid-random`.
pub fn new_replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "control".into());
    format!("{host}-{}-{:04x}", std::process::id(), rand::random::<u16>())
}
