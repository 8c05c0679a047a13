//! The trust gaps a review found, each tried as an attacker would: authorization's port
//! cannot be chosen by the caller's application, ambiguous authorities are refused,
//! endpoint state and pooled connections are keyed by security as well as address, and
//! `maxConnections` is exact across workers.

mod support;

use std::time::Duration;

use support::{client, eventually, get_via, h2_request, raw_exchange, raw_status, Control, Proxy, TempDir, TestApp};

async fn sidecar(dir: &TempDir, control: &Control, service: &str, app: &TestApp, extra: &[&str]) -> Proxy {
    let app_addr = app.address.to_string();
    let mut args = vec!["--service", service, "--app-addr", &app_addr, "--health-interval", "200ms"];
    args.extend_from_slice(extra);
    Proxy::start_controlled(dir, service, control, &args).await
}

fn apply(control: &Control, yaml: &str) {
    let (ok, out, err) = control.cli_with_stdin(&["apply", "-f", "-"], Some(yaml));
    assert!(ok, "{out}{err}");
}

fn delete(control: &Control, kind: &str, name: &str) {
    let (ok, out, err) = control.cli(&["delete", kind, name]);
    assert!(ok, "{out}{err}");
}

const TWO_PORTS: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: reviews}
spec:
  selector: {app: reviews}
  ports: [{port: 80, protocol: http}, {port: 8080, protocol: http}]
"#;

const DENY_80: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-80}
spec:
  targetRef: {kind: Service, name: reviews}
  action: DENY
  rules: [{to: [{ports: [80]}]}]
"#;

const ALLOW_8080: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: only-8080}
spec:
  targetRef: {kind: Service, name: reviews}
  action: ALLOW
  rules: [{to: [{ports: [8080]}]}]
"#;

/// One HTTP/1.1 request written as is, with `head` between the request line and the
/// blank line: the answer's status.
async fn raw(address: std::net::SocketAddr, target: &str, head: &str) -> u16 {
    let request = format!("GET {target} HTTP/1.1\r\n{head}Connection: close\r\n\r\n");
    raw_status(&raw_exchange(address, request.as_bytes()).await)
}

