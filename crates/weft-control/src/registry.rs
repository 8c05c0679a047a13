//! Workloads registered by proxies (`weft proxy --control ... --service reviews`).
//!
//! A registration is a record in the store (so every replica serves it, and it survives
//! restarts), holding the workload and the health its proxy last reported. Whether its
//! proxy is still there is presence (see [`crate::cluster`]): while some replica holds the
//! proxy's stream the registration never expires; once none does, its lease runs, and the
//! leading replica deletes it a lease period later.
//!
//! Leases must never take the mesh down:
//! - a registration outlives its stream by the lease period (`--lease`), so a proxy that
//!   reconnects (to this or another replica) keeps its endpoint throughout;
//! - nothing expires until a full lease period after the leader started leading, so a
//!   restarted control plane, or a replica taking over from a dead leader, does not
//!   expire proxies that have not had time to reconnect;
//! - expiring is fenced: it deletes only while its replica leads and only registrations
//!   whose proxies are attached nowhere at that instant.
//!
//! A proxy that stops cleanly says goodbye and is removed at once.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::Notify;

use crate::{
    catalog::{registration_key, Catalog},
    cluster::{Claim, Cluster},
    store::{Change, ObjectKey},
};

/// The store kind registrations are kept under; not a user-facing resource kind.
pub const REGISTRATION_KIND: &str = "Registration";

/// Registration writes per commit, inside etcd's default limit of 128 operations.
const WRITE_BATCH: usize = 100;

/// What a proxy last said about its application.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub healthy: bool,
    pub detail: String,
}

impl Health {
    /// A new registration receives traffic only once its proxy says its app is healthy.
    pub fn not_reported() -> Self {
        Health { healthy: false, detail: "not yet reported".into() }
    }

    /// Records written before health was stored were serving; keep them serving.
    fn restored() -> Self {
        Health { healthy: true, detail: "restored from the store".into() }
    }
}

/// One registered workload, as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Registration {
    /// The proxy's id; also the Workload's name.
    pub proxy_id: String,
    pub namespace: String,
    pub service: String,
    pub labels: BTreeMap<String, String>,
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    pub weight: u32,
    pub protocol: String,
    pub service_port: u16,
    #[serde(default = "Health::restored")]
    pub health: Health,
    /// The SPIFFE ID the proxy's certificate proved: what callers require of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

impl Registration {
    /// The Workload document this registration stands for.
    pub fn workload_document(&self) -> serde_json::Value {
        let mut spec = json!({"labels": self.labels, "address": self.address, "weight": self.weight});
        if let Some(zone) = &self.zone {
            spec["zone"] = json!(zone);
        }
        if let Some(identity) = &self.identity {
            spec["identity"] = json!(identity);
        }
        json!({
            "apiVersion": weft_model::resource::WEFT_API_VERSION,
            "kind": "Workload",
            "metadata": {"name": self.proxy_id, "namespace": self.namespace, "labels": {"weft.dev/registered": "true"}},
            "spec": spec,
        })
    }

    /// The store key of this registration.
    pub fn key(&self) -> ObjectKey {
        registration_key(&self.namespace, &self.proxy_id)
    }

    /// Whether `other` registers the same workload, whatever the health.
    fn same_workload(&self, other: &Registration) -> bool {
        Registration { health: other.health.clone(), ..self.clone() } == *other
    }
}

/// A registration with its liveness, for views and listings.
#[derive(Clone, Debug)]
pub struct Registered {
    pub registration: Registration,
    pub healthy: bool,
    pub health_detail: String,
    /// `None` while a replica holds the proxy's stream; else about when the registration
    /// expires.
    pub expires: Option<Instant>,
}

/// A proxy stream's hold on its registration.
pub struct Attached {
    claim: Claim,
    /// The record as this stream wants it stored.
    record: Registration,
}

/// Every registered workload.
pub struct Registry {
    catalog: Arc<Catalog>,
    cluster: Arc<dyn Cluster>,
    lease: Duration,
    /// When this replica first saw each registration attached nowhere.
    detached_since: Mutex<HashMap<ObjectKey, Instant>>,
    /// Records to write (`None`: delete), coalesced per key.
    pending: Mutex<BTreeMap<ObjectKey, Option<Registration>>>,
    /// Keys taken from `pending` whose commit has not returned: neither pending nor in
    /// the catalog yet, but not lost either.
    writing: Mutex<std::collections::HashSet<ObjectKey>>,
    wake: Notify,
    /// The records of the streams this replica holds, by key, with their claim's token:
    /// what must be in the store while those streams last.
    held: Mutex<HashMap<ObjectKey, (String, Registration)>>,
}

