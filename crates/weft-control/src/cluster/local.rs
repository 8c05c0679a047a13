//! One control plane on the embedded store: it is the only replica and always leads, and
//! presence is its own memory (a restarted control plane holds no streams, which is what
//! an empty memory says).

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Instant, SystemTime},
};

use async_trait::async_trait;
use tokio::sync::{watch, Mutex};

use super::{drop_claim, note_claim, Claim, Cluster, Presence, ReplicaInfo};
use crate::store::{Change, ObjectKey, Store, StoreError};

/// The single replica.
pub struct LocalCluster {
    id: String,
    info: ReplicaInfo,
    store: Arc<dyn Store>,
    presence: watch::Sender<Presence>,
    leadership: watch::Sender<Option<Instant>>,
    /// Held by attach and expire, so that a proxy attaching while its registration is
    /// being expired is never expired.
    gate: Mutex<()>,
    next_token: AtomicU64,
}

impl LocalCluster {
    pub fn new(info: ReplicaInfo, store: Arc<dyn Store>) -> Self {
        LocalCluster {
            id: info.id.clone(),
            info,
            store,
            presence: watch::Sender::new(Arc::new(BTreeMap::new())),
            leadership: watch::Sender::new(Some(Instant::now())),
            gate: Mutex::new(()),
            next_token: AtomicU64::new(1),
        }
    }
}

#[async_trait]
impl Cluster for LocalCluster {
    fn replica(&self) -> &str {
        &self.id
    }

    async fn attach(&self, key: &ObjectKey) -> Claim {
        let _gate = self.gate.lock().await;
        let token = self.next_token.fetch_add(1, Ordering::Relaxed).to_string();
        let claim = Claim { key: key.clone(), token: format!("{}/{token}", self.id) };
        note_claim(&self.presence, &claim);
        claim
    }

    async fn detach(&self, claim: &Claim) {
        let _gate = self.gate.lock().await;
        drop_claim(&self.presence, claim);
    }

    fn presence(&self) -> watch::Receiver<Presence> {
        self.presence.subscribe()
    }

    fn leadership(&self) -> watch::Receiver<Option<Instant>> {
        self.leadership.subscribe()
    }

    async fn expire(&self, keys: &[ObjectKey]) -> Result<Vec<ObjectKey>, StoreError> {
        let _gate = self.gate.lock().await;
        let presence = self.presence.borrow().clone();
        let deletes: Vec<ObjectKey> = keys.iter().filter(|k| !presence.contains_key(k)).cloned().collect();
        if deletes.is_empty() {
            return Ok(deletes);
        }
        Ok(self.store.commit(Change { puts: vec![], deletes }).await?.deletes)
    }

    async fn replicas(&self) -> Result<Vec<ReplicaInfo>, StoreError> {
        Ok(vec![self.info.clone()])
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    weft_identity::unix_seconds(SystemTime::now())
}

/// Nanoseconds since the Unix epoch, for ids that sort by time.
pub fn unix_now_nanos() -> u128 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}
