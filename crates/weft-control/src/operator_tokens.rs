//! Operator tokens: what every call of the HTTP API (the CLI's, the dashboard's) presents.
//!
//! A token is `wo1.<id>.<secret>.<root>` (see [`weft_identity::token`]) and has a role:
//! `viewer` reads (resources, proxies, stats, the audit log), `admin` does everything.
//! The store keeps only the secret's SHA-256, so every replica accepts every token and
//! none can show one; the root hash inside lets the CLI verify the control plane's HTTPS
//! certificate with nothing else to copy.
//!
//! The first admin token is made at first start and written to `<data-dir>/admin-token`
//! (mode 0600; the path is logged, never the token). A data directory from a release
//! before operator tokens holds a `weft-admin-…` token whose hash is stored under the
//! `AdminToken` kind: it keeps working, as an admin token with the id `legacy-admin`.
//!
//! Every refusal says why (missing, malformed, unknown, expired, revoked, another mesh's,
//! wrong role), and a client that keeps presenting bad tokens is refused outright for a
//! while ([`BadTokenLimiter`]), so secrets cannot be guessed at speed.

use std::{
    collections::HashMap,
    io::Write,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};
use weft_identity::token::{Token, TokenKind};

use crate::{
    audit,
    catalog::Catalog,
    store::{Change, ObjectKey, Store, StoreError},
};

/// The store kind of operator tokens; one of [`crate::store::INTERNAL_KINDS`].
pub const OPERATOR_TOKEN_KIND: &str = "OperatorToken";
/// The store kind of the admin token of releases before operator tokens.
pub const LEGACY_ADMIN_TOKEN_KIND: &str = "AdminToken";
/// The file name under `--data-dir` of the first admin token.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";
/// The file under `--data-dir` with the SHA-256 of the mesh's root: for the admin token
/// of an earlier release, which carries none, the CLI verifies the API by it.
pub const ROOT_HASH_FILE: &str = "ca-root.sha256";
/// The id of the first admin token, made at first start.
pub const INITIAL_TOKEN_ID: &str = "initial-admin";
/// The id the legacy admin token is known by.
pub const LEGACY_TOKEN_ID: &str = "legacy-admin";

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads: resources, proxies, stats, tap, the audit log.
    Viewer,
    /// Everything: changes, tokens, revocations, the CA.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "viewer" => Ok(Role::Viewer),
            "admin" => Ok(Role::Admin),
            other => Err(format!("{other:?} is not a role: use viewer or admin")),
        }
    }
}

/// An operator token as stored and listed: never the secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperatorTokenRecord {
    pub id: String,
    /// What the operator called it (`--name`), for lists and the audit log.
    pub name: String,
    pub role: Role,
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// Seconds since the Unix epoch; `None`: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    #[serde(default)]
    pub revoked: bool,
}

/// Who made an API call: the token's id, name and role. Carried by every request the
/// API admits, and written into the audit log with every change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Operator {
    pub token_id: String,
    pub name: String,
    pub role: Role,
}

impl Operator {
    /// The control plane acting on its own (a leader's housekeeping, a replica's call).
    pub fn control_plane(what: &str) -> Self {
        Operator { token_id: String::new(), name: what.to_string(), role: Role::Admin }
    }
}

/// Why a presented token was refused. The message says what to do, never more than the
/// presenter already knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "this call needs an operator token: give the CLI one (weft context set, --token-file, WEFT_TOKEN_FILE or \
         WEFT_TOKEN); the first admin token is in <data-dir>/admin-token on the host where the control plane first \
         started"
    )]
    Missing,
    #[error("the operator token is malformed: make one with weft token create --role viewer|admin")]
    Malformed,
    #[error(
        "this is a join token, which proxies join with; the API takes an operator token (weft token create --role)"
    )]
    JoinToken,
    #[error("the operator token is not known to this mesh")]
    Unknown,
    #[error("the operator token {0} has expired: make a new one with weft token create --role")]
    Expired(String),
    #[error("the operator token {0} has been revoked")]
    Revoked(String),
    #[error(
        "the operator token was made by another mesh (its root {0} is not this mesh's): check the server the CLI \
         talks to, or use a token of this mesh"
    )]
    OtherMesh(String),
    #[error("the operator token {id} has the role {has}; this call needs {needs}")]
    WrongRole { id: String, has: &'static str, needs: &'static str },
    #[error("too many bad operator tokens from {ip}: wait {seconds}s")]
    RateLimited { ip: IpAddr, seconds: u64 },
}

