//! Authorization between meshed services: AuthorizationPolicies and MeshConfig applied
//! live through the control plane, enforced by the callee's proxy on the caller's
//! mutual-TLS identity; and the mutual TLS mode (STRICT refuses plaintext, mesh-wide or
//! per Service).

mod support;

use std::time::Duration;

use bytes::Bytes;
use support::{client, eventually, get_via, send_via, Answer, Control, Proxy, TempDir, TestApp};

async fn sidecar(dir: &TempDir, control: &Control, service: &str, app: &TestApp) -> Proxy {
    let app_addr = app.address.to_string();
    let args = ["--service", service, "--app-addr", &app_addr, "--health-interval", "200ms"];
    Proxy::start_controlled(dir, service, control, &args).await
}

fn apply(control: &Control, yaml: &str) {
    let (ok, out, err) = control.cli_with_stdin(&["apply", "-f", "-"], Some(yaml));
    assert!(ok, "{out}{err}");
}

const POLICIES: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec: {trustDomain: weft.local, mtls: STRICT, defaultPolicy: authenticated}
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: reviews-from-web}
spec:
  targetRef: {kind: Service, name: reviews}
  action: ALLOW
  rules:
  - from: [{principals: ["spiffe://weft.local/ns/default/sa/web"]}]
    to: [{methods: [GET], paths: ["/reviews/*"]}]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-admin}
spec:
  targetRef: {kind: Service, name: reviews}
  action: DENY
  rules:
  - to: [{paths: ["/reviews/admin*"]}]
"#;

/// curl straight to an inbound port, in plaintext: (exit ok, HTTP status or 0).
fn plaintext(inbound: std::net::SocketAddr, host: &str) -> (bool, u16) {
    let (ok, out, _) = support::curl(&[
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        &format!("Host: {host}"),
        &format!("http://{inbound}/reviews/1"),
    ]);
    (ok, out.trim().parse().unwrap_or(0))
}

