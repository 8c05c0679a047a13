//! Transparent capture's building blocks in real network namespaces (root, nftables and
//! iproute2; in CI a missing one fails): the table is replaced whole and removed without
//! a trace, redirected connections keep their original destination (IPv4 and IPv6), and
//! the proxy's marked sockets are let through.
//!
//! Each namespace is entered by one thread of the test (`setns` is per thread), so the
//! sockets and `nft` runs of that thread live in it; traffic goes only to addresses in
//! the namespaces the test made.

mod support;

use std::{
    fs::File,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::Command,
    time::Duration,
};

use nix::sched::{setns, CloneFlags};
use weft_proxy::capture::{
    nft,
    original_dst::{mark_as_proxy, original_destination},
    rules::{CaptureRules, ProxyTraffic, DEFAULT_MARK},
};

/// Whether this machine can run the capture tests; says why not otherwise.
fn can_capture() -> bool {
    let missing = if !nix::unistd::Uid::effective().is_root() {
        Some("it needs root (network namespaces and nftables)")
    } else if Command::new("nft").arg("--version").output().is_err() {
        Some("nft is not installed (Debian: nftables)")
    } else if Command::new("ip").arg("-V").output().is_err() {
        Some("ip is not installed (Debian: iproute2)")
    } else {
        None
    };
    match missing {
        Some(reason) => {
            support::skip(reason);
            false
        }
        None => true,
    }
}

fn run(command: &[&str]) -> String {
    let output = Command::new(command[0]).args(&command[1..]).output().unwrap();
    assert!(output.status.success(), "{command:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A network namespace of the test's own, deleted (with its veth ends) on drop.
struct Namespace {
    name: String,
}

impl Namespace {
    fn new(tag: &str) -> Namespace {
        let name = format!("weft-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Namespace { name }
    }

    /// Runs `f` on a thread inside the namespace.
    fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let handle = File::open(format!("/run/netns/{}", self.name)).unwrap();
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    setns(&handle, CloneFlags::CLONE_NEWNET).expect("setns into the test's namespace");
                    f()
                })
                .join()
                .unwrap()
        })
    }

    fn ruleset(&self) -> String {
        run(&["ip", "netns", "exec", &self.name, "nft", "list", "ruleset"])
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

fn rules(outbound_port: u16) -> CaptureRules {
    CaptureRules {
        outbound_port,
        inbound_port: 15006,
        dns_port: Some(15053),
        proxy_traffic: ProxyTraffic::Mark(DEFAULT_MARK),
        exclude_inbound_ports: vec![15000],
        exclude_outbound_ports: vec![],
        exclude_cidrs: vec![],
        exclude_destinations: vec![],
    }
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

/// A workload's namespace and a peer's, joined by a veth pair: the workload at
/// 10.251.`subnet`.1 and fd77:6566:74:`subnet`::1, the peer at .2 and ::2.
fn joined(tag: &str, subnet: u8) -> (Namespace, Namespace) {
    let (workload, peer) = (Namespace::new(&format!("{tag}a")), Namespace::new(&format!("{tag}p")));
    let id = std::process::id() % 100_000;
    let (ours, theirs) = (format!("w{tag}{id}a"), format!("w{tag}{id}b"));
    run(&[
        "ip",
        "link",
        "add",
        &ours,
        "netns",
        &workload.name,
        "type",
        "veth",
        "peer",
        "name",
        &theirs,
        "netns",
        &peer.name,
    ]);
    for (namespace, link, host) in [(&workload, &ours, 1), (&peer, &theirs, 2)] {
        let (v4, v6) = (format!("10.251.{subnet}.{host}/24"), format!("fd77:6566:74:{subnet}::{host}/64"));
        run(&["ip", "-n", &namespace.name, "addr", "add", &v4, "dev", link]);
        run(&["ip", "-n", &namespace.name, "addr", "add", &v6, "dev", link, "nodad"]);
        run(&["ip", "-n", &namespace.name, "link", "set", link, "up"]);
    }
    (workload, peer)
}

/// The peer answers every connection to `addresses` with a banner, so that a test can
/// tell a connection reached it.
fn serve_banner(peer: &Namespace, addresses: &[&str]) {
    let listeners: Vec<TcpListener> =
        peer.enter(|| addresses.iter().map(|address| TcpListener::bind(address).unwrap()).collect());
    for listener in listeners {
        std::thread::spawn(move || {
            for mut stream in listener.incoming().take(8).flatten() {
                let _ = stream.write_all(b"peer\n");
            }
        });
    }
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
        let connect = |to: &str, mark: bool| {
            let to: SocketAddr = to.parse().unwrap();
            let socket = socket2::Socket::new(socket2::Domain::for_address(to), socket2::Type::STREAM, None).unwrap();
            if mark {
                mark_as_proxy(&socket, DEFAULT_MARK).unwrap();
            }
            socket.connect_timeout(&to.into(), Duration::from_secs(5)).unwrap();
            let stream: TcpStream = socket.into();
            stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            stream
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