/// Why a token could not be made, listed or revoked.
#[derive(Debug, thiserror::Error)]
pub enum OperatorTokenError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Invalid(String),
    #[error("no such operator token")]
    Unknown,
    #[error("cannot write the admin token to {path}: {reason}; check that --data-dir is writable")]
    Write { path: String, reason: String },
}

fn key(id: &str) -> ObjectKey {
    ObjectKey { kind: OPERATOR_TOKEN_KIND.into(), namespace: "default".into(), name: id.into() }
}

fn legacy_key() -> ObjectKey {
    ObjectKey { kind: LEGACY_ADMIN_TOKEN_KIND.into(), namespace: "default".into(), name: "admin".into() }
}

/// A freshly made token: the only time its secret exists outside the holder's file.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NewOperatorToken {
    pub token: String,
    #[serde(flatten)]
    pub record: OperatorTokenRecord,
}

fn new_token(
    id: String,
    name: &str,
    role: Role,
    ttl: Option<Duration>,
    root_hash: &str,
    now: SystemTime,
) -> NewOperatorToken {
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let record = OperatorTokenRecord {
        id: id.clone(),
        name: name.to_string(),
        role,
        secret_sha256: weft_identity::token::secret_digest(&secret),
        created_at: weft_identity::unix_seconds(now),
        expires_at: ttl.map(|ttl| weft_identity::unix_seconds(now + ttl)),
        revoked: false,
    };
    let token = Token { kind: TokenKind::Operator, id: &id, secret: &secret, root_hash }.to_string();
    NewOperatorToken { token, record }
}

/// Makes and stores a token with `role`, valid for `ttl` (`None`: until revoked),
/// recorded in the audit log as `operator`'s.
pub async fn create(
    catalog: &Catalog,
    root_hash: &str,
    role: Role,
    name: &str,
    ttl: Option<Duration>,
    now: SystemTime,
    operator: &Operator,
) -> Result<NewOperatorToken, OperatorTokenError> {
    if ttl.is_some_and(|ttl| ttl.is_zero()) {
        return Err(OperatorTokenError::Invalid("--ttl must be more than 0".into()));
    }
    if name.len() > 100 || name.chars().any(char::is_control) {
        return Err(OperatorTokenError::Invalid("--name: at most 100 printable characters".into()));
    }
    let made = new_token(hex::encode(rand::random::<[u8; 8]>()), name, role, ttl, root_hash, now);
    let document = serde_json::to_value(&made.record).map_err(|e| OperatorTokenError::Invalid(e.to_string()))?;
    let key = key(&made.record.id);
    let audit = audit::record(operator, "token.create", (&key).into(), None, Some(document.clone()), now);
    catalog.write_internal(Change { puts: vec![(key, document), audit], deletes: vec![] }).await?;
    Ok(made)
}

/// Every operator token, newest first, without secrets.
pub fn list(catalog: &Catalog) -> Vec<OperatorTokenRecord> {
    let mut records: Vec<OperatorTokenRecord> = catalog
        .internal(OPERATOR_TOKEN_KIND)
        .into_iter()
        .filter_map(|document| serde_json::from_value(document).ok())
        .collect();
    records.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.id.cmp(&b.id)));
    records
}

