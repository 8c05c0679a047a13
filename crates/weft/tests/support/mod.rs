//! Shared helpers for weft's end-to-end tests: start real `weft proxy` processes on
//! ephemeral ports, real HTTP servers with controllable behaviour, and clients.
//!
//! Everything polls for readiness with a deadline; nothing sleeps a fixed time to wait.

#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, Request, Response};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioIo},
};
use serde_json::Value;

pub mod hostile;
pub mod netns;

/// The weft binary under test.
pub const WEFT: &str = env!("CARGO_BIN_EXE_weft");

/// Polls `check` every 20ms until it returns `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether this run is CI's (`CI` set to `true` or `1`; `.ci/run` sets it).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// Says that the calling test cannot run on this machine, and why. Outside CI it prints
/// `SKIPPED` and the test passes; in CI it fails, so that a broken install step turns CI
/// red instead of hiding behind green.
pub fn skip(reason: &str) {
    let test = std::thread::current().name().unwrap_or("a test").to_string();
    assert!(!in_ci(), "{test} cannot run: {reason}; CI must provide it (see .ci/run), so this is a failure there");
    println!("SKIPPED {test}: {reason}");
}

/// A non-loopback IPv4 address of this host that a test can listen on and connect to.
///
/// As root the test makes its own (a veth interface with an address from
/// 10.254.0.0/16, removed on drop), so the test never depends on how the host is
/// networked; otherwise it borrows the host's primary address, if it has one.
pub struct NonLoopback {
    pub ip: std::net::IpAddr,
    link: Option<String>,
}

impl NonLoopback {
    /// Makes or finds one; `None` (after [`skip`]) when neither is possible.
    pub fn get() -> Option<NonLoopback> {
        if is_root() {
            static NEXT: AtomicUsize = AtomicUsize::new(1);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let tag = (std::process::id() as usize * 7 + n) % 60_000;
            let (link, peer) = (format!("wt{tag}a"), format!("wt{tag}b"));
            let ip = format!("10.254.{}.{}", tag / 250, tag % 250 + 1);
            let ip_cmd = |args: &[&str]| Command::new("ip").args(args).status().is_ok_and(|s| s.success());
            if ip_cmd(&["link", "add", &link, "type", "veth", "peer", "name", &peer])
                && ip_cmd(&["addr", "add", &format!("{ip}/32"), "dev", &link])
                && ip_cmd(&["link", "set", &link, "up"])
            {
                return Some(NonLoopback { ip: ip.parse().unwrap(), link: Some(link) });
            }
            let _ = Command::new("ip").args(["link", "del", &link]).status();
        }
        // The address the kernel would use toward a documentation-range address; no
        // packet is sent.
        let found = std::net::UdpSocket::bind("0.0.0.0:0")
            .and_then(|socket| socket.connect("192.0.2.1:9").and_then(|()| socket.local_addr()))
            .ok()
            .map(|addr| addr.ip())
            .filter(|ip| !ip.is_loopback() && !ip.is_unspecified());
        match found {
            Some(ip) => Some(NonLoopback { ip, link: None }),
            None => {
                skip("this host has no non-loopback IPv4 address, and only root can make one (ip link add ... veth)");
                None
            }
        }
    }
}

impl Drop for NonLoopback {
    fn drop(&mut self) {
        if let Some(link) = &self.link {
            let _ = Command::new("ip").args(["link", "del", link]).status();
        }
    }
}

