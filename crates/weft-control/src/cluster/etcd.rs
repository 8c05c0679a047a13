//! Replicas sharing one etcd. Each replica holds a session: an etcd lease of
//! [`SESSION_TTL`] it keeps alive, under which it writes
//! - `/weft/replicas/<id>`: that it runs, and where;
//! - `/weft/live/<Kind/ns/name>`: a claim on each proxy stream it holds (presence);
//! - `/weft/leader`: its id, while it leads.
//!
//! When a replica dies its session lapses and etcd deletes all three, so its proxies
//! become detached (their registrations' leases start running) and another replica takes
//! the lead, without anyone having to detect the death.
//!
//! Leadership is the plain etcd pattern: create `/weft/leader` if absent. Expiring
//! registrations is fenced by it: the delete is one transaction that also checks that
//! this replica still leads and that none of the proxies has attached since, so a replica
//! that lost its session (a partition, a pause) can never expire what a new leader keeps.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, Weak,
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp,
    TxnOpResponse,
};
use tokio::sync::watch;

use super::{drop_claim, note_claim, Claim, Cluster, Presence, ReplicaInfo};
use crate::store::{
    etcd::{backend, retrying, OBJECTS},
    ObjectKey, StoreError,
};

const REPLICAS: &str = "/weft/replicas/";
const LIVE: &str = "/weft/live/";
const LEADER: &str = "/weft/leader";

/// How long a replica's keys outlive it. Short, so that proxies of a dead replica start
/// their lease soon and a new leader takes over soon; long enough to ride out a slow
/// etcd election (about a second).
pub const SESSION_TTL: Duration = Duration::from_secs(5);
/// How often the session is renewed, presence read and leadership checked.
const TICK: Duration = Duration::from_secs(1);
/// Compares and deletes per expiring transaction, well inside etcd's default limit of
/// 128 operations.
const EXPIRE_CHUNK: usize = 60;

struct Session {
    lease: i64,
    keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    renewed: Instant,
}

/// This replica's membership of a group sharing one etcd.
pub struct EtcdCluster {
    id: String,
    info: ReplicaInfo,
    client: Client,
    /// The current session lease; 0 while there is none.
    lease: Mutex<i64>,
    /// This replica's claims: key → (token, written under the current session).
    claims: Mutex<HashMap<ObjectKey, (String, bool)>>,
    next_token: AtomicU64,
    presence: watch::Sender<Presence>,
    leadership: watch::Sender<Option<Instant>>,
}

fn live_key(key: &ObjectKey) -> String {
    format!("{LIVE}{}", key.encode())
}

impl EtcdCluster {
    /// Joins the group: opens a session and announces this replica. Leadership and
    /// presence follow within a tick.
    pub async fn join(client: Client, info: ReplicaInfo) -> Result<Arc<Self>, StoreError> {
        let cluster = Arc::new(EtcdCluster {
            id: info.id.clone(),
            info,
            client,
            lease: Mutex::new(0),
            claims: Mutex::default(),
            next_token: AtomicU64::new(1),
            presence: watch::Sender::new(Arc::new(BTreeMap::new())),
            leadership: watch::Sender::new(None),
        });
        let session = cluster.open_session().await?;
        cluster.read_presence().await?;
        tokio::spawn(Self::run(Arc::downgrade(&cluster), session));
        Ok(cluster)
    }

    fn client(&self) -> Client {
        self.client.clone()
    }

