//! The control plane's copy of the desired state: every stored resource, parsed, at one
//! revision. All writes go through here, so that "validate everything, then commit all of
//! it or nothing" holds for every apply and delete.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock},
};

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Mutex};
use weft_model::{parse_with_documents, ConfigError, ConfigErrors, ParsedDocument, Resource, ResourceKind};

use crate::{
    registry::{Registration, REGISTRATION_KIND},
    store::{Change, Committed, ObjectKey, Store, StoreError, StoredObject},
};

/// One file (or stdin, or request body) of YAML documents.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Source {
    /// Named in error messages.
    pub name: String,
    pub text: String,
}

impl Source {
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> Self {
        Source { name: name.into(), text: text.into() }
    }
}

/// What an apply or delete did to one resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Created,
    Configured,
    Unchanged,
    Deleted,
}

/// One line of an apply or delete report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ActionResult {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub action: Action,
}

/// The outcome of an apply or delete.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// The store revision after the change (unchanged for a dry run or a no-op).
    pub revision: u64,
    pub dry_run: bool,
    pub results: Vec<ActionResult>,
}

/// Why a change was refused. Nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("{0}")]
    Invalid(ConfigErrors),
    #[error("{0}")]
    Empty(String),
    #[error("{0} not found")]
    NotFound(ObjectKey),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One stored resource with its parsed form. `resource` is `None` for a stored document
/// this release cannot read (written by another version): it is kept, never dropped.
#[derive(Clone, Debug)]
pub struct Entry {
    pub stored: StoredObject,
    pub resource: Option<Resource>,
}

#[derive(Default)]
struct State {
    revision: u64,
    objects: BTreeMap<ObjectKey, Entry>,
}

/// The desired state and the only writer of the store.
pub struct Catalog {
    store: Arc<dyn Store>,
    state: RwLock<State>,
    /// Serialises changes, so each is judged against the state it will replace.
    writer: Mutex<()>,
    revision: watch::Sender<u64>,
}

impl Catalog {
    /// Loads everything from `store`.
    pub async fn load(store: Arc<dyn Store>) -> Result<Self, StoreError> {
        let contents = store.load().await?;
        let mut objects = BTreeMap::new();
        for (key, stored) in contents.objects {
            let resource = parse_stored(&key, &stored);
            objects.insert(key, Entry { stored, resource });
        }
        tracing::info!(store = %store.describe(), revision = contents.revision, resources = objects.len(), "store loaded");
        let (revision, _) = watch::channel(contents.revision);
        Ok(Catalog {
            store,
            state: RwLock::new(State { revision: contents.revision, objects }),
            writer: Mutex::new(()),
            revision,
        })
    }

    /// The store backend, for status pages.
    pub fn store_description(&self) -> String {
        self.store.describe()
    }

