//! The control-plane API's security model, end to end: every call needs an operator
//! token with a role, refusals say why, bad tokens are rate-limited; the API is HTTPS
//! (the mesh CA's certificate or the operator's) and the CLI verifies it with nothing but
//! its token, across root rotations; contexts; the audit log.

mod support;

use std::process::Command;

use serde_json::Value;
use support::{api_request, eventually, Control, TempDir, WEFT};

/// Runs the CLI with only `env` set (no server, token or contexts of the test's control
/// plane unless given): (success, stdout, stderr).
fn weft(args: &[&str], env: &[(&str, &str)], contexts: &std::path::Path) -> (bool, String, String) {
    let mut command = Command::new(WEFT);
    command.args(args).env("WEFT_CONFIG", contexts);
    for name in ["WEFT_SERVER", "WEFT_TOKEN", "WEFT_TOKEN_FILE", "WEFT_CA_FILE", "WEFT_CONTEXT"] {
        command.env_remove(name);
    }
    // Not the default data directory of whoever runs the tests.
    command.env("XDG_DATA_HOME", contexts.parent().unwrap().join("no-data"));
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

const SERVICE: &str =
    "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: reviews}\nspec: {selector: {app: reviews}, ports: [{port: 80, protocol: http}]}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_needs_an_operator_token_of_the_right_role_and_refusals_say_why() {
    let dir = TempDir::new("api-tokens");
    let control = Control::start(&dir, "control").await;
    let server = control.server();
    assert!(server.starts_with("https://"), "{server}");
    let contexts = dir.0.join("contexts.yaml");
    let admin = control.admin_token();
    assert!(admin.starts_with("wo1."), "the first admin token is an operator token: {admin}");
    let log = std::fs::read_to_string(&control.log).unwrap();
    assert!(log.contains("admin-token") && !log.contains(&admin), "the path is logged, never the token");

    // Without a token only liveness answers; reads need one too.
    let (status, body) =
        api_request(&server, None, "GET", "/api/v1/live", None, Some(admin.split('.').nth(3).unwrap())).await.unwrap();
    assert_eq!((status, body["live"].clone()), (200, Value::Bool(true)));
    let root = admin.split('.').nth(3).unwrap().to_string();
    let (status, body) = api_request(&server, None, "GET", "/api/v1/resources", None, Some(&root)).await.unwrap();
    assert_eq!(status, 401, "{body}");
    assert!(body["error"].as_str().unwrap().contains("needs an operator token"), "{body}");

    // Roles: a viewer reads, an admin changes.
    let as_admin = [("WEFT_SERVER", server.as_str()), ("WEFT_TOKEN", admin.as_str())];
    let (ok, viewer, err) = weft(&["token", "create", "--role", "viewer", "--name", "dashboard"], &as_admin, &contexts);
    assert!(ok && err.contains("viewer token") && err.contains("dashboard"), "{err}");
    let viewer = viewer.trim().to_string();
    assert!(viewer.starts_with("wo1.") && viewer.ends_with(&root), "{viewer}");
    let as_viewer = [("WEFT_SERVER", server.as_str()), ("WEFT_TOKEN", viewer.as_str())];
    let (ok, _, err) = weft(&["get", "services"], &as_viewer, &contexts);
    assert!(ok, "a viewer reads: {err}");
    let service_file = dir.write("reviews.yaml", SERVICE);
    let (ok, _, err) = weft(&["apply", "-f", service_file.to_str().unwrap()], &as_viewer, &contexts);
    assert!(!ok && err.contains("has the role viewer; this call needs admin"), "{err}");
    let (ok, out, err) = weft(&["apply", "-f", service_file.to_str().unwrap()], &as_admin, &contexts);
    assert!(ok && out.contains("service/reviews created"), "{out}{err}");
    let (ok, _, err) = weft(&["token", "list"], &as_viewer, &contexts);
    assert!(!ok && err.contains("needs admin"), "tokens are the admin's business: {err}");
    // Join and operator tokens exclude each other and list together.
    let (ok, _, err) = weft(&["token", "create", "--service", "reviews", "--role", "admin"], &as_admin, &contexts);
    assert!(!ok && err.contains("cannot be used with"), "{err}");
    let (ok, join, _) = weft(&["token", "create", "--service", "reviews"], &as_admin, &contexts);
    assert!(ok && join.starts_with("wj1."), "{join}");
    let (ok, listed, _) = weft(&["token", "list"], &as_admin, &contexts);
    assert!(ok && listed.starts_with("KIND"), "{listed}");
    assert!(
        listed.lines().any(|l| l.starts_with("operator") && l.contains("viewer") && l.contains("dashboard")),
        "{listed}"
    );
    assert!(listed.lines().any(|l| l.starts_with("join") && l.contains("sa/reviews")), "{listed}");

    // Every refusal says why.
    let refusal = |token: String| {
        let (contexts, server) = (contexts.clone(), server.clone());
        move || {
            let (ok, _, err) =
                weft(&["get", "services"], &[("WEFT_SERVER", &server), ("WEFT_TOKEN", &token)], &contexts);
            if ok {
                String::new()
            } else {
                err
            }
        }
    };
    let secret = viewer.split('.').nth(2).unwrap();
    assert!(refusal(viewer.replace(secret, &"0".repeat(64)))().contains("not known to this mesh"));
    assert!(refusal(join.trim().to_string())().contains("join token"));
    let (_, short, _) = weft(&["token", "create", "--role", "viewer", "--ttl", "1s"], &as_admin, &contexts);
    let short = short.trim().to_string();
    eventually(std::time::Duration::from_secs(10), "the short token to expire", || {
        let expired = refusal(short.clone())().contains("has expired");
        async move { expired.then_some(()) }
    })
    .await;
    let id = viewer.split('.').nth(1).unwrap();
    let (ok, out, _) = weft(&["token", "revoke", id], &as_admin, &contexts);
    assert!(ok && out.contains("viewer token") && out.contains("revoked"), "{out}");
    assert!(refusal(viewer.clone())().contains("revoked"));

    // A control plane of another mesh: the CLI will not even talk to it with our token,
    // and our control plane names another mesh's token as such.
    let other = Control::start(&dir, "other").await;
    let (ok, _, err) =
        weft(&["get", "services"], &[("WEFT_SERVER", &other.server()), ("WEFT_TOKEN", &admin)], &contexts);
    assert!(!ok && err.contains("belongs to another mesh"), "{err}");
    let (status, body) =
        api_request(&server, Some(&other.admin_token()), "GET", "/api/v1/resources", None, Some(&root)).await.unwrap();
    assert_eq!(status, 401);
    assert!(body["error"].as_str().unwrap().contains("another mesh"), "{body}");

    // Guessing: after ten bad tokens from one address, it is refused outright for a
    // while, even with a good token; the log says so once.
    for _ in 0..12 {
        let _ = api_request(&server, Some(&format!("wo1.x.guess.{root}")), "GET", "/api/v1/status", None, None).await;
    }
    let (status, body) = api_request(&server, Some(&admin), "GET", "/api/v1/status", None, None).await.unwrap();
    assert_eq!(status, 429, "{body}");
    assert!(body["error"].as_str().unwrap().contains("too many bad operator tokens"), "{body}");
    let log = std::fs::read_to_string(&control.log).unwrap();
    assert_eq!(log.matches("too many bad operator tokens").count(), 1, "logged once");
}

