//! Cutting off a compromised identity or certificate, mesh-wide, at once.
//!
//! Revoking a join token only stops new joins; the certificates it already got stay
//! valid until they expire (24 h by default). A revocation here names a SPIFFE identity
//! or one certificate's serial. The control plane pushes the list to every proxy with
//! its view, and proxies refuse such peers on new connections and close the open ones;
//! the control plane itself signs no certificate for a revoked identity, renews no
//! revoked certificate, and serves no discovery stream to either. `undo` takes a
//! revocation back. Linkerd and Istio have no such switch: their operators wait for
//! expiry.

use std::{collections::BTreeSet, time::SystemTime};

use serde::{Deserialize, Serialize};
use weft_identity::SpiffeId;

use crate::{
    audit,
    catalog::Catalog,
    operator_tokens::Operator,
    store::{Change, ObjectKey, StoreError},
};

/// The store kind of revocations; one of [`crate::store::INTERNAL_KINDS`].
pub const REVOCATION_KIND: &str = "Revocation";

/// What a revocation names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Revoked {
    /// Every certificate of a SPIFFE identity, past and future.
    Identity,
    /// One certificate, by serial number.
    Certificate,
}

/// One revocation, as stored and listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevocationRecord {
    pub id: String,
    pub kind: Revoked,
    /// The SPIFFE ID, or the serial in lowercase hex without leading zeros.
    pub value: String,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// The operator token's name that revoked it.
    pub by: String,
}

/// Why a revocation could not be made or undone.
#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Invalid(String),
    #[error("no such revocation (see weft revoke list)")]
    Unknown,
}

/// Everything revoked now: what proxies are sent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevocationList {
    pub identities: BTreeSet<String>,
    pub serials: BTreeSet<String>,
}

impl RevocationList {
    /// Whether a peer with `identity` presenting the certificate `serial` is revoked.
    pub fn refuses(&self, identity: Option<&str>, serial: Option<&str>) -> bool {
        identity.is_some_and(|id| self.identities.contains(id))
            || serial.is_some_and(|serial| self.serials.contains(&weft_identity::normalize_serial(serial)))
    }
}

fn key(id: &str) -> ObjectKey {
    ObjectKey { kind: REVOCATION_KIND.into(), namespace: "default".into(), name: id.into() }
}

/// Every revocation, oldest first.
pub fn list(catalog: &Catalog) -> Vec<RevocationRecord> {
    let mut records: Vec<RevocationRecord> = catalog
        .internal(REVOCATION_KIND)
        .into_iter()
        .filter_map(|document| serde_json::from_value(document).ok())
        .collect();
    records.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    records
}

/// The revoked identities and serials.
pub fn current(catalog: &Catalog) -> RevocationList {
    let mut list = RevocationList::default();
    for record in self::list(catalog) {
        match record.kind {
            Revoked::Identity => list.identities.insert(record.value),
            Revoked::Certificate => list.serials.insert(record.value),
        };
    }
    list
}

/// Revokes `value` (a SPIFFE ID or a serial); revoking what is revoked already answers
/// the existing revocation.
pub async fn revoke(
    catalog: &Catalog,
    kind: Revoked,
    value: &str,
    operator: &Operator,
) -> Result<RevocationRecord, RevocationError> {
    let value = match kind {
        Revoked::Identity => SpiffeId::parse(value.trim())
            .map_err(|e| RevocationError::Invalid(format!("{e}; revoke an identity by its SPIFFE ID")))?
            .to_string(),
        Revoked::Certificate => {
            let serial = weft_identity::normalize_serial(value);
            if serial.is_empty() || !serial.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(RevocationError::Invalid(format!(
                    "{value:?} is not a certificate serial: give it in hex, as weft describe workload shows it"
                )));
            }
            serial
        }
    };
    if let Some(existing) = list(catalog).into_iter().find(|r| r.kind == kind && r.value == value) {
        return Ok(existing);
    }
    let now = SystemTime::now();
    let record = RevocationRecord {
        id: hex::encode(rand::random::<[u8; 6]>()),
        kind,
        value,
        created_at: weft_identity::unix_seconds(now),
        by: operator.name.clone(),
    };
    let document = serde_json::to_value(&record).map_err(|e| RevocationError::Invalid(e.to_string()))?;
    let key = key(&record.id);
    let audit = audit::record(operator, "revoke", (&key).into(), None, Some(document.clone()), now);
    catalog.write_internal(Change { puts: vec![(key, document), audit], deletes: vec![] }).await?;
    tracing::warn!(kind = ?record.kind, value = %record.value, by = %operator.name, "revoked");
    Ok(record)
}

/// Takes back the revocation `what` names: its id, or the identity or serial it revoked.
pub async fn undo(catalog: &Catalog, what: &str, operator: &Operator) -> Result<RevocationRecord, RevocationError> {
    let serial = weft_identity::normalize_serial(what);
    let record = list(catalog)
        .into_iter()
        .find(|r| r.id == what || r.value == what || (r.kind == Revoked::Certificate && r.value == serial))
        .ok_or(RevocationError::Unknown)?;
    let key = key(&record.id);
    let before = serde_json::to_value(&record).ok();
    let audit = audit::record(operator, "revoke.undo", (&key).into(), before, None, SystemTime::now());
    catalog.write_internal(Change { puts: vec![audit], deletes: vec![key] }).await?;
    tracing::warn!(kind = ?record.kind, value = %record.value, by = %operator.name, "revocation undone");
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::test_catalog;

    #[tokio::test]
    async fn revocations_are_listed_pushed_and_undone() {
        let dir = tempfile::tempdir().unwrap();
        let (catalog, _) = test_catalog(dir.path()).await;
        let ops = Operator::control_plane("test");
        let web = "spiffe://weft.local/ns/default/sa/web";
        let first = revoke(&catalog, Revoked::Identity, web, &ops).await.unwrap();
        assert_eq!(revoke(&catalog, Revoked::Identity, web, &ops).await.unwrap(), first, "once");
        revoke(&catalog, Revoked::Certificate, "00AB12", &ops).await.unwrap();
        assert!(revoke(&catalog, Revoked::Identity, "web", &ops).await.is_err());
        assert!(revoke(&catalog, Revoked::Certificate, "xyz", &ops).await.is_err());
        let now = current(&catalog);
        assert!(now.refuses(Some(web), None));
        assert!(
            now.refuses(None, Some("ab12")) && now.refuses(Some("spiffe://weft.local/ns/default/sa/x"), Some("00ab12"))
        );
        assert!(!now.refuses(Some("spiffe://weft.local/ns/default/sa/x"), Some("ab13")));
        undo(&catalog, web, &ops).await.unwrap();
        undo(&catalog, "AB12", &ops).await.unwrap();
        assert_eq!(current(&catalog), RevocationList::default());
        assert!(matches!(undo(&catalog, web, &ops).await, Err(RevocationError::Unknown)));
        assert_eq!(audit::list(&catalog, Some("Revocation"), None, 10).len(), 4, "each change audited");
    }
}
