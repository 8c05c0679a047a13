//! The wire protocol between weft proxies and the control plane, generated from
//! `proto/weft/discovery/v1/discovery.proto` and `proto/weft/telemetry/v1/telemetry.proto`,
//! and the telemetry types both sides compute with (sketch, signals). Both sides link
//! this crate and nothing of each other.

pub mod channel;
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
