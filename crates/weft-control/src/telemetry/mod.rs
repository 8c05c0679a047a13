//! Golden signals, aggregated: what every proxy reports of the traffic it carried,
//! merged into sliding windows and served for `weft stat` and the dashboard, with no
//! Prometheus needed.
//!
//! [`window`] is time (slots, rings, windows), [`series`] what is kept per series and
//! how a proxy's row becomes one, [`aggregator`] one replica's store of them, and
//! [`service`] the gRPC side: proxies' reports, and replicas asking each other so that
//! any replica answers for the whole mesh. The HTTP API's views over them are
//! `api/stat.rs`.

pub mod aggregator;
pub mod series;
pub mod service;
pub mod window;

pub use aggregator::{Aggregator, WindowSeries};
