//! Control-plane scale: one process simulating N proxies (each a real discovery stream
//! that joins with a join token, registers a workload over mutual TLS, subscribes to
//! services and ACKs every push) against a real
//! `weft control`, measuring the time from an apply to each proxy's ACK of the change,
//! and the control plane's RSS and CPU.
//!
//! Usage: control-scale [--proxies 1000] [--services 1000] [--endpoints 10000]
//!        [--watch 10] [--rounds 10] [--weft target/release/weft]

use std::{
    collections::BTreeSet,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use rand::seq::IndexedRandom;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use weft_api::discovery::{
    control_message, discovery_client::DiscoveryClient, proxy_message, Ack, Health, Hello, ProxyMessage, Workload,
};
use weft_proxy::identity::{self, IdentitySettings, JoinTokenSecret};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 1000)]
    proxies: usize,
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// Endpoints in all: one registered per proxy, the rest as Workload resources.
    #[arg(long, default_value_t = 10_000)]
    endpoints: usize,
    /// Services each proxy calls, besides the shared `svc-0` every change goes to.
    #[arg(long, default_value_t = 10)]
    watch: usize,
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    #[arg(long, default_value = "target/release/weft")]
    weft: PathBuf,
    /// The control plane's store: `embedded`, or `etcd://HOST:PORT[,...]` (an empty etcd;
    /// the bench writes under /weft/).
    #[arg(long, default_value = "embedded")]
    store: String,
}

/// Documents per apply when loading the desired state: 10,000 documents in one apply
/// would pass etcd's default request size (1.5 MiB).
const APPLY_CHUNK: usize = 100;

/// Set once measuring is over, when the streams' ends are expected.
static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// When each proxy saw the marker of the current round.
type Seen = Arc<Mutex<Vec<Option<Instant>>>>;

