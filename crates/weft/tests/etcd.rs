//! The control plane on a real etcd cluster: several replicas share it, any replica
//! serves any proxy, and the mesh outlives the loss of a replica and of an etcd member.
//! TLS to etcd, with client certificates.

mod support;

use std::{collections::BTreeMap, process::Command, time::Duration};

use serde_json::Value;
use support::{client, eventually, get_via, http_get, Control, Etcd, EtcdTls, Proxy, TempDir, TestApp, WEFT};

async fn status(control: &Control) -> Value {
    match support::api_request(&control.server(), Some(&control.admin_token()), "GET", "/api/v1/status", None, None)
        .await
    {
        Ok((200, body)) => body,
        _ => Value::Null,
    }
}

/// Proxy id → the replica holding its stream, as `weft get proxies` on `control` says.
fn proxies(control: &Control) -> BTreeMap<String, String> {
    let (_, out, _) = control.cli(&["get", "proxies", "-o", "json"]);
    let answer: Value = serde_json::from_str(&out).unwrap_or_default();
    answer["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (p["proxyId"].as_str().unwrap_or("").to_string(), p["controlPlane"].as_str().unwrap_or("").to_string())
        })
        .collect()
}

/// A route tagging every answer from `reviews` with `x-route: <tag>`.
fn tagged_route(tag: &str) -> String {
    format!(
        r#"
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {{name: reviews}}
spec: {{selector: {{app: reviews}}, ports: [{{port: 80, protocol: http}}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: reviews-tagged}}
spec:
  parentRefs: [{{kind: Service, name: reviews, port: 80}}]
  rules:
  - backendRefs: [{{name: reviews, port: 80}}]
    filters: [{{type: ResponseHeaderModifier, responseHeaderModifier: {{set: [{{name: x-route, value: {tag}}}]}}}}]
"#
    )
}

/// Waits until `caller` serves reviews through the route tagged `tag`.
async fn route_reaches(caller: &Proxy, tag: &str, what: &str) {
    let http = client();
    eventually(Duration::from_secs(10), what, || {
        let http = http.clone();
        async move {
            let answer = get_via(&http, caller.outbound, "reviews", "/", &[]).await;
            answer.headers.get("x-route").is_some_and(|v| v == tag).then_some(())
        }
    })
    .await;
}

/// `base64 ARG` on `input`.
fn base64(arg: &str, input: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("base64")
        .arg(arg)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    String::from_utf8_lossy(&child.wait_with_output().unwrap().stdout).into_owned()
}

/// The value etcd holds at `key`, read through etcd's JSON gateway with curl.
fn etcd_value(etcd: &Etcd, key: &str) -> String {
    let body = format!(r#"{{"key": "{}"}}"#, base64("-w0", key));
    let url = format!("http://{}/v3/kv/range", etcd.client());
    let output = Command::new("curl").args(["-sf", "-X", "POST", &url, "-d", &body]).output().unwrap();
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
    base64("-d", answer["kvs"][0]["value"].as_str().unwrap_or_default())
}

/// A key file for `--ca-encryption-key`, shared by every replica of a test.
fn encryption_key(dir: &TempDir) -> String {
    dir.write("ca-encryption.key", &"ab".repeat(32)).display().to_string()
}

async fn sidecar(dir: &TempDir, name: &str, controls: &str, issuer: &Control, service: &str, app: &TestApp) -> Proxy {
    let app_addr = app.address.to_string();
    let args = ["--id", name, "--service", service, "--app-addr", &app_addr, "--health-interval", "200ms"];
    Proxy::start_with_controls(dir, name, controls, issuer, &args).await
}

#[tokio::test]
async fn replicas_share_one_etcd_and_outlive_a_replica_and_an_etcd_member() {
    let dir = TempDir::new("etcd-replicas");
    let Some(mut etcd) = Etcd::start_cluster(&dir, "etcd", 3, None).await else { return };
    let (store, key) = (etcd.store(), encryption_key(&dir));
    let flags = ["--store", store.as_str(), "--lease", "3s", "--ca-encryption-key", &key];
    let mut a = Control::start_on(&dir, "control-a", &dir.0.join("a"), &flags).await;
    // A leads before B starts, so that killing A makes B take over.
    eventually(Duration::from_secs(20), "control-a to lead", || async {
        (status(&a).await["leader"] == true).then_some(())
    })
    .await;
    let mut b = Control::start_on(&dir, "control-b", &dir.0.join("b"), &flags).await;
    // The admin token was made by A, on A's host: an operator copies it.
    b.token_file = a.token_file.clone();
    let (a_id, b_id) = (status(&a).await["replica"].as_str().unwrap().to_string(), status(&b).await);
    let b_id = b_id["replica"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(20), "each replica to list both", || async {
        (status(&b).await["replicas"].as_array().map_or(0, Vec::len) == 2).then_some(())
    })
    .await;
    assert_eq!(status(&b).await["leader"], false, "one leader");

    // One CA for every replica, its key encrypted in etcd; a replica without the key file
    // is refused, saying which flag it needs.
    let root = status(&a).await["caRoot"].clone();
    assert!(root.is_string() && root == status(&b).await["caRoot"], "{root}");
    let stored = etcd_value(&etcd, "/weft/objects/CertificateAuthority/default/mesh");
    assert!(stored.contains("sealed") && !stored.contains("PRIVATE KEY"), "{stored}");
    let output = Command::new(WEFT)
        .args(["control", "--api-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0", "--store", &store])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && err.contains("--ca-encryption-key"), "{err}");

    let reviews = TestApp::start("reviews").await;
    let ratings = TestApp::start("ratings").await;
    let (a_first, b_first) = (format!("{},{}", a.grpc, b.grpc), format!("{},{}", b.grpc, a.grpc));
    let _reviews_proxy = sidecar(&dir, "reviews-1", &a_first, &a, "reviews", &reviews).await;
    let mut ratings_proxy = sidecar(&dir, "ratings-1", &b_first, &b, "ratings", &ratings).await;
    let caller = Proxy::start_with_controls(&dir, "web", &a_first, &a, &["--id", "web"]).await;

    // Either replica lists every proxy, wherever its stream is.
    let expected = BTreeMap::from([
        ("ratings-1".to_string(), b_id.clone()),
        ("reviews-1".to_string(), a_id.clone()),
        ("web".to_string(), a_id.clone()),
    ]);
    eventually(Duration::from_secs(10), "both replicas list all three proxies", || {
        let listed = (proxies(&a), proxies(&b));
        let expected = &expected;
        async move { (listed.0 == *expected && listed.1 == *expected).then_some(()) }
    })
    .await;

    // Both replicas give each Service the same virtual IP, stored once, in etcd.
    let virtual_ip = |control: &Control, service: &str| {
        let (_, described, _) = control.cli(&["describe", "service", service]);
        described.lines().find_map(|l| l.strip_prefix("Virtual IP:")).map(|a| a.trim().to_string())
    };
    for service in ["reviews", "ratings"] {
        eventually(Duration::from_secs(10), "both replicas to show one stored virtual IP", || {
            let (on_a, on_b) = (virtual_ip(&a, service), virtual_ip(&b, service));
            let stored = on_a.as_ref().map(|address| etcd_value(&etcd, &format!("/weft/objects/VirtualIP//{address}")));
            let agreed =
                on_a.is_some() && on_a == on_b && stored.is_some_and(|r| r.contains(&format!("\"{service}\"")));
            async move { agreed.then_some(()) }
        })
        .await;
    }

    // Every proxy holds the trust bundle: the CA's root.
    let bundle = caller.config().await["control"]["trustBundle"].as_str().unwrap_or_default().to_string();
    assert!(bundle.starts_with("-----BEGIN CERTIFICATE-----"), "{bundle}");

    // The caller, on A, reaches a workload registered on B; an apply through B reaches it.
    let http = client();
    let (ok, _, err) = b.cli_with_stdin(&["apply", "-f", "-"], Some(&tagged_route("one")));
    assert!(ok, "{err}");
    eventually(Duration::from_secs(10), "the caller on A serves B's apply and B's workload", || {
        let http = http.clone();
        let caller = caller.outbound;
        async move {
            let reviews = get_via(&http, caller, "reviews", "/", &[]).await;
            let ratings = get_via(&http, caller, "ratings", "/", &[]).await;
            let tagged = reviews.headers.get("x-route").is_some_and(|v| v == "one");
            (tagged && reviews.app() == "reviews" && ratings.app() == "ratings").then_some(())
        }
    })
    .await;

    // A (the leader) dies. Its proxies move to B, B takes the lead, no endpoint expires
    // meanwhile, and a new apply reaches every proxy.
    a.kill();
    let moved = BTreeMap::from([
        ("ratings-1".to_string(), b_id.clone()),
        ("reviews-1".to_string(), b_id.clone()),
        ("web".to_string(), b_id.clone()),
    ]);
    eventually(Duration::from_secs(20), "A's proxies to move to B", || {
        let listed = proxies(&b);
        let moved = &moved;
        async move { (listed == *moved).then_some(()) }
    })
    .await;
    eventually(Duration::from_secs(20), "B to take the lead", || async {
        (status(&b).await["leader"] == true).then_some(())
    })
    .await;
    for _ in 0..20 {
        assert_eq!(get_via(&http, caller.outbound, "reviews", "/", &[]).await.app(), "reviews");
    }
    let (ok, _, err) = b.cli_with_stdin(&["apply", "-f", "-"], Some(&tagged_route("two")));
    assert!(ok, "{err}");
    route_reaches(&caller, "two", "B's apply reaches the proxies that moved").await;

    // The new leader expires a dead proxy's registration once its lease lapses: its
    // implied Service goes with it.
    let (ok, out, err) = b.cli(&["describe", "service", "ratings"]);
    assert!(ok && out.contains("ratings-1"), "{out}{err}");
    let _ = ratings_proxy.child.kill();
    let _ = ratings_proxy.child.wait();
    eventually(Duration::from_secs(15), "describe to show the proxy gone, its lease running", || {
        let (_, out, _) = b.cli(&["describe", "service", "ratings"]);
        async move { out.contains("proxy disconnected, expires in").then_some(()) }
    })
    .await;
    eventually(Duration::from_secs(30), "the dead proxy's registration to expire", || {
        let (ok, _, err) = b.cli(&["describe", "service", "ratings"]);
        async move { (!ok && err.contains("not found")).then_some(()) }
    })
    .await;
    assert!(std::fs::read_to_string(&b.log).unwrap().contains("lease lapsed"));

    // One etcd member dies: reads, writes and traffic go on.
    etcd.kill_member(0);
    for _ in 0..20 {
        assert_eq!(get_via(&http, caller.outbound, "reviews", "/", &[]).await.app(), "reviews");
    }
    eventually(Duration::from_secs(20), "an apply to succeed with one etcd member down", || {
        let (ok, _, _) = b.cli_with_stdin(&["apply", "-f", "-"], Some(&tagged_route("three")));
        async move { ok.then_some(()) }
    })
    .await;
    route_reaches(&caller, "three", "that apply reaches the caller").await;
    let (ok, out, err) = b.cli(&["get", "httproutes", "-o", "yaml"]);
    assert!(ok && out.contains("three"), "{out}{err}");
}

#[tokio::test]
async fn the_control_plane_talks_tls_to_etcd_with_a_client_certificate() {
    let dir = TempDir::new("etcd-tls");
    let tls = EtcdTls::generate(&dir);
    let Some(etcd) = Etcd::start_cluster(&dir, "etcd-tls", 1, Some(&tls)).await else { return };
    let store = etcd.store();
    let (ca, cert, key) =
        (tls.ca.display().to_string(), tls.client_cert.display().to_string(), tls.client_key.display().to_string());

    // Without the CA, or without the client certificate etcd asks for: a clear refusal.
    for (flags, advice) in [(vec![], "--etcd-ca"), (vec!["--etcd-ca", ca.as_str()], "--etcd-cert")] {
        let output = Command::new(WEFT)
            .args(["control", "--api-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0", "--store", &store])
            .args(&flags)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success() && err.contains("etcd does not answer") && err.contains(advice), "{err}");
    }
    let output = Command::new(WEFT).args(["control", "--etcd-ca", &ca]).output().unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && err.contains("apply to an etcd store"), "{err}");

    let encryption = encryption_key(&dir);
    let flags = [
        "--store",
        store.as_str(),
        "--etcd-ca",
        &ca,
        "--etcd-cert",
        &cert,
        "--etcd-key",
        &key,
        "--ca-encryption-key",
        &encryption,
    ];
    let control = Control::start_on(&dir, "control", &dir.0.join("data"), &flags).await;
    let (ok, out, err) = control.cli_with_stdin(&["apply", "-f", "-"], Some(&tagged_route("tls")));
    assert!(ok && out.contains("httproute/reviews-tagged created"), "{out}{err}");
    let (ok, out, err) = control.cli(&["get", "httproutes", "-o", "yaml"]);
    assert!(ok && out.contains("tls"), "{out}{err}");
    assert!(status(&control).await["store"].as_str().unwrap().starts_with("etcd+tls://"));
}