// Multi-threaded: curl blocks a thread while the test's apps serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_decide_who_may_call_and_strict_mode_refuses_plaintext() {
    let dir = TempDir::new("authz");
    let control = Control::start(&dir, "control").await;
    let (reviews_app, ratings_app) = (TestApp::start("reviews").await, TestApp::start("ratings").await);
    let reviews = sidecar(&dir, &control, "reviews", &reviews_app).await;
    let ratings = sidecar(&dir, &control, "ratings", &ratings_app).await;
    // web also forwards opaque TCP to reviews, to check that TCP is judged too.
    let web = Proxy::start_controlled(&dir, "web", &control, &["--upstream", "reviews=127.0.0.1:0"]).await;
    let batch = Proxy::start_controlled(&dir, "batch", &control, &[]).await;
    let http = client();

    // A MeshConfig naming another trust domain is refused, and changes nothing.
    let other = POLICIES.replace("trustDomain: weft.local", "trustDomain: other.org");
    let (ok, _, err) = control.cli_with_stdin(&["apply", "-f", "-"], Some(&other));
    assert!(!ok && err.contains("spec.trustDomain") && err.contains("weft.local"), "{err}");
    assert_eq!(get_via(&http, batch.outbound, "reviews", "/reviews/1", &[]).await.status, 200);

    apply(&control, POLICIES);
    let call = |proxy: &Proxy, method: &'static str, service: &'static str, path: &'static str| {
        let (http, outbound) = (http.clone(), proxy.outbound);
        async move { send_via(&http, outbound, method, service, path, &[], Bytes::new()).await }
    };
    // Policies arrive live: wait for the first denial.
    eventually(Duration::from_secs(10), "the policies to reach reviews", || {
        let answer = call(&batch, "GET", "reviews", "/reviews/1");
        async move { (answer.await.status == 403).then_some(()) }
    })
    .await;
    let hits_before = reviews_app.hits();
    let denied_by = |answer: &Answer| {
        assert_eq!(answer.status, 403, "{answer:?}");
        answer.weft_error().unwrap_or_default()
    };

    // The allowed caller, for what it is allowed.
    assert_eq!(call(&web, "GET", "reviews", "/reviews/1").await.app(), "reviews");
    // Another method, another caller: no ALLOW policy matches.
    assert!(denied_by(&call(&web, "POST", "reviews", "/reviews/1").await).contains("no ALLOW policy matched"));
    let error = denied_by(&call(&batch, "GET", "reviews", "/reviews/1").await);
    assert!(error.contains("spiffe://weft.local/ns/default/sa/batch"), "{error}");
    // DENY wins over ALLOW, and path tricks do not dodge it.
    for path in ["/reviews/admin", "/reviews/x/../admin", "/reviews//admin", "/reviews/./admin/"] {
        let error = denied_by(&call(&web, "GET", "reviews", path).await);
        assert!(error.contains("default/deny-admin"), "{path}: {error}");
    }
    assert_eq!(call(&web, "GET", "reviews", "/reviews/%2fadmin").await.status, 403);
    // gRPC callers get PERMISSION_DENIED.
    let grpc = get_via(&http, batch.outbound, "reviews", "/reviews/1", &[("content-type", "application/grpc")]).await;
    assert_eq!(grpc.headers.get("grpc-status").map(|v| v.to_str().unwrap().to_string()), Some("7".into()));
    // Opaque TCP from web: the only ALLOW rule needs a method and a path, which a TCP
    // connection never has, so it is closed without reaching the app.
    let unmatched = ["decision=\"deny\"", "policy=\"(no ALLOW policy matched)\""];
    let denials_before = reviews.metric_sum("weft_authz_decisions_total", &unmatched).await;
    let tcp = web.upstreams["reviews"];
    let (ok, out, err) = support::curl(&["-s", "-H", "Host: reviews", &format!("http://{tcp}/reviews/1")]);
    assert!(!ok && !out.contains("reviews"), "TCP was let through: {out}{err}");
    assert_eq!(reviews.metric_sum("weft_authz_decisions_total", &unmatched).await, denials_before + 1.0);
    // No policy on ratings: MeshConfig's `authenticated` admits any mesh identity.
    assert_eq!(call(&batch, "GET", "ratings", "/").await.app(), "ratings");

    // The authorization matrix, which the control plane computes from the policies, says
    // what the proxies just did.
    let (web_id, batch_id) = ("spiffe://weft.local/ns/default/sa/web", "spiffe://weft.local/ns/default/sa/batch");
    let (ok, out, err) = control.cli(&["authz", "matrix", "--identity", web_id, "--identity", batch_id, "-o", "json"]);
    assert!(ok, "{err}");
    let answer: serde_json::Value = serde_json::from_str(&out).unwrap();
    let matrix = &answer["matrix"];
    let identities = matrix["identities"].as_array().cloned().unwrap_or_default();
    let column = |id: Option<&str>| {
        identities.iter().position(|i| i.as_str() == id).unwrap_or_else(|| panic!("{id:?} in {matrix}"))
    };
    let cell = |service: &str, id: Option<&str>| {
        let services = matrix["services"].as_array().cloned().unwrap_or_default();
        let row =
            services.into_iter().find(|s| s["name"] == service).unwrap_or_else(|| panic!("{service} in {matrix}"));
        row["cells"][column(id)].clone()
    };
    assert_eq!(
        cell("reviews", Some(web_id)),
        serde_json::json!({"reach": "some", "allow": ["default/reviews-from-web"], "deny": ["default/deny-admin"]}),
        "GET under /reviews/ but not admin"
    );
    assert_eq!(cell("reviews", Some(batch_id))["reach"], "none");
    assert_eq!(cell("reviews", None)["policy"], "(mTLS STRICT: plaintext refused)");
    assert_eq!(cell("ratings", Some(batch_id)), serde_json::json!({"reach": "all", "policy": null}));
    assert!(
        identities.iter().any(|i| i.as_str().is_some_and(|i| i.ends_with("/sa/reviews"))),
        "a registered workload's identity is a column of its own: {matrix}"
    );
    let (ok, table, err) = control.cli(&["authz", "matrix", "--identity", web_id]);
    assert!(ok, "{err}");
    assert!(table.lines().next().is_some_and(|header| header.contains("default/web")), "{table}");
    let reviews_row = table.lines().find(|l| l.starts_with("default/reviews ")).unwrap_or_else(|| panic!("{table}"));
    assert!(reviews_row.contains("STRICT") && reviews_row.contains("partial"), "{table}");
    let (ok, _, err) = control.cli(&["authz", "matrix", "--identity", "web"]);
    assert!(!ok && err.contains("no SPIFFE ID"), "{err}");
    // STRICT: plaintext to an inbound port is refused outright.
    let (ok, status) = plaintext(reviews.inbound.unwrap(), "reviews");
    assert!(!ok || status == 0, "plaintext was served: {status}");
    assert_eq!(reviews_app.hits(), hits_before + 1, "only the allowed request reached the app");
    // A STRICT workload whose application listens beyond loopback is warned about: callers
    // reaching the application directly would bypass mutual TLS and authorization.
    let args = ["--service", "exposed", "--app-addr", "192.0.2.1:9080", "--health-check", "none"];
    let exposed = Proxy::start_controlled(&dir, "exposed", &control, &args).await;
    eventually(Duration::from_secs(10), "the STRICT warning about the exposed application", || {
        let log = exposed.log();
        async move { log.contains("listens on a non-loopback address").then_some(()) }
    })
    .await;
    let denials =
        reviews.metric_sum("weft_authz_decisions_total", &["decision=\"deny\"", "policy=\"default/deny-admin\""]).await;
    assert!(denials >= 4.0, "{denials}");

    // Live change: PERMISSIVE mesh with default deny, ratings STRICT on its own.
    apply(
        &control,
        r#"
apiVersion: weft.dev/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec: {mtls: PERMISSIVE, defaultPolicy: deny}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: ratings}
spec: {selector: {app: ratings}, ports: [{port: 80, protocol: http}], mtls: STRICT}
"#,
    );
    let error = eventually(Duration::from_secs(10), "default deny to reach ratings", || {
        let answer = call(&web, "GET", "ratings", "/");
        async move {
            let answer = answer.await;
            (answer.status == 403).then(|| answer.weft_error().unwrap_or_default())
        }
    })
    .await;
    assert!(error.contains("(default: deny)"), "{error}");
    let (ok, status) = plaintext(ratings.inbound.unwrap(), "ratings");
    assert!(!ok || status == 0, "ratings is STRICT on its own, yet plaintext was served: {status}");
    // reviews is PERMISSIVE now: plaintext is let in, and judged as an unauthenticated caller.
    let (ok, status) = plaintext(reviews.inbound.unwrap(), "reviews");
    assert!(ok && status == 403, "{ok} {status}");
}
