//! Protocols through real proxies: gRPC (unary and server streaming, trailers intact),
//! WebSocket, opaque TCP through `--upstream`, and a server-first protocol on a `tcp`
//! port across a proxy pair that must not wait for protocol detection.

mod support;

use std::{net::SocketAddr, time::Duration};

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};

/// A mesh with one Service `name` (port 80 with `protocol`) whose only workload is at
/// `address`.
fn one_service(name: &str, port: u16, protocol: &str, address: SocketAddr) -> String {
    format!(
        "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{selector: {{app: {name}}}, ports: [{{port: {port}, protocol: {protocol}}}]}}\n---\n\
         apiVersion: weft.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}-1}}\nspec: {{labels: {{app: {name}}}, address: \"{address}\"}}\n"
    )
}

/// Proxy B in front of `app` (its own Service declared), proxy A pointing at B.
async fn pair(
    dir: &TempDir,
    name: &str,
    port: u16,
    protocol: &str,
    app: SocketAddr,
    b_args: &[&str],
    a_args: &[&str],
) -> (Proxy, Proxy) {
    let placeholder: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let b_config = dir.write("b.yaml", &one_service(name, port, protocol, placeholder));
    let app = app.to_string();
    let mut args = vec!["--service", name, "--app-addr", &app];
    args.extend_from_slice(b_args);
    let b = Proxy::start(dir, "b", &b_config, &args).await;
    let a_config = dir.write("a.yaml", &one_service(name, port, protocol, b.inbound.unwrap()));
    let a = Proxy::start(dir, "a", &a_config, a_args).await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_server_streaming_through_a_pair_keep_trailers() {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_service_status("reviews.Reviews", tonic_health::ServingStatus::Serving).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let dir = TempDir::new("grpc");
    let (a, b) = pair(&dir, "reviews", 8080, "grpc", app, &[], &[]).await;

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", a.outbound))
        .unwrap()
        .origin("http://reviews:8080".parse().unwrap())
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);

    let reply = client.check(HealthCheckRequest { service: "reviews.Reviews".into() }).await.unwrap();
    assert_eq!(reply.into_inner().status, ServingStatus::Serving as i32);
    // An error status travels in the trailers: it must arrive intact.
    let error = client.check(HealthCheckRequest { service: "unknown.Service".into() }).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::NotFound, "{error:?}");

    let mut stream = client.watch(HealthCheckRequest { service: "reviews.Reviews".into() }).await.unwrap().into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    reporter.set_service_status("reviews.Reviews", tonic_health::ServingStatus::NotServing).await;
    let second = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(second.status, ServingStatus::NotServing as i32);
    drop(stream);

    let inbound = b.metric_sum("weft_requests_total", &["direction=\"inbound\"", "status_code=\"200\""]).await;
    assert!(inbound >= 2.0, "{inbound}");

    // The proxy's own errors are gRPC statuses for gRPC callers.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", a.outbound))
        .unwrap()
        .origin("http://nowhere:8080".parse().unwrap())
        .connect()
        .await
        .unwrap();
    let error = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::Unimplemented, "{error:?}");
    assert!(error.message().contains("unknown-host"), "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_a_pair() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut socket = tokio_tungstenite::accept_async(stream).await.unwrap();
                while let Some(Ok(message)) = socket.next().await {
                    if message.is_text() || message.is_binary() {
                        socket.send(message).await.unwrap();
                    }
                }
            });
        }
    });
    let dir = TempDir::new("ws");
    let (a, _b) = pair(&dir, "echo", 80, "http", app, &[], &[]).await;
    let stream = TcpStream::connect(a.outbound).await.unwrap();
    let (mut socket, response) = tokio_tungstenite::client_async("ws://echo/chat", stream).await.unwrap();
    assert_eq!(response.status(), 101);
    for text in ["hello", "through", "two proxies"] {
        socket.send(tokio_tungstenite::tungstenite::Message::text(text)).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), socket.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_tcp_echo_through_an_upstream_listener() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    let dir = TempDir::new("tcp");
    let config = dir.write("m.yaml", &one_service("db", 5432, "tcp", app));
    let proxy = Proxy::start(&dir, "p", &config, &["--upstream", "db=127.0.0.1:0"]).await;
    let mut stream = TcpStream::connect(proxy.upstreams["db"]).await.unwrap();
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let (mut read, mut write) = stream.split();
    let writer = async {
        write.write_all(&payload).await.unwrap();
        write.shutdown().await.unwrap();
    };
    let mut echoed = Vec::new();
    let reader = read.read_to_end(&mut echoed);
    let (_, read_result) = tokio::join!(writer, reader);
    read_result.unwrap();
    assert_eq!(echoed, payload);
    drop(stream);
    eventually(Duration::from_secs(5), "TCP bytes to be counted", || async {
        (proxy.metric_sum("weft_tcp_bytes_total", &["destination_service=\"default/db\"", "flow=\"sent\""]).await
            == 100_000.0)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_first_protocol_on_a_tcp_port_does_not_wait_for_detection() {
    // An SMTP-like server: it speaks first.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                stream.write_all(b"220 mail.example ESMTP ready\r\n").await.unwrap();
                let mut buffer = [0u8; 64];
                let n = stream.read(&mut buffer).await.unwrap_or(0);
                let _ = stream.write_all(&buffer[..n]).await;
            });
        }
    });
    let dir = TempDir::new("server-first");
    // Detection would wait 60s for the client to speak: the test would time out.
    let (a, _b) = pair(
        &dir,
        "mail",
        25,
        "tcp",
        app,
        &["--detect-timeout", "60s"],
        &["--upstream", "mail=127.0.0.1:0", "--detect-timeout", "60s"],
    )
    .await;
    let mut stream = TcpStream::connect(a.upstreams["mail"]).await.unwrap();
    let mut banner = vec![0u8; 30];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut banner))
        .await
        .expect("the banner arrives while the client is silent")
        .unwrap();
    assert_eq!(&banner, b"220 mail.example ESMTP ready\r\n");
    stream.write_all(b"EHLO me\r\n").await.unwrap();
    let mut reply = vec![0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut reply)).await.unwrap().unwrap();
    assert_eq!(&reply, b"EHLO me\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_route_sends_methods_to_different_backends() {
    // Two health servers that disagree about "svc": the answer tells which one served.
    let mut addresses = Vec::new();
    for status in [tonic_health::ServingStatus::Serving, tonic_health::ServingStatus::NotServing] {
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter.set_service_status("svc", status).await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        addresses.push(listener.local_addr().unwrap());
        tokio::spawn(async move {
            let _reporter = reporter;
            tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
        });
    }
    let yaml = format!(
        "{}---\n{}---\n{}---\n{}",
        one_service("health", 50051, "grpc", addresses[0]).replace("app: health}", "app: health, v: one}"),
        one_service("health-two", 50051, "grpc", addresses[1]),
        "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: health-one}\nspec: {selector: {app: health, v: one}, ports: [{port: 50051, protocol: grpc}]}\n",
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: health}
spec:
  parentRefs: [{kind: Service, name: health}]
  rules:
  - matches: [{method: {service: grpc.health.v1.Health, method: Check}, headers: [{name: x-pick, value: two}]}]
    backendRefs: [{name: health-two, port: 50051}]
  - matches: [{method: {service: grpc.health.v1.Health}}]
    backendRefs: [{name: health-one, port: 50051}]
"#
    );
    let dir = TempDir::new("grpcroute");
    let config = dir.write("m.yaml", &yaml);
    let proxy = Proxy::start(&dir, "p", &config, &[]).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", proxy.outbound))
        .unwrap()
        .origin("http://health:50051".parse().unwrap())
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    let plain = client.check(HealthCheckRequest { service: "svc".into() }).await.unwrap().into_inner();
    assert_eq!(plain.status, ServingStatus::Serving as i32, "the service match goes to health-one");
    let mut request = tonic::Request::new(HealthCheckRequest { service: "svc".into() });
    request.metadata_mut().insert("x-pick", "two".parse().unwrap());
    let picked = client.check(request).await.unwrap().into_inner();
    assert_eq!(picked.status, ServingStatus::NotServing as i32, "method + header match goes to health-two");
    let routed = proxy.metric_sum("weft_requests_total", &["route=\"GRPCRoute/default/health\""]).await;
    assert_eq!(routed, 1.0);
}
