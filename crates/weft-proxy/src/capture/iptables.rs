//! Capture's rules through `iptables-nft`, for hosts that have it but not `nft` (minimal
//! images often ship only iptables, whose `-nft` variant programs the same nf_tables
//! kernel API). The same redirects as [`super::rules`], in chains of weft's own
//! (`WEFT_OUTPUT`, `WEFT_PREROUTING`) of the `nat` table, IPv4 and IPv6 alike, jumped to
//! from the built-in chains.
//!
//! Without nft's `socket` expression the flows capture never rewrites cannot be left
//! untracked safely (see [`super::rules`]): every flow of the namespace is tracked, which
//! costs CPU on each packet. Each change goes through `iptables-nft-restore`, one
//! transaction per table and family; removing deletes weft's chains and jumps, and the
//! `nat` table itself when nothing else is left in it, so the ruleset is as before.

use std::{
    io::Write,
    process::{Command, Stdio},
};

use super::{
    nft::CaptureError,
    rules::{CaptureRules, ProxyTraffic},
};

/// The chains capture adds; nothing else in the table is touched.
const CHAINS: [(&str, &str); 2] = [("WEFT_OUTPUT", "OUTPUT"), ("WEFT_PREROUTING", "PREROUTING")];
/// The built-in chains of `nat`, which `iptables-nft-save` lists even when empty.
const BUILT_IN: [&str; 4] = ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"];

/// IPv4 or IPv6: each has its own command and table.
#[derive(Clone, Copy, Debug)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-nft-restore",
            Family::V6 => "ip6tables-nft-restore",
        }
    }

    fn save(self) -> &'static str {
        match self {
            Family::V4 => "iptables-nft-save",
            Family::V6 => "ip6tables-nft-save",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }
}

/// Whether `iptables-nft-restore` can be run.
pub fn available() -> bool {
    Command::new(Family::V4.restore()).arg("--version").output().is_ok_and(|o| o.status.success())
}

/// The `iptables-nft-restore --noflush` input that adds capture's chains for `family`.
fn script(rules: &CaptureRules, family: Family) -> String {
    let mut output = vec![match rules.proxy_traffic {
        ProxyTraffic::Mark(mark) => format!("-m mark --mark {mark:#x} -j RETURN"),
        ProxyTraffic::Uid(uid) => format!("-m owner --uid-owner {uid} -j RETURN"),
    }];
    // Before loopback is left alone: a stub resolver on 127.0.0.53 is asked too.
    if let Some(dns) = rules.dns_port {
        output.push(format!("-p udp --dport 53 -j REDIRECT --to-ports {dns}"));
        output.push(format!("-p tcp --dport 53 -j REDIRECT --to-ports {dns}"));
    }
    output.push(format!("-d {} -j RETURN", family.loopback()));
    for destination in &rules.exclude_destinations {
        if destination.is_ipv4() == matches!(family, Family::V4) {
            output.push(format!("-d {} -p tcp --dport {} -j RETURN", destination.ip(), destination.port()));
        }
    }
    // multiport takes at most 15 ports.
    for ports in rules.exclude_outbound_ports.chunks(15) {
        output.push(format!("-p tcp -m multiport --dports {} -j RETURN", join(ports)));
    }
    for cidr in rules.exclude_cidrs.iter().filter(|c| c.is_ipv4() == matches!(family, Family::V4)) {
        output.push(format!("-d {cidr} -j RETURN"));
    }
    output.push(format!("-p tcp -j REDIRECT --to-ports {}", rules.outbound_port));

    let mut text = String::from("*nat\n:WEFT_OUTPUT - [0:0]\n");
    let prerouting = rules.inbound.map(|inbound| {
        let mut kept: Vec<u16> = rules.exclude_inbound_ports.clone();
        kept.extend([inbound.mesh, inbound.captured]);
        kept.sort_unstable();
        kept.dedup();
        let mut chain = vec!["-i lo -j RETURN".to_string()];
        for ports in kept.chunks(15) {
            chain.push(format!("-p tcp -m multiport --dports {} -j RETURN", join(ports)));
        }
        chain.push(format!("-p tcp -j REDIRECT --to-ports {}", inbound.captured));
        chain
    });
    if prerouting.is_some() {
        text.push_str(":WEFT_PREROUTING - [0:0]\n");
    }
    for rule in output {
        text.push_str(&format!("-A WEFT_OUTPUT {rule}\n"));
    }
    for rule in prerouting.iter().flatten() {
        text.push_str(&format!("-A WEFT_PREROUTING {rule}\n"));
    }
    text.push_str("-A OUTPUT -j WEFT_OUTPUT\n");
    if prerouting.is_some() {
        text.push_str("-A PREROUTING -j WEFT_PREROUTING\n");
    }
    text + "COMMIT\n"
}