impl Registry {
    /// A registry of the registrations in `catalog`, with leases of `lease`; starts the
    /// task that writes registrations in batches.
    pub fn new(catalog: Arc<Catalog>, cluster: Arc<dyn Cluster>, lease: Duration) -> Arc<Self> {
        let registry = Arc::new(Registry {
            catalog,
            cluster,
            lease,
            detached_since: Mutex::default(),
            pending: Mutex::default(),
            writing: Mutex::default(),
            wake: Notify::new(),
            held: Mutex::default(),
        });
        tokio::spawn(write_batches(Arc::downgrade(&registry)));
        registry
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    pub fn cluster(&self) -> &Arc<dyn Cluster> {
        &self.cluster
    }

    fn write(&self, key: ObjectKey, record: Option<Registration>) {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).insert(key, record);
        self.wake.notify_one();
    }

    fn hold(&self, attached: &Attached) {
        let held = (attached.claim.token.clone(), attached.record.clone());
        self.held.lock().unwrap_or_else(|e| e.into_inner()).insert(attached.claim.key.clone(), held);
    }

    /// Registers (or re-attaches) the workload of a proxy whose stream this replica holds.
    /// Its last stored health is kept if the workload is the same.
    pub async fn attach(&self, mut registration: Registration) -> Attached {
        let key = registration.key();
        let claim = self.cluster.attach(&key).await;
        registration.health = match self.catalog.registration(&key) {
            Some(stored) if stored.same_workload(&registration) => stored.health,
            _ => Health::not_reported(),
        };
        self.write(key, Some(registration.clone()));
        let attached = Attached { claim, record: registration };
        self.hold(&attached);
        attached
    }

    /// Records the application's health as the proxy reports it. Only a change between
    /// healthy and unhealthy is written: the detail alone does not change any view.
    pub fn set_health(&self, attached: &mut Attached, healthy: bool, detail: String) {
        if attached.record.health.healthy == healthy {
            return;
        }
        attached.record.health = Health { healthy, detail };
        self.write(attached.claim.key.clone(), Some(attached.record.clone()));
        self.hold(attached);
    }

    /// The stream ended. After a goodbye the registration goes at once; otherwise its
    /// lease starts running.
    pub async fn detach(&self, attached: Attached, goodbye: bool) {
        {
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            if held.get(&attached.claim.key).is_some_and(|(token, _)| *token == attached.claim.token) {
                held.remove(&attached.claim.key);
            }
        }
        if goodbye {
            self.write(attached.claim.key.clone(), None);
        }
        self.cluster.detach(&attached.claim).await;
    }

    /// Every registration with its liveness.
    pub fn entries(&self) -> Vec<Registered> {
        let presence = self.cluster.presence().borrow().clone();
        let detached_since = self.detached_since.lock().unwrap_or_else(|e| e.into_inner());
        let leading_since = *self.cluster.leadership().borrow();
        let now = Instant::now();
        self.catalog
            .registrations()
            .into_iter()
            .map(|(key, registration)| {
                // The leader knows its own grace; another replica can only estimate.
                let expires = (!presence.contains_key(&key)).then(|| {
                    let since = detached_since.get(&key).copied().unwrap_or(now);
                    since.max(leading_since.unwrap_or(since)) + self.lease
                });
                Registered {
                    healthy: registration.health.healthy,
                    health_detail: registration.health.detail.clone(),
                    registration,
                    expires,
                }
            })
            .collect()
    }

    /// Writes again the record of every stream this replica holds that the store lost:
    /// a leader expired it while this replica was cut off from etcd longer than a lease,
    /// say. The proxy is alive and attached here, so its endpoint must be too.
    fn restore_held(&self) {
        let lost: Vec<(ObjectKey, Registration)> = {
            let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
            held.iter()
                .filter(|(key, _)| {
                    !pending.contains_key(*key) && !writing.contains(*key) && self.catalog.registration(key).is_none()
                })
                .map(|(key, (_, record))| (key.clone(), record.clone()))
                .collect()
        };
        for (key, record) in lost {
            tracing::warn!(%key, "the store lost the registration of a proxy this replica holds; writing it again");
            self.write(key, Some(record));
        }
    }

