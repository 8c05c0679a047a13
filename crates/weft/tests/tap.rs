//! Tap end to end, through `weft tap` itself: every "why" (the route rule and backend,
//! each try with its endpoint, what followed it and the retry budget left, the ejection
//! it caused and the ejected endpoint skipped later, the authorization verdict and the
//! policy that denied, the proxy's own error), the filters, header values only when
//! named, a viewer token enough and none refused, the session's rate holding however
//! much traffic comes, the session ending on every proxy when the client goes, and
//! `weft top` counting requests by method and path.

mod support;

use std::{
    io::{BufRead, BufReader},
    process::{Child, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{api_request, client, eventually, get_via, send_via, Control, Proxy, TempDir, TestApp};

const MESH: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews}
spec:
  targetRef: {kind: Service, name: reviews}
  loadBalancer: {algorithm: round-robin}
  retries: {attempts: 2, retryOn: [5xx], backoff: {base: 1ms, max: 2ms}}
  outlierDetection: {consecutive5xx: 1, interval: 10s, baseEjectionTime: 60s, maxEjectionPercent: 50}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews-api}
spec:
  parentRefs: [{kind: Service, name: reviews}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: reviews, port: 80, weight: 100}]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-edge}
spec:
  targetRef: {kind: Service, name: secret}
  action: DENY
  rules:
  - from: [{principals: ["spiffe://weft.local/ns/default/sa/edge"]}]
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: nowhere}
spec: {selector: {app: nowhere}, ports: [{port: 80}]}
"#;

