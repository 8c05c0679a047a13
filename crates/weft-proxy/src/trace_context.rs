//! Trace context on the wire: W3C `traceparent` and B3 (the single `b3` header and the
//! `X-B3-*` headers) read on the way in; W3C written on the way out, plus B3 in the form
//! it came in, so that B3-instrumented applications keep working; `tracestate` passed
//! through untouched; and `x-request-id` made for a request that has none.
//!
//! A request without trace context takes its trace id from its request id (see
//! [`request_trace_id`]), and the sampling decision from that trace id (see
//! [`sampled_at`]): so an unsampled request needs no `traceparent` on the wire. Every
//! proxy on its way names the same trace in its logs and tap events, and decides alike,
//! from the one header the request carries anyway.
//!
//! Only the ids and the sampling decision matter to the proxy: a parse failure is "no
//! context" (the request starts a new trace), never an error for the caller.

use http::{header::HeaderName, HeaderMap, HeaderValue};
use rand::Rng as _;

/// A 128-bit trace id.
pub type TraceId = [u8; 16];
/// A 64-bit span id.
pub type SpanId = [u8; 8];

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const B3: HeaderName = HeaderName::from_static("b3");
const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
/// The request id header, made by the first proxy that sees a request without one.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Which B3 headers a request came with; the proxy answers in the same form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum B3Form {
    Single,
    Multi,
}

/// The trace context a request arrived with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extracted {
    /// The trace and the caller's span, when the request named them.
    pub ids: Option<(TraceId, SpanId)>,
    /// The caller's decision: `None` when it left it to the receiver.
    pub sampled: Option<bool>,
    /// Set when the context came in B3.
    pub b3: Option<B3Form>,
}

/// What a request's headers say about tracing, found in one pass over them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scanned {
    pub context: Extracted,
    /// `x-weft-trace: force`.
    pub force: bool,
    /// The trace id its `x-request-id` stands for, when it has one.
    pub request_id: Option<TraceId>,
}

/// The trace headers of a request, as found.
#[derive(Default)]
struct Found<'a> {
    traceparent: Option<&'a HeaderValue>,
    b3: Option<&'a HeaderValue>,
    b3_trace_id: Option<&'a HeaderValue>,
    b3_span_id: Option<&'a HeaderValue>,
    b3_sampled: Option<&'a HeaderValue>,
    b3_flags: Option<&'a HeaderValue>,
}

/// Reads what `headers` say about tracing. One pass over the headers, comparing names,
/// costs less than hashing each of the seven names it looks for.
pub fn scan(headers: &HeaderMap) -> Scanned {
    let mut found = Found::default();
    let mut scanned = Scanned::default();
    let mut request_id = None;
    for (name, value) in headers {
        let name = name.as_str();
        // Most headers are none of these: their first letter says so, before any
        // comparison of whole names.
        match name.as_bytes().first() {
            Some(b't') if name == "traceparent" => found.traceparent = Some(value),
            Some(b'b') if name == "b3" => found.b3 = Some(value),
            Some(b'x') => match name {
                "x-request-id" => request_id = request_id.or(Some(value)),
                "x-b3-traceid" => found.b3_trace_id = Some(value),
                "x-b3-spanid" => found.b3_span_id = Some(value),
                "x-b3-sampled" => found.b3_sampled = Some(value),
                "x-b3-flags" => found.b3_flags = Some(value),
                "x-weft-trace" => scanned.force |= value.as_bytes().eq_ignore_ascii_case(b"force"),
                _ => {}
            },
            _ => {}
        }
    }
    scanned.request_id = request_id.map(|value| request_trace_id(value.as_bytes()));
    scanned.context = extract_found(&found);
    scanned
}

/// Reads the context of `headers` (see [`scan`]).
pub fn extract(headers: &HeaderMap) -> Extracted {
    scan(headers).context
}

/// W3C first, then B3 single, then B3 multi. B3 beside W3C is noted, to be written on
/// with it, so that neither goes stale on the way.
fn extract_found(found: &Found<'_>) -> Extracted {
    if let Some(mut context) = found.traceparent.and_then(|v| parse_traceparent(v.as_bytes())) {
        context.b3 = if found.b3.is_some() {
            Some(B3Form::Single)
        } else if found.b3_trace_id.is_some() {
            Some(B3Form::Multi)
        } else {
            None
        };
        return context;
    }
    if let Some(context) = found.b3.and_then(|v| parse_b3_single(v.as_bytes())) {
        return context;
    }
    parse_b3_multi(found).unwrap_or_default()
}

