//! `weft demo` end to end: the whole demo mesh starts, serves through every hop, takes a
//! canary shift, and stops leaving no process behind.

mod support;

use std::{process::Command, time::Duration};

use support::{client, eventually, get_via, TempDir, WEFT};

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push(cmdline);
            }
        }
    }
    found
}

/// Stops the demo (SIGTERM, as Ctrl-C would) if the test ends early, so that a failed
/// assertion never leaves a whole demo mesh running.
/// On a failure it first prints the logs of the demo and of every process it started, so
/// that a failure in CI explains itself.
struct DemoGuard(Option<std::process::Child>, Vec<std::path::PathBuf>);

impl Drop for DemoGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut logs = self.1.clone();
            if let Some(demo) = &self.0 {
                let dir = std::env::temp_dir().join(format!("weft-demo-{}", demo.id()));
                logs.extend(std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()));
            }
            for path in logs.iter().filter(|p| p.extension().is_some_and(|e| e == "log")) {
                let log = std::fs::read_to_string(path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(60).collect();
                eprintln!("--- {}, last 60 lines ---", path.display());
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        if let Some(mut demo) = self.0.take() {
            let _ = Command::new("kill").args(["-TERM", &demo.id().to_string()]).status();
            let _ = demo.wait();
        }
    }
}

/// Starts `weft demo` on ephemeral ports with the contexts file `contexts`.
fn spawn_demo(dir: &TempDir, ports_file: &std::path::Path, extra: &[&str]) -> std::process::Child {
    let log = dir.0.join("demo.log");
    Command::new(WEFT)
        .args(["demo", "--api-addr", "127.0.0.1:0", "--entry-addr", "127.0.0.1:0", "--ports-file"])
        .arg(ports_file)
        .args(extra)
        .env("RUST_LOG", "info,weft_proxy=debug")
        .env("WEFT_CONFIG", dir.0.join("weft-config.yaml"))
        .stdout(std::fs::File::create(dir.0.join("demo.out")).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap()
}

/// Waits (bounded) for `demo` to exit: its status.
async fn exit_of(demo: std::process::Child) -> std::process::ExitStatus {
    let mut demo = demo;
    eventually(Duration::from_secs(30), "the demo to exit", || {
        let status = demo.try_wait().unwrap();
        async move { status }
    })
    .await
}

#[tokio::test]
async fn ctrl_c_stops_the_demo_at_any_moment_while_it_starts() {
    let dir = TempDir::new("demo-interrupted");
    for wait_for in [None, Some("control.ports.json"), Some("ratings-v1-app.ports.json")] {
        let demo = spawn_demo(&dir, &dir.0.join("demo.ports.json"), &[]);
        let demo_dir = std::env::temp_dir().join(format!("weft-demo-{}", demo.id()));
        if let Some(file) = wait_for {
            // Mid-start: once that part has come up.
            eventually(Duration::from_secs(30), file, || {
                let there = demo_dir.join(file).exists();
                async move { there.then_some(()) }
            })
            .await;
        }
        let id = demo.id().to_string();
        assert!(Command::new("kill").args(["-INT", &id]).status().unwrap().success());
        let status = exit_of(demo).await;
        // Before the handler is installed (the first milliseconds of the process, before
        // it has started anything), Ctrl-C ends it the default way.
        use std::os::unix::process::ExitStatusExt;
        let interrupted_early = wait_for.is_none() && status.signal() == Some(2);
        assert!(status.success() || interrupted_early, "Ctrl-C after {wait_for:?}: {status}");
        let left = processes_mentioning(&format!("weft-demo-{id}"));
        assert!(left.is_empty(), "processes left running after Ctrl-C after {wait_for:?}: {left:?}");
    }
}

#[tokio::test]
async fn a_part_that_fails_stops_the_demo_at_once_and_is_named() {
    let dir = TempDir::new("demo-failing");
    // A port already taken: the control plane cannot start, and the demo says so.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let log = dir.0.join("taken.log");
    let output = Command::new(WEFT)
        .args(["demo", "--api-addr", &address, "--entry-addr", "127.0.0.1:0"])
        .env("WEFT_CONFIG", dir.0.join("weft-config.yaml"))
        .stderr(std::fs::File::create(&log).unwrap())
        .output()
        .unwrap();
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(!output.status.success(), "{err}");
    assert!(
        err.contains(&format!("the control plane (--api-addr {address}) exited")) && err.contains("in use"),
        "{err}"
    );

    // A part that dies while the demo runs: everything stops, naming it.
    let ports_file = dir.0.join("demo.ports.json");
    let demo = spawn_demo(&dir, &ports_file, &[]);
    let id = demo.id().to_string();
    let mut guard = DemoGuard(Some(demo), vec![dir.0.join("demo.log")]);
    eventually(Duration::from_secs(60), "the demo to serve", || {
        let there = ports_file.exists();
        async move { there.then_some(()) }
    })
    .await;
    let ratings = processes_mentioning(&format!("weft-demo-{id}/ratings-v1-app.ports.json"));
    assert_eq!(ratings.len(), 1, "{ratings:?}");
    let pid = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .find(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                String::from_utf8_lossy(&c).contains(&format!("weft-demo-{id}/ratings-v1-app.ports.json"))
            })
        })
        .unwrap()
        .file_name();
    assert!(Command::new("kill").args(["-KILL", pid.to_str().unwrap()]).status().unwrap().success());
    let status = exit_of(guard.0.take().unwrap()).await;
    let log = std::fs::read_to_string(dir.0.join("demo.log")).unwrap();
    assert!(!status.success(), "{status}");
    assert!(log.contains("ratings-v1-app exited"), "{log}");
    let left = processes_mentioning(&format!("weft-demo-{id}"));
    assert!(left.is_empty(), "processes left running: {left:?}");
}

