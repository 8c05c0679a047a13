//! The default store: one file on local disk (redb), for a single control plane.
//!
//! Every commit is one redb write transaction with immediate durability: when `commit`
//! returns, the change is fsynced. redb's copy-on-write pages mean a crash mid-commit
//! leaves the previous revision intact, never a half-applied change.
//!
//! Only this process writes the file, so its watch is an in-memory broadcast of its own
//! commits.

use std::{path::Path, sync::Arc};

use async_trait::async_trait;
use futures_util::stream::{self, BoxStream, StreamExt};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use tokio::sync::broadcast;

use super::{Change, Committed, ObjectKey, Store, StoreContents, StoreError, StoreEvent, StoredObject};

/// Commits a watcher may fall behind by before it is sent everything afresh.
const WATCH_BACKLOG: usize = 1024;

/// `Kind/namespace/name` → JSON-encoded [`StoredObject`].
const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");
/// Store-wide counters; today only `revision`.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISION: &str = "revision";

/// A store in one redb file.
pub struct EmbeddedStore {
    db: Arc<Database>,
    path: String,
    commits: broadcast::Sender<Committed>,
}

impl EmbeddedStore {
    /// Opens (or creates) the store at `path`, creating parent directories.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let fail = |reason: String| StoreError::Open { path: path.display().to_string(), reason };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| fail(format!("cannot create its directory: {e}")))?;
        }
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => {
                fail("another weft control plane has it open; stop it, or give this one its own --data-dir".into())
            }
            other => fail(other.to_string()),
        })?;
        // Create the tables up front so reads never meet a missing table.
        let txn = db.begin_write().map_err(backend)?;
        txn.open_table(OBJECTS).map_err(backend)?;
        txn.open_table(META).map_err(backend)?;
        txn.commit().map_err(backend)?;
        let (commits, _) = broadcast::channel(WATCH_BACKLOG);
        Ok(EmbeddedStore { db: Arc::new(db), path: path.display().to_string(), commits })
    }
}

fn backend(error: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(error.to_string())
}

fn decode(key: &str, bytes: &[u8]) -> Result<StoredObject, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt { key: key.to_string(), reason: e.to_string() })
}

fn load(db: &Database) -> Result<StoreContents, StoreError> {
    let txn = db.begin_read().map_err(backend)?;
    let meta = txn.open_table(META).map_err(backend)?;
    let revision = meta.get(REVISION).map_err(backend)?.map(|v| v.value()).unwrap_or(0);
    let table = txn.open_table(OBJECTS).map_err(backend)?;
    let mut contents = StoreContents { revision, ..Default::default() };
    for entry in table.iter().map_err(backend)? {
        let (key, value) = entry.map_err(backend)?;
        let key_text = key.value();
        let object_key = ObjectKey::decode(key_text)
            .ok_or_else(|| StoreError::Corrupt { key: key_text.to_string(), reason: "malformed key".into() })?;
        contents.objects.insert(object_key, decode(key_text, value.value())?);
    }
    Ok(contents)
}

fn read_revision(db: &Database) -> Result<u64, StoreError> {
    let txn = db.begin_read().map_err(backend)?;
    let meta = txn.open_table(META).map_err(backend)?;
    Ok(meta.get(REVISION).map_err(backend)?.map(|v| v.value()).unwrap_or(0))
}

async fn reload(db: &Arc<Database>) -> Result<StoreEvent, StoreError> {
    let db = db.clone();
    tokio::task::spawn_blocking(move || load(&db)).await.map_err(backend)?.map(StoreEvent::Reset)
}

