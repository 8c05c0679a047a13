//! Dashboard sessions: what a browser holds instead of an operator token.
//!
//! A browser must not keep a bearer token where scripts can read it, so the dashboard
//! trades one for a session cookie (`HttpOnly`, `Secure`, `SameSite=Strict`) at login.
//! The cookie is `<token id>.<expires>.<nonce>.<mac>`: an HMAC-SHA256 under a session key
//! that the first replica made and stored, so every replica of the control plane accepts
//! every session with nothing shared but the store. The cookie names its operator token,
//! and every call re-reads that token's record: revoking the token ends its sessions at
//! once, and the role a session has is always the token's current one.
//!
//! A change made with a session also needs its CSRF token (`X-CSRF-Token`), a second MAC
//! over the cookie: a page of another origin can make the browser send the cookie (not
//! with `SameSite=Strict`, but defence in depth), never read the CSRF token.

use std::time::{Duration, SystemTime};

use ring::hmac;
use serde::{Deserialize, Serialize};

use crate::{
    catalog::Catalog,
    operator_tokens::{self, Operator, Refusal},
    store::{ObjectKey, Store, StoreError},
};

/// The store kind of the session key; one of [`crate::store::INTERNAL_KINDS`].
pub const SESSION_KEY_KIND: &str = "SessionKey";
/// The cookie's name.
pub const COOKIE: &str = "weft_session";
/// The header a change made with a session carries its CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a session lasts (never longer than its operator token).
pub const SESSION_LIFETIME: Duration = Duration::from_secs(8 * 3600);

fn key_key() -> ObjectKey {
    ObjectKey { kind: SESSION_KEY_KIND.into(), namespace: "default".into(), name: "dashboard".into() }
}

#[derive(Serialize, Deserialize)]
struct StoredKey {
    /// 32 random bytes, hex.
    key: String,
}