/// The record of token `id`, if there is one.
pub fn get(catalog: &Catalog, id: &str) -> Option<OperatorTokenRecord> {
    serde_json::from_value(catalog.get(&key(id))?.stored.document).ok()
}

/// Revokes token `id`: refused from the next call on. Recorded as `operator`'s.
pub async fn revoke(
    catalog: &Catalog,
    id: &str,
    operator: &Operator,
) -> Result<OperatorTokenRecord, OperatorTokenError> {
    let mut record = get(catalog, id).ok_or(OperatorTokenError::Unknown)?;
    let before = serde_json::to_value(&record).ok();
    record.revoked = true;
    let document = serde_json::to_value(&record).map_err(|e| OperatorTokenError::Invalid(e.to_string()))?;
    let audit =
        audit::record(operator, "token.revoke", (&key(id)).into(), before, Some(document.clone()), SystemTime::now());
    catalog.write_internal(Change { puts: vec![(key(id), document), audit], deletes: vec![] }).await?;
    Ok(record)
}

/// Checks a presented bearer token; `roots` are the SHA-256 hashes of every root this
/// mesh has had (current and retired: a token keeps working across rotations).
pub fn authenticate(
    catalog: &Catalog,
    presented: &str,
    roots: &[String],
    now: SystemTime,
) -> Result<Operator, Refusal> {
    let presented = presented.trim();
    if presented.starts_with("weft-admin-") {
        return authenticate_legacy(catalog, presented);
    }
    let token = Token::parse(presented).ok_or(Refusal::Malformed)?;
    if token.kind == TokenKind::Join {
        return Err(Refusal::JoinToken);
    }
    let record = get(catalog, token.id);
    // Digests, not secrets, are compared: their timing says nothing useful.
    let Some(record) = record.filter(|r| r.secret_sha256 == weft_identity::token::secret_digest(token.secret)) else {
        let ours = roots.iter().any(|root| root.eq_ignore_ascii_case(token.root_hash));
        return Err(if ours { Refusal::Unknown } else { Refusal::OtherMesh(token.root_hash.to_string()) });
    };
    if record.revoked {
        return Err(Refusal::Revoked(record.id));
    }
    if record.expires_at.is_some_and(|at| weft_identity::unix_seconds(now) >= at) {
        return Err(Refusal::Expired(record.id));
    }
    Ok(Operator { token_id: record.id, name: record.name, role: record.role })
}

fn authenticate_legacy(catalog: &Catalog, presented: &str) -> Result<Operator, Refusal> {
    #[derive(Deserialize)]
    struct Stored {
        sha256: String,
    }
    let stored: Option<Stored> =
        catalog.get(&legacy_key()).and_then(|e| serde_json::from_value(e.stored.document).ok());
    match stored {
        Some(stored) if stored.sha256 == weft_identity::token::secret_digest(presented) => Ok(Operator {
            token_id: LEGACY_TOKEN_ID.into(),
            name: "admin token of an earlier release".into(),
            role: Role::Admin,
        }),
        _ => Err(Refusal::Unknown),
    }
}

/// Whether `operator` may make a call that needs `needs`.
pub fn authorize(operator: &Operator, needs: Role) -> Result<(), Refusal> {
    if operator.role >= needs {
        return Ok(());
    }
    Err(Refusal::WrongRole { id: operator.token_id.clone(), has: operator.role.as_str(), needs: needs.as_str() })
}

/// The first admin token, if this control plane wrote it now.
pub struct InitialToken {
    pub file: Option<PathBuf>,
}

