//! The dashboard in a real browser: headless Chromium, driven through chromedriver
//! (WebDriver), against a live mesh with traffic. The browser trusts the API's
//! certificate by its public key's hash (`--ignore-certificate-errors-spki-list`), never
//! by ignoring certificate errors.
//!
//! What an operator would notice: a bad token is refused and a viewer's accepted; a
//! viewer cannot apply; a change without the session's CSRF token is refused; the
//! topology shows every Service and call of the mesh with the right mutual-TLS marks and
//! no two boxes overlapping, and a Service that starts failing turns red; a Service's
//! charts have data and a marker for a change made from the CLI, with its diff, which
//! the page reverts; a live tap shows requests and a denied one's policy; an invalid apply from the editor marks its
//! line and changes nothing, a valid one changes the live routing; no page logs an
//! error or asks another origin for anything. Screenshots of every page are saved
//! under the test's output directory.

mod support;

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use fantoccini::{wd::WebDriverCompatibleCommand, Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use support::{client, eventually, get_via, Control, Proxy, TempDir, TestApp};

const MESH: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: reviews}
spec: {selector: {app: reviews}, ports: [{port: 80, protocol: http}]}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: ratings}
spec: {selector: {app: ratings}, ports: [{port: 80, protocol: http}]}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: web}
spec: {selector: {app: web}, ports: [{port: 80, protocol: http}]}
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-admin}
spec:
  targetRef: {kind: Service, name: reviews}
  action: DENY
  rules:
  - to: [{paths: ["/admin*"]}]
"#;

/// What the CLI applies, for the Service page to show and revert.
const BALANCE: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews-balance}
spec:
  targetRef: {kind: Service, name: reviews}
  loadBalancer: {algorithm: round-robin}
"#;

/// The route the editor applies: every request for reviews goes to ratings.
const TO_RATINGS: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: reviews-to-ratings
  namespace: default
spec:
  parentRefs:
  - kind: Service
    name: reviews
  rules:
  - backendRefs:
    - name: ratings
      port: 80
";

/// A meshed sidecar reporting telemetry every second.
async fn sidecar(dir: &TempDir, control: &Control, id: &str, service: &str, app: SocketAddr) -> Proxy {
    let app = app.to_string();
    let args = ["--id", id, "--service", service, "--app-addr", &app, "--telemetry-interval", "1s"];
    Proxy::start_controlled(dir, id, control, &args).await
}

/// The base64 SHA-256 of the API certificate's public key, as Chromium's
/// `--ignore-certificate-errors-spki-list` takes it (read with openssl, as an operator
/// would).
fn spki_hash(address: SocketAddr) -> String {
    let script = format!(
        "openssl s_client -connect {address} </dev/null 2>/dev/null | openssl x509 -pubkey -noout \
         | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64"
    );
    let output = Command::new("sh").arg("-c").arg(script).output().expect("sh runs");
    let hash = String::from_utf8_lossy(&output.stdout).trim().to_string();
    assert_eq!(hash.len(), 44, "the API certificate's SPKI hash: {output:?}");
    hash
}

/// chromedriver's browser log (`goog:loggingPrefs`), which W3C WebDriver has no command
/// for.
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(&self, base: &url::Url, session: Option<&str>) -> Result<url::Url, url::ParseError> {
        base.join(&format!("session/{}/se/log", session.unwrap_or_default()))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(json!({"type": "browser"}).to_string()))
    }
}

/// Headless Chromium under chromedriver, killed when dropped.
struct Browser {
    driver: Child,
    client: Client,
    shots: PathBuf,
    origin: String,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Browser {
    /// Starts a browser that trusts `spki`; `None` (a skip, a failure in CI) without
    /// chromedriver.
    async fn start(dir: &TempDir, origin: &str, spki: &str) -> Option<Browser> {
        if Command::new("chromedriver").arg("--version").output().is_err() {
            support::skip("chromedriver is not installed (Debian: chromium chromium-driver)");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = std::fs::File::create(dir.0.join("chromedriver.log")).unwrap();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("chromedriver starts");
        let webdriver = format!("http://127.0.0.1:{port}");
        eventually(Duration::from_secs(20), "chromedriver to listen", || async move {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
        })
        .await;
        let profile = dir.0.join("chromium-profile");
        let capabilities = json!({
            "goog:chromeOptions": {
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1440,1000",
                    format!("--user-data-dir={}", profile.display()),
                    format!("--ignore-certificate-errors-spki-list={spki}"),
                ],
            },
            "goog:loggingPrefs": {"browser": "ALL"},
        });
        let capabilities = match capabilities {
            Value::Object(map) => map,
            _ => unreachable!(),
        };
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&webdriver)
            .await
            .expect("a chromedriver session");
        let shots = dir.0.join("screenshots");
        std::fs::create_dir_all(&shots).unwrap();
        Some(Browser { driver, client, shots, origin: origin.to_string() })
    }

