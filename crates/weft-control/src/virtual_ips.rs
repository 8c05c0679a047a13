//! Stored virtual IPs: a Service keeps the address it was first given for as long as it
//! exists. Derived alone, addresses are stable only while no two names' hashes meet: a
//! newcomer that sorts first would take an existing Service's address, and applications
//! that had resolved it would reach the wrong Service. So each control plane, after
//! building its world, stores every derived address as a record of its own (internal kind
//! `VirtualIP`, keyed by the address), and the world gives stored addresses first.
//!
//! Records are created only where none exists (the store's create-if-absent), so replicas
//! that derive at once cannot give one address to two Services: the loser derives again
//! on its next build, past the winner's record. A record whose Service is gone, or that
//! lost to an earlier record of the same Service, is deleted, and its address is free.

use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::{Deserialize, Serialize};

use crate::{
    catalog::Catalog,
    store::{Change, ObjectKey},
    views::{VirtualIpOrigin, World},
};

/// The store kind of virtual-IP records; one of [`crate::store::INTERNAL_KINDS`].
pub const VIRTUAL_IP_KIND: &str = "VirtualIP";

/// One stored address and the Service it belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtualIpRecord {
    pub address: Ipv4Addr,
    pub namespace: String,
    pub service: String,
}

/// The record of `address`: one per address, so that a second claim fails to create.
fn key(address: Ipv4Addr) -> ObjectKey {
    ObjectKey { kind: VIRTUAL_IP_KIND.to_string(), namespace: String::new(), name: address.to_string() }
}

/// Every record, oldest first.
pub fn records(catalog: &Catalog) -> Vec<VirtualIpRecord> {
    let mut entries = catalog.internal_entries(VIRTUAL_IP_KIND);
    entries.sort_by_key(|(revision, _)| *revision);
    entries.into_iter().filter_map(|(_, document)| serde_json::from_value(document).ok()).collect()
}

/// Each Service's stored address: its oldest record's.
pub fn stored(records: &[VirtualIpRecord]) -> BTreeMap<(String, String), Ipv4Addr> {
    let mut stored = BTreeMap::new();
    for record in records {
        stored.entry((record.namespace.clone(), record.service.clone())).or_insert(record.address);
    }
    stored
}

/// Stores the addresses `world` derived, and deletes the `records` it no longer uses
/// (`world` was built from them).
pub async fn settle(catalog: &Catalog, world: &World, records: &[VirtualIpRecord]) {
    for ((namespace, service), (address, origin)) in &world.virtual_ips {
        if *origin != VirtualIpOrigin::Derived {
            continue;
        }
        let record = VirtualIpRecord { address: *address, namespace: namespace.clone(), service: service.clone() };
        let document = serde_json::to_value(&record).expect("a record serializes");
        match catalog.create_internal(key(*address), document).await {
            Ok(true) => tracing::info!(%address, service = %format!("{namespace}/{service}"), "virtual IP stored"),
            // Another replica gave it to another Service first: the next build derives
            // past its record.
            Ok(false) => tracing::debug!(%address, "virtual IP already stored for another Service"),
            Err(error) => tracing::warn!(%error, %address, "cannot store a virtual IP; it is derived again"),
        }
    }
    let unused: Vec<ObjectKey> = records
        .iter()
        .filter(|record| {
            let service = (record.namespace.clone(), record.service.clone());
            world.virtual_ips.get(&service) != Some(&(record.address, VirtualIpOrigin::Stored))
        })
        .map(|record| key(record.address))
        .collect();
    if !unused.is_empty() {
        let count = unused.len();
        match catalog.write_internal(Change { puts: Vec::new(), deletes: unused }).await {
            Ok(()) => tracing::info!(count, "virtual IPs of Services that are gone released"),
            Err(error) => tracing::warn!(%error, "cannot release unused virtual IPs; tried again on the next change"),
        }
    }
}
