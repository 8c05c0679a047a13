//! The join token's format, which the control plane writes and the proxy reads:
//! `wj1.<id>.<secret>.<root hash>`. The id names the token's record (for listing and
//! revoking), the secret proves possession, and the root hash (SHA-256 of the root
//! certificate's DER, hex) lets a proxy verify the control plane on first contact.

/// The format's version prefix.
pub const PREFIX: &str = "wj1";

/// The parts of a token.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct JoinToken<'a> {
    pub id: &'a str,
    pub secret: &'a str,
    pub root_hash: &'a str,
}

/// Never shows the secret.
impl std::fmt::Debug for JoinToken<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken").field("id", &self.id).field("root_hash", &self.root_hash).finish_non_exhaustive()
    }
}

impl<'a> JoinToken<'a> {
    /// Reads a token (surrounding whitespace, as in a file, is ignored).
    pub fn parse(token: &'a str) -> Option<Self> {
        let mut parts = token.trim().split('.');
        match (parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(PREFIX), Some(id), Some(secret), Some(root_hash), None)
                if !id.is_empty()
                    && !secret.is_empty()
                    && root_hash.len() == 64
                    && root_hash.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                Some(JoinToken { id, secret, root_hash })
            }
            _ => None,
        }
    }
}

impl std::fmt::Display for JoinToken<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PREFIX}.{}.{}.{}", self.id, self.secret, self.root_hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_reads_back_and_anything_else_is_refused() {
        let hash = "ab".repeat(32);
        let text = JoinToken { id: "t1", secret: "s3cret", root_hash: &hash }.to_string();
        let line = format!("{text}\n");
        let parsed = JoinToken::parse(&line).unwrap();
        assert_eq!((parsed.id, parsed.secret, parsed.root_hash), ("t1", "s3cret", hash.as_str()));
        assert!(!format!("{parsed:?}").contains("s3cret"));
        for bad in
            ["", "wj1.t1.s3cret", "wj2.t1.s.0", &format!("wj1..s.{hash}"), &format!("wj1.t.s.{}", "zz".repeat(32))]
        {
            assert!(JoinToken::parse(bad).is_none(), "{bad}");
        }
    }
}