#[tokio::test]
async fn the_demo_serves_through_every_hop_and_stops_cleanly() {
    let dir = TempDir::new("demo");
    let ports_file = dir.0.join("demo.ports.json");
    // The operator's own current context, which the demo replaces while it runs.
    let contexts = dir.0.join("weft-config.yaml");
    std::fs::write(&contexts, "current: mine\ncontexts:\n- {name: mine, server: 'https://10.254.0.9:15080'}\n")
        .unwrap();
    let log = dir.0.join("demo.log");
    let demo = spawn_demo(&dir, &ports_file, &[]);
    let demo_dir = format!("weft-demo-{}", demo.id());
    let mut guard = DemoGuard(Some(demo), vec![log]);
    let ports: serde_json::Value = eventually(Duration::from_secs(60), "the demo to serve", || {
        let text = std::fs::read_to_string(&ports_file).ok();
        async move { text.and_then(|t| serde_json::from_str(&t).ok()) }
    })
    .await;
    let entry = ports["entry"].as_str().unwrap().parse().unwrap();
    let server = ports["server"].as_str().unwrap().to_string();

    // A request crosses web, catalog, reviews, ratings and inventory.
    let http = client();
    let answer = eventually(Duration::from_secs(10), "a full-chain answer", || {
        let http = http.clone();
        async move {
            let answer = get_via(&http, entry, "web", "/", &[]).await;
            if answer.status != 200 {
                eprintln!(
                    "not yet: {} {:?} {}",
                    answer.status,
                    answer.weft_error(),
                    String::from_utf8_lossy(&answer.body)
                );
            }
            (answer.status == 200).then_some(answer)
        }
    })
    .await;
    let body = String::from_utf8_lossy(&answer.body).into_owned();
    for hop in ["web-v1", "catalog-v1", "ratings-v1", "inventory-v1"] {
        assert!(body.contains(hop), "{hop} missing from {body}");
    }
    // The canary header always reaches reviews v2 (the demo apps pass it on).
    let canary = eventually(Duration::from_secs(10), "a canary answer", || {
        let http = http.clone();
        async move {
            let answer = get_via(&http, entry, "web", "/", &[("x-canary", "true")]).await;
            (answer.status == 200).then_some(answer)
        }
    })
    .await;
    let body = String::from_utf8_lossy(&canary.body).into_owned();
    assert!(body.contains("reviews-v2") && !body.contains("reviews-v1"), "{body}");

    // No exports: the demo's context is current while it runs.
    let cli = |args: &[&str]| {
        let output = Command::new(WEFT)
            .args(args)
            .env_remove("WEFT_SERVER")
            .env_remove("WEFT_TOKEN_FILE")
            .env("WEFT_CONFIG", &contexts)
            .output()
            .unwrap();
        (output.status.success(), String::from_utf8_lossy(&output.stdout).into_owned())
    };
    let (_, listed) = cli(&["context", "list"]);
    assert!(listed.lines().any(|l| l.starts_with('*') && l.contains("demo") && l.contains(&server)), "{listed}");
    let (ok, services) = cli(&["get", "services"]);
    assert!(ok && services.lines().count() == 8, "{services}");
    let (ok, proxies) = cli(&["get", "proxies"]);
    assert!(ok && proxies.lines().count() == 8, "{proxies}");
    // Its traffic shows in the golden signals of every Service of the chain, and as
    // mutual-TLS edges.
    eventually(Duration::from_secs(30), "the demo's traffic in weft stat", || {
        let (ok, services) = cli(&["stat", "services", "-o", "json"]);
        let (_, edges) = cli(&["stat", "edges"]);
        async move {
            let answer: serde_json::Value = serde_json::from_str(&services).ok().filter(|_| ok)?;
            let busy = answer["rows"]
                .as_array()?
                .iter()
                .filter(|row| row["requests"].as_u64() > Some(0))
                .filter_map(|row| row["name"].as_str())
                .collect::<Vec<_>>();
            let chain = ["web", "catalog", "reviews", "ratings", "inventory"].iter().all(|s| busy.contains(s));
            (chain && edges.contains("default/catalog") && edges.contains("yes")).then_some(())
        }
    })
    .await;
    let canary_file = format!("{}/canary-50.yaml", std::env::temp_dir().join(&demo_dir).display());
    let (ok, applied) = cli(&["apply", "-f", &canary_file]);
    assert!(ok && applied.contains("httproute/reviews-canary configured"), "{applied}");

    // SIGTERM (as Ctrl-C would): everything stops, nothing is left.
    let mut demo = guard.0.take().unwrap();
    assert!(Command::new("kill").args(["-TERM", &demo.id().to_string()]).status().unwrap().success());
    let status = tokio::task::spawn_blocking(move || demo.wait().unwrap()).await.unwrap();
    assert!(status.success(), "{status}");
    let left = processes_mentioning(&demo_dir);
    assert!(left.is_empty(), "processes left running: {left:?}");
    // And the operator's context is current again.
    let restored = std::fs::read_to_string(&contexts).unwrap();
    assert!(restored.contains("current: mine") && !restored.contains("demo"), "{restored}");
}