/// `version-traceid-parentid-flags`. A later version is read by its first four fields,
/// as the specification asks; version `ff` and all-zero ids are invalid.
fn parse_traceparent(value: &[u8]) -> Option<Extracted> {
    if value.len() < 55 || (value.len() > 55 && value[55] != b'-') {
        return None;
    }
    let version = hex_byte(&value[0..2])?;
    if version == 0xff || (version == 0 && value.len() != 55) {
        return None;
    }
    if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let trace: TraceId = hex_array(&value[3..35])?;
    let span: SpanId = hex_array(&value[36..52])?;
    let flags = hex_byte(&value[53..55])?;
    if trace == [0; 16] || span == [0; 8] {
        return None;
    }
    Some(Extracted { ids: Some((trace, span)), sampled: Some(flags & 1 == 1), b3: None })
}

/// `traceid-spanid[-sampling[-parentspanid]]`, or the sampling state alone.
fn parse_b3_single(value: &[u8]) -> Option<Extracted> {
    let text = std::str::from_utf8(value).ok()?;
    let mut fields = text.split('-');
    let first = fields.next()?;
    let Some(span) = fields.next() else {
        // A decision with no ids: `0`, `1` or `d`.
        return Some(Extracted { ids: None, sampled: Some(b3_sampling(first)?), b3: Some(B3Form::Single) });
    };
    let trace = b3_trace_id(first)?;
    let span: SpanId = hex_array(span.as_bytes())?;
    let sampled = match fields.next() {
        Some(state) => Some(b3_sampling(state)?),
        None => None,
    };
    if span == [0; 8] {
        return None;
    }
    Some(Extracted { ids: Some((trace, span)), sampled, b3: Some(B3Form::Single) })
}

fn parse_b3_multi(found: &Found<'_>) -> Option<Extracted> {
    fn text(value: Option<&HeaderValue>) -> Option<&str> {
        value.and_then(|v| v.to_str().ok())
    }
    let debug = text(found.b3_flags) == Some("1");
    let sampled = match text(found.b3_sampled) {
        _ if debug => Some(true),
        Some("1" | "true") => Some(true),
        Some("0" | "false") => Some(false),
        _ => None,
    };
    let ids = match (text(found.b3_trace_id), text(found.b3_span_id)) {
        (Some(trace), Some(span)) => {
            let span: SpanId = hex_array(span.as_bytes())?;
            (span != [0; 8]).then_some(())?;
            Some((b3_trace_id(trace)?, span))
        }
        _ => None,
    };
    if ids.is_none() && sampled.is_none() {
        return None;
    }
    Some(Extracted { ids, sampled, b3: Some(B3Form::Multi) })
}

/// A B3 trace id: 32 hex digits, or 16 (64 bits, zero-extended to 128 as W3C needs).
fn b3_trace_id(text: &str) -> Option<TraceId> {
    let mut trace = [0u8; 16];
    match text.len() {
        32 => trace = hex_array(text.as_bytes())?,
        16 => trace[8..].copy_from_slice(&hex_array::<8>(text.as_bytes())?),
        _ => return None,
    }
    (trace != [0; 16]).then_some(trace)
}

fn b3_sampling(state: &str) -> Option<bool> {
    match state {
        "1" | "d" => Some(true),
        "0" => Some(false),
        _ => None,
    }
}

/// Writes the context for the next hop: `span` is the parent the receiver's span will
/// name. W3C always; B3 too when the request came with it, in its form.
pub fn inject(headers: &mut HeaderMap, trace: &TraceId, span: &SpanId, sampled: bool, b3: Option<B3Form>) {
    let mut buffer = [0u8; 55];
    buffer[..3].copy_from_slice(b"00-");
    write_hex(&mut buffer[3..35], trace);
    buffer[35] = b'-';
    write_hex(&mut buffer[36..52], span);
    buffer[52..].copy_from_slice(if sampled { b"-01" } else { b"-00" });
    headers.insert(TRACEPARENT, header_value(&buffer));
    match b3 {
        None => {}
        Some(B3Form::Single) => {
            // traceid-spanid-sampling: the W3C fields, re-punctuated.
            let mut single = [0u8; 51];
            single[..49].copy_from_slice(&buffer[3..52]);
            single[49] = b'-';
            single[50] = if sampled { b'1' } else { b'0' };
            headers.insert(B3, header_value(&single));
        }
        Some(B3Form::Multi) => {
            headers.insert(B3_TRACE_ID, header_value(&buffer[3..35]));
            headers.insert(B3_SPAN_ID, header_value(&buffer[36..52]));
            headers.insert(B3_SAMPLED, HeaderValue::from_static(if sampled { "1" } else { "0" }));
            // The parent of the span just named is not this hop's to state.
            headers.remove(B3_PARENT_SPAN_ID);
        }
    }
}