    /// Notes which registrations are detached and, on the leading replica, expires those
    /// whose lease has lapsed; restores the registrations of held streams the store lost.
    /// Returns the expired ones.
    pub async fn sweep(&self, now: Instant) -> Vec<ObjectKey> {
        self.restore_held();
        let presence = self.cluster.presence().borrow().clone();
        let registrations = self.catalog.registrations();
        let lapsed: Vec<ObjectKey> = {
            let mut detached_since = self.detached_since.lock().unwrap_or_else(|e| e.into_inner());
            let mut current = HashMap::with_capacity(detached_since.len());
            for (key, _) in &registrations {
                if !presence.contains_key(key) {
                    current.insert(key.clone(), detached_since.get(key).copied().unwrap_or(now));
                }
            }
            *detached_since = current;
            let Some(leading_since) = *self.cluster.leadership().borrow() else { return Vec::new() };
            detached_since
                .iter()
                .filter(|(_, since)| (**since).max(leading_since) + self.lease <= now)
                .map(|(key, _)| key.clone())
                .collect()
        };
        if lapsed.is_empty() {
            return lapsed;
        }
        match self.cluster.expire(&lapsed).await {
            Ok(expired) => expired,
            Err(error) => {
                tracing::warn!(%error, "cannot expire lapsed registrations; retrying");
                Vec::new()
            }
        }
    }
}

/// Writes pending registrations until the registry is dropped.
async fn write_batches(registry: Weak<Registry>) {
    loop {
        let Some(registry) = registry.upgrade() else { return };
        // Wakes at least every second, so a dropped registry ends this task.
        let _ = tokio::time::timeout(Duration::from_secs(1), registry.wake.notified()).await;
        registry.flush().await;
    }
}

