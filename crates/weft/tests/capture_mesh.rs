//! Transparent capture end to end: unmodified clients in one network namespace reach
//! services in another through two `weft proxy --capture` sidecars, with real curl, nc
//! and DNS (root, nftables, iproute2, curl and a netcat; in CI a missing one fails).
//!
//! Traffic goes only to the namespaces the test made: the client's (10.251.S.1) and the
//! server's (10.251.S.2, and 10.251.S.3 for an unmeshed database).

mod support;

use std::{
    net::{Ipv4Addr, UdpSocket},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use std::os::unix::process::CommandExt;

use hickory_proto::{
    op::{Message, Query, ResponseCode},
    rr::{rdata::A, Name, RData, Record, RecordType},
};
use support::{
    netns::{can_capture, joined, run, serve_banner, Namespace},
    TempDir, WEFT,
};

/// The Services both sidecars know (static `--config`).
fn mesh(subnet: u8) -> String {
    format!(
        r#"apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {{name: reviews}}
spec: {{selector: {{app: reviews}}, ports: [{{port: 80}}]}}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {{name: reviews-1}}
spec: {{labels: {{app: reviews}}, address: "10.251.{subnet}.2:15006"}}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {{name: db}}
spec: {{selector: {{app: db}}, ports: [{{port: 5432, protocol: tcp}}]}}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {{name: db-1}}
spec: {{labels: {{app: db}}, address: "10.251.{subnet}.3:5432"}}
"#
    )
}

/// A `weft proxy` inside a namespace, killed on drop.
struct Sidecar<'a> {
    child: Child,
    namespace: &'a Namespace,
    log: std::path::PathBuf,
}

