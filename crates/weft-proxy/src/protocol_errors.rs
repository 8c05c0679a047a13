//! Why a peer's connection or request was refused for breaking its protocol, as the
//! bounded set of reasons `weft_protocol_errors_total{direction, reason}` counts.
//!
//! The HTTP codecs (hyper, h2) and rustls do the refusing: they answer (400, 414, 431, a
//! GOAWAY, a TLS alert) and end the connection with an error. This module turns those
//! errors into reasons an operator can alert on; the listener counts them once, when the
//! connection ends. What h2 answers on one stream without ending the connection (a header
//! block somewhat over `max_header_list_size` gets a 431, a stream beyond
//! `max_concurrent_streams` a REFUSED_STREAM) is not reported to the proxy, so it is not
//! counted until the peer keeps at it or goes far beyond (an HPACK bomb decoding to
//! megabytes, hundreds of refused streams), when h2 ends the connection with
//! ENHANCE_YOUR_CALM.

use std::error::Error as _;

/// A protocol violation the proxy refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProtocolError {
    /// HTTP/1 request target over hyper's 64 KiB limit (answered 414).
    UriTooLong,
    /// HTTP/1 request head over the read buffer, or more than 100 headers (431).
    HeadersTooLarge,
    /// HTTP/1 `Content-Length` that is invalid or repeated with different values (400).
    InvalidContentLength,
    /// HTTP/1 `Transfer-Encoding` whose last coding is not `chunked`, or on HTTP/1.0 (400).
    InvalidTransferEncoding,
    /// Any other unparsable HTTP/1 request: method, target, header, version (400).
    MalformedRequest,
    /// No complete request head within `--header-read-timeout` (slow clients, and idle
    /// keep-alive connections past it); closed without a response.
    HeaderReadTimeout,
    /// The connection closed in the middle of a request head.
    IncompleteRequest,
    /// A request body that broke its framing: an invalid chunk, or shorter than its
    /// `Content-Length` when the connection ended (counted by [`broken_body`]).
    InvalidBody,
    /// HTTP/2 connection errors h2 detected, by its error code.
    Http2Protocol,
    Http2FlowControl,
    Http2FrameSize,
    Http2Compression,
    /// ENHANCE_YOUR_CALM: a flood. Too many streams reset (rapid reset, CVE-2023-44487),
    /// too many streams refused or reset for protocol errors, a header block that never
    /// ends (CONTINUATION flood) or decodes far past the limit (HPACK bomb).
    Http2EnhanceYourCalm,
    Http2Other,
    /// A mesh TLS handshake that did not finish within the handshake timeout.
    TlsHandshakeTimeout,
    /// A caller that offered none of weft's ALPN protocols.
    TlsUnknownAlpn,
    /// A client certificate the mesh does not accept (including over-long chains).
    TlsBadCertificate,
    /// Any other failed mesh TLS handshake (malformed or oversized messages, alerts).
    TlsHandshakeFailed,
}

