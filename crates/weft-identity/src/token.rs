//! The format of the mesh's bearer tokens, which the control plane writes and proxies and
//! operators present: `<prefix>.<id>.<secret>.<root hash>`.
//!
//! Two kinds, told apart by the prefix so that one can never pass for the other: join
//! tokens (`wj1`), with which a proxy joins as one workload identity, and operator tokens
//! (`wo1`), with which an operator (or the dashboard) calls the control plane's API. The
//! id names the token's record (for listing and revoking), the secret proves possession
//! (the store keeps only its hash), and the root hash (SHA-256 of the root certificate's
//! DER, hex) lets the holder verify the control plane on first contact, with no CA file.

/// What a token admits its holder as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// A proxy joining as one workload identity.
    Join,
    /// An operator calling the API, with a role.
    Operator,
}

impl TokenKind {
    /// The format's prefix, with its version.
    pub fn prefix(self) -> &'static str {
        match self {
            TokenKind::Join => "wj1",
            TokenKind::Operator => "wo1",
        }
    }

    fn from_prefix(prefix: &str) -> Option<Self> {
        [TokenKind::Join, TokenKind::Operator].into_iter().find(|kind| kind.prefix() == prefix)
    }
}

/// The parts of a token.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Token<'a> {
    pub kind: TokenKind,
    pub id: &'a str,
    pub secret: &'a str,
    pub root_hash: &'a str,
}

/// Never shows the secret.
impl std::fmt::Debug for Token<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("kind", &self.kind)
            .field("id", &self.id)
            .field("root_hash", &self.root_hash)
            .finish_non_exhaustive()
    }
}

impl<'a> Token<'a> {
    /// Reads a token of any kind (surrounding whitespace, as in a file, is ignored).
    pub fn parse(token: &'a str) -> Option<Self> {
        let mut parts = token.trim().split('.');
        match (parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(prefix), Some(id), Some(secret), Some(root_hash), None)
                if !id.is_empty()
                    && !secret.is_empty()
                    && root_hash.len() == 64
                    && root_hash.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                Some(Token { kind: TokenKind::from_prefix(prefix)?, id, secret, root_hash })
            }
            _ => None,
        }
    }

    /// Reads a token of `kind` only.
    pub fn parse_kind(token: &'a str, kind: TokenKind) -> Option<Self> {
        Token::parse(token).filter(|token| token.kind == kind)
    }
}

/// SHA-256 (hex) of a token's secret: all the store keeps of it. Digests, not secrets,
/// are compared, so a comparison's timing says nothing useful.
pub fn secret_digest(secret: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()))
}

impl std::fmt::Display for Token<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}.{}", self.kind.prefix(), self.id, self.secret, self.root_hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_reads_back_and_anything_else_is_refused() {
        let hash = "ab".repeat(32);
        let text = Token { kind: TokenKind::Join, id: "t1", secret: "s3cret", root_hash: &hash }.to_string();
        let line = format!("{text}\n");
        let parsed = Token::parse(&line).unwrap();
        assert_eq!(
            (parsed.kind, parsed.id, parsed.secret, parsed.root_hash),
            (TokenKind::Join, "t1", "s3cret", hash.as_str())
        );
        assert!(!format!("{parsed:?}").contains("s3cret"));
        for bad in
            ["", "wj1.t1.s3cret", "wj2.t1.s.0", &format!("wj1..s.{hash}"), &format!("wj1.t.s.{}", "zz".repeat(32))]
        {
            assert!(Token::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn the_kinds_cannot_pass_for_each_other() {
        let hash = "cd".repeat(32);
        let operator = Token { kind: TokenKind::Operator, id: "o1", secret: "s", root_hash: &hash }.to_string();
        assert!(operator.starts_with("wo1."));
        assert!(Token::parse_kind(&operator, TokenKind::Join).is_none());
        assert_eq!(Token::parse_kind(&operator, TokenKind::Operator).unwrap().id, "o1");
    }
}
