//! Hostile HTTP/1.1 peers against both of a proxy's listeners: the outbound one (what a
//! compromised or buggy application sends) and the inbound one (what a plaintext caller
//! sends). Every case checks what the peer got, that the proxy counted it in
//! `weft_protocol_errors_total{reason}`, that no smuggled request reached the
//! application, that memory came back and that 100 normal requests succeed after.

mod support;

use std::time::Duration;

use support::{
    hostile::{counted, exchange, normal_requests, protocol_errors, rss_kb, survived, Mesh},
    Proxy,
};

/// One malformed request and what the proxy must do with it.
struct Case {
    name: &'static str,
    request: Vec<u8>,
    /// The status the peer gets before the proxy closes.
    status: u16,
    reason: &'static str,
    /// How many requests may reach the application (and with what body length).
    reaches_app: usize,
}

fn head(lines: &[&str]) -> Vec<u8> {
    let mut text = lines.join("\r\n");
    text.push_str("\r\n\r\n");
    text.into_bytes()
}

fn cases() -> Vec<Case> {
    let long_target = format!("GET /{} HTTP/1.1", "a".repeat(70_000));
    let big_header = format!("X-Big: {}", "b".repeat(200_000));
    let mut many_headers = vec!["GET / HTTP/1.1".to_string(), "Host: reviews".to_string()];
    many_headers.extend((0..5000).map(|i| format!("X-H{i}: v")));
    let many_headers: Vec<&str> = many_headers.iter().map(String::as_str).collect();
    let mut random = vec![0u8; 4096];
    // Deterministic noise that starts like no protocol weft knows.
    let mut x: u32 = 0x9e37_79b9;
    for byte in random.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *byte = (x >> 24) as u8;
    }
    random[0] = b'G';
    random[1] = b'E';
    random[2] = b'T';
    random[3] = b' ';
    vec![
        Case {
            name: "an oversized request line",
            request: head(&[&long_target, "Host: reviews"]),
            status: 414,
            reason: "uri_too_long",
            reaches_app: 0,
        },
        Case {
            name: "an oversized header",
            request: head(&["GET / HTTP/1.1", "Host: reviews", &big_header]),
            status: 431,
            reason: "headers_too_large",
            reaches_app: 0,
        },
        Case {
            name: "thousands of headers",
            request: head(&many_headers),
            status: 431,
            reason: "headers_too_large",
            reaches_app: 0,
        },
        Case {
            name: "duplicate differing Content-Length",
            request: [
                head(&["POST / HTTP/1.1", "Host: reviews", "Content-Length: 5", "Content-Length: 6"]),
                b"hello!".to_vec(),
            ]
            .concat(),
            status: 400,
            reason: "invalid_content_length",
            reaches_app: 0,
        },
        Case {
            name: "an obfuscated Transfer-Encoding (xchunked) with Content-Length",
            request: [
                head(&["POST / HTTP/1.1", "Host: reviews", "Content-Length: 4", "Transfer-Encoding: xchunked"]),
                b"0\r\n\r\n".to_vec(),
            ]
            .concat(),
            status: 400,
            reason: "invalid_transfer_encoding",
            reaches_app: 0,
        },
        Case {
            name: "Transfer-Encoding whose last coding is not chunked",
            request: [
                head(&[
                    "POST / HTTP/1.1",
                    "Host: reviews",
                    "Transfer-Encoding: chunked",
                    "Transfer-Encoding: identity",
                ]),
                b"0\r\n\r\n".to_vec(),
            ]
            .concat(),
            status: 400,
            reason: "invalid_transfer_encoding",
            reaches_app: 0,
        },
        Case {
            name: "a space before the colon of Transfer-Encoding",
            request: [
                head(&["POST / HTTP/1.1", "Host: reviews", "Transfer-Encoding : chunked"]),
                b"0\r\n\r\n".to_vec(),
            ]
            .concat(),
            status: 400,
            reason: "malformed_request",
            reaches_app: 0,
        },
        Case {
            name: "a folded (obs-fold) Transfer-Encoding",
            request: [
                head(&["POST / HTTP/1.1", "Host: reviews", "X-Fold: a", " Transfer-Encoding: chunked"]),
                b"0\r\n\r\n".to_vec(),
            ]
            .concat(),
            status: 400,
            reason: "malformed_request",
            reaches_app: 0,
        },
        Case { name: "random bytes", request: random, status: 400, reason: "malformed_request", reaches_app: 0 },
    ]
}

