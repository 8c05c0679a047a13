//! The CLI's client of the control plane's HTTPS API: where the server is, which
//! operator token to present, and how the server is verified — with no file to copy.
//!
//! Flags and environment win (`--server`/`WEFT_SERVER`, `WEFT_TOKEN`,
//! `--token-file`/`WEFT_TOKEN_FILE`, `--ca-file`/`WEFT_CA_FILE`), then the context
//! (`--context`/`WEFT_CONTEXT`, else the current one), then the defaults: the local
//! control plane (`https://127.0.0.1:15080`) with the first admin token under the default
//! data directory. The server is verified by the root hash inside the operator token: its
//! certificate must chain to that root and prove the control plane's SPIFFE identity; or,
//! for an API certificate from the operator's own PKI, against `--ca-file` and the host
//! name, as browsers do.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::{pki_types::ServerName, ClientConfig};
use serde_json::Value;
use weft_identity::token::{Token, TokenKind};

use crate::context::Contexts;

/// The default server: the local control plane.
pub const DEFAULT_SERVER: &str = "https://127.0.0.1:15080";
/// How long a call may take to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the control plane's API is, and how to authenticate to it.
#[derive(Args, Clone, Debug, Default)]
pub struct ServerArgs {
    /// The control plane's API (default: the context's, else https://127.0.0.1:15080).
    #[arg(long, env = "WEFT_SERVER", value_name = "URL")]
    pub server: Option<String>,
    /// The file holding the operator token (default: the context's, else the first
    /// admin token under the default data directory). WEFT_TOKEN gives the token itself.
    #[arg(long = "token-file", visible_alias = "admin-token-file", env = "WEFT_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// CA certificates (PEM) to verify an API certificate from your own PKI by, instead
    /// of the root hash the operator token carries.
    #[arg(long, env = "WEFT_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// The context to use (default: the current one; see weft context).
    #[arg(long, env = "WEFT_CONTEXT", value_name = "NAME")]
    pub context: Option<String>,
}

/// A JSON client of `/api/v1`.
pub struct ApiClient {
    base: String,
    /// `host:port` to connect to, and the name to verify.
    authority: String,
    host: String,
    tls: Option<Arc<ClientConfig>>,
    token: Option<String>,
}

/// What the arguments, the contexts file and the defaults say together.
struct Resolved {
    server: String,
    token: Option<String>,
    /// Where the token came from, if a file.
    token_path: Option<PathBuf>,
    ca_file: Option<PathBuf>,
}

impl ServerArgs {
    fn resolve(&self) -> anyhow::Result<Resolved> {
        let contexts = Contexts::load(&crate::context::path())?;
        let context = match &self.context {
            Some(name) => Some(
                contexts
                    .contexts
                    .iter()
                    .find(|c| &c.name == name)
                    .with_context(|| format!("no context named {name:?}; see weft context list"))?,
            ),
            None => contexts.current(),
        };
        let server = self
            .server
            .clone()
            .or_else(|| context.map(|c| c.server.clone()))
            .unwrap_or_else(|| DEFAULT_SERVER.to_string());
        let token_file = self.token_file.clone().or_else(|| context.and_then(|c| c.token_file.clone()));
        let ca_file = self.ca_file.clone().or_else(|| context.and_then(|c| c.ca_file.clone()));
        let (token, token_path) = read_token(token_file)?;
        Ok(Resolved { server, token, token_path, ca_file })
    }
}

/// The token: `WEFT_TOKEN`, else the file named, else the default data directory's
/// first admin token (if it is there). Also where it came from.
fn read_token(file: Option<PathBuf>) -> anyhow::Result<(Option<String>, Option<PathBuf>)> {
    if let Some(token) = std::env::var("WEFT_TOKEN").ok().filter(|t| !t.trim().is_empty()) {
        return Ok((Some(token.trim().to_string()), None));
    }
    let (path, explicit) = match file {
        Some(path) => (path, true),
        None => (weft_control::default_data_dir().join(weft_control::operator_tokens::ADMIN_TOKEN_FILE), false),
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok((Some(text.trim().to_string()), Some(path))),
        Err(_) if !explicit => Ok((None, None)),
        Err(error) => bail!("cannot read the operator token from {}: {error}", path.display()),
    }
}

