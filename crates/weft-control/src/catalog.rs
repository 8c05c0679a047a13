//! The control plane's copy of the desired state: every stored resource, parsed, at one
//! revision. All writes go through here, so that "validate everything, then commit all of
//! it or nothing" holds for every apply and delete.
//!
//! The copy is fed only by the store's watch, whoever wrote: this control plane's own
//! writes arrive the same way as another replica's, so every replica holds the same
//! state in the same order. A write returns once its revision has arrived, so what a
//! client just applied is what its next read shows.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock, Weak},
    time::Duration,
};

use futures_util::StreamExt;

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Mutex};
use weft_model::{parse_with_documents, ConfigError, ConfigErrors, ParsedDocument, Resource, ResourceKind};

use crate::{
    audit,
    operator_tokens::Operator,
    registry::{Registration, REGISTRATION_KIND},
    store::{Change, Committed, ObjectKey, Store, StoreError, StoreEvent, StoredObject},
};

/// How long a write waits to see its own revision come back through the watch before
/// it returns anyway (the change is committed; this copy is merely behind).
const CATCH_UP: Duration = Duration::from_secs(10);

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
    /// The readable registrations among `objects`, parsed once.
    registrations: BTreeMap<ObjectKey, Registration>,
}

impl State {
    fn insert(&mut self, key: ObjectKey, stored: StoredObject, resource: Option<Resource>) {
        if key.kind == REGISTRATION_KIND {
            match serde_json::from_value(stored.document.clone()) {
                Ok(registration) => {
                    self.registrations.insert(key.clone(), registration);
                }
                Err(error) => {
                    tracing::error!(%key, %error, "a stored registration cannot be read; it is ignored");
                    self.registrations.remove(&key);
                }
            }
        }
        self.objects.insert(key, Entry { stored, resource });
    }

    fn remove(&mut self, key: &ObjectKey) {
        self.objects.remove(key);
        self.registrations.remove(key);
    }
}

/// The desired state and the only writer of the store.
pub struct Catalog {
    store: Arc<dyn Store>,
    state: RwLock<State>,
    /// Serialises changes, so each is judged against the state it will replace.
    writer: Mutex<()>,
    revision: watch::Sender<u64>,
    /// The CA's trust domain, which a MeshConfig may only repeat.
    trust_domain: std::sync::OnceLock<String>,
    /// Dropped with the catalog, which ends the task following the store's watch (the
    /// task holds the store, so it would otherwise keep it open forever).
    _following: tokio::sync::oneshot::Sender<()>,
    /// How long commits take, for the control plane's `/metrics`.
    commit_seconds: prometheus_client::metrics::histogram::Histogram,
}

impl Catalog {
    /// Fixes the trust domain MeshConfigs are checked against (the CA's).
    pub fn set_trust_domain(&self, trust_domain: &str) {
        let _ = self.trust_domain.set(trust_domain.to_string());
    }

    /// Loads everything from `store`, then follows its watch for as long as the catalog
    /// lives.
    pub async fn load(store: Arc<dyn Store>) -> Result<Arc<Self>, StoreError> {
        let contents = store.load().await?;
        let mut state = State { revision: contents.revision, ..Default::default() };
        for (key, stored) in contents.objects {
            let resource = parse_stored(&key, &stored);
            state.insert(key, stored, resource);
        }
        tracing::info!(store = %store.describe(), revision = contents.revision, resources = state.objects.len(), "store loaded");
        let (revision, _) = watch::channel(contents.revision);
        let (following, dropped) = tokio::sync::oneshot::channel();
        let catalog = Arc::new(Catalog {
            store: store.clone(),
            state: RwLock::new(state),
            writer: Mutex::new(()),
            revision,
            trust_domain: std::sync::OnceLock::new(),
            _following: following,
            commit_seconds: crate::metrics::latency_histogram(),
        });
        let follower = follow(Arc::downgrade(&catalog), store, contents.revision);
        tokio::spawn(async move {
            tokio::select! {
                () = follower => {}
                _ = dropped => {}
            }
        });
        Ok(catalog)
    }

    /// The histogram commits are timed into (shared: a clone observes into it).
    pub fn commit_histogram(&self) -> prometheus_client::metrics::histogram::Histogram {
        self.commit_seconds.clone()
    }

