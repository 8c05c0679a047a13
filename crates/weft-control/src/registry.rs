//! Workloads registered by proxies (`weft proxy --control ... --service reviews`), each
//! held by its proxy's discovery stream and, once the stream is gone, by a lease.
//!
//! Leases must never take the mesh down:
//! - a registration outlives its stream by the lease period (`--lease`), so a proxy that
//!   reconnects (to this or another control plane) keeps its endpoint throughout;
//! - nothing expires until a full lease period after this control plane started, so a
//!   restarted control plane does not expire proxies that have not had time to reconnect;
//! - registrations are written to the store, so a restart does not forget them.
//!
//! A proxy that stops cleanly says goodbye and is removed at once.

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;

/// The store kind registrations are kept under; not a user-facing resource kind.
pub const REGISTRATION_KIND: &str = "Registration";

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
}

impl Registration {
    /// The Workload document this registration stands for.
    pub fn workload_document(&self) -> serde_json::Value {
        let mut spec = json!({"labels": self.labels, "address": self.address, "weight": self.weight});
        if let Some(zone) = &self.zone {
            spec["zone"] = json!(zone);
        }
        json!({
            "apiVersion": weft_model::resource::WEFT_API_VERSION,
            "kind": "Workload",
            "metadata": {"name": self.proxy_id, "namespace": self.namespace, "labels": {"weft.dev/registered": "true"}},
            "spec": spec,
        })
    }
}

/// A registration with its liveness.
#[derive(Clone, Debug)]
pub struct Registered {
    pub registration: Registration,
    /// Reported by the proxy's health checks of its application; new registrations
    /// start healthy only once the proxy says so.
    pub healthy: bool,
    pub health_detail: String,
    /// `None` while the proxy's stream is open; else when the registration expires.
    pub expires: Option<Instant>,
}

/// Every registered workload.
pub struct Registry {
    entries: Mutex<BTreeMap<String, Registered>>,
    lease: Duration,
    /// Nothing expires before this instant: a full lease after start.
    grace_until: Instant,
    /// Bumped on every change that alters what proxies should see.
    generation: watch::Sender<u64>,
}

impl Registry {
    /// A registry whose leases last `lease`, holding `restored` registrations (from the
    /// store) as disconnected until their proxies come back.
    pub fn new(lease: Duration, restored: Vec<Registration>) -> Self {
        let now = Instant::now();
        let entries = restored
            .into_iter()
            .map(|registration| {
                let registered = Registered {
                    registration: registration.clone(),
                    // A restored endpoint was serving before the restart; keep it serving
                    // until its proxy reports otherwise or its lease lapses.
                    healthy: true,
                    health_detail: "restored from the store".into(),
                    expires: Some(now + lease),
                };
                (registration.proxy_id, registered)
            })
            .collect();
        let (generation, _) = watch::channel(0);
        Registry { entries: Mutex::new(entries), lease, grace_until: now + lease, generation }
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Notified after every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    fn changed(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Registered>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers (or re-attaches) the workload of a connected proxy. Returns whether the
    /// stored registration changed (and must be written).
    pub fn register(&self, registration: Registration) -> bool {
        let mut entries = self.lock();
        let changed = match entries.get_mut(&registration.proxy_id) {
            Some(existing) => {
                existing.expires = None;
                let changed = existing.registration != registration;
                existing.registration = registration;
                changed
            }
            None => {
                let registered = Registered {
                    registration: registration.clone(),
                    healthy: false,
                    health_detail: "not yet reported".into(),
                    expires: None,
                };
                entries.insert(registration.proxy_id.clone(), registered);
                true
            }
        };
        drop(entries);
        self.changed();
        changed
    }

    /// Records the application's health as the proxy reports it.
    pub fn set_health(&self, proxy_id: &str, healthy: bool, detail: String) {
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(proxy_id) else { return };
        let flipped = entry.healthy != healthy;
        entry.healthy = healthy;
        entry.health_detail = detail;
        drop(entries);
        if flipped {
            self.changed();
        }
    }

    /// The proxy's stream ended without a goodbye: its lease starts running.
    pub fn disconnected(&self, proxy_id: &str) {
        if let Some(entry) = self.lock().get_mut(proxy_id) {
            entry.expires = Some(Instant::now() + self.lease);
        }
    }

    /// Removes a registration (clean stop or lease expiry), returning it if it existed.
    pub fn remove(&self, proxy_id: &str) -> Option<Registration> {
        let removed = self.lock().remove(proxy_id).map(|entry| entry.registration);
        if removed.is_some() {
            self.changed();
        }
        removed
    }

    /// Registrations whose lease has lapsed, honouring the start-up grace.
    pub fn expired(&self, now: Instant) -> Vec<String> {
        if now < self.grace_until {
            return Vec::new();
        }
        self.lock().iter().filter(|(_, e)| e.expires.is_some_and(|t| t <= now)).map(|(id, _)| id.clone()).collect()
    }

    /// A copy of every entry, for views and listings.
    pub fn entries(&self) -> Vec<Registered> {
        self.lock().values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        }
    }

    #[test]
    fn a_lease_runs_only_after_disconnect_and_never_inside_the_start_grace() {
        let registry = Registry::new(Duration::from_millis(50), vec![]);
        assert!(registry.register(registration("a")));
        assert!(!registry.register(registration("a")), "re-registering the same is no change");
        let later = Instant::now() + Duration::from_secs(1);
        assert!(registry.expired(later).is_empty(), "connected proxies never expire");
        registry.disconnected("a");
        assert!(registry.expired(Instant::now()).is_empty(), "inside the start grace");
        assert_eq!(registry.expired(later), vec!["a".to_string()]);
        registry.register(registration("a"));
        assert!(registry.expired(later).is_empty(), "reconnecting stops the lease");
    }

    #[test]
    fn restored_registrations_serve_until_their_lease_lapses() {
        let registry = Registry::new(Duration::from_millis(50), vec![registration("a")]);
        let entries = registry.entries();
        assert!(entries[0].healthy && entries[0].expires.is_some());
        assert_eq!(registry.expired(Instant::now() + Duration::from_secs(1)), vec!["a".to_string()]);
    }

    #[test]
    fn the_workload_document_parses() {
        let text = registration("reviews-1").workload_document().to_string();
        let parsed = weft_model::parse_documents("registry", &text).unwrap();
        assert_eq!(parsed[0].metadata.name, "reviews-1");
    }
}
