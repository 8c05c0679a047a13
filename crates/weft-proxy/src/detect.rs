//! Protocol detection on inbound connections: HTTP/1, HTTP/2 (prior knowledge), a TLS
//! handshake (a meshed caller, on a proxy with an identity), or opaque.
//!
//! Detection peeks at most [`PEEK_LIMIT`] bytes without consuming them and gives up after
//! a timeout ([`Detected::TimedOut`]: inbound treats a silent client as opaque TCP, since
//! server-first protocols speak first). Ports declared `tcp` never come here, so they
//! never wait.
//!
//! Peeking cannot wait for *more* bytes (the socket stays readable while the first ones
//! sit unread), so a partial prefix is re-peeked after a pause that doubles up to
//! [`MAX_REPEEK_PAUSE`]: a client whose first segment is whole (all real ones) costs one
//! peek, and one that dribbles a byte at a time (slowloris) costs a few wake-ups a second
//! instead of a thousand.

use std::time::{Duration, Instant};

use tokio::net::TcpStream;

/// Bytes peeked at most; enough for any HTTP/1 method and the HTTP/2 preface.
pub const PEEK_LIMIT: usize = 64;

/// The longest pause between peeks at a partial prefix.
const MAX_REPEEK_PAUSE: Duration = Duration::from_millis(100);

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
    /// Nothing decisive arrived within the timeout: a silent client, or one too slow.
    TimedOut,
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

/// Peeks at `stream` until its protocol is known or `timeout` passes.
pub async fn detect(stream: &TcpStream, timeout: Duration) -> std::io::Result<Detected> {
    let deadline = Instant::now() + timeout;
    let mut buffer = [0u8; PEEK_LIMIT];
    let mut pause = Duration::from_millis(1);
    let mut seen = 0;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let peeked = match tokio::time::timeout(remaining, stream.peek(&mut buffer)).await {
            Ok(result) => result?,
            Err(_) => return Ok(Detected::TimedOut),
        };
        if peeked == 0 {
            return Ok(Detected::Opaque); // closed before speaking
        }
        if let Some(detected) = classify(&buffer[..peeked]) {
            return Ok(detected);
        }
        if remaining.is_zero() {
            return Ok(Detected::TimedOut);
        }
        // A partial first segment: pause before peeking again, longer while nothing new
        // arrives, so that a dribbling client cannot make the proxy spin.
        if peeked > seen {
            seen = peeked;
        } else {
            pause = (pause * 2).min(MAX_REPEEK_PAUSE);
        }
        tokio::time::sleep(pause.min(remaining)).await;
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
