//! The operator commands that are not about resources: tokens (join and operator),
//! revocations, the CA's rotation, the audit log (`weft history`) and the authorization
//! matrix (`weft authz matrix`).

use serde_json::{json, Value};

use crate::cli::{age, print_rows, unix_now, ApiClient, Output, ServerArgs};

/// What `weft token create` makes.
pub enum NewToken {
    /// A join token for a proxy of `service`.
    Join { service: String, namespace: String, service_account: Option<String> },
    /// An operator token with `role`.
    Operator { role: String, name: Option<String> },
}

/// `weft token create`: the token alone on stdout, what it is on stderr.
pub async fn create_token(server: &ServerArgs, what: NewToken, ttl: Option<String>) -> anyhow::Result<()> {
    let body = match what {
        NewToken::Join { service, namespace, service_account } => {
            json!({"service": service, "namespace": namespace, "serviceAccount": service_account, "ttl": ttl})
        }
        NewToken::Operator { role, name } => json!({"role": role, "name": name, "ttl": ttl}),
    };
    let made = ApiClient::new(server)?.call(http::Method::POST, "/api/v1/tokens", Some(body)).await?;
    let record = &made["record"];
    let until = match record["expiresAt"].as_u64() {
        Some(at) => {
            format!("until {}", weft_identity::rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(at)))
        }
        None => "until revoked".to_string(),
    };
    match made["kind"].as_str() {
        Some("join") => eprintln!(
            "join token {} for {}, valid {until}; give it to the proxy with --token-file",
            record["id"].as_str().unwrap_or("?"),
            record["identity"].as_str().unwrap_or("?"),
        ),
        _ => eprintln!(
            "{} token {}{}, valid {until}; keep it like a password (weft context set NAME --server URL --token-file FILE)",
            record["role"].as_str().unwrap_or("?"),
            record["id"].as_str().unwrap_or("?"),
            record["name"].as_str().filter(|n| !n.is_empty()).map(|n| format!(" ({n})")).unwrap_or_default(),
        ),
    }
    println!("{}", made["token"].as_str().unwrap_or_default());
    Ok(())
}

/// `weft token list`: both kinds, never a secret.
pub async fn list_tokens(server: &ServerArgs) -> anyhow::Result<()> {
    let answer = ApiClient::new(server)?.call(http::Method::GET, "/api/v1/tokens", None).await?;
    let items = answer["items"].as_array().cloned().unwrap_or_default();
    if items.is_empty() {
        eprintln!("no tokens");
        return Ok(());
    }
    let now = unix_now();
    let mut rows = vec![["KIND", "ID", "FOR", "NAME", "STATE", "EXPIRES IN"].map(String::from).to_vec()];
    for item in &items {
        let expires = item["expiresAt"].as_u64();
        let state = if item["revoked"] == true {
            "revoked"
        } else if expires.is_some_and(|at| at <= now) {
            "expired"
        } else {
            "valid"
        };
        let text = |key: &str| item[key].as_str().filter(|s| !s.is_empty()).unwrap_or("-").to_string();
        let purpose = if item["kind"] == "join" { text("identity") } else { text("role") };
        rows.push(vec![
            text("kind"),
            text("id"),
            purpose,
            text("name"),
            state.to_string(),
            match expires {
                Some(at) if at > now => age(at - now),
                Some(_) => "-".to_string(),
                None => "never".to_string(),
            },
        ]);
    }
    print_rows(&rows);
    Ok(())
}

/// `weft token revoke ID`: either kind.
pub async fn revoke_token(server: &ServerArgs, id: &str) -> anyhow::Result<()> {
    let revoked = ApiClient::new(server)?.call(http::Method::DELETE, &format!("/api/v1/tokens/{id}"), None).await?;
    match revoked["kind"].as_str() {
        Some("join") => println!("join token {id} for {} revoked", revoked["identity"].as_str().unwrap_or("?")),
        _ => println!("{} token {id} revoked", revoked["role"].as_str().unwrap_or("operator")),
    }
    Ok(())
}

