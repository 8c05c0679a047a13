//! Network namespaces for the capture tests: made with `ip netns`, entered per thread
//! with `setns`, deleted on drop; and peers inside them.

use std::{fs::File, io::Write, net::TcpListener, process::Command};

use nix::sched::{setns, CloneFlags};

/// Whether this machine can run the capture tests; says why not otherwise.
pub fn can_capture() -> bool {
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
            super::skip(reason);
            false
        }
        None => true,
    }
}

pub fn run(command: &[&str]) -> String {
    let output = Command::new(command[0]).args(&command[1..]).output().unwrap();
    assert!(output.status.success(), "{command:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A network namespace of the test's own, deleted (with its veth ends) on drop.
pub struct Namespace {
    pub name: String,
}

impl Namespace {
    pub fn new(tag: &str) -> Namespace {
        let name = format!("weft-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Namespace { name }
    }

    /// Runs `f` on a thread inside the namespace.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
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

    pub fn ruleset(&self) -> String {
        run(&["ip", "netns", "exec", &self.name, "nft", "list", "ruleset"])
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.name));
    }
}

/// A workload's namespace and a peer's, joined by a veth pair: the workload at
/// 10.251.`subnet`.1 and fd77:6566:74:`subnet`::1, the peer at .2 and ::2.
pub fn joined(tag: &str, subnet: u8) -> (Namespace, Namespace) {
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
pub fn serve_banner(peer: &Namespace, addresses: &[&str]) {
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

impl Namespace {
    /// Gives the namespace its own `/etc/resolv.conf` (what `ip netns exec` mounts for
    /// processes started in it); removed with the namespace.
    pub fn resolv_conf(&self, text: &str) {
        let dir = format!("/etc/netns/{}", self.name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(format!("{dir}/resolv.conf"), text).unwrap();
    }

    /// A command run inside the namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// A plain HTTP/1.0 GET from inside the namespace: the status and the body.
    pub fn http_get(&self, address: &str, path: &str) -> Option<(u16, String)> {
        self.enter(|| {
            use std::io::Read;
            let address = address.parse().ok()?;
            let mut stream = std::net::TcpStream::connect_timeout(&address, std::time::Duration::from_secs(2)).ok()?;
            stream.set_read_timeout(Some(std::time::Duration::from_secs(5))).ok()?;
            stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n").as_bytes()).ok()?;
            let mut response = String::new();
            stream.read_to_string(&mut response).ok()?;
            let status = response.split(' ').nth(1)?.parse().ok()?;
            let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default();
            Some((status, body))
        })
    }
}

/// The contents of `path` once something has been written there (at most 20 s).
pub fn eventually_read(path: &std::path::Path) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if !text.is_empty() {
            return text;
        }
        assert!(std::time::Instant::now() < deadline, "nothing was written to {}", path.display());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A bridge in the test's own namespace, deleted (with its ports) on drop.
pub struct Bridge {
    pub name: String,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.name]).output();
    }
}

/// Two namespaces and the test's own on one bridge, so that a process of the test (a
/// control plane) can serve both: the first at 10.251.`subnet`.1, the second at .2, the
/// test's namespace at .254.
pub fn bridged(tag: &str, subnet: u8) -> (Namespace, Namespace, Bridge) {
    let id = std::process::id() % 100_000;
    let bridge = Bridge { name: format!("wb{tag}{id}") };
    let _ = Command::new("ip").args(["link", "del", &bridge.name]).output();
    run(&["ip", "link", "add", &bridge.name, "type", "bridge"]);
    run(&["ip", "addr", "add", &format!("10.251.{subnet}.254/24"), "dev", &bridge.name]);
    run(&["ip", "link", "set", &bridge.name, "up"]);
    let (first, second) = (Namespace::new(&format!("{tag}a")), Namespace::new(&format!("{tag}b")));
    for (namespace, host) in [(&first, 1), (&second, 2)] {
        let (ours, theirs) = (format!("w{tag}{id}{host}"), format!("w{tag}{id}{host}n"));
        run(&["ip", "link", "add", &ours, "type", "veth", "peer", "name", &theirs, "netns", &namespace.name]);
        run(&["ip", "link", "set", &ours, "master", &bridge.name, "up"]);
        run(&["ip", "-n", &namespace.name, "addr", "add", &format!("10.251.{subnet}.{host}/24"), "dev", &theirs]);
        run(&["ip", "-n", &namespace.name, "link", "set", &theirs, "up"]);
    }
    (first, second, bridge)
}
