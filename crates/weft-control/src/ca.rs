//! The control plane as the mesh's certificate authority: at first start it makes a root
//! (or takes the operator's root or intermediate) and keeps it in the store, so that a
//! restarted control plane, and every replica sharing an etcd, signs with the same CA.
//!
//! The CA is an internal store object (`CertificateAuthority default/mesh`), never listed
//! or served by the API. Its key is kept encrypted (AES-256-GCM) with a key from a file
//! when the store is etcd, which other people operate and back up; on the embedded store,
//! a file only this host's operator reads, it is kept as is.

use std::{path::PathBuf, time::SystemTime};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use rustls::pki_types::{pem::PemObject, CertificateDer};
use serde::{Deserialize, Serialize};
use weft_identity::{Authority, IdentityError, TrustDomain};

use crate::{
    catalog::Catalog,
    store::{ObjectKey, Store, StoreError},
};

/// The store kind of the CA; one of [`crate::store::INTERNAL_KINDS`].
pub const CA_KIND: &str = "CertificateAuthority";

/// The default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "weft.local";

fn ca_key() -> ObjectKey {
    ObjectKey { kind: CA_KIND.into(), namespace: "default".into(), name: "mesh".into() }
}

/// How the CA is made or found.
#[derive(Clone, Debug)]
pub struct CaSettings {
    pub trust_domain: TrustDomain,
    /// An operator's CA certificate (then its chain up to the root) and key, used at
    /// first start instead of a generated root.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// 32 bytes (raw, or 64 hex digits) that encrypt the CA's key in the store.
    pub encryption_key: Option<PathBuf>,
}

/// Why the CA could not be set up. Each names the flag that fixes it.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("cannot read {flag} {path}: {reason}")]
    File { flag: &'static str, path: String, reason: String },
    #[error(
        "this store's CA was made for trust domain {stored}; a trust domain is fixed when the CA is made, so \
         --trust-domain {asked} cannot change it"
    )]
    TrustDomain { stored: String, asked: String },
    #[error(
        "an etcd store keeps the CA's key encrypted: give every replica the same key file with \
         --ca-encryption-key (make one with: head -c 32 /dev/urandom > ca-encryption.key)"
    )]
    EncryptionKeyNeeded,
    #[error("the stored CA's key cannot be decrypted with --ca-encryption-key {0}: is it the key it was made with?")]
    WrongEncryptionKey(String),
    #[error("--ca-cert and --ca-key go together")]
    HalfAnOperatorCa,
    #[error("the stored CA record is unreadable: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Rotation(String),
}

/// The CA as stored.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredAuthority {
    trust_domain: String,
    /// The signing certificate, then its chain up to the root (PEM).
    certificates: String,
    key: StoredKey,
    /// During a rotation: the roots it replaced, still trusted (PEM).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    previous_roots: Vec<String>,
    /// During a rotation: the current root certified by each previous one (PEM), so that
    /// a party trusting only an old root verifies the new chains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    bridges: Vec<String>,
    /// When the last rotation started (seconds since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rotated_at: Option<u64>,
    /// Every bridge ever made and every root a finished rotation retired (PEM): presented
    /// by the HTTPS API only, so that an operator token made under an old root still
    /// verifies the control plane (see [`CaState::lineage`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    lineage: Vec<String>,
}

/// The CA in use: the signing authority, and what it trusts and presents.
pub struct CaState {
    pub authority: Authority,
    /// The trust bundle: the current root first, then those a rotation still trusts.
    pub roots: Vec<CertificateDer<'static>>,
    /// `roots` as PEM, as pushed to proxies.
    pub bundle_pem: String,
    /// Bridges, then every root: appended to the control plane's own chain, so that a
    /// proxy joining with a token of either root can verify it.
    pub presented: Vec<CertificateDer<'static>>,
    pub rotated_at: Option<u64>,
    /// Every bridge ever made and every retired root: the path from any root this mesh
    /// ever had to the current one. Only the HTTPS API presents it (after `presented`),
    /// for operator tokens that pin an old root; proxies' join tokens stop at the end of
    /// a rotation, as they should.
    pub lineage: Vec<CertificateDer<'static>>,
}

