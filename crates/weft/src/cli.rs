//! The operator commands (`apply`, `get`, `delete`, `describe`): thin clients of the
//! control plane's HTTP API that read files and print what came back.

use std::{
    io::Read,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context};
use serde_json::{json, Value};

pub use crate::api_client::{ApiClient, ServerArgs};
use weft_control::{
    catalog::Source,
    kinds::{parse_kind, plural, ALL_KINDS},
};

/// Reads `-f` arguments: files, directories (their `.yaml`, `.yml` and `.json` files in
/// name order, not recursing) or `-` for stdin.
pub fn read_sources(paths: &[PathBuf]) -> anyhow::Result<Vec<Source>> {
    let mut sources = Vec::new();
    for path in paths {
        if path.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text).context("reading stdin")?;
            sources.push(Source::new("stdin", text));
        } else if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("cannot read directory {}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml" || x == "json"))
                .collect();
            files.sort();
            if files.is_empty() {
                bail!("{} holds no .yaml, .yml or .json files", path.display());
            }
            for file in files {
                sources.push(read_file(&file)?);
            }
        } else {
            sources.push(read_file(path)?);
        }
    }
    Ok(sources)
}

fn read_file(path: &Path) -> anyhow::Result<Source> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Source::new(path.display().to_string(), text))
}

/// Prints an apply or delete report as `kind/name action` lines.
pub fn print_report(report: &Value) {
    let suffix = if report["dryRun"].as_bool() == Some(true) { " (dry run)" } else { "" };
    for result in report["results"].as_array().into_iter().flatten() {
        let kind = result["kind"].as_str().unwrap_or_default().to_ascii_lowercase();
        let namespace = result["namespace"].as_str().unwrap_or_default();
        let name = result["name"].as_str().unwrap_or_default();
        let ns = if namespace == weft_model::DEFAULT_NAMESPACE { String::new() } else { format!(" -n {namespace}") };
        println!("{kind}/{name}{ns} {}{suffix}", result["action"].as_str().unwrap_or_default());
    }
}

/// `weft apply`.
pub async fn apply(api: &ApiClient, files: &[PathBuf], dry_run: bool) -> anyhow::Result<()> {
    if files.is_empty() {
        bail!("nothing to apply: give -f FILE, -f DIR or -f - (stdin)");
    }
    let sources = read_sources(files)?;
    let report = api
        .call(http::Method::POST, &format!("/api/v1/apply?dryRun={dry_run}"), Some(json!({"sources": sources})))
        .await?;
    print_report(&report);
    print_preview(&report["preview"]);
    Ok(())
}

/// A dry run's preview: what the change would touch.
fn print_preview(preview: &Value) {
    if preview.is_null() {
        return;
    }
    let list = |field: &str| -> Vec<String> {
        preview[field].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(String::from)).collect()
    };
    let none = |items: Vec<String>| if items.is_empty() { "none".to_string() } else { items.join(", ") };
    if preview["meshWide"].as_bool() == Some(true) {
        println!("would touch: every proxy (a MeshConfig is in every view)");
    }
    println!("would touch Services: {}", none(list("services")));
    println!("  their routes: {}", none(list("routes")));
    println!(
        "  proxies whose configuration would change (on the replica asked): {} ({} unchanged)",
        none(list("proxies")),
        preview["proxiesUnchanged"].as_u64().unwrap_or_default()
    );
}

/// `weft delete KIND NAME` or `weft delete -f FILE`.
pub async fn delete(
    api: &ApiClient,
    target: &[String],
    files: &[PathBuf],
    namespace: &str,
    dry_run: bool,
) -> anyhow::Result<()> {
    let report = match (target, files.is_empty()) {
        ([kind, name], true) => {
            let kind = plural(parse_kind(kind).map_err(anyhow::Error::msg)?);
            let path = format!("/api/v1/resources/{kind}/{namespace}/{name}?dryRun={dry_run}");
            api.call(http::Method::DELETE, &path, None).await?
        }
        ([], false) => {
            let sources = read_sources(files)?;
            api.call(http::Method::POST, &format!("/api/v1/delete?dryRun={dry_run}"), Some(json!({"sources": sources})))
                .await?
        }
        _ => bail!("give either KIND NAME (weft delete service reviews) or -f FILE, not both"),
    };
    print_report(&report);
    Ok(())
}

/// Output formats of `weft get`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Yaml,
    Json,
}

