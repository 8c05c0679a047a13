//! `weft demo-app`: a small real HTTP/1.1 + HTTP/2 server for examples, demos and
//! benchmarks, with configurable latency and failure rate.
//!
//! It answers every request with a JSON line naming itself, so a user watching traffic
//! through the mesh sees which instance served it.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use rand::Rng;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Request headers the demo app passes on to the services it calls: the canary header
/// the demo routes by, and the trace context (W3C and both B3 forms) without which no
/// trace spans more than one hop, in any mesh.
const PROPAGATED: [&str; 10] = [
    "x-canary",
    "x-request-id",
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

/// What the demo app does for each request.
#[derive(Clone, Debug)]
pub struct DemoApp {
    pub name: String,
    pub latency: Duration,
    /// Share of requests answered 500, 0.0-1.0.
    pub error_rate: f64,
    /// Services called (through the mesh) for every request; a failed call fails the
    /// request with 502, as a real dependency would.
    pub calls: Vec<String>,
    /// Where calls go: the sidecar's outbound listener (`WEFT_OUTBOUND`, set by
    /// `weft proxy -- APP`).
    pub outbound: Option<SocketAddr>,
    /// Or the sidecar's `--ports-file`, read at the first call: an app started before its
    /// sidecar (so that each binds port 0 itself and no port is chosen for another).
    pub outbound_file: Option<std::path::PathBuf>,
    /// Where to write the bound address as JSON (`{"listen": "ADDR"}`).
    pub ports_file: Option<std::path::PathBuf>,
}

impl DemoApp {
    /// Serves on `listen` until the process ends.
    pub async fn serve(self, listen: SocketAddr) -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}; choose another --listen address"))?;
        let bound = listener.local_addr()?;
        tracing::info!(name = %self.name, address = %bound, "demo app listening");
        if !self.calls.is_empty() && self.outbound.is_none() && self.outbound_file.is_none() {
            anyhow::bail!(
                "--call needs a sidecar: run under `weft proxy ... --` (which sets WEFT_OUTBOUND) or give --outbound"
            );
        }
        if let Some(path) = &self.ports_file {
            let text = serde_json::json!({ "listen": bound.to_string() }).to_string();
            std::fs::write(path, text)
                .map_err(|e| anyhow::anyhow!("cannot write --ports-file {}: {e}", path.display()))?;
        }
        let client = Client::builder(TokioExecutor::new()).build_http();
        let app = Arc::new((self, client));
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let app = app.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let app = app.clone();
                    async move { Ok::<_, Infallible>(app.0.answer(&app.1, request).await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
            });
        }
    }

    async fn answer(&self, client: &HttpClient, request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        let failed = self.error_rate > 0.0 && rand::rng().random_bool(self.error_rate.clamp(0.0, 1.0));
        let mut status = if failed { StatusCode::INTERNAL_SERVER_ERROR } else { StatusCode::OK };
        let mut called = Vec::new();
        // Passed on to every call, as a real service passes request context on (so the
        // demo's canary header reaches the routing decision further down the chain).
        let propagated: Vec<(hyper::header::HeaderName, hyper::header::HeaderValue)> = request
            .headers()
            .iter()
            .filter(|(name, _)| PROPAGATED.contains(&name.as_str()))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        if !failed {
            for service in &self.calls {
                let answer = self.call(client, service, &propagated).await;
                if answer.get("status").and_then(serde_json::Value::as_u64) != Some(200) {
                    status = StatusCode::BAD_GATEWAY;
                }
                called.push(answer);
            }
        }
        let body = serde_json::json!({
            "app": self.name,
            "status": status.as_u16(),
            "path": request.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"),
            "called": called,
        });
        let body = format!("{body}\n");
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
        if let Ok(name) = hyper::header::HeaderValue::from_str(&self.name) {
            response.headers_mut().insert("x-app", name);
        }
        response
    }

    /// The sidecar's outbound listener: given, or read from its ports file once there.
    fn outbound(&self) -> Option<SocketAddr> {
        static FROM_FILE: std::sync::OnceLock<SocketAddr> = std::sync::OnceLock::new();
        if let Some(outbound) = self.outbound {
            return Some(outbound);
        }
        if let Some(found) = FROM_FILE.get() {
            return Some(*found);
        }
        let text = std::fs::read_to_string(self.outbound_file.as_ref()?).ok()?;
        let ports: serde_json::Value = serde_json::from_str(&text).ok()?;
        let outbound = ports["outbound"].as_str()?.parse().ok()?;
        Some(*FROM_FILE.get_or_init(|| outbound))
    }

    /// Calls `service` through the sidecar; returns its JSON answer, or a JSON line
    /// describing the failure.
    async fn call(
        &self,
        client: &HttpClient,
        service: &str,
        propagated: &[(hyper::header::HeaderName, hyper::header::HeaderValue)],
    ) -> serde_json::Value {
        let Some(outbound) = self.outbound() else {
            return serde_json::json!({"service": service, "status": 0, "error": "the sidecar is not listening yet"});
        };
        let mut request = Request::get(format!("http://{outbound}/"))
            .header(hyper::header::HOST, service)
            .body(Full::new(Bytes::new()))
            .expect("a valid request");
        request.headers_mut().extend(propagated.iter().cloned());
        match client.request(request).await {
            Ok(response) => {
                let code = response.status().as_u16();
                let error = response.headers().get("weft-error").and_then(|v| v.to_str().ok()).map(str::to_string);
                let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                let mut answer: serde_json::Value =
                    serde_json::from_slice(&body).unwrap_or_else(|_| serde_json::json!({ "service": service }));
                answer["status"] = code.into();
                if let Some(error) = error {
                    answer["weftError"] = error.into();
                }
                answer
            }
            Err(error) => serde_json::json!({"service": service, "status": 0, "error": error.to_string()}),
        }
    }
}