/// Makes the first admin token at first start: stored (its hash) and written to
/// `<data_dir>/admin-token`. Nothing happens when the mesh has one already, or the
/// admin token of an earlier release (which keeps working); another replica that made
/// it first wins, and its file is on its host.
pub async fn establish(
    catalog: &Catalog,
    store: &dyn Store,
    data_dir: &Path,
    root_hash: &str,
) -> Result<InitialToken, OperatorTokenError> {
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    // Best effort: only a token of an earlier release needs it.
    if let Err(error) = std::fs::create_dir_all(data_dir)
        .and_then(|()| std::fs::write(data_dir.join(ROOT_HASH_FILE), format!("{root_hash}\n")))
    {
        tracing::debug!(%error, "cannot write the root's hash to the data directory");
    }
    if catalog.get(&key(INITIAL_TOKEN_ID)).is_some() || catalog.get(&legacy_key()).is_some() {
        return Ok(InitialToken { file: path.exists().then_some(path) });
    }
    let made = new_token(INITIAL_TOKEN_ID.into(), "first admin token", Role::Admin, None, root_hash, SystemTime::now());
    write_private(&path, &made.token)?;
    let document = serde_json::to_value(&made.record).map_err(|e| OperatorTokenError::Invalid(e.to_string()))?;
    if store.create(key(INITIAL_TOKEN_ID), document).await? {
        tracing::info!(path = %path.display(), "made the first admin token; it is in this file (mode 0600)");
        return Ok(InitialToken { file: Some(path) });
    }
    // Another replica made one first: ours is worth nothing.
    let _ = std::fs::remove_file(&path);
    tracing::info!(
        "the first admin token was made by another control-plane replica; its file is on that replica's host"
    );
    Ok(InitialToken { file: None })
}

