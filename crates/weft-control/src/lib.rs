//! weft's control plane: the desired state (resources in a durable store), and the HTTP
//! API operators drive it with.
//!
//! [`store`] keeps resources with revisions behind one trait; [`catalog`] is the only
//! writer and holds the parsed state every reader works from; [`api`] serves it as JSON;
//! [`describe`] explains one Service; [`kinds`] is the vocabulary of kind names.
//! [`registry`] keeps the workloads proxies register, [`cluster`] what replicas sharing
//! one etcd agree on (presence, leadership), [`views`] compiles each proxy's view and
//! [`discovery`] streams it. [`control_tls`] is the TLS listener both run on, and
//! [`signing_service`] signs proxies' certificates there; [`telemetry`] takes
//! proxies' reports there and merges them into the golden signals the API serves;
//! [`tap`] holds operators' tap sessions and streams their proxies' events; [`sessions`]
//! are the dashboard's logins, and [`dashboard`] its pages; [`preview`] is what a dry
//! run says a change would touch.

#![forbid(unsafe_code)]

pub mod api;
pub mod api_tls;
pub mod audit;
pub mod authz_matrix;
pub mod ca;
pub mod catalog;
pub mod cluster;
pub mod control;
pub mod control_tls;
pub mod dashboard;
pub mod describe;
pub mod discovery;
pub mod join_tokens;
pub mod kinds;
pub mod metrics;
pub mod operator_tokens;
pub mod preview;
pub mod registry;
pub mod replicas;
pub mod revocations;
pub mod sessions;
pub mod signing;
pub mod signing_service;
pub mod store;
pub mod tap;
pub mod telemetry;
pub mod views;
pub mod virtual_ips;

pub use ca::CaSettings;
pub use control::{default_data_dir, run, ControlError, ControlSettings, EtcdTls, StoreSpec};
