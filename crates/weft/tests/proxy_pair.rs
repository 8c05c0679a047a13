//! A request through an outbound → inbound pair of real proxies arrives, over HTTP/1.1
//! and h2c, addressed by Host or as an HTTP proxy; unknown hosts are refused; the admin
//! endpoints behave.

mod support;

use std::time::Duration;

use support::*;

/// Starts app "web" behind proxy B (inbound), and proxy A whose config points Service
/// `web` at B's inbound listener.
async fn pair(dir: &TempDir) -> (TestApp, Proxy, Proxy) {
    let app = TestApp::start("web").await;
    let b_config = dir.write("b.yaml", &mesh_yaml(&[("web", "app: web")], &[], ""));
    let app_addr = app.address.to_string();
    let b = Proxy::start(dir, "b", &b_config, &["--service", "web", "--app-addr", &app_addr]).await;
    let a_config =
        dir.write("a.yaml", &mesh_yaml(&[("web", "app: web")], &[("web-1", "app: web", b.inbound.unwrap())], ""));
    let a = Proxy::start(dir, "a", &a_config, &["--service", "client"]).await;
    (app, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_http1_and_h2c_through_a_proxy_pair() {
    let dir = TempDir::new("pair");
    let (app, a, b) = pair(&dir).await;
    let outbound = format!("http://{}/hello?x=1", a.outbound);

    let (ok, body, err) = curl(&["-H", "Host: web", &outbound]);
    assert!(ok, "{err}");
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["app"], "web");
    assert_eq!(seen["path"], "/hello?x=1");

    let (ok, body, err) =
        curl(&["--http2-prior-knowledge", "-w", "\n%{http_version}", "-H", "Host: web.default.svc:80", &outbound]);
    assert!(ok, "{err}");
    assert!(body.ends_with("\n2"), "curl spoke h2c to the outbound listener: {body}");
    assert!(body.contains("\"app\":\"web\""), "{body}");

    // As HTTP_PROXY clients do: absolute-form URI.
    let (ok, body, err) = curl(&["-x", &format!("http://{}", a.outbound), "http://web.default/abs"]);
    assert!(ok, "{err}");
    assert!(body.contains("\"path\":\"/abs\""), "{body}");
    assert_eq!(app.hits(), 3);

    // Both directions are counted.
    let outbound_ok = a
        .metric_sum(
            "weft_requests_total",
            &["direction=\"outbound\"", "destination_service=\"default/web\"", "status_code=\"200\""],
        )
        .await;
    assert_eq!(outbound_ok, 3.0);
    let inbound_ok = b
        .metric_sum(
            "weft_requests_total",
            &["direction=\"inbound\"", "destination_service=\"default/web\"", "status_code=\"200\""],
        )
        .await;
    assert_eq!(inbound_ok, 3.0);
    let histogram = a.metric_sum("weft_request_duration_seconds_count", &["direction=\"outbound\""]).await;
    assert_eq!(histogram, 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_hosts_get_404_and_the_outbound_listener_is_not_an_open_proxy() {
    let dir = TempDir::new("unknown");
    let (app, a, _b) = pair(&dir).await;
    let client = client();
    for host in ["example.com", "web.other", "web:81"] {
        let answer = get_via(&client, a.outbound, host, "/", &[]).await;
        assert_eq!(answer.status, 404, "{host}");
        assert!(answer.weft_error().unwrap().starts_with("unknown-host"), "{host}");
    }
    let (ok, body, _) = curl(&["-x", &format!("http://{}", a.outbound), "-w", " %{http_code}", "http://example.com/"]);
    assert!(ok);
    assert!(body.ends_with(" 404"), "{body}");
    assert_eq!(app.hits(), 0);
    let refused = a.metric_sum("weft_requests_total", &["error=\"unknown-host\"", "status_code=\"404\""]).await;
    assert_eq!(refused, 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_serves_config_metrics_and_probes() {
    let dir = TempDir::new("admin");
    let (_app, a, _b) = pair(&dir).await;
    let config = a.config().await;
    assert_eq!(config["service"], "client");
    assert_eq!(config["ports"]["outbound"], a.outbound.to_string());
    assert_eq!(config["snapshot"]["services"][0]["name"], "web");
    assert_eq!(config["ready"], true);
    let (status, _) = http_get(a.admin, "/live", &[]).await.unwrap();
    assert_eq!(status, 200);
    let (status, _) = http_get(a.admin, "/nope", &[]).await.unwrap();
    assert_eq!(status, 404);
    let answer = get_via(&client(), a.outbound, "web", "/", &[]).await;
    assert_eq!(answer.status, 200);
    let metrics = a.metrics().await;
    assert!(metrics.contains("# TYPE weft_requests counter"), "{metrics}");
    assert!(metrics.contains("weft_requests_total{direction=\"outbound\",source_service=\"default/client\",destination_service=\"default/web\",route=\"\",status_code=\"200\",error=\"\",tls=\"false\"} 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_config_answers_loopback_only_when_bound_wider() {
    // The admin port bound to all interfaces; a client on a non-loopback address of this
    // host must be refused /config but may scrape /metrics.
    let Some(address) = NonLoopback::get() else { return };
    let ip = address.ip;
    let dir = TempDir::new("admin-wide");
    let config = dir.write("m.yaml", &mesh_yaml(&[], &[], ""));
    let proxy = Proxy::start(&dir, "p", &config, &["--admin-addr", "0.0.0.0:0"]).await;
    let external = std::net::SocketAddr::new(ip, proxy.admin.port());
    let (status, body) = http_get(external, "/config", &[]).await.unwrap();
    assert_eq!(status, 403, "{body:?}");
    let (status, _) = http_get(external, "/metrics", &[]).await.unwrap();
    assert_eq!(status, 200);
    let (status, _) = http_get(proxy.admin, "/config", &[]).await.unwrap();
    assert_eq!(status, 200, "loopback still gets /config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_an_in_flight_request_before_exiting() {
    let dir = TempDir::new("drain");
    let (app, mut a, _b) = pair(&dir).await;
    app.set_delay(Duration::from_millis(1500));
    let outbound = a.outbound;
    let slow = tokio::spawn(async move { get_via(&client(), outbound, "web", "/slow", &[]).await });
    eventually(Duration::from_secs(5), "the slow request to reach the app", || async {
        (app.hits() == 1).then_some(())
    })
    .await;
    a.terminate();
    let answer = slow.await.unwrap();
    assert_eq!(answer.status, 200, "the in-flight request completes during the drain");
    let status = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = a.child.try_wait().unwrap() {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "the proxy exits after draining");
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_and_expect_continue_bodies_arrive_whole() {
    let dir = TempDir::new("bodies");
    let (_app, a, _b) = pair(&dir).await;
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let sum: u64 = body.iter().map(|&b| b as u64).sum();
    let file = dir.0.join("body.bin");
    std::fs::write(&file, &body).unwrap();
    let data = format!("@{}", file.display());
    let url = format!("http://{}/upload", a.outbound);
    for extra in [["-H", "Transfer-Encoding: chunked"], ["-H", "Expect: 100-continue"]] {
        let (ok, out, err) = curl(&["-H", "Host: web", extra[0], extra[1], "--data-binary", &data, &url]);
        assert!(ok, "{extra:?}: {err}");
        let seen: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(seen["method"], "POST");
        assert_eq!(seen["bodyLength"], body.len(), "{extra:?}");
        assert_eq!(seen["bodySum"], sum, "{extra:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let dir = TempDir::new("json-logs");
    let config = dir.write("m.yaml", &mesh_yaml(&[], &[], ""));
    let proxy = Proxy::start(&dir, "p", &config, &["--log-format", "json"]).await;
    let log = proxy.log();
    let first = log.lines().next().expect("the proxy logs at start");
    let parsed: serde_json::Value = serde_json::from_str(first).unwrap_or_else(|e| panic!("{e}: {first}"));
    assert!(parsed["level"].is_string() && parsed["fields"].is_object(), "{parsed}");
}