impl ApiClient {
    pub fn new(server: &ServerArgs) -> anyhow::Result<Self> {
        let Resolved { server: base, token, token_path, ca_file } = server.resolve()?;
        let base = base.trim_end_matches('/').to_string();
        let (secure, rest) = match (base.strip_prefix("https://"), base.strip_prefix("http://")) {
            (Some(rest), _) => (true, rest),
            (None, Some(rest)) => (false, rest),
            _ => bail!("--server must be a URL such as https://127.0.0.1:15080, got {base:?}"),
        };
        let authority = rest.split('/').next().unwrap_or(rest).to_string();
        let host = match authority.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => host.trim_matches(['[', ']']).to_string(),
            _ => bail!("--server must name a port, as in https://{authority}:15080"),
        };
        let tls = if secure {
            Some(Arc::new(tls_config(ca_file.as_ref(), token.as_deref(), token_path.as_ref())?))
        } else {
            let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
            if !loopback && token.is_some() {
                bail!(
                    "{base} is plain HTTP beyond loopback: the operator token would cross the network in the clear; \
                     use https://"
                );
            }
            None
        };
        Ok(ApiClient { base, authority, host, tls, token })
    }

    fn request(&self, method: http::Method, path: &str) -> http::request::Builder {
        let mut request = http::Request::builder().method(method).uri(path).header(http::header::HOST, &self.authority);
        if let Some(token) = &self.token {
            request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        request
    }

    /// Opens a streaming answer (`GET path`): its body, once the server accepted; a
    /// refusal becomes an error as in [`ApiClient::call`].
    pub async fn stream(&self, path: &str) -> anyhow::Result<hyper::body::Incoming> {
        let request = self.request(http::Method::GET, path).body(Full::new(Bytes::new()))?;
        let response = self.send(request).await?;
        let status = response.status();
        if status.is_success() {
            return Ok(response.into_body());
        }
        let body = response.into_body().collect().await.context("reading the control plane's answer")?.to_bytes();
        bail!("{}", refusal(status, &body))
    }

    /// Sends one request; a refusal becomes an error carrying the server's message and
    /// details, one per line.
    pub async fn call(&self, method: http::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let mut request = self.request(method, path);
        let bytes = match body {
            Some(body) => {
                request = request.header(http::header::CONTENT_TYPE, "application/json");
                Bytes::from(body.to_string())
            }
            None => Bytes::new(),
        };
        let request = request.body(Full::new(bytes)).with_context(|| format!("bad path {path}"))?;
        let response = self.send(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await.context("reading the control plane's answer")?.to_bytes();
        if !status.is_success() {
            bail!("{}", refusal(status, &body));
        }
        serde_json::from_slice(&body)
            .with_context(|| format!("the control plane answered {status} with a body that is not JSON"))
    }

    async fn send(&self, request: http::Request<Full<Bytes>>) -> anyhow::Result<http::Response<hyper::body::Incoming>> {
        let unreachable = |error: &dyn std::fmt::Display| {
            anyhow::anyhow!(
                "cannot reach the control plane at {}: {error}; start one with `weft control`, or point --server (or \
                 weft context) at it",
                self.base
            )
        };
        let socket = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&self.authority))
            .await
            .map_err(|_| unreachable(&format!("no answer within {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| unreachable(&e))?;
        match &self.tls {
            None => exchange(TokioIo::new(socket), request).await,
            Some(config) => {
                let name = ServerName::try_from(self.host.clone()).context("the server's host name is invalid")?;
                let stream = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, socket)
                    .await
                    .map_err(|error| self.tls_refusal(&error))?;
                exchange(TokioIo::new(stream), request).await
            }
        }
    }

    fn tls_refusal(&self, error: &std::io::Error) -> anyhow::Error {
        let text = error.to_string();
        if text.contains(weft_identity::tls::WRONG_ROOT) {
            return anyhow::anyhow!(
                "the control plane at {} does not prove the root your operator token names: it belongs to another \
                 mesh (check --server or the context, or use a token of that mesh), or it serves an operator's own \
                 certificate (verify it with --ca-file)",
                self.base
            );
        }
        anyhow::anyhow!("cannot verify the control plane at {}: {text}", self.base)
    }
}

/// The server's refusal: its message and details, one per line.
fn refusal(status: http::StatusCode, body: &[u8]) -> String {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return format!("the control plane answered {status} with a body that is not JSON");
    };
    let mut message = value["error"].as_str().unwrap_or("request failed").to_string();
    for detail in value["details"].as_array().into_iter().flatten() {
        message.push_str(&format!("\n  {}", detail.as_str().unwrap_or_default()));
    }
    message
}

async fn exchange<I>(
    io: I,
    request: http::Request<Full<Bytes>>,
) -> anyhow::Result<http::Response<hyper::body::Incoming>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(io).await.context("the API handshake failed")?;
    tokio::spawn(connection);
    sender.send_request(request).await.context("the control plane closed the connection")
}

/// How an HTTPS control plane is verified: by `--ca-file` (and its host name), else by
/// the root hash the operator token carries.
fn tls_config(
    ca_file: Option<&PathBuf>,
    token: Option<&str>,
    token_path: Option<&PathBuf>,
) -> anyhow::Result<ClientConfig> {
    let alpn: &[&[u8]] = &[b"http/1.1"];
    if let Some(ca_file) = ca_file {
        let pem = std::fs::read(ca_file).with_context(|| format!("cannot read --ca-file {}", ca_file.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for certificate in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
            let certificate: rustls::pki_types::CertificateDer =
                certificate.with_context(|| format!("--ca-file {} is not PEM certificates", ca_file.display()))?;
            roots
                .add(certificate)
                .with_context(|| format!("--ca-file {}: an unusable certificate", ca_file.display()))?;
        }
        let mut config = ClientConfig::builder_with_provider(weft_identity::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        return Ok(config);
    }
    let Some(token) = token else {
        bail!(
            "no operator token: give one with --token-file (or WEFT_TOKEN_FILE, WEFT_TOKEN, or weft context set); the \
             first admin token is in <data-dir>/admin-token on the control plane's host"
        );
    };
    let root = match Token::parse(token) {
        Some(token) if token.kind == TokenKind::Operator => token.root_hash.to_string(),
        Some(_) => bail!(
            "this is a join token, which proxies join with; the CLI takes an operator token (weft token create --role)"
        ),
        // An admin token of an earlier release carries no root hash: the control plane
        // writes its root's hash beside it.
        None => legacy_root_hash(token_path)?,
    };
    let (config, _) = weft_identity::tls::pinned_control_plane_config(&root, alpn)?;
    Ok(config)
}

fn legacy_root_hash(token_path: Option<&PathBuf>) -> anyhow::Result<String> {
    let beside = token_path
        .and_then(|path| path.parent())
        .map(|dir| dir.join(weft_control::operator_tokens::ROOT_HASH_FILE))
        .and_then(|path| std::fs::read_to_string(path).ok());
    match beside {
        Some(hash) => Ok(hash.trim().to_string()),
        None => bail!(
            "this token carries no root hash to verify the control plane by (an admin token of an earlier release): \
             make an operator token with weft token create --role admin on the control plane's host, or give \
             --ca-file"
        ),
    }
}