/// `weft get KIND [NAME]`.
pub async fn get(
    api: &ApiClient,
    kind: &str,
    name: Option<&str>,
    namespace: Option<&str>,
    output: Output,
) -> anyhow::Result<()> {
    if matches!(kind, "proxies" | "proxy") {
        return get_proxies(api, output).await;
    }
    let kinds = if kind == "all" { ALL_KINDS.to_vec() } else { vec![parse_kind(kind).map_err(anyhow::Error::msg)?] };
    let mut items = Vec::new();
    for kind in &kinds {
        match name {
            Some(name) => {
                let ns = namespace.unwrap_or(weft_model::DEFAULT_NAMESPACE);
                items.push(
                    api.call(http::Method::GET, &format!("/api/v1/resources/{}/{ns}/{name}", plural(*kind)), None)
                        .await?,
                );
            }
            None => {
                let query = namespace.map(|ns| format!("?namespace={ns}")).unwrap_or_default();
                let list =
                    api.call(http::Method::GET, &format!("/api/v1/resources/{}{query}", plural(*kind)), None).await?;
                items.extend(list["items"].as_array().cloned().unwrap_or_default());
            }
        }
    }
    let documents: Vec<&Value> = items.iter().map(|i| &i["document"]).collect();
    match output {
        Output::Json if name.is_some() => println!("{}", serde_json::to_string_pretty(documents[0])?),
        Output::Json => println!("{}", serde_json::to_string_pretty(&json!({"items": documents}))?),
        Output::Yaml => {
            for (i, document) in documents.iter().enumerate() {
                if i > 0 {
                    println!("---");
                }
                print!("{}", serde_norway::to_string(document)?);
            }
        }
        Output::Table => print_table(&kinds, &items),
    }
    Ok(())
}

/// `weft get proxies`: every connected proxy, on whichever control-plane replica.
async fn get_proxies(api: &ApiClient, output: Output) -> anyhow::Result<()> {
    let answer = api.call(http::Method::GET, "/api/v1/proxies", None).await?;
    let items = answer["items"].as_array().cloned().unwrap_or_default();
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&answer)?),
        Output::Yaml => print!("{}", serde_norway::to_string(&answer)?),
        Output::Table if items.is_empty() => eprintln!("no proxies connected"),
        Output::Table => {
            let now = unix_now();
            let mut rows =
                vec![["PROXY", "NAMESPACE", "SERVICE", "ADDRESS", "CONTROL PLANE", "APPLIED", "LAST NACK", "AGE"]
                    .map(String::from)
                    .to_vec()];
            for p in &items {
                let text = |key: &str| p[key].as_str().filter(|s| !s.is_empty()).unwrap_or("-").to_string();
                let applied = text("appliedVersion");
                let current = if p["appliedVersion"] == p["sentVersion"] {
                    applied
                } else {
                    format!("{applied} (sent {})", text("sentVersion"))
                };
                rows.push(vec![
                    text("proxyId"),
                    text("namespace"),
                    text("service"),
                    text("address"),
                    text("controlPlane"),
                    current,
                    text("lastNack"),
                    match p["connectedAt"].as_u64() {
                        Some(0) | None => "-".into(),
                        Some(at) => age(now.saturating_sub(at)),
                    },
                ]);
            }
            print_rows(&rows);
            for replica in answer["unreachableReplicas"].as_array().into_iter().flatten() {
                eprintln!(
                    "warning: control plane {} ({}) did not answer ({}); its proxies are listed without versions",
                    replica["replica"].as_str().unwrap_or("?"),
                    replica["api"].as_str().unwrap_or("?"),
                    replica["reason"].as_str().unwrap_or("?"),
                );
            }
        }
    }
    Ok(())
}

pub fn age(seconds: u64) -> String {
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h", s / 3600),
    }
}

fn print_table(kinds: &[weft_model::ResourceKind], items: &[Value]) {
    if items.is_empty() {
        let what: Vec<&str> = kinds.iter().map(|k| plural(*k)).collect();
        eprintln!("no {} found", what.join(", "));
        return;
    }
    let mut rows = vec![["KIND", "NAMESPACE", "NAME", "REVISION", "SUMMARY"].map(String::from).to_vec()];
    for item in items {
        rows.push(vec![
            item["kind"].as_str().unwrap_or_default().to_string(),
            item["namespace"].as_str().unwrap_or_default().to_string(),
            item["name"].as_str().unwrap_or_default().to_string(),
            item["revision"].to_string(),
            summary(item["kind"].as_str().unwrap_or_default(), &item["document"]["spec"]),
        ]);
    }
    print_rows(&rows);
}

/// Prints rows as aligned columns.
pub fn print_rows(rows: &[Vec<String>]) {
    print!("{}", format_rows(rows));
}

/// Rows as aligned columns, one line each.
pub fn format_rows(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..columns).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> =
            row.iter().enumerate().map(|(c, cell)| format!("{cell:<width$}", width = widths[c])).collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

