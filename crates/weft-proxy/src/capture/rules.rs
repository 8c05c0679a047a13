//! What capture redirects: one nftables table of weft's own, `inet weft` (IPv4 and IPv6
//! alike), with two NAT chains:
//! - `output`, the application's outbound connections: DNS (UDP and TCP port 53) to the
//!   proxy's DNS responder, which a proxy that is not root could not bind on port 53, and
//!   every other TCP connection to the outbound listener; except the proxy's own
//!   connections, loopback, and the destinations, ports and CIDRs listed;
//! - `prerouting`, connections arriving from other hosts for the application's ports: to
//!   the proxy's captured-inbound listener, except to the ports listed and the proxy's
//!   own (the mesh inbound port among them).
//!
//! A NAT chain turns on connection tracking for every flow of the namespace, and that is
//! most of what capture costs: a conntrack lookup on every packet. Only the flows the
//! chains rewrite need it, so two `raw` chains (`untracked_prerouting`,
//! `untracked_output`) take the others out before conntrack sees them: the mesh's mutual
//! TLS connections on the mesh inbound port, the proxy's own connections (by mark, or by
//! uid on the mesh port), and loopback TCP that no rule rewrites (the proxy and its
//! application talking over `127.0.0.1`). That is why captured inbound connections have
//! a listener of their own: the replies on the mesh port, untracked, must never need
//! their addresses rewritten back.
//!
//! The table is replaced whole in one transaction (declare it, delete it, write it), so
//! that installing twice, or again after a proxy killed without cleaning up, leaves
//! exactly one; removing deletes that table and touches nothing else of the ruleset.

use std::{
    fmt::{self, Write as _},
    net::SocketAddr,
};

/// The table's family and name, as nft writes them.
pub const TABLE: &str = "inet weft";

/// The mark the proxy puts on its own sockets by default: "weft" in ASCII, a value no
/// common tool (kube-proxy, Calico, Cilium, Istio) uses.
pub const DEFAULT_MARK: u32 = 0x7765_6674;

/// How the rules tell the proxy's own connections from the application's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyTraffic {
    /// Sockets the proxy marked (`SO_MARK`): the application may run as the same user.
    Mark(u32),
    /// Everything the proxy's user sends: the application must run as another user.
    Uid(u32),
}

pub use weft_model::cidr::Cidr;

/// Everything the table is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureRules {
    /// Where the application's outbound TCP goes: the proxy's outbound listener.
    pub outbound_port: u16,
    /// The proxy's inbound ports (`None`: arriving connections are not captured).
    pub inbound: Option<InboundPorts>,
    /// Where the application's DNS goes; `None` leaves DNS alone.
    pub dns_port: Option<u16>,
    pub proxy_traffic: ProxyTraffic,
    /// Inbound ports never redirected: the proxy's own that others reach directly
    /// (admin, for Prometheus) and what the operator lists.
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound ports never redirected (`--capture-exclude-ports`).
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destinations never redirected (`--capture-exclude-cidrs`).
    pub exclude_cidrs: Vec<Cidr>,
    /// Exact destinations never redirected: the control plane's addresses.
    pub exclude_destinations: Vec<SocketAddr>,
    /// Whether the `raw` chains take the flows no rule rewrites out of connection
    /// tracking; off only for a kernel without nftables' `socket` expression.
    pub untrack: bool,
}

/// The two ports connections arrive at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InboundPorts {
    /// Where other proxies connect (mutual TLS) and unmeshed callers that know the
    /// mesh: never redirected, never tracked.
    pub mesh: u16,
    /// Where the rules send connections made to the application's own ports.
    pub captured: u16,
}

/// `{ a, b }` as nft writes a set.
fn set<T: fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let items: Vec<String> = items.into_iter().map(|item| item.to_string()).collect();
    format!("{{ {} }}", items.join(", "))
}

