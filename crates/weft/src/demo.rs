//! `weft demo`: a whole mesh on loopback in one command, for a first look.
//!
//! It starts, as child processes of this one: a control plane on a temporary store; six
//! demo service instances (`weft demo-app`), each with its own sidecar
//! (`weft proxy --control ...`) that registers it; an entry proxy that serves as the
//! mesh's HTTP proxy for the user's curl; and, in this process, a traffic generator. It
//! applies the demo's resources (Services, a 90/10 canary route, retries for the flaky
//! service), makes a `demo` context current (so that every command it prints works with
//! no exports), prints where everything is and what to try, and stops everything on
//! Ctrl-C or SIGTERM, leaving nothing running and the previous context current.
//!
//! Every part binds port 0 itself and reports what it got in its ports file: no port is
//! ever chosen for another process (which something else could take first). Ctrl-C stops
//! the demo at any moment, while it starts too; a part that exits stops everything at
//! once, and the demo says which part it was, with the end of its log.
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

/// One child process of the demo.
struct Part {
    name: String,
    child: Child,
    log: PathBuf,
}

/// The demo's child processes and its context, all stopped or restored in one place,
/// whatever ends the demo (Ctrl-C at any moment, a part that fails, a panic).
struct Processes {
    parts: Vec<Part>,
    control: Option<Part>,
    dir: PathBuf,
    /// The contexts file's current context before the demo made `demo` current.
    previous_context: Option<Option<String>>,
}

