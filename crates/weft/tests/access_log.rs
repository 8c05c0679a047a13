//! Access logs end to end: JSON lines with typed fields from both proxies of a hop, a
//! proxy-made answer's reason, errors-only set by a Service's TrafficPolicy over
//! MeshConfig, and the file reopened on SIGUSR1 (as logrotate needs).

mod support;

use std::{path::Path, process::Command, time::Duration};

use serde_json::Value;
use support::{client, eventually, get_via, Control, Proxy, TempDir, TestApp};

/// The lines of `file` so far.
fn lines(file: &Path) -> Vec<Value> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}")))
        .collect()
}

/// Waits until `file` has a line of `direction` for `path`.
async fn line_for(file: &Path, direction: &str, path: &str) -> Value {
    eventually(Duration::from_secs(20), &format!("an {direction} line for {path} in {}", file.display()), || {
        let found = lines(file).into_iter().find(|l| l["direction"] == direction && l["path"] == path);
        async move { found }
    })
    .await
}

fn signal(proxy: &Proxy, name: &str) {
    let status = Command::new("kill").args([&format!("-{name}"), &proxy.child.id().to_string()]).status().unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_carry_typed_fields_errors_only_applies_and_sigusr1_reopens_the_file() {
    let dir = TempDir::new("access-log");
    let log = dir.0.join("access.log");
    let control = Control::start(&dir, "control").await;
    control.apply(&format!(
        "apiVersion: weft.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: mesh}}\nspec:\n  accessLog: {{path: \
             \"{}\"}}\n",
        log.display()
    ));
    let app = TestApp::start("echo").await;
    let echo = Proxy::meshed(&dir, &control, "echo", Some(app.address)).await;
    let edge = Proxy::meshed(&dir, &control, "edge", None).await;
    let http = client();
    eventually(Duration::from_secs(20), "echo to answer", || {
        let http = http.clone();
        let edge = edge.outbound;
        async move { (get_via(&http, edge, "echo", "/", &[]).await.status == 200).then_some(()) }
    })
    .await;

    let answer = get_via(
        &http,
        edge.outbound,
        "echo",
        "/logged?x=1",
        &[("user-agent", "weft-test/1"), ("x-request-id", "req-1")],
    )
    .await;
    assert_eq!(answer.status, 200);
    let out = line_for(&log, "outbound", "/logged?x=1").await;
    assert_eq!(out["method"], "GET");
    assert_eq!(out["authority"], "echo");
    assert_eq!(out["status"], 200, "numbers are numbers: {out}");
    assert_eq!(out["bytes_sent"].as_u64(), Some(answer.body.len() as u64), "{out}");
    assert_eq!(out["bytes_received"], 0);
    assert!(out["duration_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{out}");
    assert_eq!(out["retries"], 0);
    assert_eq!(out["weft_error"], Value::Null);
    assert_eq!(out["request_id"], "req-1");
    assert_eq!(out["user_agent"], "weft-test/1");
    assert_eq!(out["source_identity"], "spiffe://weft.local/ns/default/sa/edge");
    assert_eq!(out["destination_identity"], "spiffe://weft.local/ns/default/sa/echo");
    assert_eq!(out["destination_service"], "default/echo");
    assert_eq!(out["upstream"], echo.inbound.unwrap().to_string(), "the endpoint: echo's proxy");
    assert!(out["timestamp"].as_str().is_some_and(|t| t.len() == 24 && t.ends_with('Z')), "{out}");
    let inbound = line_for(&log, "inbound", "/logged?x=1").await;
    assert_eq!(inbound["source_identity"], "spiffe://weft.local/ns/default/sa/edge", "as mutual TLS proved it");
    assert_eq!(inbound["upstream"], app.address.to_string(), "the application");
    assert_eq!(inbound["request_id"], "req-1");

    // A proxy-made answer names its reason.
    control.apply(
        "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: nowhere}\nspec: {selector: {app: nowhere}, \
         ports: [{port: 80}]}\n",
    );
    eventually(Duration::from_secs(20), "nowhere to answer 503", || {
        let http = http.clone();
        let edge = edge.outbound;
        async move { (get_via(&http, edge, "nowhere", "/made", &[]).await.status == 503).then_some(()) }
    })
    .await;
    let made = line_for(&log, "outbound", "/made").await;
    assert_eq!(made["weft_error"], "no-endpoints", "{made}");
    assert_eq!(made["status"], 503);

    // errorsOnly for echo, by its TrafficPolicy over MeshConfig: a 200 is not logged, a
    // 503 is.
    control.apply(
        "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: echo}\nspec:\n  targetRef: {kind: \
         Service, name: echo}\n  retries: {attempts: 0}\n  accessLog: {errorsOnly: true}\n",
    );
    let (edge_ref, echo_ref) = (&edge, &echo);
    eventually(Duration::from_secs(20), "errorsOnly on both proxies", || async move {
        let mut applied = true;
        for proxy in [edge_ref, echo_ref] {
            let config = proxy.config().await;
            let services = config["snapshot"]["services"].as_array().cloned().unwrap_or_default();
            applied &= services.iter().any(|s| s["name"] == "echo" && s["policy"]["accessLog"]["errorsOnly"] == true);
        }
        applied.then_some(())
    })
    .await;
    assert_eq!(get_via(&http, edge.outbound, "echo", "/quiet", &[]).await.status, 200);
    app.set_status(503);
    assert_eq!(get_via(&http, edge.outbound, "echo", "/loud", &[]).await.status, 503);
    app.set_status(200);
    line_for(&log, "outbound", "/loud").await;
    line_for(&log, "inbound", "/loud").await;
    // Both proxies wrote /loud after /quiet was answered: /quiet would be there by now.
    assert!(!lines(&log).iter().any(|l| l["path"] == "/quiet"), "a 200 is not an error");

    // Rotation: the file is moved away; lines go on into it until SIGUSR1, then into a
    // new file at the configured path.
    let rotated = dir.0.join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    app.set_status(500);
    assert_eq!(get_via(&http, edge.outbound, "echo", "/before-reopen", &[]).await.status, 500);
    line_for(&rotated, "outbound", "/before-reopen").await;
    signal(&edge, "USR1");
    signal(&echo, "USR1");
    assert_eq!(get_via(&http, edge.outbound, "echo", "/after-reopen", &[]).await.status, 500);
    app.set_status(200);
    line_for(&log, "outbound", "/after-reopen").await;
    line_for(&log, "inbound", "/after-reopen").await;
    assert!(!lines(&rotated).iter().any(|l| l["path"] == "/after-reopen"));

    // With tracing on, both sides name the request's trace, sampled or not (0% here).
    control.apply(&format!(
        "apiVersion: weft.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: mesh}}\nspec:\n  accessLog: {{path: \
             \"{}\"}}\n  tracing: {{endpoint: \"http://127.0.0.1:9\", protocol: http, samplingRate: 0}}\n",
        log.display()
    ));
    eventually(Duration::from_secs(20), "tracing on both proxies", || async move {
        let mut applied = true;
        for proxy in [edge_ref, echo_ref] {
            applied &= proxy.config().await["snapshot"]["tracing"]["samplingRate"].as_f64() == Some(0.0);
        }
        applied.then_some(())
    })
    .await;
    app.set_status(500);
    assert_eq!(get_via(&http, edge.outbound, "echo", "/traced", &[]).await.status, 500, "errorsOnly still applies");
    app.set_status(200);
    let (out, inbound) = (line_for(&log, "outbound", "/traced").await, line_for(&log, "inbound", "/traced").await);
    assert!(out["trace_id"].as_str().is_some_and(|id| id.len() == 32), "{out}");
    assert_eq!(out["trace_id"], inbound["trace_id"], "one trace, unsampled, on both sides");
    // With no traceparent on the wire: the trace is the request id's.
    let request_id = out["request_id"].as_str().unwrap_or_default().replace('-', "");
    assert_eq!(out["trace_id"].as_str(), Some(request_id.as_str()), "{out}");

    // A streamed (chunked) request body is counted as it passes.
    app.set_status(500);
    let body = "x".repeat(10_000);
    let (_, status, err) = support::curl(&[
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-x",
        &format!("http://{}", edge.outbound),
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &body,
        "http://echo/chunked",
    ]);
    app.set_status(200);
    assert_eq!(status, "500", "{err}");
    for direction in ["outbound", "inbound"] {
        let line = line_for(&log, direction, "/chunked").await;
        assert_eq!(line["bytes_received"], 10_000, "{line}");
    }

    // What a client sends is escaped: a refused Host with a quote stays one JSON string.
    let answer = support::raw_exchange(
        echo.inbound.unwrap(),
        b"GET /hostile HTTP/1.1\r\nHost: a\"b\r\nUser-Agent: x\\y\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(support::raw_status(&answer), 400, "{answer}");
    let hostile = line_for(&log, "inbound", "/hostile").await;
    assert_eq!((hostile["authority"].as_str(), hostile["user_agent"].as_str()), (Some("a\"b"), Some("x\\y")));
    assert_eq!(hostile["weft_error"], "bad-request");
}
