//! A real Prometheus (Debian's) finds a live mesh through the control plane's HTTP
//! service discovery, with a viewer token and the mesh's roots exactly as README says,
//! scrapes every proxy and the control plane, and every query of the Grafana dashboard
//! in the repository (deploy/grafana/weft.json) returns data.

mod support;

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use serde_json::Value;
use support::{eventually, http_get, Control, Proxy, TempDir, TestApp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PROMETHEUS: &str = "/usr/bin/prometheus";

const MESH: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: reviews}
spec: {selector: {app: reviews}, ports: [{port: 80, protocol: http}]}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: db}
spec: {selector: {app: db}, ports: [{port: 5432, protocol: tcp}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews}
spec:
  parentRefs: [{kind: Service, name: reviews, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: reviews, port: 80}]
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews}
spec:
  targetRef: {kind: Service, name: reviews}
  retries: {attempts: 2, retryOn: [5xx], budget: {ratio: 1.0, minPerSecond: 100, window: 10s}}
"#;

struct Prometheus {
    child: Child,
    address: SocketAddr,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP echo server: the `db` application.
async fn echo_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buffer = [0u8; 1024];
                while let Ok(read) = stream.read(&mut buffer).await {
                    if read == 0 || stream.write_all(&buffer[..read]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    address
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// Runs a PromQL instant query; the result vector.
async fn query(prometheus: SocketAddr, expr: &str) -> Vec<Value> {
    let encoded: String = url_encode(expr);
    let Ok((200, body)) = http_get(prometheus, &format!("/api/v1/query?query={encoded}"), &[]).await else {
        return Vec::new();
    };
    let answer: Value = serde_json::from_slice(&body).unwrap_or_default();
    answer["data"]["result"].as_array().cloned().unwrap_or_default()
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every query of the dashboard, with its variables set as Grafana would for "All".
fn dashboard_queries() -> Vec<(String, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/grafana/weft.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "20s")
                .replace("$namespace", ".+")
                .replace("$service", ".+");
            queries.push((panel["title"].as_str().unwrap().to_string(), expr));
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(definition) = variable["definition"].as_str() {
            // label_values(METRIC{...}, LABEL): the series it reads must exist.
            let inner = definition.trim_start_matches("label_values(").trim_end_matches(')');
            let metric = inner.rsplit_once(',').map_or(inner, |(metric, _)| metric).replace("$namespace", ".+");
            queries.push((format!("variable {}", variable["name"]), metric));
        }
    }
    queries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_discovers_the_mesh_and_every_dashboard_query_has_data() {
    if !std::path::Path::new(PROMETHEUS).exists() {
        support::skip("Prometheus is not installed (Debian: prometheus)");
        return;
    }
    let dir = TempDir::new("prometheus");
    let control = Control::start(&dir, "control").await;
    let (ok, _, err) = control.cli_with_stdin(&["apply", "-f", "-"], Some(MESH));
    assert!(ok, "{err}");
    // What README tells an operator to make: a viewer token and the mesh's roots.
    let (ok, token, err) = control.cli(&["token", "create", "--role", "viewer", "--name", "prometheus"]);
    assert!(ok, "{err}");
    let token_file = dir.write("viewer.token", token.trim());
    let (ok, bundle, err) = control.cli(&["ca", "bundle"]);
    assert!(ok && bundle.starts_with("-----BEGIN CERTIFICATE-----"), "{bundle}{err}");
    let ca_file = dir.write("mesh-ca.pem", &bundle);

    let (good, flaky, web_app) =
        (TestApp::start("good").await, TestApp::start("flaky").await, TestApp::start("web").await);
    flaky.set_status(503);
    let db = echo_server().await;
    let sidecar = |id: &'static str, service: &'static str, app: SocketAddr, extra: Vec<&'static str>| {
        let (dir, control) = (&dir, &control);
        async move {
            let app = app.to_string();
            let args =
                [&["--id", id, "--service", service, "--app-addr", &app, "--health-interval", "200ms"][..], &extra]
                    .concat();
            Proxy::start_controlled(dir, id, control, &args).await
        }
    };
    let _good = sidecar("reviews-1", "reviews", good.address, vec![]).await;
    let _flaky = sidecar("reviews-2", "reviews", flaky.address, vec![]).await;
    let _db = sidecar("db-1", "db", db, vec!["--protocol", "tcp", "--service-port", "5432"]).await;
    let web = sidecar("web-1", "web", web_app.address, vec!["--upstream", "db=127.0.0.1:0"]).await;

    // Traffic for as long as the test runs: HTTP through the route (some retried), and
    // TCP connections through the upstream listener.
    let running = Arc::new(AtomicBool::new(true));
    let traffic = {
        let (running, outbound, upstream) = (running.clone(), web.outbound, web.upstreams["db"]);
        tokio::spawn(async move {
            let http = support::client();
            let mut round = 0u64;
            while running.load(Ordering::Relaxed) && round < 20_000 {
                let _ = support::get_via(&http, outbound, "reviews", "/", &[]).await;
                if round.is_multiple_of(10) {
                    if let Ok(mut stream) = tokio::net::TcpStream::connect(upstream).await {
                        let mut echo = [0u8; 4];
                        let _ = stream.write_all(b"ping").await;
                        let _ = tokio::time::timeout(Duration::from_secs(1), stream.read_exact(&mut echo)).await;
                    }
                }
                round += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let address = free_port();
    let config = format!(
        r#"
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: weft-proxies
    http_sd_configs:
      - url: {server}/api/v1/prometheus/targets
        refresh_interval: 1s
        authorization: {{type: Bearer, credentials_file: {token}}}
        tls_config: {{ca_file: {ca}}}
  - job_name: weft-control
    scheme: https
    authorization: {{type: Bearer, credentials_file: {token}}}
    tls_config: {{ca_file: {ca}}}
    static_configs: [{{targets: ["{api}"]}}]
"#,
        server = control.server(),
        api = control.server().trim_start_matches("https://"),
        token = token_file.display(),
        ca = ca_file.display(),
    );
    let config_file = dir.write("prometheus.yml", &config);
    let log = std::fs::File::create(dir.0.join("prometheus.log")).unwrap();
    let prometheus = Prometheus {
        child: Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!("--storage.tsdb.path={}", dir.0.join("tsdb").display()))
            .arg(format!("--web.listen-address={address}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus starts"),
        address,
    };
    let prometheus_log = || std::fs::read_to_string(dir.0.join("prometheus.log")).unwrap_or_default();

    // Discovery: the four proxies, labelled, and the control plane, all up.
    let targets =
        eventually(Duration::from_secs(30), "Prometheus to scrape every proxy and the control plane", || async {
            let (status, body) = http_get(prometheus.address, "/api/v1/targets", &[]).await.ok()?;
            let answer: Value = serde_json::from_slice(&body).ok().filter(|_| status == 200)?;
            let active = answer["data"]["activeTargets"].as_array()?.clone();
            let up = active.iter().filter(|t| t["health"] == "up").count();
            (active.len() == 5 && up == 5).then_some(active)
        })
        .await;
    let web_target = targets.iter().find(|t| t["labels"]["workload"] == "web-1").expect("web's target");
    assert_eq!(web_target["labels"]["service"], "web");
    assert_eq!(web_target["labels"]["namespace"], "default");
    assert_eq!(web_target["scrapeUrl"], format!("http://{}/metrics", web.admin));

    // Every panel's query, and every variable's, returns data.
    for (title, expr) in dashboard_queries() {
        let found = eventually(Duration::from_secs(40), &format!("data for {title:?}: {expr}"), || {
            let expr = expr.clone();
            async move {
                let result = query(prometheus.address, &expr).await;
                (!result.is_empty()).then_some(result)
            }
        })
        .await;
        assert!(!found.is_empty(), "{title}: {expr}\n{}", prometheus_log());
    }
    running.store(false, Ordering::Relaxed);
    let _ = traffic.await;
}