impl Processes {
    /// The first part that has exited, with the end of its log.
    fn exited(&mut self) -> Option<String> {
        for part in self.parts.iter_mut().chain(self.control.iter_mut()) {
            if let Ok(Some(status)) = part.child.try_wait() {
                let log = std::fs::read_to_string(&part.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(8).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                return Some(format!(
                    "{} exited ({status}); the last lines of {}:\n{}",
                    part.name,
                    part.log.display(),
                    tail.join("\n")
                ));
            }
        }
        None
    }

    fn stop(&mut self) {
        // Proxies and apps first (the sidecars deregister), then the control plane.
        for part in &self.parts {
            terminate(&part.child);
        }
        let mut children: Vec<Child> = self.parts.drain(..).map(|p| p.child).collect();
        wait_all(&mut children, Duration::from_secs(10));
        if let Some(mut control) = self.control.take() {
            terminate(&control.child);
            wait_all(std::slice::from_mut(&mut control.child), Duration::from_secs(5));
        }
        if let Some(previous) = self.previous_context.take() {
            restore_context(previous);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Makes a `demo` context current, for the demo's server and admin token, so that every
/// command the demo prints works with no exports; returns the one that was current.
fn use_demo_context(server: &str, token_file: &Path) -> anyhow::Result<Option<String>> {
    let path = crate::context::path();
    let mut contexts = crate::context::Contexts::load(&path)?;
    let previous = contexts.current.clone();
    contexts.set(crate::context::Context {
        name: "demo".into(),
        server: server.to_string(),
        token_file: Some(token_file.to_path_buf()),
        ca_file: None,
    });
    contexts.current = Some("demo".into());
    contexts.save(&path)?;
    Ok(previous)
}

fn restore_context(previous: Option<String>) {
    let path = crate::context::path();
    let Ok(mut contexts) = crate::context::Contexts::load(&path) else { return };
    let _ = contexts.delete("demo");
    contexts.current = previous.filter(|name| contexts.contexts.iter().any(|c| &c.name == name));
    if let Err(error) = contexts.save(&path) {
        eprintln!("warning: cannot restore the previous context in {}: {error:#}", path.display());
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

type Shared = Arc<std::sync::Mutex<Processes>>;

fn lock(processes: &Shared) -> std::sync::MutexGuard<'_, Processes> {
    processes.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads a part's `--ports-file` once it exists and parses; fails at once, naming the
/// part, if it or any other part exits first.
async fn wait_for_ports(path: &Path, what: &str, processes: &Shared) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(failure) = lock(processes).exited() {
            bail!("{failure}");
        }
        if let Some(ports) = std::fs::read_to_string(path).ok().and_then(|t| serde_json::from_str(&t).ok()) {
            return Ok(ports);
        }
        if Instant::now() > deadline {
            bail!("{what} did not start within 30s; see its log in {}", path.parent().unwrap_or(path).display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a started demo serves.
struct Started {
    api: String,
    server: String,
    grpc: String,
    entry: SocketAddr,
    token_file: PathBuf,
    canary: PathBuf,
    /// A viewer token to log in to the dashboard with.
    viewer_token: String,
}

/// Runs the demo until Ctrl-C or SIGTERM, which stop it at any moment, starting or not;
/// a part that fails stops everything at once, naming the part.
pub async fn run(options: DemoOptions) -> anyhow::Result<()> {
    // First of all, so that no signal in the first moments is missed.
    let stop = stop_signal()?;
    tokio::pin!(stop);
    let weft = std::env::current_exe().context("cannot find the weft binary to start the demo's processes")?;
    let dir = std::env::temp_dir().join(format!("weft-demo-{}", std::process::id()));
    fresh_dir(&dir)?;
    let processes: Shared = Arc::new(std::sync::Mutex::new(Processes {
        parts: Vec::new(),
        control: None,
        dir: dir.clone(),
        previous_context: None,
    }));
    let stop_everything = |processes: Shared| async move {
        tokio::task::spawn_blocking(move || lock(&processes).stop()).await.ok();
    };
    println!("weft demo: starting a control plane and six services behind their sidecars (Ctrl-C stops it)...");
    let started = tokio::select! {
        started = start(&options, &weft, &dir, &processes) => started,
        () = &mut stop => {
            println!("\nstopping: interrupted while starting; stopping every process...");
            stop_everything(processes).await;
            println!("weft demo stopped; nothing is left running.");
            return Ok(());
        }
    };
    let started = match started {
        Ok(started) => started,
        Err(error) => {
            eprintln!("weft demo failed to start: {error:#}\nstopping every process...");
            stop_everything(processes).await;
            return Err(error.context("weft demo did not start; nothing is left running"));
        }
    };
    if let Some(path) = &options.ports_file {
        std::fs::write(
            path,
            serde_json::json!({
                "api": started.api,
                "server": started.server,
                "grpc": started.grpc,
                "entry": started.entry.to_string(),
                "adminTokenFile": started.token_file.display().to_string(),
            })
            .to_string(),
        )?;
    }
    print_welcome(&started, &dir, options.rate);

    // Traffic until stopped, or until a part fails.
    let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let traffic = tokio::spawn(generate(http, started.entry, options.rate, sent.clone(), failed.clone()));
    let failure = tokio::select! {
        () = &mut stop => None,
        failure = watch_parts(&processes) => Some(failure),
    };
    traffic.abort();
    println!(
        "\nstopping: {} requests sent, {} failed; stopping every process...",
        sent.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    stop_everything(processes).await;
    match failure {
        None => {
            println!("weft demo stopped; nothing is left running.");
            Ok(())
        }
        Some(failure) => bail!("{failure}\nweft demo stopped everything; nothing is left running"),
    }
}

/// Completes when a part of the demo exits: what and why.
async fn watch_parts(processes: &Shared) -> String {
    loop {
        if let Some(failure) = lock(processes).exited() {
            return failure;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Completes on Ctrl-C or SIGTERM; the handlers are installed when this is called.
fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch Ctrl-C")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}

/// Starts every part, each binding port 0 itself and reporting what it got (no port is
/// ever picked for another process, which could take it first), and waits until a
/// request crosses the whole chain.
async fn start(options: &DemoOptions, weft: &Path, dir: &Path, processes: &Shared) -> anyhow::Result<Started> {
    let spawn = |args: &[String], name: &str| -> anyhow::Result<Part> {
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(weft)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Part { name: name.to_string(), child, log })
    };
    let strings = |args: &[&str]| args.iter().map(|a| a.to_string()).collect::<Vec<String>>();

    // The control plane, on a throwaway store.
    let ports_file = dir.join("control.ports.json");
    let store = dir.join("store").display().to_string();
    let args = strings(&[
        "control",
        "--api-addr",
        &options.api_addr.to_string(),
        "--grpc-addr",
        "127.0.0.1:0",
        "--lease",
        "5s",
        "--data-dir",
        &store,
        "--ports-file",
        &ports_file.display().to_string(),
    ]);
    let mut control = spawn(&args, "control plane")?;
    control.name = format!("the control plane (--api-addr {})", options.api_addr);
    lock(processes).control = Some(control);
    let ports = wait_for_ports(&ports_file, "the control plane", processes).await?;
    let api = ports["api"].as_str().unwrap_or_default().to_string();
    let grpc = ports["grpc"].as_str().unwrap_or_default().to_string();
    let server_url = ports["server"].as_str().unwrap_or_default().to_string();
    let token_file = dir.join("store").join(weft_control::operator_tokens::ADMIN_TOKEN_FILE);
    let previous = use_demo_context(&server_url, &token_file)?;
    lock(processes).previous_context = Some(previous);

    // The demo's resources.
    let resources = dir.join("demo.yaml");
    std::fs::write(&resources, format!("{RESOURCES}---\n{}", canary_route(90, 10)))?;
    let canary = dir.join("canary-50.yaml");
    std::fs::write(&canary, canary_route(50, 50))?;
    let server = crate::cli::ServerArgs {
        server: Some(server_url.clone()),
        token_file: Some(token_file.clone()),
        ..Default::default()
    };
    let client = crate::cli::ApiClient::new(&server)?;
    // A viewer token for the dashboard: looking needs no admin.
    let made = client
        .call(
            http::Method::POST,
            "/api/v1/tokens",
            Some(serde_json::json!({"role": "viewer", "name": "demo dashboard", "ttl": "24h"})),
        )
        .await
        .context("making the dashboard's viewer token")?;
    let viewer_token = made["token"].as_str().context("the control plane answered without a token")?.to_string();
    let sources = crate::cli::read_sources(std::slice::from_ref(&resources))?;
    client
        .call(http::Method::POST, "/api/v1/apply", Some(serde_json::json!({ "sources": sources })))
        .await
        .context("applying the demo's resources")?;

    // The service instances: each app binds port 0 and reports it, then its sidecar (which
    // binds port 0 too) is started in front of it; the app reads the sidecar's outbound
    // address from the sidecar's ports file when it first calls.
    for instance in &INSTANCES {
        let name = format!("{}-{}", instance.service, instance.version);
        let app_ports = dir.join(format!("{name}-app.ports.json"));
        let sidecar_ports = dir.join(format!("{name}.ports.json"));
        let mut args = strings(&[
            "demo-app",
            "--listen",
            "127.0.0.1:0",
            "--ports-file",
            &app_ports.display().to_string(),
            "--outbound-from",
            &sidecar_ports.display().to_string(),
            "--name",
            &name,
            "--latency",
            instance.latency,
            "--error-rate",
            instance.error_rate,
        ]);
        for call in instance.calls {
            args.extend(["--call".to_string(), call.to_string()]);
        }
        let app = spawn(&args, &format!("{name}-app"))?;
        lock(processes).parts.push(app);
        let app_addr = wait_for_ports(&app_ports, &format!("the {name} app"), processes).await?["listen"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let join_token = join_token_file(&client, dir, instance.service).await?;
        let args = strings(&[
            "proxy",
            "--control",
            &grpc,
            "--token-file",
            &join_token.display().to_string(),
            "--service",
            instance.service,
            "--id",
            &name,
            "--labels",
            &format!("version={}", instance.version),
            "--app-addr",
            &app_addr,
            "--inbound-addr",
            "127.0.0.1:0",
            "--outbound-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--ports-file",
            &sidecar_ports.display().to_string(),
            "--health-interval",
            "1s",
        ]);
        let sidecar = spawn(&args, &format!("{name}-sidecar"))?;
        lock(processes).parts.push(sidecar);
    }

    // The entry proxy: the user's (and the traffic generator's) way into the mesh.
    let entry_ports = dir.join("entry.ports.json");
    let join_token = join_token_file(&client, dir, "entry").await?;
    let args = strings(&[
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
    ]);
    let mut entry = spawn(&args, "entry proxy")?;
    entry.name = format!("the entry proxy (--entry-addr {})", options.entry_addr);
    lock(processes).parts.push(entry);
    let ports = wait_for_ports(&entry_ports, "the entry proxy", processes).await?;
    let entry_addr: SocketAddr = ports["outbound"].as_str().unwrap_or_default().parse()?;

    // Ready when a request crosses the whole chain.
    let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(failure) = lock(processes).exited() {
            bail!("{failure}");
        }
        if get_web(&http, entry_addr).await == Some(200) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the demo mesh did not serve within 30s; logs are in {}", dir.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(Started { api, server: server_url, grpc, entry: entry_addr, token_file, canary, viewer_token })
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

/// Makes `dir` empty and new. A directory of the demo's name can only be left by an
/// earlier demo whose process id this one reuses (ids are unique among live processes,
/// and they wrap): that demo is gone, and its join-token files would otherwise be taken
/// for this mesh's and refused.
fn fresh_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("cannot remove {}, left by an earlier demo", dir.display()))?;
    }
    std::fs::create_dir(dir).with_context(|| format!("cannot create {}", dir.display()))
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

fn print_welcome(started: &Started, dir: &Path, rate: u32) {
    println!(
        r#"
weft demo is running. Ctrl-C stops everything.

  dashboard            {server}/
                       log in with this viewer token: {viewer}
                       (the browser must trust the mesh's root first: weft ca bundle > weft-root.pem,
                       and import it; README, "The dashboard", says how)
  control plane API    {server}  (HTTPS; the CLI's context "demo" is current while the demo runs)
  discovery (gRPC)     {grpc}  (TLS; every sidecar joined with a join token)
  security             every hop between sidecars is mutual TLS with SPIFFE identities
  mesh entry           http://{entry}  (an HTTP proxy into the mesh)
  services             web -> catalog -> reviews (v1 90% / v2 10%) -> ratings (slow, 150ms)
                                     -> inventory (fails 20%, retried by the mesh)
  traffic              {rate} requests/s to web
  logs                 {dir}

Try:
  weft get services
  weft get proxies
  weft describe service reviews
  weft check                 # every sidecar's identity and certificate
  weft stat services         # success rate, requests/s, p50/p95/p99 of every Service
  weft stat edges            # who calls whom, with identities and mutual TLS
  weft tap inventory         # live requests, with why: routes, tries, retries, authz
  weft top catalog           # a live table of catalog's requests by path
  curl -x http://{entry} http://web/
  curl -x http://{entry} -H 'x-canary: true' http://web/     # always reviews v2
  weft apply -f {canary}    # shift the canary to 50/50
  weft history               # who changed what
  weft stat routes reviews --around-revision REVISION   # the canary before and after it
"#,
        server = started.server,
        grpc = started.grpc,
        entry = started.entry,
        dir = dir.display(),
        canary = started.canary.display(),
        viewer = started.viewer_token,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_left_by_an_earlier_demo_is_emptied_before_use() {
        let parent = std::env::temp_dir().join(format!("weft-demo-fresh-{}", std::process::id()));
        let dir = parent.join("weft-demo-1");
        std::fs::create_dir_all(dir.join("store")).unwrap();
        std::fs::write(dir.join("reviews.join-token"), "weft-join.stale").unwrap();
        fresh_dir(&dir).unwrap();
        assert!(std::fs::read_dir(&dir).unwrap().next().is_none(), "the earlier demo's files are gone");
        // And a directory that was never there is made.
        std::fs::remove_dir(&dir).unwrap();
        fresh_dir(&dir).unwrap();
        assert!(dir.is_dir());
        std::fs::remove_dir_all(&parent).unwrap();
    }
}
