//! OTLP spans written straight to protobuf bytes, as the export request carries them.
//!
//! Building `opentelemetry_proto`'s structs cost a sampled request about 45,000
//! instructions in its two proxies: two allocations for every attribute (its key and its
//! value), and prost measuring each nested message again at every level of the export
//! request before writing it. Here an attribute is appended to its span's bytes as it is
//! set, a finished span is encoded once into its worker's buffer, and the export request
//! is framed around those bytes by hand. The bytes are the ones prost would write; the
//! tests decode them with prost to hold that so.

use bytes::BufMut;
use prost::encoding::{encoded_len_varint, key_len, WireType};

use crate::trace_context::{SpanId, TraceId};

/// A span's attributes, each encoded as a `Span.attributes` entry.
pub struct Attributes(Vec<u8>);

impl Default for Attributes {
    /// Room for a span's usual attributes, so that they are written without growing.
    fn default() -> Self {
        Attributes(Vec::with_capacity(768))
    }
}

impl Attributes {
    /// A string attribute.
    pub fn text(&mut self, key: &str, value: &str) {
        let any = key_len(1) + delimited_len(value.len());
        self.key_value(key, any, |out| {
            encode_key(1, WireType::LengthDelimited, out);
            encode_varint(value.len() as u64, out);
            out.put_slice(value.as_bytes());
        });
    }

    /// An integer attribute.
    pub fn int(&mut self, key: &str, value: i64) {
        let any = key_len(3) + encoded_len_varint(value as u64);
        self.key_value(key, any, |out| {
            encode_key(3, WireType::Varint, out);
            encode_varint(value as u64, out);
        });
    }

    /// `KeyValue { key, value: AnyValue }`, whose `AnyValue` is `any_len` bytes.
    fn key_value(&mut self, key: &str, any_len: usize, any: impl FnOnce(&mut Vec<u8>)) {
        let out = &mut self.0;
        let pair = key_len(1) + delimited_len(key.len()) + key_len(2) + delimited_len(any_len);
        encode_key(span_field::ATTRIBUTES, WireType::LengthDelimited, out);
        encode_varint(pair as u64, out);
        encode_key(1, WireType::LengthDelimited, out);
        encode_varint(key.len() as u64, out);
        out.put_slice(key.as_bytes());
        encode_key(2, WireType::LengthDelimited, out);
        encode_varint(any_len as u64, out);
        let before = out.len();
        any(out);
        debug_assert_eq!(out.len() - before, any_len);
    }
}

/// `opentelemetry.proto.trace.v1.Span`'s field numbers.
mod span_field {
    pub const TRACE_ID: u32 = 1;
    pub const SPAN_ID: u32 = 2;
    pub const PARENT_SPAN_ID: u32 = 4;
    pub const NAME: u32 = 5;
    pub const KIND: u32 = 6;
    pub const START: u32 = 7;
    pub const END: u32 = 8;
    pub const ATTRIBUTES: u32 = 9;
    pub const STATUS: u32 = 15;
    pub const FLAGS: u32 = 16;
}

/// A span's fields besides its attributes.
pub struct SpanFields<'a> {
    pub trace_id: &'a TraceId,
    pub span_id: &'a SpanId,
    pub parent: Option<&'a SpanId>,
    pub name: &'a str,
    /// `SpanKind` as its number.
    pub kind: i32,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    /// `Status`: its code's number and message.
    pub status: Option<(i32, &'a str)>,
    pub flags: u32,
}

