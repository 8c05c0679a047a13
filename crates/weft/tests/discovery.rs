//! End-to-end tests of proxies driven by a control plane: registration, discovery on
//! first use, live route changes with no failed request, health, leases and clean stops.

mod support;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use support::{client, eventually, get_via, Control, Proxy, TempDir, TestApp};

/// A registered proxy for `service` in front of `app`, labelled `version`.
async fn sidecar(dir: &TempDir, name: &str, control: &Control, service: &str, version: &str, app: &TestApp) -> Proxy {
    sidecar_checked(dir, name, control, service, version, app, "tcp").await
}

async fn sidecar_checked(
    dir: &TempDir,
    name: &str,
    control: &Control,
    service: &str,
    version: &str,
    app: &TestApp,
    check: &str,
) -> Proxy {
    let app_addr = app.address.to_string();
    let labels = format!("version={version}");
    let args = [
        "--service",
        service,
        "--labels",
        &labels,
        "--app-addr",
        &app_addr,
        "--health-check",
        check,
        "--health-interval",
        "200ms",
    ];
    Proxy::start_controlled(dir, name, control, &args).await
}

#[tokio::test]
async fn registered_workloads_are_reachable_by_name_and_routes_change_live() {
    let dir = TempDir::new("discovery-live");
    let control = Control::start_on(&dir, "control", &dir.0.join("data"), &["--lease", "1s"]).await;
    let v1 = TestApp::start("reviews-v1").await;
    let v2 = TestApp::start("reviews-v2").await;
    let _p1 = sidecar(&dir, "reviews-v1", &control, "reviews", "v1", &v1).await;
    let _p2 = sidecar(&dir, "reviews-v2", &control, "reviews", "v2", &v2).await;
    let caller = Proxy::start_controlled(&dir, "web", &control, &[]).await;
    let http = client();

    // No Service resource at all: registration alone makes `reviews` reachable, once both
    // instances report healthy. Both apps answer slower than the balancer's prior estimate
    // (10 ms) for now, so that p2c-ewma tries an endpoint it has not measured yet rather
    // than keep the first one it measured: whether both serve is then about membership.
    v1.set_delay(Duration::from_millis(25));
    v2.set_delay(Duration::from_millis(25));
    eventually(Duration::from_secs(10), "both instances serve reviews", || {
        let http = http.clone();
        async move {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..20 {
                let answer = get_via(&http, caller.outbound, "reviews", "/", &[]).await;
                if answer.status != 200 {
                    return None;
                }
                seen.insert(answer.app());
            }
            (seen.len() == 2).then_some(())
        }
    })
    .await;
    v1.set_delay(Duration::ZERO);
    v2.set_delay(Duration::ZERO);
    // The caller learned `reviews` on first use, and says so on /config.
    let config = caller.config().await;
    let subscriptions = config["control"]["subscriptions"].as_array().unwrap();
    assert!(subscriptions.iter().any(|s| s == "default/reviews"), "{subscriptions:?}");
    let (ok, out, _) = control.cli(&["get", "proxies"]);
    assert!(ok && out.matches("reviews-").count() == 2 && out.contains("proxy-"), "{out}");
    let (ok, out, _) = control.cli(&["describe", "service", "reviews"]);
    assert!(ok && out.matches("healthy").count() >= 2, "{out}");

    // Steady load while routes change: not one request may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(AtomicUsize::new(0));
    let load = {
        let (http, stop, failures, sent, outbound) =
            (http.clone(), stop.clone(), failures.clone(), sent.clone(), caller.outbound);
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let answer = get_via(&http, outbound, "reviews", "/", &[]).await;
                sent.fetch_add(1, Ordering::Relaxed);
                if answer.status != 200 {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let routes = r#"
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: reviews}
spec: {selector: {app: reviews}, ports: [{port: 80, protocol: http}]}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: reviews-v2}
spec: {selector: {app: reviews, version: v2}, ports: [{port: 80, protocol: http}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: all-to-v2}
spec:
  parentRefs: [{kind: Service, name: reviews, port: 80}]
  rules: [{backendRefs: [{name: reviews-v2, port: 80}]}]
"#;
    // The load runs before, during and after the switch.
    let sent_at_least = |n: usize| {
        let sent = sent.clone();
        move || {
            let count = sent.load(Ordering::Relaxed);
            async move { (count >= n).then_some(()) }
        }
    };
    eventually(Duration::from_secs(10), "load before the change", sent_at_least(20)).await;
    let (ok, _, err) = control.cli_with_stdin(&["apply", "-f", "-"], Some(routes));
    assert!(ok, "{err}");
    eventually(Duration::from_secs(10), "the caller routes everything to v2", || {
        let http = http.clone();
        async move {
            for _ in 0..20 {
                if get_via(&http, caller.outbound, "reviews", "/", &[]).await.app() != "reviews-v2" {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
    let after = sent.load(Ordering::Relaxed) + 20;
    eventually(Duration::from_secs(10), "load after the change", sent_at_least(after)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert_eq!(failures.load(Ordering::Relaxed), 0, "requests failed while the route changed");

    // The proxies acknowledged what they serve.
    let (_, out, _) = control.cli(&["get", "proxies", "-o", "json"]);
    let proxies: serde_json::Value = serde_json::from_str(&out).unwrap();
    for proxy in proxies["items"].as_array().unwrap() {
        assert_eq!(proxy["appliedVersion"], proxy["sentVersion"], "{proxy}");
    }

    // A bad apply is refused with its field path, and no proxy is sent anything new.
    let bad = routes.replace(
        "port: 80, protocol: http}]}\n---\napiVersion: gateway",
        "port: 80, protocol: sctp}]}\n---\napiVersion: gateway",
    );
    assert_ne!(bad, routes);
    let (ok, _, err) = control.cli_with_stdin(&["apply", "-f", "-"], Some(&bad));
    assert!(!ok && err.contains("field spec.ports[0].protocol"), "{err}");
    let (_, after, _) = control.cli(&["get", "proxies", "-o", "json"]);
    let after: serde_json::Value = serde_json::from_str(&after).unwrap();
    let versions = |v: &serde_json::Value| -> Vec<String> {
        v["items"].as_array().unwrap().iter().map(|p| p["sentVersion"].to_string()).collect()
    };
    assert_eq!(versions(&proxies), versions(&after));
    assert_eq!(get_via(&http, caller.outbound, "reviews", "/", &[]).await.app(), "reviews-v2");
}

#[tokio::test]
async fn unknown_services_are_refused_quickly_and_dead_or_sick_instances_stop_getting_traffic() {
    let dir = TempDir::new("discovery-health");
    let control = Control::start_on(&dir, "control", &dir.0.join("data"), &["--lease", "1s"]).await;
    let a = TestApp::start("a").await;
    let b = TestApp::start("b").await;
    let c = TestApp::start("c").await;
    let pa = sidecar(&dir, "a", &control, "ratings", "v1", &a).await;
    let mut pb = sidecar(&dir, "b", &control, "ratings", "v1", &b).await;
    let _pc = sidecar_checked(&dir, "c", &control, "ratings", "v1", &c, "http:/healthz").await;
    let caller = Proxy::start_controlled(&dir, "caller", &control, &[]).await;
    let http = client();

    // Round robin, so that "every instance serves" is a fact about membership; p2c-ewma
    // rightly starves the slowest of three for as long as its estimate takes to decay.
    let policy = r#"
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: ratings}
spec:
  targetRef: {kind: Service, name: ratings}
  loadBalancer: {algorithm: round-robin}
"#;
    let (ok, _, err) = control.cli_with_stdin(&["apply", "-f", "-"], Some(policy));
    assert!(ok, "{err}");

    let answer = get_via(&http, caller.outbound, "nosuch", "/", &[]).await;
    assert_eq!(answer.status, 404);
    assert!(answer.weft_error().unwrap_or_default().contains("unknown"), "{:?}", answer.weft_error());

    let serving = |want: usize| {
        let http = http.clone();
        let outbound = caller.outbound;
        move || {
            let http = http.clone();
            async move {
                let mut seen = std::collections::BTreeSet::new();
                for _ in 0..30 {
                    let answer = get_via(&http, outbound, "ratings", "/", &[]).await;
                    if answer.status != 200 {
                        return None;
                    }
                    seen.insert(answer.app());
                }
                (seen.len() == want).then_some(seen)
            }
        }
    };
    eventually(Duration::from_secs(10), "three instances serve ratings", serving(3)).await;

    // An application whose health check fails stops receiving traffic.
    c.set_status(503);
    let seen = eventually(Duration::from_secs(10), "the dead app's instance is avoided", serving(2)).await;
    assert!(!seen.contains("c"), "{seen:?}");

    // A proxy killed outright loses its endpoint when its lease lapses.
    pb.child.kill().unwrap();
    pb.child.wait().unwrap();
    let seen = eventually(Duration::from_secs(10), "the killed proxy's endpoint lapses", serving(1)).await;
    assert!(seen.contains("a"), "{seen:?}");

    // A proxy that stops cleanly deregisters at once: the service then has no endpoints.
    pa.terminate();
    eventually(Duration::from_secs(5), "the stopped proxy is gone", || {
        let http = http.clone();
        async move { (get_via(&http, caller.outbound, "ratings", "/", &[]).await.status == 503).then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn the_data_plane_outlives_its_control_plane_and_reconverges_after_a_restart() {
    let dir = TempDir::new("discovery-restart");
    let data = dir.0.join("data");
    let mut control = Control::start_on(&dir, "control", &data, &["--lease", "2s"]).await;
    let app = TestApp::start("details").await;
    let _sidecar = sidecar(&dir, "details", &control, "details", "v1", &app).await;
    let caller = Proxy::start_controlled(&dir, "caller", &control, &[]).await;
    let http = client();
    eventually(Duration::from_secs(10), "details is served", || {
        let http = http.clone();
        async move { (get_via(&http, caller.outbound, "details", "/", &[]).await.status == 200).then_some(()) }
    })
    .await;

    // The control plane dies: every request still succeeds on the last good view.
    control.kill();
    for _ in 0..50 {
        assert_eq!(get_via(&http, caller.outbound, "details", "/", &[]).await.status, 200);
    }

    // It comes back on the same store at the same discovery address: the proxies
    // reconnect on their own, nothing expires meanwhile, and a new apply reaches them.
    let grpc = control.grpc.to_string();
    let api = control.api.to_string();
    let control =
        Control::start_on(&dir, "control-2", &data, &["--lease", "2s", "--grpc-addr", &grpc, "--api-addr", &api]).await;
    eventually(Duration::from_secs(15), "both proxies reconnect", || {
        let (_, out, _) = control.cli(&["get", "proxies", "-o", "json"]);
        let proxies: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        let connected = proxies["items"].as_array().map_or(0, Vec::len);
        async move { (connected == 2).then_some(()) }
    })
    .await;
    let route = r#"
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: details}
spec: {selector: {app: details}, ports: [{port: 80, protocol: http}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: details-tagged}
spec:
  parentRefs: [{kind: Service, name: details, port: 80}]
  rules:
  - backendRefs: [{name: details, port: 80}]
    filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x-route, value: tagged}]}}]
"#;
    let (ok, _, err) = control.cli_with_stdin(&["apply", "-f", "-"], Some(route));
    assert!(ok, "{err}");
    eventually(Duration::from_secs(10), "the new route reaches the caller", || {
        let http = http.clone();
        async move {
            let answer = get_via(&http, caller.outbound, "details", "/", &[]).await;
            (answer.status == 200 && answer.headers.get("x-route").is_some()).then_some(())
        }
    })
    .await;
}
