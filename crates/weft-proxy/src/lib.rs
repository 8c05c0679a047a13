//! weft's data plane: the sidecar proxy that carries one service instance's traffic.
//!
//! The proxy serves from an immutable [`state::ServingConfig`] that is swapped whole
//! when configuration changes; what it learns at run time (latency estimates, in-flight
//! counts, ejections, pooled connections, retry budgets) is kept per endpoint or per
//! Service, keyed by name or address, and survives every swap.
//!
//! Modules follow the request: [`listener`] accepts, [`detect`] tells protocols apart,
//! [`outbound`] and [`inbound`] are the two directions, [`balance`] and [`endpoint`] pick
//! where to send, [`retry`] and [`limits`] guard the send, [`pool`] and [`transport`]
//! carry it, [`errors`] turns failures into responses, [`protocol_errors`] names what hostile
//! or broken peers did, [`metrics`] counts everything for Prometheus, [`telemetry`] for the control
//! plane's golden signals; [`trace_context`] carries traces across hops and [`spans`]
//! records and exports this proxy's part of them; [`access_log`] writes a JSON line per
//! request where operators asked for one; [`tap`] streams the requests an operator is
//! watching, with why the proxy did what it did; [`capture`] puts an unchanged
//! application's traffic through the proxy.

#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod app;
pub mod balance;
mod batched_writes;
pub mod body;
pub mod capture;
pub mod detect;
pub mod discovery;
pub mod endpoint;
pub mod errors;
pub mod forward;
pub mod health;
pub mod identity;
pub mod inbound;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod outbound;
pub mod pool;
pub mod protocol_errors;
pub mod proxy;
pub mod reload;
pub mod retry;
pub mod revocation;
pub mod settings;
pub mod span_wire;
pub mod spans;
pub mod state;
pub mod tap;
pub mod tcp;
pub mod telemetry;
pub mod trace_context;
pub mod transport;
pub mod word_hash;

pub use proxy::{run, BoundPorts, ProxyError};
pub use settings::{ProxySettings, UpstreamListener};
