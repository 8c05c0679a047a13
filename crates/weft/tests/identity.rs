//! The control plane as the mesh's certificate authority: it makes a root at first start
//! and keeps it, never shows it through the API, fixes the trust domain, and takes an
//! operator's CA instead when given one.

mod support;

use std::{process::Command, time::Duration};

use serde_json::Value;
use support::{eventually, Control, Proxy, TempDir, TestApp, WEFT};

async fn status(control: &Control) -> Value {
    control.api("GET", "/api/v1/status", None).await.1
}

fn openssl(dir: &TempDir, args: &[&str]) -> Vec<u8> {
    let output = Command::new("openssl").args(args).current_dir(&dir.0).output().expect("openssl runs");
    assert!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    output.stdout
}

#[tokio::test]
async fn the_ca_is_made_once_kept_secret_and_fixes_the_trust_domain() {
    let dir = TempDir::new("identity-ca");
    let data = dir.0.join("data");
    let mut control = Control::start_on(&dir, "control", &data, &[]).await;
    let first = status(&control).await;
    assert_eq!(first["trustDomain"], "weft.local");
    let root = first["caRoot"].as_str().unwrap().to_string();
    assert_eq!(root.len(), 64, "a SHA-256, hex: {root}");

    // Nothing of it is served as a resource.
    let (ok, out, _) = control.cli(&["get", "all", "-o", "yaml"]);
    assert!(ok && !out.contains("CertificateAuthority") && !out.contains("PRIVATE"), "{out}");
    let (_, body) = control.api("GET", "/api/v1/resources", None).await;
    assert!(!body.to_string().contains("PRIVATE"));

    // A restart signs with the same root; a different trust domain is refused.
    control.kill();
    let control = Control::start_on(&dir, "control-2", &data, &[]).await;
    assert_eq!(status(&control).await["caRoot"], root.as_str());
    drop(control);
    let refused = Control::try_start_on(&dir, "control-3", &data, &["--trust-domain", "other.org"]).await;
    let log = refused.err().expect("another trust domain is refused");
    assert!(log.contains("fixed when the CA is made"), "{log}");
}