impl CaState {
    /// A CA with no rotation in progress.
    pub fn from_authority(authority: Authority) -> Self {
        CaState::new(authority, Vec::new(), Vec::new(), None, Vec::new())
    }

    fn new(
        authority: Authority,
        previous: Vec<CertificateDer<'static>>,
        bridges: Vec<CertificateDer<'static>>,
        rotated_at: Option<u64>,
        lineage: Vec<CertificateDer<'static>>,
    ) -> Self {
        let mut roots = vec![authority.root().clone()];
        roots.extend(previous);
        let mut presented = bridges;
        presented.extend(roots.iter().cloned());
        CaState {
            bundle_pem: weft_identity::authority::pem_of(&roots),
            roots,
            presented,
            authority,
            rotated_at,
            lineage,
        }
    }

    /// SHA-256 (hex) of each trusted root, the current one first.
    pub fn root_hashes(&self) -> Vec<String> {
        self.roots.iter().map(|r| hex::encode(ring::digest::digest(&ring::digest::SHA256, r))).collect()
    }

    /// SHA-256 (hex) of every root the mesh trusts or trusted (and of the bridges, which
    /// no token names): what an operator token of this mesh may carry.
    pub fn known_root_hashes(&self) -> Vec<String> {
        let mut hashes = self.root_hashes();
        hashes.extend(self.lineage.iter().map(|c| hex::encode(ring::digest::digest(&ring::digest::SHA256, c))));
        hashes
    }
}

fn certificates(pems: &[String]) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let mut all = Vec::new();
    for pem in pems {
        for certificate in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            all.push(certificate.map_err(|e| CaError::Corrupt(e.to_string()))?);
        }
    }
    Ok(all)
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "form")]
enum StoredKey {
    /// PEM, on the embedded store.
    Plain { pem: String },
    /// AES-256-GCM of the PEM, bound to the trust domain; hex.
    Sealed { nonce: String, ciphertext: String },
}

fn read(flag: &'static str, path: &PathBuf) -> Result<Vec<u8>, CaError> {
    std::fs::read(path).map_err(|e| CaError::File { flag, path: path.display().to_string(), reason: e.to_string() })
}

/// The key that seals the CA's key in the store.
struct SealingKey {
    key: LessSafeKey,
    path: String,
}

impl SealingKey {
    fn load(path: &PathBuf) -> Result<Self, CaError> {
        let bytes = read("--ca-encryption-key", path)?;
        let text = String::from_utf8_lossy(&bytes);
        let material = match hex::decode(text.trim()).ok() {
            Some(decoded) if decoded.len() == 32 => decoded,
            _ if bytes.len() == 32 => bytes,
            _ => {
                return Err(CaError::File {
                    flag: "--ca-encryption-key",
                    path: path.display().to_string(),
                    reason: "it must hold 32 bytes, raw or as 64 hex digits".into(),
                })
            }
        };
        let key = UnboundKey::new(&AES_256_GCM, &material).expect("32 bytes is an AES-256 key");
        Ok(SealingKey { key: LessSafeKey::new(key), path: path.display().to_string() })
    }

    fn seal(&self, pem: &str, trust_domain: &str) -> StoredKey {
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let mut data = pem.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce_bytes), Aad::from(trust_domain), &mut data)
            .expect("sealing a short buffer cannot fail");
        StoredKey::Sealed { nonce: hex::encode(nonce_bytes), ciphertext: hex::encode(&data) }
    }

    fn open(&self, nonce: &str, ciphertext: &str, trust_domain: &str) -> Result<String, CaError> {
        let wrong = || CaError::WrongEncryptionKey(self.path.clone());
        let nonce: [u8; NONCE_LEN] = hex::decode(nonce).ok().and_then(|n| n.try_into().ok()).ok_or_else(wrong)?;
        let mut data = hex::decode(ciphertext).map_err(|_| wrong())?;
        let plain = self
            .key
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(trust_domain), &mut data)
            .map_err(|_| wrong())?;
        String::from_utf8(plain.to_vec()).map_err(|_| wrong())
    }
}

