//! Hostile HTTP/2 peers (prior knowledge, on the outbound listener), written frame by
//! frame: rapid reset (CVE-2023-44487), a CONTINUATION flood, an HPACK bomb, a
//! WINDOW_UPDATE flood, and more streams than allowed. Each is bounded: the proxy ends
//! the connection (GOAWAY) or refuses the stream, counts what it ended, keeps its memory,
//! and serves normal requests right after.

mod support;

use std::{net::SocketAddr, time::Duration};

use support::hostile::{counted, normal_requests, protocol_errors, rss_kb, survived, Mesh};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = payload.len() as u32;
    let mut out = vec![(length >> 16) as u8, (length >> 8) as u8, length as u8, kind, flags];
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK string literal, not Huffman-coded (lengths below 127 in one byte).
fn literal(text: &[u8]) -> Vec<u8> {
    let mut out = integer(text.len(), 7, 0);
    out.extend_from_slice(text);
    out
}

/// An HPACK integer with an `prefix`-bit prefix and the leading `flags` bits.
fn integer(mut value: usize, prefix: u8, flags: u8) -> Vec<u8> {
    let max = (1usize << prefix) - 1;
    if value < max {
        return vec![flags | value as u8];
    }
    let mut out = vec![flags | max as u8];
    value -= max;
    while value >= 128 {
        out.push((value % 128 + 128) as u8);
        value /= 128;
    }
    out.push(value as u8);
    out
}

/// The header block of `GET /` to reviews: `:method GET`, `:scheme http`, `:path /`
/// from the static table, `:authority` as a literal.
fn get_block() -> Vec<u8> {
    let mut block = vec![0x82, 0x86, 0x84];
    block.push(0x01); // literal without indexing, name = static 1 (:authority)
    block.extend(literal(b"reviews"));
    block
}

/// One frame as read back.
#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// A raw HTTP/2 connection to the proxy, the preface and SETTINGS already sent.
struct Raw {
    stream: tokio::net::TcpStream,
    buffer: Vec<u8>,
}

impl Raw {
    async fn open(address: SocketAddr) -> Raw {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream.write_all(&[PREFACE, &frame(SETTINGS, 0, 0, &[])].concat()).await.unwrap();
        Raw { stream, buffer: Vec::new() }
    }

    /// Writes; a write the proxy refused by closing is not an error here.
    async fn send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok()
    }

    /// Reads frames until `done` says so, the connection closes, or `wait` passes;
    /// SETTINGS are acknowledged. Returns the frames and whether the proxy closed.
    async fn read_until(&mut self, wait: Duration, mut done: impl FnMut(&Frame) -> bool) -> (Vec<Frame>, bool) {
        let deadline = tokio::time::Instant::now() + wait;
        let mut frames = Vec::new();
        loop {
            while self.buffer.len() >= 9 {
                let length = (self.buffer[0] as usize) << 16 | (self.buffer[1] as usize) << 8 | self.buffer[2] as usize;
                if self.buffer.len() < 9 + length {
                    break;
                }
                let bytes: Vec<u8> = self.buffer.drain(..9 + length).collect();
                let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff;
                let frame = Frame { kind: bytes[3], flags: bytes[4], stream, payload: bytes[9..].to_vec() };
                if frame.kind == SETTINGS && frame.flags & ACK == 0 {
                    let _ = self.stream.write_all(&self::frame(SETTINGS, ACK, 0, &[])).await;
                }
                let stop = done(&frame);
                frames.push(frame);
                if stop {
                    return (frames, false);
                }
            }
            let mut chunk = [0u8; 64 * 1024];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return (frames, true),
                Ok(Ok(n)) => self.buffer.extend_from_slice(&chunk[..n]),
                Err(_) => return (frames, false),
            }
        }
    }
}

/// The error code of the GOAWAY among `frames`, if any.
fn goaway(frames: &[Frame]) -> Option<u32> {
    frames
        .iter()
        .find(|f| f.kind == GOAWAY)
        .map(|f| u32::from_be_bytes([f.payload[4], f.payload[5], f.payload[6], f.payload[7]]))
}