fn join(ports: &[u16]) -> String {
    ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
}

/// The input that removes capture's chains from `saved` (the `nat` table as
/// `iptables-nft-save` lists it), and whether it flushes the whole table (nothing else
/// is in it: the table goes, as it was before capture made it). `None`: nothing of
/// capture's is there.
fn removal(saved: &str) -> Option<(String, bool)> {
    let ours = |line: &str| CHAINS.iter().any(|(chain, _)| line.contains(chain));
    let lines: Vec<&str> = saved.lines().filter(|l| l.starts_with('-') || l.starts_with(':')).collect();
    if !lines.iter().any(|line| ours(line)) {
        return None;
    }
    let others = lines.iter().any(|line| match line.strip_prefix(':') {
        Some(chain) => !ours(line) && !BUILT_IN.iter().any(|b| chain.starts_with(&format!("{b} "))),
        None => !ours(line),
    });
    if !others {
        return Some(("*nat\nCOMMIT\n".to_string(), true));
    }
    let mut text = String::from("*nat\n");
    // Jumps first, then the chains: a chain still jumped to cannot be deleted.
    for line in
        lines.iter().filter(|l| l.starts_with("-A ") && !CHAINS.iter().any(|(c, _)| l.starts_with(&format!("-A {c} "))))
    {
        if ours(line) {
            text.push_str(&format!("-D {}\n", &line[3..]));
        }
    }
    for (chain, _) in CHAINS {
        if lines.iter().any(|l| l.starts_with(&format!(":{chain} "))) {
            text.push_str(&format!("-F {chain}\n-X {chain}\n"));
        }
    }
    Some((text + "COMMIT\n", false))
}

fn saved(family: Family) -> Result<String, CaptureError> {
    let output = Command::new(family.save())
        .args(["-t", "nat"])
        .output()
        .map_err(|error| CaptureError::Refused(format!("{}: {error}", family.save())))?;
    if !output.status.success() {
        return Err(CaptureError::Refused(String::from_utf8_lossy(&output.stderr).trim().to_string()));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn restore(family: Family, input: &str, noflush: bool) -> Result<(), CaptureError> {
    let mut command = Command::new(family.restore());
    if noflush {
        command.arg("--noflush");
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| CaptureError::Refused(format!("{}: {error}", family.restore())))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes()).map_err(|error| CaptureError::Refused(error.to_string()))?;
    }
    let done = child.wait_with_output().map_err(|error| CaptureError::Refused(error.to_string()))?;
    match done.status.success() {
        true => Ok(()),
        false => Err(CaptureError::Refused(format!(
            "{}: {}",
            family.restore(),
            String::from_utf8_lossy(&done.stderr).trim()
        ))),
    }
}

/// Replaces capture's chains with `rules` (IPv6 only where the namespace has it).
pub fn install(rules: &CaptureRules) -> Result<(), CaptureError> {
    remove()?;
    restore(Family::V4, &script(rules, Family::V4), true)?;
    if super::dns::ipv6_enabled() {
        restore(Family::V6, &script(rules, Family::V6), true)?;
    }
    Ok(())
}

