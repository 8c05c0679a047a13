//! Automatic mutual TLS between meshed proxies: every hop between proxies is TLS 1.3
//! with workload certificates, each side checks the other's SPIFFE identity, and
//! certificates rotate under load without a failed request. Outside peers are real
//! tools: openssl s_client and curl.

mod support;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use support::{client, eventually, get_via, Control, Proxy, TempDir, TestApp};

async fn sidecar(dir: &TempDir, control: &Control, service: &str, app: &TestApp, extra: &[&str]) -> Proxy {
    let app_addr = app.address.to_string();
    let args = [&["--service", service, "--app-addr", &app_addr, "--health-interval", "200ms"], extra].concat();
    Proxy::start_controlled(dir, service, control, &args).await
}

// Multi-threaded: openssl and curl block a thread while the test's app serves them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshed_hops_are_mutual_tls_and_outsiders_without_a_mesh_certificate_are_refused() {
    let dir = TempDir::new("mtls-hops");
    let control = Control::start(&dir, "control").await;
    let app = TestApp::start("reviews").await;
    let reviews = sidecar(&dir, &control, "reviews", &app, &[]).await;
    let web = Proxy::start_controlled(&dir, "web", &control, &[]).await;
    let http = client();
    eventually(Duration::from_secs(10), "reviews to be served through the mesh", || {
        let http = http.clone();
        async move { (get_via(&http, web.outbound, "reviews", "/", &[]).await.app() == "reviews").then_some(()) }
    })
    .await;
    // Both sides count the hop as mutual TLS.
    assert!(web.metric_sum("weft_requests_total", &["direction=\"outbound\"", "tls=\"true\""]).await >= 1.0);
    assert!(reviews.metric_sum("weft_requests_total", &["direction=\"inbound\"", "tls=\"true\""]).await >= 1.0);

    let inbound = reviews.inbound.unwrap();
    let request = "GET / HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n";
    // No client certificate: refused.
    let (out, err) = support::s_client(inbound, "weft/h1", &[], request);
    assert!(!out.contains("200 OK") && err.contains("certificate required"), "{out}\n{err}");
    // A certificate with a mesh-looking identity from another CA: refused.
    let key = dir.0.join("stranger.key");
    let cert = dir.0.join("stranger.crt");
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=stranger", "-addext", "subjectAltName=URI:spiffe://weft.local/ns/default/sa/web"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE", "-addext", "extendedKeyUsage=clientAuth"])
        .args(["-keyout", key.to_str().unwrap(), "-out", cert.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let (out, err) = support::s_client(
        inbound,
        "weft/h1",
        &["-cert", cert.to_str().unwrap(), "-key", key.to_str().unwrap()],
        request,
    );
    assert!(!out.contains("200 OK"), "{out}\n{err}");
    eventually(Duration::from_secs(5), "the refusal in the reviews proxy's log", || {
        let log = reviews.log();
        async move { log.contains("not issued by this mesh's CA").then_some(()) }
    })
    .await;

    // PERMISSIVE (the default): an unmeshed plaintext client still reaches the app, and
    // is counted as such.
    let (ok, out, err) = support::curl(&["-sf", "-H", "Host: reviews", &format!("http://{inbound}/")]);
    assert!(ok && out.contains("reviews"), "{out}{err}");
    assert!(reviews.metric_sum("weft_requests_total", &["direction=\"inbound\"", "tls=\"false\""]).await >= 1.0);
}

#[tokio::test]
async fn a_caller_refuses_an_endpoint_that_proves_another_identity() {
    let dir = TempDir::new("mtls-impostor");
    let control = Control::start(&dir, "control").await;
    let app = TestApp::start("reviews").await;
    let reviews = sidecar(&dir, &control, "reviews", &app, &[]).await;
    let web = Proxy::start_controlled(&dir, "web", &control, &[]).await;
    // An operator's Workload claims that reviews' proxy serves `ratings` as ratings.
    let yaml = format!(
        "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {{name: ratings}}\nspec: {{selector: {{app: ratings}}, ports: [{{port: 80, protocol: http}}]}}\n---\napiVersion: weft.dev/v1alpha1\nkind: Workload\nmetadata: {{name: ratings-1}}\nspec: {{labels: {{app: ratings}}, address: \"{}\", identity: \"spiffe://weft.local/ns/default/sa/ratings\"}}\n",
        reviews.inbound.unwrap()
    );
    let (ok, _, err) = control.cli_with_stdin(&["apply", "-f", "-"], Some(&yaml));
    assert!(ok, "{err}");
    let http = client();
    let answer = eventually(Duration::from_secs(10), "the impostor to be refused", || {
        let http = http.clone();
        async move {
            let answer = get_via(&http, web.outbound, "ratings", "/", &[]).await;
            answer.weft_error().is_some_and(|e| e.contains("mutual TLS")).then_some(answer)
        }
    })
    .await;
    let error = answer.weft_error().unwrap_or_default();
    assert!(answer.status >= 500, "{}", answer.status);
    assert!(error.contains("not spiffe://weft.local/ns/default/sa/ratings"), "{error}");
    assert_eq!(app.hits(), 0, "nothing reached the app through the impostor's route");
}

/// A control plane issuing 10-second certificates, `reviews-1` serving reviews, and a
/// caller `web` that reaches it.
struct Mesh {
    dir: TempDir,
    control: Control,
    app: TestApp,
    reviews: Proxy,
    web: Proxy,
    http: support::HttpClient,
}

impl Mesh {
    async fn start(name: &str) -> Mesh {
        let dir = TempDir::new(name);
        let control = Control::start_on(&dir, "control", &dir.0.join("data"), &["--cert-lifetime", "10s"]).await;
        let app = TestApp::start("reviews").await;
        let reviews = sidecar(&dir, &control, "reviews", &app, &["--id", "reviews-1"]).await;
        let web = Proxy::start_controlled(&dir, "web", &control, &["--id", "web"]).await;
        let http = client();
        eventually(Duration::from_secs(10), "reviews to be served", || {
            let http = http.clone();
            async move { (get_via(&http, web.outbound, "reviews", "/", &[]).await.status == 200).then_some(()) }
        })
        .await;
        Mesh { dir, control, app, reviews, web, http }
    }
}

/// A proxy's `/config`.
fn proxy_config(proxy: &Proxy) -> impl std::future::Future<Output = serde_json::Value> {
    let admin = proxy.admin;
    async move {
        let (_, body) = support::http_get(admin, "/config", &[]).await.unwrap();
        serde_json::from_slice(&body).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_steady_load_without_a_failed_request() {
    let Mesh { dir: _dir, control, app: _app, reviews, web, http } = Mesh::start("mtls-rotation").await;
    let serial = |proxy: &Proxy| {
        let config = proxy_config(proxy);
        async move { config.await["identity"]["serial"].as_str().unwrap().to_string() }
    };
    let mut seen_web = vec![serial(&web).await];
    let mut seen_reviews = vec![serial(&reviews).await];
    // Steady load until each proxy has renewed twice: every request must succeed.
    let (mut sent, mut failed) = (0, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen_web.len() < 3 || seen_reviews.len() < 3 {
        assert!(Instant::now() < deadline, "no two renewals within 60s: web {seen_web:?}, reviews {seen_reviews:?}");
        for _ in 0..20 {
            let answer = get_via(&http, web.outbound, "reviews", "/", &[("connection", "close")]).await;
            sent += 1;
            if answer.status != 200 {
                failed.push((answer.status, answer.weft_error()));
            }
        }
        for (proxy, seen) in [(&web, &mut seen_web), (&reviews, &mut seen_reviews)] {
            let now = serial(proxy).await;
            if seen.last() != Some(&now) {
                seen.push(now);
            }
        }
    }
    assert!(failed.is_empty(), "{} of {sent} requests failed during rotation: {failed:?}", failed.len());
    assert!(web.log().contains("renewed this proxy's certificate"));

    // The operator sees each workload's identity and current certificate.
    let shown = eventually(Duration::from_secs(5), "describe to show the current certificate", || {
        let (ok, out, err) = control.cli(&["describe", "workload", "reviews-1"]);
        assert!(ok, "{err}");
        let serial = serial(&reviews);
        async move {
            let serial = serial.await;
            out.contains(&format!("serial {serial}")).then_some(out)
        }
    })
    .await;
    assert!(shown.contains("Identity:     spiffe://weft.local/ns/default/sa/reviews"), "{shown}");
    assert!(shown.contains("Expires:    in "), "{shown}");
    let (ok, out, err) = control.cli(&["check"]);
    assert!(ok && out.starts_with("ok: "), "{out}{err}");
    // A proxy that stops renewing (frozen here) shows up in `weft check`.
    let pid = web.child.id().to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let report = eventually(Duration::from_secs(20), "weft check to flag the frozen proxy", || {
        let (ok, out, _) = control.cli(&["check"]);
        async move { (!ok && out.contains("default/web")).then_some(out) }
    })
    .await;
    assert!(Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    assert!(report.contains("has not been renewed") || report.contains("expired"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotation_keeps_traffic_flowing_and_old_tokens_work_until_it_is_finished() {
    let Mesh { dir, control, app: _app, reviews, web, http } = Mesh::start("mtls-root-rotation").await;
    let old_token = control.join_token(&dir, "reviews", "default");
    let config = proxy_config;
    let old_issuer = config(&web).await["identity"]["issuer"].as_str().unwrap().to_string();

    let (ok, _, err) = control.cli(&["ca", "rotate"]);
    assert!(ok && err.contains("rotation started"), "{err}");
    // Steady load until both proxies present certificates of the new root.
    let (mut sent, mut failed) = (0, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        assert!(Instant::now() < deadline, "the proxies did not move to the new root within 40s");
        for _ in 0..20 {
            let answer = get_via(&http, web.outbound, "reviews", "/", &[("connection", "close")]).await;
            sent += 1;
            if answer.status != 200 {
                failed.push((answer.status, answer.weft_error()));
            }
        }
        let issuers = [config(&web).await, config(&reviews).await].map(|c| c["identity"]["issuer"].to_string());
        if issuers.iter().all(|issuer| !issuer.contains(&old_issuer)) {
            break;
        }
    }
    assert!(failed.is_empty(), "{} of {sent} requests failed during the rotation: {failed:?}", failed.len());
    // A proxy joining with a token made before the rotation still gets in.
    let late = Proxy::start_with_token(&dir, "late", &control.grpc.to_string(), &old_token, &[]).await;
    assert_eq!(get_via(&http, late.outbound, "reviews", "/", &[]).await.status, 200);

    // Finishing is refused while old certificates may live, then done.
    let (ok, _, err) = control.cli(&["ca", "finish-rotation"]);
    assert!(!ok && err.contains("may be in use"), "{err}");
    eventually(Duration::from_secs(20), "the rotation to be finished", || {
        let (ok, _, _) = control.cli(&["ca", "finish-rotation"]);
        async move { ok.then_some(()) }
    })
    .await;
    eventually(Duration::from_secs(10), "the proxies to trust only the new root", || {
        let web = config(&web);
        async move {
            let bundle = web.await["control"]["trustBundle"].as_str().unwrap_or_default().to_string();
            (bundle.matches("BEGIN CERTIFICATE").count() == 1).then_some(())
        }
    })
    .await;
    for _ in 0..20 {
        assert_eq!(get_via(&http, web.outbound, "reviews", "/", &[("connection", "close")]).await.status, 200);
    }
    // The old root is gone: its tokens no longer join.
    let log = dir.0.join("refused.log");
    let status = Command::new(support::WEFT)
        .args(["proxy", "--control", &control.grpc.to_string(), "--token-file", old_token.to_str().unwrap()])
        .args(["--outbound-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .stderr(std::fs::File::create(&log).unwrap())
        .status()
        .unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success() && text.contains("not the one the join token names"), "{text}");
}
