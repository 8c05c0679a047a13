//! Gateway API routing through a real proxy: weighted splits, matches, filters,
//! unresolved backends, and live configuration changes (good ones applied, bad ones
//! refused while the old configuration keeps serving).

mod support;

use std::time::Duration;

use support::*;

struct Canary {
    v1: TestApp,
    v2: TestApp,
    dir: TempDir,
    config: std::path::PathBuf,
    proxy: Proxy,
}

fn canary_yaml(v1: &TestApp, v2: &TestApp, routes: &str) -> String {
    mesh_yaml(
        &[
            ("reviews", "app: reviews"),
            ("reviews-v1", "app: reviews, version: v1"),
            ("reviews-v2", "app: reviews, version: v2"),
        ],
        &[("r1", "app: reviews, version: v1", v1.address), ("r2", "app: reviews, version: v2", v2.address)],
        routes,
    )
}

const SPLIT: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews-canary}
spec:
  parentRefs: [{kind: Service, name: reviews, port: 80}]
  rules:
  - matches: [{headers: [{name: x-canary, value: "true"}]}]
    backendRefs: [{name: reviews-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-route, value: api}], remove: [x-secret]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {add: [{name: x-served-by, value: weft}]}
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2/api}}
    backendRefs: [{name: reviews-v1, port: 80}]
  - matches: [{path: {type: Exact, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /new}, statusCode: 301}
  - matches: [{path: {type: PathPrefix, value: /missing}}]
    backendRefs: [{name: reviews-v3, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: reviews-v1, port: 80, weight: 90}, {name: reviews-v2, port: 80, weight: 10}]
"#;

async fn canary(routes: &str) -> Canary {
    let dir = TempDir::new("routing");
    let (v1, v2) = (TestApp::start("v1").await, TestApp::start("v2").await);
    let config = dir.write("mesh.yaml", &canary_yaml(&v1, &v2, routes));
    let proxy = Proxy::start(&dir, "a", &config, &[]).await;
    Canary { v1, v2, dir, config, proxy }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_is_90_10_within_tolerance() {
    let mesh = canary(SPLIT).await;
    let client = client();
    let mut v2 = 0;
    for _ in 0..1000 {
        let answer = get_via(&client, mesh.proxy.outbound, "reviews", "/", &[]).await;
        assert_eq!(answer.status, 200);
        if answer.app() == "v2" {
            v2 += 1;
        }
    }
    // Binomial(1000, 0.1): mean 100, sd 9.5; ±5 sd keeps false failures below 1e-6.
    assert!((52..=148).contains(&v2), "v2 got {v2} of 1000");
    let route = mesh.proxy.metric_sum("weft_requests_total", &["route=\"HTTPRoute/default/reviews-canary#4\""]).await;
    assert_eq!(route, 1000.0, "requests are labelled with their route rule");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_match_routes_to_v2_and_filters_apply() {
    let mesh = canary(SPLIT).await;
    let client = client();
    for _ in 0..20 {
        let answer = get_via(&client, mesh.proxy.outbound, "reviews", "/", &[("x-canary", "true")]).await;
        assert_eq!(answer.app(), "v2");
    }
    let answer = get_via(
        &client,
        mesh.proxy.outbound,
        "reviews",
        "/api/items?page=2",
        &[("x-secret", "s"), ("x-route", "client")],
    )
    .await;
    assert_eq!(answer.app(), "v1");
    let seen = answer.json();
    assert_eq!(seen["path"], "/v2/api/items?page=2", "URLRewrite replaced the prefix");
    assert_eq!(seen["headers"]["x-route"], "api", "set overrides the client's value");
    assert!(seen["headers"].get("x-secret").is_none(), "removed header does not arrive");
    assert_eq!(answer.headers["x-served-by"], "weft");

    let answer = get_via(&client, mesh.proxy.outbound, "reviews", "/old?q=1", &[]).await;
    assert_eq!(answer.status, 301);
    assert_eq!(answer.headers["location"], "http://reviews/new?q=1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unresolved_backend_is_500_and_unmatched_request_is_404() {
    let only_api = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api-only}
spec:
  parentRefs: [{kind: Service, name: reviews}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}, method: GET}]
    backendRefs: [{name: reviews-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /missing}}]
    backendRefs: [{name: reviews-v3, port: 80}]
"#;
    let mesh = canary(only_api).await;
    let client = client();
    let answer = get_via(&client, mesh.proxy.outbound, "reviews", "/missing", &[]).await;
    assert_eq!(answer.status, 500);
    assert!(answer.weft_error().unwrap().contains("default/reviews-v3:80"), "{:?}", answer.weft_error());
    let answer = get_via(&client, mesh.proxy.outbound, "reviews", "/other", &[]).await;
    assert_eq!(answer.status, 404);
    assert!(answer.weft_error().unwrap().starts_with("no-route"));
    let answer = send_via(&client, mesh.proxy.outbound, "POST", "reviews", "/api", &[], bytes::Bytes::new()).await;
    assert_eq!(answer.status, 404, "the method must match too");
    assert!(mesh.proxy.log().contains("reviews-v3"), "the unresolved reference is logged");
    let config = mesh.proxy.config().await;
    assert!(config["snapshot"]["unresolved"].to_string().contains("reviews-v3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_changes_apply_live_and_a_bad_file_is_refused_while_the_old_one_serves() {
    let everything_to_v1 = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{kind: Service, name: reviews}]
  rules: [{backendRefs: [{name: reviews-v1, port: 80}]}]
"#;
    let mesh = canary(everything_to_v1).await;
    let client = client();
    assert_eq!(get_via(&client, mesh.proxy.outbound, "reviews", "/", &[]).await.app(), "v1");

    // A good change is picked up by the file watch, with no signal.
    let everything_to_v2 = everything_to_v1.replace("reviews-v1", "reviews-v2");
    mesh.dir.write("mesh.yaml", &canary_yaml(&mesh.v1, &mesh.v2, &everything_to_v2));
    let outbound = mesh.proxy.outbound;
    eventually(Duration::from_secs(10), "the new route to serve", || {
        let client = client.clone();
        async move { (get_via(&client, outbound, "reviews", "/", &[]).await.app() == "v2").then_some(()) }
    })
    .await;

    // A bad file (weight is not a number) is refused; v2 keeps serving.
    let broken = everything_to_v2.replace("port: 80}]}]", "port: 80, weight: lots}]}]");
    assert_ne!(broken, everything_to_v2);
    mesh.dir.write("mesh.yaml", &canary_yaml(&mesh.v1, &mesh.v2, &broken));
    mesh.proxy.hangup();
    let error = eventually(Duration::from_secs(10), "the bad file to be refused", || {
        let proxy = &mesh.proxy;
        async move { proxy.config().await["lastReloadError"].as_str().map(str::to_string) }
    })
    .await;
    assert!(
        error.contains("mesh.yaml: document 6 (HTTPRoute r), field spec.rules[0].backendRefs[0].weight"),
        "{error}"
    );
    assert!(mesh.proxy.log().contains("configuration refused"));
    for _ in 0..10 {
        assert_eq!(get_via(&client, mesh.proxy.outbound, "reviews", "/", &[]).await.app(), "v2");
    }
    assert_eq!(mesh.proxy.metric_sum("weft_config_reloads_total", &["result=\"refused\""]).await, 1.0);
    let _ = (&mesh.v1, &mesh.config);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_config_is_refused_at_start_with_the_field_path() {
    let dir = TempDir::new("invalid");
    let config = dir.write(
        "bad.yaml",
        "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80, protocol: quic}]}\n",
    );
    let output = std::process::Command::new(WEFT)
        .args(["proxy", "--config"])
        .arg(&config)
        .args(["--outbound-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("bad.yaml: document 1 (Service web), field spec.ports[0].protocol (line 4, column 27)"),
        "{stderr}"
    );
    assert!(stderr.contains("quic"), "{stderr}");

    // An unimplemented field is refused with a reason, not ignored.
    let config = dir.write(
        "limits.yaml",
        "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: a}\nspec: {targetRef: {kind: Service, name: web}, rateLimit: {}}\n",
    );
    let output = std::process::Command::new(WEFT).args(["validate"]).arg(&config).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("not implemented yet"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let output = std::process::Command::new(WEFT)
        .args(["proxy", "--outbound-addr", &address, "--admin-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on {address} (outbound listener, set with --outbound-addr)")),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_services_own_routes_are_not_applied_again() {
    // reviews → reviews-v2 by the parent route; reviews-v2's own route would rewrite the
    // path and add a header if it were (wrongly) applied a second time.
    let routes = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: parent}
spec:
  parentRefs: [{kind: Service, name: reviews}]
  rules: [{backendRefs: [{name: reviews-v2, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: v2-own}
spec:
  parentRefs: [{kind: Service, name: reviews-v2}]
  rules:
  - filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-applied-twice, value: "yes"}]}
    - type: URLRewrite
      urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /rewritten}}
    backendRefs: [{name: reviews-v2, port: 80}]
"#;
    let mesh = canary(routes).await;
    let client = client();
    let via_parent = get_via(&client, mesh.proxy.outbound, "reviews", "/original", &[]).await;
    assert_eq!(via_parent.app(), "v2");
    assert_eq!(via_parent.json()["path"], "/original");
    assert!(via_parent.json()["headers"].get("x-applied-twice").is_none());
    // Addressed directly, reviews-v2's own route does apply.
    let direct = get_via(&client, mesh.proxy.outbound, "reviews-v2", "/original", &[]).await;
    assert_eq!(direct.json()["path"], "/rewritten");
    assert_eq!(direct.json()["headers"]["x-applied-twice"], "yes");
}
