//! Golden signals aggregated by the control plane (`weft stat`), against what the test's
//! own client observed on the same requests: the failures counted are the failures the
//! client saw, the latency quantiles are the client's within the sketch's stated error
//! and the hop's added time, retries show as tries above requests (counted by the
//! applications themselves), edges carry the right identities and mutual TLS, and
//! `--around-revision` shows a canary shift exactly as the client saw it.

mod support;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use serde_json::{json, Value};
use support::{client, eventually, get_via, Control, DemoApp, Proxy, TempDir, TestApp};
use weft_api::sketch::RELATIVE_ERROR;

/// A meshed sidecar `id` of `service`, reporting telemetry every second (unless `extra`
/// says otherwise).
async fn sidecar(dir: &TempDir, control: &Control, id: &str, service: &str, app: SocketAddr, extra: &[&str]) -> Proxy {
    let app = app.to_string();
    let interval: &[&str] = if extra.contains(&"--telemetry-interval") { &[] } else { &["--telemetry-interval", "1s"] };
    let args =
        [&["--id", id, "--service", service, "--app-addr", &app, "--health-interval", "200ms"][..], interval, extra]
            .concat();
    Proxy::start_controlled(dir, id, control, &args).await
}

/// `weft stat ARGS -o json`.
fn stat(control: &Control, args: &[&str]) -> Value {
    let (ok, out, err) = control.cli(&[&["stat"], args, &["-o", "json"]].concat());
    assert!(ok, "weft stat {args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("weft stat {args:?}: {e}: {out}"))
}

/// The row of `rows` whose `field` is `value`.
fn row<'a>(answer: &'a Value, field: &str, value: &str) -> Option<&'a Value> {
    answer["rows"].as_array()?.iter().find(|row| row[field] == value)
}

/// What the test's client saw: every request it sent, with its status and latency.
#[derive(Default)]
struct Observed {
    requests: Vec<(u16, Duration, String)>,
}

impl Observed {
    fn failures(&self) -> u64 {
        self.requests.iter().filter(|(status, _, _)| *status >= 500).count() as u64
    }

    /// The nearest-rank quantile of the latencies, in milliseconds.
    fn quantile_ms(&self, q: f64) -> f64 {
        let mut latencies: Vec<Duration> = self.requests.iter().map(|(_, latency, _)| *latency).collect();
        latencies.sort();
        let rank = ((q * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len());
        latencies[rank - 1].as_secs_f64() * 1000.0
    }

    fn max_ms(&self) -> f64 {
        self.requests.iter().map(|(_, latency, _)| latency.as_secs_f64() * 1000.0).fold(0.0, f64::max)
    }

    /// Requests answered by each application.
    fn by_app(&self) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        for (_, _, app) in &self.requests {
            *counts.entry(app.clone()).or_default() += 1;
        }
        counts
    }
}

