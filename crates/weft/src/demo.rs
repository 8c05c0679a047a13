//! `weft demo`: a whole mesh on loopback in one command, for a first look.
//!
//! It starts, as child processes of this one: a control plane on a temporary store; six
//! demo service instances (`weft demo-app`), each run by its own sidecar
//! (`weft proxy --control ... -- weft demo-app ...`) that registers it; an entry proxy
//! that serves as the mesh's HTTP proxy for the user's curl; and, in this process, a
//! traffic generator. It applies the demo's resources (Services, a 90/10 canary route,
//! retries for the flaky service), prints where everything is and what to try, and stops
//! everything on Ctrl-C or SIGTERM, leaving nothing running.
//!
//! The topology: web → catalog → {reviews (v1 90%, v2 10%) → ratings (slow), inventory
//! (fails 20% of the time, retried by the mesh)}.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};

/// The demo's resources, applied at start with `canary_route(90, 10)`.
const RESOURCES: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: web}
spec: {selector: {app: web}, ports: [{port: 80, protocol: http}]}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: catalog}
spec: {selector: {app: catalog}, ports: [{port: 80, protocol: http}]}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: reviews}
spec: {selector: {app: reviews}, ports: [{port: 80, protocol: http}]}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: reviews-v1}
spec: {selector: {app: reviews, version: v1}, ports: [{port: 80, protocol: http}]}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: reviews-v2}
spec: {selector: {app: reviews, version: v2}, ports: [{port: 80, protocol: http}]}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: ratings}
spec: {selector: {app: ratings}, ports: [{port: 80, protocol: http}]}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: inventory}
spec: {selector: {app: inventory}, ports: [{port: 80, protocol: http}]}
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: inventory}
spec:
  targetRef: {kind: Service, name: inventory}
  retries: {attempts: 2, retryOn: [5xx, connect-failure, reset], budget: {ratio: 0.5, minPerSecond: 10}}
"#;

/// The reviews canary route with `v1`/`v2` weights; the header `x-canary: true` always
/// picks v2.
fn canary_route(v1: u32, v2: u32) -> String {
    format!(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: reviews-canary}}
spec:
  parentRefs: [{{kind: Service, name: reviews, port: 80}}]
  rules:
  - matches: [{{headers: [{{name: x-canary, value: "true"}}]}}]
    backendRefs: [{{name: reviews-v2, port: 80}}]
  - backendRefs: [{{name: reviews-v1, port: 80, weight: {v1}}}, {{name: reviews-v2, port: 80, weight: {v2}}}]
"#
    )
}

/// One demo instance: service, version label, name, and what its app does.
struct Instance {
    service: &'static str,
    version: &'static str,
    latency: &'static str,
    error_rate: &'static str,
    calls: &'static [&'static str],
}

const INSTANCES: [Instance; 6] = [
    Instance { service: "web", version: "v1", latency: "0s", error_rate: "0", calls: &["catalog"] },
    Instance { service: "catalog", version: "v1", latency: "0s", error_rate: "0", calls: &["reviews", "inventory"] },
    Instance { service: "reviews", version: "v1", latency: "0s", error_rate: "0", calls: &["ratings"] },
    Instance { service: "reviews", version: "v2", latency: "20ms", error_rate: "0", calls: &["ratings"] },
    Instance { service: "ratings", version: "v1", latency: "150ms", error_rate: "0", calls: &[] },
    Instance { service: "inventory", version: "v1", latency: "0s", error_rate: "0.2", calls: &[] },
];

/// Options of `weft demo`.
pub struct DemoOptions {
    pub api_addr: SocketAddr,
    pub entry_addr: SocketAddr,
    /// Requests per second of generated traffic.
    pub rate: u32,
    /// Where to write the bound addresses as JSON once the demo serves.
    pub ports_file: Option<PathBuf>,
}

/// The child processes, stopped in order on drop.
struct Processes {
    proxies: Vec<Child>,
    control: Option<Child>,
    dir: PathBuf,
}

impl Processes {
    fn stop(&mut self) {
        // Proxies first (each stops its application), then the control plane.
        for child in &self.proxies {
            terminate(child);
        }
        wait_all(&mut self.proxies, Duration::from_secs(10));
        if let Some(mut control) = self.control.take() {
            terminate(&control);
            wait_all(std::slice::from_mut(&mut control), Duration::from_secs(5));
        }
        self.proxies.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        self.stop();
    }
}

