//! The etcd store: resources in an etcd cluster, so the desired state survives the loss of
//! any control-plane host and several control-plane replicas can share it. Keys are
//! `/weft/objects/Kind/namespace/name`, values the documents as JSON; revisions are etcd's
//! own (a resource's `mod_revision` and `create_revision`, the cluster's revision).
//!
//! Every apply is atomic however many resources it holds. A change of up to
//! [`DIRECT_OPS`] resources is one etcd transaction on their keys. A larger one would pass
//! etcd's limit of 128 operations per transaction, so it is written as one record,
//! `/weft/objects/~applies/<id>`, holding the whole change: readers apply a record as one
//! change, at its revision, the moment it is written. The writer then copies it onto the
//! resources' own keys in chunks, each key only if nothing newer has written it since, and
//! deletes the record; a record left behind by a crash stays in force for readers, and the
//! next large apply, or the next control plane to start, finishes copying it.
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
use etcd_client::{Compare, CompareOp};
use futures_util::stream::{self, BoxStream, StreamExt};
use serde::{Deserialize, Serialize};

use super::{Change, Committed, ObjectKey, Store, StoreContents, StoreError, StoreEvent, StoredObject};

/// Where resources (and registrations) are kept.
pub(crate) const OBJECTS: &str = "/weft/objects/";
/// Large changes, each one record, inside [`OBJECTS`] so that the one watch sees them.
const APPLIES: &str = "/weft/objects/~applies/";
/// Changes of up to this many resources are one transaction on the resources' keys;
/// larger ones are a record. Inside etcd's default of 128 operations per transaction.
pub const DIRECT_OPS: usize = 100;
/// Keys per transaction when copying a record onto the resources' keys (a compare and a
/// write each).
const COPY_CHUNK: usize = 50;

/// A large change, as one record.
#[derive(Debug, Serialize, Deserialize)]
struct ApplyRecord {
    puts: Vec<(ObjectKey, serde_json::Value)>,
    deletes: Vec<ObjectKey>,
}