/// Sends `count` requests for `host` through `proxy`, `concurrency` at a time, and
/// records what the client saw into `observed`.
async fn send(proxy: SocketAddr, host: &str, count: usize, concurrency: usize, observed: &Arc<Mutex<Observed>>) {
    let http = client();
    let remaining = Arc::new(std::sync::atomic::AtomicUsize::new(count));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (http, remaining, observed, host) = (http.clone(), remaining.clone(), observed.clone(), host.to_string());
        tasks.push(tokio::spawn(async move {
            while remaining
                .fetch_update(std::sync::atomic::Ordering::Relaxed, std::sync::atomic::Ordering::Relaxed, |n| {
                    n.checked_sub(1)
                })
                .is_ok()
            {
                let started = Instant::now();
                let answer = get_via(&http, proxy, &host, "/", &[]).await;
                let latency = started.elapsed();
                observed.lock().unwrap().requests.push((answer.status, latency, answer.app()));
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stat_counts_the_failures_and_latencies_the_client_saw_and_edges_carry_identities() {
    let dir = TempDir::new("stat-counts");
    let control = Control::start(&dir, "control").await;
    let app_latency_ms = 100.0;
    let reviews_app = DemoApp::start(&dir, "reviews", &["--latency", "100ms", "--error-rate", "0.3"]).await;
    let web_app = TestApp::start("web").await;
    let reviews = sidecar(&dir, &control, "reviews", "reviews", reviews_app.address, &[]).await;
    let web = sidecar(&dir, &control, "web", "web", web_app.address, &[]).await;

    let observed = Arc::new(Mutex::new(Observed::default()));
    // The first requests wait for discovery; they are the client's too, and counted.
    eventually(Duration::from_secs(10), "reviews to answer through the mesh", || {
        let observed = observed.clone();
        async move {
            send(web.outbound, "reviews", 1, 1, &observed).await;
            (observed.lock().unwrap().requests.last()?.2 == "reviews").then_some(())
        }
    })
    .await;
    send(web.outbound, "reviews", 300, 8, &observed).await;
    // A caller without a proxy, in plaintext, straight to reviews' inbound listener.
    let unmeshed = 7;
    for _ in 0..unmeshed {
        let (ok, _, err) = support::curl(&[
            "-s",
            "-o",
            "/dev/null",
            "-H",
            "Host: reviews",
            &format!("http://{}/", reviews.inbound.unwrap()),
        ]);
        assert!(ok, "{err}");
    }
    let observed = Arc::try_unwrap(observed).ok().unwrap().into_inner().unwrap();
    let sent = observed.requests.len() as u64;

    // The caller's view of the route, once every report is in: exactly the client's.
    let route = eventually(Duration::from_secs(20), "the route's requests to add up", || {
        let answer = stat(&control, &["routes", "reviews", "-w", "10m"]);
        async move { row(&answer, "service", "reviews").filter(|r| r["requests"] == sent).cloned() }
    })
    .await;
    assert_eq!(route["failures"], observed.failures(), "{route}");
    assert_eq!(route["statusClasses"]["5xx"], observed.failures(), "{route}");
    assert_eq!(route["retries"], 0);

    // reviews' own view: the mesh's requests and the unmeshed ones.
    let service = eventually(Duration::from_secs(20), "reviews' own count to add up", || {
        let answer = stat(&control, &["services", "reviews", "-w", "10m"]);
        async move { row(&answer, "name", "reviews").filter(|r| r["requests"] == sent + unmeshed).cloned() }
    })
    .await;
    assert_eq!(service["measuredBy"], "service");
    // The unmeshed caller's answers were 200 or 500 as well; it is the mesh's failures
    // plus the ones curl got that the figures must hold, so count from the rows.
    let mtls_share = service["mtlsShare"].as_f64().unwrap();
    assert!((mtls_share - sent as f64 / (sent + unmeshed) as f64).abs() < 1e-9, "{service}");
    assert!(service["tcpOpened"].as_u64().unwrap() >= 2, "the mesh's connection and curl's: {service}");

    // Latency: every request took the app's 100 ms at least, and the client's time is
    // the proxies' plus at most the hop's added time (bounded by the slowest request's
    // excess over 100 ms). A quantile is within the sketch's error of its true value.
    let hop_ms = observed.max_ms() - app_latency_ms;
    for (field, q) in [("p50Ms", 0.5), ("p95Ms", 0.95), ("p99Ms", 0.99)] {
        let client = observed.quantile_ms(q);
        let reported = route[field].as_f64().unwrap();
        let (low, high) = ((client - hop_ms) * (1.0 - RELATIVE_ERROR), client * (1.0 + RELATIVE_ERROR));
        assert!(
            (low..=high).contains(&reported),
            "route {field} = {reported} ms, client {client} ms, hop at most {hop_ms} ms"
        );
        assert!(reported >= app_latency_ms * (1.0 - RELATIVE_ERROR), "{field} = {reported}");
    }

    // Edges: web to reviews with both identities, over mutual TLS; the unmeshed caller
    // in plaintext.
    let edges = stat(&control, &["edges", "-w", "10m"]);
    let rows = edges["rows"].as_array().unwrap();
    let meshed = rows.iter().find(|r| r["source"]["service"] == "default/web").expect("the web edge");
    assert_eq!(meshed["source"]["identity"], "spiffe://weft.local/ns/default/sa/web");
    assert_eq!(meshed["destination"]["identity"], "spiffe://weft.local/ns/default/sa/reviews");
    assert_eq!((meshed["requests"].as_u64(), meshed["mtls"].as_bool()), (Some(sent), Some(true)));
    let plain = rows.iter().find(|r| r["source"]["service"] == "(unmeshed)").expect("the unmeshed edge");
    assert_eq!((plain["requests"].as_u64(), plain["mtls"].as_bool()), (Some(unmeshed), Some(false)));
    assert_eq!(plain["destination"]["service"], "default/reviews");

    // The table an operator reads.
    let (ok, out, err) = control.cli(&["stat", "services", "-w", "10m"]);
    assert!(ok && out.contains("SUCCESS") && out.contains("reviews"), "{out}{err}");
    let (ok, out, err) = control.cli(&["stat", "edges", "-w", "10m"]);
    assert!(ok && out.contains("spiffe://weft.local/ns/default/sa/web") && out.contains("yes"), "{out}{err}");
    drop((reviews, web));
}

const RETRY_POLICY: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: reviews}
spec: {selector: {app: reviews}, ports: [{port: 80, protocol: http}]}
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews}
spec:
  targetRef: {kind: Service, name: reviews}
  retries:
    attempts: 2
    retryOn: [5xx]
    budget: {ratio: 1.0, minPerSecond: 1000, window: 10s}
    backoff: {base: 1ms, max: 2ms}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_show_as_backend_tries_above_route_requests() {
    let dir = TempDir::new("stat-retries");
    let control = Control::start(&dir, "control").await;
    let (ok, _, err) = control.cli_with_stdin(&["apply", "-f", "-"], Some(RETRY_POLICY));
    assert!(ok, "{err}");
    let good = TestApp::start("good").await;
    let bad = TestApp::start("bad").await;
    bad.set_status(503);
    let web_app = TestApp::start("web").await;
    let _good = sidecar(&dir, &control, "reviews-good", "reviews", good.address, &[]).await;
    let _bad = sidecar(&dir, &control, "reviews-bad", "reviews", bad.address, &[]).await;
    let web = sidecar(&dir, &control, "web", "web", web_app.address, &[]).await;

    let observed = Arc::new(Mutex::new(Observed::default()));
    eventually(Duration::from_secs(10), "both reviews instances in web's view", || {
        let observed = observed.clone();
        let web = &web;
        async move {
            // Asking for reviews subscribes web to it; these requests count too.
            send(web.outbound, "reviews", 1, 1, &observed).await;
            let config = web.config().await;
            let endpoints = config["endpoints"].as_array()?;
            (endpoints.iter().filter(|e| e["service"] == "default/reviews").count() == 2).then_some(())
        }
    })
    .await;
    send(web.outbound, "reviews", 200, 4, &observed).await;
    let observed = Arc::try_unwrap(observed).ok().unwrap().into_inner().unwrap();
    let sent = observed.requests.len() as u64;
    // What the applications themselves served: every try.
    let (good_tries, bad_tries) = (good.hits() as u64, bad.hits() as u64);
    assert!(bad_tries > 0, "the failing instance was tried");

    let route = eventually(Duration::from_secs(20), "the route's tries to add up", || {
        let answer = stat(&control, &["routes", "reviews", "-w", "10m"]);
        async move {
            row(&answer, "service", "reviews")
                .filter(|r| r["requests"] == sent && r["tries"] == good_tries + bad_tries)
                .cloned()
        }
    })
    .await;
    assert_eq!(route["failures"], observed.failures(), "what the caller saw, after retries: {route}");
    let backend = &route["backends"][0];
    assert_eq!(backend["tries"]["failures"], bad_tries, "every try the failing instance answered: {route}");
    let retried = web.metric_sum("weft_retries_total", &["outcome=\"retried\""]).await as u64;
    assert_eq!(route["retries"], retried, "{route}");
    assert_eq!(good_tries + bad_tries, sent + retried, "each retry is one more try");
    let (ok, out, err) = control.cli(&["stat", "routes", "reviews", "-w", "10m"]);
    assert!(ok && out.contains("TRIES") && out.contains(&(good_tries + bad_tries).to_string()), "{out}{err}");
}

/// Sleeps until 300 ms into the next 10-second slot of the wall clock; returns its
/// start (Unix seconds).
async fn next_slot() -> u64 {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap();
    let start = (now.as_secs() / 10 + 1) * 10;
    tokio::time::sleep(
        Duration::from_millis(start * 1000 + 300).saturating_sub(Duration::from_millis(now.as_millis() as u64)),
    )
    .await;
    start
}

/// One phase of traffic: 40 requests, 300 ms into a fresh 10 s slot; returns the slot.
async fn phase(proxy: SocketAddr) -> (u64, Observed) {
    let slot = next_slot().await;
    let observed = Arc::new(Mutex::new(Observed::default()));
    send(proxy, "reviews", 40, 4, &observed).await;
    (slot, Arc::try_unwrap(observed).ok().unwrap().into_inner().unwrap())
}

/// Waits until the reviews route has counted `total` requests.
async fn wait_for_reports(control: &Control, total: u64) {
    eventually(Duration::from_secs(15), "the phase's reports", || {
        let answer = stat(control, &["routes", "reviews", "-w", "10m"]);
        async move {
            let routed = row(&answer, "service", "reviews").and_then(|r| r["requests"].as_u64()).unwrap_or(0);
            (routed >= total).then_some(())
        }
    })
    .await;
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs()
}

fn canary(v1: u32, v2: u32) -> String {
    format!(
        r#"
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {{name: reviews}}
spec: {{selector: {{app: reviews}}, ports: [{{port: 80, protocol: http}}]}}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {{name: reviews-v1}}
spec: {{selector: {{app: reviews, version: v1}}, ports: [{{port: 80, protocol: http}}]}}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {{name: reviews-v2}}
spec: {{selector: {{app: reviews, version: v2}}, ports: [{{port: 80, protocol: http}}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: reviews-canary}}
spec:
  parentRefs: [{{kind: Service, name: reviews, port: 80}}]
  rules:
  - backendRefs: [{{name: reviews-v1, port: 80, weight: {v1}}}, {{name: reviews-v2, port: 80, weight: {v2}}}]
"#
    )
}

/// Route requests per backend of the reviews route in one window of an answer.
fn split(window: &Value) -> BTreeMap<String, u64> {
    window["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|row| row["service"] == "reviews")
        .flat_map(|row| row["backends"].as_array().cloned().unwrap_or_default())
        .filter(|backend| backend["requests"].as_u64() > Some(0))
        .map(|backend| (backend["backend"].as_str().unwrap().to_string(), backend["requests"].as_u64().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn around_a_revision_the_split_before_and_after_is_what_the_client_saw() {
    let dir = TempDir::new("stat-around");
    let control = Control::start(&dir, "control").await;
    let (ok, _, err) = control.cli_with_stdin(&["apply", "-f", "-"], Some(&canary(100, 0)));
    assert!(ok, "{err}");
    let (v1, v2, web_app) = (TestApp::start("v1").await, TestApp::start("v2").await, TestApp::start("web").await);
    let _v1 = sidecar(&dir, &control, "reviews-1", "reviews", v1.address, &["--labels", "version=v1"]).await;
    let _v2 = sidecar(&dir, &control, "reviews-2", "reviews", v2.address, &["--labels", "version=v2"]).await;
    let web = sidecar(&dir, &control, "web", "web", web_app.address, &[]).await;
    let warm = Arc::new(Mutex::new(Observed::default()));
    eventually(Duration::from_secs(10), "reviews v1 through the route", || {
        let warm = warm.clone();
        async move {
            send(web.outbound, "reviews", 1, 1, &warm).await;
            (warm.lock().unwrap().requests.last()?.2 == "v1").then_some(())
        }
    })
    .await;
    let mut total = warm.lock().unwrap().requests.len() as u64;
    // The warm-up's reports first: one that arrived after the first phase's slot began
    // would count in it (a report counts in the slot it arrives in).
    wait_for_reports(&control, total).await;

    // Each attempt shifts the canary the other way: 100% to one version, then the
    // change, then 100% to the other. Each phase's traffic and its reports must fall in
    // one 10 s slot (before: the slot before the change's; after: the slot after it), so
    // an attempt whose reports spilled over a slot's end is done again.
    let mut to_v2 = true;
    for attempt in 1..=4 {
        let (old_app, new_app) = if to_v2 { ("v1", "v2") } else { ("v2", "v1") };
        let (before_slot, before) = phase(web.outbound).await;
        total += before.requests.len() as u64;
        wait_for_reports(&control, total).await;
        if unix_now() >= before_slot + 10 {
            eprintln!("attempt {attempt}: the reports spilled over their slot; again");
            continue;
        }
        next_slot().await;
        let weights = if to_v2 { canary(0, 100) } else { canary(100, 0) };
        let (ok, out, err) = control.cli_with_stdin(&["apply", "-f", "-"], Some(&weights));
        assert!(ok && out.contains("httproute/reviews-canary configured"), "{out}{err}");
        to_v2 = !to_v2;
        let history = control.cli(&["history", "HTTPRoute", "reviews-canary", "-o", "json"]).1;
        let history: Value = serde_json::from_str(&history).unwrap();
        let revision = history["items"].as_array().unwrap().last().unwrap()["revision"].as_u64().unwrap();
        let (after_slot, after) = phase(web.outbound).await;
        total += after.requests.len() as u64;
        wait_for_reports(&control, total).await;
        if unix_now() >= after_slot + 10 {
            eprintln!("attempt {attempt}: the reports spilled over their slot; again");
            continue;
        }
        // The client saw each phase go wholly to one version...
        assert_eq!(before.by_app(), BTreeMap::from([(old_app.to_string(), 40)]));
        assert_eq!(after.by_app(), BTreeMap::from([(new_app.to_string(), 40)]));
        // ...and so does the control plane, around the change.
        let revision_text = revision.to_string();
        let answer = stat(&control, &["routes", "reviews", "--around-revision", &revision_text, "-w", "10s"]);
        assert_eq!(answer["revision"], revision);
        assert_eq!(split(&answer["before"]), BTreeMap::from([(format!("default/reviews-{old_app}"), 40)]), "{answer}");
        assert_eq!(split(&answer["after"]), BTreeMap::from([(format!("default/reviews-{new_app}"), 40)]), "{answer}");
        let (ok, out, err) =
            control.cli(&["stat", "routes", "reviews", "--around-revision", &revision_text, "-w", "10s"]);
        assert!(ok && out.contains("100.00% → -") && out.contains("- → 100.00%"), "{out}{err}");
        return;
    }
    panic!("four attempts in a row had reports spill over a 10 s slot");
}

#[tokio::test]
async fn stat_needs_a_viewer_token_and_no_more() {
    let dir = TempDir::new("stat-viewer");
    let control = Control::start(&dir, "control").await;
    let web_app = TestApp::start("web").await;
    let _web = sidecar(&dir, &control, "web", "web", web_app.address, &[]).await;
    let (ok, viewer, err) = control.cli(&["token", "create", "--role", "viewer", "--name", "grafana"]);
    assert!(ok, "{err}");
    let viewer = viewer.trim();
    for path in ["/api/v1/stat/services", "/api/v1/stat/edges?window=1h", "/api/v1/prometheus/targets"] {
        let (status, body) =
            support::api_request(&control.server(), Some(viewer), "GET", path, None, None).await.unwrap();
        assert_eq!(status, 200, "{path}: {body}");
        let root = viewer.split('.').nth(3);
        let (status, _) = support::api_request(&control.server(), None, "GET", path, None, root).await.unwrap();
        assert_eq!(status, 401, "{path} without a token");
    }
    let (status, body) =
        support::api_request(&control.server(), Some(viewer), "GET", "/api/v1/stat/services?window=5m", None, None)
            .await
            .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("10s, 1m, 10m or 1h"), "{body}");
    let (status, body) = support::api_request(
        &control.server(),
        Some(viewer),
        "GET",
        "/api/v1/stat/routes?aroundRevision=999999",
        None,
        None,
    )
    .await
    .unwrap();
    assert_eq!(status, 404, "{body}");
    // Prometheus's service discovery lists the proxy's admin address, labelled.
    let (_, targets) =
        support::api_request(&control.server(), Some(viewer), "GET", "/api/v1/prometheus/targets", None, None)
            .await
            .unwrap();
    let group = targets.as_array().unwrap().iter().find(|g| g["labels"]["workload"] == "web").expect("web's target");
    assert_eq!(group["labels"]["service"], "web");
    assert_eq!(group["labels"]["namespace"], "default");
    assert_eq!(group["targets"][0], _web.admin.to_string());
}

/// An answer's rows without what depends on the instant it was computed (rates divide
/// by the time the window covers, up to now).
fn timeless(answer: &Value) -> Value {
    let mut rows = answer["rows"].clone();
    fn strip(value: &mut Value) {
        match value {
            Value::Object(map) => {
                map.remove("rps");
                map.values_mut().for_each(strip);
            }
            Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut rows);
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_etcd_each_answer_for_the_whole_mesh() {
    let dir = TempDir::new("stat-replicas");
    let Some((_etcd, a, b)) = support::two_replicas(&dir).await else { return };
    // reviews reports to B, web to A: each replica holds half of the mesh's telemetry.
    let (reviews_app, web_app) = (TestApp::start("reviews").await, TestApp::start("web").await);
    let reviews = sidecar(&dir, &b, "reviews", "reviews", reviews_app.address, &[]).await;
    let web = sidecar(&dir, &a, "web", "web", web_app.address, &[]).await;
    let observed = Arc::new(Mutex::new(Observed::default()));
    eventually(Duration::from_secs(10), "reviews through the mesh", || {
        let observed = observed.clone();
        async move {
            send(web.outbound, "reviews", 1, 1, &observed).await;
            (observed.lock().unwrap().requests.last()?.2 == "reviews").then_some(())
        }
    })
    .await;
    send(web.outbound, "reviews", 100, 4, &observed).await;
    let sent = observed.lock().unwrap().requests.len() as u64;
    for control in [&a, &b] {
        eventually(Duration::from_secs(20), "both sides of the edge on this replica", || {
            let services = stat(control, &["services", "reviews", "-w", "10m"]);
            let routes = stat(control, &["routes", "reviews", "-w", "10m"]);
            async move {
                let served = row(&services, "name", "reviews")?["requests"] == sent;
                let routed = row(&routes, "service", "reviews")?["requests"] == sent;
                (served && routed).then_some(())
            }
        })
        .await;
    }
    for view in ["services", "workloads", "routes", "edges", "authz"] {
        let (from_a, from_b) = (stat(&a, &[view, "-w", "10m"]), stat(&b, &[view, "-w", "10m"]));
        assert_eq!(timeless(&from_a), timeless(&from_b), "{view}: A and B answer alike");
        assert_eq!(from_a["unreachableReplicas"], Value::Array(vec![]));
    }
    // The dashboard's topology reads this replica's slots as held and the other's
    // answer: either replica draws the same graph, with every request the client sent.
    let mut graphs = Vec::new();
    for control in [&a, &b] {
        let (status, topology) = control.api("GET", "/api/v1/topology?window=10m", None).await;
        assert_eq!(status, 200, "{topology}");
        assert_eq!(topology["unreachableReplicas"], Value::Array(vec![]));
        let names: Vec<&str> =
            topology["services"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
        let at = |name: &str| names.iter().position(|n| *n == name).unwrap_or_else(|| panic!("{name} in {names:?}"));
        let reviews = &topology["services"][at("default/reviews")];
        assert_eq!((&reviews["measuredBy"], &reviews["successRate"]), (&json!("service"), &json!(1.0)), "{reviews}");
        let edge = topology["edges"]
            .as_array()
            .unwrap()
            .iter()
            .find(|edge| edge[0] == at("default/web") && edge[1] == at("default/reviews"))
            .unwrap_or_else(|| panic!("web -> reviews in {topology}"))
            .clone();
        assert_eq!((&edge[6], &edge[5]), (&json!(sent), &json!(1.0)), "every request, all over mutual TLS: {edge}");
        graphs.push((names.iter().map(|n| n.to_string()).collect::<Vec<_>>(), edge[6].clone(), edge[4].clone()));
    }
    assert_eq!(graphs[0], graphs[1], "A and B draw the same graph");
    drop((reviews, web));
}

/// A gRPC server over h2c that answers every call with one message and then, in the
/// trailers, the status the request's `x-status` header asks for: the case where the
/// outcome is known only at the end of the body.
async fn grpc_server() -> SocketAddr {
    use http_body_util::{BodyExt, StreamBody};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|request: http::Request<hyper::body::Incoming>| async move {
                    let status =
                        request.headers().get("x-status").and_then(|v| v.to_str().ok()).unwrap_or("0").to_string();
                    let _ = request.into_body().collect().await;
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", status.parse().unwrap());
                    let frames = vec![
                        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(bytes::Bytes::from_static(
                            b"\x00\x00\x00\x00\x02hi",
                        ))),
                        Ok(hyper::body::Frame::trailers(trailers)),
                    ];
                    let body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
                    let mut response = http::Response::new(body);
                    response.headers_mut().insert("content-type", "application/grpc".parse().unwrap());
                    Ok::<_, std::convert::Infallible>(response)
                });
                let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    address
}

/// One gRPC call through `proxy` over h2c, asking for `status`; the `grpc-status` the
/// client read from the trailers.
async fn grpc_call(proxy: SocketAddr, status: u32) -> Option<u32> {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(proxy).await.ok()?;
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .ok()?;
    tokio::spawn(connection);
    let request = http::Request::post("http://calls/weft.test.Echo/Call")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-status", status.to_string())
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"\x00\x00\x00\x00\x02hi")))
        .unwrap();
    let response = sender.send_request(request).await.ok()?;
    let collected = response.into_body().collect().await.ok()?;
    collected.trailers()?.get("grpc-status")?.to_str().ok()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_failures_are_read_from_trailers_and_not_found_is_an_answer() {
    let dir = TempDir::new("stat-grpc");
    let control = Control::start(&dir, "control").await;
    let server = grpc_server().await;
    let web_app = TestApp::start("web").await;
    let _calls = sidecar(&dir, &control, "calls", "calls", server, &["--protocol", "grpc"]).await;
    let web = sidecar(&dir, &control, "web", "web", web_app.address, &[]).await;
    // OK, NotFound (an answer) and Unavailable (a failure), each in the trailers after a
    // message; the first calls may wait for discovery.
    let mut seen: BTreeMap<u32, u64> = BTreeMap::new();
    eventually(Duration::from_secs(10), "a call through the mesh", || {
        let outbound = web.outbound;
        async move { grpc_call(outbound, 0).await.filter(|status| *status == 0) }
    })
    .await;
    *seen.entry(0).or_default() += 1;
    for i in 0..60u32 {
        let asked = [0, 5, 14][i as usize % 3];
        let status = grpc_call(web.outbound, asked).await.expect("an answer with trailers");
        assert_eq!(status, asked, "the trailers reach the client unchanged");
        *seen.entry(status).or_default() += 1;
    }
    let calls: u64 = seen.values().sum();
    let failures = seen.get(&14).copied().unwrap_or(0);
    for (view, field, name) in [("routes", "service", "calls"), ("services", "name", "calls")] {
        let row = eventually(Duration::from_secs(20), &format!("the {view} view to count every call"), || {
            let answer = stat(&control, &[view, "calls", "-w", "10m"]);
            async move { row(&answer, field, name).filter(|r| r["requests"] == calls).cloned() }
        })
        .await;
        assert_eq!(row["failures"], failures, "{view}: only Unavailable fails: {row}");
        let statuses: BTreeMap<u32, u64> = row["grpcStatuses"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(code, count)| (code.parse().unwrap(), count.as_u64().unwrap()))
            .collect();
        assert_eq!(statuses, seen, "{view}: every status as the client read it");
    }
}

#[tokio::test]
async fn a_proxy_reports_only_as_itself_and_a_report_sent_again_counts_once() {
    use tokio_stream::wrappers::ReceiverStream;
    use weft_api::{
        discovery::{discovery_client::DiscoveryClient, proxy_message, Hello, ProxyMessage},
        telemetry::{telemetry_client::TelemetryClient, Direction, ProxyReport, RequestRow, RowKind},
    };
    let dir = TempDir::new("stat-reporters");
    let control = Control::start(&dir, "control").await;
    let web_app = TestApp::start("web").await;
    let _web = sidecar(&dir, &control, "web", "web", web_app.address, &[]).await;
    // A scripted proxy of another identity, with a discovery stream of its own.
    let channel = control.channel_as(&dir, "mallory").await;
    let (outbound, outbound_rx) = tokio::sync::mpsc::channel(4);
    let hello = Hello { proxy_id: "mallory-1".into(), proxy_version: "test".into(), ..Default::default() };
    outbound.send(ProxyMessage { message: Some(proxy_message::Message::Hello(hello)) }).await.unwrap();
    let mut stream =
        DiscoveryClient::new(channel.clone()).stream(ReceiverStream::new(outbound_rx)).await.unwrap().into_inner();
    let _ = stream.message().await.unwrap();
    let mut telemetry = TelemetryClient::new(channel);
    let mut signals = weft_api::signals::Signals::default();
    for _ in 0..10 {
        signals
            .record(weft_api::signals::Outcome::Response { status: 200, grpc_status: None }, Duration::from_millis(3));
    }
    let request_row = |direction: Direction| RequestRow {
        direction: direction as i32,
        kind: RowKind::Request as i32,
        destination: "default/web".into(),
        signals: Some((&signals).into()),
        ..Default::default()
    };
    let report = |proxy_id: &str, sequence| ProxyReport {
        proxy_id: proxy_id.into(),
        sequence,
        interval_millis: 1000,
        requests: vec![request_row(Direction::Outbound), request_row(Direction::Inbound)],
        ..Default::default()
    };
    // As another proxy: refused.
    let refused = telemetry.report(report("web", 1)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    // Malformed: refused whole.
    let mut bad = report("mallory-1", 1);
    bad.requests[0].signals.as_mut().unwrap().failures = 99;
    let refused = telemetry.report(bad).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("row 0"), "{refused:?}");
    // Its own, twice with one sequence number (a reply lost): counted once. Its inbound
    // row is dropped: it registered no Service, so web's inbound traffic is not its to
    // report.
    telemetry.report(report("mallory-1", 2)).await.unwrap();
    telemetry.report(report("mallory-1", 2)).await.unwrap();
    let routes = stat(&control, &["routes", "web", "-w", "10m"]);
    assert_eq!(row_requests(&routes, "service", "web"), 10, "{routes}");
    let services = stat(&control, &["services", "web", "-w", "10m"]);
    assert_eq!(row_requests(&services, "name", "web"), 10, "measured by its callers, not claimed inbound: {services}");
    assert_eq!(row(&services, "name", "web").unwrap()["measuredBy"], "callers");
}

fn row_requests(answer: &Value, field: &str, value: &str) -> u64 {
    row(answer, field, value).and_then(|r| r["requests"].as_u64()).unwrap_or(0)
}

#[tokio::test]
async fn a_proxy_that_stops_cleanly_reports_its_last_interval() {
    let dir = TempDir::new("stat-flush");
    let control = Control::start(&dir, "control").await;
    let (reviews_app, web_app) = (TestApp::start("reviews").await, TestApp::start("web").await);
    let _reviews = sidecar(&dir, &control, "reviews", "reviews", reviews_app.address, &[]).await;
    // Reports a minute apart: only the last one, on SIGTERM, can carry these requests.
    let mut web = sidecar(&dir, &control, "web", "web", web_app.address, &["--telemetry-interval", "60s"]).await;
    let observed = Arc::new(Mutex::new(Observed::default()));
    eventually(Duration::from_secs(10), "reviews through the mesh", || {
        let observed = observed.clone();
        async move {
            send(web.outbound, "reviews", 1, 1, &observed).await;
            (observed.lock().unwrap().requests.last()?.2 == "reviews").then_some(())
        }
    })
    .await;
    send(web.outbound, "reviews", 20, 2, &observed).await;
    let sent = observed.lock().unwrap().requests.len() as u64;
    // Workers hand their rows over once a second; then the proxy stops.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    web.terminate();
    let _ = tokio::task::spawn_blocking(move || web.child.wait()).await;
    let routes = stat(&control, &["routes", "reviews", "-w", "10m"]);
    assert_eq!(row_requests(&routes, "service", "reviews"), sent, "{routes}");
}
