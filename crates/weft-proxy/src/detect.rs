//! Protocol detection on inbound connections: HTTP/1, HTTP/2 (prior knowledge), a TLS
//! handshake (a meshed caller, on a proxy with an identity), or opaque.
//!
//! Detection peeks at most [`PEEK_LIMIT`] bytes without consuming them and gives up after
//! a timeout, treating a silent client as opaque TCP (server-first protocols speak
//! first). Ports declared `tcp` never come here, so they never wait.

use std::time::{Duration, Instant};

use tokio::net::TcpStream;

/// Bytes peeked at most; enough for any HTTP/1 method and the HTTP/2 preface.
pub const PEEK_LIMIT: usize = 64;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: [&[u8]; 9] =
    [b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"CONNECT ", b"OPTIONS ", b"TRACE ", b"PATCH "];

/// What a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    /// A TLS ClientHello: a record of type handshake (22), version 3.x.
    Tls,
    Opaque,
}

/// Classifies what has been peeked so far; `None` means "could still be HTTP".
pub fn classify(peeked: &[u8]) -> Option<Detected> {
    if peeked.is_empty() {
        return None;
    }
    if peeked[0] == 0x16 {
        return match peeked.get(1) {
            None => None,
            Some(0x03) => Some(Detected::Tls),
            Some(_) => Some(Detected::Opaque),
        };
    }
    if peeked.len() >= H2_PREFACE.len() && peeked.starts_with(H2_PREFACE) {
        return Some(Detected::Http2);
    }
    if METHODS.iter().any(|m| peeked.starts_with(m)) {
        return Some(Detected::Http1);
    }
    let prefix_of = |candidate: &[u8]| candidate.starts_with(peeked);
    if prefix_of(H2_PREFACE) || METHODS.iter().any(|m| prefix_of(m)) {
        return None;
    }
    Some(Detected::Opaque)
}

/// Peeks at `stream` until its protocol is known or `timeout` passes (then opaque).
pub async fn detect(stream: &TcpStream, timeout: Duration) -> std::io::Result<Detected> {
    let deadline = Instant::now() + timeout;
    let mut buffer = [0u8; PEEK_LIMIT];
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let peeked = match tokio::time::timeout(remaining, stream.peek(&mut buffer)).await {
            Ok(result) => result?,
            Err(_) => return Ok(Detected::Opaque),
        };
        if peeked == 0 {
            return Ok(Detected::Opaque); // closed before speaking
        }
        if let Some(detected) = classify(&buffer[..peeked]) {
            return Ok(detected);
        }
        // A partial first segment: wait briefly for more bytes rather than spin.
        tokio::time::sleep(Duration::from_millis(1).min(remaining)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_http_versions_and_opaque_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(classify(b"PRI * HTTP/2.0"), None, "a partial preface waits");
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"\x16\x03\x01"), Some(Detected::Tls));
        assert_eq!(classify(b"\x16"), None, "one byte of a record header waits");
        assert_eq!(classify(b"\x16\x01"), Some(Detected::Opaque));
        assert_eq!(classify(b"HELO example"), Some(Detected::Opaque));
    }
}