    /// Notified with the new revision after every committed change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    pub fn revision(&self) -> u64 {
        self.read().revision
    }

    /// Every entry of `kind` (all resource kinds if `None`) in `namespace` (all if `None`).
    pub fn list(&self, kind: Option<ResourceKind>, namespace: Option<&str>) -> (u64, Vec<(ObjectKey, Entry)>) {
        let state = self.read();
        let items = state
            .objects
            .iter()
            .filter(|(key, _)| key.kind != REGISTRATION_KIND)
            .filter(|(key, _)| kind.is_none_or(|k| key.kind == k.as_str()))
            .filter(|(key, _)| namespace.is_none_or(|ns| key.namespace == ns))
            .map(|(key, entry)| (key.clone(), entry.clone()))
            .collect();
        (state.revision, items)
    }

    pub fn get(&self, key: &ObjectKey) -> Option<Entry> {
        self.read().objects.get(key).cloned()
    }

    /// Every readable resource with its document, for compiling views.
    pub fn documents(&self) -> (u64, Vec<(Resource, serde_json::Value)>) {
        let state = self.read();
        let documents =
            state.objects.values().filter_map(|e| Some((e.resource.clone()?, e.stored.document.clone()))).collect();
        (state.revision, documents)
    }

    /// The workload registrations kept in the store.
    pub fn registrations(&self) -> Vec<Registration> {
        let state = self.read();
        state
            .objects
            .iter()
            .filter(|(key, _)| key.kind == REGISTRATION_KIND)
            .filter_map(|(key, entry)| match serde_json::from_value(entry.stored.document.clone()) {
                Ok(registration) => Some(registration),
                Err(error) => {
                    tracing::error!(%key, %error, "a stored registration cannot be read; it is ignored");
                    None
                }
            })
            .collect()
    }

    /// Stores a workload registration (so that it survives a restart).
    pub async fn put_registration(&self, registration: &Registration) -> Result<(), StoreError> {
        let key = registration_key(&registration.namespace, &registration.proxy_id);
        let document = serde_json::to_value(registration).map_err(|e| StoreError::Backend(e.to_string()))?;
        let _writer = self.writer.lock().await;
        let committed = self.store.commit(Change { puts: vec![(key, document)], deletes: vec![] }).await?;
        self.absorb(committed, vec![]);
        Ok(())
    }

    /// Forgets a workload registration.
    pub async fn delete_registration(&self, namespace: &str, proxy_id: &str) -> Result<(), StoreError> {
        let key = registration_key(namespace, proxy_id);
        let _writer = self.writer.lock().await;
        if !self.read().objects.contains_key(&key) {
            return Ok(());
        }
        let committed = self.store.commit(Change { puts: vec![], deletes: vec![key] }).await?;
        self.absorb(committed, vec![]);
        Ok(())
    }

    /// Validates every document of every source and stores them all, or none.
    pub async fn apply(&self, sources: &[Source], dry_run: bool) -> Result<Report, CatalogError> {
        let parsed = parse_sources(sources)?;
        if parsed.is_empty() {
            let names: Vec<&str> = sources.iter().map(|s| s.name.as_str()).collect();
            return Err(CatalogError::Empty(format!("no documents to apply in {}", names.join(", "))));
        }
        let _writer = self.writer.lock().await;
        let mut change = Change::default();
        let mut results = Vec::new();
        let mut resources = Vec::new();
        {
            let state = self.read();
            for document in parsed {
                let meta = &document.resource.metadata;
                let key = ObjectKey::new(document.resource.kind(), &meta.namespace, &meta.name);
                let action = match state.objects.get(&key) {
                    None => Action::Created,
                    Some(entry) if entry.stored.document == document.document => Action::Unchanged,
                    Some(_) => Action::Configured,
                };
                results.push(result(&key, action));
                if action != Action::Unchanged {
                    change.puts.push((key, document.document));
                    resources.push(document.resource);
                }
            }
        }
        self.finish(change, resources, results, dry_run).await
    }

    /// Deletes `keys`, all or none; a key that does not exist is refused unless
    /// `ignore_missing` (as for `weft delete -f`, where some may already be gone).
    pub async fn delete(
        &self,
        keys: Vec<ObjectKey>,
        ignore_missing: bool,
        dry_run: bool,
    ) -> Result<Report, CatalogError> {
        let _writer = self.writer.lock().await;
        let mut change = Change::default();
        let mut results = Vec::new();
        {
            let state = self.read();
            for key in keys {
                if !state.objects.contains_key(&key) {
                    if ignore_missing {
                        continue;
                    }
                    return Err(CatalogError::NotFound(key));
                }
                results.push(result(&key, Action::Deleted));
                change.deletes.push(key);
            }
        }
        self.finish(change, Vec::new(), results, dry_run).await
    }

    async fn finish(
        &self,
        change: Change,
        resources: Vec<Resource>,
        results: Vec<ActionResult>,
        dry_run: bool,
    ) -> Result<Report, CatalogError> {
        if dry_run || change.is_empty() {
            return Ok(Report { revision: self.revision(), dry_run, results });
        }
        let committed = self.store.commit(change).await?;
        let revision = committed.revision;
        self.absorb(committed, resources);
        self.revision.send_replace(revision);
        Ok(Report { revision, dry_run, results })
    }

    fn absorb(&self, committed: Committed, resources: Vec<Resource>) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        let mut resources = resources.into_iter();
        for (key, stored) in committed.puts {
            let resource = resources.next();
            state.objects.insert(key, Entry { stored, resource });
        }
        for key in committed.deletes {
            state.objects.remove(&key);
        }
        state.revision = committed.revision;
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// Parses every source; a resource named twice, even in different sources, is refused.
pub fn parse_sources(sources: &[Source]) -> Result<Vec<ParsedDocument>, CatalogError> {
    let mut parsed = Vec::new();
    let mut errors = Vec::new();
    let mut seen: HashMap<ObjectKey, String> = HashMap::new();
    for source in sources {
        match parse_with_documents(&source.name, &source.text) {
            Ok(documents) => {
                for (index, document) in documents.into_iter().enumerate() {
                    let meta = &document.resource.metadata;
                    let key = ObjectKey::new(document.resource.kind(), &meta.namespace, &meta.name);
                    if let Some(first) = seen.insert(key.clone(), source.name.clone()) {
                        errors.push(ConfigError {
                            source_name: source.name.clone(),
                            index: index + 1,
                            resource: Some(format!("{} {}", key.kind, key.name)),
                            path: "metadata.name".into(),
                            message: format!("{key} is also defined in {first}: each resource may appear once"),
                        });
                    }
                    parsed.push(document);
                }
            }
            Err(ConfigErrors(found)) => errors.extend(found),
        }
    }
    if errors.is_empty() {
        Ok(parsed)
    } else {
        Err(CatalogError::Invalid(ConfigErrors(errors)))
    }
}