/// Whether the tests run as root (network namespaces, interfaces).
pub fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "weft-test-{name}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn write(&self, file: &str, text: &str) -> PathBuf {
        let path = self.0.join(file);
        // Write then rename, so a polling reader never sees a half-written file.
        let tmp = self.0.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // WEFT_KEEP_TEST_DIRS=1 keeps every log and store for a look after the run.
        if std::env::var_os("WEFT_KEEP_TEST_DIRS").is_some() {
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `weft proxy` process, killed on drop.
pub struct Proxy {
    pub child: Child,
    pub outbound: SocketAddr,
    pub inbound: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub upstreams: BTreeMap<String, SocketAddr>,
    pub log: PathBuf,
}

impl Proxy {
    /// Starts `weft proxy --config <config> <args>` with ephemeral ports and waits until
    /// `/ready` answers 200.
    pub async fn start(dir: &TempDir, name: &str, config: &Path, args: &[&str]) -> Proxy {
        Proxy::launch(dir, name, &["--config", config.to_str().unwrap()], args).await
    }

    /// A meshed proxy of `service` (its `--id` too) for the application at `app`, or with
    /// none (an edge that only calls), checking its application's health every 200ms.
    pub async fn meshed(dir: &TempDir, control: &Control, service: &str, app: Option<SocketAddr>) -> Proxy {
        let app = app.map(|a| a.to_string());
        let mut args = vec!["--id", service, "--service", service, "--health-interval", "200ms"];
        if let Some(app) = &app {
            args.extend(["--app-addr", app]);
        }
        Proxy::start_controlled(dir, service, control, &args).await
    }

    /// Starts `weft proxy --control <control> <args>` and waits until it is ready (has
    /// applied its first view).
    /// It joins with a join token `control` makes for its `--service` (else for `name`).
    pub async fn start_controlled(dir: &TempDir, name: &str, control: &Control, args: &[&str]) -> Proxy {
        Proxy::start_with_controls(dir, name, &control.grpc.to_string(), control, args).await
    }

    /// Starts `weft proxy --control <controls>` (a comma-separated list) with a join
    /// token `issuer` makes, and waits until it is ready.
    pub async fn start_with_controls(
        dir: &TempDir,
        name: &str,
        controls: &str,
        issuer: &Control,
        args: &[&str],
    ) -> Proxy {
        let flag = |name: &str| args.iter().position(|a| *a == name).map(|i| args[i + 1]);
        let service = flag("--service").unwrap_or(name);
        let token = issuer.join_token(dir, service, flag("--namespace").unwrap_or("default"));
        Proxy::start_with_token(dir, name, controls, &token, args).await
    }

    /// Starts `weft proxy --control <controls> --token-file <token>` and waits until it
    /// is ready.
    pub async fn start_with_token(dir: &TempDir, name: &str, controls: &str, token: &Path, args: &[&str]) -> Proxy {
        Proxy::launch(dir, name, &["--control", controls, "--token-file", token.to_str().unwrap()], args).await
    }

    async fn launch(dir: &TempDir, name: &str, source: &[&str], args: &[&str]) -> Proxy {
        let ports_file = dir.0.join(format!("{name}.ports.json"));
        let log = dir.0.join(format!("{name}.log"));
        let mut command = Command::new(WEFT);
        command
            .arg("proxy")
            .args(source)
            .args(
                [
                    ("--outbound-addr", "127.0.0.1:0"),
                    ("--admin-addr", "127.0.0.1:0"),
                    ("--inbound-addr", "127.0.0.1:0"),
                ]
                .into_iter()
                .filter(|(flag, _)| !args.contains(flag))
                .flat_map(|(flag, value)| [flag, value]),
            )
            .arg("--ports-file")
            .arg(&ports_file)
            .args(args)
            .env("RUST_LOG", "info,weft_proxy=debug")
            // Spans are sent within 200 ms rather than the default 5 s, so tests that
            // wait for them do not wait long.
            .env("OTEL_BSP_SCHEDULE_DELAY", "200")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = command.spawn().expect("weft binary starts");
        let mut proxy = Proxy {
            child,
            outbound: ([0, 0, 0, 0], 0).into(),
            inbound: None,
            admin: ([0, 0, 0, 0], 0).into(),
            upstreams: BTreeMap::new(),
            log,
        };
        let ports: Value = eventually(Duration::from_secs(20), &format!("{name} to write its ports file"), || {
            let exited = proxy.child.try_wait().unwrap();
            if let Some(status) = exited {
                panic!(
                    "proxy {name} exited early ({status}):\n{}",
                    std::fs::read_to_string(&proxy.log).unwrap_or_default()
                );
            }
            let text = std::fs::read_to_string(&ports_file).ok();
            async move { text.and_then(|t| serde_json::from_str(&t).ok()) }
        })
        .await;
        proxy.outbound = ports["outbound"].as_str().unwrap().parse().unwrap();
        proxy.admin = ports["admin"].as_str().unwrap().parse().unwrap();
        proxy.inbound = ports["inbound"].as_str().map(|s| s.parse().unwrap());
        if let Some(upstreams) = ports["upstreams"].as_object() {
            for (k, v) in upstreams {
                proxy.upstreams.insert(k.clone(), v.as_str().unwrap().parse().unwrap());
            }
        }
        let admin = proxy.admin;
        eventually(Duration::from_secs(10), "proxy /ready", || async move {
            let (status, _) = http_get(admin, "/ready", &[]).await.ok()?;
            (status == 200).then_some(())
        })
        .await;
        proxy
    }

    /// The proxy's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/config` as JSON.
    pub async fn config(&self) -> Value {
        let (_, body) = http_get(self.admin, "/config", &[]).await.unwrap();
        serde_json::from_slice(&body).unwrap()
    }

    /// `/metrics` text.
    pub async fn metrics(&self) -> String {
        let (_, body) = http_get(self.admin, "/metrics", &[]).await.unwrap();
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// Sum of the samples of `metric` whose labels contain every `label="value"` given.
    pub async fn metric_sum(&self, metric: &str, labels: &[&str]) -> f64 {
        metric_sum(&self.metrics().await, metric, labels)
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Sends SIGHUP (reload).
    pub fn hangup(&self) {
        let status = Command::new("kill").args(["-HUP", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `weft control` process on its own data directory, killed on drop.
pub struct Control {
    pub child: Child,
    pub api: SocketAddr,
    pub grpc: SocketAddr,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    /// The admin token the CLI uses: `<data-dir>/admin-token` unless a test points it at
    /// another replica's.
    pub token_file: PathBuf,
    /// The API's URL, `https://ADDR` (or `http://` with `--api-http`).
    pub server_url: String,
    /// The contexts file the CLI is given (none is made unless a test does): the user's
    /// own must not leak into tests.
    pub contexts_file: PathBuf,
}

impl Control {
    /// `weft apply -f -` with `yaml`, which must succeed.
    pub fn apply(&self, yaml: &str) {
        let (ok, out, err) = self.cli_with_stdin(&["apply", "-f", "-"], Some(yaml));
        assert!(ok, "weft apply: {out}{err}");
    }

    /// Starts `weft control` on an ephemeral API port and waits until it answers.
    pub async fn start(dir: &TempDir, name: &str) -> Control {
        let data_dir = dir.0.join(format!("{name}-data"));
        Control::start_on(dir, name, &data_dir, &[]).await
    }

    /// Starts a control plane on `data_dir` (to restart one on the same store), with
    /// extra flags.
    pub async fn start_on(dir: &TempDir, name: &str, data_dir: &Path, extra: &[&str]) -> Control {
        match Control::try_start_on(dir, name, data_dir, extra).await {
            Ok(control) => control,
            Err(log) => panic!("control {name} exited early:\n{log}"),
        }
    }

    /// As `start_on`, but a control plane that exits before it is ready is an `Err`
    /// carrying its log.
    pub async fn try_start_on(dir: &TempDir, name: &str, data_dir: &Path, extra: &[&str]) -> Result<Control, String> {
        let ports_file = dir.0.join(format!("{name}.ports.json"));
        let _ = std::fs::remove_file(&ports_file);
        let log = dir.0.join(format!("{name}.log"));
        let child = Command::new(WEFT)
            .arg("control")
            .args(
                [("--api-addr", "127.0.0.1:0"), ("--grpc-addr", "127.0.0.1:0")]
                    .into_iter()
                    .filter(|(flag, _)| !extra.contains(flag))
                    .flat_map(|(flag, value)| [flag, value]),
            )
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .arg("--ports-file")
            .arg(&ports_file)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("weft binary starts");
        let unset: SocketAddr = ([0, 0, 0, 0], 0).into();
        let token_file = data_dir.join("admin-token");
        let contexts_file = dir.0.join("weft-config.yaml");
        let mut control = Control {
            child,
            api: unset,
            grpc: unset,
            data_dir: data_dir.to_path_buf(),
            log,
            token_file,
            server_url: String::new(),
            contexts_file,
        };
        let ports: Result<Value, String> =
            eventually(Duration::from_secs(20), &format!("{name} to write its ports file"), || {
                let exited =
                    control.child.try_wait().unwrap().map(|status| {
                        format!("({status}) {}", std::fs::read_to_string(&control.log).unwrap_or_default())
                    });
                let text = std::fs::read_to_string(&ports_file).ok();
                async move {
                    match exited {
                        Some(log) => Some(Err(log)),
                        None => text.and_then(|t| serde_json::from_str(&t).ok()).map(Ok),
                    }
                }
            })
            .await;
        let ports = ports?;
        control.api = ports["api"].as_str().unwrap().parse().unwrap();
        control.grpc = ports["grpc"].as_str().unwrap().parse().unwrap();
        control.server_url = ports["server"].as_str().unwrap().to_string();
        Ok(control)
    }

    /// The API's URL, for `--server`.
    pub fn server(&self) -> String {
        self.server_url.clone()
    }

    /// The admin token this control plane wrote.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(&self.token_file).unwrap().trim().to_string()
    }

    /// One API call with the admin token: (status, JSON answer).
    pub async fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        api_request(&self.server_url, Some(&self.admin_token()), method, path, body, None)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// The control plane's own metric `metric` with `labels` (its `/metrics`).
    pub async fn metric(&self, metric: &str, labels: &[&str]) -> f64 {
        let token = self.admin_token();
        let root = token.split('.').nth(3).map(str::to_string);
        let text = raw_get(&self.server(), &token, "/metrics", root.as_deref()).await;
        metric_sum(&text, metric, labels)
    }

    /// Runs a `weft` CLI command against this control plane: (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        self.cli_with_stdin(args, None)
    }

    /// A `weft` CLI command against this control plane, with its token, not yet run.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(WEFT);
        command
            .args(args)
            .env("WEFT_SERVER", self.server())
            .env("WEFT_TOKEN_FILE", &self.token_file)
            .env("WEFT_CONFIG", &self.contexts_file);
        command
    }

    pub fn cli_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
        use std::io::Write;
        let mut child =
            self.command(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        if let Some(text) = stdin {
            child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        }
        drop(child.stdin.take());
        let output = child.wait_with_output().unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// A channel to this control plane's discovery port as the workload `account`, joined
    /// with its own join token and speaking mutual TLS, as a real proxy does: for tests
    /// that script a proxy's side of the protocol.
    pub async fn channel_as(&self, dir: &TempDir, account: &str) -> tonic::transport::Channel {
        use weft_proxy::identity::{control_channel, control_client_config, join, IdentitySettings, JoinTokenSecret};
        let token = std::fs::read_to_string(self.join_token(dir, account, "default")).unwrap();
        let settings = IdentitySettings {
            token: JoinTokenSecret::new(&token, "the test's token").unwrap(),
            namespace: "default".into(),
            service_account: None,
        };
        let grpc = self.grpc.to_string();
        let credentials = join(std::slice::from_ref(&grpc), &settings).await.unwrap();
        control_channel(&grpc, control_client_config(&credentials).unwrap()).await.unwrap()
    }

    /// A join token for `namespace`/`service`, in a file under `dir` (made once per
    /// identity).
    pub fn join_token(&self, dir: &TempDir, service: &str, namespace: &str) -> PathBuf {
        let path = dir.0.join(format!("{namespace}.{service}.join-token"));
        if !path.exists() {
            let (ok, token, err) = self.cli(&["token", "create", "--service", service, "--namespace", namespace]);
            assert!(ok, "weft token create --service {service}: {err}");
            std::fs::write(&path, token.trim()).unwrap();
        }
        path
    }

    /// Stops the process (SIGKILL: a crash, as far as the store can tell).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An etcd cluster on ephemeral loopback ports, every member killed on drop; `None`
/// (with a printed reason) where etcd is not installed.
pub struct Etcd {
    pub members: Vec<EtcdMember>,
}

/// One etcd member.
pub struct EtcdMember {
    pub name: String,
    pub child: Child,
    pub client: SocketAddr,
}

/// Files for an etcd serving TLS and asking clients for certificates.
pub struct EtcdTls {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl EtcdTls {
    /// A CA, a server certificate for 127.0.0.1 and a client certificate, made with
    /// openssl.
    pub fn generate(dir: &TempDir) -> EtcdTls {
        let path = |name: &str| dir.0.join(name);
        let openssl = |args: &[&str]| {
            let output = Command::new("openssl").args(args).current_dir(&dir.0).output().expect("openssl runs");
            assert!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        openssl(
            &[
                &["req", "-x509"],
                &ec[..],
                &["-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=test etcd CA"],
            ]
            .concat(),
        );
        std::fs::write(
            path("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
        )
        .unwrap();
        std::fs::write(path("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        for (name, subject) in [("server", "/CN=etcd"), ("client", "/CN=weft")] {
            openssl(
                &[
                    &["req"],
                    &ec[..],
                    &["-keyout", &format!("{name}.key"), "-out", &format!("{name}.csr"), "-subj", subject],
                ]
                .concat(),
            );
            openssl(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.crt"),
            ]);
        }
        EtcdTls {
            ca: path("ca.crt"),
            server_cert: path("server.crt"),
            server_key: path("server.key"),
            client_cert: path("client.crt"),
            client_key: path("client.key"),
        }
    }
}

impl Etcd {
    /// One member.
    pub async fn start(dir: &TempDir, name: &str) -> Option<Etcd> {
        Etcd::start_cluster(dir, name, 1, None).await
    }

    /// `size` members forming one cluster; with `tls`, clients must use TLS and present a
    /// certificate.
    pub async fn start_cluster(dir: &TempDir, name: &str, size: usize, tls: Option<&EtcdTls>) -> Option<Etcd> {
        if Command::new("etcd").arg("--version").stdout(Stdio::null()).status().is_err() {
            skip("etcd is not installed (Debian: apt-get install etcd-server)");
            return None;
        }
        let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let ports: Vec<(String, u16, u16)> = (0..size).map(|i| (format!("{name}-{i}"), free(), free())).collect();
        let initial = ports
            .iter()
            .map(|(member, _, peer)| format!("{member}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut members = Vec::new();
        for (member, client, peer) in &ports {
            let log = dir.0.join(format!("{member}.log"));
            let mut command = Command::new("etcd");
            command.args(["--name", member, "--data-dir"]).arg(dir.0.join(format!("{member}-data"))).args([
                "--listen-client-urls",
                &format!("{scheme}://127.0.0.1:{client}"),
                "--advertise-client-urls",
                &format!("{scheme}://127.0.0.1:{client}"),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-cluster",
                &initial,
                "--initial-cluster-token",
                name,
            ]);
            if let Some(tls) = tls {
                command
                    .arg("--cert-file")
                    .arg(&tls.server_cert)
                    .arg("--key-file")
                    .arg(&tls.server_key)
                    .arg("--trusted-ca-file")
                    .arg(&tls.ca)
                    .arg("--client-cert-auth");
            }
            let child = command.stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
            members.push(EtcdMember { name: member.clone(), child, client: ([127, 0, 0, 1], *client).into() });
        }
        let etcd = Etcd { members };
        // Plain `/health` cannot check a TLS member, so ask with curl, which takes the
        // client certificate.
        for member in &etcd.members {
            let mut args = vec!["-sf".to_string(), format!("{scheme}://{}/health", member.client)];
            if let Some(tls) = tls {
                for (flag, path) in [("--cacert", &tls.ca), ("--cert", &tls.client_cert), ("--key", &tls.client_key)] {
                    args.extend([flag.to_string(), path.display().to_string()]);
                }
            }
            eventually(Duration::from_secs(30), &format!("etcd member {} to be healthy", member.name), || {
                let output = Command::new("curl").args(&args).output().expect("curl runs");
                let healthy = output.status.success() && String::from_utf8_lossy(&output.stdout).contains("true");
                async move { healthy.then_some(()) }
            })
            .await;
        }
        Some(etcd)
    }

    /// The first member's client address.
    pub fn client(&self) -> SocketAddr {
        self.members[0].client
    }

    /// `etcd://A,B,C` for `weft control --store`.
    pub fn store(&self) -> String {
        let list: Vec<String> = self.members.iter().map(|m| m.client.to_string()).collect();
        format!("etcd://{}", list.join(","))
    }

    /// Kills member `index` (SIGKILL).
    pub fn kill_member(&mut self, index: usize) {
        let _ = self.members[index].child.kill();
        let _ = self.members[index].child.wait();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for member in &mut self.members {
            let _ = member.child.kill();
            let _ = member.child.wait();
        }
    }
}

/// Sums matching samples in a Prometheus text exposition.
pub fn metric_sum(text: &str, metric: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(metric) && line[metric.len()..].starts_with(['{', ' ']))
        .filter(|line| labels.iter().all(|l| line.contains(l)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// How a [`TestApp`] answers.
pub struct AppBehavior {
    pub delay_ms: AtomicU64,
    pub status: AtomicU16,
}

/// A real HTTP/1.1 + HTTP/2 server that answers JSON describing the request it got:
/// `{"app": name, "path": "/p?q", "method": "GET", "headers": {...}}`.
pub struct TestApp {
    pub name: String,
    pub address: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    pub behavior: Arc<AppBehavior>,
    task: tokio::task::JoinHandle<()>,
}

impl TestApp {
    pub async fn start(name: &str) -> TestApp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let behavior = Arc::new(AppBehavior { delay_ms: AtomicU64::new(0), status: AtomicU16::new(200) });
        let app_name = name.to_string();
        let (task_hits, task_behavior) = (hits.clone(), behavior.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (name, hits, behavior) = (app_name.clone(), task_hits.clone(), task_behavior.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let (name, hits, behavior) = (name.clone(), hits.clone(), behavior.clone());
                        async move {
                            hits.fetch_add(1, Ordering::Relaxed);
                            let delay = behavior.delay_ms.load(Ordering::Relaxed);
                            if delay > 0 {
                                tokio::time::sleep(Duration::from_millis(delay)).await;
                            }
                            let (parts, body) = request.into_parts();
                            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            let request = Request::from_parts(parts, ());
                            let headers: serde_json::Map<String, Value> = request
                                .headers()
                                .iter()
                                .map(|(k, v)| (k.to_string(), Value::String(v.to_str().unwrap_or("").to_string())))
                                .collect();
                            let body = serde_json::json!({
                                "app": name,
                                "method": request.method().as_str(),
                                "path": request.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"),
                                "version": format!("{:?}", request.version()),
                                "bodyLength": body.len(),
                                "bodySum": body.iter().map(|&b| b as u64).sum::<u64>(),
                                "headers": headers,
                            });
                            let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
                            *response.status_mut() =
                                hyper::StatusCode::from_u16(behavior.status.load(Ordering::Relaxed)).unwrap();
                            response.headers_mut().insert("x-app", name.parse().unwrap());
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TestApp { name: name.to_string(), address, hits, behavior, task }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::Relaxed)
    }

    pub fn set_delay(&self, delay: Duration) {
        self.behavior.delay_ms.store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn set_status(&self, status: u16) {
        self.behavior.status.store(status, Ordering::Relaxed);
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The HTTP client tests send through proxies with.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A pooling HTTP/1.1 client for sending many requests through a proxy.
pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(64).build_http()
}

/// A finished response: status, headers, body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| panic!("not JSON: {:?}", self.body))
    }

    pub fn app(&self) -> String {
        self.headers.get("x-app").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
    }

    pub fn weft_error(&self) -> Option<String> {
        self.headers.get("weft-error").map(|v| v.to_str().unwrap().to_string())
    }
}

/// Sends `GET path` with `Host: host` to `proxy` (the outbound listener).
pub async fn get_via(
    client: &Client<HttpConnector, Full<Bytes>>,
    proxy: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Answer {
    send_via(client, proxy, "GET", host, path, headers, Bytes::new()).await
}

/// Sends a request with `Host: host` to `proxy`.
pub async fn send_via(
    client: &Client<HttpConnector, Full<Bytes>>,
    proxy: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Answer {
    let mut request = Request::builder().method(method).uri(format!("http://{proxy}{path}")).header("host", host);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = client.request(request.body(Full::new(body)).unwrap()).await.expect("the proxy answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.expect("the body arrives").to_bytes();
    Answer { status, headers, body }
}

/// One plain HTTP/1.1 GET on a fresh connection: (status, body).
pub async fn http_get(address: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<(u16, Bytes), String> {
    let stream = tokio::net::TcpStream::connect(address).await.map_err(|e| e.to_string())?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let mut request = Request::get(path).header("host", address.to_string());
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response =
        sender.send_request(request.body(Full::new(Bytes::new())).unwrap()).await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, body))
}

/// One call to a control plane's API at `server` (`https://` verified by the root hash
/// `token` carries, or by `pin` when given; `http://` as is): (status, JSON answer).
pub async fn api_request(
    server: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
    pin: Option<&str>,
) -> Result<(u16, Value), String> {
    api_request_bytes(server, token, method, path, body.map(|b| b.as_bytes().to_vec()), pin).await
}

/// [`api_request`] with a body of any bytes (sent as `application/yaml`).
pub async fn api_request_bytes(
    server: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    pin: Option<&str>,
) -> Result<(u16, Value), String> {
    let (secure, authority) = match (server.strip_prefix("https://"), server.strip_prefix("http://")) {
        (Some(rest), _) => (true, rest.to_string()),
        (None, Some(rest)) => (false, rest.to_string()),
        _ => return Err(format!("not a URL: {server}")),
    };
    let mut request = Request::builder().method(method).uri(path).header("host", &authority);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    if body.is_some() {
        request = request.header("content-type", "application/yaml");
    }
    let request = request.body(Full::new(Bytes::from(body.unwrap_or_default()))).unwrap();
    let stream = tokio::net::TcpStream::connect(&authority).await.map_err(|e| e.to_string())?;
    let response = if secure {
        let root = pin.map(str::to_string).or_else(|| token.and_then(|t| t.split('.').nth(3)).map(str::to_string));
        let root = root.ok_or("no root hash to verify the server by")?;
        let (config, _) = weft_identity::tls::pinned_control_plane_config(&root, &[b"http/1.1"]).unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, stream)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        sender.send_request(request).await.map_err(|e| e.to_string())?
    } else {
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        sender.send_request(request).await.map_err(|e| e.to_string())?
    };
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
}

/// A GET whose answer is text, not JSON.
pub async fn raw_get(server: &str, token: &str, path: &str, pin: Option<&str>) -> String {
    use http_body_util::BodyExt;
    let authority = server.strip_prefix("https://").expect("the API is HTTPS");
    let stream = tokio::net::TcpStream::connect(authority).await.unwrap();
    let tls = tls_to(stream, pin.expect("a pinned root")).await;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(connection);
    let request = hyper::Request::get(path)
        .header("host", authority)
        .header("authorization", format!("Bearer {token}"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

pub async fn tls_to(
    stream: tokio::net::TcpStream,
    root: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let (config, _) = weft_identity::tls::pinned_control_plane_config(root, &[b"http/1.1"]).unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, stream).await.unwrap()
}

/// Two control-plane replicas on one etcd (`None`, after saying why, when etcd is not
/// installed outside CI), sharing one CA, both with replica A's admin token, each listing
/// both replicas before this returns.
pub async fn two_replicas(dir: &TempDir) -> Option<(Etcd, Control, Control)> {
    let etcd = Etcd::start(dir, "etcd").await?;
    let key = dir.write("ca-encryption.key", &"ab".repeat(32)).display().to_string();
    let store = etcd.store();
    let flags = ["--store", store.as_str(), "--ca-encryption-key", &key];
    let a = Control::start_on(dir, "control-a", &dir.0.join("a"), &flags).await;
    let mut b = Control::start_on(dir, "control-b", &dir.0.join("b"), &flags).await;
    b.token_file = a.token_file.clone();
    let token = a.admin_token();
    for control in [&a, &b] {
        let (server, token) = (control.server(), &token);
        eventually(Duration::from_secs(20), "each replica to list both", || {
            let server = &server;
            async move {
                let (_, status) = api_request(server, Some(token), "GET", "/api/v1/status", None, None).await.ok()?;
                (status["replicas"].as_array()?.len() == 2).then_some(())
            }
        })
        .await;
    }
    Some((etcd, a, b))
}

/// Writes `request` as is to a fresh connection and reads until the peer closes (at
/// most 10 s): the whole answer as text, for requests no well-behaved client would send.
pub async fn raw_exchange(address: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect");
    stream.write_all(request).await.expect("write the request");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// The status of an HTTP/1.1 answer read by [`raw_exchange`] (0 if there is none).
pub fn raw_status(answer: &str) -> u16 {
    answer
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| answer.strip_prefix("HTTP/1.0 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

/// One HTTP/2 (prior knowledge) request on a fresh connection to `address`, with the
/// URI `uri` (its authority becomes `:authority`) and `headers` as given, `Host`
/// included.
pub async fn h2_request(address: SocketAddr, uri: &str, headers: &[(&str, &str)]) -> Result<Answer, String> {
    let stream = tokio::net::TcpStream::connect(address).await.map_err(|e| e.to_string())?;
    let (mut sender, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let mut request = Request::get(uri);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response =
        sender.send_request(request.body(Full::new(Bytes::new())).unwrap()).await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Answer { status, headers, body })
}

/// Runs curl with `args`; returns (exit ok, stdout, stderr). Skips with a message when
/// curl is missing rather than passing silently.
pub fn curl(args: &[&str]) -> (bool, String, String) {
    let output = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl is installed (.ci/run installs it)");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A mesh config with one Service per `(name, selector labels)` and the given workloads
/// `(name, labels, address)`; `extra` documents are appended.
pub fn mesh_yaml(services: &[(&str, &str)], workloads: &[(&str, &str, SocketAddr)], extra: &str) -> String {
    let mut yaml = String::new();
    for (name, selector) in services {
        yaml.push_str(&format!(
            "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{selector: {{{selector}}}, ports: [{{port: 80, protocol: http}}]}}\n---\n"
        ));
    }
    for (name, labels, address) in workloads {
        yaml.push_str(&format!(
            "apiVersion: weft.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}}}\nspec: {{labels: {{{labels}}}, address: \"{address}\"}}\n---\n"
        ));
    }
    yaml.push_str(extra);
    yaml
}

/// `openssl s_client` to `address` with ALPN `alpn`, sending `request`; (stdout, stderr).
pub fn s_client(address: std::net::SocketAddr, alpn: &str, extra: &[&str], request: &str) -> (String, String) {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &address.to_string(), "-alpn", alpn, "-tls1_3", "-ign_eof"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl runs");
    child.stdin.take().unwrap().write_all(request.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    (String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned())
}

/// A `weft demo-app` process: a real server with a set latency and failure rate, and
/// the services it calls (`extra` carries its flags).
pub struct DemoApp {
    pub child: Child,
    pub address: SocketAddr,
}

impl DemoApp {
    pub async fn start(dir: &TempDir, name: &str, extra: &[&str]) -> DemoApp {
        let ports = dir.0.join(format!("{name}-app.ports.json"));
        let child = Command::new(WEFT)
            .args(["demo-app", "--listen", "127.0.0.1:0", "--name", name, "--ports-file"])
            .arg(&ports)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("weft demo-app starts");
        let address = eventually(Duration::from_secs(10), "the demo app's ports file", || {
            let text = std::fs::read_to_string(&ports).ok();
            async move {
                let ports: Value = serde_json::from_str(&text?).ok()?;
                ports["listen"].as_str()?.parse::<SocketAddr>().ok()
            }
        })
        .await;
        DemoApp { child, address }
    }
}

impl Drop for DemoApp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