/// What reads, rotates and re-reads the stored CA: the settings and the sealing key.
pub struct CaKeeper {
    settings: CaSettings,
    sealing: Option<SealingKey>,
}

impl CaKeeper {
    /// The CA the store holds now, if any.
    pub fn current(&self, catalog: &Catalog) -> Option<Result<CaState, CaError>> {
        let entry = catalog.get(&ca_key())?;
        Some(open(entry.stored.document, &self.settings, self.sealing.as_ref(), SystemTime::now()))
    }

    /// The revision of the stored CA, to notice a rotation made by any replica.
    pub fn revision(&self, catalog: &Catalog) -> Option<u64> {
        catalog.get(&ca_key()).map(|entry| entry.stored.revision)
    }

    /// Starts a rotation: a new root signs from now on; the old one stays trusted, and
    /// bridged, until [`CaKeeper::finish_rotation`].
    pub async fn rotate(&self, catalog: &Catalog, current: &CaState, now: SystemTime) -> Result<CaState, CaError> {
        if current.authority.certificates_pem()
            != weft_identity::authority::pem_of(std::slice::from_ref(current.authority.root()))
        {
            return Err(CaError::Rotation(
                "this mesh signs with an operator's intermediate CA: rotate it at its own root, then restart with the new \
                 --ca-cert and --ca-key on a new store"
                    .into(),
            ));
        }
        let (next, bridge) = current.authority.successor(now)?;
        let previous: Vec<CertificateDer<'static>> = current.roots.clone();
        // Older bridges certify the previous root, not the new one: only this one stays.
        let bridges = vec![bridge];
        let rotated_at = Some(unix(now));
        let mut lineage = current.lineage.clone();
        lineage.extend(bridges.iter().cloned());
        self.write(catalog, &next, &previous, &bridges, rotated_at, &lineage).await?;
        tracing::info!(old = %current.authority.root_hash(), new = %next.root_hash(), "started a root rotation");
        Ok(CaState::new(next, previous, bridges, rotated_at, lineage))
    }

    /// Ends a rotation: only the current root is trusted. Refused while certificates from
    /// an old root may still be in use (less than `cert_lifetime` since the rotation),
    /// unless `force`.
    pub async fn finish_rotation(
        &self,
        catalog: &Catalog,
        current: &CaState,
        cert_lifetime: std::time::Duration,
        force: bool,
        now: SystemTime,
    ) -> Result<CaState, CaError> {
        let Some(rotated_at) = current.rotated_at.filter(|_| current.roots.len() > 1) else {
            return Err(CaError::Rotation("no rotation is in progress: start one with weft ca rotate".into()));
        };
        let safe_at = rotated_at + cert_lifetime.as_secs();
        if unix(now) < safe_at && !force {
            return Err(CaError::Rotation(format!(
                "certificates from the old root may be in use for another {}s (one certificate lifetime after the \
                 rotation): finish then, or use --force if every proxy has renewed (weft check)",
                safe_at - unix(now)
            )));
        }
        let authority = Authority::from_pem(
            current.authority.trust_domain(),
            &current.authority.certificates_pem(),
            current.authority.key_pem(),
            now,
        )?;
        let mut lineage = current.lineage.clone();
        lineage.extend(current.roots[1..].iter().cloned());
        self.write(catalog, &authority, &[], &[], current.rotated_at, &lineage).await?;
        tracing::info!(root = %authority.root_hash(), "finished the root rotation: the old root is no longer trusted");
        Ok(CaState::new(authority, Vec::new(), Vec::new(), current.rotated_at, lineage))
    }