const PROTOCOL_ERROR: u32 = 0x1;
const FLOW_CONTROL_ERROR: u32 = 0x3;
const REFUSED_STREAM: u32 = 0x7;
const CANCEL: u32 = 0x8;
const COMPRESSION_ERROR: u32 = 0x9;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// The `:status` of a response header block when it is indexed from the static table
/// (how h2 encodes 200, 204, 206, 304, 400, 404 and 500).
fn status_of(block: &[u8]) -> Option<u16> {
    const STATIC: [(u8, u16); 7] = [(8, 200), (9, 204), (10, 206), (11, 304), (12, 400), (13, 404), (14, 500)];
    let first = *block.first()?;
    STATIC.iter().find(|(index, _)| first & 0x80 != 0 && *index == first & 0x7f).map(|(_, status)| *status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_floods_are_bounded_counted_and_survived() {
    let mesh = Mesh::start("hostile-h2").await;
    let outbound = mesh.web.outbound;
    let pid = mesh.web.child.id();
    let baseline = rss_kb(pid);

    // Rapid reset: streams opened and cancelled at once, a thousand of them in one burst.
    let case = "rapid reset";
    let before = protocol_errors(&mesh.web, "outbound", "h2_enhance_your_calm").await;
    let hits = mesh.app_hits();
    let mut raw = Raw::open(outbound).await;
    let mut burst = Vec::new();
    for i in 0..1000u32 {
        let id = 2 * i + 1;
        burst.extend(frame(HEADERS, END_STREAM | END_HEADERS, id, &get_block()));
        burst.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
    }
    raw.send(&burst).await;
    let (frames, closed) = raw.read_until(Duration::from_secs(10), |f| f.kind == GOAWAY).await;
    assert_eq!(goaway(&frames), Some(ENHANCE_YOUR_CALM), "{case}: {closed} {:?}", frames.last());
    counted(&mesh.web, "outbound", "h2_enhance_your_calm", before, case).await;
    let forwarded = mesh.app_hits() - hits;
    assert!(forwarded < 100, "{case}: {forwarded} cancelled requests reached the application");
    drop(raw);
    survived(&mesh, pid, baseline, case).await;

    // A CONTINUATION flood: one header block that never ends.
    let case = "CONTINUATION flood";
    let flood_reasons = ["h2_compression_error", "h2_protocol_error", "h2_frame_size_error", "h2_enhance_your_calm"];
    let mut before = 0.0;
    for reason in flood_reasons {
        before += protocol_errors(&mesh.web, "outbound", reason).await;
    }
    let mut raw = Raw::open(outbound).await;
    let mut block = get_block();
    block.extend([0x40]); // literal with indexing, new name
    block.extend(literal(b"x-flood"));
    block.extend(integer(200_000, 7, 0));
    raw.send(&frame(HEADERS, END_STREAM, 1, &block)).await;
    let filler = vec![b'a'; 16 * 1024];
    let mut refused = false;
    // At most 64 MiB, whatever the proxy does.
    for _ in 0..4096 {
        if !raw.send(&frame(CONTINUATION, 0, 1, &filler)).await {
            refused = true;
            break;
        }
    }
    let (frames, closed) = raw.read_until(Duration::from_secs(10), |f| f.kind == GOAWAY).await;
    assert!(refused || closed || goaway(&frames).is_some(), "{case}: the proxy read 64 MiB of one header block");
    if let Some(code) = goaway(&frames) {
        assert!([COMPRESSION_ERROR, PROTOCOL_ERROR, ENHANCE_YOUR_CALM].contains(&code), "{case}: GOAWAY {code}");
    }
    eventually_counted(&mesh, &flood_reasons, before, case).await;
    drop(raw);
    survived(&mesh, pid, baseline, case).await;

    // An HPACK bomb: one 4 KB header in the dynamic table, then a block of 4,000
    // one-byte references to it (16 MB decoded) against max_header_list_size: h2 stops
    // decoding and ends the connection as a flood; the bomb never reaches the application.
    let case = "HPACK bomb";
    let before = protocol_errors(&mesh.web, "outbound", "h2_enhance_your_calm").await;
    let hits = mesh.app_hits();
    let mut raw = Raw::open(outbound).await;
    let mut first = get_block();
    first.push(0x40);
    first.extend(literal(b"x-bomb"));
    let value = vec![b'b'; 4000];
    first.extend(integer(value.len(), 7, 0));
    first.extend(&value);
    raw.send(&frame(HEADERS, END_STREAM | END_HEADERS, 1, &first)).await;
    let mut bomb = get_block();
    // Dynamic index 62 is the newest entry: x-bomb.
    bomb.extend(std::iter::repeat_n(0x80 | 62, 4000));
    raw.send(&frame(HEADERS, END_STREAM | END_HEADERS, 3, &bomb)).await;
    let (frames, _) = raw.read_until(Duration::from_secs(10), |f| f.kind == GOAWAY).await;
    assert_eq!(goaway(&frames), Some(ENHANCE_YOUR_CALM), "{case}");
    assert!(!frames.iter().any(|f| f.kind == HEADERS && f.stream == 3), "{case}: the bomb was answered");
    counted(&mesh.web, "outbound", "h2_enhance_your_calm", before, case).await;
    assert!(mesh.app_hits() - hits <= 1, "{case}: the bomb reached the application");
    drop(raw);
    survived(&mesh, pid, baseline, case).await;

    // A WINDOW_UPDATE flood: 50,000 small ones are cheap and harmless; one that
    // overflows the window ends the connection.
    let case = "WINDOW_UPDATE flood";
    let before = protocol_errors(&mesh.web, "outbound", "h2_flow_control_error").await;
    let mut raw = Raw::open(outbound).await;
    let small: Vec<u8> = (0..50_000).flat_map(|_| frame(WINDOW_UPDATE, 0, 0, &1u32.to_be_bytes())).collect();
    raw.send(&small).await;
    raw.send(&frame(HEADERS, END_STREAM | END_HEADERS, 1, &get_block())).await;
    let (frames, _) = raw.read_until(Duration::from_secs(10), |f| f.kind == HEADERS && f.stream == 1).await;
    let answer = frames.iter().find(|f| f.kind == HEADERS && f.stream == 1);
    assert_eq!(answer.and_then(|f| status_of(&f.payload)), Some(200), "{case}: the connection stopped serving");
    raw.send(&frame(WINDOW_UPDATE, 0, 0, &0x7fff_ffffu32.to_be_bytes())).await;
    let (frames, _) = raw.read_until(Duration::from_secs(10), |f| f.kind == GOAWAY).await;
    assert_eq!(goaway(&frames), Some(FLOW_CONTROL_ERROR), "{case}");
    counted(&mesh.web, "outbound", "h2_flow_control_error", before, case).await;
    drop(raw);
    survived(&mesh, pid, baseline, case).await;

    // More streams than allowed: 200 are served at once, the rest refused; a peer that
    // keeps opening them is cut off.
    let case = "more streams than allowed";
    mesh.app.set_delay(Duration::from_millis(3000));
    let before = protocol_errors(&mesh.web, "outbound", "h2_enhance_your_calm").await;
    let mut raw = Raw::open(outbound).await;
    // Let the SETTINGS (max_concurrent_streams) arrive and be acknowledged first.
    raw.read_until(Duration::from_secs(2), |f| f.kind == SETTINGS && f.flags & ACK == 0).await;
    let opened: Vec<u8> =
        (0..600u32).flat_map(|i| frame(HEADERS, END_STREAM | END_HEADERS, 2 * i + 1, &get_block())).collect();
    raw.send(&opened).await;
    let (frames, _) = raw.read_until(Duration::from_secs(10), |f| f.kind == GOAWAY).await;
    let refused = frames
        .iter()
        .filter(|f| f.kind == RST_STREAM && u32::from_be_bytes(f.payload[..4].try_into().unwrap()) == REFUSED_STREAM)
        .count();
    assert!(refused >= 200, "{case}: only {refused} streams refused of 600 over a limit of 200");
    assert_eq!(goaway(&frames), Some(ENHANCE_YOUR_CALM), "{case}: a peer that keeps at it is cut off");
    counted(&mesh.web, "outbound", "h2_enhance_your_calm", before, case).await;
    drop(raw);
    mesh.app.set_delay(Duration::ZERO);
    survived(&mesh, pid, baseline, case).await;
    assert_eq!(normal_requests(outbound, 10).await, 10);
}

/// Waits until any of `reasons` has been counted more than `before` times in all.
async fn eventually_counted(mesh: &Mesh, reasons: &[&str], before: f64, case: &str) {
    support::eventually(Duration::from_secs(10), &format!("{case}: counted as one of {reasons:?}"), || async move {
        let mut total = 0.0;
        for reason in reasons {
            total += protocol_errors(&mesh.web, "outbound", reason).await;
        }
        (total > before).then_some(())
    })
    .await;
}
