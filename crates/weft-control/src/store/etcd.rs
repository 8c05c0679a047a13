//! The etcd store: resources in an etcd cluster, so the desired state survives the loss of
//! any control-plane host and several control-plane replicas can share it. Keys are
//! `/weft/objects/Kind/namespace/name`, values the documents as JSON; revisions are etcd's
//! own (a resource's `mod_revision` and `create_revision`, the cluster's revision).
//!
//! Every apply is one etcd transaction, so it is atomic; etcd caps a transaction at 128
//! operations unless started with a larger `--max-txn-ops`, and a larger apply is refused
//! with that advice.
//!
//! Every replica learns every change, its own included, from one etcd watch on the
//! objects prefix. A broken watch resumes from the last revision seen; if etcd has
//! compacted that history away, the watcher re-lists everything instead.

use std::{collections::VecDeque, path::PathBuf, time::Duration};

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, ConnectOptions, DeleteOptions, EventType, GetOptions, Identity, PutOptions, TlsOptions, Txn,
    TxnOp, TxnOpResponse, WatchOptions, WatchResponse, WatchStream,
};
use futures_util::stream::{self, BoxStream, StreamExt};

use super::{Change, Committed, ObjectKey, Store, StoreContents, StoreError, StoreEvent, StoredObject};

/// Where resources (and registrations) are kept.
pub(crate) const OBJECTS: &str = "/weft/objects/";

/// How to reach etcd.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdSettings {
    /// Client addresses, `host:port`.
    pub endpoints: Vec<String>,
    /// The CA that signed etcd's server certificates; setting it turns TLS on.
    pub ca: Option<PathBuf>,
    /// A client certificate and key, for an etcd started with `--client-cert-auth`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl EtcdSettings {
    fn describe(&self) -> String {
        let scheme = if self.ca.is_some() { "etcd+tls" } else { "etcd" };
        format!("{scheme}://{}", self.endpoints.join(","))
    }

    fn tls(&self) -> Result<Option<TlsOptions>, String> {
        let read = |flag: &str, path: &PathBuf| {
            std::fs::read(path).map_err(|e| format!("cannot read {flag} {}: {e}", path.display()))
        };
        match (&self.ca, &self.cert, &self.key) {
            (None, None, None) => Ok(None),
            (None, _, _) => {
                Err("--etcd-cert and --etcd-key need --etcd-ca (the CA of etcd's server certificates)".into())
            }
            (Some(ca), cert, key) => {
                let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read("--etcd-ca", ca)?));
                match (cert, key) {
                    (Some(cert), Some(key)) => {
                        tls = tls.identity(Identity::from_pem(read("--etcd-cert", cert)?, read("--etcd-key", key)?));
                    }
                    (None, None) => {}
                    _ => return Err("--etcd-cert and --etcd-key go together".into()),
                }
                Ok(Some(tls))
            }
        }
    }
}

/// A store in etcd.
pub struct EtcdStore {
    client: Client,
    description: String,
}

pub(crate) fn backend(error: etcd_client::Error) -> StoreError {
    let text = error.to_string();
    if text.contains("too many operations in txn request") {
        return StoreError::Backend(format!(
            "{text}: etcd allows 128 operations per transaction by default; split the apply, or start etcd with a \
             larger --max-txn-ops"
        ));
    }
    StoreError::Backend(format!("etcd: {text}"))
}

/// Runs `call` again, up to four more times, when etcd could not be reached. With several
/// endpoints, the client's balancer keeps offering a dead member for a few seconds after
/// it dies, and another attempt usually lands on a live one. Every request weft makes is
/// safe to repeat (puts of whole values, deletes, fenced transactions), and only
/// "unavailable" is retried: the request did not reach a member that acted on it.
pub(crate) async fn retrying<T, F, Fut>(mut call: F) -> Result<T, etcd_client::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let mut attempt = 0u32;
    loop {
        match call().await {
            Err(etcd_client::Error::GRpcStatus(status)) if attempt < 4 && status.code() == tonic::Code::Unavailable => {
                attempt += 1;
                tracing::debug!(attempt, %status, "etcd unavailable; trying again");
                tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
            }
            other => return other,
        }
    }
}

impl EtcdStore {
    /// Connects to etcd and checks that it answers.
    pub async fn connect(settings: &EtcdSettings) -> Result<Self, StoreError> {
        let description = settings.describe();
        let fail = |reason: String| StoreError::Open { path: description.clone(), reason };
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        if let Some(tls) = settings.tls().map_err(&fail)? {
            options = options.with_tls(tls);
        }
        let mut client = Client::connect(&settings.endpoints, Some(options))
            .await
            .map_err(|e| fail(format!("cannot reach etcd ({e}); check the addresses given to --store")))?;
        client.get(OBJECTS, Some(GetOptions::new().with_prefix().with_count_only())).await.map_err(|e| {
            fail(format!(
                "etcd does not answer ({e}); check the addresses given to --store, and the --etcd-ca, --etcd-cert \
                 and --etcd-key flags if etcd serves TLS"
            ))
        })?;
        Ok(EtcdStore { client, description })
    }

    /// The connection, shared with the replica coordination that uses the same etcd.
    pub fn client(&self) -> Client {
        self.client.clone()
    }
}