/// Gives the request a new `x-request-id` (a random UUID, version 4) unless [`scan`]
/// found one, and returns the trace id the request's id stands for.
pub fn ensure_request_id(headers: &mut HeaderMap, scanned: &mut Scanned) -> TraceId {
    *scanned.request_id.get_or_insert_with(|| {
        let (value, trace) = new_request_id();
        headers.insert(REQUEST_ID, value);
        trace
    })
}

/// A new request id, a random UUID (version 4), and the trace id it stands for: its own
/// 128 bits.
pub fn new_request_id() -> (HeaderValue, TraceId) {
    let mut bytes = random_u128().to_le_bytes();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    // 8-4-4-4-12 hex digits; every position fixed, so no branch per byte.
    let mut text = *b"00000000-0000-0000-0000-000000000000";
    for (from, to, at) in UUID_GROUPS {
        write_hex(&mut text[at..at + 2 * (to - from)], &bytes[from..to]);
    }
    (header_value(&text), bytes)
}

/// A UUID's groups: the bytes each holds, and where its digits start in the text.
const UUID_GROUPS: [(usize, usize, usize); 5] = [(0, 4, 0), (4, 6, 9), (6, 8, 14), (8, 10, 19), (10, 16, 24)];

/// The trace id a request id stands for. A version-4 UUID (what weft makes, and most
/// clients) is its own 128 bits, so the trace id reads as the request id without its
/// dashes. Anything else is hashed: an id of another form may have no random low bits
/// (a UUID of version 1 ends in a MAC address), and the sampling decision is taken from
/// those bits.
pub fn request_trace_id(value: &[u8]) -> TraceId {
    if let Some(uuid) = parse_uuid_v4(value) {
        return uuid;
    }
    // FNV-1a, 128 bits, then each half through SplitMix64's finalizer, so that every
    // input byte reaches the low bits.
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013b;
    let hash = value.iter().fold(OFFSET, |hash, byte| (hash ^ *byte as u128).wrapping_mul(PRIME));
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }
    let (high, low) = (mix((hash >> 64) as u64), mix(hash as u64) | 1);
    ((high as u128) << 64 | low as u128).to_be_bytes()
}

/// The 16 bytes of a version-4 UUID in its text form, any case. Every request through
/// a tracing proxy has its id read so: eight digits at a time (see [`hex8`]).
fn parse_uuid_v4(text: &[u8]) -> Option<TraceId> {
    let text: &[u8; 36] = text.try_into().ok()?;
    if text[8] != b'-' || text[13] != b'-' || text[18] != b'-' || text[23] != b'-' {
        return None;
    }
    let joined = |first: &[u8], second: &[u8]| {
        let mut eight = [0u8; 8];
        eight[..4].copy_from_slice(first);
        eight[4..].copy_from_slice(second);
        eight
    };
    let first = hex8(text[0..8].try_into().expect("eight digits"))?;
    let second = hex8(joined(&text[9..13], &text[14..18]))?;
    let third = hex8(joined(&text[19..23], &text[24..28]))?;
    let fourth = hex8(text[28..36].try_into().expect("eight digits"))?;
    let (high, low) = ((first as u64) << 32 | second as u64, (third as u64) << 32 | fourth as u64);
    // The version nibble, 4, and the variant's two bits, 10.
    let v4 = (high >> 12) & 0xf == 4 && low >> 62 == 0b10;
    v4.then(|| ((high as u128) << 64 | low as u128).to_be_bytes())
}

