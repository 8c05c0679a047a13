//! Distributed tracing end to end, with real trace receivers: `oteltap` (a real OTLP/HTTP
//! protobuf receiver) and a gRPC receiver built on the official OpenTelemetry service
//! definitions. A trace through three services arrives with the right parents, kinds and
//! attributes; W3C and B3 contexts are continued and written on; sampling follows the
//! rate (0, 1, a per-Service override, changed live) and forcing works only for callers
//! `forceFrom` names; a retried request shows one CLIENT span per try; a proxy-made
//! answer shows its reason; a receiver that is down costs requests nothing.

mod support;

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    common::v1::any_value,
};
use serde_json::Value;
use support::{client, eventually, get_via, Answer, Control, DemoApp, Proxy, TempDir, TestApp};

const SERVER: i64 = 2;
const CLIENT: i64 = 3;

/// A span as a receiver got it, whichever protocol brought it.
#[derive(Clone, Debug)]
struct Received {
    trace: String,
    id: String,
    parent: String,
    name: String,
    kind: i64,
    attributes: BTreeMap<String, String>,
    error: bool,
    /// The exporting proxy's `service.name` (the gRPC receiver sees resources).
    service: Option<String>,
}

impl Received {
    fn attribute(&self, key: &str) -> &str {
        self.attributes.get(key).map_or("", String::as_str)
    }
}

type Spans = Arc<Mutex<Vec<Received>>>;

/// Waits until `trace` has `count` spans, and returns them.
async fn trace_spans(spans: &Spans, trace: &str, count: usize) -> Vec<Received> {
    eventually(Duration::from_secs(20), &format!("{count} spans of trace {trace}"), || {
        let found: Vec<Received> = spans.lock().unwrap().iter().filter(|s| s.trace == trace).cloned().collect();
        async move { (found.len() >= count).then_some(found) }
    })
    .await
}

/// `oteltap`, an OTLP/HTTP receiver that prints every span it takes as a JSON line.
struct Oteltap {
    child: Child,
    port: u16,
    spans: Spans,
}

impl Oteltap {
    /// Starts it on a free port; `None` when it is not installed.
    async fn start() -> Option<Oteltap> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let mut child = Command::new("oteltap")
            .args(["--port", &port.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let stdout = child.stdout.take().expect("piped");
        let spans: Spans = Arc::default();
        let sink = spans.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(span) = serde_json::from_str::<Value>(&line) {
                    if span.get("spanId").is_some() {
                        sink.lock().unwrap().push(from_json(&span));
                    }
                }
            }
        });
        eventually(Duration::from_secs(20), "oteltap to listen", || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()
        })
        .await;
        Some(Oteltap { child, port, spans })
    }
}

impl Drop for Oteltap {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn from_json(span: &Value) -> Received {
    let attributes = span["attributes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|kv| {
            let value = &kv["value"];
            let text = value["stringValue"]
                .as_str()
                .map(str::to_string)
                .or_else(|| value["intValue"].as_str().map(str::to_string))
                .or_else(|| value["intValue"].as_i64().map(|i| i.to_string()))
                .unwrap_or_default();
            (kv["key"].as_str().unwrap_or_default().to_string(), text)
        })
        .collect();
    Received {
        trace: span["traceId"].as_str().unwrap_or_default().to_string(),
        id: span["spanId"].as_str().unwrap_or_default().to_string(),
        parent: span["parentSpanId"].as_str().unwrap_or_default().to_string(),
        name: span["name"].as_str().unwrap_or_default().to_string(),
        kind: span["kind"].as_i64().unwrap_or_default(),
        attributes,
        error: span["status"]["code"].as_i64() == Some(2),
        service: None,
    }
}

/// An OTLP/gRPC receiver on the official service definitions.
#[derive(Clone, Default)]
struct GrpcReceiver {
    spans: Spans,
}

