//! Join tokens: how a new proxy proves which workload it is before it has a certificate.
//!
//! An operator makes one per identity (`weft token create --service reviews`). The token
//! is `wj1.<id>.<secret>.<root>`: `id` names the stored record, `secret` proves
//! possession (the store keeps only its SHA-256), and `root` is the SHA-256 of the mesh's
//! root certificate, so that the proxy can check on first contact that it talks to the
//! control plane of the right mesh (as kubeadm's join does). A token can be used again by
//! the same workload, after a restart, until it expires; it is refused for any other
//! identity, and once revoked.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use weft_identity::{
    token::{Token, TokenKind},
    SpiffeId, TrustDomain,
};

use crate::{
    audit,
    catalog::Catalog,
    operator_tokens::Operator,
    store::{Change, ObjectKey, StoreError},
};

/// The store kind of join tokens; one of [`crate::store::INTERNAL_KINDS`].
pub const JOIN_TOKEN_KIND: &str = "JoinToken";
/// How long a token lasts unless `--ttl` says otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(720 * 3600);

/// A join token as stored (and listed): never the secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinTokenRecord {
    pub id: String,
    pub namespace: String,
    pub service_account: String,
    /// The SPIFFE ID a certificate issued on this token carries.
    pub identity: String,
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    /// Seconds since the Unix epoch.
    pub expires_at: u64,
    pub revoked: bool,
}

/// Why a token was refused or could not be made. Refusals say why, so an operator can fix
/// the proxy's flags; they never say more than the presenter already knows.
#[derive(Debug, thiserror::Error)]
pub enum JoinTokenError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Invalid(String),
    #[error("the join token is malformed: make one with `weft token create`")]
    Malformed,
    #[error("the join token is not known to this mesh")]
    Unknown,
    #[error("the join token {0} has been revoked")]
    Revoked(String),
    #[error("the join token {0} has expired")]
    Expired(String),
    #[error("the join token {id} is for {identity}, not for {asked}")]
    OtherIdentity { id: String, identity: String, asked: String },
}

fn key(id: &str) -> ObjectKey {
    ObjectKey { kind: JOIN_TOKEN_KIND.into(), namespace: "default".into(), name: id.into() }
}

fn unix(time: SystemTime) -> u64 {
    weft_identity::unix_seconds(time)
}

/// A freshly made token: the only time the secret exists outside the proxy's file.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NewJoinToken {
    pub token: String,
    #[serde(flatten)]
    pub record: JoinTokenRecord,
}

/// Makes and stores a token for `namespace`/`account`, valid for `ttl`, recorded in the
/// audit log as `operator`'s.
#[allow(clippy::too_many_arguments)]
pub async fn create(
    catalog: &Catalog,
    trust_domain: &TrustDomain,
    root_hash: &str,
    namespace: &str,
    account: &str,
    ttl: Duration,
    now: SystemTime,
    operator: &Operator,
) -> Result<NewJoinToken, JoinTokenError> {
    let identity = SpiffeId::workload(trust_domain, namespace, account)
        .map_err(|e| JoinTokenError::Invalid(format!("{e}; check --service and --namespace")))?;
    if ttl.is_zero() {
        return Err(JoinTokenError::Invalid("--ttl must be more than 0".into()));
    }
    let id = hex::encode(rand::random::<[u8; 8]>());
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let record = JoinTokenRecord {
        id: id.clone(),
        namespace: namespace.into(),
        service_account: account.into(),
        identity: identity.to_string(),
        secret_sha256: weft_identity::token::secret_digest(&secret),
        expires_at: unix(now + ttl),
        revoked: false,
    };
    let document = serde_json::to_value(&record).map_err(|e| JoinTokenError::Invalid(e.to_string()))?;
    let audit = audit::record(operator, "token.create", (&key(&id)).into(), None, Some(document.clone()), now);
    catalog.write_internal(Change { puts: vec![(key(&id), document), audit], deletes: vec![] }).await?;
    let token = Token { kind: TokenKind::Join, id: &id, secret: &secret, root_hash }.to_string();
    Ok(NewJoinToken { token, record })
}

/// Every token, newest expiry first, without secrets.
pub fn list(catalog: &Catalog) -> Vec<JoinTokenRecord> {
    let mut records: Vec<JoinTokenRecord> = catalog
        .internal(JOIN_TOKEN_KIND)
        .into_iter()
        .filter_map(|document| serde_json::from_value(document).ok())
        .collect();
    records.sort_by(|a, b| b.expires_at.cmp(&a.expires_at).then(a.id.cmp(&b.id)));
    records
}