/// Runs every case against one listener of `target`.
async fn attack(mesh: &Mesh, target: &Proxy, address: std::net::SocketAddr, direction: &str) {
    let pid = target.child.id();
    let baseline = rss_kb(pid);
    for case in cases() {
        let label = format!("{direction}: {}", case.name);
        let before = protocol_errors(target, direction, case.reason).await;
        let hits = mesh.app_hits();
        let answer = exchange(address, &case.request, Duration::from_secs(10)).await;
        assert_eq!(answer.status(), case.status, "{label}: {answer:?}");
        assert!(answer.closed, "{label}: the proxy kept the connection open");
        counted(target, direction, case.reason, before, &label).await;
        assert!(mesh.app_hits() - hits <= case.reaches_app, "{label}: reached the application");
        survived(mesh, pid, baseline, &label).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused_with_the_right_status_and_counted_on_both_listeners() {
    let mesh = Mesh::start("hostile-http1").await;
    attack(&mesh, &mesh.web, mesh.web.outbound, "outbound").await;
    let inbound = mesh.reviews.inbound.unwrap();
    attack(&mesh, &mesh.reviews, inbound, "inbound").await;
}

/// Request smuggling probes: each is one request by weft's reading (Transfer-Encoding
/// wins over Content-Length, RFC 9112 §6.3), and weft frames what it forwards itself, so
/// the application sees exactly the requests weft parsed: never a second one hidden in
/// a body or behind a disagreeing length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_probes_deliver_at_most_one_request_to_the_application() {
    let mesh = Mesh::start("hostile-smuggling").await;
    let outbound = mesh.web.outbound;
    let inbound = mesh.reviews.inbound.unwrap();
    let probes: Vec<(&str, Vec<u8>, usize)> = vec![
        // CL.TE: a front end reading Content-Length would forward the "G" as the start of
        // the next request.
        (
            "CL.TE",
            [
                head(&["POST / HTTP/1.1", "Host: reviews", "Content-Length: 6", "Transfer-Encoding: chunked"]),
                b"0\r\n\r\nG".to_vec(),
            ]
            .concat(),
            0,
        ),
        // TE.CL: a back end reading Content-Length would see "GET /smuggled" as a request.
        (
            "TE.CL",
            [
                head(&["POST / HTTP/1.1", "Host: reviews", "Content-Length: 4", "Transfer-Encoding: chunked"]),
                b"2d\r\nGET /smuggled HTTP/1.1\r\nHost: reviews\r\nX: X\r\n\r\n0\r\n\r\n".to_vec(),
            ]
            .concat(),
            45,
        ),
        // TE with odd case and spacing is still chunked to weft, and framed as such.
        (
            "TE in odd case",
            [
                head(&["POST / HTTP/1.1", "Host: reviews", "Content-Length: 40", "transfer-encoding:\tCHUNKED"]),
                b"5\r\nhello\r\n0\r\n\r\n".to_vec(),
            ]
            .concat(),
            5,
        ),
    ];
    for (address, direction) in [(outbound, "outbound"), (inbound, "inbound")] {
        for (name, probe, body_length) in &probes {
            let hits = mesh.app_hits();
            let answer = exchange(address, probe, Duration::from_secs(4)).await;
            let statuses = answer.statuses();
            assert_eq!(statuses, vec![200], "{direction} {name}: one answer for one request: {answer:?}");
            let text = String::from_utf8_lossy(&answer.answer);
            let seen = text.split("\r\n\r\n").nth(1).map(|b| b.contains(&format!("\"bodyLength\":{body_length}")));
            assert_eq!(seen, Some(true), "{direction} {name}: the application saw another body: {text}");
            assert_eq!(mesh.app_hits() - hits, 1, "{direction} {name}: the application saw more than one request");
        }
        // An h2c upgrade would hand the caller a raw HTTP/2 tunnel to the application, past
        // every per-request check: the proxy strips it and serves the request itself.
        let hits = mesh.app_hits();
        let answer = exchange(
            address,
            &head(&[
                "GET / HTTP/1.1",
                "Host: reviews",
                "Connection: Upgrade, HTTP2-Settings",
                "Upgrade: h2c",
                "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
            ]),
            Duration::from_secs(4),
        )
        .await;
        assert_eq!(answer.statuses(), vec![200], "{direction} h2c upgrade: {answer:?}");
        let text = String::from_utf8_lossy(&answer.answer).to_lowercase();
        assert!(!text.contains("\"upgrade\""), "{direction}: the upgrade reached the application: {text}");
        assert_eq!(mesh.app_hits() - hits, 1);
    }
    assert_eq!(normal_requests(outbound, 100).await, 100);
}

/// Bodies that break their framing: the application may have seen the request start,
/// but the peer is told, the proxy counts it, and nothing else is forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_bodies_are_refused_and_counted() {
    let mesh = Mesh::start("hostile-bodies").await;
    let pid = mesh.web.child.id();
    let baseline = rss_kb(pid);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "an invalid chunk size",
            [
                head(&["POST / HTTP/1.1", "Host: reviews", "Transfer-Encoding: chunked"]),
                b"zz\r\nhello\r\n0\r\n\r\n".to_vec(),
            ]
            .concat(),
        ),
        (
            "a chunk size that overflows",
            [
                head(&["POST / HTTP/1.1", "Host: reviews", "Transfer-Encoding: chunked"]),
                b"fffffffffffffffffffff\r\nhello\r\n0\r\n\r\n".to_vec(),
            ]
            .concat(),
        ),
    ];
    for (name, request) in cases {
        let before = protocol_errors(&mesh.web, "outbound", "invalid_body").await;
        let answer = exchange(mesh.web.outbound, &request, Duration::from_secs(10)).await;
        assert!(answer.closed, "{name}: {answer:?}");
        let status = answer.status();
        assert!(status == 0 || status == 400 || status >= 500, "{name}: the broken body was answered {status}");
        counted(&mesh.web, "outbound", "invalid_body", before, name).await;
        survived(&mesh, pid, baseline, name).await;
    }
    // A body shorter than announced, then the peer goes away: counted, nothing forwarded
    // as complete.
    let before = protocol_errors(&mesh.web, "outbound", "invalid_body").await;
    {
        use tokio::io::AsyncWriteExt;
        let mut stream = tokio::net::TcpStream::connect(mesh.web.outbound).await.unwrap();
        let request = [head(&["POST / HTTP/1.1", "Host: reviews", "Content-Length: 1000"]), b"short".to_vec()].concat();
        stream.write_all(&request).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let _ =
            tokio::time::timeout(Duration::from_secs(10), tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut rest))
                .await;
        assert!(!String::from_utf8_lossy(&rest).contains("HTTP/1.1 200"), "a short body was answered 200");
    }
    counted(&mesh.web, "outbound", "invalid_body", before, "a body shorter than announced").await;
    survived(&mesh, pid, baseline, "a body shorter than announced").await;
}

