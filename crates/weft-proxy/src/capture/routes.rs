//! The routes that make Services' virtual IPs reachable. A connection to an address
//! with no route fails (`ENETUNREACH`) before the NAT rules ever see it, so a namespace
//! without a default route needs one for the virtual-IP range and its IPv6 twins. It
//! points at `lo` (the rules redirect the connection to the proxy before it leaves), and
//! is added only when nothing routes the range yet, marked with weft's own route
//! protocol number so that removal deletes exactly what capture added.

use std::{net::Ipv4Addr, process::Command};

use weft_model::virtual_ip::{ipv6_twin, VirtualIpRange, IPV6_PREFIX};

use super::nft::CaptureError;

/// The route protocol number capture's routes carry (`proto 77`, an unassigned value).
pub const ROUTE_PROTOCOL: &str = "77";

fn ip(arguments: &[&str]) -> Result<std::process::Output, CaptureError> {
    Command::new("ip").args(arguments).output().map_err(|error| CaptureError::Route(format!("ip: {error}")))
}

/// Adds routes to `lo` for `range` and the IPv6 twins, and for each of `resolvers` (the
/// application's DNS servers, whose queries the rules redirect to the responder), where
/// none exists: a namespace without a default route still resolves Services' names.
pub fn install(range: VirtualIpRange, resolvers: &[std::net::IpAddr]) -> Result<(), CaptureError> {
    for resolver in resolvers.iter().filter(|r| !r.is_loopback()) {
        let (family, prefix) = if resolver.is_ipv4() { ("-4", 32) } else { ("-6", 128) };
        if !ip(&[family, "route", "get", &resolver.to_string()])?.status.success() {
            let _ = ip(&[
                family,
                "route",
                "replace",
                &format!("{resolver}/{prefix}"),
                "dev",
                "lo",
                "proto",
                ROUTE_PROTOCOL,
            ])?;
        }
    }
    let probe = range.to_string();
    let first: Ipv4Addr = probe.split('/').next().and_then(|a| a.parse().ok()).unwrap_or(Ipv4Addr::UNSPECIFIED);
    let probe_v4 = Ipv4Addr::from(u32::from(first) + 1).to_string();
    let routes = [
        ("-4", probe.clone(), probe_v4),
        ("-6", format!("{IPV6_PREFIX}/96"), ipv6_twin(Ipv4Addr::from(u32::from(first) + 1)).to_string()),
    ];
    for (family, prefix, probe) in routes {
        if ip(&[family, "route", "get", &probe])?.status.success() {
            continue;
        }
        let added = ip(&[family, "route", "replace", &prefix, "dev", "lo", "proto", ROUTE_PROTOCOL])?;
        // A namespace with IPv6 off has no IPv6 routes to add: IPv4 is enough there.
        if !added.status.success() && family == "-4" {
            return Err(CaptureError::Route(String::from_utf8_lossy(&added.stderr).trim().to_string()));
        }
    }
    Ok(())
}

/// Deletes the routes capture added, and nothing else.
pub fn remove() -> Result<(), CaptureError> {
    for family in ["-4", "-6"] {
        ip(&[family, "route", "flush", "proto", ROUTE_PROTOCOL])?;
    }
    Ok(())
}