    /// One etcd request, retried while etcd is unavailable (see [`retrying`]).
    async fn etcd<T, F, Fut>(&self, call: F) -> Result<T, StoreError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        retrying(|| call(self.client())).await.map_err(backend)
    }

    fn current_lease(&self) -> i64 {
        *self.lease.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn open_session(&self) -> Result<Session, StoreError> {
        let ttl = SESSION_TTL.as_secs() as i64;
        let lease = self.etcd(|mut c| async move { c.lease_grant(ttl, None).await }).await?.id();
        let info = serde_json::to_vec(&self.info).map_err(|e| StoreError::Backend(e.to_string()))?;
        let key = format!("{REPLICAS}{}", self.id);
        self.etcd(|mut c| {
            let (key, info) = (key.clone(), info.clone());
            async move { c.put(key, info, Some(PutOptions::new().with_lease(lease))).await }
        })
        .await?;
        *self.lease.lock().unwrap_or_else(|e| e.into_inner()) = lease;
        // Claims written under a lost session are gone with it.
        for claim in self.claims.lock().unwrap_or_else(|e| e.into_inner()).values_mut() {
            claim.1 = false;
        }
        tracing::info!(replica = %self.id, lease, "joined the control-plane replicas on etcd");
        Ok(Session { lease, keeper: None, renewed: Instant::now() })
    }

    async fn run(cluster: Weak<Self>, mut session: Session) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(cluster) = cluster.upgrade() else { return };
            if !cluster.renew(&mut session).await {
                cluster.leadership.send_replace(None);
                *cluster.lease.lock().unwrap_or_else(|e| e.into_inner()) = 0;
                match cluster.open_session().await {
                    Ok(fresh) => session = fresh,
                    Err(error) => {
                        tracing::warn!(%error, "cannot open a session on etcd; this replica neither leads nor holds claims until it can");
                        continue;
                    }
                }
            }
            cluster.write_claims(session.lease).await;
            if let Err(error) = cluster.lead(session.lease).await {
                tracing::warn!(%error, "cannot check leadership on etcd");
            }
            if let Err(error) = cluster.read_presence().await {
                tracing::warn!(%error, "cannot read which proxies are attached");
            }
        }
    }

    /// Keeps the session alive; false once it is lost (etcd says the lease is gone, or no
    /// renewal got through for a whole TTL).
    async fn renew(&self, session: &mut Session) -> bool {
        if session.keeper.is_none() {
            match self.client().lease_keep_alive(session.lease).await {
                Ok(keeper) => session.keeper = Some(keeper),
                Err(error) => tracing::warn!(%error, "cannot renew this replica's etcd session; retrying"),
            }
        }
        if let Some((keeper, responses)) = session.keeper.as_mut() {
            let renewed = async {
                keeper.keep_alive().await?;
                responses.message().await
            };
            match tokio::time::timeout(TICK * 2, renewed).await {
                Ok(Ok(Some(response))) if response.ttl() > 0 => session.renewed = Instant::now(),
                Ok(Ok(Some(_))) => {
                    tracing::warn!(replica = %self.id, "this replica's etcd session expired; opening a new one");
                    return false;
                }
                other => {
                    tracing::warn!(result = ?other.map(|r| r.map(|_| ())), "renewing this replica's etcd session failed; retrying");
                    session.keeper = None;
                }
            }
        }
        session.renewed.elapsed() < SESSION_TTL
    }

    async fn write_claims(&self, lease: i64) {
        let pending: Vec<(ObjectKey, String)> = self
            .claims
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, (_, written))| !written)
            .map(|(key, (token, _))| (key.clone(), token.clone()))
            .collect();
        for (key, token) in pending {
            self.write_claim(&key, &token, lease).await;
        }
    }

    async fn write_claim(&self, key: &ObjectKey, token: &str, lease: i64) {
        if lease == 0 {
            return;
        }
        let live = live_key(key);
        let put = self
            .etcd(|mut c| {
                let (live, token) = (live.clone(), token.to_string());
                async move { c.put(live, token, Some(PutOptions::new().with_lease(lease))).await }
            })
            .await;
        match put {
            Ok(_) => {
                if let Some(claim) = self.claims.lock().unwrap_or_else(|e| e.into_inner()).get_mut(key) {
                    if claim.0 == token {
                        claim.1 = true;
                    }
                }
            }
            Err(error) => tracing::warn!(%key, %error, "cannot record a proxy's presence on etcd; retrying"),
        }
    }

    async fn lead(&self, lease: i64) -> Result<(), StoreError> {
        let ours = |kv: Option<&etcd_client::KeyValue>| {
            kv.is_some_and(|kv| kv.value() == self.id.as_bytes() && kv.lease() == lease)
        };
        if self.leadership.borrow().is_some() {
            let current = self.etcd(|mut c| async move { c.get(LEADER, None).await }).await?;
            if !ours(current.kvs().first()) {
                tracing::warn!(replica = %self.id, "this replica no longer leads");
                self.leadership.send_replace(None);
            }
            return Ok(());
        }
        let id = self.id.clone();
        let response = self
            .etcd(|mut c| {
                let claim = Txn::new()
                    .when([Compare::create_revision(LEADER, CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(LEADER, id.as_str(), Some(PutOptions::new().with_lease(lease)))])
                    .or_else([TxnOp::get(LEADER, None)]);
                async move { c.txn(claim).await }
            })
            .await?;
        // A retried claim may find the key its own first attempt wrote.
        let holds = response.succeeded()
            || response
                .op_responses()
                .iter()
                .any(|op| matches!(op, TxnOpResponse::Get(get) if ours(get.kvs().first())));
        if holds {
            tracing::info!(replica = %self.id, "this replica now leads: it expires lapsed registrations, after a full lease");
            self.leadership.send_replace(Some(Instant::now()));
        }
        Ok(())
    }

    async fn read_presence(&self) -> Result<(), StoreError> {
        let response =
            self.etcd(|mut c| async move { c.get(LIVE, Some(GetOptions::new().with_prefix())).await }).await?;
        let mut presence = BTreeMap::new();
        for kv in response.kvs() {
            let Some(key) = std::str::from_utf8(kv.key()).ok().and_then(|k| k.strip_prefix(LIVE)) else { continue };
            if let Some(key) = ObjectKey::decode(key) {
                presence.insert(key, String::from_utf8_lossy(kv.value()).into_owned());
            }
        }
        self.presence.send_if_modified(|current| {
            if **current == presence {
                return false;
            }
            *current = Arc::new(presence);
            true
        });
        Ok(())
    }

    /// One fenced transaction: delete `keys` if this replica leads and none is attached.
    async fn expire_chunk(&self, keys: &[ObjectKey]) -> Result<Option<Vec<ObjectKey>>, StoreError> {
        let mut compares = vec![Compare::value(LEADER, CompareOp::Equal, self.id.as_str())];
        compares.extend(keys.iter().map(|key| Compare::create_revision(live_key(key), CompareOp::Equal, 0)));
        let deletes = keys
            .iter()
            .map(|key| TxnOp::delete(format!("{OBJECTS}{}", key.encode()), Some(DeleteOptions::new())))
            .collect::<Vec<_>>();
        let txn = Txn::new().when(compares).and_then(deletes);
        let response = self
            .etcd(|mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        if !response.succeeded() {
            return Ok(None);
        }
        let deleted = keys
            .iter()
            .zip(response.op_responses())
            .filter(|(_, op)| matches!(op, TxnOpResponse::Delete(d) if d.deleted() > 0))
            .map(|(key, _)| key.clone())
            .collect();
        Ok(Some(deleted))
    }
}

#[async_trait]
impl Cluster for EtcdCluster {
    fn replica(&self) -> &str {
        &self.id
    }

    async fn attach(&self, key: &ObjectKey) -> Claim {
        let token = format!("{}/{}", self.id, self.next_token.fetch_add(1, Ordering::Relaxed));
        self.claims.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone(), (token.clone(), false));
        self.write_claim(key, &token, self.current_lease()).await;
        let claim = Claim { key: key.clone(), token };
        note_claim(&self.presence, &claim);
        claim
    }

    async fn detach(&self, claim: &Claim) {
        {
            let mut claims = self.claims.lock().unwrap_or_else(|e| e.into_inner());
            if claims.get(&claim.key).is_some_and(|(token, _)| *token == claim.token) {
                claims.remove(&claim.key);
            }
        }
        let key = live_key(&claim.key);
        let release = Txn::new()
            .when([Compare::value(key.as_str(), CompareOp::Equal, claim.token.as_str())])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        let released = self
            .etcd(|mut c| {
                let release = release.clone();
                async move { c.txn(release).await }
            })
            .await;
        if let Err(error) = released {
            // The claim lapses with this replica's session anyway.
            tracing::warn!(key = %claim.key, %error, "cannot release a proxy's presence on etcd");
        }
        drop_claim(&self.presence, claim);
    }

    fn presence(&self) -> watch::Receiver<Presence> {
        self.presence.subscribe()
    }

    fn leadership(&self) -> watch::Receiver<Option<Instant>> {
        self.leadership.subscribe()
    }

    async fn expire(&self, keys: &[ObjectKey]) -> Result<Vec<ObjectKey>, StoreError> {
        let mut expired = Vec::new();
        for chunk in keys.chunks(EXPIRE_CHUNK) {
            match self.expire_chunk(chunk).await? {
                Some(deleted) => expired.extend(deleted),
                // Someone attached (or leadership moved): judge each on its own.
                None if chunk.len() > 1 => {
                    for key in chunk {
                        if let Some(deleted) = self.expire_chunk(std::slice::from_ref(key)).await? {
                            expired.extend(deleted);
                        }
                    }
                }
                None => {}
            }
        }
        Ok(expired)
    }

    async fn replicas(&self) -> Result<Vec<ReplicaInfo>, StoreError> {
        let response =
            self.etcd(|mut c| async move { c.get(REPLICAS, Some(GetOptions::new().with_prefix())).await }).await?;
        Ok(response.kvs().iter().filter_map(|kv| serde_json::from_slice(kv.value()).ok()).collect())
    }
}
