//! The wire protocol between weft proxies and the control plane, generated from
//! `proto/weft/discovery/v1/discovery.proto`, `proto/weft/telemetry/v1/telemetry.proto` and
//! `proto/weft/tap/v1/tap.proto`,
//! and the types both sides compute with (telemetry's sketch and signals, tap's rate). Both sides link
//! this crate and nothing of each other.

pub mod channel;
pub mod rate;
pub mod signals;
pub mod sketch;

/// `weft.discovery.v1`: the discovery stream, signing, and replicas asking each other.
#[allow(clippy::all, missing_docs)]
pub mod discovery {
    tonic::include_proto!("weft.discovery.v1");
}

/// `weft.telemetry.v1`: what proxies report of the requests they carried.
#[allow(clippy::all, missing_docs)]
pub mod telemetry {
    tonic::include_proto!("weft.telemetry.v1");
}

/// `weft.tap.v1`: live requests, streamed from proxies while an operator taps.
#[allow(clippy::all, missing_docs)]
pub mod tap {
    tonic::include_proto!("weft.tap.v1");

    /// Headers one session may name.
    pub const MAX_HEADERS: usize = 16;
}
