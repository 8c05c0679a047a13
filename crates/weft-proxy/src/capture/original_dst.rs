//! The two socket options capture rests on: where a redirected connection was going
//! (`SO_ORIGINAL_DST`, which NAT leaves on the accepted socket), and the mark that keeps
//! the proxy's own connections out of the rules (`SO_MARK`). Both through socket2, so
//! the proxy stays free of `unsafe`.

use std::{io, net::SocketAddr, os::fd::AsFd};

use socket2::SockRef;

/// Where the connection accepted on `socket` was going before the capture rules sent it
/// to the proxy. A connection made to the listener directly reports the listener's own
/// address: compare with it to tell one from the other.
pub fn original_destination(socket: &impl AsFd) -> io::Result<SocketAddr> {
    let socket = SockRef::from(socket);
    let local = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an IP socket"))?;
    // A dual-stack listener sees an IPv4 client as an IPv4-mapped IPv6 address; its NAT
    // entry is IPv4's.
    let ipv4 = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().is_some(),
    };
    let original = if ipv4 { socket.original_dst_v4()? } else { socket.original_dst_v6()? };
    original
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "the original destination is not an IP address"))
}

/// Marks `socket` as the proxy's own, before it connects, so that capture's rules let
/// its connection through. Needs `CAP_NET_ADMIN`.
pub fn mark_as_proxy(socket: &impl AsFd, mark: u32) -> io::Result<()> {
    SockRef::from(socket).set_mark(mark)
}

/// The port a connection redirected to this listener was made to; `None` for one made
/// to the listener itself.
pub fn redirected_port(socket: &impl AsFd) -> Option<u16> {
    let original = original_destination(socket).ok()?;
    let local = SockRef::from(socket).local_addr().ok()?.as_socket()?;
    (original != local && original.port() != local.port()).then_some(original.port())
}