    async fn write(
        &self,
        catalog: &Catalog,
        authority: &Authority,
        previous: &[CertificateDer<'static>],
        bridges: &[CertificateDer<'static>],
        rotated_at: Option<u64>,
        lineage: &[CertificateDer<'static>],
    ) -> Result<(), CaError> {
        let trust_domain = authority.trust_domain().as_str();
        let key = match &self.sealing {
            Some(sealing) => sealing.seal(authority.key_pem(), trust_domain),
            None => StoredKey::Plain { pem: authority.key_pem().to_string() },
        };
        let pem = |c: &CertificateDer<'static>| weft_identity::authority::pem_of(std::slice::from_ref(c));
        let record = StoredAuthority {
            trust_domain: trust_domain.into(),
            certificates: authority.certificates_pem(),
            key,
            previous_roots: previous.iter().map(pem).collect(),
            bridges: bridges.iter().map(pem).collect(),
            rotated_at,
            lineage: lineage.iter().map(pem).collect(),
        };
        let document = serde_json::to_value(&record).map_err(|e| CaError::Corrupt(e.to_string()))?;
        catalog
            .write_internal(crate::store::Change { puts: vec![(ca_key(), document)], deletes: vec![] })
            .await
            .map_err(|e| CaError::Rotation(format!("cannot store the CA: {e}")))
    }
}

fn unix(time: SystemTime) -> u64 {
    weft_identity::unix_seconds(time)
}

/// Finds the CA in the store, or makes it (first start) and stores it. `sealed`: the
/// store is shared (etcd), so the key is stored encrypted.
pub async fn establish(
    catalog: &Catalog,
    store: &dyn Store,
    settings: &CaSettings,
    sealed: bool,
    now: SystemTime,
) -> Result<(CaState, CaKeeper), CaError> {
    let sealing = settings.encryption_key.as_ref().map(SealingKey::load).transpose()?;
    if sealed && sealing.is_none() {
        return Err(CaError::EncryptionKeyNeeded);
    }
    let state = establish_state(catalog, store, settings, sealing.as_ref(), now).await?;
    Ok((state, CaKeeper { settings: settings.clone(), sealing }))
}

async fn establish_state(
    catalog: &Catalog,
    store: &dyn Store,
    settings: &CaSettings,
    sealing: Option<&SealingKey>,
    now: SystemTime,
) -> Result<CaState, CaError> {
    if let Some(entry) = catalog.get(&ca_key()) {
        return open(entry.stored.document, settings, sealing, now);
    }
    let authority = match (&settings.cert, &settings.key) {
        (Some(cert), Some(key)) => {
            let cert = String::from_utf8_lossy(&read("--ca-cert", cert)?).into_owned();
            let key = String::from_utf8_lossy(&read("--ca-key", key)?).into_owned();
            Authority::from_pem(&settings.trust_domain, &cert, &key, now)?
        }
        (None, None) => Authority::generate(&settings.trust_domain, now)?,
        _ => return Err(CaError::HalfAnOperatorCa),
    };
    let trust_domain = settings.trust_domain.as_str();
    let key = match sealing {
        Some(sealing) => sealing.seal(authority.key_pem(), trust_domain),
        None => StoredKey::Plain { pem: authority.key_pem().to_string() },
    };
    let record = StoredAuthority {
        trust_domain: trust_domain.into(),
        certificates: authority.certificates_pem(),
        key,
        previous_roots: Vec::new(),
        bridges: Vec::new(),
        rotated_at: None,
        lineage: Vec::new(),
    };
    let document = serde_json::to_value(&record).map_err(|e| CaError::Corrupt(e.to_string()))?;
    if store.create(ca_key(), document).await? {
        tracing::info!(trust_domain, root = %authority.root_hash(), "made the mesh's certificate authority");
        return Ok(CaState::from_authority(authority));
    }
    // Another replica made it first: use that one, so that every replica signs alike.
    let contents = store.load().await?;
    let stored = contents.objects.get(&ca_key()).ok_or_else(|| CaError::Corrupt("it vanished".into()))?;
    open(stored.document.clone(), settings, sealing, now)
}

fn open(
    document: serde_json::Value,
    settings: &CaSettings,
    sealing: Option<&SealingKey>,
    now: SystemTime,
) -> Result<CaState, CaError> {
    let stored: StoredAuthority = serde_json::from_value(document).map_err(|e| CaError::Corrupt(e.to_string()))?;
    if stored.trust_domain != settings.trust_domain.as_str() {
        return Err(CaError::TrustDomain { stored: stored.trust_domain, asked: settings.trust_domain.to_string() });
    }
    if settings.cert.is_some() {
        tracing::warn!(
            "a CA is already stored: --ca-cert and --ca-key are ignored (rotating the root is not supported yet)"
        );
    }
    let key = match stored.key {
        StoredKey::Plain { pem } => pem,
        StoredKey::Sealed { nonce, ciphertext } => {
            let sealing = sealing.ok_or(CaError::EncryptionKeyNeeded)?;
            sealing.open(&nonce, &ciphertext, &stored.trust_domain)?
        }
    };
    let authority = Authority::from_pem(&settings.trust_domain, &stored.certificates, &key, now)?;
    tracing::info!(trust_domain = %settings.trust_domain, root = %authority.root_hash(), "loaded the mesh's certificate authority");
    let previous = certificates(&stored.previous_roots)?;
    let bridges = certificates(&stored.bridges)?;
    let lineage = certificates(&stored.lineage)?;
    Ok(CaState::new(authority, previous, bridges, stored.rotated_at, lineage))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::test_catalog;

    fn settings(dir: &tempfile::TempDir, domain: &str, encryption_key: Option<&[u8]>) -> CaSettings {
        let encryption_key = encryption_key.map(|bytes| {
            let path = dir.path().join("ca-encryption.key");
            std::fs::write(&path, bytes).unwrap();
            path
        });
        CaSettings { trust_domain: TrustDomain::new(domain).unwrap(), cert: None, key: None, encryption_key }
    }

    #[tokio::test]
    async fn the_ca_is_made_once_and_found_again() {
        let dir = tempfile::tempdir().unwrap();
        let (catalog, store) = test_catalog(dir.path()).await;
        let now = SystemTime::now();
        let plain = settings(&dir, "weft.local", None);
        let (made, _) = establish(&catalog, store.as_ref(), &plain, false, now).await.unwrap();
        // The catalog learns of it through the watch.
        let mut revision = catalog.subscribe();
        revision.wait_for(|_| catalog.get(&ca_key()).is_some()).await.unwrap();
        let (found, _) = establish(&catalog, store.as_ref(), &plain, false, now).await.unwrap();
        assert_eq!(found.authority.root_hash(), made.authority.root_hash());
        assert!(catalog.list(None, None).1.is_empty(), "never listed as a resource");

        let other = settings(&dir, "other.org", None);
        let error = establish(&catalog, store.as_ref(), &other, false, now).await.err().unwrap().to_string();
        assert!(error.contains("fixed when the CA is made"), "{error}");
    }

    #[tokio::test]
    async fn a_shared_store_keeps_the_key_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let (catalog, store) = test_catalog(dir.path()).await;
        let now = SystemTime::now();
        let error = establish(&catalog, store.as_ref(), &settings(&dir, "weft.local", None), true, now).await;
        assert!(error.err().unwrap().to_string().contains("--ca-encryption-key"));

        let key = [7u8; 32];
        let sealed = settings(&dir, "weft.local", Some(&key));
        let (made, _) = establish(&catalog, store.as_ref(), &sealed, true, now).await.unwrap();
        let mut revision = catalog.subscribe();
        revision.wait_for(|_| catalog.get(&ca_key()).is_some()).await.unwrap();
        let stored = catalog.get(&ca_key()).unwrap().stored.document.to_string();
        assert!(!stored.contains("PRIVATE KEY"), "{stored}");

        let (again, _) = establish(&catalog, store.as_ref(), &sealed, true, now).await.unwrap();
        assert_eq!(again.authority.root_hash(), made.authority.root_hash());
        let hex_key = hex::encode([9u8; 32]);
        let wrong = settings(&dir, "weft.local", Some(hex_key.as_bytes()));
        let error = establish(&catalog, store.as_ref(), &wrong, true, now).await.err().unwrap().to_string();
        assert!(error.contains("cannot be decrypted"), "{error}");
    }
}