#[tonic::async_trait]
impl TraceService for GrpcReceiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let mut received = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            let service = resource.resource.as_ref().and_then(|r| {
                r.attributes.iter().find(|kv| kv.key == "service.name").and_then(|kv| match &kv.value {
                    Some(v) => match &v.value {
                        Some(any_value::Value::StringValue(s)) => Some(s.clone()),
                        _ => None,
                    },
                    None => None,
                })
            });
            for span in resource.scope_spans.into_iter().flat_map(|s| s.spans) {
                let attributes = span
                    .attributes
                    .iter()
                    .map(|kv| {
                        let text = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                            Some(any_value::Value::StringValue(s)) => s.clone(),
                            Some(any_value::Value::IntValue(i)) => i.to_string(),
                            other => format!("{other:?}"),
                        };
                        (kv.key.clone(), text)
                    })
                    .collect();
                received.push(Received {
                    trace: hex(&span.trace_id),
                    id: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                    name: span.name.clone(),
                    kind: span.kind as i64,
                    attributes,
                    error: span.status.as_ref().is_some_and(|s| s.code == 2),
                    service: service.clone(),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl GrpcReceiver {
    async fn start() -> (GrpcReceiver, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let receiver = GrpcReceiver::default();
        let service = TraceServiceServer::new(receiver.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        (receiver, address)
    }
}

/// A `weft demo-app` that calls `calls` through its sidecar (whose ports file it reads).
async fn calling_app(dir: &TempDir, name: &str, calls: &[&str]) -> DemoApp {
    let sidecar_ports = dir.0.join(format!("{name}.ports.json"));
    let mut extra: Vec<&str> = calls.iter().flat_map(|call| ["--call", call]).collect();
    if !calls.is_empty() {
        extra.extend(["--outbound-from", sidecar_ports.to_str().unwrap()]);
    }
    DemoApp::start(dir, name, &extra).await
}

fn mesh_config(endpoint: &str, protocol: &str, rate: f64, force_from: &[&str]) -> String {
    let force: Vec<String> = force_from.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        "apiVersion: weft.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: mesh}}\nspec:\n  tracing:\n    endpoint: \
         {endpoint}\n    protocol: {protocol}\n    samplingRate: {rate}\n    forceFrom: [{}]\n",
        force.join(", ")
    )
}

/// Waits until `proxy` serves a view whose MeshConfig tracing rate is `rate`.
async fn tracing_applied(proxy: &Proxy, rate: f64) {
    eventually(Duration::from_secs(20), &format!("tracing at {rate} on the proxy"), || async move {
        let config = proxy.config().await;
        (config["snapshot"]["tracing"]["samplingRate"].as_f64() == Some(rate)).then_some(())
    })
    .await;
}

fn identity(account: &str) -> String {
    format!("spiffe://weft.local/ns/default/sa/{account}")
}

/// The headers the test app received, from its JSON answer.
fn app_headers(answer: &Answer) -> Value {
    let body: Value = serde_json::from_slice(&answer.body).expect("the test app answers JSON");
    body["headers"].clone()
}

/// The trace an unsampled request's id names: its hex digits, without dashes.
fn request_trace(headers: &Value) -> String {
    let id = headers["x-request-id"].as_str().unwrap_or_else(|| panic!("no x-request-id in {headers}"));
    id.replace('-', "")
}

/// The fields of a `traceparent`: trace, parent span, flags.
fn traceparent(headers: &Value) -> (String, String, String) {
    let text = headers["traceparent"].as_str().unwrap_or_else(|| panic!("no traceparent in {headers}"));
    let fields: Vec<&str> = text.split('-').collect();
    assert_eq!(fields.len(), 4, "{text}");
    (fields[1].to_string(), fields[2].to_string(), fields[3].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_through_three_services_arrives_over_otlp_http_with_its_parents_kinds_and_attributes() {
    let Some(receiver) = Oteltap::start().await else {
        support::skip("oteltap is not installed (pip install oteltap)");
        return;
    };
    let dir = TempDir::new("tracing-chain");
    let control = Control::start(&dir, "control").await;
    control.apply(&mesh_config(&format!("http://127.0.0.1:{}", receiver.port), "http", 1.0, &[]));
    // reviews has a route, so its CLIENT spans carry http.route.
    control.apply(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: reviews}\nspec:\n  parentRefs: \
         [{kind: Service, name: reviews}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /}}]\n    \
         backendRefs: [{name: reviews, port: 80}]\n",
    );
    let ratings_app = calling_app(&dir, "ratings", &[]).await;
    let _ratings = Proxy::meshed(&dir, &control, "ratings", Some(ratings_app.address)).await;
    let reviews_app = calling_app(&dir, "reviews", &["ratings"]).await;
    let _reviews = Proxy::meshed(&dir, &control, "reviews", Some(reviews_app.address)).await;
    let frontend_app = calling_app(&dir, "frontend", &["reviews"]).await;
    let _frontend = Proxy::meshed(&dir, &control, "frontend", Some(frontend_app.address)).await;
    let edge = Proxy::meshed(&dir, &control, "edge", None).await;
    tracing_applied(&edge, 1.0).await;

    let http = client();
    eventually(Duration::from_secs(20), "the chain to answer 200", || {
        let http = http.clone();
        let edge = edge.outbound;
        async move { (get_via(&http, edge, "frontend", "/", &[]).await.status == 200).then_some(()) }
    })
    .await;
    // The request followed: its caller (this test) names the trace and its own span.
    let (trace, caller_span) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let answer =
        get_via(&http, edge.outbound, "frontend", "/", &[("traceparent", &format!("00-{trace}-{caller_span}-01"))])
            .await;
    assert_eq!(answer.status, 200);
    let body: Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(body["called"][0]["called"][0]["status"], 200, "frontend → reviews → ratings: {body}");

    let spans = trace_spans(&receiver.spans, trace, 6).await;
    let root = spans.iter().find(|s| s.parent == caller_span).expect("the edge's span is the caller's child").clone();
    assert_eq!(spans.len(), 6, "edge → frontend → reviews → ratings is six spans: {spans:#?}");
    let by_id: BTreeMap<&str, &Received> = spans.iter().map(|s| (s.id.as_str(), s)).collect();
    // Walk down from the root: CLIENT and SERVER alternate, each the parent of the next.
    let mut chain = vec![&root];
    while let Some(child) = spans.iter().find(|s| s.parent == chain.last().unwrap().id) {
        chain.push(child);
    }
    let kinds: Vec<i64> = chain.iter().map(|s| s.kind).collect();
    assert_eq!(kinds, [CLIENT, SERVER, CLIENT, SERVER, CLIENT, SERVER], "{chain:#?}");
    let destinations: Vec<&str> = chain.iter().map(|s| s.attribute("weft.destination_service")).collect();
    assert_eq!(
        destinations,
        [
            "default/frontend",
            "default/frontend",
            "default/reviews",
            "default/reviews",
            "default/ratings",
            "default/ratings"
        ]
    );
    assert!(by_id.len() == 6, "span ids are unique");
    for (client, server) in [(chain[0], chain[1]), (chain[2], chain[3]), (chain[4], chain[5])] {
        // Both sides of a hop agree on who called whom, as mutual TLS proved it.
        assert_eq!(server.attribute("weft.source_identity"), client.attribute("weft.source_identity"), "{server:#?}");
        assert_eq!(client.attribute("weft.peer_identity"), server.attribute("weft.destination_identity"));
        assert_eq!(server.attribute("http.request.method"), "GET");
        assert_eq!(server.attribute("http.response.status_code"), "200");
        assert_eq!(client.attribute("http.response.status_code"), "200");
        assert_eq!(server.name, "GET");
        assert!(!client.error && !server.error);
        assert_eq!(client.attribute("weft.try"), "1");
        assert!(!client.attribute("weft.endpoint").is_empty());
    }
    assert_eq!(chain[0].attribute("weft.source_identity"), identity("edge"));
    assert_eq!(chain[1].attribute("weft.destination_identity"), identity("frontend"));
    assert_eq!(chain[3].attribute("weft.source_identity"), identity("frontend"));
    assert_eq!(chain[5].attribute("weft.source_identity"), identity("reviews"));
    // Only reviews has a route: its CLIENT span is named by the rule's path.
    assert_eq!(chain[2].name, "GET /");
    assert_eq!(chain[2].attribute("http.route"), "/");
    assert_eq!(chain[2].attribute("weft.route"), "HTTPRoute/default/reviews");
    assert_eq!(chain[0].name, "GET");
    assert_eq!(chain[0].attribute("server.address"), "frontend");
    assert_eq!(chain[1].attribute("network.protocol.version"), "1.1", "HTTP/1.1 callers are carried as HTTP/1.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contexts_sampling_forcing_retries_and_errors_over_otlp_grpc() {
    let (receiver, address) = GrpcReceiver::start().await;
    let spans = receiver.spans.clone();
    let dir = TempDir::new("tracing-grpc");
    let control = Control::start(&dir, "control").await;
    let endpoint = format!("http://{address}");
    control.apply(&mesh_config(&endpoint, "grpc", 0.0, &[&identity("edge")]));
    let app = TestApp::start("echo").await;
    let echo = Proxy::meshed(&dir, &control, "echo", Some(app.address)).await;
    let edge = Proxy::meshed(&dir, &control, "edge", None).await;
    let other = Proxy::meshed(&dir, &control, "other", None).await;
    tracing_applied(&edge, 0.0).await;
    let http = client();
    let ready = eventually(Duration::from_secs(20), "echo to answer", || {
        let http = http.clone();
        let edge = edge.outbound;
        async move { (get_via(&http, edge, "echo", "/", &[]).await.status == 200).then_some(()) }
    });
    ready.await;

    // Rate 0, no context: not sampled, and nothing but a request id travels on; the
    // trace is the request id's.
    let answer = get_via(&http, edge.outbound, "echo", "/none", &[]).await;
    let headers = app_headers(&answer);
    assert!(headers.get("traceparent").is_none(), "an unsampled request carries no traceparent: {headers}");
    assert_eq!(headers["x-request-id"].as_str().map(str::len), Some(36), "{headers}");
    let unsampled_trace = request_trace(&headers);
    let kept = get_via(&http, edge.outbound, "echo", "/", &[("x-request-id", "mine-42")]).await;
    assert_eq!(app_headers(&kept)["x-request-id"], "mine-42", "a request id already there is kept");

    // W3C in, sampled by the caller: continued at rate 0, the app's parent is the SERVER span.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let answer =
        get_via(&http, edge.outbound, "echo", "/w3c", &[("traceparent", &format!("00-{trace}-{caller_span}-01"))])
            .await;
    let (app_trace, app_parent, flags) = traceparent(&app_headers(&answer));
    assert_eq!((app_trace.as_str(), flags.as_str()), (trace, "01"));
    let w3c = trace_spans(&spans, trace, 2).await;
    let client_span = w3c.iter().find(|s| s.kind == CLIENT).expect("a CLIENT span");
    let server_span = w3c.iter().find(|s| s.kind == SERVER).expect("a SERVER span");
    assert_eq!(client_span.parent, caller_span, "the edge's span is the caller's child");
    assert_eq!(server_span.parent, client_span.id);
    assert_eq!(app_parent, server_span.id, "the application's parent is echo's SERVER span");
    assert_eq!(client_span.service.as_deref(), Some("edge"));
    assert_eq!(server_span.service.as_deref(), Some("echo"));
    assert_eq!(server_span.attribute("url.path"), "/w3c");

    // B3 single in: B3 single out (and W3C), in the same trace.
    let b3_trace = "a3ce929d0e0e47364bf92f3577b34da6";
    let answer = get_via(&http, edge.outbound, "echo", "/b3", &[("b3", &format!("{b3_trace}-{caller_span}-1"))]).await;
    let headers = app_headers(&answer);
    let b3 = headers["b3"].as_str().unwrap_or_else(|| panic!("B3 came in, so B3 goes out: {headers}"));
    let fields: Vec<&str> = b3.split('-').collect();
    assert_eq!((fields[0], fields[2]), (b3_trace, "1"), "{b3}");
    assert_eq!(traceparent(&headers).0, b3_trace);
    let b3_spans = trace_spans(&spans, b3_trace, 2).await;
    assert!(b3_spans.iter().any(|s| s.kind == SERVER && s.id == fields[1]), "the app's B3 parent is the SERVER span");
    // B3 multi in: multi out; a 64-bit trace id is carried as 128 bits.
    let answer = get_via(
        &http,
        edge.outbound,
        "echo",
        "/b3multi",
        &[("x-b3-traceid", "463ac35c9f6413ad"), ("x-b3-spanid", caller_span), ("x-b3-sampled", "1")],
    )
    .await;
    let headers = app_headers(&answer);
    assert_eq!(headers["x-b3-traceid"], "0000000000000000463ac35c9f6413ad", "{headers}");
    assert_eq!(headers["x-b3-sampled"], "1");
    trace_spans(&spans, "0000000000000000463ac35c9f6413ad", 2).await;

    // Forced by a caller forceFrom names: sampled at rate 0.
    let answer = get_via(&http, edge.outbound, "echo", "/forced", &[("x-weft-trace", "force")]).await;
    let (forced_trace, _, flags) = traceparent(&app_headers(&answer));
    assert_eq!(flags, "01", "edge may force");
    trace_spans(&spans, &forced_trace, 2).await;
    // Forced by another: refused, not sampled anywhere along the way.
    let answer = get_via(&http, other.outbound, "echo", "/forced", &[("x-weft-trace", "force")]).await;
    let headers = app_headers(&answer);
    assert!(headers.get("traceparent").is_none(), "other is not in forceFrom: {headers}");
    let refused_trace = request_trace(&headers);

    // A retried request: one CLIENT span per try, each with its SERVER span, failing.
    control.apply(
        "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: echo}\nspec:\n  targetRef: {kind: \
         Service, name: echo}\n  retries: {attempts: 1, retryOn: [5xx]}\n",
    );
    eventually(Duration::from_secs(20), "the retry policy on the edge", || async {
        let config = edge.config().await;
        let services = config["snapshot"]["services"].as_array().cloned().unwrap_or_default();
        services.iter().any(|s| s["name"] == "echo" && s["policy"]["retries"]["retryOn"][0] == "5xx").then_some(())
    })
    .await;
    app.set_status(503);
    let hits = app.hits();
    let answer = get_via(&http, edge.outbound, "echo", "/retried", &[("x-weft-trace", "force")]).await;
    assert_eq!(answer.status, 503);
    assert_eq!(app.hits() - hits, 2, "one retry");
    let retried = eventually(Duration::from_secs(20), "the retried request's spans", || {
        let found: Vec<Received> =
            spans.lock().unwrap().iter().filter(|s| s.attribute("url.path") == "/retried").cloned().collect();
        async move { (found.len() >= 4).then_some(found) }
    })
    .await;
    let tries: Vec<&Received> = retried.iter().filter(|s| s.kind == CLIENT).collect();
    assert_eq!(tries.len(), 2, "{retried:#?}");
    let mut numbers: Vec<&str> = tries.iter().map(|s| s.attribute("weft.try")).collect();
    numbers.sort();
    assert_eq!(numbers, ["1", "2"]);
    assert!(tries.iter().any(|s| s.attribute("http.request.resend_count") == "1"));
    for try_span in &tries {
        assert!(try_span.error, "a 503 try is an error");
        assert!(
            retried.iter().any(|s| s.kind == SERVER && s.parent == try_span.id && s.error),
            "each try has its SERVER span"
        );
    }
    app.set_status(200);

    // A proxy-made answer: its reason is on the span.
    control.apply(
        "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: nowhere}\nspec: {selector: {app: nowhere}, \
         ports: [{port: 80}]}\n",
    );
    let answer = eventually(Duration::from_secs(20), "nowhere to answer 503", || {
        let http = http.clone();
        let edge = edge.outbound;
        async move {
            let answer = get_via(&http, edge, "nowhere", "/made", &[("x-weft-trace", "force")]).await;
            (answer.status == 503).then_some(answer)
        }
    })
    .await;
    let reason = answer.headers.get("weft-error").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let made = eventually(Duration::from_secs(20), "the proxy-made answer's span", || {
        let found = spans.lock().unwrap().iter().find(|s| s.attribute("url.path") == "/made").cloned();
        async move { found }
    })
    .await;
    assert_eq!(made.kind, CLIENT);
    assert!(made.error);
    // The header is `reason: detail`; the span carries the reason.
    assert_eq!(Some(made.attribute("weft.error")), reason.split(':').next(), "{made:#?}");
    assert!(!reason.is_empty());
    assert_eq!(made.attribute("http.response.status_code"), "503");

    // Nothing of the unsampled traces ever arrived: every span the proxies exported is
    // one the receiver holds, and none is of those traces.
    let (edge, echo, other, held) = (&edge, &echo, &other, &spans);
    eventually(Duration::from_secs(20), "the proxies' exported spans to match the receiver's", || async move {
        let mut exported = 0.0;
        for proxy in [edge, echo, other] {
            exported += proxy.metric_sum("weft_trace_spans_exported_total", &[]).await;
        }
        (exported as usize == held.lock().unwrap().len()).then_some(())
    })
    .await;
    let held = spans.lock().unwrap().clone();
    assert!(!held.iter().any(|s| s.trace == unsampled_trace || s.trace == refused_trace), "{held:#?}");

    // Live: rate 1 mesh-wide samples a request without context; a TrafficPolicy's rate 0
    // for echo then stops it again.
    control.apply(&mesh_config(&endpoint, "grpc", 1.0, &[]));
    tracing_applied(edge, 1.0).await;
    let answer = get_via(&http, edge.outbound, "echo", "/live", &[]).await;
    let (live_trace, _, flags) = traceparent(&app_headers(&answer));
    assert_eq!(flags, "01");
    trace_spans(&spans, &live_trace, 2).await;
    control.apply(
        "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: echo}\nspec:\n  targetRef: {kind: \
         Service, name: echo}\n  tracing: {samplingRate: 0}\n",
    );
    // Both ends decide: the edge for its outbound request and echo's proxy for the
    // inbound one it would otherwise start at the mesh-wide rate; wait for both.
    for proxy in [edge, echo] {
        eventually(Duration::from_secs(20), "echo's own rate on the edge and on echo's proxy", || async move {
            let config = proxy.config().await;
            let services = config["snapshot"]["services"].as_array().cloned().unwrap_or_default();
            services.iter().any(|s| s["name"] == "echo" && s["policy"]["traceSampling"] == 0.0).then_some(())
        })
        .await;
    }
    let answer = get_via(&http, edge.outbound, "echo", "/override", &[]).await;
    assert!(app_headers(&answer).get("traceparent").is_none(), "echo's TrafficPolicy samples none");

    // A receiver that is down: requests are answered as before, and spans are counted
    // as dropped.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let echo_sampled = "---\napiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: echo}\nspec:\n  \
                        targetRef: {kind: Service, name: echo}\n  tracing: {samplingRate: 1}\n";
    control.apply(&(mesh_config(&format!("http://{closed}"), "grpc", 1.0, &[]) + echo_sampled));
    eventually(Duration::from_secs(20), "the closed endpoint on the edge", || async {
        let config = edge.config().await;
        let services = config["snapshot"]["services"].as_array().cloned().unwrap_or_default();
        let sampled = services.iter().any(|s| s["name"] == "echo" && s["policy"]["traceSampling"] == 1.0);
        (sampled && config["snapshot"]["tracing"]["endpoint"] == format!("http://{closed}")).then_some(())
    })
    .await;
    for _ in 0..20 {
        assert_eq!(get_via(&http, edge.outbound, "echo", "/down", &[]).await.status, 200);
    }
    eventually(Duration::from_secs(30), "spans counted as dropped", || async {
        let dropped = edge.metric_sum("weft_trace_spans_dropped_total", &["reason=\"export_failed\""]).await;
        (dropped >= 20.0).then_some(())
    })
    .await;
}