fn write_private(path: &Path, token: &str) -> Result<(), OperatorTokenError> {
    let fail =
        |e: std::io::Error| OperatorTokenError::Write { path: path.display().to_string(), reason: e.to_string() };
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

/// Bad tokens a client may present per [`BAD_TOKEN_WINDOW`] before it is refused outright
/// until the window ends: enough for an operator's typos, far too few to guess a 256-bit
/// secret (which no rate would allow anyway); it bounds the work and the log lines an
/// attacker causes.
pub const BAD_TOKEN_BURST: u32 = 10;
pub const BAD_TOKEN_WINDOW: Duration = Duration::from_secs(60);

/// Counts bad tokens per client address.
#[derive(Default)]
pub struct BadTokenLimiter {
    clients: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl BadTokenLimiter {
    /// Refuses `ip` while it is over its budget of bad tokens.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Refusal> {
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        match clients.get(&ip) {
            Some((since, count)) if *count >= BAD_TOKEN_BURST && now.duration_since(*since) < BAD_TOKEN_WINDOW => {
                let seconds = (BAD_TOKEN_WINDOW - now.duration_since(*since)).as_secs().max(1);
                Err(Refusal::RateLimited { ip, seconds })
            }
            _ => Ok(()),
        }
    }

    /// Counts one bad token from `ip`; true when this one used up its budget (the moment
    /// worth a log line).
    pub fn failed(&self, ip: IpAddr, now: Instant) -> bool {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        // Forget windows that ended, so the map stays as small as the clients that err.
        clients.retain(|_, (since, _)| now.duration_since(*since) < BAD_TOKEN_WINDOW);
        let entry = clients.entry(ip).or_insert((now, 0));
        entry.1 += 1;
        entry.1 == BAD_TOKEN_BURST
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::test_catalog;

    const ROOT: &str = "abababababababababababababababababababababababababababababababab";

    #[tokio::test]
    async fn tokens_carry_a_role_and_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let (catalog, _) = test_catalog(dir.path()).await;
        let roots = vec![ROOT.to_string()];
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let ops = Operator::control_plane("test");
        let viewer = create(&catalog, ROOT, Role::Viewer, "dashboard", Some(hour), now, &ops).await.unwrap();
        assert!(viewer.token.starts_with("wo1.") && viewer.token.ends_with(ROOT));
        let who = authenticate(&catalog, &viewer.token, &roots, now).unwrap();
        assert_eq!((who.role, who.name.as_str()), (Role::Viewer, "dashboard"));
        assert!(authorize(&who, Role::Viewer).is_ok());
        assert!(matches!(authorize(&who, Role::Admin), Err(Refusal::WrongRole { .. })));
        assert!(!serde_json::to_string(&list(&catalog)).unwrap().contains(Token::parse(&viewer.token).unwrap().secret));

        assert_eq!(
            authenticate(&catalog, &viewer.token, &roots, now + hour),
            Err(Refusal::Expired(viewer.record.id.clone()))
        );
        assert_eq!(authenticate(&catalog, "nonsense", &roots, now), Err(Refusal::Malformed));
        let forged = viewer.token.replacen(Token::parse(&viewer.token).unwrap().secret, &"00".repeat(32), 1);
        assert_eq!(authenticate(&catalog, &forged, &roots, now), Err(Refusal::Unknown));
        let other_mesh = format!("wo1.x.y.{}", "cd".repeat(32));
        assert!(matches!(authenticate(&catalog, &other_mesh, &roots, now), Err(Refusal::OtherMesh(_))));
        let join = format!("wj1.x.y.{ROOT}");
        assert_eq!(authenticate(&catalog, &join, &roots, now), Err(Refusal::JoinToken));
        revoke(&catalog, &viewer.record.id, &ops).await.unwrap();
        assert_eq!(authenticate(&catalog, &viewer.token, &roots, now), Err(Refusal::Revoked(viewer.record.id.clone())));
        assert!(catalog.list(None, None).1.is_empty(), "tokens are no resources");
    }

    #[tokio::test]
    async fn the_first_admin_token_is_made_once_and_an_older_one_keeps_working() {
        let dir = tempfile::tempdir().unwrap();
        let (catalog, store) = test_catalog(dir.path()).await;
        let made = establish(&catalog, store.as_ref(), dir.path(), ROOT).await.unwrap();
        let path = made.file.unwrap();
        let token = std::fs::read_to_string(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let mut revision = catalog.subscribe();
        revision.wait_for(|_| catalog.get(&key(INITIAL_TOKEN_ID)).is_some()).await.unwrap();
        let roots = vec![ROOT.to_string()];
        assert_eq!(authenticate(&catalog, &token, &roots, SystemTime::now()).unwrap().role, Role::Admin);
        establish(&catalog, store.as_ref(), dir.path(), ROOT).await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), token, "the file is not rewritten");

        // A store from before operator tokens: its admin token is still an admin's.
        let older = tempfile::tempdir().unwrap();
        let (catalog, _) = test_catalog(older.path()).await;
        let legacy = "weft-admin-0123";
        let record = serde_json::json!({"sha256": weft_identity::token::secret_digest(legacy)});
        catalog.write_internal(Change { puts: vec![(legacy_key(), record)], deletes: vec![] }).await.unwrap();
        let who = authenticate(&catalog, legacy, &roots, SystemTime::now()).unwrap();
        assert_eq!((who.token_id.as_str(), who.role), (LEGACY_TOKEN_ID, Role::Admin));
        assert_eq!(authenticate(&catalog, "weft-admin-guess", &roots, SystemTime::now()), Err(Refusal::Unknown));
    }

    #[test]
    fn a_client_presenting_bad_tokens_is_refused_for_a_while() {
        let limiter = BadTokenLimiter::default();
        let (ip, now) = (IpAddr::from([10, 0, 0, 1]), Instant::now());
        for n in 1..=BAD_TOKEN_BURST {
            assert!(limiter.check(ip, now).is_ok());
            assert_eq!(limiter.failed(ip, now), n == BAD_TOKEN_BURST);
        }
        assert!(matches!(limiter.check(ip, now), Err(Refusal::RateLimited { .. })));
        assert!(limiter.check(IpAddr::from([10, 0, 0, 2]), now).is_ok(), "others are not affected");
        assert!(limiter.check(ip, now + BAD_TOKEN_WINDOW).is_ok(), "the window ends");
    }
}
