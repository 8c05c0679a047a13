//! The etcd store: resources in an etcd cluster, so the desired state survives the loss of
//! any control-plane host. Keys are `/weft/objects/Kind/namespace/name`, values the
//! documents as JSON; revisions are etcd's own (a resource's `mod_revision` and
//! `create_revision`, the cluster's revision).
//!
//! Every apply is one etcd transaction, so it is atomic; etcd caps a transaction at 128
//! operations unless started with a larger `--max-txn-ops`, and a larger apply is refused
//! with that advice.
//!
//! Several control-plane replicas on one etcd are not implemented yet: the first one
//! holds `/weft/replica` under a short lease, and a second is refused with a clear message
//! rather than silently serving a diverging copy.

use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};

use super::{Change, Committed, ObjectKey, Store, StoreContents, StoreError, StoredObject};

const OBJECTS: &str = "/weft/objects/";
const REPLICA: &str = "/weft/replica";
/// How long `/weft/replica` outlives a control plane that died.
const REPLICA_LEASE_SECONDS: i64 = 5;

/// A store in etcd.
pub struct EtcdStore {
    client: Client,
    endpoints: String,
}

fn backend(error: etcd_client::Error) -> StoreError {
    let text = error.to_string();
    if text.contains("too many operations in txn request") {
        return StoreError::Backend(format!(
            "{text}: etcd allows 128 operations per transaction by default; split the apply, or start etcd with a \
             larger --max-txn-ops"
        ));
    }
    StoreError::Backend(format!("etcd: {text}"))
}

impl EtcdStore {
    /// Connects to `endpoints` (`host:port`), checks that etcd answers, and claims the
    /// single-replica slot.
    pub async fn connect(endpoints: &[String]) -> Result<Self, StoreError> {
        let joined = endpoints.join(",");
        let fail = |reason: String| StoreError::Open { path: format!("etcd://{joined}"), reason };
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        let mut client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| fail(format!("cannot reach etcd ({e}); check the addresses given to --store")))?;
        client
            .get(OBJECTS, Some(GetOptions::new().with_prefix().with_count_only()))
            .await
            .map_err(|e| fail(format!("etcd does not answer ({e}); check the addresses given to --store")))?;

        let lease = client.lease_grant(REPLICA_LEASE_SECONDS, None).await.map_err(|e| fail(e.to_string()))?.id();
        let claim = Txn::new().when([Compare::create_revision(REPLICA, CompareOp::Equal, 0)]).and_then([TxnOp::put(
            REPLICA,
            std::process::id().to_string(),
            Some(PutOptions::new().with_lease(lease)),
        )]);
        let claimed = client.txn(claim).await.map_err(|e| fail(e.to_string()))?.succeeded();
        if !claimed {
            return Err(fail(format!(
                "another weft control plane already uses this etcd, and several replicas on one etcd are not \
                 implemented yet; stop it first (if it just died, its claim lapses within {REPLICA_LEASE_SECONDS}s)"
            )));
        }
        let (mut keeper, mut responses) = client.lease_keep_alive(lease).await.map_err(|e| fail(e.to_string()))?;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                if keeper.keep_alive().await.is_err() || responses.message().await.is_err() {
                    tracing::warn!("cannot renew the control plane's claim on etcd; retrying");
                }
            }
        });
        Ok(EtcdStore { client, endpoints: joined })
    }
}

fn object_key(key: &[u8]) -> Option<ObjectKey> {
    ObjectKey::decode(std::str::from_utf8(key).ok()?.strip_prefix(OBJECTS)?)
}

#[async_trait]
impl Store for EtcdStore {
    async fn load(&self) -> Result<StoreContents, StoreError> {
        let mut client = self.client.clone();
        let response = client.get(OBJECTS, Some(GetOptions::new().with_prefix())).await.map_err(backend)?;
        let revision = response.header().map_or(0, |h| h.revision()) as u64;
        let mut contents = StoreContents { revision, ..Default::default() };
        for kv in response.kvs() {
            let key_text = String::from_utf8_lossy(kv.key()).into_owned();
            let key = object_key(kv.key())
                .ok_or_else(|| StoreError::Corrupt { key: key_text.clone(), reason: "malformed key".into() })?;
            let document = serde_json::from_slice(kv.value())
                .map_err(|e| StoreError::Corrupt { key: key_text, reason: e.to_string() })?;
            contents.objects.insert(
                key,
                StoredObject {
                    revision: kv.mod_revision() as u64,
                    created_revision: kv.create_revision() as u64,
                    document,
                },
            );
        }
        Ok(contents)
    }

    async fn commit(&self, change: Change) -> Result<Committed, StoreError> {
        let mut ops = Vec::with_capacity(change.puts.len() + change.deletes.len());
        for (key, document) in &change.puts {
            let value = serde_json::to_vec(document).map_err(|e| StoreError::Backend(e.to_string()))?;
            ops.push(TxnOp::put(format!("{OBJECTS}{}", key.encode()), value, Some(PutOptions::new().with_prev_key())));
        }
        for key in &change.deletes {
            ops.push(TxnOp::delete(format!("{OBJECTS}{}", key.encode()), Some(DeleteOptions::new())));
        }
        let mut client = self.client.clone();
        let response = client.txn(Txn::new().and_then(ops)).await.map_err(backend)?;
        let revision = response.header().map_or(0, |h| h.revision()) as u64;
        let mut puts = Vec::with_capacity(change.puts.len());
        let mut deletes = Vec::new();
        let mut results = response.op_responses().into_iter();
        for (key, document) in change.puts {
            let created_revision = match results.next() {
                Some(TxnOpResponse::Put(put)) => put.prev_key().map_or(revision, |kv| kv.create_revision() as u64),
                _ => revision,
            };
            puts.push((key, StoredObject { revision, created_revision, document }));
        }
        for key in change.deletes {
            if let Some(TxnOpResponse::Delete(delete)) = results.next() {
                if delete.deleted() > 0 {
                    deletes.push(key);
                }
            }
        }
        Ok(Committed { revision, puts, deletes })
    }

    fn describe(&self) -> String {
        format!("etcd://{}", self.endpoints)
    }
}