struct ControlPlane {
    child: Child,
    /// The admin token applies need.
    token: String,
    api: String,
    grpc: String,
    _dir: PathBuf,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

fn start_control(weft: &PathBuf, store: &str) -> anyhow::Result<ControlPlane> {
    let dir = std::env::temp_dir().join(format!("weft-control-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ports = dir.join("ports.json");
    let key_file = dir.join("ca-encryption.key");
    std::fs::write(&key_file, "ab".repeat(32))?;
    let child = Command::new(weft)
        .args(["control", "--api-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0", "--lease", "60s", "--log", "warn"])
        .args(["--store", store])
        // Plain HTTP on loopback: this measures discovery, not the API's TLS.
        .arg("--api-http")
        // A shared store keeps the CA's key encrypted.
        .args(["--ca-encryption-key", &key_file.display().to_string()])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--ports-file")
        .arg(&ports)
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {}; build it with cargo build --release", weft.display()))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(value) =
            std::fs::read_to_string(&ports).ok().and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        {
            let token = std::fs::read_to_string(dir.join("data").join("admin-token"))
                .context("the control plane wrote no admin token")?
                .trim()
                .to_string();
            return Ok(ControlPlane {
                child,
                token,
                api: value["api"].as_str().unwrap_or_default().to_string(),
                grpc: value["grpc"].as_str().unwrap_or_default().to_string(),
                _dir: dir,
            });
        }
        if Instant::now() > deadline {
            bail!("the control plane did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn post(control: &ControlPlane, path: &str, body: String) -> anyhow::Result<Bytes> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = http::Request::post(format!("http://{}{path}", control.api))
        .header(http::header::AUTHORIZATION, format!("Bearer {}", control.token))
        .header(http::header::CONTENT_TYPE, if body.starts_with('{') { "application/json" } else { "application/yaml" })
        .body(Full::new(Bytes::from(body)))?;
    let response = client.request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!("{path} refused: {}", String::from_utf8_lossy(&body));
    }
    Ok(body)
}

async fn apply(control: &ControlPlane, yaml: String) -> anyhow::Result<()> {
    post(control, "/api/v1/apply?source=bench", yaml).await.map(drop)
}

/// A join token for `service`, as `weft token create --service` makes one.
async fn join_token(control: &ControlPlane, service: &str) -> anyhow::Result<JoinTokenSecret> {
    let body = serde_json::json!({ "service": service, "ttl": "1h" }).to_string();
    let answer: serde_json::Value = serde_json::from_slice(&post(control, "/api/v1/tokens", body).await?)?;
    JoinTokenSecret::new(answer["token"].as_str().unwrap_or_default(), "the control plane's answer")
        .map_err(anyhow::Error::msg)
}

fn service(i: usize) -> String {
    format!(
        "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {{name: svc-{i}}}\nspec: {{selector: {{app: svc-{i}}}, ports: [{{port: 80, protocol: http}}]}}\n---\n"
    )
}

fn marker_route(round: usize) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: svc-0-marker}}\nspec:\n  parentRefs: [{{kind: Service, name: svc-0, port: 80}}]\n  rules:\n  - backendRefs: [{{name: svc-0, port: 80}}]\n    filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {{set: [{{name: x-round, value: \"round-{round}\"}}]}}}}]\n"
    )
}

fn rss_and_cpu(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (hwm, ticks / 100.0)
}

async fn simulated_proxy(
    index: usize,
    grpc: String,
    token: JoinTokenSecret,
    subscriptions: Vec<String>,
    seen: Seen,
    marker: Arc<Mutex<String>>,
    connected: mpsc::Sender<()>,
) -> anyhow::Result<()> {
    // As a real proxy does: join with the token (a key made here, a signing request),
    // then stream over mutual TLS with the certificate.
    let settings = IdentitySettings { token, namespace: "default".into(), service_account: None };
    let credentials = identity::join(std::slice::from_ref(&grpc), &settings).await?;
    let channel =
        identity::control_channel(&grpc, identity::control_client_config(&credentials).map_err(anyhow::Error::msg)?)
            .await
            .map_err(anyhow::Error::msg)?;
    let mut client = DiscoveryClient::new(channel);
    let (sender, receiver) = mpsc::channel(8);
    let message = |m: proxy_message::Message| ProxyMessage { message: Some(m) };
    let service = format!("svc-{}", index % 1000);
    // The simulated proxies of one service share its token, as replicas of a workload do.
    let address = format!("127.{}.{}.{}:15006", 1 + index / 65536, (index / 256) % 256, index % 256);
    sender
        .send(message(proxy_message::Message::Hello(Hello {
            proxy_id: format!("sim-{index}"),
            namespace: "default".into(),
            workload: Some(Workload { service, address, weight: 1, service_port: 80, ..Default::default() }),
            subscriptions,
            serving_version: String::new(),
            proxy_version: "bench".into(),
            admin_address: String::new(),
        })))
        .await?;
    sender.send(message(proxy_message::Message::Health(Health { healthy: true, detail: "bench".into() }))).await?;
    let mut inbound = client.stream(ReceiverStream::new(receiver)).await?.into_inner();
    let _ = connected.send(()).await;
    while let Some(reply) = inbound.message().await? {
        let Some(control_message::Message::Config(config)) = reply.message else { continue };
        let now = Instant::now();
        let current = marker.lock().unwrap().clone();
        if !current.is_empty() && config.resources.contains(&current) {
            let mut seen = seen.lock().unwrap();
            if seen[index].is_none() {
                seen[index] = Some(now);
            }
        }
        sender.send(message(proxy_message::Message::Ack(Ack { version: config.version, nonce: config.nonce }))).await?;
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Each simulated proxy holds a socket, and so does the control plane.
    let want = (args.proxies as u64 * 2 + 1024).max(4096);
    if let Err(error) = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, want, want) {
        eprintln!("cannot raise the open-file limit to {want} ({error}); run as root or raise it with ulimit -n");
    }
    let control = start_control(&args.weft, &args.store)?;
    let pid = control.child.id();

    // The desired state: services, and the static share of the endpoints.
    let started = Instant::now();
    let mut documents: Vec<String> = (0..args.services).map(service).collect();
    let static_endpoints = args.endpoints.saturating_sub(args.proxies);
    for i in 0..static_endpoints {
        documents.push(format!(
            "apiVersion: weft.dev/v1alpha1\nkind: Workload\nmetadata: {{name: wl-{i}}}\nspec: {{labels: {{app: svc-{}}}, address: \"10.{}.{}.{}:8080\"}}\n---\n",
            i % args.services,
            i / 65536,
            (i / 256) % 256,
            i % 256
        ));
    }
    for chunk in documents.chunks(APPLY_CHUNK) {
        apply(&control, chunk.concat()).await?;
    }
    println!(
        "applied {} services and {static_endpoints} workloads in {:.2}s",
        args.services,
        started.elapsed().as_secs_f64()
    );

    // A join token per service whose workloads the simulated proxies run.
    let started = Instant::now();
    let mut tokens = Vec::new();
    for service in 0..args.proxies.min(1000) {
        tokens.push(join_token(&control, &format!("svc-{service}")).await?);
    }
    println!("made {} join tokens in {:.2}s", tokens.len(), started.elapsed().as_secs_f64());

    // The proxies.
    let seen: Seen = Arc::new(Mutex::new(vec![None; args.proxies]));
    let marker = Arc::new(Mutex::new(String::new()));
    let (connected_tx, mut connected_rx) = mpsc::channel(args.proxies);
    let names: Vec<String> = (0..args.services).map(|i| format!("default/svc-{i}")).collect();
    let started = Instant::now();
    for index in 0..args.proxies {
        let mut subscriptions: BTreeSet<String> =
            names.choose_multiple(&mut rand::rng(), args.watch).cloned().collect();
        subscriptions.insert("default/svc-0".into());
        let (grpc, seen, marker, connected) =
            (control.grpc.clone(), seen.clone(), marker.clone(), connected_tx.clone());
        let token = tokens[index % tokens.len()].clone();
        tokio::spawn(async move {
            let subscriptions: Vec<String> = subscriptions.into_iter().collect();
            // As a real proxy does, start over with backoff when the stream fails.
            let mut pause = Duration::from_millis(50);
            loop {
                let result = simulated_proxy(
                    index,
                    grpc.clone(),
                    token.clone(),
                    subscriptions.clone(),
                    seen.clone(),
                    marker.clone(),
                    connected.clone(),
                )
                .await;
                if DONE.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                if let Err(error) = result {
                    eprintln!("proxy {index}: {error}; reconnecting");
                }
                tokio::time::sleep(pause.mul_f64(0.5 + rand::random::<f64>())).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        });
    }
    for _ in 0..args.proxies {
        connected_rx.recv().await;
    }
    println!("{} proxy streams open in {:.2}s", args.proxies, started.elapsed().as_secs_f64());
    // Let the registration storm settle (every registration is a store commit and a
    // push to the proxies that watch it): wait until the control plane is idle.
    let settle = Instant::now();
    let mut last_cpu = rss_and_cpu(pid).1;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let cpu = rss_and_cpu(pid).1;
        if cpu - last_cpu < 0.05 || settle.elapsed() > Duration::from_secs(120) {
            break;
        }
        last_cpu = cpu;
    }
    println!("registrations settled in {:.1}s", settle.elapsed().as_secs_f64() + 0.0);
    let (_, cpu_before) = rss_and_cpu(pid);

    let mut samples = Vec::new();
    let mut worst = Vec::new();
    for round in 0..args.rounds {
        let text = format!("round-{round}\"");
        *marker.lock().unwrap() = text;
        seen.lock().unwrap().iter_mut().for_each(|s| *s = None);
        let t0 = Instant::now();
        apply(&control, marker_route(round)).await?;
        let deadline = t0 + Duration::from_secs(30);
        loop {
            let done = seen.lock().unwrap().iter().all(Option::is_some);
            if done || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (mut times, missing) = {
            let seen = seen.lock().unwrap();
            let times: Vec<f64> = seen.iter().flatten().map(|t| t.duration_since(t0).as_secs_f64()).collect();
            (times, seen.iter().filter(|s| s.is_none()).count())
        };
        times.sort_by(f64::total_cmp);
        worst.push(times.last().copied().unwrap_or(f64::NAN));
        println!(
            "round {}: p50 {:.3}s p99 {:.3}s last {:.3}s{}",
            round + 1,
            percentile(&times, 0.5),
            percentile(&times, 0.99),
            times.last().copied().unwrap_or(f64::NAN),
            if missing > 0 { format!(" ({missing} proxies never saw it)") } else { String::new() }
        );
        samples.extend(times);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (rss, cpu_after) = rss_and_cpu(pid);
    DONE.store(true, std::sync::atomic::Ordering::Relaxed);
    samples.sort_by(f64::total_cmp);
    worst.sort_by(f64::total_cmp);
    println!(
        "\n{} proxies × {} services (each watching {} + svc-0), {} endpoints, {} rounds:\n  apply → ACK p50 {:.3}s, p99 {:.3}s; last proxy per round: median {:.3}s, max {:.3}s\n  control plane peak RSS {:.0} MB; CPU {:.2}s for {} applies ({:.3}s each)",
        args.proxies,
        args.services,
        args.watch,
        args.endpoints,
        args.rounds,
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        percentile(&worst, 0.5),
        worst.last().copied().unwrap_or(f64::NAN),
        rss,
        cpu_after - cpu_before,
        args.rounds,
        (cpu_after - cpu_before) / args.rounds as f64
    );
    Ok(())
}