// Multi-threaded: openssl blocks a thread while the test's app serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_ca_is_used_instead_of_a_generated_root() {
    let dir = TempDir::new("identity-operator-ca");
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(
        &dir,
        &[
            &["req", "-x509"][..],
            &ec[..],
            &["-keyout", "ca.key", "-out", "ca.crt", "-days", "30", "-subj", "/O=example/CN=example mesh CA"],
            &["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ]
        .concat(),
    );
    let der = openssl(&dir, &["x509", "-in", "ca.crt", "-outform", "der"]);
    let expected = String::from_utf8_lossy(&openssl_stdin(&dir, &["dgst", "-sha256", "-r"], &der)).to_string();
    let expected = expected.split_whitespace().next().unwrap().to_string();

    let (cert, key) = (dir.0.join("ca.crt").display().to_string(), dir.0.join("ca.key").display().to_string());
    let control =
        Control::start_on(&dir, "control", &dir.0.join("data"), &["--ca-cert", &cert, "--ca-key", &key]).await;
    assert_eq!(status(&control).await["caRoot"], expected.as_str());

    // A peer outside weft holding a certificate of this CA for a mesh identity is served
    // by a meshed workload (the operator's own tooling, say); once that certificate has
    // expired it is refused.
    let app = TestApp::start("reviews").await;
    let app_addr = app.address.to_string();
    let reviews =
        Proxy::start_controlled(&dir, "reviews", &control, &["--service", "reviews", "--app-addr", &app_addr]).await;
    openssl(&dir, &[&["req"][..], &ec[..], &["-keyout", "web.key", "-out", "web.csr", "-subj", "/O=example"]].concat());
    let extensions =
        "subjectAltName=critical,URI:spiffe://weft.local/ns/default/sa/web\nbasicConstraints=critical,CA:FALSE\n\
                      keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n";
    std::fs::write(dir.0.join("web.ext"), extensions).unwrap();
    openssl(
        &dir,
        &["x509", "-req", "-in", "web.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1"]
            .into_iter()
            .chain(["-extfile", "web.ext", "-out", "web.crt"])
            .collect::<Vec<_>>(),
    );
    // The same identity, valid for one day in 2020 (`openssl ca` takes explicit dates).
    std::fs::write(dir.0.join("index.txt"), "").unwrap();
    std::fs::write(dir.0.join("serial.txt"), "01\n").unwrap();
    let config = "[ca]\ndefault_ca = c\n[c]\ndatabase = index.txt\nnew_certs_dir = .\nserial = serial.txt\n\
                  default_md = sha256\npolicy = p\n[p]\norganizationName = optional\n";
    std::fs::write(dir.0.join("ca.cnf"), config).unwrap();
    openssl(
        &dir,
        &["ca", "-batch", "-config", "ca.cnf", "-cert", "ca.crt", "-keyfile", "ca.key", "-in", "web.csr", "-notext"]
            .into_iter()
            .chain(["-out", "expired.crt", "-startdate", "20200101000000Z", "-enddate", "20200102000000Z"])
            .chain(["-extfile", "web.ext"])
            .collect::<Vec<_>>(),
    );
    let inbound = reviews.inbound.unwrap();
    let request = "GET / HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n";
    let key = dir.0.join("web.key").display().to_string();
    let with = |file: &str| ["-cert".to_string(), dir.0.join(file).display().to_string(), "-key".into(), key.clone()];
    let valid = with("web.crt");
    let (out, err) =
        support::s_client(inbound, "weft/h1", &valid.iter().map(String::as_str).collect::<Vec<_>>(), request);
    assert!(out.contains("200 OK") && out.contains("reviews"), "{out}\n{err}");
    let expired = with("expired.crt");
    let (out, err) =
        support::s_client(inbound, "weft/h1", &expired.iter().map(String::as_str).collect::<Vec<_>>(), request);
    assert!(!out.contains("200 OK"), "{out}\n{err}");
    eventually(Duration::from_secs(5), "the refusal of the expired certificate in the log", || {
        let log = reviews.log();
        async move { log.contains("the certificate has expired").then_some(()) }
    })
    .await;

    // A key that is not the certificate's, or one in a form the CA cannot read: refused,
    // saying so.
    openssl(&dir, &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "other.key"]);
    openssl(&dir, &["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "sec1.key"]);
    for (file, reason) in [("other.key", "does not belong to the certificate"), ("sec1.key", "openssl pkcs8 -topk8")] {
        let output = Command::new(WEFT)
            .args(["control", "--api-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0", "--data-dir"])
            .arg(dir.0.join(format!("data-{file}")))
            .args(["--ca-cert", &cert, "--ca-key", &dir.0.join(file).display().to_string()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success() && err.contains(reason), "{err}");
        assert_eq!(err.matches("unusable").count(), 1, "said once: {err}");
    }
}

fn openssl_stdin(dir: &TempDir, args: &[&str], input: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args(args)
        .current_dir(&dir.0)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap().stdout
}

#[tokio::test]
async fn join_tokens_are_made_listed_and_revoked_by_the_operator() {
    let dir = TempDir::new("identity-tokens");
    let control = Control::start(&dir, "control").await;
    let root = status(&control).await["caRoot"].as_str().unwrap().to_string();

    let (ok, token, err) = control.cli(&["token", "create", "--service", "reviews", "--ttl", "1h"]);
    assert!(ok, "{err}");
    let token = token.trim();
    assert!(token.starts_with("wj1.") && token.ends_with(&root), "the token carries the root's hash: {token}");
    assert!(err.contains("spiffe://weft.local/ns/default/sa/reviews"), "{err}");
    let id = token.split('.').nth(1).unwrap();

    let (ok, listed, _) = control.cli(&["token", "list"]);
    assert!(ok && listed.contains(id) && listed.contains("valid"), "{listed}");
    assert!(!listed.contains(token.split('.').nth(2).unwrap()), "never the secret: {listed}");
    let (ok, out, err) = control.cli(&["token", "revoke", id]);
    assert!(ok && out.contains("revoked"), "{out}{err}");
    let (_, listed, _) = control.cli(&["token", "list"]);
    assert!(listed.contains("revoked"), "{listed}");

    // Operator mistakes, and no admin token.
    let (ok, _, err) = control.cli(&["token", "create", "--service", "Bad Name"]);
    assert!(!ok && err.contains("check --service"), "{err}");
    let (ok, _, err) = control.cli(&["token", "revoke", "0000"]);
    assert!(!ok && err.contains("no such token"), "{err}");
}

/// Runs `weft proxy --control` with `token` as `service` and waits for it to give up:
/// (exited with failure, its log).
async fn refused_proxy(dir: &TempDir, control: &Control, name: &str, token: &str, service: &str) -> (bool, String) {
    let token_file = dir.write(&format!("{name}.join-token"), token);
    let log = dir.0.join(format!("{name}.log"));
    let mut child = Command::new(WEFT)
        .args(["proxy", "--control", &control.grpc.to_string(), "--token-file", token_file.to_str().unwrap()])
        .args(["--service", service, "--outbound-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let status = eventually(Duration::from_secs(15), &format!("{name} to give up"), || {
        let status = child.try_wait().unwrap();
        async move { status }
    })
    .await;
    (!status.success(), std::fs::read_to_string(&log).unwrap())
}

#[tokio::test]
async fn a_proxy_joins_only_with_a_live_token_for_its_own_workload_of_this_mesh() {
    let dir = TempDir::new("identity-join");
    let control = Control::start(&dir, "control").await;
    let token = |args: &[&str]| {
        let (ok, token, err) = control.cli(&[&["token", "create"], args].concat());
        assert!(ok, "{err}");
        token.trim().to_string()
    };

    // The right token joins: the proxy serves, with the identity the token names.
    let reviews = token(&["--service", "reviews"]);
    let token_file = dir.write("reviews.join-token", &reviews);
    let proxy = Proxy::start_with_token(&dir, "reviews", &control.grpc.to_string(), &token_file, &[]).await;
    let shown = proxy.config().await;
    assert_eq!(shown["identity"]["id"], "spiffe://weft.local/ns/default/sa/reviews", "{shown}");
    assert!(shown["identity"]["serial"].as_str().is_some_and(|s| !s.is_empty()), "{shown}");

    // The same token for another workload is refused, and so is an expired, a revoked,
    // a made-up token, and one of another mesh.
    let (failed, log) = refused_proxy(&dir, &control, "impostor", &reviews, "ratings").await;
    assert!(failed && log.contains("is for spiffe://weft.local/ns/default/sa/reviews, not for"), "{log}");
    let short = token(&["--service", "ratings", "--ttl", "1s"]);
    let short_id = short.split('.').nth(1).unwrap().to_string();
    eventually(Duration::from_secs(15), "the short token to expire", || {
        let (_, listed, _) = control.cli(&["token", "list"]);
        let expired = listed.lines().any(|line| line.contains(&short_id) && line.contains("expired"));
        async move { expired.then_some(()) }
    })
    .await;
    let (failed, log) = refused_proxy(&dir, &control, "late", &short, "ratings").await;
    assert!(log.contains("has expired"), "{log}");
    assert!(failed, "{log}");
    let revoked = token(&["--service", "ratings"]);
    let (ok, _, err) = control.cli(&["token", "revoke", revoked.split('.').nth(1).unwrap()]);
    assert!(ok, "{err}");
    let (failed, log) = refused_proxy(&dir, &control, "revoked", &revoked, "ratings").await;
    assert!(failed && log.contains("has been revoked"), "{log}");
    let forged = format!("wj1.{}.0000.{}", revoked.split('.').nth(1).unwrap(), revoked.split('.').nth(3).unwrap());
    let (failed, log) = refused_proxy(&dir, &control, "forged", &forged, "ratings").await;
    assert!(failed && log.contains("not known to this mesh"), "{log}");
    let other = Control::start(&dir, "other").await;
    let (ok, foreign, err) = other.cli(&["token", "create", "--service", "ratings"]);
    assert!(ok, "{err}");
    let (failed, log) = refused_proxy(&dir, &control, "foreign", foreign.trim(), "ratings").await;
    assert!(failed && log.contains("not the one the join token names"), "{log}");
}