/// `weft revoke identity|certificate VALUE`.
pub async fn revoke(server: &ServerArgs, kind: &str, value: &str) -> anyhow::Result<()> {
    let body = json!({"kind": kind, "value": value});
    let record = ApiClient::new(server)?.call(http::Method::POST, "/api/v1/revocations", Some(body)).await?;
    println!(
        "revoked {kind} {} (revocation {}): every proxy refuses it now and closes its connections; undo with weft revoke undo {}",
        record["value"].as_str().unwrap_or(value),
        record["id"].as_str().unwrap_or("?"),
        record["id"].as_str().unwrap_or("?"),
    );
    Ok(())
}

/// `weft revoke undo ID|VALUE`.
pub async fn undo_revocation(server: &ServerArgs, what: &str) -> anyhow::Result<()> {
    // A SPIFFE ID has slashes: one path segment, encoded.
    let segment = percent_encoding::utf8_percent_encode(what, percent_encoding::NON_ALPHANUMERIC);
    let record =
        ApiClient::new(server)?.call(http::Method::DELETE, &format!("/api/v1/revocations/{segment}"), None).await?;
    println!(
        "revocation of {} {} undone",
        record["kind"].as_str().unwrap_or("?"),
        record["value"].as_str().unwrap_or("?")
    );
    Ok(())
}

/// `weft revoke list`.
pub async fn list_revocations(server: &ServerArgs, output: Output) -> anyhow::Result<()> {
    let answer = ApiClient::new(server)?.call(http::Method::GET, "/api/v1/revocations", None).await?;
    let items = answer["items"].as_array().cloned().unwrap_or_default();
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    if items.is_empty() {
        eprintln!("nothing is revoked");
        return Ok(());
    }
    let mut rows = vec![["ID", "KIND", "REVOKED", "BY", "AGE"].map(String::from).to_vec()];
    let now = unix_now();
    for item in &items {
        let text = |key: &str| item[key].as_str().unwrap_or("-").to_string();
        rows.push(vec![
            text("id"),
            text("kind"),
            text("value"),
            text("by"),
            age(now.saturating_sub(item["createdAt"].as_u64().unwrap_or(now))),
        ]);
    }
    print_rows(&rows);
    Ok(())
}

/// `weft history [KIND [NAME]]`: the audit log, oldest first.
pub async fn history(
    server: &ServerArgs,
    kind: Option<&str>,
    name: Option<&str>,
    limit: usize,
    output: Output,
) -> anyhow::Result<()> {
    let mut query = format!("?limit={limit}");
    if let Some(kind) = kind {
        query.push_str(&format!("&kind={kind}"));
    }
    if let Some(name) = name {
        query.push_str(&format!("&name={name}"));
    }
    let answer = ApiClient::new(server)?.call(http::Method::GET, &format!("/api/v1/history{query}"), None).await?;
    let items = answer["items"].as_array().cloned().unwrap_or_default();
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&answer)?),
        Output::Yaml => print!("{}", serde_norway::to_string(&answer)?),
        Output::Table if items.is_empty() => eprintln!("no changes recorded"),
        Output::Table => {
            let mut rows = vec![["TIME", "REVISION", "ACTION", "KIND", "NAMESPACE", "NAME", "BY", "ROLE"]
                .map(String::from)
                .to_vec()];
            for item in &items {
                let text = |v: &Value| v.as_str().filter(|s| !s.is_empty()).unwrap_or("-").to_string();
                let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(item["time"].as_u64().unwrap_or(0));
                let operator = &item["operator"];
                let by = match (operator["name"].as_str().filter(|n| !n.is_empty()), operator["tokenId"].as_str()) {
                    (Some(name), Some(id)) if !id.is_empty() => format!("{name} ({id})"),
                    (Some(name), _) => name.to_string(),
                    (None, id) => id.unwrap_or("-").to_string(),
                };
                rows.push(vec![
                    weft_identity::rfc3339(time),
                    item["revision"].to_string(),
                    text(&item["action"]),
                    text(&item["subject"]["kind"]),
                    text(&item["subject"]["namespace"]),
                    text(&item["subject"]["name"]),
                    by,
                    text(&operator["role"]),
                ]);
            }
            print_rows(&rows);
        }
    }
    Ok(())
}

