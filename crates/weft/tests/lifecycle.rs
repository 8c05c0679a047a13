//! `weft proxy ... -- APP`: the application starts only once the proxy serves, the proxy
//! exits with the application's exit code, and on SIGTERM the application is stopped
//! first while the outbound listener still serves its last calls.

mod support;

use std::{process::Command, time::Duration};

use support::{eventually, mesh_yaml, TempDir, TestApp, WEFT};

#[tokio::test]
async fn the_app_starts_after_the_proxy_is_ready_and_its_exit_code_is_kept() {
    let dir = TempDir::new("app-exit");
    let upstream = TestApp::start("reviews").await;
    let config = dir.write(
        "mesh.yaml",
        &mesh_yaml(&[("reviews", "app: reviews")], &[("r1", "app: reviews", upstream.address)], ""),
    );
    let out = dir.0.join("answer");
    // The app's very first action is a call through the proxy (found through the
    // HTTP_PROXY the proxy sets): it must find the proxy serving.
    let script = format!("curl -s http://reviews/ > {}; exit 3", out.display());
    let mut command = Command::new(WEFT);
    command
        .args([
            "proxy",
            "--config",
            config.to_str().unwrap(),
            "--outbound-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .args(["--log", "warn", "--", "sh", "-c", &script]);
    // Waited for off this runtime: the upstream app runs on it.
    let status = tokio::task::spawn_blocking(move || command.status().unwrap()).await.unwrap();
    assert_eq!(status.code(), Some(3));
    let answer = std::fs::read_to_string(&out).unwrap();
    assert!(answer.contains("reviews"), "{answer:?}");
}

#[tokio::test]
async fn on_sigterm_the_app_stops_first_and_can_still_call_out() {
    let dir = TempDir::new("app-stop");
    let upstream = TestApp::start("reviews").await;
    let config = dir.write(
        "mesh.yaml",
        &mesh_yaml(&[("reviews", "app: reviews")], &[("r1", "app: reviews", upstream.address)], ""),
    );
    let started = dir.0.join("started");
    let last_call = dir.0.join("last-call");
    // On SIGTERM the app makes one more call through the proxy, then exits cleanly.
    let script = format!(
        "trap 'curl -s http://reviews/ > {last}; exit 0' TERM; touch {started}; \
         while true; do sleep 0.05; done",
        last = last_call.display(),
        started = started.display()
    );
    let mut proxy = Command::new(WEFT)
        .args([
            "proxy",
            "--config",
            config.to_str().unwrap(),
            "--outbound-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .args(["--log", "warn", "--", "sh", "-c", &script])
        .spawn()
        .unwrap();
    let started_path = started.clone();
    eventually(Duration::from_secs(10), "the app to start", || {
        let exists = started_path.exists();
        async move { exists.then_some(()) }
    })
    .await;
    let pid = proxy.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = tokio::task::spawn_blocking(move || proxy.wait().unwrap()).await.unwrap();
    assert_eq!(status.code(), Some(0));
    let answer = std::fs::read_to_string(&last_call).unwrap_or_default();
    assert!(answer.contains("reviews"), "the app's last call did not get through: {answer:?}");
}