/// Hundreds of clients dribbling their headers a byte at a time, and thousands of idle
/// connections: normal clients are served meanwhile, the slow ones are closed at the
/// header read timeout and counted, and memory comes back once they are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_idle_connections_are_bounded_while_others_are_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The test holds thousands of connections itself.
    rlimit::increase_nofile_limit(u64::MAX).expect("raise this test's open file limit");
    let mesh = Mesh::start("hostile-slow").await;
    let pid = mesh.web.child.id();
    let baseline = rss_kb(pid);
    let outbound = mesh.web.outbound;

    let before = protocol_errors(&mesh.web, "outbound", "header_read_timeout").await;
    let mut slow = tokio::task::JoinSet::new();
    for _ in 0..300 {
        slow.spawn(async move {
            let Ok(mut stream) = tokio::net::TcpStream::connect(outbound).await else { return false };
            let request = b"GET / HTTP/1.1\r\nHost: reviews\r\nX-Slow: ";
            // A byte every 100 ms, for at most 30 s: the proxy must close first.
            for byte in request.iter().chain(std::iter::repeat(&b'a')).take(300) {
                if stream.write_all(&[*byte]).await.is_err() {
                    return true;
                }
                let mut probe = [0u8; 64];
                match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut probe)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return true,
                    Ok(Ok(_)) => return true,
                    Err(_) => {}
                }
            }
            false
        });
    }
    // Normal clients are served while the slow ones hang on.
    assert_eq!(normal_requests(outbound, 100).await, 100, "normal clients were starved by slow ones");
    let mut closed = 0;
    while let Some(result) = slow.join_next().await {
        closed += usize::from(result.unwrap());
    }
    assert_eq!(closed, 300, "every slow client is closed by the proxy");
    let web = &mesh.web;
    support::eventually(Duration::from_secs(10), "every slow client counted", || async move {
        (protocol_errors(web, "outbound", "header_read_timeout").await - before >= 300.0).then_some(())
    })
    .await;
    survived(&mesh, pid, baseline, "slowloris").await;

    // Thousands of idle connections: accepted, harmless, closed at the header timeout.
    let before = protocol_errors(&mesh.web, "outbound", "header_read_timeout").await;
    let mut idle = Vec::new();
    for _ in 0..3000 {
        match tokio::net::TcpStream::connect(outbound).await {
            Ok(stream) => idle.push(stream),
            Err(error) => panic!("connection {} refused: {error}", idle.len()),
        }
    }
    assert_eq!(normal_requests(outbound, 100).await, 100, "normal clients were starved by idle connections");
    let mut closed = 0;
    for mut stream in idle {
        let mut probe = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut probe)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 3000, "every idle connection is closed by the proxy");
    support::eventually(Duration::from_secs(10), "every idle connection counted", || async move {
        (protocol_errors(web, "outbound", "header_read_timeout").await - before >= 3000.0).then_some(())
    })
    .await;
    survived(&mesh, pid, baseline, "thousands of idle connections").await;
}
