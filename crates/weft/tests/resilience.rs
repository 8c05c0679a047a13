//! Latency-aware balancing, outlier ejection, retries and their budget, timeouts and
//! connection limits, observed through a real proxy against real servers.

mod support;

use std::{sync::Arc, time::Duration};

use support::*;

/// A TrafficPolicy for Service `svc` with `spec_lines` (indented by two spaces) after
/// its targetRef.
fn svc_policy(spec_lines: &str) -> String {
    format!(
        "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: svc}}\nspec:\n  targetRef: {{kind: Service, name: svc}}\n{}",
        spec_lines.trim_start_matches('\n')
    )
}

async fn two_endpoints(policy: &str, routes: &str) -> (TestApp, TestApp, TempDir, Proxy) {
    let (a, b) = (TestApp::start("a").await, TestApp::start("b").await);
    let dir = TempDir::new("resilience");
    let extra = format!("{policy}\n---\n{routes}");
    let config = dir.write(
        "mesh.yaml",
        &mesh_yaml(&[("svc", "app: svc")], &[("a", "app: svc", a.address), ("b", "app: svc", b.address)], &extra),
    );
    let proxy = Proxy::start(&dir, "p", &config, &[]).await;
    (a, b, dir, proxy)
}

/// Sends `total` GETs to `svc` with `concurrency` clients; returns the status codes.
async fn load(proxy: &Proxy, total: usize, concurrency: usize) -> Vec<u16> {
    let client = client();
    let outbound = proxy.outbound;
    let statuses = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let (client, statuses) = (client.clone(), statuses.clone());
        tasks.push(tokio::spawn(async move {
            for _ in (worker..total).step_by(concurrency) {
                let answer = get_via(&client, outbound, "svc", "/", &[]).await;
                statuses.lock().unwrap().push(answer.status);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    Arc::try_unwrap(statuses).unwrap().into_inner().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_twenty_times_slower_endpoint_gets_under_15_percent() {
    let (fast, slow, _dir, proxy) = two_endpoints("", "").await;
    fast.set_delay(Duration::from_millis(5));
    slow.set_delay(Duration::from_millis(100));
    let statuses = load(&proxy, 400, 4).await;
    assert!(statuses.iter().all(|&s| s == 200));
    let share = slow.hits() as f64 / (fast.hits() + slow.hits()) as f64;
    assert!(share < 0.15, "slow endpoint got {:.1}% ({} of {})", share * 100.0, slow.hits(), fast.hits() + slow.hits());
}

// Round robin keeps sending to the failing endpoint, so outlier detection is what
// protects callers (p2c-ewma would route around it on its own: see the next test).
fn retry_5xx() -> String {
    svc_policy(
        r#"
  loadBalancer: {algorithm: round-robin}
  retries: {attempts: 2, retryOn: [5xx], backoff: {base: 1ms, max: 5ms}}
  outlierDetection: {consecutive5xx: 3, interval: 10s, baseEjectionTime: 60s, maxEjectionPercent: 50}
"#,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_is_ejected_and_retries_hide_its_errors() {
    let (healthy, failing, _dir, proxy) = two_endpoints(&retry_5xx(), "").await;
    failing.set_status(503);
    let statuses = load(&proxy, 200, 2).await;
    assert!(statuses.iter().all(|&s| s == 200), "clients saw errors: {statuses:?}");
    let hits_after_ejection = failing.hits();
    assert!(hits_after_ejection <= 4, "the failing endpoint was ejected quickly: {hits_after_ejection} hits");
    assert_eq!(proxy.metric_sum("weft_ejections_total", &["destination_service=\"default/svc\""]).await, 1.0);
    assert!(proxy.metric_sum("weft_retries_total", &["outcome=\"retried\""]).await >= 1.0);
    let statuses = load(&proxy, 50, 2).await;
    assert!(statuses.iter().all(|&s| s == 200));
    assert_eq!(failing.hits(), hits_after_ejection, "an ejected endpoint gets no traffic");
    assert!(healthy.hits() >= 250);
    let config = proxy.config().await;
    let ejected: Vec<_> = config["endpoints"].as_array().unwrap().iter().filter(|e| e["ejected"] == true).collect();
    assert_eq!(ejected.len(), 1, "/config shows the ejection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_caps_retries_against_a_service_that_always_fails() {
    let app = TestApp::start("down").await;
    app.set_status(503);
    let dir = TempDir::new("budget");
    let policy = svc_policy(
        r#"
  retries: {attempts: 3, retryOn: [5xx], budget: {ratio: 0.2, minPerSecond: 1, window: 10s}, backoff: {base: 1ms, max: 2ms}}
  outlierDetection: {consecutive5xx: 0, consecutiveGatewayErrors: 0}
"#,
    );
    let config = dir.write("mesh.yaml", &mesh_yaml(&[("svc", "app: svc")], &[("a", "app: svc", app.address)], &policy));
    let proxy = Proxy::start(&dir, "p", &config, &[]).await;
    let statuses = load(&proxy, 200, 1).await;
    assert!(statuses.iter().all(|&s| s == 503), "the service's own 503 reaches the client");
    // Without a budget: 200 × (1 + 3) = 800 tries. With it: 200 + 20% + 10 floor.
    let tries = app.hits();
    assert!((200..=250).contains(&tries), "{tries} tries reached the service");
    assert!(proxy.metric_sum("weft_retries_total", &["outcome=\"budget_exhausted\""]).await > 100.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_timeout_answers_504_with_weft_error() {
    let route = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: svc}
spec:
  parentRefs: [{kind: Service, name: svc}]
  rules: [{backendRefs: [{name: svc, port: 80}], timeouts: {request: 200ms}}]
"#;
    let (a, b, _dir, proxy) = two_endpoints("", route).await;
    a.set_delay(Duration::from_secs(2));
    b.set_delay(Duration::from_secs(2));
    let started = std::time::Instant::now();
    let answer = get_via(&client(), proxy.outbound, "svc", "/", &[]).await;
    assert_eq!(answer.status, 504);
    assert!(answer.weft_error().unwrap().starts_with("request-timeout"));
    assert!(started.elapsed() < Duration::from_secs(2), "the timeout cut the request short");
    assert_eq!(
        proxy.metric_sum("weft_requests_total", &["status_code=\"504\"", "error=\"request-timeout\""]).await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_try_timeout_retries_on_another_endpoint() {
    let policy = svc_policy(
        r#"
  loadBalancer: {algorithm: round-robin}
  retries: {attempts: 1, perTryTimeout: 300ms, retryOn: [timeout], backoff: {base: 1ms, max: 1ms}}
"#,
    );
    let (slow, fast, _dir, proxy) = two_endpoints(&policy, "").await;
    slow.set_delay(Duration::from_secs(5));
    let statuses = load(&proxy, 10, 1).await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert!(slow.hits() >= 1, "round robin did try the slow endpoint");
    assert_eq!(fast.hits(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_max_requests_fail_fast_with_503() {
    let policy = svc_policy(
        r#"
  connectionLimits: {maxRequests: 2}
"#,
    );
    let (a, b, _dir, proxy) = two_endpoints(&policy, "").await;
    a.set_delay(Duration::from_millis(800));
    b.set_delay(Duration::from_millis(800));
    let statuses = load(&proxy, 6, 6).await;
    let overloaded = statuses.iter().filter(|&&s| s == 503).count();
    assert_eq!(statuses.iter().filter(|&&s| s == 200).count(), 2, "{statuses:?}");
    assert_eq!(overloaded, 4, "{statuses:?}");
    assert_eq!(proxy.metric_sum("weft_requests_total", &["error=\"overloaded\""]).await, 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learned_endpoint_state_survives_a_reload_and_a_reload_under_load_drops_nothing() {
    let (healthy, failing, dir, proxy) = two_endpoints(&retry_5xx(), "").await;
    failing.set_status(503);
    let statuses = load(&proxy, 60, 2).await;
    assert!(statuses.iter().all(|&s| s == 200));
    let ejected = |config: &serde_json::Value| -> Vec<String> {
        config["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["ejected"] == true)
            .map(|e| e["workload"].to_string())
            .collect()
    };
    assert_eq!(ejected(&proxy.config().await), vec!["\"b\"".to_string()]);
    let version = proxy.config().await["version"].clone();

    // Reload an unrelated change (a new Service) while requests flow steadily.
    let load_task = {
        let outbound = proxy.outbound;
        tokio::spawn(async move {
            let client = client();
            let mut statuses = Vec::new();
            for _ in 0..300 {
                statuses.push(get_via(&client, outbound, "svc", "/", &[]).await.status);
            }
            statuses
        })
    };
    let extra = format!("{}\n---\napiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {{name: other}}\nspec: {{selector: {{app: other}}, ports: [{{port: 80}}]}}\n", retry_5xx());
    dir.write(
        "mesh.yaml",
        &mesh_yaml(
            &[("svc", "app: svc")],
            &[("a", "app: svc", healthy.address), ("b", "app: svc", failing.address)],
            &extra,
        ),
    );
    proxy.hangup();
    eventually(Duration::from_secs(10), "the reload", || {
        let (proxy, version) = (&proxy, version.clone());
        async move { (proxy.config().await["version"] != version).then_some(()) }
    })
    .await;
    let statuses = load_task.await.unwrap();
    assert!(statuses.iter().all(|&s| s == 200), "no request failed across the reload: {statuses:?}");
    assert_eq!(ejected(&proxy.config().await), vec!["\"b\"".to_string()], "the ejection survived the reload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_failure_is_retried_even_for_a_post_since_nothing_was_sent() {
    // One endpoint refuses connections (nothing listens there). Round robin makes sure it
    // is tried; no retries are configured, so this is the default connect-failure retry,
    // which works for any method because the request never left the proxy.
    let app = TestApp::start("up").await;
    // Bound but never listening: connects are refused, and the port stays ours, so a
    // parallel test cannot be handed it.
    let dead_socket = tokio::net::TcpSocket::new_v4().unwrap();
    dead_socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let dead = dead_socket.local_addr().unwrap();
    let dir = TempDir::new("connect-retry");
    let policy = svc_policy("  loadBalancer: {algorithm: round-robin}\n");
    let workloads = [("up", "app: svc", app.address), ("dead", "app: svc", dead)];
    let config = dir.write("m.yaml", &mesh_yaml(&[("svc", "app: svc")], &workloads, &policy));
    let proxy = Proxy::start(&dir, "p", &config, &[]).await;
    let client = client();
    let body = bytes::Bytes::from(vec![7u8; 200_000]);
    for _ in 0..20 {
        let answer = send_via(&client, proxy.outbound, "POST", "svc", "/orders", &[], body.clone()).await;
        assert_eq!(answer.status, 200, "{:?}", answer.weft_error());
        assert_eq!(answer.json()["bodyLength"], 200_000);
    }
    assert_eq!(app.hits(), 20, "each POST reached the app exactly once");
    let retried = proxy.metric_sum("weft_retries_total", &["outcome=\"retried\""]).await;
    assert!(retried >= 1.0, "the dead endpoint was tried and the POST retried ({retried})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_ewma_routes_around_a_quickly_failing_endpoint() {
    // A fast 503 must not look like a fast endpoint.
    let policy = svc_policy(
        r#"
  retries: {attempts: 2, retryOn: [gateway-error], backoff: {base: 1ms, max: 5ms}}
  outlierDetection: {consecutiveGatewayErrors: 0}
"#,
    );
    let (healthy, failing, _dir, proxy) = two_endpoints(&policy, "").await;
    healthy.set_delay(Duration::from_millis(2));
    failing.set_status(503);
    let statuses = load(&proxy, 200, 2).await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert!(
        failing.hits() <= 10,
        "the failing endpoint got {} of {} tries",
        failing.hits(),
        failing.hits() + healthy.hits()
    );
    assert_eq!(proxy.metric_sum("weft_ejections_total", &[]).await, 0.0, "no ejection was needed");
}
