//! Join-token and operator-token formats. A token that reads back renders as exactly
//! the text it was read from (no two texts are one token), and the proxy's reading of a
//! join-token file agrees with it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_identity::token::{Token, TokenKind};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Some(token) = Token::parse(text) {
        assert_eq!(token.to_string(), text.trim(), "a token renders as what it was read from");
        for kind in [TokenKind::Join, TokenKind::Operator] {
            assert_eq!(Token::parse_kind(text, kind).is_some(), token.kind == kind);
        }
    }
    let _ = weft_proxy::identity::JoinTokenSecret::new(text, "fuzz");
});