#[tokio::test]
async fn a_replica_cut_off_longer_than_a_lease_gets_its_proxies_back_when_it_returns() {
    let dir = TempDir::new("etcd-paused");
    let Some(etcd) = Etcd::start(&dir, "etcd").await else { return };
    let (store, key) = (etcd.store(), encryption_key(&dir));
    let flags = ["--store", store.as_str(), "--lease", "2s", "--ca-encryption-key", &key];
    let a = Control::start_on(&dir, "control-a", &dir.0.join("a"), &flags).await;
    eventually(Duration::from_secs(20), "control-a to lead", || async {
        (status(&a).await["leader"] == true).then_some(())
    })
    .await;
    let mut b = Control::start_on(&dir, "control-b", &dir.0.join("b"), &flags).await;
    b.token_file = a.token_file.clone();
    let ratings = TestApp::start("ratings").await;
    let ratings_proxy = sidecar(&dir, "ratings-1", &b.grpc.to_string(), &a, "ratings", &ratings).await;
    let caller = Proxy::start_with_controls(&dir, "web", &a.grpc.to_string(), &a, &["--id", "web"]).await;
    let http = client();
    let reachable = || {
        let http = http.clone();
        let caller = caller.outbound;
        async move { (get_via(&http, caller, "ratings", "/", &[]).await.app() == "ratings").then_some(()) }
    };
    eventually(Duration::from_secs(10), "ratings, registered on B, to be reachable from A", reachable).await;

    // B freezes (a long pause, a partition from etcd): its etcd session lapses, so the
    // leader A sees ratings-1 attached nowhere and expires it after the lease.
    let signal = |name: &str| Command::new("kill").args([name, &b.child.id().to_string()]).status().unwrap();
    assert!(signal("-STOP").success());
    eventually(Duration::from_secs(30), "the leader to expire the frozen replica's proxy", || {
        let (ok, _, _) = a.cli(&["describe", "service", "ratings"]);
        async move { (!ok).then_some(()) }
    })
    .await;

    // B comes back: it opens a new session, claims its streams again and writes back the
    // registration the store lost; ratings is reachable again, with no proxy restarted.
    assert!(signal("-CONT").success());
    eventually(Duration::from_secs(30), "ratings to be back", reachable).await;
    let (ok, out, err) = a.cli(&["describe", "service", "ratings"]);
    assert!(ok && out.contains("ratings-1") && !out.contains("disconnected"), "{out}{err}");

    // A root rotation started on A reaches B through etcd: B signs with the new root, and
    // B's proxy receives the bundle with both roots; traffic between them flows on.
    let (ok, _, err) = a.cli(&["ca", "rotate"]);
    assert!(ok, "{err}");
    let rotated = status(&a).await;
    eventually(Duration::from_secs(10), "replica B to follow the rotation", || async {
        let b_status = status(&b).await;
        (b_status["caRoot"] == rotated["caRoot"] && b_status["caRoots"].as_array().map_or(0, Vec::len) == 2)
            .then_some(())
    })
    .await;
    eventually(Duration::from_secs(10), "B's proxy to trust both roots", || {
        let admin = ratings_proxy.admin;
        async move {
            let (_, body) = http_get(admin, "/config", &[]).await.ok()?;
            let config: Value = serde_json::from_slice(&body).ok()?;
            let bundle = config["control"]["trustBundle"].as_str().unwrap_or_default().to_string();
            (bundle.matches("BEGIN CERTIFICATE").count() == 2).then_some(())
        }
    })
    .await;
    eventually(Duration::from_secs(10), "ratings to stay reachable after the rotation", reachable).await;
}