/// Removes capture's chains; says whether there were any.
pub fn remove() -> Result<bool, CaptureError> {
    let mut removed = false;
    for family in [Family::V4, Family::V6] {
        let Ok(saved) = saved(family) else { continue };
        if let Some((input, whole)) = removal(&saved) {
            restore(family, &input, !whole)?;
            removed = true;
        }
    }
    Ok(removed)
}

/// Whether capture's chains are there.
pub fn is_installed() -> Result<bool, CaptureError> {
    Ok(saved(Family::V4)?.contains(":WEFT_OUTPUT "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> CaptureRules {
        CaptureRules { untrack: false, ..crate::capture::rules::example() }
    }

    #[test]
    fn the_chains_say_what_the_nft_table_says_per_family() {
        let v4 = script(&rules(), Family::V4);
        assert_eq!(
            v4.lines().collect::<Vec<_>>(),
            [
                "*nat",
                ":WEFT_OUTPUT - [0:0]",
                ":WEFT_PREROUTING - [0:0]",
                "-A WEFT_OUTPUT -m mark --mark 0x77656674 -j RETURN",
                "-A WEFT_OUTPUT -p udp --dport 53 -j REDIRECT --to-ports 15053",
                "-A WEFT_OUTPUT -p tcp --dport 53 -j REDIRECT --to-ports 15053",
                "-A WEFT_OUTPUT -d 127.0.0.0/8 -j RETURN",
                "-A WEFT_OUTPUT -d 10.0.0.5 -p tcp --dport 15010 -j RETURN",
                "-A WEFT_OUTPUT -p tcp -m multiport --dports 5432 -j RETURN",
                "-A WEFT_OUTPUT -d 10.96.0.0/12 -j RETURN",
                "-A WEFT_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
                "-A WEFT_PREROUTING -i lo -j RETURN",
                "-A WEFT_PREROUTING -p tcp -m multiport --dports 22,15000,15006,15007 -j RETURN",
                "-A WEFT_PREROUTING -p tcp -j REDIRECT --to-ports 15007",
                "-A OUTPUT -j WEFT_OUTPUT",
                "-A PREROUTING -j WEFT_PREROUTING",
                "COMMIT",
            ]
        );
        let v6 = script(&CaptureRules { proxy_traffic: ProxyTraffic::Uid(1337), ..rules() }, Family::V6);
        assert!(v6.contains("-A WEFT_OUTPUT -m owner --uid-owner 1337 -j RETURN\n"), "{v6}");
        assert!(v6.contains("-d ::1/128 -j RETURN") && v6.contains("-d fd00::/8 -j RETURN"), "{v6}");
        assert!(!v6.contains("10.0.0.5") && !v6.contains("10.96.0.0/12"), "{v6}");
    }

    #[test]
    fn removal_takes_only_capture_s_chains_and_the_table_when_it_is_left_empty() {
        let base = ":PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n";
        let ours =
            ":WEFT_OUTPUT - [0:0]\n-A OUTPUT -j WEFT_OUTPUT\n-A WEFT_OUTPUT -p tcp -j REDIRECT --to-ports 15001\n";
        assert_eq!(removal(&format!("*nat\n{base}COMMIT\n")), None);
        assert_eq!(removal(&format!("*nat\n{base}{ours}COMMIT\n")), Some(("*nat\nCOMMIT\n".into(), true)));
        let shared = format!("*nat\n{base}{ours}-A POSTROUTING -o eth0 -j MASQUERADE\nCOMMIT\n");
        assert_eq!(
            removal(&shared),
            Some(("*nat\n-D OUTPUT -j WEFT_OUTPUT\n-F WEFT_OUTPUT\n-X WEFT_OUTPUT\nCOMMIT\n".into(), false))
        );
    }
}
