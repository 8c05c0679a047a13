//! The `spec` of each resource kind, with serde shapes that mirror the YAML users write.
//!
//! Every struct denies unknown fields: a field weft does not implement is refused, never
//! silently ignored. Fields that exist upstream (Gateway API) but are not implemented yet
//! are declared and refused by validation with a message that says so.

mod authorization;
mod observability;
mod policy;
mod route;
mod service;

pub use authorization::*;
pub use observability::*;
pub use policy::*;
pub use route::*;
pub use service::*;
