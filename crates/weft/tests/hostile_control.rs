//! Hostile input to the control plane: applies over the body limit, with 100,000
//! documents, nested without end, with exponentially expanding aliases ("billion
//! laughs"), or not UTF-8; discovery streams that send garbage or never ACK; a thousand
//! bad operator tokens. Each is refused with a message that says why, changes nothing,
//! is counted on the control plane's `/metrics`, leaves its memory within 10 MB of where
//! it was, and 100 normal API calls succeed right after. Real proxies keep getting their
//! configuration throughout.

mod support;

use std::time::Duration;

use bytes::{Buf, BufMut};
use support::{api_request, api_request_bytes, eventually, hostile::rss_kb, tls_to, Control, Proxy, TempDir, TestApp};
use weft_api::discovery::{discovery_client::DiscoveryClient, proxy_message, Hello, ProxyMessage};

/// The end of every case: nothing was stored, memory is back within 10 MB, and 100
/// normal API calls succeed.
async fn survived(control: &Control, revision: u64, baseline_kb: u64, case: &str) {
    let (status, body) = control.api("GET", "/api/v1/status", None).await;
    assert_eq!((status, body["revision"].as_u64()), (200, Some(revision)), "{case}: something was stored: {body}");
    let pid = control.child.id();
    eventually(Duration::from_secs(30), &format!("{case}: memory back within 10 MB of {baseline_kb} KiB"), || {
        let rss = rss_kb(pid);
        async move { (rss <= baseline_kb + 10 * 1024).then_some(()) }
    })
    .await;
    assert_eq!(normal_calls(control, 100).await, 100, "{case}: normal calls failed afterwards");
}

/// `n` API reads with the admin token on one keep-alive connection: how many got a 200.
async fn normal_calls(control: &Control, n: usize) -> usize {
    use http_body_util::BodyExt;
    let token = control.admin_token();
    let root = token.split('.').nth(3).unwrap().to_string();
    let authority = control.server().strip_prefix("https://").unwrap().to_string();
    let stream = tokio::net::TcpStream::connect(&authority).await.unwrap();
    let tls = tls_to(stream, &root).await;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(connection);
    let mut ok = 0;
    for _ in 0..n {
        let request = hyper::Request::get("/api/v1/resources")
            .header("host", &authority)
            .header("authorization", format!("Bearer {token}"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        if sender.ready().await.is_err() {
            break;
        }
        let Ok(response) = sender.send_request(request).await else { break };
        let status = response.status();
        let _ = response.into_body().collect().await;
        ok += usize::from(status == 200);
    }
    ok
}

/// A Service document named `name`.
fn service(name: &str) -> String {
    format!("apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{selector: {{app: {name}}}, ports: [{{port: 80, protocol: http}}]}}\n")
}

/// Discovery streams the control plane has ended for what they sent or are.
async fn discovery_refusals(control: &Control) -> f64 {
    control.metric("weft_control_discovery_refusals_total", &[]).await
}

/// Block mappings nested `depth` deep (`a:` under `a:` ...).
fn block_nesting(depth: usize) -> String {
    (0..depth).map(|level| format!("{}a:\n", " ".repeat(level))).collect()
}

fn billion_laughs() -> String {
    let mut text = String::from("a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n");
    for (previous, name) in ('a'..='h').zip('b'..='i') {
        let refs = vec![format!("*{previous}"); 9].join(",");
        text.push_str(&format!("{name}: &{name} [{refs}]\n"));
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_applies_are_refused_with_reasons_and_change_nothing() {
    let dir = TempDir::new("hostile-control");
    let control = Control::start(&dir, "control").await;
    let (status, _) = control.api("POST", "/api/v1/apply", Some(&service("reviews"))).await;
    assert_eq!(status, 200);
    assert_eq!(normal_calls(&control, 100).await, 100);
    let revision = control.api("GET", "/api/v1/status", None).await.1["revision"].as_u64().unwrap();
    let baseline = rss_kb(control.child.id());
    let token = control.admin_token();
    let server = control.server();

    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("a body over the limit", vec![b'#'; 5 * 1024 * 1024], 413, "over the API's limit of 4 MiB"),
        ("100,000 small documents", b"---\na: 1\n".repeat(100_000), 422, "stopped reading after 100 invalid documents"),
        ("100,000 empty documents", b"---\n".repeat(100_000), 422, "more than 10000 documents in one source"),
        (
            "deeply nested flow YAML",
            format!("a: {}", "[".repeat(100_000)).into_bytes(),
            422,
            "nested more than 64 deep",
        ),
        ("deeply nested block YAML", block_nesting(300).into_bytes(), 422, "recursion limit"),
        ("a billion laughs", billion_laughs().into_bytes(), 422, "repetition limit"),
        (
            "invalid UTF-8",
            b"apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: \xff\xfe}\n".to_vec(),
            400,
            "not UTF-8",
        ),
    ];
    for (case, body, expected, message) in cases {
        let before = control.metric("weft_control_api_responses_total", &[&format!("status=\"{expected}\"")]).await;
        let (status, answer) =
            api_request_bytes(&server, Some(&token), "POST", "/api/v1/apply", Some(body), None).await.unwrap();
        let text = answer.to_string();
        assert_eq!(status, expected, "{case}: {text}");
        assert!(text.contains(message), "{case}: the refusal does not say why: {text}");
        assert!(text.len() < 64 * 1024, "{case}: a refusal of {} bytes", text.len());
        let after = control.metric("weft_control_api_responses_total", &[&format!("status=\"{expected}\"")]).await;
        assert!(after > before, "{case}: not counted");
        survived(&control, revision, baseline, case).await;
    }
}

/// Sends raw bytes as gRPC messages: garbage no proxy would send.
#[derive(Clone, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        Ok(Some(bytes.to_vec()))
    }
}

/// Opens a discovery stream on `channel` that sends `messages` and then stays open
/// sending nothing; the answer's stream is returned unread.
async fn raw_stream(
    channel: tonic::transport::Channel,
    messages: Vec<Vec<u8>>,
) -> Result<tonic::Streaming<Vec<u8>>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let outgoing = tokio_stream::StreamExt::chain(tokio_stream::iter(messages), tokio_stream::pending());
    let path = http::uri::PathAndQuery::from_static("/weft.discovery.v1.Discovery/Stream");
    grpc.streaming(tonic::Request::new(outgoing), path, RawCodec).await.map(|r| r.into_inner())
}