impl Registry {
    /// Writes pending registrations, up to [`WRITE_BATCH`] per commit: a thousand proxies
    /// registering at once (a control plane restart) make ten commits, not a thousand.
    async fn flush(&self) {
        loop {
            let batch: Vec<(ObjectKey, Option<Registration>)> = {
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                let keys: Vec<ObjectKey> = pending.keys().take(WRITE_BATCH).cloned().collect();
                self.writing.lock().unwrap_or_else(|e| e.into_inner()).extend(keys.iter().cloned());
                keys.into_iter().filter_map(|key| pending.remove_entry(&key)).collect()
            };
            if batch.is_empty() {
                return;
            }
            let mut change = Change::default();
            for (key, record) in &batch {
                let stored = self.catalog.registration(key);
                match record {
                    Some(record) if stored.as_ref() != Some(record) => match serde_json::to_value(record) {
                        Ok(document) => change.puts.push((key.clone(), document)),
                        Err(error) => tracing::error!(%key, %error, "cannot encode a registration"),
                    },
                    None if stored.is_some() => change.deletes.push(key.clone()),
                    _ => {}
                }
            }
            let result = self.catalog.write_internal(change).await;
            {
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                let mut writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
                for (key, record) in batch {
                    writing.remove(&key);
                    if result.is_err() {
                        // A newer wish for the same key replaces this one.
                        pending.entry(key).or_insert(record);
                    }
                }
            }
            if let Err(error) = result {
                tracing::warn!(%error, "cannot store registrations; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        catalog::test_catalog,
        cluster::{local::LocalCluster, ReplicaInfo},
    };

    const LEASE: Duration = Duration::from_secs(10);

    fn registration(id: &str) -> Registration {
        Registration {
            proxy_id: id.into(),
            namespace: "default".into(),
            service: "reviews".into(),
            labels: BTreeMap::from([("app".into(), "reviews".into())]),
            address: "127.0.0.1:9080".into(),
            zone: None,
            weight: 1,
            protocol: "http".into(),
            service_port: 80,
            health: Health::not_reported(),
            identity: None,
        }
    }

    async fn registry(dir: &tempfile::TempDir) -> Arc<Registry> {
        let (catalog, store) = test_catalog(dir.path()).await;
        let info = ReplicaInfo { id: "test".into(), api: String::new(), grpc: String::new(), started_at: 0 };
        Registry::new(catalog, Arc::new(LocalCluster::new(info, store)), LEASE)
    }

    fn stored(registry: &Registry, id: &str) -> Option<Registration> {
        registry.catalog.registration(&registration(id).key())
    }

    #[tokio::test]
    async fn a_lease_runs_only_once_detached_and_never_inside_the_leaders_grace() {
        let dir = tempfile::tempdir().unwrap();
        let registry = registry(&dir).await;
        let mut attached = registry.attach(registration("a")).await;
        registry.flush().await;
        assert_eq!(stored(&registry, "a").unwrap().health, Health::not_reported());
        registry.set_health(&mut attached, true, "HTTP 200".into());
        registry.flush().await;
        assert!(stored(&registry, "a").unwrap().health.healthy);

        let now = Instant::now();
        let later = now + LEASE * 3;
        registry.sweep(now).await;
        assert!(registry.sweep(later).await.is_empty(), "an attached proxy never expires");
        assert!(registry.entries()[0].expires.is_none());

        registry.detach(attached, false).await;
        registry.sweep(now).await;
        assert!(registry.entries()[0].expires.is_some());
        assert!(registry.sweep(now + LEASE / 2).await.is_empty(), "inside the lease");
        assert_eq!(registry.sweep(later).await, vec![registration("a").key()]);
        // The deletion reaches the catalog through the store's watch.
        let mut catalog = registry.catalog.subscribe();
        let gone = catalog.wait_for(|_| stored(&registry, "a").is_none());
        tokio::time::timeout(Duration::from_secs(5), gone)
            .await
            .expect("expired means deleted from the store")
            .unwrap();
    }

    #[tokio::test]
    async fn reattaching_stops_the_lease_and_keeps_the_stored_health() {
        let dir = tempfile::tempdir().unwrap();
        let registry = registry(&dir).await;
        let mut attached = registry.attach(registration("a")).await;
        registry.set_health(&mut attached, true, "ok".into());
        registry.flush().await;
        registry.detach(attached, false).await;
        let now = Instant::now();
        registry.sweep(now).await;
        let attached = registry.attach(registration("a")).await;
        assert!(attached.record.health.healthy, "same workload, same health until the proxy says otherwise");
        assert!(registry.sweep(now + LEASE * 3).await.is_empty());
        let moved = Registration { address: "127.0.0.1:9999".into(), ..registration("a") };
        assert_eq!(
            registry.attach(moved).await.record.health,
            Health::not_reported(),
            "a new address is a new workload"
        );
    }

    #[tokio::test]
    async fn a_held_registration_the_store_lost_is_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let registry = registry(&dir).await;
        let mut attached = registry.attach(registration("a")).await;
        registry.set_health(&mut attached, true, "ok".into());
        registry.flush().await;
        // As a leader would that believed the proxy gone.
        let key = registration("a").key();
        registry.catalog.write_internal(Change { puts: vec![], deletes: vec![key] }).await.unwrap();
        assert!(stored(&registry, "a").is_none());
        registry.sweep(Instant::now()).await;
        registry.flush().await;
        let restored = stored(&registry, "a").expect("written again");
        assert!(restored.health.healthy, "as the stream last knew it");

        // Once the stream has ended, a lost record stays lost.
        registry.detach(attached, false).await;
        let key = registration("a").key();
        registry.catalog.write_internal(Change { puts: vec![], deletes: vec![key] }).await.unwrap();
        registry.sweep(Instant::now()).await;
        registry.flush().await;
        assert!(stored(&registry, "a").is_none());
    }

    #[tokio::test]
    async fn goodbye_removes_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let registry = registry(&dir).await;
        let attached = registry.attach(registration("a")).await;
        registry.flush().await;
        assert!(stored(&registry, "a").is_some());
        registry.detach(attached, true).await;
        registry.flush().await;
        assert!(stored(&registry, "a").is_none());
    }

    #[test]
    fn records_from_before_health_was_stored_keep_serving() {
        let mut document = serde_json::to_value(registration("a")).unwrap();
        document.as_object_mut().unwrap().remove("health");
        let restored: Registration = serde_json::from_value(document).unwrap();
        assert!(restored.health.healthy);
    }

    #[test]
    fn the_workload_document_parses() {
        let text = registration("reviews-1").workload_document().to_string();
        let parsed = weft_model::parse_documents("registry", &text).unwrap();
        assert_eq!(parsed[0].metadata.name, "reviews-1");
    }
}