/// Appends a span to `out` as an entry of `ScopeSpans.spans`.
pub fn encode_span(out: &mut Vec<u8>, span: &SpanFields<'_>, attributes: &Attributes) {
    let status_len = span.status.map(|(code, message)| {
        optional_delimited_len(2, message.len())
            + if code != 0 { key_len(3) + encoded_len_varint(code as u64) } else { 0 }
    });
    let length = key_len(span_field::TRACE_ID)
        + delimited_len(16)
        + key_len(span_field::SPAN_ID)
        + delimited_len(8)
        + span.parent.map_or(0, |_| key_len(span_field::PARENT_SPAN_ID) + delimited_len(8))
        + optional_delimited_len(span_field::NAME, span.name.len())
        + if span.kind != 0 { key_len(span_field::KIND) + encoded_len_varint(span.kind as u64) } else { 0 }
        + key_len(span_field::START)
        + 8
        + key_len(span_field::END)
        + 8
        + attributes.0.len()
        + status_len.map_or(0, |len| key_len(span_field::STATUS) + delimited_len(len))
        + if span.flags != 0 { key_len(span_field::FLAGS) + 4 } else { 0 };
    out.reserve(key_len(2) + delimited_len(length));
    encode_key(2, WireType::LengthDelimited, out);
    encode_varint(length as u64, out);
    let before = out.len();
    bytes_field(out, span_field::TRACE_ID, span.trace_id);
    bytes_field(out, span_field::SPAN_ID, span.span_id);
    if let Some(parent) = span.parent {
        bytes_field(out, span_field::PARENT_SPAN_ID, parent);
    }
    if !span.name.is_empty() {
        bytes_field(out, span_field::NAME, span.name.as_bytes());
    }
    if span.kind != 0 {
        encode_key(span_field::KIND, WireType::Varint, out);
        encode_varint(span.kind as u64, out);
    }
    encode_key(span_field::START, WireType::SixtyFourBit, out);
    out.put_u64_le(span.start_unix_nanos);
    encode_key(span_field::END, WireType::SixtyFourBit, out);
    out.put_u64_le(span.end_unix_nanos);
    out.put_slice(&attributes.0);
    if let (Some((code, message)), Some(len)) = (span.status, status_len) {
        encode_key(span_field::STATUS, WireType::LengthDelimited, out);
        encode_varint(len as u64, out);
        if !message.is_empty() {
            bytes_field(out, 2, message.as_bytes());
        }
        if code != 0 {
            encode_key(3, WireType::Varint, out);
            encode_varint(code as u64, out);
        }
    }
    if span.flags != 0 {
        encode_key(span_field::FLAGS, WireType::ThirtyTwoBit, out);
        out.put_u32_le(span.flags);
    }
    debug_assert_eq!(out.len() - before, length);
}

/// An `ExportTraceServiceRequest` of one resource and one scope around `spans`, spans
/// [`encode_span`] wrote; `resource` and `scope` are encoded `Resource` and
/// `InstrumentationScope` messages.
pub fn export_request(resource: &[u8], scope: &[u8], spans: &[u8]) -> Vec<u8> {
    // ScopeSpans { scope: 1, spans: 2 }, in ResourceSpans { resource: 1, scope_spans: 2 },
    // in ExportTraceServiceRequest { resource_spans: 1 }.
    let scope_spans = key_len(1) + delimited_len(scope.len()) + spans.len();
    let resource_spans = key_len(1) + delimited_len(resource.len()) + key_len(2) + delimited_len(scope_spans);
    let mut out = Vec::with_capacity(key_len(1) + delimited_len(resource_spans));
    encode_key(1, WireType::LengthDelimited, &mut out);
    encode_varint(resource_spans as u64, &mut out);
    bytes_field(&mut out, 1, resource);
    encode_key(2, WireType::LengthDelimited, &mut out);
    encode_varint(scope_spans as u64, &mut out);
    bytes_field(&mut out, 1, scope);
    out.put_slice(spans);
    out
}

/// A varint: most are lengths and keys below 128, one byte.
#[inline(always)]
fn encode_varint(value: u64, out: &mut Vec<u8>) {
    if value < 0x80 {
        out.push(value as u8);
    } else {
        prost::encoding::encode_varint(value, out);
    }
}

#[inline(always)]
fn encode_key(tag: u32, wire_type: WireType, out: &mut Vec<u8>) {
    encode_varint(((tag << 3) | wire_type as u32) as u64, out);
}

/// A length-delimited value's length with its length prefix.
fn delimited_len(len: usize) -> usize {
    encoded_len_varint(len as u64) + len
}

/// A length-delimited field's length, or 0 when it is empty (proto3 leaves it out).
fn optional_delimited_len(tag: u32, len: usize) -> usize {
    if len == 0 {
        0
    } else {
        key_len(tag) + delimited_len(len)
    }
}

fn bytes_field(out: &mut Vec<u8>, tag: u32, value: &[u8]) {
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(value.len() as u64, out);
    out.put_slice(value);
}

