//! A configuration a proxy cannot use is refused (NACK) on the discovery stream: nothing
//! changes on that proxy, and the operator sees the refusal. Each half is tested against
//! a real process with a scripted peer on the other end: a real proxy under a scripted
//! control plane, and a real control plane with a scripted proxy.

mod support;

use std::{
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use weft_api::discovery::{
    control_message, discovery_client::DiscoveryClient, discovery_server, identity_server, proxy_message, Config,
    ControlMessage, Hello, Nack, ProxyMessage, SignRequest, SignResponse,
};
use weft_control::{ca::CaState, control_tls};
use weft_identity::{authority::pem_of, Authority, SpiffeId, TrustDomain};

use support::{client, eventually, get_via, mesh_yaml, Control, Proxy, TempDir, TestApp};

/// A control plane that sends the configurations the test gives it and reports what the
/// proxy answers.
struct ScriptedControl {
    configs: std::sync::Mutex<Option<mpsc::Receiver<Config>>>,
    answers: mpsc::Sender<proxy_message::Message>,
}

type ControlStream = Pin<Box<dyn Stream<Item = Result<ControlMessage, Status>> + Send>>;

#[tonic::async_trait]
impl discovery_server::Discovery for ScriptedControl {
    type StreamStream = ControlStream;

    async fn stream(&self, request: Request<Streaming<ProxyMessage>>) -> Result<Response<ControlStream>, Status> {
        let mut configs = self.configs.lock().unwrap().take().ok_or_else(|| Status::unavailable("one stream only"))?;
        let mut inbound = request.into_inner();
        let answers = self.answers.clone();
        tokio::spawn(async move {
            while let Some(Ok(ProxyMessage { message: Some(message) })) = inbound.next().await {
                let _ = answers.send(message).await;
            }
        });
        let (sender, receiver) = mpsc::channel(4);
        tokio::spawn(async move {
            while let Some(config) = configs.recv().await {
                let message = ControlMessage { message: Some(control_message::Message::Config(config)) };
                if sender.send(Ok(message)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}

/// A CA that signs whatever it is asked, as `spiffe://weft.local/ns/default/sa/proxy`:
/// the scripted control plane's half of a proxy joining.
struct ScriptedSigner {
    ca: Arc<CaState>,
}

#[tonic::async_trait]
impl identity_server::Identity for ScriptedSigner {
    async fn sign(&self, request: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let authority = &self.ca.authority;
        let id = SpiffeId::workload(authority.trust_domain(), "default", "proxy").unwrap();
        let signed = authority
            .sign(&request.into_inner().csr, &id, Duration::from_secs(3600), SystemTime::now())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let trust_bundle = pem_of(std::slice::from_ref(authority.root()));
        Ok(Response::new(SignResponse { certificate_chain: signed.chain_pem, trust_bundle }))
    }
}

fn config(version: &str, resources: String) -> Config {
    Config { version: version.into(), nonce: version.into(), resources, lease_seconds: 15, ..Default::default() }
}

/// The next ACK or NACK, skipping Hello, health and subscriptions.
async fn next_verdict(answers: &mut mpsc::Receiver<proxy_message::Message>) -> proxy_message::Message {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), answers.recv())
            .await
            .expect("the proxy answers within 10s")
            .expect("the stream stays open");
        if matches!(message, proxy_message::Message::Ack(_) | proxy_message::Message::Nack(_)) {
            return message;
        }
    }
}

#[tokio::test]
async fn a_proxy_refuses_a_view_it_cannot_use_and_keeps_serving_the_last_good_one() {
    let dir = TempDir::new("nack-proxy");
    let app = TestApp::start("details").await;
    let (configs, configs_rx) = mpsc::channel(4);
    let (answers_tx, mut answers) = mpsc::channel(16);
    let control = ScriptedControl { configs: std::sync::Mutex::new(Some(configs_rx)), answers: answers_tx };
    // It speaks TLS and signs certificates as a real one does, with a CA of its own.
    let domain = TrustDomain::new("weft.local").unwrap();
    let ca = Arc::new(CaState::from_authority(Authority::generate(&domain, SystemTime::now()).unwrap()));
    let issued = control_tls::issue_control_certificate(&ca, Duration::from_secs(3600)).unwrap();
    let credentials = weft_identity::tls::Credentials::new(issued);
    let tls = control_tls::server_config(&credentials).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(discovery_server::DiscoveryServer::new(control))
            .add_service(identity_server::IdentityServer::new(ScriptedSigner { ca: ca.clone() }))
            .serve_with_incoming(control_tls::incoming(listener, tls)),
    );
    let token = dir.write("proxy.join-token", &format!("wj1.scripted.secret.{}", ca.authority.root_hash()));

    let good = mesh_yaml(&[("details", "app: details")], &[("details-1", "app: details", app.address)], "");
    configs.send(config("v1", good)).await.unwrap();
    let proxy = Proxy::start_with_token(&dir, "proxy", &address.to_string(), &token, &[]).await;
    assert!(matches!(next_verdict(&mut answers).await, proxy_message::Message::Ack(ack) if ack.version == "v1"));
    let http = client();
    assert_eq!(get_via(&http, proxy.outbound, "details", "/", &[]).await.app(), "details");

    // A view with a document this proxy cannot read: refused with the reason, and the
    // proxy serves exactly as before.
    let bad = "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: details}\nspec: {ports: [{port: 0}]}\n";
    configs.send(config("v2", bad.to_string())).await.unwrap();
    match next_verdict(&mut answers).await {
        proxy_message::Message::Nack(nack) => {
            assert_eq!(nack.version, "v2");
            assert!(nack.error.contains("spec.ports[0].port"), "{}", nack.error);
        }
        other => panic!("expected a NACK, got {other:?}"),
    }
    for _ in 0..10 {
        assert_eq!(get_via(&http, proxy.outbound, "details", "/", &[]).await.app(), "details");
    }
    let shown = proxy.config().await;
    assert_eq!(shown["version"], "v1", "{shown}");
}

#[tokio::test]
async fn the_operator_sees_which_proxy_refused_which_version() {
    let dir = TempDir::new("nack-control");
    let control = Control::start(&dir, "control").await;
    // It joins as a real proxy does, with a join token, and streams over mutual TLS.
    let channel = control.channel_as(&dir, "scripted").await;
    let mut discovery = DiscoveryClient::new(channel);
    let (outbound, outbound_rx) = mpsc::channel(4);
    let hello = Hello { proxy_id: "scripted-1".into(), proxy_version: "test".into(), ..Default::default() };
    outbound.send(ProxyMessage { message: Some(proxy_message::Message::Hello(hello)) }).await.unwrap();
    let mut inbound = discovery.stream(ReceiverStream::new(outbound_rx)).await.unwrap().into_inner();
    let Some(ControlMessage { message: Some(control_message::Message::Config(config)) }) =
        inbound.message().await.unwrap()
    else {
        panic!("the control plane sends a configuration first");
    };
    let nack = Nack { version: config.version.clone(), nonce: config.nonce, error: "cannot compile: test".into() };
    outbound.send(ProxyMessage { message: Some(proxy_message::Message::Nack(nack)) }).await.unwrap();

    let row = eventually(Duration::from_secs(10), "the NACK to show in `weft get proxies`", || {
        let (_, out, _) = control.cli(&["get", "proxies"]);
        async move {
            out.lines().find(|line| line.starts_with("scripted-1") && line.contains("cannot compile")).map(String::from)
        }
    })
    .await;
    assert!(row.contains(&config.version), "{row}");
}
