//! End-to-end tests of `weft control` and the operator CLI: real processes, the real
//! embedded store on disk, the real `weft apply/get/delete/describe` commands.

mod support;

use serde_json::json;
use support::{Control, TempDir};

const MESH: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: reviews}
spec: {selector: {app: reviews}, ports: [{port: 80, protocol: http}]}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: reviews-v1-a}
spec: {labels: {app: reviews, version: v1}, address: "127.0.0.1:9081", zone: zone-a}
"#;

const CANARY: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews-canary}
spec:
  parentRefs: [{kind: Service, name: reviews, port: 80}]
  rules:
  - backendRefs: [{name: reviews-v1, port: 80, weight: 90}, {name: reviews-v2, port: 80, weight: 10}]
"#;

#[tokio::test]
async fn apply_get_describe_delete_through_the_cli() {
    let dir = TempDir::new("cli");
    let control = Control::start(&dir, "control").await;
    let mesh = dir.write("mesh.yaml", MESH);
    let (ok, out, err) = control.cli(&["apply", "-f", mesh.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(out, "service/reviews created\nworkload/reviews-v1-a created\n");

    // Applying the same again changes nothing; a route to Services that do not exist yet
    // is accepted (order of files never matters) and shown as unresolved.
    let (ok, out, _) = control.cli(&["apply", "-f", mesh.to_str().unwrap()]);
    assert!(ok && out.contains("service/reviews unchanged"), "{out}");
    let (ok, out, err) = control.cli_with_stdin(&["apply", "-f", "-"], Some(CANARY));
    assert!(ok, "{err}");
    assert_eq!(out, "httproute/reviews-canary created\n");

    let (ok, out, _) = control.cli(&["get", "services"]);
    assert!(ok);
    assert!(out.contains("reviews") && out.contains("ports 80/http selector app=reviews"), "{out}");
    let (ok, out, _) = control.cli(&["get", "httproute", "reviews-canary", "-o", "yaml"]);
    assert!(ok);
    assert!(out.contains("kind: HTTPRoute") && out.contains("weight: 90"), "{out}");
    // What `get -o yaml` prints can be applied back unchanged.
    let (ok, again, err) = control.cli_with_stdin(&["apply", "-f", "-"], Some(&out));
    assert!(ok && again.contains("unchanged"), "{again}{err}");

    let (ok, out, err) = control.cli(&["describe", "service", "reviews"]);
    assert!(ok, "{err}");
    assert!(out.contains("HTTPRoute default/reviews-canary"), "{out}");
    assert!(out.contains("127.0.0.1:9081") && out.contains("zone-a"), "{out}");
    assert!(out.contains("Unresolved:") && out.contains("reviews-v2"), "{out}");

    let (ok, out, _) = control.cli(&["delete", "httproute", "reviews-canary", "--dry-run"]);
    assert!(ok && out.contains("deleted (dry run)"), "{out}");
    let (ok, out, _) = control.cli(&["delete", "httproute", "reviews-canary"]);
    assert!(ok && out.contains("httproute/reviews-canary deleted"), "{out}");
    let (ok, _, err) = control.cli(&["delete", "httproute", "reviews-canary"]);
    assert!(!ok && err.contains("not found"), "{err}");
    let (ok, out, _) = control.cli(&["delete", "-f", mesh.to_str().unwrap()]);
    assert!(ok && out.contains("service/reviews deleted") && out.contains("workload/reviews-v1-a deleted"), "{out}");
    let (ok, _, err) = control.cli(&["get", "services"]);
    assert!(ok && err.contains("no services found"), "{err}");
}

#[tokio::test]
async fn a_bad_apply_names_the_field_and_changes_nothing() {
    let dir = TempDir::new("bad-apply");
    let control = Control::start(&dir, "control").await;
    let mesh = dir.write("mesh.yaml", MESH);
    assert!(control.cli(&["apply", "-f", mesh.to_str().unwrap()]).0);
    let (_, before, _) = control.cli(&["get", "all", "-o", "json"]);

    // Two files in one apply: the good one must not land when the other is refused.
    let good = dir.write("a-route.yaml", CANARY);
    let bad = dir.write("b-bad.yaml", &MESH.replace("zone: zone-a", "zone: zone-a, weight: heavy"));
    let (ok, out, err) = control.cli(&["apply", "-f", good.to_str().unwrap(), "-f", bad.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("b-bad.yaml: document 2 (Workload reviews-v1-a), field spec.weight (line 10, column 86)"),
        "{err}"
    );
    assert!(err.contains("nothing was changed"), "{err}");
    // The API gives each error's place as fields too, for an editor to mark the line.
    let text = std::fs::read_to_string(&bad).unwrap();
    let (status, answer) = control.api("POST", "/api/v1/apply?source=b-bad.yaml", Some(&text)).await;
    assert_eq!(status, 422, "{answer}");
    let refused = &answer["errors"][0];
    assert_eq!(
        (&refused["source"], &refused["document"], &refused["field"], &refused["line"], &refused["column"]),
        (&json!("b-bad.yaml"), &json!(2), &json!("spec.weight"), &json!(10), &json!(86)),
        "{answer}"
    );
    let (_, after, _) = control.cli(&["get", "all", "-o", "json"]);
    assert_eq!(before, after);
}

#[tokio::test]
async fn resources_survive_a_control_plane_crash_and_restart() {
    let dir = TempDir::new("restart");
    let mut control = Control::start(&dir, "control").await;
    let mesh = dir.write("mesh.yaml", MESH);
    assert!(control.cli(&["apply", "-f", mesh.to_str().unwrap()]).0);
    let (_, before, _) = control.cli(&["get", "all", "-o", "yaml"]);
    let data_dir = control.data_dir.clone();
    control.kill();

    let control = Control::start_on(&dir, "control-again", &data_dir, &[]).await;
    let (ok, after, err) = control.cli(&["get", "all", "-o", "yaml"]);
    assert!(ok, "{err}");
    assert_eq!(before, after);
    assert!(after.contains("reviews-v1-a"));
}

#[tokio::test]
async fn operator_mistakes_get_clear_messages() {
    let dir = TempDir::new("mistakes");
    let control = Control::start(&dir, "control").await;
    let (ok, _, err) = control.cli(&["get", "pods"]);
    assert!(!ok && err.contains("unknown kind \"pods\""), "{err}");

    // The API port in use: the second control plane says which flag to change.
    let second = std::process::Command::new(support::WEFT)
        .args(["control", "--api-addr", &control.api.to_string(), "--data-dir"])
        .arg(dir.0.join("other"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success() && err.contains("--api-addr"), "{err}");

    // The same data directory twice: refused, naming --data-dir.
    let third = std::process::Command::new(support::WEFT)
        .args(["control", "--api-addr", "127.0.0.1:0", "--data-dir"])
        .arg(&control.data_dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&third.stderr);
    assert!(!third.status.success() && err.contains("--data-dir"), "{err}");

    // No control plane there at all: a port held by a bound socket that never listens.
    let held = tokio::net::TcpSocket::new_v4().unwrap();
    held.bind(([127, 0, 0, 1], 0).into()).unwrap();
    let nobody = held.local_addr().unwrap();
    let server = format!("http://{nobody}");
    let output =
        std::process::Command::new(support::WEFT).args(["get", "services", "--server", &server]).output().unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && err.contains(&format!("cannot reach the control plane at {server}")), "{err}");
}