impl CaptureRules {
    /// The nft script that replaces the table with these rules, in one transaction.
    pub fn script(&self) -> String {
        let mut output = String::new();
        let mut rule = |text: String| {
            let _ = writeln!(output, "        {text}");
        };
        rule(match self.proxy_traffic {
            ProxyTraffic::Mark(mark) => format!("meta mark {mark:#x} return"),
            ProxyTraffic::Uid(uid) => format!("meta skuid {uid} return"),
        });
        // Before loopback is left alone: a stub resolver on 127.0.0.53 is asked too.
        if let Some(dns) = self.dns_port {
            rule(format!("udp dport 53 redirect to :{dns}"));
            rule(format!("tcp dport 53 redirect to :{dns}"));
        }
        rule("ip daddr 127.0.0.0/8 return".into());
        rule("ip6 daddr ::1 return".into());
        for destination in &self.exclude_destinations {
            let family = if destination.is_ipv4() { "ip" } else { "ip6" };
            rule(format!("{family} daddr {} tcp dport {} return", destination.ip(), destination.port()));
        }
        if !self.exclude_outbound_ports.is_empty() {
            rule(format!("tcp dport {} return", set(&self.exclude_outbound_ports)));
        }
        for (family, cidrs) in [
            ("ip", self.exclude_cidrs.iter().filter(|c| c.is_ipv4()).collect::<Vec<_>>()),
            ("ip6", self.exclude_cidrs.iter().filter(|c| !c.is_ipv4()).collect()),
        ] {
            if !cidrs.is_empty() {
                rule(format!("{family} daddr {} return", set(cidrs)));
            }
        }
        rule(format!("meta l4proto tcp redirect to :{}", self.outbound_port));

        // Without an inbound listener (a workload that only calls out), arriving
        // connections are left alone.
        let prerouting = match self.inbound {
            None => String::new(),
            Some(inbound) => {
                let mut kept: Vec<u16> = self.exclude_inbound_ports.clone();
                kept.extend([inbound.mesh, inbound.captured]);
                kept.sort_unstable();
                kept.dedup();
                format!(
                    "    chain prerouting {{\n        type nat hook prerouting priority -100; policy accept;\n        \
                     iifname \"lo\" return\n        tcp dport {} return\n        meta l4proto tcp redirect to \
                     :{}\n    }}\n",
                    set(kept),
                    inbound.captured
                )
            }
        };
        let untracked = if self.untrack { self.untracked_chains() } else { String::new() };
        format!(
            "table {TABLE}\ndelete table {TABLE}\ntable {TABLE} {{\n{untracked}    chain output {{\n        type nat hook output priority -100; policy accept;\n{output}    }}\n{prerouting}}}\n"
        )
    }

    /// The `raw` chains that keep connection tracking off the flows no rule rewrites.
    /// Each rule must only ever match packets whose addresses nothing rewrites, in either
    /// direction: a reply of a redirected connection that skipped conntrack would reach
    /// the application from the proxy's port instead of the address it called.
    fn untracked_chains(&self) -> String {
        let mut prerouting = Vec::new();
        let mut output = Vec::new();
        // Loopback packets were tracked, or not, on their way out: nothing to decide again.
        prerouting.push("iif \"lo\" return".to_string());
        if let Some(inbound) = self.inbound {
            // The mesh port is never a redirect's target, so both directions are safe.
            prerouting.push(format!("tcp dport {} notrack", inbound.mesh));
            if let ProxyTraffic::Uid(uid) = self.proxy_traffic {
                output.push(format!("meta skuid {uid} tcp sport {} notrack", inbound.mesh));
            }
        }
        if let ProxyTraffic::Mark(mark) = self.proxy_traffic {
            // The proxy's own connections and, since the mesh listener is marked too,
            // its replies on the mesh port; the packets coming back to the proxy's
            // sockets are known by the socket they arrive at.
            output.push(format!("meta mark {mark:#x} notrack"));
            prerouting.push(format!("socket mark {mark:#x} notrack"));
        }
        // Loopback TCP is never rewritten except what goes to port 53, and the replies of
        // redirected connections, which come from the ports redirects lead to.
        let mut redirect_targets = vec![self.outbound_port];
        redirect_targets.extend(self.dns_port);
        redirect_targets.extend(self.inbound.map(|inbound| inbound.captured));
        redirect_targets.sort_unstable();
        redirect_targets.dedup();
        let targets = set(&redirect_targets);
        output.push(format!("ip daddr 127.0.0.0/8 tcp sport != {targets} tcp dport != 53 notrack"));
        output.push(format!("ip6 daddr ::1 tcp sport != {targets} tcp dport != 53 notrack"));
        let chain = |name: &str, hook: &str, rules: Vec<String>| {
            let mut text =
                format!("    chain {name} {{\n        type filter hook {hook} priority raw; policy accept;\n");
            for rule in rules {
                let _ = writeln!(text, "        {rule}");
            }
            text + "    }\n"
        };
        chain("untracked_prerouting", "prerouting", prerouting) + &chain("untracked_output", "output", output)
    }
}

/// The nft script that removes the table, whether or not it is there.
pub fn removal_script() -> String {
    format!("table {TABLE}\ndelete table {TABLE}\n")
}