/// One line on what a resource says, for tables.
fn summary(kind: &str, spec: &Value) -> String {
    let labels = |v: &Value| {
        v.as_object()
            .map(|m| {
                m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default())).collect::<Vec<_>>().join(",")
            })
            .unwrap_or_default()
    };
    match kind {
        "Service" => {
            let ports: Vec<String> = spec["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| format!("{}/{}", p["port"], p["protocol"].as_str().unwrap_or("http")))
                .collect();
            format!("ports {} selector {}", ports.join(","), labels(&spec["selector"]))
        }
        "Workload" => format!("{} {}", spec["address"].as_str().unwrap_or_default(), labels(&spec["labels"])),
        "HTTPRoute" | "GRPCRoute" => {
            let parents: Vec<&str> =
                spec["parentRefs"].as_array().into_iter().flatten().filter_map(|p| p["name"].as_str()).collect();
            let rules = spec["rules"].as_array().map_or(0, Vec::len);
            format!("parents {} rules {rules}", parents.join(","))
        }
        "TrafficPolicy" => format!("target {}", spec["targetRef"]["name"].as_str().unwrap_or_default()),
        _ => String::new(),
    }
}

/// `weft describe service NAME`.
pub async fn describe(api: &ApiClient, kind: &str, name: &str, namespace: &str, output: Output) -> anyhow::Result<()> {
    let kind = parse_kind(kind).map_err(anyhow::Error::msg)?;
    if kind == weft_model::ResourceKind::Workload {
        let answer =
            api.call(http::Method::GET, &format!("/api/v1/workloads/{namespace}/{name}/describe"), None).await?;
        let workload = &answer["workload"];
        match output {
            Output::Json => println!("{}", serde_json::to_string_pretty(workload)?),
            Output::Yaml => print!("{}", serde_norway::to_string(workload)?),
            Output::Table => print_workload(workload),
        }
        return Ok(());
    }
    if kind != weft_model::ResourceKind::Service {
        bail!(
            "describe supports services and workloads (weft describe service|workload NAME); use `weft get {} {name} -o yaml`",
            plural(kind)
        );
    }
    let answer = api.call(http::Method::GET, &format!("/api/v1/services/{namespace}/{name}/describe"), None).await?;
    let service = &answer["service"];
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(service)?),
        Output::Yaml => print!("{}", serde_norway::to_string(service)?),
        Output::Table => print_description(service),
    }
    Ok(())
}

pub fn unix_now() -> u64 {
    weft_identity::unix_seconds(std::time::SystemTime::now())
}

