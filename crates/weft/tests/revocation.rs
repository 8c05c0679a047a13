//! Cutting off a compromised identity or certificate under load: after `weft revoke`,
//! no request from or to it succeeds, open connections included, it gets no new
//! certificate, and every other caller keeps being served without a single failure;
//! `weft revoke undo` lets it back.

mod support;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use support::{client, eventually, Control, Proxy, TempDir, TestApp};

async fn sidecar(dir: &TempDir, control: &Control, service: &str, app: &TestApp) -> Proxy {
    let app_addr = app.address.to_string();
    let args =
        ["--service", service, "--id", &format!("{service}-1"), "--app-addr", &app_addr, "--health-interval", "200ms"];
    Proxy::start_controlled(dir, service, control, &args).await
}

/// Requests in a loop until stopped, counting answers by success.
struct Load {
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(outbound: std::net::SocketAddr, host: &'static str) -> Load {
        let (ok, failed, stop) =
            (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let (task_ok, task_failed, task_stop) = (ok.clone(), failed.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let http = client();
            // Bounded: at most ~60 s of requests, whatever happens to the test.
            for _ in 0..6000 {
                if task_stop.load(Ordering::Relaxed) {
                    return;
                }
                let counter = if status_via(&http, outbound, host).await == 200 { &task_ok } else { &task_failed };
                counter.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        Load { ok, failed, stop, task }
    }

    fn counts(&self) -> (usize, usize) {
        (self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }

    async fn stop(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        (self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }
}

/// One GET through `outbound` to `host`: its status, 0 if the connection broke.
async fn status_via(http: &support::HttpClient, outbound: std::net::SocketAddr, host: &str) -> u16 {
    let request = hyper::Request::get(format!("http://{outbound}/")).header("host", host);
    let request = request.body(http_body_util::Full::new(bytes::Bytes::new())).unwrap();
    match tokio::time::timeout(Duration::from_secs(5), http.request(request)).await {
        Ok(Ok(response)) => response.status().as_u16(),
        _ => 0,
    }
}

/// `n` requests from `outbound` to `host`, each on its own: how many succeeded.
async fn successes(outbound: std::net::SocketAddr, host: &str, n: usize) -> usize {
    let http = client();
    let mut ok = 0;
    for _ in 0..n {
        if status_via(&http, outbound, host).await == 200 {
            ok += 1;
        }
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_identity_or_certificate_is_cut_off_under_load_and_nothing_else_is() {
    let dir = TempDir::new("revocation");
    // Short certificates, so that renewals happen (and a revoked one's is refused).
    let control = Control::start_on(&dir, "control", &dir.0.join("data"), &["--cert-lifetime", "10s"]).await;
    let (reviews_app, ratings_app) = (TestApp::start("reviews").await, TestApp::start("ratings").await);
    let _reviews = sidecar(&dir, &control, "reviews", &reviews_app).await;
    let ratings = sidecar(&dir, &control, "ratings", &ratings_app).await;
    let web = Proxy::start_controlled(&dir, "web", &control, &[]).await;
    let batch = Proxy::start_controlled(&dir, "batch", &control, &[]).await;
    for (proxy, host) in [(&web, "reviews"), (&web, "ratings"), (&batch, "reviews"), (&batch, "ratings")] {
        assert_eq!(successes(proxy.outbound, host, 3).await, 3, "{host} is served before");
    }
    // Load on every edge; batch → reviews must never fail.
    let web_load = Load::start(web.outbound, "reviews");
    let untouched = Load::start(batch.outbound, "reviews");
    eventually(Duration::from_secs(5), "load on both edges", || {
        let busy = web_load.counts().0 > 10 && untouched.counts().0 > 10;
        async move { busy.then_some(()) }
    })
    .await;

    // One certificate revoked, by serial: ratings' current one. No request to it succeeds.
    // Its join token goes too, as after a theft: else it would join again, with a new
    // certificate, once the revoked one expired.
    let serial = ratings.config().await["identity"]["serial"].as_str().unwrap().to_string();
    let token = std::fs::read_to_string(dir.0.join("default.ratings.join-token")).unwrap();
    let (ok, _, err) = control.cli(&["token", "revoke", token.split('.').nth(1).unwrap()]);
    assert!(ok, "{err}");
    let (ok, _, err) = control.cli(&["revoke", "certificate", &serial]);
    assert!(ok, "{err}");
    eventually(Duration::from_secs(10), "requests to ratings to fail", || {
        let outbound = batch.outbound;
        async move { (successes(outbound, "ratings", 1).await == 0).then_some(()) }
    })
    .await;
    assert_eq!(successes(batch.outbound, "ratings", 10).await, 0, "a request to a revoked certificate succeeded");
    assert!(control.cli(&["revoke", "list"]).1.contains(&serial));
    drop(ratings);

    // web's identity is revoked: its open, pooled connections are cut off, new ones are
    // refused, and no request from it succeeds.
    let (ok, out, err) = control.cli(&["revoke", "identity", "spiffe://weft.local/ns/default/sa/web"]);
    assert!(ok && out.contains("revoked identity"), "{out}{err}");
    eventually(Duration::from_secs(10), "web's requests to fail", || {
        let failed = web_load.counts().1;
        async move { (failed > 0).then_some(()) }
    })
    .await;
    let (web_ok, _) = web_load.stop().await;
    assert_eq!(successes(web.outbound, "reviews", 20).await, 0, "a request from a revoked identity succeeded");
    assert!(web_ok > 10, "web was served before: {web_ok}");
    // It cannot get a new certificate either.
    eventually(Duration::from_secs(20), "web's renewal to be refused", || {
        let log = web.log();
        async move { log.contains("no certificate is issued for it").then_some(()) }
    })
    .await;
    let (ok, listed, _) = control.cli(&["revoke", "list"]);
    assert!(ok && listed.contains("spiffe://weft.local/ns/default/sa/web"), "{listed}");

    // Everything else went on: not one failure between batch and reviews.
    let (served, failed) = untouched.stop().await;
    assert!(served > 20, "{served}");
    assert_eq!(failed, 0, "an unrevoked edge failed {failed} of {} requests", served + failed);

    // Undone: web is served again (its certificate is still valid, or it joins again).
    let (ok, _, err) = control.cli(&["revoke", "undo", "spiffe://weft.local/ns/default/sa/web"]);
    assert!(ok, "{err}");
    eventually(Duration::from_secs(20), "web to be served again", || {
        let outbound = web.outbound;
        async move { (successes(outbound, "reviews", 1).await == 1).then_some(()) }
    })
    .await;
}