/// Rules with one of everything, for tests.
#[cfg(test)]
pub(crate) fn example() -> CaptureRules {
    CaptureRules {
        outbound_port: 15001,
        inbound: Some(InboundPorts { mesh: 15006, captured: 15007 }),
        dns_port: Some(15053),
        proxy_traffic: ProxyTraffic::Mark(DEFAULT_MARK),
        exclude_inbound_ports: vec![15000, 22],
        exclude_outbound_ports: vec![5432],
        exclude_cidrs: vec!["10.96.0.0/12".parse().unwrap(), "fd00::/8".parse().unwrap()],
        exclude_destinations: vec!["10.0.0.5:15010".parse().unwrap()],
        untrack: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> CaptureRules {
        example()
    }

    #[test]
    fn the_table_is_replaced_whole_and_the_proxy_is_left_out_first() {
        let script = rules().script();
        assert!(script.starts_with("table inet weft\ndelete table inet weft\ntable inet weft {"), "{script}");
        let output: Vec<&str> = script.lines().map(str::trim).skip_while(|l| !l.starts_with("chain output")).collect();
        assert_eq!(
            &output[2..11],
            [
                "meta mark 0x77656674 return",
                "udp dport 53 redirect to :15053",
                "tcp dport 53 redirect to :15053",
                "ip daddr 127.0.0.0/8 return",
                "ip6 daddr ::1 return",
                "ip daddr 10.0.0.5 tcp dport 15010 return",
                "tcp dport { 5432 } return",
                "ip daddr { 10.96.0.0/12 } return",
                "ip6 daddr { fd00::/8 } return",
            ]
        );
        assert!(script.contains("meta l4proto tcp redirect to :15001"));
        assert!(
            script
                .contains("tcp dport { 22, 15000, 15006, 15007 } return\n        meta l4proto tcp redirect to :15007"),
            "{script}"
        );
        let by_uid = CaptureRules { proxy_traffic: ProxyTraffic::Uid(1337), dns_port: None, ..rules() }.script();
        assert!(by_uid.contains("meta skuid 1337 return") && !by_uid.contains("udp dport 53"), "{by_uid}");
        assert_eq!(removal_script(), "table inet weft\ndelete table inet weft\n");
        let outbound_only = CaptureRules { inbound: None, ..rules() }.script();
        assert!(!outbound_only.contains("chain prerouting"), "{outbound_only}");
    }

    /// The lines of `chain` in `script`.
    fn chain<'a>(script: &'a str, chain: &str) -> Vec<&'a str> {
        let lines = script.lines().map(str::trim).skip_while(|l| *l != format!("chain {chain} {{"));
        lines.skip(2).take_while(|l| *l != "}").collect()
    }

    #[test]
    fn only_flows_no_rule_rewrites_are_left_untracked() {
        let script = rules().script();
        assert_eq!(
            chain(&script, "untracked_prerouting"),
            ["iif \"lo\" return", "tcp dport 15006 notrack", "socket mark 0x77656674 notrack"],
            "{script}"
        );
        // Replies from the ports redirects lead to (outbound, DNS, captured inbound) stay
        // tracked, so NAT rewrites their addresses back.
        assert_eq!(
            chain(&script, "untracked_output"),
            [
                "meta mark 0x77656674 notrack",
                "ip daddr 127.0.0.0/8 tcp sport != { 15001, 15007, 15053 } tcp dport != 53 notrack",
                "ip6 daddr ::1 tcp sport != { 15001, 15007, 15053 } tcp dport != 53 notrack",
            ]
        );
        // By uid, only the mesh port's replies: the proxy's uid also owns the sockets
        // redirected connections were accepted on.
        let by_uid = CaptureRules { proxy_traffic: ProxyTraffic::Uid(1337), ..rules() }.script();
        assert_eq!(chain(&by_uid, "untracked_prerouting")[1..], ["tcp dport 15006 notrack"]);
        assert_eq!(chain(&by_uid, "untracked_output")[0], "meta skuid 1337 tcp sport 15006 notrack");
        let tracked = CaptureRules { untrack: false, ..rules() }.script();
        assert!(!tracked.contains("notrack"), "{tracked}");
    }

    #[test]
    fn cidrs_are_checked() {
        assert_eq!("10.1.2.3".parse::<Cidr>().unwrap().to_string(), "10.1.2.3/32");
        assert_eq!("fd00::/8".parse::<Cidr>().unwrap().to_string(), "fd00::/8");
        assert!("10.0.0.0/33".parse::<Cidr>().unwrap_err().contains("0 to 32"));
        assert!("example.com/8".parse::<Cidr>().unwrap_err().contains("is not a CIDR"));
    }
}