/// `weft ca rotate` (`finish: None`) and `weft ca finish-rotation` (`Some(force)`).
pub async fn ca(api: &ApiClient, finish: Option<bool>) -> anyhow::Result<()> {
    let path = match finish {
        None => "/api/v1/ca/rotate".to_string(),
        Some(force) => format!("/api/v1/ca/rotation/finish?force={force}"),
    };
    let answer = api.call(http::Method::POST, &path, None).await?;
    let roots: Vec<&str> =
        answer["caRoots"].as_array().map(|r| r.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    match finish {
        None => eprintln!(
            "rotation started: new root {}; still trusted: {}. Proxies get the new bundle now and new certificates as they \
             renew; make new join tokens (old ones work until the rotation is finished). Finish with weft ca \
             finish-rotation after one certificate lifetime.",
            answer["caRoot"].as_str().unwrap_or_default(),
            roots.get(1..).map(|r| r.join(", ")).unwrap_or_default()
        ),
        Some(_) => eprintln!("rotation finished: only root {} is trusted", answer["caRoot"].as_str().unwrap_or_default()),
    }
    Ok(())
}

/// `weft authz matrix`: a row per Service, a column per identity.
pub async fn authz_matrix(
    server: &ServerArgs,
    namespace: Option<&str>,
    identities: &[String],
    output: Output,
) -> anyhow::Result<()> {
    let mut query = Vec::new();
    if let Some(namespace) = namespace {
        query.push(format!(
            "namespace={}",
            percent_encoding::utf8_percent_encode(namespace, percent_encoding::NON_ALPHANUMERIC)
        ));
    }
    if !identities.is_empty() {
        let list = identities.join(",");
        query.push(format!(
            "identities={}",
            percent_encoding::utf8_percent_encode(&list, percent_encoding::NON_ALPHANUMERIC)
        ));
    }
    let path = if query.is_empty() {
        "/api/v1/authz/matrix".to_string()
    } else {
        format!("/api/v1/authz/matrix?{}", query.join("&"))
    };
    let answer = ApiClient::new(server)?.call(http::Method::GET, &path, None).await?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&answer)?),
        Output::Yaml => print!("{}", serde_norway::to_string(&answer)?),
        Output::Table => print!("{}", matrix_table(&answer["matrix"])),
    }
    Ok(())
}

/// The matrix as a table: identities as `namespace/account` where they are weft's own
/// form, cells as `allow`, `partial` or `deny`.
fn matrix_table(matrix: &Value) -> String {
    let identities = matrix["identities"].as_array().cloned().unwrap_or_default();
    let services = matrix["services"].as_array().cloned().unwrap_or_default();
    if services.is_empty() {
        return "no Services\n".to_string();
    }
    let column = |identity: &Value| match identity.as_str() {
        None => "(plaintext)".to_string(),
        Some(id) => match weft_model::spiffe::SpiffeId::parse(id)
            .ok()
            .and_then(|s| s.workload_parts().map(|(ns, account)| format!("{ns}/{account}")))
        {
            Some(short) => short,
            None => id.to_string(),
        },
    };
    let mut rows =
        vec![["SERVICE", "MTLS"].map(String::from).into_iter().chain(identities.iter().map(column)).collect()];
    for service in &services {
        let mut row = vec![
            format!("{}/{}", service["namespace"].as_str().unwrap_or("?"), service["name"].as_str().unwrap_or("?")),
            service["mtls"].as_str().unwrap_or("?").to_string(),
        ];
        for cell in service["cells"].as_array().into_iter().flatten() {
            row.push(
                match cell["reach"].as_str() {
                    Some("all") => "allow",
                    Some("some") => "partial",
                    _ => "deny",
                }
                .to_string(),
            );
        }
        rows.push(row);
    }
    crate::cli::format_rows(&rows)
}