/// "in 5h12m" / "3m ago", for certificate expiry.
pub fn relative(at: u64) -> String {
    let now = unix_now();
    let (seconds, future) = if at >= now { (at - now, true) } else { (now - at, false) };
    let text = if seconds >= 3600 {
        format!("{}h{:02}m", seconds / 3600, (seconds % 3600) / 60)
    } else if seconds >= 60 {
        format!("{}m{:02}s", seconds / 60, seconds % 60)
    } else {
        format!("{seconds}s")
    };
    if future {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

fn print_workload(workload: &Value) {
    let text = |v: &Value| v.as_str().unwrap_or("-").to_string();
    println!("Workload:     {}/{}", text(&workload["namespace"]), text(&workload["name"]));
    let registration = &workload["registration"];
    let spec = &workload["resource"]["spec"];
    if registration.is_object() {
        println!("Service:      {}", text(&registration["service"]));
        println!("Address:      {}", text(&registration["address"]));
        let health = if registration["healthy"] == true { "healthy" } else { "unhealthy" };
        println!("Health:       {health} ({})", text(&registration["health"]));
    } else if spec.is_object() {
        println!("Address:      {}", text(&spec["address"]));
        println!("Declared:     by a Workload resource (not registered by a proxy)");
    }
    let proxy = &workload["proxy"];
    let identity = proxy["identity"].as_str().or(registration["identity"].as_str()).or(spec["identity"].as_str());
    println!("Identity:     {}", identity.unwrap_or("none (plaintext)"));
    let certificate = &proxy["certificate"];
    if certificate.is_object() {
        println!("Certificate:  serial {}", text(&certificate["serial"]));
        println!("  Issuer:     {}", text(&certificate["issuer"]));
        let not_after = certificate["notAfter"].as_u64().unwrap_or(0);
        println!("  Expires:    {} ({not_after})", relative(not_after));
    } else if proxy.is_object() {
        println!("Certificate:  not reported");
    }
    if proxy.is_object() {
        println!(
            "Proxy:        version {}, control plane {}",
            text(&proxy["proxyVersion"]),
            text(&proxy["controlPlane"])
        );
    } else {
        println!("Proxy:        not connected");
    }
    let configuration = &workload["configuration"];
    if configuration.is_object() {
        let documents = configuration["yaml"]
            .as_str()
            .filter(|yaml| !yaml.is_empty())
            .map_or(0, |yaml| yaml.split("---\n").count());
        println!(
            "Configuration: version {} sent, {} applied; {documents} documents (-o yaml shows them)",
            text(&configuration["version"]),
            text(&configuration["applied"])
        );
    }
}

/// `weft check`: what needs an operator's attention in the mesh's identities.
pub async fn check(api: &ApiClient) -> anyhow::Result<()> {
    let answer = api.call(http::Method::GET, "/api/v1/proxies", None).await?;
    let proxies = answer["items"].as_array().cloned().unwrap_or_default();
    let mut problems = Vec::new();
    for proxy in &proxies {
        let name = format!(
            "{}/{}",
            proxy["namespace"].as_str().unwrap_or_default(),
            proxy["proxyId"].as_str().unwrap_or_default()
        );
        if proxy["identity"].as_str().is_none() {
            problems.push(format!("{name}: no workload identity (its traffic cannot use mutual TLS)"));
            continue;
        }
        let certificate = &proxy["certificate"];
        let (Some(received), Some(not_after)) = (certificate["received"].as_u64(), certificate["notAfter"].as_u64())
        else {
            continue;
        };
        let now = unix_now();
        let life = not_after.saturating_sub(received).max(1);
        if not_after <= now {
            problems.push(format!("{name}: certificate {} expired {}", certificate["serial"], relative(not_after)));
        } else if (not_after - now) * 5 < life {
            // Proxies renew at ~70% of the life: under 20% left means renewal is failing.
            problems.push(format!(
                "{name}: certificate {} expires {} and has not been renewed; see that proxy's log",
                certificate["serial"].as_str().unwrap_or_default(),
                relative(not_after)
            ));
        }
    }
    for unreachable in answer["unreachableReplicas"].as_array().cloned().unwrap_or_default() {
        problems.push(format!(
            "control-plane replica {} did not answer; its proxies were not checked",
            unreachable["replica"].as_str().unwrap_or_default()
        ));
    }
    if problems.is_empty() {
        println!("ok: {} proxies, every one with a current workload certificate", proxies.len());
        return Ok(());
    }
    for problem in &problems {
        println!("{problem}");
    }
    bail!("{} problem(s) found", problems.len())
}

fn print_description(service: &Value) {
    let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
    println!(
        "Service:    {}/{}",
        service["namespace"].as_str().unwrap_or_default(),
        service["name"].as_str().unwrap_or_default()
    );
    let selector = service["selector"].as_object().map(|m| {
        m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default())).collect::<Vec<_>>().join(",")
    });
    println!("Selector:   {}", selector.unwrap_or_default());
    if let Some(address) = service["virtualIP"].as_str() {
        println!("Virtual IP: {address}");
    }
    let ports: Vec<String> = list(&service["ports"])
        .iter()
        .map(|p| format!("{}/{}", p["port"], p["protocol"].as_str().unwrap_or("http")))
        .collect();
    println!("Ports:      {}", ports.join(", "));
    let routes: Vec<String> = list(&service["routes"]).iter().filter_map(|r| r.as_str().map(String::from)).collect();
    println!("Routes:     {}", if routes.is_empty() { "<none>".to_string() } else { routes.join(", ") });
    let policy = &service["policy"];
    println!(
        "Policy:     {} (loadBalancer {})",
        policy["source"].as_str().map(|s| format!("TrafficPolicy {s}")).unwrap_or_else(|| "<defaults>".into()),
        policy["loadBalancer"].as_str().unwrap_or_default()
    );
    let endpoints = list(&service["endpoints"]);
    println!("Endpoints:  {}", if endpoints.is_empty() { "<none>" } else { "" });
    if !endpoints.is_empty() {
        let mut rows = vec![["  PORT", "WORKLOAD", "ADDRESS", "ZONE", "WEIGHT", "HEALTH"].map(String::from).to_vec()];
        for e in &endpoints {
            rows.push(vec![
                format!("  {}", e["port"]),
                e["workload"].as_str().unwrap_or_default().to_string(),
                e["address"].as_str().unwrap_or_default().to_string(),
                e["zone"].as_str().unwrap_or("-").to_string(),
                e["weight"].to_string(),
                e["health"].as_str().unwrap_or_default().to_string(),
            ]);
        }
        print_rows(&rows);
    }
    let unresolved = list(&service["unresolved"]);
    if !unresolved.is_empty() {
        println!("Unresolved:");
        for line in unresolved {
            println!("  {}", line.as_str().unwrap_or_default());
        }
    }
}