impl ProtocolError {
    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            ProtocolError::UriTooLong => "uri_too_long",
            ProtocolError::HeadersTooLarge => "headers_too_large",
            ProtocolError::InvalidContentLength => "invalid_content_length",
            ProtocolError::InvalidTransferEncoding => "invalid_transfer_encoding",
            ProtocolError::MalformedRequest => "malformed_request",
            ProtocolError::HeaderReadTimeout => "header_read_timeout",
            ProtocolError::IncompleteRequest => "incomplete_request",
            ProtocolError::InvalidBody => "invalid_body",
            ProtocolError::Http2Protocol => "h2_protocol_error",
            ProtocolError::Http2FlowControl => "h2_flow_control_error",
            ProtocolError::Http2FrameSize => "h2_frame_size_error",
            ProtocolError::Http2Compression => "h2_compression_error",
            ProtocolError::Http2EnhanceYourCalm => "h2_enhance_your_calm",
            ProtocolError::Http2Other => "h2_other_error",
            ProtocolError::TlsHandshakeTimeout => "tls_handshake_timeout",
            ProtocolError::TlsUnknownAlpn => "tls_unknown_alpn",
            ProtocolError::TlsBadCertificate => "tls_bad_certificate",
            ProtocolError::TlsHandshakeFailed => "tls_handshake_failed",
        }
    }

    /// The violation a server connection ended with, if it ended for one; `None` for
    /// what is not the peer breaking the protocol (a reset, a client that went away
    /// between requests, the proxy's own shutdown).
    pub fn of_connection(error: &hyper::Error) -> Option<ProtocolError> {
        if let Some(h2) = find_cause::<h2::Error>(error) {
            return Self::of_h2(h2);
        }
        // hyper's error kinds are private; its predicates and descriptions are not.
        let text = error.to_string();
        if error.is_parse_too_large() {
            return Some(if text.starts_with("URI") {
                ProtocolError::UriTooLong
            } else {
                ProtocolError::HeadersTooLarge
            });
        }
        if error.is_parse() {
            return Some(if text.contains("content-length") {
                ProtocolError::InvalidContentLength
            } else if text.contains("transfer-encoding") {
                ProtocolError::InvalidTransferEncoding
            } else {
                ProtocolError::MalformedRequest
            });
        }
        if error.is_timeout() {
            return Some(ProtocolError::HeaderReadTimeout);
        }
        if error.is_incomplete_message() {
            return Some(ProtocolError::IncompleteRequest);
        }
        None
    }

    /// The violation an h2 error reports, when h2 itself found it (not an error code
    /// the peer sent, not I/O).
    fn of_h2(error: &h2::Error) -> Option<ProtocolError> {
        if error.is_remote() || error.is_io() {
            return None;
        }
        let reason = error.reason()?;
        Some(match reason {
            h2::Reason::NO_ERROR | h2::Reason::CANCEL => return None,
            h2::Reason::PROTOCOL_ERROR => ProtocolError::Http2Protocol,
            h2::Reason::FLOW_CONTROL_ERROR => ProtocolError::Http2FlowControl,
            h2::Reason::FRAME_SIZE_ERROR => ProtocolError::Http2FrameSize,
            h2::Reason::COMPRESSION_ERROR => ProtocolError::Http2Compression,
            h2::Reason::ENHANCE_YOUR_CALM => ProtocolError::Http2EnhanceYourCalm,
            _ => ProtocolError::Http2Other,
        })
    }

    /// The violation a failed TLS accept reports; `None` when the peer just went away.
    pub fn of_tls_handshake(error: &std::io::Error) -> Option<ProtocolError> {
        if let Some(tls) = error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
            return Some(match tls {
                rustls::Error::NoApplicationProtocol => ProtocolError::TlsUnknownAlpn,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
                    ProtocolError::TlsBadCertificate
                }
                _ => ProtocolError::TlsHandshakeFailed,
            });
        }
        match error.kind() {
            std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe => None,
            _ => Some(ProtocolError::TlsHandshakeFailed),
        }
    }
}

/// A caller's request body broke its framing (seen when forwarding it, never by the
/// connection): counted as the violation it is, and answered 400.
pub(crate) fn broken_body(
    metrics: &crate::metrics::Metrics,
    direction: &'static str,
    why: String,
) -> crate::errors::ProxyFailure {
    metrics.protocol_error(direction, ProtocolError::InvalidBody);
    crate::errors::ProxyFailure::BrokenRequestBody(why)
}

/// The first error of type `E` in `error`'s chain of sources.
fn find_cause<E: std::error::Error + 'static>(error: &hyper::Error) -> Option<&E> {
    let mut cause = error.source();
    while let Some(current) = cause {
        if let Some(found) = current.downcast_ref::<E>() {
            return Some(found);
        }
        cause = current.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_errors_name_what_the_peer_did() {
        let io = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        assert_eq!(
            ProtocolError::of_tls_handshake(&io(rustls::Error::NoApplicationProtocol)),
            Some(ProtocolError::TlsUnknownAlpn)
        );
        assert_eq!(
            ProtocolError::of_tls_handshake(&io(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer
            ))),
            Some(ProtocolError::TlsBadCertificate)
        );
        assert_eq!(
            ProtocolError::of_tls_handshake(&io(rustls::Error::InvalidMessage(
                rustls::InvalidMessage::HandshakePayloadTooLarge
            ))),
            Some(ProtocolError::TlsHandshakeFailed)
        );
        let gone = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        assert_eq!(ProtocolError::of_tls_handshake(&gone), None, "a peer that went away broke nothing");
    }

    #[test]
    fn h2_errors_count_only_what_h2_found_itself() {
        let local: h2::Error = h2::Reason::ENHANCE_YOUR_CALM.into();
        assert_eq!(ProtocolError::of_h2(&local), Some(ProtocolError::Http2EnhanceYourCalm));
        let calm: h2::Error = h2::Reason::NO_ERROR.into();
        assert_eq!(ProtocolError::of_h2(&calm), None);
    }
}