    /// Commits `change`, timing it.
    async fn commit(&self, change: crate::store::Change) -> Result<crate::store::Committed, StoreError> {
        let started = std::time::Instant::now();
        let committed = self.store.commit(change).await;
        self.commit_seconds.observe(started.elapsed().as_secs_f64());
        committed
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
            .filter(|(key, _)| !key.is_internal())
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
    pub fn registrations(&self) -> Vec<(ObjectKey, Registration)> {
        self.read().registrations.iter().map(|(key, registration)| (key.clone(), registration.clone())).collect()
    }

    /// The documents of every stored record of internal `kind`.
    pub fn internal(&self, kind: &str) -> Vec<serde_json::Value> {
        let state = self.read();
        state
            .objects
            .iter()
            .filter(|(key, _)| key.kind == kind)
            .map(|(_, entry)| entry.stored.document.clone())
            .collect()
    }

    /// Every stored record of internal `kind`, with the revision that wrote it.
    pub fn internal_entries(&self, kind: &str) -> Vec<(u64, serde_json::Value)> {
        let state = self.read();
        state
            .objects
            .iter()
            .filter(|(key, _)| key.kind == kind)
            .map(|(_, entry)| (entry.stored.revision, entry.stored.document.clone()))
            .collect()
    }

    /// The stored registration of `key`, if any.
    pub fn registration(&self, key: &ObjectKey) -> Option<Registration> {
        self.read().registrations.get(key).cloned()
    }

    /// Stores an internal record at `key` only if nothing is there: `false` if something
    /// was (another replica's, made first).
    pub async fn create_internal(&self, key: ObjectKey, document: serde_json::Value) -> Result<bool, StoreError> {
        self.store.create(key, document).await
    }

    /// Writes records of the [`crate::store::INTERNAL_KINDS`] (registrations, join
    /// tokens; puts and deletes) in one commit. They are not judged against anything, so
    /// they do not wait for applies.
    pub async fn write_internal(&self, change: Change) -> Result<(), StoreError> {
        if change.is_empty() {
            return Ok(());
        }
        let committed = self.commit(change).await?;
        self.caught_up(&committed).await;
        Ok(())
    }

    /// Validates every document of every source and stores them all, or none; each
    /// change is recorded in the audit log, as `operator`'s, in the same commit.
    pub async fn apply(&self, sources: &[Source], dry_run: bool, operator: &Operator) -> Result<Report, CatalogError> {
        let trust_domain = self.trust_domain.get().cloned();
        let parsed = parse_sources_checked(sources, |resource| match (&resource.spec, &trust_domain) {
            (weft_model::resource::ResourceSpec::MeshConfig(mesh), Some(ours)) => match &mesh.trust_domain {
                Some(theirs) if theirs != ours => Some((
                    "spec.trustDomain".to_string(),
                    format!(
                        "this mesh's trust domain is {ours}, fixed when its CA was made; a MeshConfig cannot \
                         change it (leave the field out, or write {ours})"
                    ),
                )),
                _ => None,
            },
            _ => None,
        })?;
        if parsed.is_empty() {
            let names: Vec<&str> = sources.iter().map(|s| s.name.as_str()).collect();
            return Err(CatalogError::Empty(format!("no documents to apply in {}", names.join(", "))));
        }
        let _writer = self.writer.lock().await;
        let mut change = Change::default();
        let mut results = Vec::new();
        let mut audits = Vec::new();
        let now = std::time::SystemTime::now();
        {
            let state = self.read();
            for document in parsed {
                let meta = &document.resource.metadata;
                let key = ObjectKey::new(document.resource.kind(), &meta.namespace, &meta.name);
                let before = state.objects.get(&key).map(|entry| entry.stored.document.clone());
                let action = match &before {
                    None => Action::Created,
                    Some(before) if *before == document.document => Action::Unchanged,
                    Some(_) => Action::Configured,
                };
                results.push(result(&key, action));
                if action != Action::Unchanged {
                    let after = Some(document.document.clone());
                    audits.push(audit::record(operator, "apply", (&key).into(), before, after, now));
                    change.puts.push((key, document.document));
                }
            }
        }
        change.puts.extend(audits);
        self.finish(change, results, dry_run).await
    }

    /// Deletes `keys`, all or none; a key that does not exist is refused unless
    /// `ignore_missing` (as for `weft delete -f`, where some may already be gone). Each
    /// deletion is recorded in the audit log, as `operator`'s, in the same commit.
    pub async fn delete(
        &self,
        keys: Vec<ObjectKey>,
        ignore_missing: bool,
        dry_run: bool,
        operator: &Operator,
    ) -> Result<Report, CatalogError> {
        let _writer = self.writer.lock().await;
        let mut change = Change::default();
        let mut results = Vec::new();
        let now = std::time::SystemTime::now();
        {
            let state = self.read();
            for key in keys {
                let Some(entry) = state.objects.get(&key) else {
                    if ignore_missing {
                        continue;
                    }
                    return Err(CatalogError::NotFound(key));
                };
                let before = Some(entry.stored.document.clone());
                change.puts.push(audit::record(operator, "delete", (&key).into(), before, None, now));
                results.push(result(&key, Action::Deleted));
                change.deletes.push(key);
            }
        }
        self.finish(change, results, dry_run).await
    }

    async fn finish(&self, change: Change, results: Vec<ActionResult>, dry_run: bool) -> Result<Report, CatalogError> {
        if dry_run || change.is_empty() {
            return Ok(Report { revision: self.revision(), dry_run, results });
        }
        let committed = self.commit(change).await?;
        let revision = committed.revision;
        self.caught_up(&committed).await;
        Ok(Report { revision, dry_run, results })
    }

    /// Waits until the watch has brought `committed` into this copy.
    async fn caught_up(&self, committed: &Committed) {
        // A change that changed nothing (deleting what another replica just deleted)
        // produces no event to wait for.
        if committed.puts.is_empty() && committed.deletes.is_empty() {
            return;
        }
        let mut revision = self.revision.subscribe();
        if tokio::time::timeout(CATCH_UP, revision.wait_for(|r| *r >= committed.revision)).await.is_err() {
            tracing::warn!(
                revision = committed.revision,
                "committed, but the store watch has not brought the change back yet; reads may lag"
            );
        }
    }

    fn absorb(&self, event: StoreEvent) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        let revision = match event {
            StoreEvent::Committed(committed) => {
                if committed.revision <= state.revision {
                    return;
                }
                for (key, stored) in committed.puts {
                    let resource = parse_stored(&key, &stored);
                    state.insert(key, stored, resource);
                }
                for key in &committed.deletes {
                    state.remove(key);
                }
                committed.revision
            }
            StoreEvent::Reset(contents) => {
                let mut fresh = State { revision: contents.revision, ..Default::default() };
                for (key, stored) in contents.objects {
                    let resource = parse_stored(&key, &stored);
                    fresh.insert(key, stored, resource);
                }
                *state = fresh;
                contents.revision
            }
        };
        state.revision = revision;
        drop(state);
        self.revision.send_replace(revision);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// A catalog over a fresh embedded store in `dir`, and that store: what unit tests of
/// everything built on the catalog start from.
#[cfg(test)]
pub(crate) async fn test_catalog(dir: &std::path::Path) -> (Arc<Catalog>, Arc<dyn Store>) {
    let store: Arc<dyn Store> =
        Arc::new(crate::store::embedded::EmbeddedStore::open(&dir.join("s.redb")).expect("a fresh store opens"));
    (Catalog::load(store.clone()).await.expect("an empty store loads"), store)
}

/// Feeds `catalog` from the store's watch until the catalog is dropped.
async fn follow(catalog: Weak<Catalog>, store: Arc<dyn Store>, mut revision: u64) {
    loop {
        let mut events = store.watch(revision);
        while let Some(event) = events.next().await {
            let Some(catalog) = catalog.upgrade() else { return };
            match event {
                Ok(event) => {
                    catalog.absorb(event);
                    revision = catalog.revision();
                }
                Err(error) => tracing::warn!(%error, "the store watch failed; it resumes"),
            }
        }
        if catalog.strong_count() == 0 {
            return;
        }
        tracing::warn!(revision, "the store watch ended; watching again");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Parses every source; a resource named twice, even in different sources, is refused.
pub fn parse_sources(sources: &[Source]) -> Result<Vec<ParsedDocument>, CatalogError> {
    parse_sources_checked(sources, |_| None)
}

/// [`parse_sources`], with `check` judging each resource against this mesh (a field
/// path and a reason when it is refused).
fn parse_sources_checked(
    sources: &[Source],
    check: impl Fn(&Resource) -> Option<(String, String)>,
) -> Result<Vec<ParsedDocument>, CatalogError> {
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
                            line: None,
                            column: None,
                        });
                    }
                    if let Some((path, message)) = check(&document.resource) {
                        errors.push(ConfigError {
                            source_name: source.name.clone(),
                            index: index + 1,
                            resource: Some(format!("{} {}", key.kind, key.name)),
                            path,
                            message,
                            line: None,
                            column: None,
                        });
                    }
                    parsed.push(document);
                }
            }
            Err(ConfigErrors(found)) => errors.extend(found),
        }
        let from = errors.iter().position(|e| e.source_name == source.name).unwrap_or(errors.len());
        weft_model::locate::locate_errors(&source.text, &mut errors[from..]);
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

