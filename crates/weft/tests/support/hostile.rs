//! The frame of every hostile-input case: a real mesh (a control plane, a caller's proxy
//! `web`, and `reviews` with its application behind its proxy), and the checks each case
//! ends with: the refusal was counted, the attacked process's memory came back to within
//! 10 MB of what it was before, and 100 normal requests succeed right after.

use std::{net::SocketAddr, time::Duration};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{client, eventually, get_via, metric_sum, Control, Proxy, TempDir, TestApp};

/// How far above its baseline a process's resident memory may be after a case.
pub const RSS_ALLOWANCE_KB: u64 = 10 * 1024;

/// A control plane and two meshed proxies, with short timeouts for slow peers so that
/// the cases that wait them out stay quick.
pub struct Mesh {
    pub dir: TempDir,
    pub control: Control,
    pub app: TestApp,
    pub reviews: Proxy,
    pub web: Proxy,
}

/// The timeouts the mesh's proxies run with.
pub const HEADER_READ_TIMEOUT: &str = "2s";
pub const TLS_HANDSHAKE_TIMEOUT: &str = "2s";

impl Mesh {
    pub async fn start(name: &str) -> Mesh {
        let dir = TempDir::new(name);
        let control = Control::start(&dir, "control").await;
        let app = TestApp::start("reviews").await;
        let app_addr = app.address.to_string();
        let timeouts = ["--header-read-timeout", HEADER_READ_TIMEOUT, "--tls-handshake-timeout", TLS_HANDSHAKE_TIMEOUT];
        let mut args = vec!["--service", "reviews", "--app-addr", &app_addr, "--health-interval", "200ms"];
        args.extend(timeouts);
        let reviews = Proxy::start_controlled(&dir, "reviews", &control, &args).await;
        let web = Proxy::start_controlled(&dir, "web", &control, &timeouts).await;
        let mesh = Mesh { dir, control, app, reviews, web };
        eventually(Duration::from_secs(10), "web to reach reviews", || {
            let outbound = mesh.web.outbound;
            async move { (normal_requests(outbound, 1).await == 1).then_some(()) }
        })
        .await;
        // Warm up pools and caches before any baseline is taken.
        assert_eq!(normal_requests(mesh.web.outbound, 100).await, 100);
        mesh
    }

    /// Requests the application has seen.
    pub fn app_hits(&self) -> usize {
        self.app.hits()
    }
}

/// `n` GETs through `outbound` to reviews on a pooled client: how many got a 200.
pub async fn normal_requests(outbound: SocketAddr, n: usize) -> usize {
    let http = client();
    let mut ok = 0;
    for _ in 0..n {
        let answer = tokio::time::timeout(Duration::from_secs(5), get_via(&http, outbound, "reviews", "/", &[])).await;
        if answer.is_ok_and(|a| a.status == 200) {
            ok += 1;
        }
    }
    ok
}

/// A process's resident memory in KiB.
pub fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// `weft_protocol_errors_total` of `proxy` for one listener and reason.
pub async fn protocol_errors(proxy: &Proxy, direction: &str, reason: &str) -> f64 {
    let direction = format!("direction=\"{direction}\"");
    let reason = format!("reason=\"{reason}\"");
    metric_sum(&proxy.metrics().await, "weft_protocol_errors_total", &[&direction, &reason])
}

/// Waits until `proxy` has counted `reason` on `direction` more than `before` times.
pub async fn counted(proxy: &Proxy, direction: &str, reason: &str, before: f64, case: &str) {
    eventually(Duration::from_secs(10), &format!("{case}: counted as {direction}/{reason}"), || async move {
        (protocol_errors(proxy, direction, reason).await > before).then_some(())
    })
    .await;
}

/// The end of every case: `pid`'s memory is back within [`RSS_ALLOWANCE_KB`] of
/// `baseline_kb` (freed memory returns to the system in seconds, so this waits), and
/// 100 normal requests through the mesh succeed.
pub async fn survived(mesh: &Mesh, pid: u32, baseline_kb: u64, case: &str) {
    assert!(rss_kb(pid) > 0, "{case}: the process under attack is gone");
    let what = format!("{case}: memory back within 10 MB of the baseline of {baseline_kb} KiB");
    eventually(Duration::from_secs(30), &what, || {
        let rss = rss_kb(pid);
        async move { (rss <= baseline_kb + RSS_ALLOWANCE_KB).then_some(()) }
    })
    .await;
    assert_eq!(normal_requests(mesh.web.outbound, 100).await, 100, "{case}: normal requests failed afterwards");
}

/// What a peer got back for bytes no well-behaved client sends.
#[derive(Debug)]
pub struct Exchange {
    pub answer: Vec<u8>,
    /// The proxy closed the connection (EOF or reset) within the wait.
    pub closed: bool,
}

impl Exchange {
    /// The answer's HTTP/1 status, 0 when there is none.
    pub fn status(&self) -> u16 {
        super::raw_status(&String::from_utf8_lossy(&self.answer))
    }

    /// Every status line in the answer, in order (pipelined responses).
    pub fn statuses(&self) -> Vec<u16> {
        let text = String::from_utf8_lossy(&self.answer);
        text.match_indices("HTTP/1.1 ").filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok()).collect()
    }
}

/// Writes `request` to a fresh connection to `address` and reads until the proxy closes
/// or `wait` passes. Writing may fail once the proxy has refused and closed: that is an
/// answer too, not a test failure.
pub async fn exchange(address: SocketAddr, request: &[u8], wait: Duration) -> Exchange {
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect");
    let (mut read, mut write) = stream.split();
    let writing = async {
        let _ = write.write_all(request).await;
    };
    let mut answer = Vec::new();
    let reading = async {
        let mut buffer = [0u8; 16 * 1024];
        loop {
            match read.read(&mut buffer).await {
                Ok(0) | Err(_) => return true,
                Ok(n) => answer.extend_from_slice(&buffer[..n]),
            }
        }
    };
    let (_, closed) = tokio::join!(writing, async { tokio::time::timeout(wait, reading).await.unwrap_or(false) });
    Exchange { answer, closed }
}