    /// Runs `script` in the page and returns its value.
    async fn js(&self, script: &str) -> Value {
        self.client.execute(script, vec![]).await.unwrap_or_else(|e| panic!("{script}: {e}"))
    }

    /// Waits until `script` returns something truthy, and returns it. On a timeout the
    /// page is saved as a screenshot and the browser's errors are in the panic.
    async fn until(&self, what: &str, script: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let value = self.js(script).await;
            let truthy = !matches!(&value, Value::Null | Value::Bool(false))
                && value != json!(0)
                && value != json!("")
                && value != json!([]);
            if truthy {
                return value;
            }
            if tokio::time::Instant::now() > deadline {
                self.shot("timed-out").await;
                let page = self.js("return document.getElementById('page').innerText").await;
                let errors = self.console_errors().await;
                panic!("timed out after 30s waiting for {what}; the page says:\n{page}\nconsole errors: {errors:#?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Opens the dashboard's page at `fragment`.
    async fn open(&self, fragment: &str) {
        self.client.goto(&format!("{}/{fragment}", self.origin)).await.unwrap();
    }

    async fn shot(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }

    /// Logs in with `token` through the form, as a person would.
    async fn log_in(&self, token: &str) {
        self.open("").await;
        self.until("the login form", "return !document.getElementById('login').hidden").await;
        let input = self.client.find(Locator::Id("token")).await.unwrap();
        input.clear().await.unwrap();
        input.send_keys(token).await.unwrap();
        self.client.find(Locator::Css("#login-form button[type=submit]")).await.unwrap().click().await.unwrap();
    }

    /// Console messages at error level, but for the API's refusals (the browser logs
    /// every 4xx as an error; the test provokes some on purpose, and checks each).
    async fn console_errors(&self) -> Vec<String> {
        let log = self.client.issue_cmd(BrowserLog).await.expect("chromedriver's browser log");
        let refusal = format!("{}/api/v1/", self.origin);
        log.as_array()
            .into_iter()
            .flatten()
            .filter(|entry| entry["level"] == "SEVERE")
            .map(|entry| entry["message"].as_str().unwrap_or_default().to_string())
            .filter(|message| !(message.starts_with(&refusal) && message.contains("Failed to load resource")))
            .collect()
    }

    /// A call of the API from the page, with the session's cookie: (status, answer).
    async fn fetch(&self, method: &str, path: &str, headers: Value, body: &str) -> (u16, Value) {
        let script = format!(
            "const r = await fetch({path:?}, {{method: {method:?}, headers: {headers}, body: {body:?}}});
             return [r.status, await r.json()];"
        );
        let answer = self.js(&format!("return (async () => {{ {script} }})();")).await;
        (answer[0].as_u64().unwrap() as u16, answer[1].clone())
    }
}

/// Requests from web to reviews (mutual TLS) and from an unmeshed client straight to
/// reviews' inbound listener (plaintext), until stopped or for at most three minutes.
fn traffic(web: SocketAddr, reviews_inbound: SocketAddr, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let http = client();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
        let mut round = 0u64;
        while !stop.load(Ordering::Relaxed) && tokio::time::Instant::now() < deadline {
            let _ = get_via(&http, web, "reviews", "/", &[]).await;
            if round.is_multiple_of(4) {
                let _ = get_via(&http, reviews_inbound, "reviews", "/", &[]).await;
            }
            round += 1;
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_live_mesh_and_changes_it_safely() {
    let dir = TempDir::new("dashboard");
    let control = Control::start(&dir, "control").await;
    control.apply(MESH);
    let reviews_app = TestApp::start("reviews").await;
    let ratings_app = TestApp::start("ratings").await;
    let web_app = TestApp::start("web").await;
    let reviews = sidecar(&dir, &control, "reviews", "reviews", reviews_app.address).await;
    let _ratings = sidecar(&dir, &control, "ratings", "ratings", ratings_app.address).await;
    let web = sidecar(&dir, &control, "web", "web", web_app.address).await;
    let http = client();
    eventually(Duration::from_secs(15), "reviews through the mesh", || {
        let http = http.clone();
        async move { (get_via(&http, web.outbound, "reviews", "/", &[]).await.app() == "reviews").then_some(()) }
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic(web.outbound, reviews.inbound.expect("reviews' inbound listener"), stop.clone());

    let (ok, viewer, err) = control.cli(&["token", "create", "--role", "viewer", "--name", "browser"]);
    assert!(ok, "{err}");
    let viewer = viewer.trim().to_string();
    let Some(browser) = Browser::start(&dir, &control.server(), &spki_hash(control.api)).await else {
        return;
    };

    // Login: a bad token is refused with the reason, a viewer token opens a session.
    browser.log_in("wo1.unknown.0000.0000").await;
    let refusal = browser.until("the refusal", "return document.getElementById('login-error').textContent").await;
    assert!(refusal.as_str().unwrap().contains("operator token"), "{refusal}");
    browser.shot("login").await;
    browser.log_in(&viewer).await;
    let who = browser
        .until(
            "the session",
            "return !document.getElementById('nav').hidden && document.getElementById('who').textContent",
        )
        .await;
    assert_eq!(who, "browser (viewer)");
    let cookie = browser.js("return document.cookie").await;
    assert_eq!(cookie, "", "the session cookie is HttpOnly: no script can read it");

    // The topology: every Service and call of the live mesh, with mutual-TLS marks, and
    // no two boxes overlapping once laid out.
    browser.open("#/topology").await;
    let graph = browser
        .until(
            "the topology with both calls, laid out",
            "const canvas = document.querySelector('canvas[data-settled=true]');
             const calls = [...document.querySelectorAll('#topology-edges tbody tr')].map((r) => r.dataset);
             const mtls = calls.find((c) => c.source === 'default/web' && c.destination === 'default/reviews');
             const plain = calls.find((c) => c.source === '(unmeshed)' && c.destination === 'default/reviews');
             if (!canvas || !mtls || !plain) return null;
             const boxes = [...document.querySelectorAll('#topology-services tbody tr')].map((r) => ({
               name: r.dataset.name, x: +r.dataset.x, y: +r.dataset.y, w: +r.dataset.w, h: +r.dataset.h }));
             return {boxes, calls: calls.map((c) => [c.source, c.destination, c.mtls])};",
        )
        .await;
    let calls = graph["calls"].as_array().unwrap();
    assert!(calls.contains(&json!(["default/web", "default/reviews", "mtls"])), "{calls:?}");
    assert!(calls.contains(&json!(["(unmeshed)", "default/reviews", "plaintext"])), "{calls:?}");
    let (_, topology) = control.api("GET", "/api/v1/topology", None).await;
    let shown: Vec<&str> = graph["boxes"].as_array().unwrap().iter().map(|b| b["name"].as_str().unwrap()).collect();
    for service in topology["services"].as_array().unwrap() {
        assert!(shown.contains(&service["name"].as_str().unwrap()), "{service} is not drawn: {shown:?}");
    }
    for service in ["default/web", "default/reviews", "default/ratings"] {
        assert!(shown.contains(&service), "{service} is not drawn: {shown:?}");
    }
    let boxes = graph["boxes"].as_array().unwrap();
    for (i, a) in boxes.iter().enumerate() {
        for b in &boxes[i + 1..] {
            let apart_x = (a["x"].as_f64().unwrap() - b["x"].as_f64().unwrap()).abs()
                >= (a["w"].as_f64().unwrap() + b["w"].as_f64().unwrap()) / 2.0;
            let apart_y = (a["y"].as_f64().unwrap() - b["y"].as_f64().unwrap()).abs()
                >= (a["h"].as_f64().unwrap() + b["h"].as_f64().unwrap()) / 2.0;
            assert!(apart_x || apart_y, "{a} and {b} overlap");
        }
    }
    browser.shot("topology").await;

    // A Service that starts failing turns red within a refresh or two.
    reviews_app.set_status(500);
    browser
        .until(
            "reviews to turn red",
            "const row = document.querySelector('#topology-services tr[data-name=\"default/reviews\"]');
             return row && row.dataset.health === 'bad';",
        )
        .await;
    browser.shot("topology-failing").await;
    reviews_app.set_status(200);

    // A viewer can read the configuration but not apply it: the page says so, and the
    // API refuses the session even with its CSRF token.
    browser.open("#/config?kind=Service&namespace=default&name=reviews").await;
    browser
        .until("the Service's YAML", "return document.getElementById('config-editor').value.includes('kind: Service')")
        .await;
    assert_eq!(browser.js("return document.getElementById('config-apply').disabled").await, json!(true));
    let csrf = browser.js("return (async () => (await (await fetch('/api/v1/session')).json()).csrf)();").await;
    let headers = json!({"content-type": "application/json", "x-csrf-token": csrf});
    let body = json!({"sources": [{"name": "x", "text": TO_RATINGS}]}).to_string();
    let (status, answer) = browser.fetch("POST", "/api/v1/apply", headers, &body).await;
    assert_eq!(status, 403, "a viewer's session applied: {answer}");
    assert!(answer["error"].as_str().unwrap().contains("viewer"), "{answer}");
    browser.shot("config-viewer").await;

    // An admin's session: a change without the CSRF token is refused.
    browser.client.find(Locator::Id("logout")).await.unwrap().click().await.unwrap();
    browser.until("the login form again", "return !document.getElementById('login').hidden").await;
    browser.log_in(&control.admin_token()).await;
    browser.until("the admin session", "return document.getElementById('who').textContent.includes('(admin)')").await;
    let (status, answer) =
        browser.fetch("POST", "/api/v1/apply", json!({"content-type": "application/json"}), &body).await;
    assert_eq!(status, 403, "a change without the CSRF token went through: {answer}");
    assert!(answer["error"].as_str().unwrap().contains("CSRF"), "{answer}");

    // The editor: an invalid field is marked on its line and nothing changes; the valid
    // route then changes the live routing.
    let (_, before) = control.api("GET", "/api/v1/status", None).await;
    browser.open("#/config").await;
    browser
        .until(
            "the editor",
            "return document.getElementById('config-new') && !document.getElementById('config-new').disabled",
        )
        .await;
    browser.client.find(Locator::Id("config-new")).await.unwrap().click().await.unwrap();
    let invalid = TO_RATINGS.replace("      port: 80\n", "      port: 80\n      weight: many\n");
    let invalid_line = invalid.lines().position(|line| line.contains("weight: many")).unwrap() + 1;
    browser.js(&format!("const e = document.getElementById('config-editor'); e.value = {invalid:?}; e.dispatchEvent(new Event('input'));")).await;
    browser.client.find(Locator::Id("config-apply")).await.unwrap().click().await.unwrap();
    let marked = browser
        .until(
            "the error's line to be marked",
            "return [...document.querySelectorAll('.gutter .bad')].map((l) => +l.dataset.line);",
        )
        .await;
    assert_eq!(marked, json!([invalid_line]), "the marked lines");
    let listed = browser.js("return document.getElementById('config-messages').textContent").await;
    assert!(listed.as_str().unwrap().contains(&format!("line {invalid_line}")), "{listed}");
    browser.shot("config-invalid").await;
    let (_, after) = control.api("GET", "/api/v1/status", None).await;
    assert_eq!(before["revision"], after["revision"], "a refused apply changed the store");
    browser.js(&format!("const e = document.getElementById('config-editor'); e.value = {TO_RATINGS:?}; e.dispatchEvent(new Event('input'));")).await;
    // A dry run first: the preview names the Services and the proxies the route would
    // reach (web calls reviews, so its view changes; ratings' own does not).
    browser.client.find(Locator::Id("config-dry-run")).await.unwrap().click().await.unwrap();
    let touched = browser
        .until("the preview", "const p = document.getElementById('preview-proxies'); return p && p.textContent;")
        .await;
    let touched = touched.as_str().unwrap();
    assert!(touched.contains("default/web") && !touched.contains("default/ratings"), "{touched}");
    let services = browser.js("return document.getElementById('preview-services').textContent").await;
    assert_eq!(services, "default/ratings, default/reviews");
    browser.shot("config-preview").await;
    browser.client.find(Locator::Id("config-apply")).await.unwrap().click().await.unwrap();
    let outcome = browser
        .until("the apply", "const o = document.getElementById('config-outcome'); return o && o.textContent")
        .await;
    assert!(outcome.as_str().unwrap().starts_with("Applied at store revision"), "{outcome}");
    eventually(Duration::from_secs(15), "reviews' requests to reach ratings", || {
        let http = http.clone();
        async move { (get_via(&http, web.outbound, "reviews", "/", &[]).await.app() == "ratings").then_some(()) }
    })
    .await;
    control.cli(&["delete", "httproute", "reviews-to-ratings"]);

    // Live tap: requests stream in, and a denied one shows the policy that denied it.
    browser.open("#/tap?service=default/reviews&start=1").await;
    browser.until("tapped requests", "return document.querySelectorAll('#tap-requests tbody tr').length").await;
    let denied = eventually(Duration::from_secs(20), "a denied request in the tap", || {
        let http = http.clone();
        let browser = &browser;
        async move {
            let _ = get_via(&http, web.outbound, "reviews", "/admin/users", &[]).await;
            let found = browser
                .js("const row = document.querySelector('#tap-requests tbody tr[data-authz=\"deny\"]');
                     if (!row) return null; row.click(); return document.getElementById('tap-authz').textContent;")
                .await;
            found.as_str().map(str::to_string)
        }
    })
    .await;
    assert!(denied.contains("no-admin"), "the denial's policy: {denied}");
    browser.shot("tap").await;

    // The other pages, for the record; then no page logged an error, and nothing was
    // asked of another origin.
    // A change made from the CLI is a marker on the Service's charts, with its diff;
    // reverting it from the page takes it away again.
    control.apply(BALANCE);
    let (_, history) = control.api("GET", "/api/v1/history?kind=TrafficPolicy&name=reviews-balance", None).await;
    let revision = history["items"][0]["revision"].as_u64().expect("the change in the audit log");
    browser.open("#/service/default/reviews?window=10m").await;
    let points = browser
        .until(
            "charts with data",
            "const c = document.querySelector('#service-charts .chart'); return c && +c.dataset.points;",
        )
        .await;
    assert!(points.as_u64().unwrap() >= 1, "{points}");
    let marker = format!("#service-changes button[data-revision=\"{revision}\"]");
    browser.until("the change's marker", &format!("return document.querySelector({marker:?}) !== null")).await;
    browser.client.find(Locator::Css(&marker)).await.unwrap().click().await.unwrap();
    let diff = browser
        .until("the change's diff", "const d = document.getElementById('change-diff'); return d && d.textContent;")
        .await;
    assert!(diff.as_str().unwrap().contains("+     algorithm: round-robin"), "{diff}");
    browser.until("the service page's tables", "return document.getElementById('service-golden') !== null").await;
    browser.shot("service").await;
    browser.client.find(Locator::Id("revert")).await.unwrap().click().await.unwrap();
    let reverted = browser.until("the revert", "return document.getElementById('revert-result').textContent").await;
    assert!(reverted.as_str().unwrap().starts_with("Reverted"), "{reverted}");
    let (status, _) = control.api("GET", "/api/v1/resources/TrafficPolicy/default/reviews-balance", None).await;
    assert_eq!(status, 404, "the reverted policy is still there");

    // A workload: its identity, its certificate counting down, and the configuration it
    // runs, as the control plane sends it.
    browser.open("#/workload/default/reviews").await;
    let facts = browser
        .until("the workload's facts", "const e = document.getElementById('workload-expires'); return e && e.textContent && document.getElementById('workload-facts').textContent;")
        .await;
    assert!(facts.as_str().unwrap().contains("spiffe://weft.local/ns/default/sa/reviews"), "{facts}");
    let configuration = browser.js("return document.getElementById('workload-configuration').textContent").await;
    assert!(configuration.as_str().unwrap().contains("name: no-admin"), "its view carries its policy: {configuration}");
    browser.shot("workload").await;

    browser.open("#/mesh").await;
    let findings = browser
        .until(
            "weft check's findings",
            "const f = document.getElementById('mesh-findings'); return f && f.textContent;",
        )
        .await;
    assert!(findings.as_str().unwrap().starts_with("ok: 3 proxies"), "{findings}");
    for (name, fragment, ready) in [("services", "#/service", "#services"), ("mesh", "#/mesh", "#mesh-proxies")] {
        browser.open(fragment).await;
        browser.until(&format!("the {name} page"), &format!("return document.querySelector({ready:?}) !== null")).await;
        browser.shot(name).await;
    }
    // The security page: the matrix names the policy that limits who reaches reviews,
    // and the plaintext call is listed.
    browser.open("#/security").await;
    let matrix = browser
        .until("the authorization matrix", "const row = document.querySelector('#authz-matrix tr[data-service=\"default/reviews\"]'); return row && row.textContent;")
        .await;
    assert!(matrix.as_str().unwrap().contains("no-admin"), "the matrix names the policy: {matrix}");
    let plaintext = browser
        .until(
            "the plaintext calls",
            "const t = document.getElementById('plaintext-edges'); return t && t.textContent;",
        )
        .await;
    assert!(plaintext.as_str().unwrap().contains("(unmeshed)"), "{plaintext}");
    browser.shot("security").await;
    let origins = browser
        .js("return performance.getEntriesByType('resource').map((e) => new URL(e.name).origin).concat([location.origin]);")
        .await;
    for origin in origins.as_array().unwrap() {
        assert_eq!(origin, &json!(control.server()), "a request to another origin");
    }
    let errors = browser.console_errors().await;
    assert!(errors.is_empty(), "console errors: {errors:#?}");

    stop.store(true, Ordering::Relaxed);
    let _ = load.await;
    let _ = browser.client.clone().close().await;
}