fn result(key: &ObjectKey, action: Action) -> ActionResult {
    ActionResult { kind: key.kind.clone(), namespace: key.namespace.clone(), name: key.name.clone(), action }
}

fn registration_key(namespace: &str, proxy_id: &str) -> ObjectKey {
    ObjectKey { kind: REGISTRATION_KIND.to_string(), namespace: namespace.to_string(), name: proxy_id.to_string() }
}

fn parse_stored(key: &ObjectKey, stored: &StoredObject) -> Option<Resource> {
    if key.kind == REGISTRATION_KIND {
        return None;
    }
    match weft_model::parse_documents(&key.to_string(), &stored.document.to_string()) {
        Ok(mut resources) if resources.len() == 1 => resources.pop(),
        Ok(_) => None,
        Err(error) => {
            tracing::error!(%key, %error, "a stored resource cannot be read by this release; it is kept but not served");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    const SERVICE: &str = "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: reviews}\nspec: {selector: {app: reviews}, ports: [{port: 80, protocol: http}]}\n";

    async fn catalog(dir: &tempfile::TempDir) -> Catalog {
        Catalog::load(Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap())).await.unwrap()
    }

    #[tokio::test]
    async fn apply_reports_created_configured_unchanged_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        {
            let catalog = catalog(&dir).await;
            let report = catalog.apply(&[Source::new("a.yaml", SERVICE)], false).await.unwrap();
            assert_eq!(report.results[0].action, Action::Created);
            assert_eq!(
                catalog.apply(&[Source::new("a.yaml", SERVICE)], false).await.unwrap().results[0].action,
                Action::Unchanged
            );
            let changed = SERVICE.replace("port: 80", "port: 8080");
            let report = catalog.apply(&[Source::new("a.yaml", changed)], false).await.unwrap();
            assert_eq!((report.results[0].action, report.revision), (Action::Configured, 2));
        }
        let catalog = catalog(&dir).await;
        let (revision, items) = catalog.list(Some(ResourceKind::Service), None);
        assert_eq!((revision, items.len()), (2, 1));
        assert_eq!(items[0].1.stored.document["spec"]["ports"][0]["port"], 8080);
        assert!(items[0].1.resource.is_some());
    }

    #[tokio::test]
    async fn an_invalid_document_refuses_the_whole_apply() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = catalog(&dir).await;
        let text =
            format!("{SERVICE}---\n{}", SERVICE.replace("reviews}\n", "ratings}\n").replace("port: 80", "port: 0"));
        let error = catalog.apply(&[Source::new("two.yaml", text)], false).await.unwrap_err().to_string();
        assert!(error.contains("two.yaml: document 2 (Service ratings), field spec.ports[0].port"), "{error}");
        assert_eq!(catalog.list(None, None).1.len(), 0);
        assert_eq!(catalog.revision(), 0);
    }

    #[tokio::test]
    async fn a_resource_in_two_files_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = catalog(&dir).await;
        let sources = [Source::new("a.yaml", SERVICE), Source::new("b.yaml", SERVICE)];
        let error = catalog.apply(&sources, false).await.unwrap_err().to_string();
        assert!(error.contains("b.yaml: document 1") && error.contains("also defined in a.yaml"), "{error}");
    }

    #[tokio::test]
    async fn dry_run_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = catalog(&dir).await;
        assert_eq!(catalog.apply(&[Source::new("a", SERVICE)], true).await.unwrap().results[0].action, Action::Created);
        assert_eq!(catalog.list(None, None).1.len(), 0);
        catalog.apply(&[Source::new("a", SERVICE)], false).await.unwrap();
        let key = ObjectKey::new(ResourceKind::Service, "default", "reviews");
        let missing = ObjectKey::new(ResourceKind::Service, "default", "nope");
        assert!(matches!(catalog.delete(vec![missing.clone()], false, false).await, Err(CatalogError::NotFound(_))));
        let report = catalog.delete(vec![key.clone(), missing], true, false).await.unwrap();
        assert_eq!(report.results.len(), 1);
        assert!(catalog.get(&key).is_none());
    }
}
