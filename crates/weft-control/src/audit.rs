//! The audit log: every change to the mesh, who made it and what it changed.
//!
//! One entry per changed thing (a resource applied or deleted, a token made or revoked,
//! a revocation, a CA rotation), with the operator token's id, name and role, the time,
//! the store revision, and the document before and after. Entries of a resource change
//! are written in the same store commit as the change itself, so the log can neither
//! miss a change nor record one that did not happen; the entry's own store revision is
//! the change's. Entries are kept in the store (every replica serves the same log) and
//! pruned by the leading replica beyond `--audit-max-entries` or `--audit-max-age`.
//!
//! Token documents are logged without their secret's hash: viewers read this log.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    catalog::Catalog,
    operator_tokens::Operator,
    store::{Change, ObjectKey, StoreError},
};

/// The store kind of audit entries; one of [`crate::store::INTERNAL_KINDS`].
pub const AUDIT_KIND: &str = "AuditEntry";
/// How many entries are kept, unless `--audit-max-entries` says otherwise.
pub const DEFAULT_MAX_ENTRIES: usize = 10_000;
/// How long entries are kept, unless `--audit-max-age` says otherwise.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(90 * 24 * 3600);

/// What was changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subject {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl From<&ObjectKey> for Subject {
    fn from(key: &ObjectKey) -> Self {
        Subject { kind: key.kind.clone(), namespace: key.namespace.clone(), name: key.name.clone() }
    }
}

/// One change.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    /// Orders entries: the time in nanoseconds, then a random tag.
    pub id: String,
    /// Seconds since the Unix epoch.
    pub time: u64,
    pub operator: Operator,
    /// `apply`, `delete`, `token.create`, `token.revoke`, `revoke`, `revoke.undo`,
    /// `ca.rotate`, `ca.finish-rotation`.
    pub action: String,
    pub subject: Subject,
    #[serde(default)]
    pub before: Option<Value>,
    #[serde(default)]
    pub after: Option<Value>,
    /// The store revision of the change (filled in when read).
    #[serde(default)]
    pub revision: u64,
}

/// The store record of one entry, to put in the change it records.
pub fn record(
    operator: &Operator,
    action: &str,
    subject: Subject,
    before: Option<Value>,
    after: Option<Value>,
    now: SystemTime,
) -> (ObjectKey, Value) {
    let nanos = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let id = format!("{nanos:020}-{}", hex::encode(rand::random::<[u8; 4]>()));
    let entry = AuditEntry {
        id: id.clone(),
        time: weft_identity::unix_seconds(now),
        operator: operator.clone(),
        action: action.to_string(),
        subject,
        before: before.map(without_secrets),
        after: after.map(without_secrets),
        revision: 0,
    };
    let key = ObjectKey { kind: AUDIT_KIND.into(), namespace: "default".into(), name: id };
    (key, serde_json::to_value(entry).expect("an audit entry serializes"))
}

/// A token record without the hash of its secret.
fn without_secrets(mut document: Value) -> Value {
    if let Some(object) = document.as_object_mut() {
        object.remove("secretSha256");
    }
    document
}

/// Writes one entry on its own, for changes that are not resource commits (a CA
/// rotation, whose record the CA keeper writes).
pub async fn write(catalog: &Catalog, entry: (ObjectKey, Value)) -> Result<(), StoreError> {
    catalog.write_internal(Change { puts: vec![entry], deletes: vec![] }).await
}

/// Entries, oldest first, optionally of one kind (and name), the newest `limit` of them.
pub fn list(catalog: &Catalog, kind: Option<&str>, name: Option<&str>, limit: usize) -> Vec<AuditEntry> {
    let mut entries: Vec<AuditEntry> = catalog
        .internal_entries(AUDIT_KIND)
        .into_iter()
        .filter_map(|(revision, document)| {
            let mut entry: AuditEntry = serde_json::from_value(document).ok()?;
            entry.revision = revision;
            Some(entry)
        })
        .filter(|e| kind.is_none_or(|kind| e.subject.kind.eq_ignore_ascii_case(kind)))
        .filter(|e| name.is_none_or(|name| e.subject.name == name))
        .collect();
    entries.sort_by(|a, b| a.id.cmp(&b.id));
    let skip = entries.len().saturating_sub(limit);
    entries.split_off(skip)
}

/// Deletes entries beyond `max_entries` (the oldest) or older than `max_age`; returns
/// how many. Run by the leading replica only.
pub async fn prune(
    catalog: &Catalog,
    max_entries: usize,
    max_age: Duration,
    now: SystemTime,
) -> Result<usize, StoreError> {
    let mut entries: Vec<(String, u64)> = catalog
        .internal(AUDIT_KIND)
        .into_iter()
        .filter_map(|document| Some((document["id"].as_str()?.to_string(), document["time"].as_u64()?)))
        .collect();
    entries.sort();
    let oldest_kept = weft_identity::unix_seconds(now).saturating_sub(max_age.as_secs());
    let excess = entries.len().saturating_sub(max_entries);
    let doomed: Vec<ObjectKey> = entries
        .iter()
        .enumerate()
        .filter(|(i, (_, time))| *i < excess || *time < oldest_kept)
        .map(|(_, (id, _))| ObjectKey { kind: AUDIT_KIND.into(), namespace: "default".into(), name: id.clone() })
        .collect();
    let count = doomed.len();
    // Within etcd's limit of operations per transaction.
    for chunk in doomed.chunks(100) {
        catalog.write_internal(Change { puts: vec![], deletes: chunk.to_vec() }).await?;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{catalog::test_catalog, operator_tokens::Role};

    fn admin() -> Operator {
        Operator { token_id: "t1".into(), name: "ops".into(), role: Role::Admin }
    }

    #[tokio::test]
    async fn entries_are_listed_in_order_filtered_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let (catalog, _) = test_catalog(dir.path()).await;
        let now = SystemTime::now();
        let subject = |name: &str| Subject { kind: "Service".into(), namespace: "default".into(), name: name.into() };
        for (i, name) in ["a", "b", "a"].iter().enumerate() {
            let at = now - Duration::from_secs(3600 * (3 - i as u64));
            let token = serde_json::json!({"id": "x", "secretSha256": "00"});
            write(&catalog, record(&admin(), "apply", subject(name), None, Some(token), at)).await.unwrap();
        }
        let all = list(&catalog, None, None, 100);
        assert_eq!(all.iter().map(|e| e.subject.name.as_str()).collect::<Vec<_>>(), ["a", "b", "a"]);
        assert!(all.windows(2).all(|w| w[0].revision < w[1].revision), "each with its store revision");
        assert!(all[0].after.as_ref().unwrap().get("secretSha256").is_none(), "no secret hashes");
        assert_eq!(list(&catalog, Some("service"), Some("a"), 100).len(), 2);
        assert_eq!(list(&catalog, None, None, 1)[0].subject.name, "a", "the newest");

        assert_eq!(prune(&catalog, 2, DEFAULT_MAX_AGE, now).await.unwrap(), 1, "beyond the count");
        assert_eq!(prune(&catalog, 10, Duration::from_secs(90 * 60), now).await.unwrap(), 1, "beyond the age");
        assert_eq!(list(&catalog, None, None, 100).len(), 1);
    }
}