// Multi-threaded: curl blocks a thread while the test's apps serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_scoped_deny_is_not_dodged_by_any_host_authority_or_protocol() {
    let dir = TempDir::new("ports");
    let control = Control::start(&dir, "control").await;
    apply(&control, &format!("{TWO_PORTS}---{DENY_80}"));
    let reviews_app = TestApp::start("reviews").await;
    let reviews = sidecar(&dir, &control, "reviews", &reviews_app, &[]).await;
    let upstreams = ["--upstream", "reviews:80=127.0.0.1:0", "--upstream", "reviews:8080=127.0.0.1:0"];
    let web = Proxy::start_controlled(&dir, "web", &control, &upstreams).await;
    let http = client();
    eventually(Duration::from_secs(10), "the policy to reach reviews", || {
        let answer = get_via(&http, web.outbound, "reviews", "/", &[]);
        async move { (answer.await.status == 403).then_some(()) }
    })
    .await;
    eventually(Duration::from_secs(10), "port 8080 to be served", || {
        let answer = get_via(&http, web.outbound, "reviews:8080", "/", &[]);
        async move { (answer.await.status == 200).then_some(()) }
    })
    .await;
    let hits = reviews_app.hits();

    // A meshed caller: its proxy routes on the request's authority and conveys the port it
    // resolved; whatever else the application writes decides nothing.
    let outbound = web.outbound;
    for (target, head) in [
        ("/", "Host: reviews\r\n"),
        ("/", "Host: reviews:80\r\n"),
        ("/", "Host: reviews.default.svc.cluster.local:80\r\n"),
        ("http://reviews/", "Host: reviews:8080\r\n"),
        ("http://reviews:80/", "Host: reviews:8080\r\n"),
    ] {
        assert_eq!(raw(outbound, target, head).await, 403, "meshed HTTP/1.1 {target} {head:?}");
    }
    let h2 = h2_request(outbound, "http://reviews/", &[]).await.unwrap();
    assert_eq!(h2.status, 403, "meshed HTTP/2 :authority reviews");
    let h2 = h2_request(outbound, "http://reviews/", &[("host", "reviews:8080")]).await.unwrap();
    assert_eq!((h2.status, h2.weft_error().unwrap_or_default().contains("disagree")), (400, true), "{h2:?}");
    assert_eq!(h2_request(outbound, "http://reviews:8080/", &[]).await.unwrap().status, 200);
    // Opaque TCP carries no Host at all: the port is the one the upstream listener names.
    let tcp = |name: &str| {
        let address = web.upstreams[name];
        support::curl(&[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "Host: reviews:8080",
            &format!("http://{address}/"),
        ])
    };
    let (ok, status, _) = tcp("reviews:80");
    assert!(!ok || status.trim() != "200", "TCP to port 80 was served: {status}");
    assert_eq!(tcp("reviews:8080").1.trim(), "200", "TCP to port 8080 is not denied");
    // Two Host headers, or none usable: refused before anything routes.
    assert_eq!(raw(outbound, "/", "Host: reviews:8080\r\nHost: reviews\r\n").await, 400);

    // A plaintext caller straight to the inbound port: nothing it sends can be trusted to
    // tell the port, so the port-scoped DENY applies to all of it.
    let inbound = reviews.inbound.unwrap();
    for (target, head) in [
        ("/", "Host: reviews:8080\r\n"),
        ("/", "Host: reviews\r\n"),
        ("http://reviews:8080/", "Host: reviews:8080\r\n"),
        ("/", "Host: 127.0.0.1:8080\r\n"),
    ] {
        assert_eq!(raw(inbound, target, head).await, 403, "plaintext HTTP/1.1 {target} {head:?}");
    }
    let no_host = raw_status(&raw_exchange(inbound, b"GET / HTTP/1.0\r\n\r\n").await);
    assert_eq!(no_host, 403, "plaintext HTTP/1.0 without Host");
    assert_eq!(raw(inbound, "/", "Host: reviews:8080\r\nHost: reviews:8080\r\n").await, 400, "two Hosts");
    let h2 = h2_request(inbound, "http://reviews:8080/", &[]).await.unwrap();
    assert_eq!(h2.status, 403, "plaintext HTTP/2 :authority reviews:8080");
    let opaque = raw_exchange(inbound, b"\x16not http at all\r\n").await;
    assert!(opaque.is_empty(), "plaintext opaque TCP reached the app: {opaque:?}");
    assert_eq!(reviews_app.hits(), hits + 2, "only port 8080's HTTP/2 request and TCP connection reached the app");

    // An ALLOW scoped to a port does not admit a caller whose port is unknown.
    delete(&control, "authorizationpolicy", "no-80");
    apply(&control, ALLOW_8080);
    // Port 8080 answering is not proof enough: between the delete and the apply there is
    // no policy at all, which lets port 80 through too. The ALLOW is in force once 8080
    // is served and 80 refused.
    eventually(Duration::from_secs(10), "the ALLOW policy to reach reviews", || {
        let allowed = get_via(&http, web.outbound, "reviews:8080", "/", &[]);
        let refused = get_via(&http, web.outbound, "reviews", "/", &[]);
        async move { (allowed.await.status == 200 && refused.await.status == 403).then_some(()) }
    })
    .await;
    assert_eq!(raw(outbound, "/", "Host: reviews\r\n").await, 403, "meshed to port 80");
    assert_eq!(raw(inbound, "/", "Host: reviews:8080\r\n").await, 403, "plaintext claiming port 8080");
    let denied = reviews.metric_sum("weft_authz_decisions_total", &["policy=\"(no ALLOW policy matched)\""]).await;
    assert!(denied >= 2.0, "denials are counted: {denied}");
}

/// `[app: reviews]` Service whose selector also needs `extra` labels.
fn reviews_service(selector: &str) -> String {
    format!(
        "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {{name: reviews}}\nspec: {{selector: {{{selector}}}, ports: [{{port: 80, protocol: http}}]}}\n"
    )
}

