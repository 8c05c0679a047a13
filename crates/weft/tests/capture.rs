//! Transparent capture's building blocks in real network namespaces (root, nftables and
//! iproute2; in CI a missing one fails): the table is replaced whole and removed without
//! a trace, redirected connections keep their original destination (IPv4 and IPv6), and
//! the proxy's marked sockets are let through; the same through iptables-nft, for hosts
//! without nft.
//!
//! Each namespace is entered by one thread of the test (`setns` is per thread), so the
//! sockets and `nft` runs of that thread live in it; traffic goes only to addresses in
//! the namespaces the test made.

mod support;

use support::netns::{can_capture, joined, run, serve_banner, Namespace};

use std::{
    io::Read,
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};
use weft_proxy::capture::{
    nft::{self, Backend},
    original_dst::{mark_as_proxy, original_destination},
    rules::{CaptureRules, InboundPorts, ProxyTraffic, DEFAULT_MARK},
};

fn rules(outbound_port: u16) -> CaptureRules {
    CaptureRules {
        outbound_port,
        inbound: Some(InboundPorts { mesh: 15006, captured: 15007 }),
        dns_port: Some(15053),
        proxy_traffic: ProxyTraffic::Mark(DEFAULT_MARK),
        exclude_inbound_ports: vec![15000],
        exclude_outbound_ports: vec![],
        exclude_cidrs: vec![],
        exclude_destinations: vec![],
        untrack: true,
    }
}

/// A connection to `to` from the calling thread's namespace, as the proxy makes it
/// (`mark`: carrying its mark) or as the application does.
fn connect(to: &str, mark: bool) -> TcpStream {
    let to: SocketAddr = to.parse().unwrap();
    let socket = socket2::Socket::new(socket2::Domain::for_address(to), socket2::Type::STREAM, None).unwrap();
    if mark {
        mark_as_proxy(&socket, DEFAULT_MARK).unwrap();
    }
    socket.connect_timeout(&to.into(), Duration::from_secs(5)).unwrap();
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream
}

#[test]
fn the_table_is_replaced_whole_and_removed_without_a_trace() {
    if !can_capture() {
        return;
    }
    let namespace = Namespace::new("table");
    // Someone else's table, which capture must leave as it is.
    run(&[
        "ip",
        "netns",
        "exec",
        &namespace.name,
        "nft",
        "add table inet other; add chain inet other input { type filter hook input priority 0; }",
    ]);
    let before = namespace.ruleset();
    // Installed, then again (a proxy killed with SIGKILL and restarted), then with
    // another port: always one table, the last one's rules.
    namespace.enter(|| {
        nft::install(&rules(15001)).unwrap();
        nft::install(&rules(15001)).unwrap();
        nft::install(&rules(15101)).unwrap();
        assert!(nft::is_installed().unwrap());
    });
    let installed = namespace.ruleset();
    assert_eq!(installed.matches("table inet weft").count(), 1, "{installed}");
    assert!(installed.contains("redirect to :15101") && !installed.contains(":15001"), "{installed}");
    assert!(installed.contains("table inet other"), "{installed}");
    // Removed: the ruleset is exactly what it was; removing again changes nothing.
    assert!(namespace.enter(|| nft::remove().unwrap()), "there was a table to remove");
    assert_eq!(namespace.ruleset(), before);
    assert!(!namespace.enter(|| nft::remove().unwrap()));
    assert_eq!(namespace.ruleset(), before);
}