/// Revokes token `id`: it is refused from now on. Recorded as `operator`'s.
pub async fn revoke(catalog: &Catalog, id: &str, operator: &Operator) -> Result<JoinTokenRecord, JoinTokenError> {
    let entry = catalog.get(&key(id)).ok_or(JoinTokenError::Unknown)?;
    let before = entry.stored.document.clone();
    let mut record: JoinTokenRecord =
        serde_json::from_value(entry.stored.document).map_err(|_| JoinTokenError::Unknown)?;
    record.revoked = true;
    let document = serde_json::to_value(&record).map_err(|e| JoinTokenError::Invalid(e.to_string()))?;
    let audit = audit::record(
        operator,
        "token.revoke",
        (&key(id)).into(),
        Some(before),
        Some(document.clone()),
        SystemTime::now(),
    );
    catalog.write_internal(Change { puts: vec![(key(id), document), audit], deletes: vec![] }).await?;
    Ok(record)
}

/// Whether `id` names a join token.
pub fn exists(catalog: &Catalog, id: &str) -> bool {
    catalog.get(&key(id)).is_some()
}

/// Reads a presented join token.
pub fn parse(token: &str) -> Result<Token<'_>, JoinTokenError> {
    Token::parse_kind(token, TokenKind::Join).ok_or(JoinTokenError::Malformed)
}

/// Checks a presented token for the workload `namespace`/`account` at `now`; returns the
/// identity a certificate may carry.
pub fn check(
    catalog: &Catalog,
    token: &str,
    namespace: &str,
    account: Option<&str>,
    now: SystemTime,
) -> Result<SpiffeId, JoinTokenError> {
    let presented = parse(token)?;
    let entry = catalog.get(&key(presented.id)).ok_or(JoinTokenError::Unknown)?;
    let record: JoinTokenRecord = serde_json::from_value(entry.stored.document).map_err(|_| JoinTokenError::Unknown)?;
    // Digests, not secrets, are compared: their timing says nothing useful.
    if weft_identity::token::secret_digest(presented.secret) != record.secret_sha256 {
        return Err(JoinTokenError::Unknown);
    }
    if record.revoked {
        return Err(JoinTokenError::Revoked(record.id));
    }
    if unix(now) >= record.expires_at {
        return Err(JoinTokenError::Expired(record.id));
    }
    if record.namespace != namespace || account.is_some_and(|account| record.service_account != account) {
        let asked = match account {
            Some(account) => format!("namespace {namespace}, service account {account}"),
            None => format!("namespace {namespace}"),
        };
        return Err(JoinTokenError::OtherIdentity { id: record.id, identity: record.identity, asked });
    }
    SpiffeId::parse(&record.identity).map_err(|_| JoinTokenError::Unknown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::test_catalog;

    #[tokio::test]
    async fn a_token_admits_its_own_workload_only_until_it_expires_or_is_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let (catalog, _) = test_catalog(dir.path()).await;
        let domain = TrustDomain::new("weft.local").unwrap();
        let now = SystemTime::now();
        let root = "ab".repeat(32);
        let hour = Duration::from_secs(3600);
        let ops = Operator::control_plane("test");
        let made = create(&catalog, &domain, &root, "default", "reviews", hour, now, &ops).await.unwrap();
        assert!(made.token.ends_with(&root));
        assert!(!serde_json::to_string(&list(&catalog)).unwrap().contains(parse(&made.token).unwrap().secret));

        let id = check(&catalog, &made.token, "default", Some("reviews"), now).unwrap();
        assert_eq!(check(&catalog, &made.token, "default", None, now).unwrap(), id, "the token's own account");
        assert!(check(&catalog, &made.token, "shop", None, now).is_err(), "but only in its namespace");
        assert_eq!(id.to_string(), "spiffe://weft.local/ns/default/sa/reviews");
        // Again, after a restart of the proxy: still good.
        assert!(check(&catalog, &made.token, "default", Some("reviews"), now + hour / 2).is_ok());
        let other = check(&catalog, &made.token, "default", Some("ratings"), now).unwrap_err();
        assert!(matches!(other, JoinTokenError::OtherIdentity { .. }), "{other}");
        let late = check(&catalog, &made.token, "default", Some("reviews"), now + hour).unwrap_err();
        assert!(matches!(late, JoinTokenError::Expired(_)), "{late}");
        let forged = made.token.replacen(parse(&made.token).unwrap().secret, &"00".repeat(32), 1);
        assert!(matches!(check(&catalog, &forged, "default", Some("reviews"), now), Err(JoinTokenError::Unknown)));
        assert!(matches!(check(&catalog, "nonsense", "default", Some("reviews"), now), Err(JoinTokenError::Malformed)));

        revoke(&catalog, &made.record.id, &ops).await.unwrap();
        let revoked = check(&catalog, &made.token, "default", Some("reviews"), now).unwrap_err();
        assert!(matches!(revoked, JoinTokenError::Revoked(_)), "{revoked}");
        assert!(list(&catalog)[0].revoked);
        assert!(catalog.list(None, None).1.is_empty(), "tokens are no resources");
    }
}