/// The store key of the registration of proxy `proxy_id` in `namespace`.
pub fn registration_key(namespace: &str, proxy_id: &str) -> ObjectKey {
    ObjectKey { kind: REGISTRATION_KIND.to_string(), namespace: namespace.to_string(), name: proxy_id.to_string() }
}

fn parse_stored(key: &ObjectKey, stored: &StoredObject) -> Option<Resource> {
    if key.is_internal() {
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
    use crate::operator_tokens::Operator;
    use crate::store::embedded::EmbeddedStore;

    const SERVICE: &str = "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: reviews}\nspec: {selector: {app: reviews}, ports: [{port: 80, protocol: http}]}\n";

    async fn catalog(dir: &tempfile::TempDir) -> Arc<Catalog> {
        // A dropped catalog's watch task lets go of the file at its next turn.
        for _ in 0..100 {
            if let Ok(store) = EmbeddedStore::open(&dir.path().join("s.redb")) {
                return Catalog::load(Arc::new(store)).await.unwrap();
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the store stays open after its catalog was dropped");
    }

    #[tokio::test]
    async fn apply_reports_created_configured_unchanged_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        {
            let catalog = catalog(&dir).await;
            let report = catalog
                .apply(&[Source::new("a.yaml", SERVICE)], false, &Operator::control_plane("test"))
                .await
                .unwrap();
            assert_eq!(report.results[0].action, Action::Created);
            assert_eq!(
                catalog
                    .apply(&[Source::new("a.yaml", SERVICE)], false, &Operator::control_plane("test"))
                    .await
                    .unwrap()
                    .results[0]
                    .action,
                Action::Unchanged
            );
            let changed = SERVICE.replace("port: 80", "port: 8080");
            let report = catalog
                .apply(&[Source::new("a.yaml", changed)], false, &Operator::control_plane("test"))
                .await
                .unwrap();
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
        let error = catalog
            .apply(&[Source::new("two.yaml", text)], false, &Operator::control_plane("test"))
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("two.yaml: document 2 (Service ratings), field spec.ports[0].port"), "{error}");
        assert_eq!(catalog.list(None, None).1.len(), 0);
        assert_eq!(catalog.revision(), 0);
    }

    #[tokio::test]
    async fn a_resource_in_two_files_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = catalog(&dir).await;
        let sources = [Source::new("a.yaml", SERVICE), Source::new("b.yaml", SERVICE)];
        let error = catalog.apply(&sources, false, &Operator::control_plane("test")).await.unwrap_err().to_string();
        assert!(error.contains("b.yaml: document 1") && error.contains("also defined in a.yaml"), "{error}");
    }

    #[tokio::test]
    async fn dry_run_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = catalog(&dir).await;
        assert_eq!(
            catalog.apply(&[Source::new("a", SERVICE)], true, &Operator::control_plane("test")).await.unwrap().results
                [0]
            .action,
            Action::Created
        );
        assert_eq!(catalog.list(None, None).1.len(), 0);
        catalog.apply(&[Source::new("a", SERVICE)], false, &Operator::control_plane("test")).await.unwrap();
        let key = ObjectKey::new(ResourceKind::Service, "default", "reviews");
        let missing = ObjectKey::new(ResourceKind::Service, "default", "nope");
        assert!(matches!(
            catalog.delete(vec![missing.clone()], false, false, &Operator::control_plane("test")).await,
            Err(CatalogError::NotFound(_))
        ));
        let report =
            catalog.delete(vec![key.clone(), missing], true, false, &Operator::control_plane("test")).await.unwrap();
        assert_eq!(report.results.len(), 1);
        assert!(catalog.get(&key).is_none());
    }
}