/// Eight hex digits, any case, as the 32 bits they write; `None` if any is no digit. All
/// eight are checked and converted at once, in one word (bytes below 0x80 never carry
/// into their neighbours in these sums).
fn hex8(digits: [u8; 8]) -> Option<u32> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let x = u64::from_be_bytes(digits);
    if x & HIGHS != 0 {
        return None;
    }
    // The high bit of each byte: whether that byte is at least `low` / more than `high`.
    let at_least = |x: u64, low: u64| x.wrapping_add((0x80 - low) * ONES) & HIGHS;
    let above = |x: u64, high: u64| x.wrapping_add((0x7f - high) * ONES) & HIGHS;
    let decimal = at_least(x, b'0' as u64) & !above(x, b'9' as u64);
    let lower = x | (0x20 * ONES);
    let letter = at_least(lower, b'a' as u64) & !above(lower, b'f' as u64);
    if decimal | letter != HIGHS {
        return None;
    }
    // A digit's value is its low nibble, plus 9 for a letter (0x41 and 0x61 have bit 6).
    let nibbles = (x & (0x0f * ONES)) + ((x >> 6) & ONES) * 9;
    let pairs = (nibbles & 0x0f00_0f00_0f00_0f00) >> 4 | (nibbles & 0x000f_000f_000f_000f);
    let quads = (pairs & 0x00ff_0000_00ff_0000) >> 8 | (pairs & 0x0000_00ff_0000_00ff);
    Some(((quads & 0x0000_ffff_0000_0000) >> 16 | (quads & 0x0000_0000_0000_ffff)) as u32)
}

/// Whether the trace `trace` is sampled at `rate`: its rightmost 56 bits, random in
/// every id weft makes (as W3C Trace Context level 2 and OpenTelemetry's consistent
/// sampling take them), against the rate's share of their range. Proxies at one rate
/// decide alike; a proxy at a higher rate samples every trace a lower one does, and more.
pub fn sampled_at(trace: &TraceId, rate: f64) -> bool {
    if rate >= 1.0 {
        return true;
    }
    if rate.is_nan() || rate <= 0.0 {
        return false;
    }
    let mut low = [0u8; 8];
    low[1..].copy_from_slice(&trace[9..]);
    u64::from_be_bytes(low) < (rate * (1u64 << 56) as f64) as u64
}

thread_local! {
    /// Ids need to be unpredictable enough not to collide, not secret: a small fast
    /// generator per worker, seeded from the operating system's, instead of ChaCha.
    static IDS: std::cell::RefCell<rand::rngs::SmallRng> =
        std::cell::RefCell::new(rand::SeedableRng::from_rng(&mut rand::rng()));
}

/// 128 random bits (drawn as two words: rand samples an array byte by byte).
fn random_u128() -> u128 {
    IDS.with(|ids| ids.borrow_mut().random())
}

/// A new random trace id.
pub fn new_trace_id() -> TraceId {
    loop {
        let id: TraceId = random_u128().to_le_bytes();
        if id != [0; 16] {
            return id;
        }
    }
}

/// A new random span id.
pub fn new_span_id() -> SpanId {
    loop {
        let id: SpanId = (random_u128() as u64).to_le_bytes();
        if id != [0; 8] {
            return id;
        }
    }
}

/// Lowercase hex of `bytes`, as ids are written.
pub fn hex(bytes: &[u8]) -> String {
    let mut text = vec![0u8; bytes.len() * 2];
    write_hex(&mut text, bytes);
    String::from_utf8(text).expect("hex is ASCII")
}

fn header_value(ascii: &[u8]) -> HeaderValue {
    HeaderValue::from_bytes(ascii).expect("hex and dashes are valid header bytes")
}

fn write_hex(out: &mut [u8], bytes: &[u8]) {
    for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&HEX_PAIRS[*byte as usize]);
    }
}

/// Each byte's two lowercase hex digits: one load a byte.
const HEX_PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut table = [[0u8; 2]; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = [DIGITS[b >> 4], DIGITS[b & 0xf]];
        b += 1;
    }
    table
};

/// Each byte's hex value, or 0xff for a byte that is no hex digit. W3C ids are
/// lowercase; B3's may not be.
const HEX: [u8; 256] = {
    let mut table = [0xffu8; 256];
    let mut c = 0;
    while c < 256 {
        table[c] = match c as u8 {
            b'0'..=b'9' => c as u8 - b'0',
            b'a'..=b'f' => c as u8 - b'a' + 10,
            b'A'..=b'F' => c as u8 - b'A' + 10,
            _ => 0xff,
        };
        c += 1;
    }
    table
};

fn hex_byte(two: &[u8]) -> Option<u8> {
    let (high, low) = (HEX[two[0] as usize], HEX[two[1] as usize]);
    ((high | low) & 0xf0 == 0).then_some(high << 4 | low)
}

