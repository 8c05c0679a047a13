//! The control plane on a real etcd: resources survive the control plane, and a second
//! replica on the same etcd (not implemented yet) is refused, not silently diverging.

mod support;

use std::time::Duration;

use support::{eventually, Control, Etcd, TempDir, WEFT};

const MESH: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: reviews}
spec: {selector: {app: reviews}, ports: [{port: 80, protocol: http}]}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: reviews-1}
spec: {labels: {app: reviews}, address: "127.0.0.1:9081"}
"#;

#[tokio::test]
async fn resources_live_in_etcd_and_a_second_replica_is_refused() {
    let dir = TempDir::new("etcd");
    let Some(etcd) = Etcd::start(&dir, "etcd-1").await else { return };
    let store = format!("etcd://{}", etcd.client);
    let mut control = Control::start_on(&dir, "control", &dir.0.join("unused"), &["--store", &store]).await;
    let (ok, out, err) = control.cli_with_stdin(&["apply", "-f", "-"], Some(MESH));
    assert!(ok, "{err}");
    assert!(out.contains("service/reviews created"), "{out}");
    let (_, before, _) = control.cli(&["get", "all", "-o", "yaml"]);
    let (_, status, _) = control.cli(&["get", "services", "-o", "json"]);
    assert!(status.contains("reviews"), "{status}");

    // A second control plane on the same etcd says why it cannot run.
    let second = std::process::Command::new(WEFT)
        .args(["control", "--api-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0", "--store", &store])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success() && err.contains("another weft control plane"), "{err}");

    // The first one dies; a new one on another host (here: another data dir) finds
    // everything in etcd once the dead one's claim lapses.
    control.kill();
    let data = dir.0.join("unused-2");
    let mut attempt = 0;
    let control = eventually(Duration::from_secs(20), "a new control plane to claim etcd", || {
        attempt += 1;
        let (dir, data, store) = (&dir, &data, &store);
        let name = format!("control-2-{attempt}");
        async move {
            match Control::try_start_on(dir, &name, data, &["--store", store]).await {
                Ok(control) => Some(control),
                Err(log) if log.contains("another weft control plane") => None,
                Err(log) => panic!("{log}"),
            }
        }
    })
    .await;
    let (ok, after, err) = control.cli(&["get", "all", "-o", "yaml"]);
    assert!(ok, "{err}");
    assert_eq!(before, after);
}