/// A running `weft tap` (or `weft top`): its stdout lines as they come.
struct Watcher {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Watcher {
    fn start(control: &Control, token_file: &std::path::Path, args: &[&str]) -> Watcher {
        let mut child = control
            .command(args)
            .env("WEFT_TOKEN_FILE", token_file)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("weft tap starts");
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    return;
                }
            }
        });
        Watcher { child, lines, seen: Vec::new() }
    }

    /// Lines so far (the ones already read, then any new).
    fn drain(&mut self) -> &[String] {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        &self.seen
    }

    /// Events (`-o json` lines) so far.
    fn events(&mut self) -> Vec<Value> {
        self.drain().iter().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
    }

    /// Waits for an event `matches`.
    async fn event(&mut self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(event) = self.events().into_iter().find(|e| matches(e)) {
                return event;
            }
            assert!(Instant::now() < deadline, "no tap event {what}; got {:#?}", self.events());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until every proxy of `proxies` records `sessions` tap sessions.
async fn sessions_on(proxies: &[&Proxy], sessions: f64) {
    for proxy in proxies {
        eventually(Duration::from_secs(20), &format!("{sessions} tap sessions on a proxy"), || async move {
            (proxy.metric_sum("weft_tap_sessions", &[]).await == sessions).then_some(())
        })
        .await;
    }
}

/// A proxy of Service reviews, `id`, for `app`.
async fn reviews_replica(dir: &TempDir, control: &Control, id: &str, app: &TestApp) -> Proxy {
    let app = app.address.to_string();
    let args = ["--id", id, "--service", "reviews", "--health-interval", "200ms", "--app-addr", &app];
    Proxy::start_controlled(dir, id, control, &args).await
}

fn outbound(event: &Value) -> bool {
    event["direction"] == "outbound"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_says_why_filters_bounds_its_rate_and_ends_with_its_client() {
    let dir = TempDir::new("tap");
    let control = Control::start(&dir, "control").await;
    control.apply(&format!(
        "{MESH}---\napiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {{name: reviews}}\nspec: {{selector: {{app: \
         reviews}}, ports: [{{port: 80}}]}}\n"
    ));
    let good = TestApp::start("good").await;
    let bad = TestApp::start("bad").await;
    bad.set_status(503);
    let secret_app = TestApp::start("secret").await;
    let reviews_good = reviews_replica(&dir, &control, "reviews-good", &good).await;
    let reviews_bad = reviews_replica(&dir, &control, "reviews-bad", &bad).await;
    let secret = Proxy::meshed(&dir, &control, "secret", Some(secret_app.address)).await;
    let edge = Proxy::meshed(&dir, &control, "edge", None).await;
    let http = client();
    let admin = control.token_file.clone();

    // A session per question, all at once.
    let mut why = Watcher::start(&control, &admin, &["tap", "reviews", "-o", "json", "--header", "x-request-id"]);
    let mut posts = Watcher::start(&control, &admin, &["tap", "reviews", "-o", "json", "--method", "POST"]);
    let mut kept = Watcher::start(&control, &admin, &["tap", "reviews", "-o", "json", "--path-prefix", "/api/keep"]);
    let mut routed = Watcher::start(&control, &admin, &["tap", "reviews", "-o", "json", "--route", "reviews-api"]);
    let mut failed = Watcher::start(&control, &admin, &["tap", "reviews", "-o", "json", "--status", "5xx"]);
    let mut denied = Watcher::start(&control, &admin, &["tap", "secret", "-o", "json"]);
    let mut made = Watcher::start(&control, &admin, &["tap", "nowhere", "-o", "json"]);
    sessions_on(&[&edge, &reviews_good, &reviews_bad, &secret], 7.0).await;

    // The request that meets the failing endpoint first is retried on the other, and
    // ejects the failing one; a later one skips it. (The edge learns of both endpoints
    // as the control plane sees them healthy.)
    let mut retried = None;
    for i in 0..50 {
        let id = format!("r-{i}");
        let answer =
            get_via(&http, edge.outbound, "reviews", "/api/items", &[("x-request-id", &id), ("x-other", "no")]).await;
        assert_eq!(answer.status, 200, "a retry hides the 503");
        let event = why.event(&format!("for {id}"), |e| outbound(e) && e["headers"]["x-request-id"] == id).await;
        if event["why"]["tries"].as_array().unwrap().len() == 2 {
            retried = Some(event);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let retried = retried.expect("round robin reaches the failing endpoint within a few requests");
    let why_ = &retried["why"];
    assert_eq!(why_["route"], "HTTPRoute/default/reviews-api", "{retried:#}");
    assert_eq!(why_["httpRoute"], "/api");
    assert_eq!(why_["backend"], "default/reviews");
    assert_eq!((why_["backendWeight"].as_u64(), why_["totalWeight"].as_u64()), (Some(100), Some(100)));
    let (first, second) = (&why_["tries"][0], &why_["tries"][1]);
    assert_eq!(first["endpoint"], reviews_bad.inbound.unwrap().to_string(), "{retried:#}");
    assert_eq!(first["identity"], "spiffe://weft.local/ns/default/sa/reviews");
    assert_eq!(first["status"], 503);
    assert_eq!(first["then"], "retried");
    assert!(first["budgetLeft"].as_u64().is_some(), "the budget left is shown: {first}");
    assert_eq!(first["ejectedMs"], 60_000, "the 503 ejected the endpoint for baseEjectionTime: {first}");
    assert!(first["estimateMs"].as_f64().is_some() && first["inFlight"].as_u64().is_some(), "{first}");
    assert_eq!(second["endpoint"], reviews_good.inbound.unwrap().to_string());
    assert_eq!((second["status"].as_u64(), second["then"].as_str()), (Some(200), Some("answered")));
    assert_eq!(retried["status"], 200);
    assert_eq!(retried["source"]["service"], "default/edge");
    assert_eq!(retried["source"]["identity"], "spiffe://weft.local/ns/default/sa/edge");
    assert_eq!(retried["destination"]["identity"], "spiffe://weft.local/ns/default/sa/reviews");
    assert_eq!(retried["tls"], true);
    assert!(retried["durationMs"].as_f64().is_some_and(|ms| ms > 0.0));
    assert!(retried["bytesOut"].as_u64().is_some_and(|b| b > 0));
    let headers = retried["headers"].as_object().unwrap();
    assert_eq!(headers.len(), 1, "only the named header's value: {headers:?}");
    // The failing endpoint's own side: what its proxy saw, and let in.
    let inbound = why.event("on the failing endpoint", |e| e["direction"] == "inbound" && e["status"] == 503).await;
    assert_eq!(inbound["proxy"], "default/reviews-bad");
    assert_eq!(inbound["why"]["authz"]["verdict"], "allow");
    assert_eq!(inbound["why"]["endpoint"], bad.address.to_string(), "the application");
    assert_eq!(inbound["source"]["identity"], "spiffe://weft.local/ns/default/sa/edge");
    // Ejected: the next request's try skips it.
    let answer = get_via(&http, edge.outbound, "reviews", "/api/items", &[("x-request-id", "after")]).await;
    assert_eq!(answer.status, 200);
    let after = why.event("after the ejection", |e| outbound(e) && e["headers"]["x-request-id"] == "after").await;
    assert_eq!(
        after["why"]["tries"][0]["skippedEjected"],
        serde_json::json!([reviews_bad.inbound.unwrap().to_string()]),
        "{after:#}"
    );

    // Filters: method, path prefix, route, status.
    let answer = send_via(&http, edge.outbound, "POST", "reviews", "/api/post", &[], "body".into()).await;
    assert_eq!(answer.status, 200);
    posts.event("for the POST", |e| outbound(e) && e["method"] == "POST").await;
    assert!(posts.events().iter().all(|e| e["method"] == "POST"), "{:#?}", posts.events());
    get_via(&http, edge.outbound, "reviews", "/api/skip", &[]).await;
    get_via(&http, edge.outbound, "reviews", "/api/keep/1", &[]).await;
    kept.event("for /api/keep", |e| e["path"] == "/api/keep/1").await;
    assert!(kept.events().iter().all(|e| e["path"] == "/api/keep/1"), "{:#?}", kept.events());
    assert_eq!(get_via(&http, edge.outbound, "reviews", "/unrouted", &[]).await.status, 404, "no rule matches");
    get_via(&http, edge.outbound, "reviews", "/api/routed", &[]).await;
    routed.event("for /api/routed", |e| e["path"] == "/api/routed").await;
    assert!(
        routed.events().iter().all(|e| e["why"]["route"] == "HTTPRoute/default/reviews-api"),
        "{:#?}",
        routed.events()
    );
    let fives = failed.event("for the 503", |e| e["status"] == 503).await;
    assert_eq!(fives["direction"], "inbound", "only the failing endpoint saw a 5xx");
    assert!(failed.events().iter().all(|e| e["status"].as_u64().is_some_and(|s| s >= 500)));

    // A denial names its policy; a proxy-made answer its reason.
    assert_eq!(get_via(&http, edge.outbound, "secret", "/", &[]).await.status, 403);
    let refusal = denied.event("for the denial", |e| e["direction"] == "inbound").await;
    assert_eq!(refusal["why"]["authz"]["verdict"], "deny", "{refusal:#}");
    assert_eq!(refusal["why"]["authz"]["policy"], "default/deny-edge");
    assert_eq!(refusal["error"], "forbidden");
    assert_eq!(refusal["status"], 403);
    let caller_side = denied.event("on the caller's side", outbound).await;
    assert_eq!(caller_side["status"], 403);
    assert_eq!(get_via(&http, edge.outbound, "nowhere", "/", &[]).await.status, 503);
    let nothing = made.event("for the proxy-made 503", outbound).await;
    assert_eq!(nothing["error"], "no-endpoints", "{nothing:#}");
    assert_eq!(nothing["why"]["tries"], serde_json::json!([]));
    drop((why, posts, kept, routed, failed, denied, made));

    // The session ends on every proxy when its client goes.
    sessions_on(&[&edge, &reviews_good, &reviews_bad, &secret], 0.0).await;
    eventually(Duration::from_secs(20), "no tap session on the control plane", || {
        let control = &control;
        async move { (control.metric("weft_control_tap_sessions", &[]).await == 0.0).then_some(()) }
    })
    .await;

    // No token: refused. A viewer's token: enough, but not for credentials.
    let root = control.admin_token().split('.').nth(3).unwrap().to_string();
    let (status, answer) =
        api_request(&control.server(), None, "GET", "/api/v1/tap?service=default%2Freviews", None, Some(&root))
            .await
            .unwrap();
    assert_eq!(status, 401, "{answer}");
    let (ok, viewer, err) = control.cli(&["token", "create", "--role", "viewer", "--name", "tapper"]);
    assert!(ok, "{err}");
    let viewer_file = dir.write("viewer-token", viewer.trim());
    let (status, answer) = api_request(
        &control.server(),
        Some(viewer.trim()),
        "GET",
        "/api/v1/tap?service=default%2Freviews&headers=authorization",
        None,
        None,
    )
    .await
    .unwrap();
    assert_eq!(status, 403, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("needs an admin token"), "{answer}");
    let (status, answer) =
        api_request(&control.server(), Some(viewer.trim()), "GET", "/api/v1/tap?service=default%2Fnope", None, None)
            .await
            .unwrap();
    assert_eq!(status, 404, "{answer}");

    // Bounded: at most 5 a second for the session, however many requests come.
    let mut bounded = Watcher::start(&control, &viewer_file, &["tap", "reviews", "-o", "json", "--max-rps", "5"]);
    sessions_on(&[&edge, &reviews_good], 1.0).await;
    let opened = Instant::now();
    let mut sent = 0;
    while opened.elapsed() < Duration::from_secs(2) {
        let batch = (0..20).map(|_| get_via(&http, edge.outbound, "reviews", "/api/load", &[]));
        sent += futures_util::future::join_all(batch).await.len();
    }
    // What arrived by now was admitted within the window the test saw (plus the burst).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let window = opened.elapsed().as_secs_f64();
    let received = bounded.events().len();
    assert!(sent >= 40, "the test sent {sent}");
    assert!(received >= 1, "the session shows requests");
    assert!(
        received as f64 <= 5.0 * window + 5.0,
        "{received} events in {window:.1}s at --max-rps 5 ({sent} requests sent, each seen by two proxies)"
    );
    let dropped = edge.metric_sum("weft_tap_events_dropped_total", &["reason=\"rate\""]).await
        + reviews_good.metric_sum("weft_tap_events_dropped_total", &["reason=\"rate\""]).await;
    assert!(dropped > 0.0, "the proxies held back beyond their share");
    drop(bounded);
    sessions_on(&[&edge, &reviews_good], 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_counts_a_services_requests_by_method_and_path() {
    let dir = TempDir::new("top");
    let control = Control::start(&dir, "control").await;
    let app = TestApp::start("echo").await;
    let echo = Proxy::meshed(&dir, &control, "echo", Some(app.address)).await;
    let edge = Proxy::meshed(&dir, &control, "edge", None).await;
    let http = client();
    eventually(Duration::from_secs(20), "echo to answer", || {
        let (http, edge) = (http.clone(), edge.outbound);
        async move { (get_via(&http, edge, "echo", "/", &[]).await.status == 200).then_some(()) }
    })
    .await;
    let mut top = Watcher::start(&control, &control.token_file, &["top", "echo", "--interval", "200ms"]);
    sessions_on(&[&edge, &echo], 1.0).await;
    for _ in 0..3 {
        assert_eq!(get_via(&http, edge.outbound, "echo", "/a?x=1", &[]).await.status, 200);
    }
    app.set_status(500);
    assert_eq!(get_via(&http, edge.outbound, "echo", "/b", &[]).await.status, 500);
    app.set_status(200);
    // The table, redrawn: each request once (the caller's side), by method and path.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let lines = top.drain().to_vec();
        let row = |path: &str| {
            lines
                .iter()
                .rev()
                .find(|l| l.split_whitespace().take(2).eq(["GET", path]))
                .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        };
        if let (Some(a), Some(b)) = (row("/a"), row("/b")) {
            if a[2] == "3" && b[2] == "1" {
                assert_eq!(a[6], "100.0%", "{a:?}");
                assert_eq!(b[6], "0.0%", "a 500 is a failure: {b:?}");
                assert!(a[3].ends_with("ms") && a[4].ends_with("ms") && a[5].ends_with("ms"), "{a:?}");
                let (best, worst): (f64, f64) =
                    (a[3].trim_end_matches("ms").parse().unwrap(), a[4].trim_end_matches("ms").parse().unwrap());
                assert!(best <= worst, "{a:?}");
                break;
            }
        }
        assert!(Instant::now() < deadline, "no table with /a counted 3 and /b 1: {lines:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (ok, _, err) = control.cli(&["top", "workload/echo"]);
    assert!(!ok && err.contains("weft top takes a Service"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_held_by_one_replica_taps_the_proxies_of_another() {
    let dir = TempDir::new("tap-replicas");
    let Some((_etcd, a, b)) = support::two_replicas(&dir).await else { return };
    // echo's proxy holds its streams on B, the caller's on A; the operator asks A.
    let app = TestApp::start("echo").await;
    let echo = Proxy::meshed(&dir, &b, "echo", Some(app.address)).await;
    let edge = Proxy::meshed(&dir, &a, "edge", None).await;
    let http = client();
    eventually(Duration::from_secs(20), "echo to answer", || {
        let (http, edge) = (http.clone(), edge.outbound);
        async move { (get_via(&http, edge, "echo", "/", &[]).await.status == 200).then_some(()) }
    })
    .await;
    let mut tap = Watcher::start(&a, &a.token_file, &["tap", "echo", "-o", "json"]);
    sessions_on(&[&edge, &echo], 1.0).await;
    assert_eq!(get_via(&http, edge.outbound, "echo", "/across", &[]).await.status, 200);
    let served = tap.event("from echo's proxy, on replica B", |e| e["direction"] == "inbound").await;
    assert_eq!((served["proxy"].as_str(), served["path"].as_str()), (Some("default/echo"), Some("/across")));
    let called = tap.event("from the caller's proxy, on replica A", outbound).await;
    assert_eq!(called["proxy"], "default/edge");
    // Gone from both replicas' proxies when the client goes.
    drop(tap);
    sessions_on(&[&edge, &echo], 0.0).await;
    for control in [&a, &b] {
        eventually(Duration::from_secs(20), "no tap session on either replica", || async move {
            (control.metric("weft_control_tap_sessions", &[]).await == 0.0).then_some(())
        })
        .await;
    }
}
