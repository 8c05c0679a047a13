//! Where the desired state lives: resources, each with a revision, behind one trait so
//! that the embedded store (one control plane, local disk) and etcd (several replicas)
//! are interchangeable.
//!
//! The store holds documents, not typed resources: every document was validated before
//! it was written, and is validated again by whoever reads it, with the same code.
//!
//! Readers never trust their own writes: every change, whoever made it, reaches every
//! control plane through [`Store::watch`], so replicas sharing one etcd all hold the same
//! copy, in revision order.

pub mod embedded;
pub mod etcd;

use std::collections::BTreeMap;

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use serde::{Deserialize, Serialize};
use weft_model::ResourceKind;

/// Identifies one resource: its kind, namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectKey {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

/// Kinds the control plane keeps for itself, never listed or served as resources:
/// workload registrations, the certificate authority, the tokens (hashes only: the admin
/// token of earlier releases, operator and join tokens), the audit log and revocations.
pub const INTERNAL_KINDS: [&str; 9] = [
    "Registration",
    "CertificateAuthority",
    "AdminToken",
    "OperatorToken",
    "JoinToken",
    "AuditEntry",
    "Revocation",
    "SessionKey",
    "VirtualIP",
];

impl ObjectKey {
    /// Whether this is one of the [`INTERNAL_KINDS`].
    pub fn is_internal(&self) -> bool {
        INTERNAL_KINDS.contains(&self.kind.as_str())
    }

    pub fn new(kind: ResourceKind, namespace: &str, name: &str) -> Self {
        ObjectKey { kind: kind.as_str().to_string(), namespace: namespace.to_string(), name: name.to_string() }
    }

    /// The key as stored: `Kind/namespace/name`. Names cannot hold `/` (validation
    /// refuses it), so the encoding is unambiguous.
    pub fn encode(&self) -> String {
        format!("{}/{}/{}", self.kind, self.namespace, self.name)
    }

    pub fn decode(text: &str) -> Option<Self> {
        let mut parts = text.splitn(3, '/');
        Some(ObjectKey {
            kind: parts.next()?.to_string(),
            namespace: parts.next()?.to_string(),
            name: parts.next()?.to_string(),
        })
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// One stored resource.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredObject {
    /// The store revision of the commit that last changed it.
    pub revision: u64,
    /// The store revision of the commit that created it.
    pub created_revision: u64,
    /// The document as applied (JSON).
    pub document: serde_json::Value,
}

/// Every stored resource, as of one revision.
#[derive(Clone, Debug, Default)]
pub struct StoreContents {
    pub revision: u64,
    pub objects: BTreeMap<ObjectKey, StoredObject>,
}

/// One atomic change: all of it is committed, or none.
#[derive(Clone, Debug, Default)]
pub struct Change {
    pub puts: Vec<(ObjectKey, serde_json::Value)>,
    pub deletes: Vec<ObjectKey>,
}

impl Change {
    pub fn is_empty(&self) -> bool {
        self.puts.is_empty() && self.deletes.is_empty()
    }
}

/// What a committed change did, for watchers that keep a copy of the contents.
#[derive(Clone, Debug)]
pub struct Committed {
    pub revision: u64,
    pub puts: Vec<(ObjectKey, StoredObject)>,
    pub deletes: Vec<ObjectKey>,
}

/// What a watch reports.
#[derive(Clone, Debug)]
pub enum StoreEvent {
    /// A change committed after the previous event, by this control plane or another.
    Committed(Committed),
    /// The watch could not resume where it stopped (etcd compacted the history it
    /// needed, or a slow reader fell too far behind): here is everything, afresh.
    Reset(StoreContents),
}

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("the store failed: {0}")]
    Backend(String),
    #[error("a stored record is corrupt ({key}): {reason}")]
    Corrupt { key: String, reason: String },
}

/// A resource store with a global revision.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Everything stored, and the revision it was read at.
    async fn load(&self) -> Result<StoreContents, StoreError>;

    /// Commits `change` atomically and durably (committed means on disk, or on a quorum),
    /// at a new revision. Deleting a key that is absent is not an error.
    async fn commit(&self, change: Change) -> Result<Committed, StoreError>;

    /// Stores `document` at `key` only if nothing is there: `false` if something was (made
    /// by another control plane that got there first).
    async fn create(&self, key: ObjectKey, document: serde_json::Value) -> Result<bool, StoreError>;

    /// Every change committed after `revision`, in order, for as long as the stream is
    /// polled. The stream ends only if the store cannot be watched any more (the caller
    /// then watches again from the last revision it saw); transient failures are retried
    /// inside.
    fn watch(&self, revision: u64) -> BoxStream<'static, Result<StoreEvent, StoreError>>;

    /// A short description for logs and `/api/v1/status`: `embedded:/path`, `etcd:...`.
    fn describe(&self) -> String;
}