fn object_key(key: &[u8]) -> Option<ObjectKey> {
    ObjectKey::decode(std::str::from_utf8(key).ok()?.strip_prefix(OBJECTS)?)
}

fn stored(kv: &etcd_client::KeyValue) -> Result<(ObjectKey, StoredObject), StoreError> {
    let key_text = String::from_utf8_lossy(kv.key()).into_owned();
    let key = object_key(kv.key())
        .ok_or_else(|| StoreError::Corrupt { key: key_text.clone(), reason: "malformed key".into() })?;
    let document =
        serde_json::from_slice(kv.value()).map_err(|e| StoreError::Corrupt { key: key_text, reason: e.to_string() })?;
    Ok((
        key,
        StoredObject { revision: kv.mod_revision() as u64, created_revision: kv.create_revision() as u64, document },
    ))
}

async fn load(client: &mut Client) -> Result<StoreContents, StoreError> {
    let response = retrying(|| {
        let mut client = client.clone();
        async move { client.get(OBJECTS, Some(GetOptions::new().with_prefix())).await }
    })
    .await
    .map_err(backend)?;
    let revision = response.header().map_or(0, |h| h.revision()) as u64;
    let mut contents = StoreContents { revision, ..Default::default() };
    for kv in response.kvs() {
        let (key, object) = stored(kv)?;
        contents.objects.insert(key, object);
    }
    Ok(contents)
}

/// One replica's watch on the objects prefix, resumed across failures.
struct Watch {
    client: Client,
    /// The last revision delivered.
    revision: u64,
    stream: Option<WatchStream>,
    ready: VecDeque<StoreEvent>,
    backoff: Duration,
}

impl Watch {
    async fn next(&mut self) -> Result<StoreEvent, StoreError> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Ok(event);
            }
            let Some(stream) = self.stream.as_mut() else {
                let options = WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(self.revision as i64 + 1)
                    .with_progress_notify();
                match self.client.watch(OBJECTS, Some(options)).await {
                    Ok(stream) => self.stream = Some(stream),
                    Err(error) => self.failed(&error.to_string()).await,
                }
                continue;
            };
            match stream.message().await {
                Ok(Some(response)) if response.compact_revision() > 0 => {
                    tracing::warn!(
                        revision = self.revision,
                        compacted = response.compact_revision(),
                        "etcd compacted the history this watch needed; reading everything afresh"
                    );
                    self.stream = None;
                    let contents = load(&mut self.client).await?;
                    self.revision = contents.revision;
                    return Ok(StoreEvent::Reset(contents));
                }
                Ok(Some(response)) if response.canceled() => {
                    self.failed(&format!("watch cancelled: {}", response.cancel_reason())).await;
                }
                Ok(Some(response)) => {
                    self.backoff = Duration::ZERO;
                    self.take(&response);
                }
                Ok(None) => self.failed("the watch stream ended").await,
                Err(error) => self.failed(&error.to_string()).await,
            }
        }
    }

    /// Splits a response into one event per revision: the changes of one transaction
    /// share a revision, and absorbing two revisions' puts and deletes out of order
    /// could resurrect a deleted key.
    fn take(&mut self, response: &WatchResponse) {
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let revision = kv.mod_revision() as u64;
            if revision <= self.revision {
                continue;
            }
            let starts_new = !matches!(self.ready.back(), Some(StoreEvent::Committed(c)) if c.revision == revision);
            if starts_new {
                self.ready.push_back(StoreEvent::Committed(Committed { revision, puts: vec![], deletes: vec![] }));
            }
            let Some(StoreEvent::Committed(committed)) = self.ready.back_mut() else { unreachable!() };
            match event.event_type() {
                EventType::Put => match stored(kv) {
                    Ok(put) => committed.puts.push(put),
                    Err(error) => {
                        tracing::error!(%error, "a record written to etcd by someone else is unreadable; it is ignored")
                    }
                },
                EventType::Delete => {
                    if let Some(key) = object_key(kv.key()) {
                        committed.deletes.push(key);
                    }
                }
            }
        }
        if let Some(StoreEvent::Committed(last)) = self.ready.back() {
            self.revision = last.revision;
        }
    }

    async fn failed(&mut self, reason: &str) {
        self.stream = None;
        self.backoff = (self.backoff * 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
        tracing::warn!(reason, retry_in = ?self.backoff, revision = self.revision, "etcd watch interrupted; resuming");
        tokio::time::sleep(self.backoff).await;
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn load(&self) -> Result<StoreContents, StoreError> {
        load(&mut self.client.clone()).await
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
        let txn = Txn::new().and_then(ops);
        let response = retrying(|| {
            let (mut client, txn) = (self.client.clone(), txn.clone());
            async move { client.txn(txn).await }
        })
        .await
        .map_err(backend)?;
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

    fn watch(&self, revision: u64) -> BoxStream<'static, Result<StoreEvent, StoreError>> {
        let watch = Watch {
            client: self.client.clone(),
            revision,
            stream: None,
            ready: VecDeque::new(),
            backoff: Duration::ZERO,
        };
        stream::unfold(watch, |mut watch| async move {
            let event = watch.next().await;
            Some((event, watch))
        })
        .boxed()
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}
