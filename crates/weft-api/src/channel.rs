//! Dialling a control plane's gRPC port over TLS: the one way proxies (discovery,
//! signing) and control-plane replicas (asking each other) connect to it. The rustls
//! configuration decides what is verified (a pinned root, or a SPIFFE identity under a
//! trust bundle); this module only carries it under tonic.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use rustls::{pki_types::ServerName, ClientConfig};
use tokio::net::TcpStream;
use tonic::{codegen::Service, transport::Channel};

/// Dials one control plane with TLS `config`, for the gRPC services on its discovery
/// port.
pub async fn control_channel(address: &str, config: Arc<ClientConfig>) -> Result<Channel, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| format!("bad --control address {address}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    let connector = TlsConnector { address: address.to_string(), config };
    endpoint.connect_with_connector(connector).await.map_err(|e| format!("cannot connect to {address}: {}", chain(&e)))
}

/// An error with its causes, as one line: TLS refusals are deep in the chain.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

#[derive(Clone)]
struct TlsConnector {
    address: String,
    config: Arc<ClientConfig>,
}

impl Service<http::Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let (address, config) = (self.address.clone(), self.config.clone());
        Box::pin(async move {
            let socket = TcpStream::connect(&address).await?;
            socket.set_nodelay(true)?;
            // The verifiers check SPIFFE identities, not names; rustls still wants one.
            let host = address.rsplit_once(':').map_or(address.as_str(), |(host, _)| host);
            let name = ServerName::try_from(host.trim_matches(['[', ']']).to_string())
                .unwrap_or_else(|_| ServerName::try_from("weft-control").expect("a valid DNS name"));
            let stream = tokio_rustls::TlsConnector::from(config).connect(name, socket).await?;
            Ok(TokioIo::new(stream))
        })
    }
}
