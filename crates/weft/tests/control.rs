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

/// The virtual IP `weft describe service NAME` shows, once the control plane gave one.
async fn virtual_ip(control: &Control, name: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, described, _) = control.cli(&["describe", "service", name]);
        if let Some(line) = described.lines().find_map(|l| l.strip_prefix("Virtual IP:")) {
            return line.trim().to_string();
        }
        assert!(std::time::Instant::now() < deadline, "{name} never got a virtual IP:\n{described}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_service_keeps_its_virtual_ip_whatever_comes_and_goes() {
    use std::collections::BTreeMap;
    use weft_model::virtual_ip::{assign, VirtualIpRange};
    // A small range, so that names meet often.
    let range: VirtualIpRange = "10.96.0.0/28".parse().unwrap();
    let alone = |name: &str| {
        let key = ("default".to_string(), name.to_string());
        assign(&[(key.clone(), None)].into(), &BTreeMap::new(), range).0[&key].to_string()
    };
    let service = |name: &str| {
        format!(
            "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\n\
             spec: {{selector: {{app: {name}}}, ports: [{{port: 80}}]}}\n"
        )
    };
    let dir = TempDir::new("virtual-ips");
    let mut control = Control::start(&dir, "control").await;
    control.apply(&format!(
        "apiVersion: weft.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: mesh}}\n\
         spec: {{virtualIPRange: {range}}}\n---\n{}",
        service("b")
    ));
    let address = virtual_ip(&control, "b").await;
    assert_eq!(address, alone("b"));
    // A newcomer that sorts first and whose name derives b's address: b keeps it (it is
    // stored), the newcomer gets another.
    let newcomer = (0..10_000).map(|i| format!("a{i}")).find(|name| alone(name) == address).unwrap();
    control.apply(&service(&newcomer));
    let newcomers = virtual_ip(&control, &newcomer).await;
    assert_ne!(newcomers, address);
    assert_eq!(virtual_ip(&control, "b").await, address);
    // The same after a crash and restart.
    let data_dir = control.data_dir.clone();
    control.kill();
    let control = Control::start_on(&dir, "control-again", &data_dir, &[]).await;
    assert_eq!(virtual_ip(&control, "b").await, address);
    assert_eq!(virtual_ip(&control, &newcomer).await, newcomers);
    // A deleted Service's address is released: the next Service whose name derives it
    // gets it; the others keep theirs.
    let (ok, _, err) = control.cli(&["delete", "service", "b"]);
    assert!(ok, "{err}");
    let heir = (0..10_000).map(|i| format!("z{i}")).find(|name| alone(name) == address).unwrap();
    control.apply(&service(&heir));
    assert_eq!(virtual_ip(&control, &heir).await, address);
    assert_eq!(virtual_ip(&control, &newcomer).await, newcomers);
}