fn terminate(child: &Child) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM);
}

fn wait_all(children: &mut [Child], grace: Duration) {
    let deadline = Instant::now() + grace;
    for child in children.iter_mut() {
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// Reads a `--ports-file` once it exists and parses.
async fn wait_for_ports(path: &Path, what: &str, child: &mut Child, log: &Path) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            bail!("{what} exited ({status}) before it was ready:\n{log}");
        }
        if let Some(ports) = std::fs::read_to_string(path).ok().and_then(|t| serde_json::from_str(&t).ok()) {
            return Ok(ports);
        }
        if Instant::now() > deadline {
            bail!("{what} did not start within 30s; see {}", log.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Runs the demo until Ctrl-C or SIGTERM.
pub async fn run(options: DemoOptions) -> anyhow::Result<()> {
    let weft = std::env::current_exe().context("cannot find the weft binary to start the demo's processes")?;
    let dir = std::env::temp_dir().join(format!("weft-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut processes = Processes { proxies: Vec::new(), control: None, dir: dir.clone() };
    let spawn = |args: &[String], name: &str| -> anyhow::Result<(Child, PathBuf)> {
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(&weft)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok((child, log))
    };

    // The control plane, on a throwaway store.
    let ports_file = dir.join("control.ports.json");
    let args: Vec<String> = [
        "control",
        "--api-addr",
        &options.api_addr.to_string(),
        "--grpc-addr",
        "127.0.0.1:0",
        "--lease",
        "5s",
        "--data-dir",
        &dir.join("store").display().to_string(),
        "--ports-file",
        &ports_file.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    let (mut control, control_log) = spawn(&args, "control")?;
    let ports = wait_for_ports(&ports_file, "the control plane", &mut control, &control_log).await?;
    processes.control = Some(control);
    let api = ports["api"].as_str().unwrap_or_default().to_string();
    let grpc = ports["grpc"].as_str().unwrap_or_default().to_string();

    // The demo's resources.
    let resources = dir.join("demo.yaml");
    std::fs::write(&resources, format!("{RESOURCES}---\n{}", canary_route(90, 10)))?;
    let canary = dir.join("canary-50.yaml");
    std::fs::write(&canary, canary_route(50, 50))?;
    let token_file = dir.join("store").join(weft_control::operator_tokens::ADMIN_TOKEN_FILE);
    let server_url = ports["server"].as_str().unwrap_or_default().to_string();
    let server = crate::cli::ServerArgs {
        server: Some(server_url.clone()),
        token_file: Some(token_file.clone()),
        ..Default::default()
    };
    let client = crate::cli::ApiClient::new(&server)?;
    let sources = crate::cli::read_sources(std::slice::from_ref(&resources))?;
    client
        .call(http::Method::POST, "/api/v1/apply", Some(serde_json::json!({ "sources": sources })))
        .await
        .context("applying the demo's resources")?;

    // The service instances, each behind its sidecar, joining with its service's token.
    for instance in &INSTANCES {
        let name = format!("{}-{}", instance.service, instance.version);
        let join_token = join_token_file(&client, &dir, instance.service).await?;
        let app_port = free_port()?;
        let ports_file = dir.join(format!("{name}.ports.json"));
        let mut args: Vec<String> = [
            "proxy",
            "--control",
            &grpc,
            "--token-file",
            &join_token.display().to_string(),
            "--service",
            instance.service,
            "--labels",
            &format!("version={}", instance.version),
            "--app-addr",
            &format!("127.0.0.1:{app_port}"),
            "--inbound-addr",
            "127.0.0.1:0",
            "--outbound-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--ports-file",
            &ports_file.display().to_string(),
            "--health-interval",
            "1s",
            "--",
            &weft.display().to_string(),
            "demo-app",
            "--listen",
            &format!("127.0.0.1:{app_port}"),
            "--name",
            &name,
            "--latency",
            instance.latency,
            "--error-rate",
            instance.error_rate,
        ]
        .map(String::from)
        .to_vec();
        for call in instance.calls {
            args.extend(["--call".to_string(), call.to_string()]);
        }
        let (child, _) = spawn(&args, &name)?;
        processes.proxies.push(child);
    }

    // The entry proxy: the user's (and the traffic generator's) way into the mesh.
    let entry_ports = dir.join("entry.ports.json");
    let join_token = join_token_file(&client, &dir, "entry").await?;
    let args: Vec<String> = [
        "proxy",
        "--control",
        &grpc,
        "--token-file",
        &join_token.display().to_string(),
        "--outbound-addr",
        &options.entry_addr.to_string(),
        "--admin-addr",
        "127.0.0.1:0",
        "--ports-file",
        &entry_ports.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    let (mut entry, entry_log) = spawn(&args, "entry")?;
    let ports = wait_for_ports(&entry_ports, "the entry proxy", &mut entry, &entry_log).await?;
    processes.proxies.push(entry);
    let entry_addr: SocketAddr = ports["outbound"].as_str().unwrap_or_default().parse()?;

    // Ready when a request crosses the whole chain.
    let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if get_web(&http, entry_addr).await == Some(200) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the demo mesh did not serve within 30s; logs are in {}", dir.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some(path) = &options.ports_file {
        std::fs::write(
            path,
            serde_json::json!({
                "api": api,
                "server": server_url,
                "grpc": grpc,
                "entry": entry_addr.to_string(),
                "adminTokenFile": token_file.display().to_string(),
            })
            .to_string(),
        )?;
    }
    print_welcome(&api, &grpc, entry_addr, &canary, &token_file, &dir, options.rate);

    // Traffic until stopped.
    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let traffic = tokio::spawn(generate(http, entry_addr, options.rate, sent.clone(), failed.clone()));
    wait_for_stop().await;
    traffic.abort();
    println!(
        "\nstopping: {} requests sent, {} failed; stopping every process...",
        sent.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    tokio::task::spawn_blocking(move || processes.stop()).await?;
    println!("weft demo stopped; nothing is left running.");
    Ok(())
}

async fn get_web(
    http: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    entry: SocketAddr,
) -> Option<u16> {
    let request = http::Request::get(format!("http://{entry}/"))
        .header(http::header::HOST, "web")
        .body(Full::new(Bytes::new()))
        .ok()?;
    let response = tokio::time::timeout(Duration::from_secs(5), http.request(request)).await.ok()?.ok()?;
    Some(response.status().as_u16())
}

async fn generate(
    http: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    entry: SocketAddr,
    rate: u32,
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (http, sent, failed) = (http.clone(), sent.clone(), failed.clone());
        tokio::spawn(async move {
            sent.fetch_add(1, Ordering::Relaxed);
            if get_web(&http, entry).await != Some(200) {
                failed.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
}

async fn wait_for_stop() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}

/// Makes a join token for `service` (once per service) and writes it to a file only this
/// user can read, as an operator would.
async fn join_token_file(client: &crate::cli::ApiClient, dir: &Path, service: &str) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(format!("{service}.join-token"));
    if path.exists() {
        return Ok(path);
    }
    let body = serde_json::json!({ "service": service, "ttl": "24h" });
    let made = client
        .call(http::Method::POST, "/api/v1/tokens", Some(body))
        .await
        .with_context(|| format!("making a join token for {service}"))?;
    let token = made["token"].as_str().context("the control plane answered without a token")?;
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
    std::io::Write::write_all(&mut file, token.as_bytes())?;
    Ok(path)
}

fn print_welcome(api: &str, grpc: &str, entry: SocketAddr, canary: &Path, token_file: &Path, dir: &Path, rate: u32) {
    let server = if api == "127.0.0.1:15080" { String::new() } else { format!("export WEFT_SERVER=http://{api}\n  ") };
    println!(
        r#"
weft demo is running. Ctrl-C stops everything.

  control plane API    http://{api}
  discovery (gRPC)     {grpc}  (TLS; every sidecar joined with a join token)
  security             every hop between sidecars is mutual TLS with SPIFFE identities
  mesh entry           http://{entry}  (an HTTP proxy into the mesh)
  services             web -> catalog -> reviews (v1 90% / v2 10%) -> ratings (slow, 150ms)
                                     -> inventory (fails 20%, retried by the mesh)
  traffic              {rate} requests/s to web
  logs                 {dir}

Try:
  {server}weft get services
  weft get proxies
  weft describe service reviews
  weft check                 # every sidecar's identity and certificate
  curl -x http://{entry} http://web/
  curl -x http://{entry} -H 'x-canary: true' http://web/     # always reviews v2
  export WEFT_TOKEN_FILE={token_file}   # changes need the admin token
  weft apply -f {canary}    # shift the canary to 50/50
"#,
        dir = dir.display(),
        token_file = token_file.display(),
        canary = canary.display(),
    );
}
