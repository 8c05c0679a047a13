//! weft's resource model: the YAML documents users write, their validation, and the
//! compiled snapshot a proxy serves from.
//!
//! Everything here is plain data and pure functions, shared by the proxy and (later) the
//! control plane, so that a document is judged by exactly the same code wherever it is
//! applied. Parsing refuses malformed documents with the file, document index, kind/name
//! and field path; compiling never fails on a dangling reference, which is recorded as
//! unresolved instead.

#![forbid(unsafe_code)]

pub mod authz;
pub mod cidr;
pub mod duration;
pub mod locate;
pub mod matching;
pub mod parse;
pub mod resource;
pub mod snapshot;
pub mod spec;
pub mod spiffe;
mod validate;
pub mod virtual_ip;

pub use duration::GoDuration;
pub use parse::{parse_documents, parse_with_documents, ConfigError, ConfigErrors, ParsedDocument};
pub use resource::{Metadata, Resource, ResourceKind};
pub use snapshot::{compile, Snapshot};
pub use spiffe::{SpiffeError, SpiffeId, TrustDomain};

/// The namespace a resource or proxy lives in when none is given, as in Kubernetes.
pub const DEFAULT_NAMESPACE: &str = "default";