/// The gRPC codec of an export whose request is already encoded: the bytes go as they
/// are, and the answer (an `ExportTraceServiceResponse`, whose partial-success counts the
/// proxy has no use for) is read and let go.
#[derive(Clone, Copy, Default)]
pub struct EncodedExport;

impl tonic::codec::Codec for EncodedExport {
    type Encode = Vec<u8>;
    type Decode = ();
    type Encoder = EncodedExport;
    type Decoder = EncodedExport;

    fn encoder(&mut self) -> EncodedExport {
        EncodedExport
    }

    fn decoder(&mut self) -> EncodedExport {
        EncodedExport
    }
}

impl tonic::codec::Encoder for EncodedExport {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for EncodedExport {
    type Item = ();
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<()>, tonic::Status> {
        bytes::Buf::advance(src, bytes::Buf::remaining(src));
        Ok(Some(()))
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::{
        collector::trace::v1::ExportTraceServiceRequest,
        common::v1::{any_value::Value, AnyValue, InstrumentationScope, KeyValue},
        resource::v1::Resource,
        trace::v1::{Span, Status},
    };
    use prost::Message;

    use super::*;

    fn attribute(key: &str, value: Value) -> KeyValue {
        KeyValue { key: key.into(), value: Some(AnyValue { value: Some(value) }), ..Default::default() }
    }

    #[test]
    fn spans_decode_as_prost_encodes_them() {
        let mut attributes = Attributes::default();
        attributes.text("http.request.method", "GET");
        attributes.text("url.path", &"/long".repeat(40));
        attributes.text("empty", "");
        attributes.int("http.response.status_code", 503);
        attributes.int("negative", -7);
        let (trace, span, parent) = ([7u8; 16], [9u8; 8], [3u8; 8]);
        let fields = SpanFields {
            trace_id: &trace,
            span_id: &span,
            parent: Some(&parent),
            name: "GET /reviews",
            kind: 3,
            start_unix_nanos: 1_764_929_045_123_456_789,
            end_unix_nanos: 1_764_929_045_124_000_000,
            status: Some((2, "the proxy answered: no-endpoints")),
            flags: 0x301,
        };
        let mut spans = Vec::new();
        encode_span(&mut spans, &fields, &attributes);
        // A root span, no status, kind unspecified: fields proto3 leaves out.
        let root = SpanFields { parent: None, kind: 0, status: None, flags: 0, name: "", ..fields };
        encode_span(&mut spans, &root, &Attributes::default());

        let resource = Resource {
            attributes: vec![attribute("service.name", Value::StringValue("web".into()))],
            ..Default::default()
        };
        let scope = InstrumentationScope { name: "weft-proxy".into(), version: "0.1.0".into(), ..Default::default() };
        let request = export_request(&resource.encode_to_vec(), &scope.encode_to_vec(), &spans);
        let decoded = ExportTraceServiceRequest::decode(request.as_slice()).expect("a valid export request");

        let resource_spans = &decoded.resource_spans[0];
        assert_eq!(resource_spans.resource.as_ref(), Some(&resource));
        assert_eq!(resource_spans.scope_spans[0].scope.as_ref(), Some(&scope));
        let got = &resource_spans.scope_spans[0].spans;
        let expected = Span {
            trace_id: trace.to_vec(),
            span_id: span.to_vec(),
            parent_span_id: parent.to_vec(),
            name: "GET /reviews".into(),
            kind: 3,
            start_time_unix_nano: fields.start_unix_nanos,
            end_time_unix_nano: fields.end_unix_nanos,
            attributes: vec![
                attribute("http.request.method", Value::StringValue("GET".into())),
                attribute("url.path", Value::StringValue("/long".repeat(40))),
                attribute("empty", Value::StringValue(String::new())),
                attribute("http.response.status_code", Value::IntValue(503)),
                attribute("negative", Value::IntValue(-7)),
            ],
            status: Some(Status { message: "the proxy answered: no-endpoints".into(), code: 2 }),
            flags: 0x301,
            ..Default::default()
        };
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], expected);
        assert_eq!(
            got[1],
            Span {
                trace_id: trace.to_vec(),
                span_id: span.to_vec(),
                start_time_unix_nano: fields.start_unix_nanos,
                end_time_unix_nano: fields.end_unix_nanos,
                ..Default::default()
            }
        );
        // Byte for byte what prost writes for the same request.
        assert_eq!(request, decoded.encode_to_vec());
    }
}