impl<'a> Sidecar<'a> {
    /// Starts `weft proxy ARGS` in `namespace` and waits until `/ready` answers 200.
    fn start(namespace: &'a Namespace, dir: &TempDir, name: &str, args: &[&str]) -> Sidecar<'a> {
        Sidecar::start_as(namespace, dir, name, None, args)
    }

    /// [`Sidecar::start`], as the user `uid` when given (root otherwise).
    fn start_as(namespace: &'a Namespace, dir: &TempDir, name: &str, uid: Option<u32>, args: &[&str]) -> Sidecar<'a> {
        let log = dir.0.join(format!("{name}.log"));
        let mut command = match uid {
            None => namespace.command(WEFT),
            Some(uid) => {
                let mut command = namespace.command("setpriv");
                command.args([&format!("--reuid={uid}"), &format!("--regid={uid}"), "--clear-groups", WEFT]);
                command
            }
        };
        let child = command
            .arg("proxy")
            .args(args)
            .env("RUST_LOG", "info,weft_proxy=debug")
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            // A group of its own, so that the application it runs goes with it.
            .process_group(0)
            .spawn()
            .unwrap();
        let mut sidecar = Sidecar { child, namespace, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = sidecar.child.try_wait().unwrap() {
                panic!("{name} exited early ({status}):\n{}", sidecar.log());
            }
            if namespace.http_get("127.0.0.1:15000", "/ready").is_some_and(|(status, _)| status == 200) {
                return sidecar;
            }
            assert!(Instant::now() < deadline, "{name} never became ready:\n{}", sidecar.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn metrics(&self) -> String {
        self.namespace.http_get("127.0.0.1:15000", "/metrics").map(|(_, body)| body).unwrap_or_default()
    }

    /// The sum of `metric`'s samples whose labels hold every `label="value"` given.
    fn metric(&self, metric: &str, labels: &[&str]) -> f64 {
        support::metric_sum(&self.metrics(), metric, labels)
    }

    /// Signals the proxy (which stops the application it runs itself on SIGTERM).
    fn signal(&self, signal: &str) {
        run(&["kill", signal, &self.child.id().to_string()]);
    }

    /// Kills the proxy and the application it runs (its process group), as a crash
    /// of the whole workload would.
    fn kill_all(&self) {
        run(&["kill", "-KILL", "--", &format!("-{}", self.child.id())]);
    }

    /// Waits for the process to exit (after a signal).
    fn wait(mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the proxy did not exit:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sidecar<'_> {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = std::process::Command::new("kill").args(["-KILL", "--", &group]).output();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The server's application: answers every HTTP request with what it was sent (Host
/// and X-Forwarded-For), on 127.0.0.1:9080 in `namespace`.
/// An HTTP application on 127.0.0.1:`port` in `namespace` that answers with its `name`,
/// the Host it was asked for and the X-Forwarded-For it got.
fn serve_echo(namespace: &Namespace, port: u16, name: &'static str) {
    let listener = namespace.enter(|| std::net::TcpListener::bind(("127.0.0.1", port)).unwrap());
    std::thread::spawn(move || {
        use std::io::{BufRead, BufReader, Write};
        for stream in listener.incoming().take(200).flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut stream = stream;
                loop {
                    let (mut host, mut forwarded) = (String::new(), Vec::new());
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let trimmed = line.trim_end();
                        if trimmed.is_empty() {
                            break;
                        }
                        if let Some((name, value)) = trimmed.split_once(':') {
                            match name.to_ascii_lowercase().as_str() {
                                "host" => host = value.trim().to_string(),
                                "x-forwarded-for" => forwarded.push(value.trim().to_string()),
                                _ => {}
                            }
                        }
                    }
                    let body = format!("{name} saw host={host} xff={}", forwarded.join(","));
                    let response = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                    if stream.write_all(response.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// A server-first TCP application on 127.0.0.1:`port` in `namespace` that expects the
/// PROXY protocol: it answers each connection with the source address the header gave.
fn serve_proxy_protocol(namespace: &Namespace, port: u16) {
    let listener = namespace.enter(|| std::net::TcpListener::bind(("127.0.0.1", port)).unwrap());
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut stream in listener.incoming().take(8).flatten() {
            let mut buffer = [0u8; 256];
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let length = stream.read(&mut buffer).unwrap_or(0);
            let answer = match ppp::v2::Header::try_from(&buffer[..length]) {
                Ok(header) => match header.addresses {
                    ppp::v2::Addresses::IPv4(ip) => format!("proxied from {}\n", ip.source_address),
                    other => format!("proxied from {other:?}\n"),
                },
                Err(error) => format!("no PROXY header: {error}\n"),
            };
            let _ = stream.write_all(answer.as_bytes());
        }
    });
}

/// An upstream resolver in `namespace` on `address`:53: A questions about `egress.*`
/// get `egress`, every other A question 192.0.2.7, so that an answer from it proves a
/// query was forwarded.
fn serve_upstream_resolver(namespace: &Namespace, address: &str, egress: Ipv4Addr) {
    let socket = namespace.enter(|| UdpSocket::bind(format!("{address}:53")).unwrap());
    std::thread::spawn(move || {
        let mut buffer = [0u8; 1500];
        for _ in 0..50 {
            let Ok((length, client)) = socket.recv_from(&mut buffer) else { return };
            let Ok(query) = Message::from_vec(&buffer[..length]) else { continue };
            let mut answer = Message::response(query.metadata.id, query.metadata.op_code);
            answer.metadata.recursion_available = true;
            for question in &query.queries {
                answer.add_query(question.clone());
                if question.query_type() == RecordType::A {
                    let egress_name = question.name().to_ascii().starts_with("egress.");
                    let record = RData::A(A(if egress_name { egress } else { Ipv4Addr::new(192, 0, 2, 7) }));
                    answer.add_answer(Record::from_rdata(question.name().clone(), 60, record));
                }
            }
            let _ = socket.send_to(&answer.to_vec().unwrap(), client);
        }
    });
}

/// Asks `name` (type A) over UDP from inside `namespace`, as an application would: to
/// port 53 of its resolver, which capture sends to the sidecar's responder.
fn resolve(namespace: &Namespace, resolver: &str, name: &str) -> Message {
    namespace.enter(|| {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut query = Message::query();
        query.metadata.recursion_desired = true;
        query.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        socket.send_to(&query.to_vec().unwrap(), format!("{resolver}:53")).unwrap();
        let mut buffer = [0u8; 1500];
        let length = socket.recv(&mut buffer).expect("an answer to the DNS query");
        Message::from_vec(&buffer[..length]).unwrap()
    })
}

fn addresses(message: &Message) -> Vec<String> {
    message
        .answers
        .iter()
        .filter_map(|record| match &record.data {
            RData::A(A(address)) => Some(address.to_string()),
            _ => None,
        })
        .collect()
}

/// curl in `namespace` with no proxy settings: the status and body.
fn curl(namespace: &Namespace, url: &str) -> (String, String) {
    let output = namespace
        .command("curl")
        .args(["-s", "-m", "10", "-w", "\n%{http_code}", url])
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (status.to_string(), body.to_string())
}

/// `nc HOST PORT` in `namespace`, reading what the server sends first.
fn netcat(namespace: &Namespace, host: &str, port: u16) -> String {
    let output = namespace
        .command("timeout")
        .args(["10", "nc", "-w", "3", host, &port.to_string()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn has_tools() -> bool {
    for (tool, package) in [("curl", "curl"), ("nc", "netcat-openbsd"), ("timeout", "coreutils")] {
        if std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map_or(true, |o| !o.status.success())
        {
            support::skip(&format!("{tool} is not installed (Debian: {package})"));
            return false;
        }
    }
    true
}

#[test]
fn unmodified_clients_reach_services_through_captured_sidecars() {
    if !can_capture() || !has_tools() {
        return;
    }
    let subnet = 20;
    let (client, server) = joined("m", subnet);
    let server_ip = format!("10.251.{subnet}.2");
    let client_ip = format!("10.251.{subnet}.1");
    run(&["ip", "-n", &server.name, "addr", "add", &format!("10.251.{subnet}.3/32"), "dev", "lo"]);
    // The client's resolver is an address in the server's namespace, where an upstream
    // resolver answers what the mesh does not.
    client.resolv_conf(&format!("nameserver {server_ip}\n"));
    serve_upstream_resolver(&server, &server_ip, server_ip.parse().unwrap());
    serve_echo(&server, 9080, "reviews");
    // A second port of the same application, which only a connection that keeps the port
    // it was made to reaches.
    serve_echo(&server, 9081, "reviews-admin");
    serve_banner(&server, &["0.0.0.0:5432", "0.0.0.0:7000", "0.0.0.0:7001"]);

    let dir = TempDir::new("capture-mesh");
    let config = dir.write("mesh.yaml", &mesh(subnet));
    let client_config = dir.write("client.yaml", &mesh(subnet));
    let before = client.ruleset();
    let routes_before = run(&["ip", "-n", &client.name, "route"]);
    let config_flag = config.to_str().unwrap();
    let _server_proxy = Sidecar::start(
        &server,
        &dir,
        "server",
        &[
            "--config",
            config_flag,
            "--service",
            "reviews",
            "--app-addr",
            "127.0.0.1:9080",
            "--capture",
            // The database and the other port are served directly, outside the mesh.
            "--capture-exclude-inbound-ports",
            "5432,7000,7001",
        ],
    );
    // The client's application is started by its sidecar, as the same user: captured.
    let launched = dir.0.join("launched.txt");
    let script = format!("curl -s -m 10 http://reviews/ > {}; exec sleep 600", launched.display());
    let client_args = ["--config", client_config.to_str().unwrap(), "--capture", "--", "sh", "-c", &script];
    let client_proxy = Sidecar::start(&client, &dir, "client", &client_args);
    assert_eq!(client.ruleset().matches("table inet weft").count(), 1);

    // DNS: Service names resolve to the virtual IP; the mesh's zone is the mesh's; other
    // names go to the host's resolver.
    let vip = addresses(&resolve(&client, &server_ip, "reviews"));
    assert_eq!(vip.len(), 1, "reviews resolves to one address");
    assert!(vip[0].starts_with("240.240."), "{vip:?}");
    assert_eq!(addresses(&resolve(&client, &server_ip, "reviews.default.svc.cluster.local")), vip);
    let missing = resolve(&client, &server_ip, "nothing.default.svc.cluster.local");
    assert_eq!(missing.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(addresses(&resolve(&client, &server_ip, "outside.example")), ["192.0.2.7"]);

    // HTTP by name, with no proxy settings: the Host is the client's, and the application
    // sees the caller's address.
    let (status, body) = curl(&client, "http://reviews/");
    assert_eq!(status, "200", "{body}\n{}", client_proxy.log());
    assert_eq!(body, format!("reviews saw host=reviews xff={client_ip}"));
    // A call by IP, on the Service's port.
    let (status, body) = curl(&client, &format!("http://{server_ip}/"));
    assert_eq!(status, "200", "{body}");
    assert!(body.starts_with(&format!("reviews saw host={server_ip}")), "{body}");
    // The application the sidecar launched was captured too.
    let launched_body = support::netns::eventually_read(&launched);
    assert!(launched_body.starts_with("reviews saw host=reviews"), "{launched_body:?}");
    // A server-first TCP service by name: its banner arrives at once, with no detection.
    let started = Instant::now();
    assert_eq!(netcat(&client, "db", 5432), "peer\n");
    assert!(started.elapsed() < Duration::from_secs(3), "the banner waited on detection");
    let meshed = |destination: &str| {
        client_proxy.metric(
            "weft_captured_connections_total",
            &[&format!("destination=\"{destination}\""), "outcome=\"meshed\""],
        )
    };
    assert!(meshed("service") >= 3.0 && meshed("endpoint") >= 1.0, "{}", client_proxy.metrics());
    assert!(
        client_proxy.metric("weft_requests_total", &["destination_service=\"default/reviews\"", "status_code=\"200\""])
            >= 3.0
    );
    assert_eq!(client_proxy.metric("weft_tcp_connections_total", &["destination_service=\"default/db\""]), 1.0);

    // Outside the mesh: ALLOW_ANY passes through (counted), REGISTRY_ONLY refuses.
    assert_eq!(netcat(&client, &server_ip, 7000), "peer\n");
    assert_eq!(client_proxy.metric("weft_captured_connections_total", &["outcome=\"passthrough\""]), 1.0);
    // ExternalServices let chosen destinations out: by the name the application resolved,
    // or by address.
    let registry_only = format!(
        "---\napiVersion: weft.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: mesh}}\n\
         spec: {{outboundTrafficPolicy: {{mode: REGISTRY_ONLY}}}}\n---\napiVersion: weft.dev/v1alpha1\n\
         kind: ExternalService\nmetadata: {{name: egress}}\nspec: {{hosts: [egress.example], ports: [{{port: 7000}}]}}\n\
         ---\napiVersion: weft.dev/v1alpha1\nkind: ExternalService\nmetadata: {{name: partner}}\n\
         spec: {{addresses: [{server_ip}/32], ports: [{{port: 7001}}]}}\n"
    );
    std::fs::write(&client_config, format!("{}{registry_only}", mesh(subnet))).unwrap();
    client_proxy.signal("-HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !client.http_get("127.0.0.1:15000", "/config").is_some_and(|(_, body)| body.contains("REGISTRY_ONLY")) {
        assert!(Instant::now() < deadline, "the REGISTRY_ONLY MeshConfig was never applied");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(netcat(&client, &server_ip, 7000), "", "refused under REGISTRY_ONLY");
    assert_eq!(client_proxy.metric("weft_captured_connections_total", &["outcome=\"refused_registry_only\""]), 1.0);
    assert_eq!(netcat(&client, &server_ip, 7001), "peer\n", "a declared external address");
    assert_eq!(netcat(&client, "egress.example", 7000), "peer\n", "a declared external host, as resolved");
    let external = &["destination=\"external\"", "outcome=\"passthrough\""];
    assert_eq!(client_proxy.metric("weft_captured_connections_total", external), 2.0);
    assert_eq!(client_proxy.metric("weft_tcp_connections_total", &["destination_service=\"default/egress\""]), 1.0);
    assert_eq!(curl(&client, "http://reviews/").0, "200", "the mesh still serves");

    // Killed outright, the sidecar leaves its table; restarted, it replaces it: one table.
    client_proxy.kill_all();
    client_proxy.wait();
    assert_eq!(client.ruleset().matches("table inet weft").count(), 1);
    let restarted = Sidecar::start(&client, &dir, "client-again", &["--config", config_flag, "--capture"]);
    assert_eq!(client.ruleset().matches("table inet weft").count(), 1);
    assert_eq!(curl(&client, "http://reviews/").0, "200");
    restarted.signal("-TERM");
    restarted.wait();
    // With --app-user the application runs as another user, and capture tells the
    // proxy's traffic apart by uid instead of by mark: the application is captured.
    let shared = dir.0.join("as-user");
    std::fs::create_dir_all(&shared).unwrap();
    run(&["chmod", "0777", shared.to_str().unwrap()]);
    run(&["chmod", "0755", dir.0.to_str().unwrap()]);
    let as_user = shared.join("launched.txt");
    let script = format!("curl -s -m 10 http://reviews/ > {}; exec sleep 600", as_user.display());
    let by_uid = ["--config", config_flag, "--capture", "--app-user", "1337", "--", "sh", "-c", &script];
    let restarted = Sidecar::start(&client, &dir, "client-by-uid", &by_uid);
    assert!(client.ruleset().contains("meta skuid 0 return"), "{}", client.ruleset());
    let by_uid_body = support::netns::eventually_read(&as_user);
    assert_eq!(by_uid_body, format!("reviews saw host=reviews xff={client_ip}"));
    // A clean exit removes the table and the routes: the namespace is as it was.
    restarted.signal("-TERM");
    restarted.wait();
    assert_eq!(client.ruleset(), before);
    assert_eq!(run(&["ip", "-n", &client.name, "route"]), routes_before);

    // A caller outside the mesh (the client's namespace, no longer captured) calls the
    // application's ports directly: the server's sidecar captures the connections, each
    // reaches the port it was made to, and the application sees the caller's address.
    let (status, body) = curl(&client, &format!("http://{server_ip}:9081/"));
    assert_eq!(status, "200", "{body}");
    assert_eq!(body, format!("reviews-admin saw host={server_ip}:9081 xff={client_ip}"));
    let (status, body) = curl(&client, &format!("http://{server_ip}:9080/"));
    assert_eq!(status, "200", "{body}");
    assert_eq!(body, format!("reviews saw host={server_ip}:9080 xff={client_ip}"));

    // An init step installs the rules for a proxy that runs as its own unprivileged user
    // (it cannot mark its sockets: the rules leave out its uid); root's curl, the
    // application here, is captured; `weft capture remove` restores the namespace.
    let installed = client
        .command(WEFT)
        .args(["capture", "install", "--proxy-uid", "1337", "--inbound-port", "0"])
        .output()
        .unwrap();
    assert!(installed.status.success(), "{}", String::from_utf8_lossy(&installed.stderr));
    let unprivileged = Sidecar::start_as(
        &client,
        &dir,
        "client-unprivileged",
        Some(1337),
        &["--config", config_flag, "--capture=external"],
    );
    let (status, body) = curl(&client, "http://reviews/");
    assert_eq!(status, "200", "{body}\n{}", unprivileged.log());
    assert!(unprivileged.log().contains("cannot mark the proxy's sockets"), "{}", unprivileged.log());
    unprivileged.signal("-TERM");
    unprivileged.wait();
    assert!(client.ruleset().contains("table inet weft"), "--capture=external leaves the init step's rules");
    let removed = client.command(WEFT).args(["capture", "remove"]).output().unwrap();
    assert!(removed.status.success());
    assert_eq!(client.ruleset(), before);
    assert_eq!(run(&["ip", "-n", &client.name, "route"]), routes_before);
}

#[test]
fn weft_capture_install_and_remove_leave_the_namespace_as_it_was() {
    if !can_capture() {
        return;
    }
    let namespace = Namespace::new("ci");
    let before = namespace.ruleset();
    let routes_before = run(&["ip", "-n", &namespace.name, "route"]);
    let cli = |args: &[&str]| {
        let output = namespace.command(WEFT).arg("capture").args(args).output().unwrap();
        assert!(output.status.success(), "weft capture {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    cli(&["install", "--capture-exclude-ports", "22", "--capture-exclude-cidrs", "10.0.0.0/8"]);
    cli(&["install", "--outbound-port", "15101"]);
    let installed = namespace.ruleset();
    assert_eq!(installed.matches("table inet weft").count(), 1, "{installed}");
    assert!(installed.contains("redirect to :15101"), "the second install replaced the first: {installed}");
    assert!(run(&["ip", "-n", &namespace.name, "route"]).contains("240.240.0.0/16 dev lo proto 77"));
    assert_eq!(cli(&["remove"]).trim(), "capture removed");
    assert_eq!(namespace.ruleset(), before);
    assert_eq!(run(&["ip", "-n", &namespace.name, "route"]), routes_before);
    assert_eq!(cli(&["remove"]).trim(), "no capture table was installed");
    // On a host without nft, the same through iptables-nft: a PATH that has iptables
    // and iproute2 but no nft.
    let tools = TempDir::new("capture-no-nft");
    for tool in ["ip", "iptables-nft-restore", "ip6tables-nft-restore", "iptables-nft-save", "ip6tables-nft-save"] {
        let found = run(&["sh", "-c", &format!("command -v {tool}")]);
        std::os::unix::fs::symlink(found.trim(), tools.0.join(tool)).unwrap();
    }
    let without_nft = |args: &[&str]| {
        let mut command = namespace.command(WEFT);
        let output = command.arg("capture").args(args).env("PATH", &tools.0).output().unwrap();
        assert!(output.status.success(), "weft capture {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    assert!(without_nft(&["install"]).contains("iptables-nft"));
    assert!(without_nft(&["install"]).contains("iptables-nft"), "installed again, replaced");
    let saved = run(&["ip", "netns", "exec", &namespace.name, "iptables-nft-save", "-t", "nat"]);
    assert_eq!(saved.matches("-A OUTPUT -j WEFT_OUTPUT").count(), 1, "{saved}");
    assert!(saved.contains("-A WEFT_PREROUTING -p tcp -j REDIRECT --to-ports 15007"), "{saved}");
    assert_eq!(without_nft(&["remove"]).trim(), "capture removed");
    assert_eq!(namespace.ruleset(), before);
    assert_eq!(run(&["ip", "-n", &namespace.name, "route"]), routes_before);
    // Bad input is refused with the flag named, and changes nothing.
    let refused =
        namespace.command(WEFT).args(["capture", "install", "--capture-exclude-cidrs", "nonsense"]).output().unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("is not a CIDR"));
    assert_eq!(namespace.ruleset(), before);
}

/// Polls `check` every 50 ms until it holds (at most 20 s).
fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn captured_sidecars_of_a_control_plane_speak_mutual_tls_under_authorization() {
    if !can_capture() || !has_tools() {
        return;
    }
    let subnet = 21;
    let (client, server, _bridge) = support::netns::bridged("t", subnet);
    let server_ip = format!("10.251.{subnet}.2");
    let client_ip = format!("10.251.{subnet}.1");
    client.resolv_conf(&format!("nameserver {server_ip}\n"));
    serve_upstream_resolver(&server, &server_ip, Ipv4Addr::new(192, 0, 2, 7));
    serve_echo(&server, 9080, "reviews");
    let dir = TempDir::new("capture-control");
    let control = support::Control::start_on(
        &dir,
        "control",
        &dir.0.join("control-data"),
        &["--grpc-addr", &format!("10.251.{subnet}.254:0")],
    )
    .await;
    serve_proxy_protocol(&server, 6000);
    // A virtual-IP range of the operator's: the sidecars learn it from the control plane
    // after they start, and route it then.
    control.apply(
        r#"apiVersion: weft.dev/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec: {virtualIPRange: 240.241.0.0/16}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: reviews}
spec:
  selector: {app: reviews}
  ports:
  - {port: 80}
  - {port: 6000, protocol: tcp, targetPort: 6000, proxyProtocol: v2}
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-secrets}
spec:
  targetRef: {kind: Service, name: reviews}
  action: DENY
  rules:
  - to: [{paths: ["/secret*"]}]
"#,
    );
    let grpc = control.grpc.to_string();
    let reviews_token = control.join_token(&dir, "reviews", "default");
    let web_token = control.join_token(&dir, "web", "default");
    let advertise = format!("{server_ip}:15006");
    let _server_proxy = Sidecar::start(
        &server,
        &dir,
        "reviews",
        &[
            "--control",
            &grpc,
            "--token-file",
            reviews_token.to_str().unwrap(),
            "--service",
            "reviews",
            "--id",
            "reviews-1",
            "--app-addr",
            "127.0.0.1:9080",
            "--advertise-addr",
            &advertise,
            "--health-interval",
            "200ms",
            "--capture",
        ],
    );
    let client_proxy = Sidecar::start(
        &client,
        &dir,
        "web",
        &[
            "--control",
            &grpc,
            "--token-file",
            web_token.to_str().unwrap(),
            "--service",
            "web",
            "--telemetry-interval",
            "1s",
            "--capture",
        ],
    );

    // The name is discovered from the control plane on the first question, and the
    // virtual IP is the control plane's: the same for every proxy.
    let mut vip = Vec::new();
    until("reviews to resolve through the control plane", || {
        vip = addresses(&resolve(&client, &server_ip, "reviews"));
        !vip.is_empty()
    });
    assert!(vip[0].starts_with("240.241."), "{vip:?}");
    until("the operator's range to be routed in the client's namespace", || {
        run(&["ip", "-n", &client.name, "route"]).contains("240.241.0.0/16 dev lo proto 77")
    });
    let (ok, described, err) = control.cli(&["describe", "service", "reviews"]);
    assert!(ok, "{err}");
    assert!(described.contains(&format!("Virtual IP: {}\n", vip[0])), "{described} vs {vip:?}");

    // curl with no proxy settings reaches reviews over mutual TLS, and reviews' app sees
    // the caller's address.
    let mut reached = (String::new(), String::new());
    until("curl http://reviews/ to reach the registered workload", || {
        reached = curl(&client, "http://reviews/");
        reached.0 == "200"
    });
    assert_eq!(reached.1, format!("reviews saw host=reviews xff={client_ip}"));
    assert!(
        client_proxy.metric("weft_requests_total", &["destination_service=\"default/reviews\"", "tls=\"true\""]) >= 1.0,
        "the hop between the sidecars is mutual TLS: {}",
        client_proxy.metrics()
    );
    // Authorization applies to captured traffic as to any other.
    let (status, body) = curl(&client, "http://reviews/secret");
    assert_eq!(status, "403", "{body}");
    // A tcp port the application serves on a port of its own, behind the PROXY
    // protocol: the caller's address arrives in the header, over mutual TLS.
    assert_eq!(netcat(&client, "reviews", 6000), format!("proxied from {client_ip}\n"));
    // The control plane sees the captured calls as the mesh's: an edge from web's
    // identity to reviews', over mutual TLS.
    until("weft stat edges to show web -> reviews over mutual TLS", || {
        let (ok, out, _) = control.cli(&["stat", "edges", "-w", "1m", "-o", "json"]);
        let edges: serde_json::Value =
            if ok { serde_json::from_str(&out).unwrap_or_default() } else { Default::default() };
        edges["rows"].as_array().into_iter().flatten().any(|row| {
            row["source"]["identity"] == "spiffe://weft.local/ns/default/sa/web"
                && row["destination"]["service"] == "default/reviews"
                && row["mtls"] == true
                && row["requests"].as_u64().unwrap_or(0) >= 1
        })
    });
    // A call by IP to the registered workload is meshed too.
    let (status, body) = curl(&client, &format!("http://{server_ip}:15006/"));
    assert_eq!(status, "200", "{body}\n{}", client_proxy.log());
    assert!(
        client_proxy.metric("weft_captured_connections_total", &["destination=\"endpoint\"", "outcome=\"meshed\""])
            >= 1.0
    );
    // The kernel tracks only the connections capture rewrites: the client's curl to the
    // virtual IP, never the mesh's own (the sidecars' mutual TLS on 15006, the server's
    // sidecar to its application over loopback), which would cost a lookup per packet.
    let tracked =
        |namespace: &Namespace| run(&["ip", "netns", "exec", &namespace.name, "cat", "/proc/net/nf_conntrack"]);
    let client_tracked = tracked(&client);
    assert!(client_tracked.contains(&format!("dst={} sport=", vip[0])), "{client_tracked}");
    // (The curl to 15006 by IP is tracked, its reply rewritten; the sidecar's own
    // connection there, whose reply would come from 15006 unrewritten, is not.)
    let own_reply = format!("src={server_ip} dst={client_ip} sport=15006 ");
    assert!(!client_tracked.contains(&own_reply), "the sidecar's own connection is tracked:\n{client_tracked}");
    let server_tracked = tracked(&server);
    for port in ["15006", "9080", "6000"] {
        let untracked = format!("dport={port} ");
        assert!(!server_tracked.contains(&untracked), "{port} tracked on the server:\n{server_tracked}");
    }
}
