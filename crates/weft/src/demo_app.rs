//! `weft demo-app`: a small real HTTP/1.1 + HTTP/2 server for examples, demos and
//! benchmarks, with configurable latency and failure rate.
//!
//! It answers every request with a JSON line naming itself, so a user watching traffic
//! through the mesh sees which instance served it.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use rand::Rng;

/// What the demo app does for each request.
#[derive(Clone, Debug)]
pub struct DemoApp {
    pub name: String,
    pub latency: Duration,
    /// Share of requests answered 500, 0.0-1.0.
    pub error_rate: f64,
}

impl DemoApp {
    /// Serves on `listen` until the process ends.
    pub async fn serve(self, listen: SocketAddr) -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}; choose another --listen address"))?;
        tracing::info!(name = %self.name, address = %listener.local_addr()?, "demo app listening");
        let app = Arc::new(self);
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
                    async move { Ok::<_, Infallible>(app.answer(request).await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
            });
        }
    }

    async fn answer(&self, request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        let failed = self.error_rate > 0.0 && rand::rng().random_bool(self.error_rate.clamp(0.0, 1.0));
        let status = if failed { StatusCode::INTERNAL_SERVER_ERROR } else { StatusCode::OK };
        let body = format!(
            "{{\"app\":{:?},\"status\":{},\"path\":{:?}}}\n",
            self.name,
            status.as_u16(),
            request.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/")
        );
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
        if let Ok(name) = hyper::header::HeaderValue::from_str(&self.name) {
            response.headers_mut().insert("x-app", name);
        }
        response
    }
}
