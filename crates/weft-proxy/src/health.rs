//! Health checks of the local application, reported to the control plane so that an
//! unhealthy instance stops receiving traffic mesh-wide.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::discovery::DiscoveryHandle;

/// How the application is checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HealthCheck {
    /// A TCP connection to the application's address succeeds.
    Tcp,
    /// `GET path` answers 2xx or 3xx.
    Http(String),
    /// Not checked: always reported healthy.
    None,
}

impl std::str::FromStr for HealthCheck {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "tcp" => Ok(HealthCheck::Tcp),
            "none" => Ok(HealthCheck::None),
            path if path.starts_with("http:/") => Ok(HealthCheck::Http(path["http:".len()..].to_string())),
            other => Err(format!("{other:?} is not a health check; use tcp, none, or http:/PATH (e.g. http:/healthz)")),
        }
    }
}

/// Checks `app` every `interval` and reports each change through `discovery`.
pub async fn run(check: HealthCheck, app: SocketAddr, interval: Duration, discovery: Arc<DiscoveryHandle>) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (healthy, detail) = probe(&check, app, interval.min(Duration::from_secs(5))).await;
        discovery.report_health(healthy, detail);
    }
}

async fn probe(check: &HealthCheck, app: SocketAddr, timeout: Duration) -> (bool, String) {
    let attempt = async {
        match check {
            HealthCheck::None => Ok("not checked".to_string()),
            HealthCheck::Tcp => {
                TcpStream::connect(app).await.map(|_| format!("tcp {app} accepts")).map_err(|e| e.to_string())
            }
            HealthCheck::Http(path) => {
                let stream = TcpStream::connect(app).await.map_err(|e| e.to_string())?;
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
                tokio::spawn(connection);
                let request = http::Request::get(path.as_str())
                    .header(http::header::HOST, app.to_string())
                    .header(http::header::USER_AGENT, "weft-health-check")
                    .body(Empty::<bytes::Bytes>::new())
                    .map_err(|e| e.to_string())?;
                let status = sender.send_request(request).await.map_err(|e| e.to_string())?.status();
                if status.is_success() || status.is_redirection() {
                    Ok(format!("GET {path}: {status}"))
                } else {
                    Err(format!("GET {path}: {status}"))
                }
            }
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(detail)) => (true, detail),
        Ok(Err(error)) => (false, error),
        Err(_) => (false, format!("no answer within {timeout:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_kinds_and_explains_mistakes() {
        assert_eq!("tcp".parse(), Ok(HealthCheck::Tcp));
        assert_eq!("http:/healthz".parse(), Ok(HealthCheck::Http("/healthz".into())));
        assert!("http".parse::<HealthCheck>().unwrap_err().contains("http:/PATH"));
    }
}