fn hello(proxy_id: &str) -> Vec<u8> {
    let hello = Hello { proxy_id: proxy_id.into(), namespace: "default".into(), ..Default::default() };
    prost::Message::encode_to_vec(&ProxyMessage { message: Some(proxy_message::Message::Hello(hello)) })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_silent_discovery_streams_are_bounded_and_other_proxies_unaffected() {
    let dir = TempDir::new("hostile-discovery");
    let control = Control::start(&dir, "control").await;
    let app = TestApp::start("reviews").await;
    let app_addr = app.address.to_string();
    let reviews = Proxy::start_controlled(
        &dir,
        "reviews",
        &control,
        &["--service", "reviews", "--app-addr", &app_addr, "--health-interval", "200ms"],
    )
    .await;
    let baseline = rss_kb(control.child.id());

    // Garbage as the first message, and garbage after a good Hello: each stream is ended
    // with an error and counted.
    let before = discovery_refusals(&control).await;
    let channel = control.channel_as(&dir, "garbage").await;
    let garbage = vec![0xffu8; 64];
    let first = match raw_stream(channel.clone(), vec![garbage.clone()]).await {
        Ok(mut answers) => answers.message().await.err(),
        Err(status) => Some(status),
    };
    assert!(first.is_some(), "garbage for a Hello was answered");
    let mut answers = raw_stream(channel.clone(), vec![hello("garbage-1"), garbage]).await.expect("the Hello is taken");
    let mut ended = None;
    for _ in 0..10 {
        match tokio::time::timeout(Duration::from_secs(10), answers.message()).await {
            Ok(Ok(Some(_))) => continue, // the first view
            Ok(Ok(None)) => break,
            Ok(Err(status)) => {
                ended = Some(status);
                break;
            }
            Err(_) => panic!("a stream that sent garbage was kept open"),
        }
    }
    assert!(ended.is_some(), "garbage after the Hello ended the stream without an error");
    eventually(Duration::from_secs(5), "both garbage streams counted", || {
        let control = &control;
        async move { (discovery_refusals(control).await >= before + 2.0).then_some(()) }
    })
    .await;

    // Streams that say Hello and then never ACK nor read: a hundred of them, while the
    // configuration changes fifty times. Each holds at most a few unread views (the
    // stream's channel is bounded and HTTP/2 flow control stops the rest), and the real
    // proxy gets every change.
    let mut silent = Vec::new();
    for i in 0..100 {
        let mut client = DiscoveryClient::new(channel.clone());
        let outgoing = tokio_stream::StreamExt::chain(
            tokio_stream::iter(vec![ProxyMessage {
                message: Some(proxy_message::Message::Hello(Hello {
                    proxy_id: format!("silent-{i}"),
                    namespace: "default".into(),
                    ..Default::default()
                })),
            }]),
            tokio_stream::pending(),
        );
        silent.push(client.stream(outgoing).await.expect("a Hello opens a stream").into_inner());
    }
    for i in 0..50 {
        let (status, body) = control.api("POST", "/api/v1/apply", Some(&service(&format!("change-{i}")))).await;
        assert_eq!(status, 200, "{body}");
    }
    // The last one is to the real proxy's own Service: a second port.
    let own = "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: reviews}\nspec: {selector: {app: reviews}, ports: [{port: 80, protocol: http}, {port: 9090, protocol: http}]}\n";
    let (status, body) = control.api("POST", "/api/v1/apply", Some(own)).await;
    assert_eq!(status, 200, "{body}");
    eventually(Duration::from_secs(10), "the real proxy to get the last change", || {
        let reviews = &reviews;
        async move { reviews.config().await.to_string().contains("9090").then_some(()) }
    })
    .await;
    let pid = control.child.id();
    let held = rss_kb(pid);
    assert!(held <= baseline + 40 * 1024, "memory grew by {} KiB for silent streams", held.saturating_sub(baseline));
    drop(silent);
    drop(answers);
    eventually(Duration::from_secs(30), "memory back within 10 MB once the silent streams are gone", || {
        let rss = rss_kb(pid);
        async move { (rss <= baseline + 10 * 1024).then_some(()) }
    })
    .await;
    assert_eq!(normal_calls(&control, 100).await, 100, "normal calls failed afterwards");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_bad_operator_tokens_are_rate_limited_and_other_clients_served() {
    use http_body_util::BodyExt;
    let dir = TempDir::new("hostile-tokens");
    let control = Control::start(&dir, "control").await;
    let token = control.admin_token();
    let root = token.split('.').nth(3).unwrap().to_string();
    let baseline = rss_kb(control.child.id());
    let revision = control.api("GET", "/api/v1/status", None).await.1["revision"].as_u64().unwrap();
    let before = control.metric("weft_control_api_responses_total", &["status=\"429\""]).await;

    // The attacker comes from another loopback address, on one keep-alive connection.
    let authority = control.server().strip_prefix("https://").unwrap().to_string();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let stream = socket.connect(authority.parse().unwrap()).await.unwrap();
    let tls = tls_to(stream, &root).await;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(connection);
    let mut statuses = std::collections::BTreeMap::new();
    for i in 0..1000 {
        let request = hyper::Request::get("/api/v1/resources")
            .header("host", &authority)
            .header("authorization", format!("Bearer wo1.guess{i}.{:064x}.{root}", i))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        sender.ready().await.expect("the connection stays usable");
        let response = sender.send_request(request).await.unwrap();
        *statuses.entry(response.status().as_u16()).or_insert(0) += 1;
        let _ = response.into_body().collect().await;
    }
    assert_eq!(statuses.get(&401), Some(&10), "ten guesses are judged: {statuses:?}");
    assert_eq!(statuses.get(&429), Some(&990), "the rest are refused outright: {statuses:?}");
    let after = control.metric("weft_control_api_responses_total", &["status=\"429\""]).await;
    assert_eq!(after - before, 990.0);
    let log = std::fs::read_to_string(&control.log).unwrap();
    assert_eq!(log.matches("too many bad operator tokens").count(), 1, "logged once, not a thousand times");
    // Another client (127.0.0.1) is served throughout.
    survived(&control, revision, baseline, "a thousand bad tokens").await;
    let (status, _) = api_request(&control.server(), Some(&token), "GET", "/api/v1/status", None, None).await.unwrap();
    assert_eq!(status, 200);
}