fn workload(name: &str, labels: &str, address: std::net::SocketAddr, identity: Option<&str>) -> String {
    let identity = identity.map(|id| format!(", identity: \"{id}\"")).unwrap_or_default();
    format!(
        "apiVersion: weft.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}}}\nspec: {{labels: {{{labels}}}, address: \"{address}\"{identity}}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_that_becomes_meshed_is_never_reached_in_plaintext_again() {
    let dir = TempDir::new("rekeyed");
    let control = Control::start(&dir, "control").await;
    let reviews_app = TestApp::start("reviews").await;
    let reviews = sidecar(&dir, &control, "reviews", &reviews_app, &["--labels", "track=meshed"]).await;
    let inbound = reviews.inbound.unwrap();
    // First the address is an unmeshed Workload (declared, no identity): plaintext.
    let legacy = workload("legacy-1", "app: reviews, track: legacy", inbound, None);
    // Round robin, so that both listings of the address below get requests.
    let round_robin = "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: reviews}\nspec: {targetRef: {kind: Service, name: reviews}, loadBalancer: {algorithm: round-robin}}\n";
    apply(&control, &format!("{}---\n{legacy}---\n{round_robin}", reviews_service("app: reviews, track: legacy")));
    let web = Proxy::start_controlled(&dir, "web", &control, &[]).await;
    let http = client();
    let plaintext = ["direction=\"inbound\"", "tls=\"false\""];
    eventually(Duration::from_secs(10), "reviews to be reached in plaintext", || {
        let answer = get_via(&http, web.outbound, "reviews", "/", &[]);
        async move { (answer.await.status == 200).then_some(()) }
    })
    .await;
    for _ in 0..10 {
        assert_eq!(get_via(&http, web.outbound, "reviews", "/", &[]).await.status, 200);
    }
    assert!(reviews.metric_sum("weft_requests_total", &plaintext).await >= 11.0);

    // Then the same address is listed twice: as the unmeshed Workload and as the meshed
    // proxy's registration. Each keeps its own security, and the `tls` label of every
    // request says which one it used.
    apply(&control, &reviews_service("app: reviews"));
    eventually(Duration::from_secs(10), "web to see both endpoints", || {
        let admin = web.admin;
        async move {
            let (_, body) = support::http_get(admin, "/config", &[]).await.ok()?;
            let config: serde_json::Value = serde_json::from_slice(&body).ok()?;
            let endpoints = config["endpoints"]
                .as_array()
                .map_or(0, |e| e.iter().filter(|e| e["service"] == "default/reviews").count());
            (endpoints == 2).then_some(())
        }
    })
    .await;
    for _ in 0..40 {
        assert_eq!(get_via(&http, web.outbound, "reviews", "/", &[]).await.status, 200);
    }
    let outbound = |tls: &'static str| {
        let web = &web;
        async move { web.metric_sum("weft_requests_total", &["direction=\"outbound\"", tls]).await }
    };
    let inbound_count = |tls: &'static str| {
        let reviews = &reviews;
        async move { reviews.metric_sum("weft_requests_total", &["direction=\"inbound\"", tls]).await }
    };
    assert!(outbound("tls=\"true\"").await > 0.0 && outbound("tls=\"false\"").await > 0.0, "both were used");
    assert_eq!(outbound("tls=\"true\"").await, inbound_count("tls=\"true\"").await, "the caller's label is the truth");
    assert_eq!(outbound("tls=\"false\"").await, inbound_count("tls=\"false\"").await);

    // The unmeshed listing goes: from then on nothing reaches the address in plaintext,
    // though plaintext connections to it were pooled a moment ago.
    delete(&control, "workload", "legacy-1");
    eventually(Duration::from_secs(10), "web to drop the unmeshed endpoint", || {
        let admin = web.admin;
        async move {
            let (_, body) = support::http_get(admin, "/config", &[]).await.ok()?;
            let config: serde_json::Value = serde_json::from_slice(&body).ok()?;
            let endpoints = config["endpoints"].as_array()?;
            let all_meshed = !endpoints.is_empty() && endpoints.iter().all(|e| e["identity"].is_string());
            all_meshed.then_some(())
        }
    })
    .await;
    let before = inbound_count("tls=\"false\"").await;
    for _ in 0..30 {
        assert_eq!(get_via(&http, web.outbound, "reviews", "/", &[]).await.status, 200);
    }
    assert_eq!(inbound_count("tls=\"false\"").await, before, "a request reached the meshed address in plaintext");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workloads_at_one_address_with_different_identities_each_keep_their_own() {
    let dir = TempDir::new("one-address");
    let control = Control::start(&dir, "control").await;
    let reviews_app = TestApp::start("reviews").await;
    // The real proxy at the address proves spiffe://weft.local/ns/default/sa/reviews.
    let reviews = sidecar(&dir, &control, "reviews", &reviews_app, &["--labels", "slot=registered"]).await;
    let inbound = reviews.inbound.unwrap();
    let services = "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: good}\nspec: {selector: {app: reviews, slot: good}, ports: [{port: 80, protocol: http}]}\n---\napiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: impostor}\nspec: {selector: {app: impostor}, ports: [{port: 80, protocol: http}]}\n";
    let good =
        workload("good-1", "app: reviews, slot: good", inbound, Some("spiffe://weft.local/ns/default/sa/reviews"));
    let bad = workload("impostor-1", "app: impostor", inbound, Some("spiffe://weft.local/ns/default/sa/impostor"));
    // In either order: the last writer must not win.
    let orders = [format!("{services}---\n{good}---\n{bad}"), format!("{services}---\n{bad}---\n{good}")];
    for (round, documents) in orders.iter().enumerate() {
        apply(&control, documents);
        let web = Proxy::start_controlled(&dir, &format!("web-{round}"), &control, &[]).await;
        let http = client();
        eventually(Duration::from_secs(10), "good to be served", || {
            let answer = get_via(&http, web.outbound, "good", "/", &[]);
            async move { (answer.await.status == 200).then_some(()) }
        })
        .await;
        for _ in 0..10 {
            assert_eq!(get_via(&http, web.outbound, "good", "/", &[]).await.status, 200, "the right identity");
            let wrong = get_via(&http, web.outbound, "impostor", "/", &[]).await;
            assert_eq!(wrong.status, 502, "a peer that proves another identity is refused: {wrong:?}");
            assert!(wrong.weft_error().unwrap_or_default().contains("sa/impostor"), "{wrong:?}");
        }
        drop(web);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_is_exact_across_workers_and_starves_none() {
    let dir = TempDir::new("max-connections");
    let app = TestApp::start("web").await;
    let limits = "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: web}\nspec:\n  targetRef: {kind: Service, name: web}\n  connectionLimits: {maxConnections: 1, maxPendingRequests: 16, maxRequests: 64}\n";
    let config = dir
        .write("mesh.yaml", &support::mesh_yaml(&[("web", "app: web")], &[("web-1", "app: web", app.address)], limits));
    // Two workers, each with its own pool: the connection one of them keeps idle must
    // not make the other answer 503 `overloaded`.
    let proxy = Proxy::start(&dir, "p", &config, &["--workers", "2", "--connect-timeout", "2s"]).await;
    let mut statuses = std::collections::BTreeMap::new();
    for _ in 0..40 {
        // A new client connection each time, so the kernel spreads them over both workers.
        let status = raw(proxy.outbound, "/", "Host: web\r\n").await;
        *statuses.entry(status).or_insert(0) += 1;
    }
    assert_eq!(statuses, [(200, 40)].into(), "every request served");
    let overloaded = proxy.metric_sum("weft_requests_total", &["error=\"overloaded\""]).await;
    assert_eq!(overloaded, 0.0);
}

/// Opens a discovery stream as the workload `account` (joined with its own join token)
/// and says `hello`: the control plane's answer to it.
async fn hello_as(
    control: &Control,
    dir: &TempDir,
    account: &str,
    hello: weft_api::discovery::Hello,
) -> Result<(), tonic::Status> {
    use weft_api::discovery::{discovery_client::DiscoveryClient, proxy_message, ProxyMessage};
    let channel = control.channel_as(dir, account).await;
    let (outbound, outbound_rx) = tokio::sync::mpsc::channel(4);
    outbound.send(ProxyMessage { message: Some(proxy_message::Message::Hello(hello)) }).await.unwrap();
    let answer = DiscoveryClient::new(channel).stream(tokio_stream::wrappers::ReceiverStream::new(outbound_rx)).await;
    answer.map(drop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_can_neither_take_another_workloads_registration_nor_its_services_traffic() {
    use weft_api::discovery::{Hello, Workload};
    let dir = TempDir::new("registrations");
    let control = Control::start(&dir, "control").await;
    let reviews_app = TestApp::start("reviews").await;
    let reviews = sidecar(&dir, &control, "reviews", &reviews_app, &["--id", "reviews-1"]).await;
    let declared = workload("declared-1", "app: other", "127.0.0.1:9".parse().unwrap(), None);
    apply(&control, &declared);

    // web's certificate, reviews' proxy id: refused, whether it registers or only listens,
    // and a declared Workload's name is no more available.
    let web_workload = Workload { service: "web".into(), address: "127.0.0.1:9".into(), ..Default::default() };
    let taking = Hello { proxy_id: "reviews-1".into(), workload: Some(web_workload.clone()), ..Default::default() };
    let refused = hello_as(&control, &dir, "web", taking).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("sa/reviews") && refused.message().contains("--id"), "{}", refused.message());
    let listening = Hello { proxy_id: "reviews-1".into(), ..Default::default() };
    assert_eq!(hello_as(&control, &dir, "web", listening).await.unwrap_err().code(), tonic::Code::PermissionDenied);
    let squatting = Hello { proxy_id: "declared-1".into(), workload: Some(web_workload), ..Default::default() };
    let refused = hello_as(&control, &dir, "web", squatting).await.unwrap_err();
    assert!(refused.message().contains("declared Workload"), "{}", refused.message());
    // reviews' registration is untouched: its identity, its address, its traffic.
    let (ok, out, err) = control.cli(&["describe", "workload", "reviews-1", "-o", "json"]);
    assert!(ok, "{err}");
    let described: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(described["registration"]["identity"], "spiffe://weft.local/ns/default/sa/reviews", "{described}");
    assert_eq!(described["registration"]["address"], reviews.inbound.unwrap().to_string());

    // Free labels: a web proxy that claims tier=backend is not selected by a Service that
    // selects {tier: backend}, which names no account; one that pins app: web selects it.
    let web_app = TestApp::start("web").await;
    let _web = sidecar(&dir, &control, "web", &web_app, &["--labels", "tier=backend"]).await;
    let services = "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: backend}\nspec: {selector: {tier: backend}, ports: [{port: 80, protocol: http}]}\n---\napiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: web-backend}\nspec: {selector: {app: web, tier: backend}, ports: [{port: 80, protocol: http}]}\n";
    apply(&control, services);
    let caller = Proxy::start_controlled(&dir, "caller", &control, &[]).await;
    let http = client();
    eventually(Duration::from_secs(10), "web-backend to be served by web", || {
        let answer = get_via(&http, caller.outbound, "web-backend", "/", &[]);
        async move { (answer.await.app() == "web").then_some(()) }
    })
    .await;
    let answer = get_via(&http, caller.outbound, "backend", "/", &[]).await;
    assert_eq!(
        (answer.status, answer.weft_error().unwrap_or_default().starts_with("no-endpoints")),
        (503, true),
        "{answer:?}"
    );
    let (_, out, _) = control.cli(&["describe", "service", "backend"]);
    assert!(out.contains("may serve only Services whose selector names its service account as app"), "{out}");
    assert_eq!(get_via(&http, caller.outbound, "reviews", "/", &[]).await.app(), "reviews");
}
