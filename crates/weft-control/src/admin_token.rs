//! The admin token: what the HTTP API asks for before it changes anything.
//!
//! At first start the control plane makes a random token, writes it to
//! `<data-dir>/admin-token` (mode 0600; the path is logged, never the token) and keeps only
//! its SHA-256 in the store, so that every replica sharing an etcd accepts the same token
//! while none of them can show it. The CLI sends it as `Authorization: Bearer ...`.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    catalog::Catalog,
    store::{ObjectKey, Store, StoreError},
};

/// The store kind of the token's hash; one of [`crate::store::INTERNAL_KINDS`].
pub const ADMIN_TOKEN_KIND: &str = "AdminToken";
/// The file name under `--data-dir`.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

fn record_key() -> ObjectKey {
    ObjectKey { kind: ADMIN_TOKEN_KIND.into(), namespace: "default".into(), name: "admin".into() }
}

#[derive(Serialize, Deserialize)]
struct StoredToken {
    /// SHA-256 of the token, hex.
    sha256: String,
}

/// Why the admin token could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AdminTokenError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write the admin token to {path}: {reason}; check that --data-dir is writable")]
    Write { path: String, reason: String },
    #[error("the stored admin token record is unreadable: {0}")]
    Corrupt(String),
}

/// Checks presented tokens against the stored hash.
#[derive(Clone)]
pub struct AdminToken {
    sha256: Vec<u8>,
    /// Where this control plane wrote the token, if it made it.
    pub file: Option<PathBuf>,
}

fn sha256(text: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref().to_vec()
}

impl AdminToken {
    /// Whether `presented` is the admin token.
    pub fn accepts(&self, presented: &str) -> bool {
        // Compares digests, not tokens: how long a comparison of SHA-256 digests takes
        // tells an attacker nothing about a token that would match.
        sha256(presented.trim()) == self.sha256
    }
}

fn write_private(path: &Path, token: &str) -> Result<(), AdminTokenError> {
    let fail = |e: std::io::Error| AdminTokenError::Write { path: path.display().to_string(), reason: e.to_string() };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(fail)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(fail)?;
    writeln!(file, "{token}").map_err(fail)?;
    file.sync_all().map_err(fail)
}

/// Finds the token's hash in the store, or makes the token (first start), writes it to
/// `data_dir` and stores its hash.
pub async fn establish(catalog: &Catalog, store: &dyn Store, data_dir: &Path) -> Result<AdminToken, AdminTokenError> {
    let parse = |document: serde_json::Value| -> Result<AdminToken, AdminTokenError> {
        let stored: StoredToken =
            serde_json::from_value(document).map_err(|e| AdminTokenError::Corrupt(e.to_string()))?;
        let sha256 = hex::decode(&stored.sha256).map_err(|e| AdminTokenError::Corrupt(e.to_string()))?;
        Ok(AdminToken { sha256, file: None })
    };
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    if let Some(entry) = catalog.get(&record_key()) {
        let token = parse(entry.stored.document)?;
        return Ok(AdminToken { file: path.exists().then_some(path), ..token });
    }
    let token = format!("weft-admin-{}", hex::encode(rand::random::<[u8; 32]>()));
    write_private(&path, &token)?;
    let record = serde_json::json!({ "sha256": hex::encode(sha256(&token)) });
    if store.create(record_key(), record).await? {
        tracing::info!(path = %path.display(), "made the admin token the API asks for before any change; it is in this file (mode 0600)");
        return Ok(AdminToken { sha256: sha256(&token), file: Some(path) });
    }
    // Another replica made one first: ours is worth nothing.
    let _ = std::fs::remove_file(&path);
    let contents = store.load().await?;
    let stored = contents.objects.get(&record_key()).ok_or_else(|| AdminTokenError::Corrupt("it vanished".into()))?;
    tracing::info!("the admin token was made by another control-plane replica; its file is on that replica's host");
    parse(stored.document.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::test_catalog;

    #[tokio::test]
    async fn the_token_is_made_once_written_privately_and_only_its_hash_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let (catalog, store) = test_catalog(dir.path()).await;
        let made = establish(&catalog, store.as_ref(), dir.path()).await.unwrap();
        let path = made.file.clone().unwrap();
        let token = std::fs::read_to_string(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert!(made.accepts(&token) && !made.accepts("weft-admin-guess") && !made.accepts(""));

        let mut revision = catalog.subscribe();
        revision.wait_for(|_| catalog.get(&record_key()).is_some()).await.unwrap();
        let stored = catalog.get(&record_key()).unwrap().stored.document.to_string();
        assert!(!stored.contains(token.trim()), "only the hash is stored");
        let again = establish(&catalog, store.as_ref(), dir.path()).await.unwrap();
        assert!(again.accepts(&token));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), token, "the file is not rewritten");
    }
}