/// Makes the session key at first start; a replica that finds one (or loses the race to
/// make it) uses the stored one.
pub async fn establish(catalog: &Catalog, store: &dyn Store) -> Result<(), StoreError> {
    if catalog.get(&key_key()).is_some() {
        return Ok(());
    }
    let document = serde_json::json!(StoredKey { key: hex::encode(rand::random::<[u8; 32]>()) });
    if store.create(key_key(), document).await? {
        tracing::info!("made the dashboard's session key");
    }
    // The catalog follows the store's watch: wait (briefly) until it has the key, so
    // that the first login after start finds it.
    for _ in 0..100 {
        if catalog.get(&key_key()).is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The stored session key, if the store holds a readable one.
fn signing_key(catalog: &Catalog) -> Option<hmac::Key> {
    let stored: StoredKey = serde_json::from_value(catalog.get(&key_key())?.stored.document).ok()?;
    let bytes = hex::decode(stored.key).ok().filter(|bytes| bytes.len() == 32)?;
    Some(hmac::Key::new(hmac::HMAC_SHA256, &bytes))
}

/// A session just opened: the cookie's value and what the page needs to know.
#[derive(Debug)]
pub struct OpenedSession {
    pub cookie: String,
    pub expires_at: u64,
    pub csrf: String,
    pub operator: Operator,
}

/// Why a session could not be opened or was refused.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Token(#[from] Refusal),
    #[error("the session cookie is malformed or was not made by this mesh: log in again")]
    Forged,
    #[error("the session has expired: log in again")]
    Expired,
    #[error("the control plane has no session key yet (its store is not ready): try again shortly")]
    NoKey,
}

const SESSION_CONTEXT: &str = "weft-session-v1";
const CSRF_CONTEXT: &str = "weft-csrf-v1";

/// Opens a session for a presented operator token (checked as a bearer token would be).
pub fn open(
    catalog: &Catalog,
    presented: &str,
    roots: &[String],
    now: SystemTime,
) -> Result<OpenedSession, SessionError> {
    let operator = operator_tokens::authenticate(catalog, presented, roots, now)?;
    let key = signing_key(catalog).ok_or(SessionError::NoKey)?;
    let now_seconds = weft_identity::unix_seconds(now);
    let mut expires_at = now_seconds + SESSION_LIFETIME.as_secs();
    if let Some(token_expiry) = operator_tokens::get(catalog, &operator.token_id).and_then(|r| r.expires_at) {
        expires_at = expires_at.min(token_expiry);
    }
    let nonce = hex::encode(rand::random::<[u8; 16]>());
    let claims = format!("{}.{expires_at}.{nonce}", operator.token_id);
    let mac = hex::encode(hmac::sign(&key, format!("{SESSION_CONTEXT}|{claims}").as_bytes()));
    let cookie = format!("{claims}.{mac}");
    let csrf = csrf_for(&key, &cookie);
    Ok(OpenedSession { cookie, expires_at, csrf, operator })
}

fn csrf_for(key: &hmac::Key, cookie: &str) -> String {
    hex::encode(&hmac::sign(key, format!("{CSRF_CONTEXT}|{cookie}").as_bytes()).as_ref()[..16])
}

/// A session the API admitted.
#[derive(Debug)]
pub struct Session {
    pub operator: Operator,
    pub expires_at: u64,
    /// What a change must carry in [`CSRF_HEADER`].
    pub csrf: String,
}

/// Checks a session cookie's value: made by this mesh, not expired, and its operator
/// token still valid (not revoked, not expired); the role is the token's current one.
pub fn check(catalog: &Catalog, cookie: &str, now: SystemTime) -> Result<Session, SessionError> {
    let key = signing_key(catalog).ok_or(SessionError::NoKey)?;
    let (claims, mac) = cookie.rsplit_once('.').ok_or(SessionError::Forged)?;
    let mac = hex::decode(mac).map_err(|_| SessionError::Forged)?;
    hmac::verify(&key, format!("{SESSION_CONTEXT}|{claims}").as_bytes(), &mac).map_err(|_| SessionError::Forged)?;
    let mut parts = claims.split('.');
    let (Some(token_id), Some(expires_at), Some(_nonce), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(SessionError::Forged);
    };
    let expires_at: u64 = expires_at.parse().map_err(|_| SessionError::Forged)?;
    if weft_identity::unix_seconds(now) >= expires_at {
        return Err(SessionError::Expired);
    }
    let record = operator_tokens::get(catalog, token_id).ok_or(SessionError::Token(Refusal::Unknown))?;
    if record.revoked {
        return Err(Refusal::Revoked(record.id).into());
    }
    if record.expires_at.is_some_and(|at| weft_identity::unix_seconds(now) >= at) {
        return Err(Refusal::Expired(record.id).into());
    }
    Ok(Session {
        operator: Operator { token_id: record.id, name: record.name, role: record.role },
        expires_at,
        csrf: csrf_for(&key, cookie),
    })
}

/// Whether `presented` is the CSRF token of `session`, compared in constant time.
pub fn csrf_matches(session: &Session, presented: &str) -> bool {
    let (expected, presented) = (session.csrf.as_bytes(), presented.trim().as_bytes());
    expected.len() == presented.len() && expected.iter().zip(presented).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// The `Set-Cookie` value that stores `value` in the browser until `expires_at` (or, for
/// an empty value, removes it).
pub fn set_cookie(value: &str, max_age: u64) -> String {
    format!("{COOKIE}={value}; Path=/; Max-Age={max_age}; Secure; HttpOnly; SameSite=Strict")
}

/// The session cookie's value among a request's `Cookie` headers.
pub fn cookie_value<'a>(headers: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    headers
        .flat_map(|header| header.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::operator_tokens::Role;

    /// The SHA-256 of a (made-up) root, as tokens carry it.
    const ROOT: &str = "5f3c7a0e4b8d2c6f1a9e7b3d5c8f0a2e4b6d8c1f3a5e7b9d0c2f4a6e8b1d3c5f";

    async fn mesh() -> (Arc<Catalog>, String, String, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let (catalog, store) = crate::catalog::test_catalog(dir.path()).await;
        establish(&catalog, store.as_ref()).await.unwrap();
        let admin = Operator::control_plane("test");
        let now = SystemTime::now();
        let viewer = operator_tokens::create(&catalog, ROOT, Role::Viewer, "v", None, now, &admin).await.unwrap();
        (catalog, viewer.token, viewer.record.id, dir)
    }

    #[tokio::test]
    async fn a_session_carries_its_token_role_until_the_token_is_revoked() {
        let (catalog, token, id, _dir) = mesh().await;
        let now = SystemTime::now();
        let opened = open(&catalog, &token, &[ROOT.into()], now).unwrap();
        let session = check(&catalog, &opened.cookie, now).unwrap();
        assert_eq!(session.operator.role, Role::Viewer);
        assert!(csrf_matches(&session, &opened.csrf));
        assert!(!csrf_matches(&session, "0000"));
        operator_tokens::revoke(&catalog, &id, &Operator::control_plane("test")).await.unwrap();
        assert!(matches!(check(&catalog, &opened.cookie, now), Err(SessionError::Token(Refusal::Revoked(_)))));
    }

    #[tokio::test]
    async fn a_changed_or_expired_cookie_is_refused() {
        let (catalog, token, _, _dir) = mesh().await;
        let now = SystemTime::now();
        let opened = open(&catalog, &token, &[ROOT.into()], now).unwrap();
        // A longer life written into the cookie breaks its MAC.
        let (id, rest) = opened.cookie.split_once('.').unwrap();
        let (_, rest) = rest.split_once('.').unwrap();
        let stretched = format!("{id}.{}.{rest}", opened.expires_at + 86_400);
        assert!(matches!(check(&catalog, &stretched, now), Err(SessionError::Forged)));
        let later = now + SESSION_LIFETIME + Duration::from_secs(1);
        assert!(matches!(check(&catalog, &opened.cookie, later), Err(SessionError::Expired)));
        assert!(matches!(open(&catalog, "wo1.nope", &[], now), Err(SessionError::Token(Refusal::Malformed))));
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let headers = ["a=1; weft_session=abc.1.2.3", "b=2"];
        assert_eq!(cookie_value(headers.into_iter()), Some("abc.1.2.3"));
        assert_eq!(cookie_value(["weft_sessionx=1"].into_iter()), None);
    }
}
