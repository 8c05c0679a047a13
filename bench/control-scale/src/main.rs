//! Control-plane scale: one process simulating N proxies (each a real discovery stream
//! that joins with a join token, registers a workload over mutual TLS, subscribes to
//! services and ACKs every push) against a real
//! `weft control`, measuring the time from an apply to each proxy's ACK of the change,
//! and the control plane's RSS and CPU.
//!
//! Then, with `--telemetry-seconds N`, every simulated proxy reports telemetry as a real
//! one does (its own Report RPC beside its stream, every `--report-interval`): a request
//! row and a try row for each of the `--calls` Services it calls (1,000 proxies calling
//! 10 each: 10,000 edges), an inbound row from each of its callers, a TCP row and an
//! authorization row, each request row with a sketch of ~100 latencies. It measures the
//! control plane's CPU and RSS while reports come in, the series and memory it holds,
//! and how long `weft stat edges` takes to answer under that load.
//!
//! Then, with `--dashboard` (after the telemetry phase, on the 10-minute window it
//! filled), the dashboard's topology of that mesh: the bytes of one refresh (gzipped, as
//! a browser takes it), the control plane's CPU per refresh, and in headless Chromium
//! (through chromedriver) the time from navigation to the first picture and to the
//! finished layout.
//!
//! Usage: control-scale [--proxies 1000] [--services 1000] [--endpoints 10000]
//!        [--watch 10] [--rounds 10] [--telemetry-seconds 0] [--report-interval 5]
//!        [--calls 10] [--dashboard] [--weft target/release/weft]

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
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use weft_api::{
    discovery::{
        control_message, discovery_client::DiscoveryClient, proxy_message, Ack, Health, Hello, ProxyMessage, Workload,
    },
    signals::{Outcome, Signals},
    telemetry,
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
    /// Measure the dashboard's topology after the telemetry phase.
    #[arg(long, requires = "telemetry_seconds")]
    dashboard: bool,
    /// Topology refreshes to measure the control plane's CPU over.
    #[arg(long, default_value_t = 40)]
    refreshes: usize,
    /// How long proxies report telemetry after the rounds (0: not at all).
    #[arg(long, default_value_t = 0)]
    telemetry_seconds: u64,
    /// Seconds between a proxy's reports (a proxy's --telemetry-interval).
    #[arg(long, default_value_t = 5)]
    report_interval: u64,
    /// Services each proxy calls, for its telemetry rows (its edges).
    #[arg(long, default_value_t = 10)]
    calls: usize,
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
/// True while the telemetry phase runs: the simulated proxies report (they wait on it
/// without waking, so that idle reporters cost the rounds before nothing).
static REPORTING: std::sync::LazyLock<tokio::sync::watch::Sender<bool>> =
    std::sync::LazyLock::new(|| tokio::sync::watch::channel(false).0);
/// Reports the control plane took, and refused.
static REPORTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static REPORTS_REFUSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// What a simulated proxy's telemetry looks like.
#[derive(Clone, Copy)]
struct Reporting {
    services: usize,
    calls: usize,
    interval: Duration,
}

/// One interval's signals of one row: ~100 requests, ~1% failures, latencies spread
/// log-normally around 5 ms (about 40 occupied sketch buckets).
fn row_signals() -> telemetry::Signals {
    let mut signals = Signals::default();
    let mut random = rand::rng();
    for _ in 0..100 {
        let status = if random.random_bool(0.01) { 503 } else { 200 };
        let millis = 5.0 * (random.random::<f64>() * 2.0 - 1.0).exp();
        signals.record(Outcome::Response { status, grpc_status: None }, Duration::from_secs_f64(millis / 1000.0));
    }
    (&signals).into()
}

/// The report proxy `index` sends each interval, as a real proxy's would be.
fn report(index: usize, sequence: u64, reporting: Reporting) -> telemetry::ProxyReport {
    let services = reporting.services;
    let own = index % services;
    let identity = |service: usize| format!("spiffe://weft.local/ns/default/sa/svc-{service}");
    let mut requests = Vec::new();
    for call in 1..=reporting.calls {
        let callee = (own + call * 7) % services;
        for kind in [telemetry::RowKind::Request, telemetry::RowKind::Try] {
            requests.push(telemetry::RequestRow {
                direction: telemetry::Direction::Outbound as i32,
                kind: kind as i32,
                peer_identity: identity(callee),
                destination: format!("default/svc-{callee}"),
                route: String::new(),
                backend: format!("default/svc-{callee}"),
                tls: true,
                signals: Some(row_signals()),
            });
        }
        // Its callers are the Services whose calls land here.
        let caller = (own + services * 7 - call * 7) % services;
        requests.push(telemetry::RequestRow {
            direction: telemetry::Direction::Inbound as i32,
            kind: telemetry::RowKind::Request as i32,
            peer_identity: identity(caller),
            destination: format!("default/svc-{own}"),
            tls: true,
            signals: Some(row_signals()),
            ..Default::default()
        });
    }
    telemetry::ProxyReport {
        proxy_id: format!("sim-{index}"),
        sequence,
        interval_millis: reporting.interval.as_millis() as u64,
        requests,
        tcp: vec![telemetry::TcpRow {
            direction: telemetry::Direction::Inbound as i32,
            peer_identity: identity((own + 7) % services),
            destination: format!("default/svc-{own}"),
            tls: true,
            opened: 3,
            closed: 3,
            open: 4,
            bytes_sent: 40_000,
            bytes_received: 400_000,
        }],
        authz: vec![telemetry::AuthzRow { policy: String::new(), allowed: 300, denied: 0 }],
        endpoints: Vec::new(),
        dropped_rows: 0,
    }
}

/// Sends proxy `index`'s reports over `channel` once the telemetry phase starts.
async fn report_telemetry(index: usize, channel: tonic::transport::Channel, reporting: Reporting) {
    let mut client = telemetry::telemetry_client::TelemetryClient::new(channel);
    let mut reporting_now = REPORTING.subscribe();
    if reporting_now.wait_for(|on| *on).await.is_err() {
        return;
    }
    // Spread over the interval, as proxies started at different times are.
    tokio::time::sleep(reporting.interval.mul_f64(rand::random::<f64>())).await;
    let mut tick = tokio::time::interval(reporting.interval);
    for sequence in 1.. {
        tick.tick().await;
        if DONE.load(std::sync::atomic::Ordering::Relaxed) || !*REPORTING.borrow() {
            return;
        }
        let counter = match client.report(report(index, sequence, reporting)).await {
            Ok(_) => &REPORTS,
            Err(_) => &REPORTS_REFUSED,
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

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

/// Who one simulated proxy is and what it does.
#[derive(Clone)]
struct Simulated {
    index: usize,
    grpc: String,
    token: JoinTokenSecret,
    subscriptions: Vec<String>,
    reporting: Reporting,
}

async fn simulated_proxy(
    proxy: Simulated,
    seen: Seen,
    marker: Arc<Mutex<String>>,
    connected: mpsc::Sender<()>,
) -> anyhow::Result<()> {
    let Simulated { index, grpc, token, subscriptions, reporting } = proxy;
    // As a real proxy does: join with the token (a key made here, a signing request),
    // then stream over mutual TLS with the certificate.
    let settings = IdentitySettings { token, namespace: "default".into(), service_account: None };
    let credentials = identity::join(std::slice::from_ref(&grpc), &settings).await?;
    let channel =
        identity::control_channel(&grpc, identity::control_client_config(&credentials).map_err(anyhow::Error::msg)?)
            .await
            .map_err(anyhow::Error::msg)?;
    let reporter = tokio::spawn(report_telemetry(index, channel.clone(), reporting));
    let _stop_reporting = AbortOnDrop(reporter);
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

/// Ends a task when dropped: a proxy's reporter lives as long as its stream.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `GET path` on the API: (status, seconds taken, body).
async fn get(control: &ControlPlane, path: &str) -> anyhow::Result<(u16, f64, Bytes)> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = http::Request::get(format!("http://{}{path}", control.api))
        .header(http::header::AUTHORIZATION, format!("Bearer {}", control.token))
        .body(Full::new(Bytes::new()))?;
    let started = Instant::now();
    let response = client.request(request).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, started.elapsed().as_secs_f64(), body))
}

/// A gauge's value in the control plane's `/metrics`.
fn gauge(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find(|line| line.starts_with(name) && line[name.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// The telemetry phase: every proxy reports for `args.telemetry_seconds`.
async fn measure_telemetry(args: &Args, control: &ControlPlane, pid: u32) -> anyhow::Result<()> {
    let (_, cpu_before) = rss_and_cpu(pid);
    let started = Instant::now();
    REPORTING.send_replace(true);
    let mut queries = Vec::new();
    while started.elapsed() < Duration::from_secs(args.telemetry_seconds) {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let (status, seconds, _) = get(control, "/api/v1/stat/edges?window=1m").await?;
        if status != 200 {
            bail!("weft stat edges answered {status}");
        }
        queries.push(seconds);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (rss, cpu_after) = rss_and_cpu(pid);
    let (_, _, metrics) = get(control, "/metrics").await?;
    let metrics = String::from_utf8_lossy(&metrics);
    let (series, bytes) =
        (gauge(&metrics, "weft_control_telemetry_series"), gauge(&metrics, "weft_control_telemetry_bytes"));
    let (_, query_seconds, edges) = get(control, "/api/v1/stat/edges?window=10m").await?;
    let edges: serde_json::Value = serde_json::from_slice(&edges)?;
    REPORTING.send_replace(false);
    queries.sort_by(f64::total_cmp);
    let reports = REPORTS.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "\ntelemetry: {} proxies reporting every {}s for {:.0}s, {} edges ({} reports taken, {} refused):\n  control plane CPU {:.2}s ({:.1}% of a core, {:.2} ms per report); peak RSS {:.0} MB\n  {} series held, {:.1} MB by its own estimate; weft stat edges (1m) answered in median {:.3}s, max {:.3}s; 10m in {:.3}s ({} rows)",
        args.proxies,
        args.report_interval,
        elapsed,
        args.proxies * args.calls,
        reports,
        REPORTS_REFUSED.load(std::sync::atomic::Ordering::Relaxed),
        cpu_after - cpu_before,
        (cpu_after - cpu_before) / elapsed * 100.0,
        (cpu_after - cpu_before) / reports.max(1) as f64 * 1000.0,
        rss,
        series,
        bytes / 1e6,
        percentile(&queries, 0.5),
        queries.last().copied().unwrap_or(f64::NAN),
        query_seconds,
        edges["rows"].as_array().map_or(0, Vec::len),
    );
    Ok(())
}

/// The dashboard phase: the topology of the mesh the telemetry phase made.
async fn measure_dashboard(control: &ControlPlane, pid: u32, refreshes: usize) -> anyhow::Result<()> {
    const PATH: &str = "/api/v1/topology?window=10m";
    let (_, _, raw) = get(control, PATH).await?;
    let topology: serde_json::Value = serde_json::from_slice(&raw)?;
    let services = topology["services"].as_array().map_or(0, Vec::len);
    let edges = topology["edges"].as_array().map_or(0, Vec::len);
    // What the control plane spends with no refresh (its proxies' streams stay open):
    // subtracted from what it spends over the refreshes. Measured once the last
    // reports are digested (2 s under 5% of a core, for at most 30 s), over 5 s before
    // the refreshes and 5 s after them, and the two averaged.
    let idle_over = |seconds: u64| async move {
        let (_, before) = rss_and_cpu(pid);
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let (_, after) = rss_and_cpu(pid);
        (after - before) / started.elapsed().as_secs_f64()
    };
    let settling = Instant::now();
    while idle_over(2).await > 0.05 && settling.elapsed() < Duration::from_secs(30) {}
    let idle_before = idle_over(5).await;
    // Refreshes as the page makes them, gzipped, one after another: the control plane's
    // CPU over them (the reports have stopped).
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let (_, cpu_before) = rss_and_cpu(pid);
    let refreshing = Instant::now();
    let mut gzipped = 0;
    let mut answers = Vec::new();
    for _ in 0..refreshes {
        let request = http::Request::get(format!("http://{}{PATH}", control.api))
            .header(http::header::AUTHORIZATION, format!("Bearer {}", control.token))
            .header(http::header::ACCEPT_ENCODING, "gzip")
            .body(Full::new(Bytes::new()))?;
        let started = Instant::now();
        let response = client.request(request).await?;
        let encoded = response.headers().get(http::header::CONTENT_ENCODING).is_some_and(|v| v == "gzip");
        gzipped = response.into_body().collect().await?.to_bytes().len();
        answers.push(started.elapsed().as_secs_f64());
        if !encoded {
            bail!("the topology came back without gzip");
        }
    }
    let (_, cpu_after) = rss_and_cpu(pid);
    let refreshed_for = refreshing.elapsed().as_secs_f64();
    let idle_rate = (idle_before + idle_over(5).await) / 2.0;
    let spent = (cpu_after - cpu_before - idle_rate * refreshed_for).max(0.0);
    answers.sort_by(f64::total_cmp);
    let (first, settled) = first_render(control).await?;
    println!(
        "\ndashboard: the topology of {services} services and {edges} edges (10m window):\n  one refresh {:.0} KB ({:.0} KB before gzip), control plane CPU {:.1} ms per refresh beyond its idle {:.1}% of a core (median answer {:.3}s)\n  headless Chromium: first picture {first:.0} ms after navigation, layout finished (no overlaps) at {settled:.0} ms",
        gzipped as f64 / 1024.0,
        raw.len() as f64 / 1024.0,
        spent / refreshes as f64 * 1000.0,
        idle_rate * 100.0,
        percentile(&answers, 0.5),
    );
    Ok(())
}

/// Opens the topology in headless Chromium: (ms to the first picture, ms to the finished
/// layout), both from navigation start, as the page marks them.
async fn first_render(control: &ControlPlane) -> anyhow::Result<(f64, f64)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut driver = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start chromedriver (Debian: chromium chromium-driver)")?;
    let result = async {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("chromedriver did not listen");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let profile = std::env::temp_dir().join(format!("weft-control-scale-chromium-{}", std::process::id()));
        let capabilities = serde_json::json!({"goog:chromeOptions": {"args": [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--window-size=1440,1000", format!("--user-data-dir={}", profile.display()),
        ]}});
        let serde_json::Value::Object(capabilities) = capabilities else { unreachable!() };
        let browser = fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await?;
        let base = format!("http://{}", control.api);
        browser.goto(&format!("{base}/")).await?;
        let login = "return fetch('/api/v1/session', {method: 'POST', headers: {'content-type': 'application/json'}, \
                     body: JSON.stringify({token: arguments[0]})}).then((r) => r.status);";
        let status = browser.execute(login, vec![serde_json::json!(control.token)]).await?;
        if status != 200 {
            bail!("the dashboard login answered {status}");
        }
        // A new document (the query), so that navigation timing starts here.
        browser.goto(&format!("{base}/?bench#/topology?window=10m")).await?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let marks = loop {
            let marks = browser
                .execute(
                    "const at = (name) => (performance.getEntriesByName(name)[0] || {}).startTime;
                     return [at('weft-topology-drawn'), at('weft-topology-settled')];",
                    vec![],
                )
                .await?;
            if marks[1].is_number() {
                break marks;
            }
            if Instant::now() > deadline {
                bail!("the topology did not finish its layout within 120 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let _ = browser.close().await;
        let _ = std::fs::remove_dir_all(&profile);
        Ok((marks[0].as_f64().unwrap_or(f64::NAN), marks[1].as_f64().unwrap_or(f64::NAN)))
    }
    .await;
    let _ = driver.kill();
    let _ = driver.wait();
    result
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
        let reporting = Reporting {
            services: args.services,
            calls: args.calls,
            interval: Duration::from_secs(args.report_interval.max(1)),
        };
        let proxy = Simulated { index, grpc, token, subscriptions: subscriptions.into_iter().collect(), reporting };
        tokio::spawn(async move {
            // As a real proxy does, start over with backoff when the stream fails.
            let mut pause = Duration::from_millis(50);
            loop {
                let result = simulated_proxy(proxy.clone(), seen.clone(), marker.clone(), connected.clone()).await;
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
    if args.telemetry_seconds > 0 {
        measure_telemetry(&args, &control, pid).await?;
    }
    if args.dashboard {
        measure_dashboard(&control, pid, args.refreshes).await?;
    }
    DONE.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}