impl ApplyRecord {
    /// Lays this record, written at `revision`, over `objects`: each key it names changes
    /// unless the key has been written since.
    fn overlay(self, revision: u64, objects: &mut std::collections::BTreeMap<ObjectKey, StoredObject>) {
        for (key, document) in self.puts {
            match objects.get(&key) {
                Some(existing) if existing.revision >= revision => {}
                existing => {
                    let created_revision = existing.map_or(revision, |e| e.created_revision);
                    objects.insert(key, StoredObject { revision, created_revision, document });
                }
            }
        }
        for key in self.deletes {
            if objects.get(&key).is_some_and(|existing| existing.revision < revision) {
                objects.remove(&key);
            }
        }
    }
}

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
    if text.contains("request is too large") || text.contains("message length too large") {
        return StoreError::Backend(format!(
            "{text}: a large apply is one etcd record, and etcd takes records up to 1.5 MiB by default; split the \
             apply, or start etcd with a larger --max-request-bytes"
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

    /// Commits a large change as one record, then copies it onto the resources' keys.
    async fn commit_record(&self, change: Change) -> Result<Committed, StoreError> {
        let record = ApplyRecord { puts: change.puts, deletes: change.deletes };
        let value = serde_json::to_vec(&record).map_err(|e| StoreError::Backend(e.to_string()))?;
        let id = format!("{APPLIES}{:020}-{:08x}", crate::cluster::local::unix_now_nanos(), rand::random::<u32>());
        let response = retrying(|| {
            let (mut client, id, value) = (self.client.clone(), id.clone(), value.clone());
            async move { client.put(id, value, None).await }
        })
        .await
        .map_err(backend)?;
        let revision = response.header().map_or(0, |h| h.revision()) as u64;
        // Earlier records a crash left behind first, so that the copies land in order.
        let leftovers = pending_records(&self.client).await?;
        for (key, at, leftover) in leftovers.iter().filter(|(_, at, _)| *at < revision) {
            if let Err(error) = copy_record(&self.client, key, *at, leftover).await {
                tracing::warn!(%error, "cannot finish copying an earlier large apply; it stays in force");
            }
        }
        if let Err(error) = copy_record(&self.client, id.as_bytes(), revision, &record).await {
            tracing::warn!(%error, "a large apply is committed, but copying it onto its resources' keys stopped; it stays in force and is finished later");
        }
        let puts = record
            .puts
            .into_iter()
            .map(|(key, document)| (key, StoredObject { revision, created_revision: revision, document }))
            .collect();
        Ok(Committed { revision, puts, deletes: record.deletes })
    }

    /// Finishes copying large applies that a crash left as records.
    pub async fn finish_records(&self) -> Result<(), StoreError> {
        let records = pending_records(&self.client).await?;
        for (key, revision, record) in records {
            copy_record(&self.client, &key, revision, &record).await?;
        }
        Ok(())
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

fn record(kv: &etcd_client::KeyValue) -> Result<ApplyRecord, StoreError> {
    serde_json::from_slice(kv.value())
        .map_err(|e| StoreError::Corrupt { key: String::from_utf8_lossy(kv.key()).into_owned(), reason: e.to_string() })
}

fn is_record(key: &[u8]) -> bool {
    key.starts_with(APPLIES.as_bytes())
}

/// A record not yet copied onto its resources' keys: its key, its revision, the change.
type PendingRecord = (Vec<u8>, u64, ApplyRecord);

/// Every key under `prefix`, at one revision.
async fn get_prefix(client: &Client, prefix: &'static str) -> Result<etcd_client::GetResponse, StoreError> {
    retrying(|| {
        let mut client = client.clone();
        async move { client.get(prefix, Some(GetOptions::new().with_prefix())).await }
    })
    .await
    .map_err(backend)
}

fn pending_record(kv: &etcd_client::KeyValue) -> Result<PendingRecord, StoreError> {
    Ok((kv.key().to_vec(), kv.mod_revision() as u64, record(kv)?))
}

/// Everything, with the records not yet copied laid over the keys, oldest first.
async fn load(client: &mut Client) -> Result<StoreContents, StoreError> {
    let response = get_prefix(client, OBJECTS).await?;
    let revision = response.header().map_or(0, |h| h.revision()) as u64;
    let mut contents = StoreContents { revision, ..Default::default() };
    let mut records = Vec::new();
    for kv in response.kvs() {
        if is_record(kv.key()) {
            records.push(pending_record(kv)?);
        } else {
            let (key, object) = stored(kv)?;
            contents.objects.insert(key, object);
        }
    }
    records.sort_by_key(|(_, revision, _)| *revision);
    for (_, revision, record) in records {
        record.overlay(revision, &mut contents.objects);
    }
    Ok(contents)
}

/// The records not yet copied, oldest first: only their prefix is read.
async fn pending_records(client: &Client) -> Result<Vec<PendingRecord>, StoreError> {
    let response = get_prefix(client, APPLIES).await?;
    let mut records = response.kvs().iter().map(pending_record).collect::<Result<Vec<_>, _>>()?;
    records.sort_by_key(|(_, revision, _)| *revision);
    Ok(records)
}

/// Copies a record written at `revision` onto the resources' keys (a key written since is
/// left alone), then deletes it.
async fn copy_record(
    client: &Client,
    record_key: &[u8],
    revision: u64,
    record: &ApplyRecord,
) -> Result<(), StoreError> {
    let mut ops: Vec<(String, Option<Vec<u8>>)> = Vec::with_capacity(record.puts.len() + record.deletes.len());
    for (key, document) in &record.puts {
        let value = serde_json::to_vec(document).map_err(|e| StoreError::Backend(e.to_string()))?;
        ops.push((format!("{OBJECTS}{}", key.encode()), Some(value)));
    }
    ops.extend(record.deletes.iter().map(|key| (format!("{OBJECTS}{}", key.encode()), None)));
    let txn = |chunk: &[(String, Option<Vec<u8>>)]| {
        let compares: Vec<Compare> = chunk
            .iter()
            .map(|(key, _)| Compare::mod_revision(key.as_str(), CompareOp::Less, revision as i64))
            .collect();
        let writes: Vec<TxnOp> = chunk
            .iter()
            .map(|(key, value)| match value {
                Some(value) => TxnOp::put(key.as_str(), value.clone(), None),
                None => TxnOp::delete(key.as_str(), None),
            })
            .collect();
        Txn::new().when(compares).and_then(writes)
    };
    let run = |txn: Txn| {
        retrying(move || {
            let (mut client, txn) = (client.clone(), txn.clone());
            async move { client.txn(txn).await }
        })
    };
    for chunk in ops.chunks(COPY_CHUNK) {
        if !run(txn(chunk)).await.map_err(backend)?.succeeded() {
            // Some key was written after the record: copy the others one by one.
            for op in chunk {
                run(txn(std::slice::from_ref(op))).await.map_err(backend)?;
            }
        }
    }
    let key = record_key.to_vec();
    retrying(|| {
        let (mut client, key) = (client.clone(), key.clone());
        async move { client.delete(key, None).await }
    })
    .await
    .map_err(backend)?;
    Ok(())
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
            if is_record(kv.key()) {
                // A record's deletion (once copied) changes nothing; its writing is the change.
                if event.event_type() == EventType::Put {
                    match record(kv) {
                        Ok(record) => {
                            committed.puts.extend(record.puts.into_iter().map(|(key, document)| {
                                (key, StoredObject { revision, created_revision: revision, document })
                            }));
                            committed.deletes.extend(record.deletes);
                        }
                        Err(error) => tracing::error!(%error, "a large apply's record is unreadable; it is ignored"),
                    }
                }
                continue;
            }
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
        if change.puts.len() + change.deletes.len() > DIRECT_OPS {
            return self.commit_record(change).await;
        }
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

    async fn create(&self, key: ObjectKey, document: serde_json::Value) -> Result<bool, StoreError> {
        let value = serde_json::to_vec(&document).map_err(|e| StoreError::Backend(e.to_string()))?;
        let path = format!("{OBJECTS}{}", key.encode());
        let txn = Txn::new()
            .when([Compare::create_revision(path.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(path.as_str(), value, None)])
            .or_else([TxnOp::get(path.as_str(), None)]);
        let response = retrying(|| {
            let (mut client, txn) = (self.client.clone(), txn.clone());
            async move { client.txn(txn).await }
        })
        .await
        .map_err(backend)?;
        // A retried create may meet its own first attempt: the same value counts as made.
        let ours = response.op_responses().iter().any(|op| {
            matches!(op, TxnOpResponse::Get(get) if get.kvs().first().is_some_and(|kv| serde_json::from_slice::<serde_json::Value>(kv.value()).ok().as_ref() == Some(&document)))
        });
        Ok(response.succeeded() || ours)
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