#[test]
fn redirected_connections_keep_their_destination_and_the_proxy_is_let_through() {
    if !can_capture() {
        return;
    }
    let (workload, peer) = joined("r", 0);
    serve_banner(&peer, &["10.251.0.2:8080", "[fd77:6566:74:0::2]:8080"]);
    let outcome = workload.enter(|| {
        // The proxy's outbound listener, dual-stack, then the rules pointing at it.
        let listener = TcpListener::bind("[::]:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        nft::install(&rules(port)).unwrap();
        let accept_one = |listener: &TcpListener| {
            let (stream, _) = listener.accept().unwrap();
            original_destination(&stream).unwrap()
        };
        // The application's connections land on the listener, which reads where they
        // were going.
        let _v4 = connect("10.251.0.2:8080", false);
        let v4 = accept_one(&listener);
        let _v6 = connect("[fd77:6566:74:0::2]:8080", false);
        let v6 = accept_one(&listener);
        // The proxy's own (marked) connection reaches the peer itself.
        let mut banner = String::new();
        connect("10.251.0.2:8080", true).read_to_string(&mut banner).unwrap();
        nft::remove().unwrap();
        (v4, v6, banner)
    });
    assert_eq!(outcome.0, "10.251.0.2:8080".parse().unwrap(), "the IPv4 original destination");
    assert_eq!(outcome.1, "[fd77:6566:74:0::2]:8080".parse().unwrap(), "the IPv6 original destination");
    assert_eq!(outcome.2, "peer\n", "a marked connection is not captured");
}

#[test]
fn by_uid_the_proxy_user_is_let_through_and_the_application_user_captured() {
    if !can_capture() {
        return;
    }
    let (workload, peer) = joined("u", 1);
    serve_banner(&peer, &["10.251.1.2:8080"]);
    // The proxy runs as uid 1337 (`--app-user` runs the application as another).
    let listener = workload.enter(|| {
        let listener = TcpListener::bind("[::]:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        nft::install(&CaptureRules { proxy_traffic: ProxyTraffic::Uid(1337), ..rules(port) }).unwrap();
        listener
    });
    let as_proxy_user = run(&[
        "ip",
        "netns",
        "exec",
        &workload.name,
        "setpriv",
        "--reuid=1337",
        "--regid=1337",
        "--clear-groups",
        // Captured by mistake, the connection would wait on a listener that does not
        // answer: bounded, it fails instead.
        "timeout",
        "10",
        "bash",
        "-c",
        "exec 3<>/dev/tcp/10.251.1.2/8080 && head -c 5 <&3",
    ]);
    assert_eq!(as_proxy_user, "peer\n", "the proxy's user reaches the peer itself");
    // Root, here the application, is captured.
    let original = workload.enter(|| {
        let _client = TcpStream::connect_timeout(&"10.251.1.2:8080".parse().unwrap(), Duration::from_secs(5)).unwrap();
        let (stream, _) = listener.accept().unwrap();
        original_destination(&stream).unwrap()
    });
    assert_eq!(original, "10.251.1.2:8080".parse().unwrap());
}

#[test]
fn without_nft_the_same_rules_go_through_iptables_nft_and_leave_no_trace() {
    if !can_capture() {
        return;
    }
    if std::process::Command::new("iptables-nft-restore").arg("--version").output().is_err() {
        support::skip("iptables-nft-restore is not installed (Debian: iptables)");
        return;
    }
    let (workload, peer) = joined("i", 2);
    serve_banner(&peer, &["10.251.2.2:8080", "[fd77:6566:74:2::2]:8080"]);
    let before = workload.ruleset();
    let outcome = workload.enter(|| {
        let listener = TcpListener::bind("[::]:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        // Installed twice (a restarted proxy): one set of chains, jumped to once.
        let rules = CaptureRules { untrack: false, ..rules(port) };
        nft::install_with(Backend::IptablesNft, &rules).unwrap();
        nft::install_with(Backend::IptablesNft, &rules).unwrap();
        assert!(nft::is_installed_with(Backend::IptablesNft).unwrap());
        let saved =
            String::from_utf8(std::process::Command::new("iptables-nft-save").output().unwrap().stdout).unwrap();
        assert_eq!(saved.matches("-A OUTPUT -j WEFT_OUTPUT").count(), 1, "{saved}");
        let _v4 = connect("10.251.2.2:8080", false);
        let v4 = original_destination(&listener.accept().unwrap().0).unwrap();
        let _v6 = connect("[fd77:6566:74:2::2]:8080", false);
        let v6 = original_destination(&listener.accept().unwrap().0).unwrap();
        let mut banner = String::new();
        connect("10.251.2.2:8080", true).read_to_string(&mut banner).unwrap();
        assert!(nft::remove_with(Backend::IptablesNft).unwrap());
        assert!(!nft::remove_with(Backend::IptablesNft).unwrap(), "nothing left to remove");
        (v4, v6, banner)
    });
    assert_eq!(outcome.0, "10.251.2.2:8080".parse().unwrap(), "the IPv4 original destination");
    assert_eq!(outcome.1, "[fd77:6566:74:2::2]:8080".parse().unwrap(), "the IPv6 original destination");
    assert_eq!(outcome.2, "peer\n", "a marked connection is not captured");
    assert_eq!(workload.ruleset(), before, "removed without a trace");
}