/// `openssl` in `dir`; its stdout.
fn openssl(dir: &TempDir, args: &[&str]) -> String {
    let output = Command::new("openssl").args(args).current_dir(&dir.0).output().expect("openssl runs");
    assert!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_is_https_with_the_mesh_cas_certificate_or_the_operators() {
    let dir = TempDir::new("api-https");
    let contexts = dir.0.join("contexts.yaml");
    let control = Control::start_on(&dir, "control", &dir.0.join("data"), &["--api-san", "control.example"]).await;
    // The mesh CA's certificate names the control plane's SPIFFE ID and the API's names.
    let output = Command::new("openssl")
        .args(["s_client", "-connect", &control.api.to_string(), "-alpn", "http/1.1", "-tls1_3"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&output.stdout).into_owned();
    let leaf = dir.write(
        "leaf.pem",
        &shown
            [shown.find("-----BEGIN CERTIFICATE-----").unwrap()..shown.find("-----END CERTIFICATE-----").unwrap() + 25],
    );
    let names = openssl(&dir, &["x509", "-in", leaf.to_str().unwrap(), "-noout", "-ext", "subjectAltName"]);
    for name in [
        "URI:spiffe://weft.local/ns/weft-system/sa/weft-control",
        "DNS:control.example",
        "IP Address:127.0.0.1",
        "DNS:localhost",
    ] {
        assert!(names.contains(name), "{name} missing: {names}");
    }
    // Plain HTTP beyond loopback is refused at start, naming the flag.
    let refused =
        Control::try_start_on(&dir, "plain", &dir.0.join("plain"), &["--api-http", "--api-addr", "0.0.0.0:0"]).await;
    let log = refused.err().expect("plain HTTP on every interface is refused");
    assert!(log.contains("--api-http") && log.contains("in the clear"), "{log}");
    // The CLI refuses to send a token in plain HTTP beyond loopback, too.
    let (ok, _, err) = weft(
        &["get", "services"],
        &[("WEFT_SERVER", "http://10.254.0.1:15080"), ("WEFT_TOKEN", &control.admin_token())],
        &contexts,
    );
    assert!(!ok && err.contains("in the clear"), "{err}");

    // The operator's own certificate: browsers and the CLI trust it through --ca-file.
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-subj",
            "/CN=Operator CA",
            "-days",
            "2",
        ],
    );
    std::fs::write(dir.0.join("san.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
        .unwrap();
    openssl(
        &dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "api.key",
            "-out",
            "api.csr",
            "-subj",
            "/CN=weft api",
        ],
    );
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "api.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "api.crt",
            "-days",
            "1",
            "-extfile",
            "san.ext",
        ],
    );
    let cert = dir.0.join("api.crt").display().to_string();
    let key = dir.0.join("api.key").display().to_string();
    let ours = Control::start_on(&dir, "ours", &dir.0.join("ours"), &["--api-cert", &cert, "--api-key", &key]).await;
    let token = ours.admin_token();
    let ca_file = dir.0.join("ca.crt").display().to_string();
    let env = [("WEFT_SERVER", ours.server()), ("WEFT_TOKEN", token.clone())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (ok, _, err) = weft(&["get", "services", "--ca-file", &ca_file], &env, &contexts);
    assert!(ok, "{err}");
    let (ok, _, err) = weft(&["get", "services"], &env, &contexts);
    assert!(!ok && err.contains("--ca-file"), "without the operator's CA: {err}");
    let curl = support::curl(&[
        "-s",
        "--cacert",
        &ca_file,
        "-H",
        &format!("Authorization: Bearer {token}"),
        &format!("{}/api/v1/status", ours.server()),
    ]);
    assert!(curl.0 && curl.1.contains("trustDomain"), "curl trusts it through the operator's PKI: {curl:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_token_keeps_working_across_a_root_rotation_and_contexts_pick_the_server() {
    let dir = TempDir::new("api-rotation");
    let contexts = dir.0.join("contexts.yaml");
    let control = Control::start(&dir, "control").await;
    let token_file = dir.write("viewer.token", &{
        let (ok, token, err) = control.cli(&["token", "create", "--role", "viewer"]);
        assert!(ok, "{err}");
        token
    });
    let token_path = token_file.display().to_string();

    // A context: no flags, no exports.
    let (ok, _, err) =
        weft(&["context", "set", "local", "--server", &control.server(), "--token-file", &token_path], &[], &contexts);
    assert!(ok && err.contains("(current)"), "{err}");
    let (ok, _, err) = weft(
        &["context", "set", "elsewhere", "--server", "https://127.0.0.1:1", "--token-file", &token_path],
        &[],
        &contexts,
    );
    assert!(ok, "{err}");
    let (ok, listed, _) = weft(&["context", "list"], &[], &contexts);
    assert!(ok && listed.lines().any(|l| l.starts_with('*') && l.contains("local")), "{listed}");
    let (ok, _, err) = weft(&["get", "services"], &[], &contexts);
    assert!(ok, "the current context is used: {err}");
    weft(&["context", "use", "elsewhere"], &[], &contexts);
    let (ok, _, err) = weft(&["get", "services"], &[], &contexts);
    assert!(!ok && err.contains("cannot reach the control plane at https://127.0.0.1:1"), "{err}");
    let (ok, _, err) = weft(&["get", "services", "--context", "local"], &[], &contexts);
    assert!(ok, "{err}");
    weft(&["context", "use", "local"], &[], &contexts);

    // The root rotates, then the rotation finishes: the token made before keeps working.
    let (ok, _, err) = control.cli(&["ca", "rotate"]);
    assert!(ok, "{err}");
    let (ok, _, err) = weft(&["get", "services"], &[], &contexts);
    assert!(ok, "during the rotation: {err}");
    let (ok, _, err) = control.cli(&["ca", "finish-rotation", "--force"]);
    assert!(ok, "{err}");
    let (ok, _, err) = weft(&["get", "proxies"], &[], &contexts);
    assert!(ok, "after the rotation: {err}");
    // And a token made now names the new root.
    let (ok, fresh, _) = control.cli(&["token", "create", "--role", "viewer"]);
    let (_, status) = control.api("GET", "/api/v1/status", None).await;
    assert!(ok && fresh.trim().ends_with(status["caRoot"].as_str().unwrap()), "{fresh}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_is_in_the_audit_log_with_who_made_it() {
    let dir = TempDir::new("api-audit");
    let control = Control::start(&dir, "control").await;
    let (ok, _, err) = control.cli_with_stdin(&["apply", "-f", "-"], Some(SERVICE));
    assert!(ok, "{err}");
    let changed = SERVICE.replace("port: 80", "port: 8080");
    let (ok, _, err) = control.cli_with_stdin(&["apply", "-f", "-"], Some(&changed));
    assert!(ok, "{err}");
    let (ok, _, err) = control.cli_with_stdin(&["apply", "-f", "-"], Some(&changed));
    assert!(ok, "an unchanged apply: {err}");
    let (ok, _, err) = control.cli(&["delete", "service", "reviews"]);
    assert!(ok, "{err}");
    let (ok, _, err) = control.cli(&["token", "create", "--role", "viewer", "--name", "grafana"]);
    assert!(ok, "{err}");
    let (ok, _, err) = control.cli(&["ca", "rotate"]);
    assert!(ok, "{err}");

    let (ok, out, err) = control.cli(&["history", "service", "reviews", "-o", "json"]);
    assert!(ok, "{err}");
    let answer: Value = serde_json::from_str(&out).unwrap();
    let entries = answer["items"].as_array().unwrap();
    let actions: Vec<&str> = entries.iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["apply", "apply", "delete"], "no entry for the unchanged apply: {answer}");
    assert!(entries[0]["before"].is_null() && entries[0]["after"]["spec"]["ports"][0]["port"] == 80);
    assert!(
        entries[1]["before"]["spec"]["ports"][0]["port"] == 80
            && entries[1]["after"]["spec"]["ports"][0]["port"] == 8080
    );
    assert!(entries[2]["before"]["spec"]["ports"][0]["port"] == 8080 && entries[2]["after"].is_null());
    let revisions: Vec<u64> = entries.iter().map(|e| e["revision"].as_u64().unwrap()).collect();
    assert!(revisions.windows(2).all(|w| w[0] < w[1]), "{revisions:?}");
    for entry in entries {
        assert_eq!(entry["operator"]["tokenId"], "initial-admin");
        assert_eq!(entry["operator"]["role"], "admin");
        assert!(entry["time"].as_u64().unwrap() > 1_700_000_000);
    }
    // The store revision of the apply is the entry's: `weft get` agrees.
    let (_, after_second) = control.api("GET", "/api/v1/history?kind=service&name=reviews", None).await;
    assert_eq!(after_second["items"][1]["revision"], entries[1]["revision"]);

    let (ok, table, _) = control.cli(&["history"]);
    assert!(ok && table.starts_with("TIME"), "{table}");
    for action in ["token.create", "ca.rotate"] {
        assert!(table.contains(action), "{action}: {table}");
    }
    let (_, tokens) = control.api("GET", "/api/v1/history?kind=OperatorToken", None).await;
    let token = &tokens["items"][0]["after"];
    assert!(token["name"] == "grafana" && token.get("secretSha256").is_none(), "no secret hashes: {token}");
}
