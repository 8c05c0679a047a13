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

pub mod dns;
pub mod external;
pub mod iptables;
pub mod nft;
pub mod original_dst;
pub mod outbound;
pub mod routes;
pub mod rules;

use std::sync::atomic::{AtomicU32, Ordering};

/// The mark every socket the proxy opens carries while capture is on (0: none). Process
/// wide because capture is: the rules see the whole network namespace, so each of the
/// proxy's connections, from any module, must be told from the application's.
static PROXY_MARK: AtomicU32 = AtomicU32::new(0);

/// Marks every socket the proxy opens from now on with `mark`.
pub fn mark_proxy_sockets(mark: u32) {
    PROXY_MARK.store(mark, Ordering::Relaxed);
}

/// Whether this process may mark its sockets with `mark` (`SO_MARK` needs
/// `CAP_NET_ADMIN`), tried on a socket that is never used.
pub fn can_mark(mark: u32) -> std::io::Result<()> {
    let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    probe.set_mark(mark)
}

/// The mark the proxy's sockets carry, if capture by mark is on.
pub fn proxy_mark() -> Option<u32> {
    match PROXY_MARK.load(Ordering::Relaxed) {
        0 => None,
        mark => Some(mark),
    }
}

/// Capture as installed by a running proxy: its table and routes, removed when dropped
/// (a clean exit, or a start that failed after installing). A proxy killed outright
/// leaves them; the next start replaces the table whole.
pub struct Installed {
    _private: (),
}

impl Installed {
    /// Installs `rules` and the routes for `range`, replacing any table left behind.
    pub fn install(
        rules: &rules::CaptureRules,
        range: weft_model::virtual_ip::VirtualIpRange,
    ) -> Result<Installed, nft::CaptureError> {
        let resolvers: Vec<_> = dns::Upstreams::from_host().resolvers().iter().map(|r| r.ip()).collect();
        routes::install(range, &resolvers)?;
        let backend = match nft::install(rules) {
            Ok(backend) => backend,
            Err(error) => {
                let _ = routes::remove();
                return Err(error);
            }
        };
        tracing::info!(?backend, table = rules::TABLE, outbound = rules.outbound_port, inbound = ?rules.inbound, dns = ?rules.dns_port, "transparent capture installed");
        Ok(Installed { _private: () })
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        match nft::remove().and_then(|_| routes::remove()) {
            Ok(()) => tracing::info!("transparent capture removed"),
            Err(error) => tracing::warn!(%error, "could not remove transparent capture; run `weft capture remove`"),
        }
    }
}