fn hex_array<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    // One check at the end: any invalid digit sets the high bits of `invalid`.
    let mut invalid = 0u8;
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        let (high, low) = (HEX[pair[0] as usize], HEX[pair[1] as usize]);
        invalid |= high | low;
        *byte = high << 4 | (low & 0x0f);
    }
    (invalid & 0xf0 == 0).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn ids() -> (TraceId, SpanId) {
        (hex_array(TRACE.as_bytes()).unwrap(), hex_array(SPAN.as_bytes()).unwrap())
    }

    #[test]
    fn reads_w3c() {
        let context = extract(&headers(&[("traceparent", &format!("00-{TRACE}-{SPAN}-01"))]));
        assert_eq!(context, Extracted { ids: Some(ids()), sampled: Some(true), b3: None });
        let unsampled = extract(&headers(&[("traceparent", &format!("00-{TRACE}-{SPAN}-00"))]));
        assert_eq!(unsampled.sampled, Some(false));
        // A later version keeps its first four fields; version 00 must be exact.
        let later = extract(&headers(&[("traceparent", &format!("01-{TRACE}-{SPAN}-01-what-comes-next"))]));
        assert_eq!(later.ids, Some(ids()));
        for bad in [
            format!("00-{TRACE}-{SPAN}-01-extra"),
            format!("ff-{TRACE}-{SPAN}-01"),
            format!("00-{}-{SPAN}-01", "0".repeat(32)),
            format!("00-{TRACE}-{}-01", "0".repeat(16)),
            format!("00-{TRACE}-{SPAN}-0x"),
            "00-short".to_string(),
        ] {
            assert_eq!(extract(&headers(&[("traceparent", &bad)])), Extracted::default(), "{bad}");
        }
    }

    #[test]
    fn reads_b3_single_and_multi() {
        let single = extract(&headers(&[("b3", &format!("{TRACE}-{SPAN}-1-05e3ac9a4f6e3b90"))]));
        assert_eq!(single, Extracted { ids: Some(ids()), sampled: Some(true), b3: Some(B3Form::Single) });
        let deferred = extract(&headers(&[("b3", &format!("{TRACE}-{SPAN}"))]));
        assert_eq!(deferred.sampled, None);
        let deny = extract(&headers(&[("b3", "0")]));
        assert_eq!(deny, Extracted { ids: None, sampled: Some(false), b3: Some(B3Form::Single) });
        // A 64-bit trace id is zero-extended.
        let short = extract(&headers(&[("b3", &format!("a3ce929d0e0e4736-{SPAN}-d"))]));
        let (trace, _) = short.ids.unwrap();
        assert_eq!(hex(&trace), "0000000000000000a3ce929d0e0e4736");
        assert_eq!(short.sampled, Some(true), "debug samples");

        let multi =
            extract(&headers(&[("x-b3-traceid", TRACE), ("x-b3-spanid", &SPAN.to_uppercase()), ("x-b3-sampled", "1")]));
        assert_eq!(multi, Extracted { ids: Some(ids()), sampled: Some(true), b3: Some(B3Form::Multi) });
        let debug = extract(&headers(&[("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN), ("x-b3-flags", "1")]));
        assert_eq!(debug.sampled, Some(true));
        // W3C wins when both are present; the B3 header is noted, to be kept current.
        let both = extract(&headers(&[("traceparent", &format!("00-{TRACE}-{SPAN}-00")), ("b3", "1")]));
        assert_eq!(both, Extracted { ids: Some(ids()), sampled: Some(false), b3: Some(B3Form::Single) });
    }

    #[test]
    fn writes_w3c_and_the_b3_form_that_came_in() {
        let (trace, span) = ids();
        let mut map = HeaderMap::new();
        inject(&mut map, &trace, &span, true, None);
        assert_eq!(map["traceparent"], format!("00-{TRACE}-{SPAN}-01").as_str());
        assert!(map.get("b3").is_none());
        inject(&mut map, &trace, &span, false, Some(B3Form::Single));
        assert_eq!(map["traceparent"], format!("00-{TRACE}-{SPAN}-00").as_str());
        assert_eq!(map["b3"], format!("{TRACE}-{SPAN}-0").as_str());
        let mut multi = headers(&[("x-b3-parentspanid", "05e3ac9a4f6e3b90")]);
        inject(&mut multi, &trace, &span, true, Some(B3Form::Multi));
        assert_eq!(multi["x-b3-traceid"], TRACE);
        assert_eq!(multi["x-b3-spanid"], SPAN);
        assert_eq!(multi["x-b3-sampled"], "1");
        assert!(multi.get("x-b3-parentspanid").is_none());
        // What is written reads back the same.
        let back = extract(&multi);
        assert_eq!(back.ids, Some((trace, span)));
    }

    #[test]
    fn request_ids_are_made_once() {
        let mut map = HeaderMap::new();
        let mut scanned = scan(&map);
        assert_eq!(scanned.request_id, None);
        let trace = ensure_request_id(&mut map, &mut scanned);
        let id = map["x-request-id"].to_str().unwrap().to_string();
        assert_eq!(id.len(), 36);
        let dashes: Vec<usize> = id.match_indices('-').map(|(i, _)| i).collect();
        assert_eq!(dashes, [8, 13, 18, 23], "8-4-4-4-12: {id}");
        assert!(id.bytes().all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{id}");
        assert_eq!(&id[14..15], "4", "version 4: {id}");
        assert!("89ab".contains(&id[19..20]), "the RFC 4122 variant: {id}");
        assert_eq!(hex(&trace), id.replace('-', ""), "the trace id is the request id's bits");
        // The next proxy reads the same trace id from the header, and makes none.
        let mut next = scan(&map);
        assert_eq!(next.request_id, Some(trace));
        assert_eq!(ensure_request_id(&mut map.clone(), &mut next), trace);
        let mut other = HeaderMap::new();
        ensure_request_id(&mut other, &mut scan(&HeaderMap::new()));
        assert_ne!(other["x-request-id"], id.as_str(), "ids differ");
    }

    #[test]
    fn other_request_ids_are_hashed_to_a_trace_id() {
        let uuid = "4BF92F35-77B3-4DA6-A3CE-929D0E0E4736";
        assert_eq!(hex(&request_trace_id(uuid.as_bytes())), "4bf92f3577b34da6a3ce929d0e0e4736", "any case");
        // Not version 4 (a version-1 UUID ends in its host's MAC address): hashed.
        let v1 = b"6ba7b810-9dad-11d1-80b4-00c04fd430c8";
        assert_ne!(hex(&request_trace_id(v1)), "6ba7b8109dad11d180b400c04fd430c8");
        let hashed = request_trace_id(b"mine-42");
        assert_eq!(hashed, request_trace_id(b"mine-42"), "the same id, the same trace at every hop");
        assert_ne!(hashed, request_trace_id(b"mine-43"));
        assert_ne!(hashed, [0; 16]);
        // One byte apart, ids differ in their low 56 bits too, where sampling looks.
        assert_ne!(hashed[9..], request_trace_id(b"mine-43")[9..]);
    }

    #[test]
    fn eight_digits_are_read_at_once() {
        assert_eq!(hex8(*b"0123abcd"), Some(0x0123abcd));
        assert_eq!(hex8(*b"DEADbeef"), Some(0xdeadbeef));
        assert_eq!(hex8(*b"ffffffff"), Some(u32::MAX));
        // Every byte in every place: a digit reads as the table says, anything else fails.
        for place in 0..8 {
            for byte in 0..=255u8 {
                let mut digits = *b"00000000";
                digits[place] = byte;
                let expected = (HEX[byte as usize] != 0xff).then(|| (HEX[byte as usize] as u32) << (4 * (7 - place)));
                assert_eq!(hex8(digits), expected, "{byte:#x} at {place}");
            }
        }
    }

    #[test]
    fn sampling_is_decided_alike_from_the_trace_id() {
        let mut at_one_percent = 0;
        for n in 0..20_000u32 {
            let trace = request_trace_id(format!("request-{n}").as_bytes());
            let low = sampled_at(&trace, 0.01);
            let high = sampled_at(&trace, 0.1);
            assert!(!low || high, "a trace sampled at 1% is sampled at 10%");
            assert_eq!(low, sampled_at(&trace, 0.01), "decided alike each time");
            assert!(sampled_at(&trace, 1.0) && !sampled_at(&trace, 0.0) && !sampled_at(&trace, f64::NAN));
            at_one_percent += low as u32;
        }
        // 200 expected; a binomial's standard deviation here is 14.
        assert!((120..=280).contains(&at_one_percent), "{at_one_percent} of 20,000 at 1%");
        // The threshold is on the rightmost 56 bits.
        let mut trace = [0xffu8; 16];
        trace[9..].copy_from_slice(&[0, 0, 0, 0, 0, 0, 1]);
        assert!(sampled_at(&trace, 0.000001));
        trace[9] = 0x80;
        assert!(!sampled_at(&trace, 0.5) && sampled_at(&trace, 0.51));
    }
}