fn commit(db: &Database, change: Change) -> Result<Committed, StoreError> {
    let txn = db.begin_write().map_err(backend)?;
    let committed = {
        let mut meta = txn.open_table(META).map_err(backend)?;
        let revision = meta.get(REVISION).map_err(backend)?.map(|v| v.value()).unwrap_or(0) + 1;
        meta.insert(REVISION, revision).map_err(backend)?;
        let mut table = txn.open_table(OBJECTS).map_err(backend)?;
        let mut puts = Vec::with_capacity(change.puts.len());
        for (key, document) in change.puts {
            let encoded = key.encode();
            let created_revision = match table.get(encoded.as_str()).map_err(backend)? {
                Some(old) => decode(&encoded, old.value())?.created_revision,
                None => revision,
            };
            let object = StoredObject { revision, created_revision, document };
            let bytes = serde_json::to_vec(&object).map_err(backend)?;
            table.insert(encoded.as_str(), bytes.as_slice()).map_err(backend)?;
            puts.push((key, object));
        }
        let mut deletes = Vec::with_capacity(change.deletes.len());
        for key in change.deletes {
            if table.remove(key.encode().as_str()).map_err(backend)?.is_some() {
                deletes.push(key);
            }
        }
        Committed { revision, puts, deletes }
    };
    txn.commit().map_err(backend)?;
    Ok(committed)
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn load(&self) -> Result<StoreContents, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || load(&db)).await.map_err(backend)?
    }

    async fn commit(&self, change: Change) -> Result<Committed, StoreError> {
        let db = self.db.clone();
        // Committing and announcing happen in one blocking task, so announcements leave in
        // commit order even when commits race.
        let commits = self.commits.clone();
        tokio::task::spawn_blocking(move || {
            let committed = commit(&db, change)?;
            let _ = commits.send(committed.clone());
            Ok(committed)
        })
        .await
        .map_err(backend)?
    }

    async fn create(&self, key: ObjectKey, document: serde_json::Value) -> Result<bool, StoreError> {
        // Only this process writes the file, and it creates a key once at start: a read
        // then a write is enough.
        if self.load().await?.objects.contains_key(&key) {
            return Ok(false);
        }
        self.commit(Change { puts: vec![(key, document)], deletes: vec![] }).await?;
        Ok(true)
    }

    fn watch(&self, revision: u64) -> BoxStream<'static, Result<StoreEvent, StoreError>> {
        // Subscribe before reading, so nothing committed in between is missed; the
        // watcher skips what the first reading already holds.
        let receiver = self.commits.subscribe();
        let db = self.db.clone();
        stream::unfold((receiver, db, Some(revision)), |(mut receiver, db, check)| async move {
            if let Some(revision) = check {
                let current = read_revision(&db);
                match current {
                    Ok(current) if current == revision => {}
                    _ => {
                        let event = reload(&db).await;
                        return Some((event, (receiver, db, None)));
                    }
                }
            }
            let event = match receiver.recv().await {
                Ok(committed) => Ok(StoreEvent::Committed(committed)),
                Err(broadcast::error::RecvError::Lagged(_)) => reload(&db).await,
                Err(broadcast::error::RecvError::Closed) => return None,
            };
            Some((event, (receiver, db, None)))
        })
        .boxed()
    }

    fn describe(&self) -> String {
        format!("embedded:{}", self.path)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use weft_model::ResourceKind;

    use super::*;

    fn key(name: &str) -> ObjectKey {
        ObjectKey::new(ResourceKind::Service, "default", name)
    }

    #[tokio::test]
    async fn commits_survive_reopening_with_revisions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        {
            let store = EmbeddedStore::open(&path).unwrap();
            let first = store
                .commit(Change {
                    puts: vec![(key("a"), json!({"v": 1})), (key("b"), json!({"v": 1}))],
                    deletes: vec![],
                })
                .await
                .unwrap();
            assert_eq!(first.revision, 1);
            let second = store
                .commit(Change { puts: vec![(key("a"), json!({"v": 2}))], deletes: vec![key("b")] })
                .await
                .unwrap();
            assert_eq!(second.revision, 2);
            assert_eq!(second.deletes, vec![key("b")]);
        }
        let store = EmbeddedStore::open(&path).unwrap();
        let contents = store.load().await.unwrap();
        assert_eq!(contents.revision, 2);
        assert_eq!(contents.objects.len(), 1);
        let a = &contents.objects[&key("a")];
        assert_eq!((a.revision, a.created_revision, &a.document), (2, 1, &json!({"v": 2})));
    }

    #[tokio::test]
    async fn a_second_control_plane_on_the_same_file_is_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let _first = EmbeddedStore::open(&path).unwrap();
        let error = EmbeddedStore::open(&path).err().expect("the file is held").to_string();
        assert!(error.contains("--data-dir"), "{error}");
    }
}
