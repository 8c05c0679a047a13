//! Transparent capture: the application's TCP and DNS put through its sidecar with no
//! change to the application, as Linkerd's and Istio's init containers do, on any Linux
//! host or network namespace. [`rules`] says what is redirected where, as one nftables
//! table of weft's own; [`nft`] installs and removes that table; [`original_dst`] reads
//! where a redirected connection was going, and marks the proxy's own sockets.
//!
//! Which connections are the proxy's own, and so never redirected back into it: those
//! on sockets it marks ([`rules::ProxyTraffic::Mark`], `SO_MARK`, which needs
//! `CAP_NET_ADMIN`, as installing the table does), or, with the application run as
//! another user, every connection of the proxy's uid ([`rules::ProxyTraffic::Uid`]).

pub mod nft;
pub mod original_dst;
pub mod rules;
