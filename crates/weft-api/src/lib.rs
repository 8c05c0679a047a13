//! The wire protocol between weft proxies and the control plane, generated from
//! `proto/weft/discovery/v1/discovery.proto`. Both sides link this crate and nothing of
//! each other.

pub mod channel;
pub mod sketch;

/// `weft.discovery.v1`: the discovery stream, signing, and replicas asking each other.
#[allow(clippy::all, missing_docs)]
pub mod discovery {
    tonic::include_proto!("weft.discovery.v1");
}
