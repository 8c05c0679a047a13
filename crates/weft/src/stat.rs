//! `weft stat`: the golden signals the control plane aggregates (success rate, request
//! rate, latency percentiles, TCP connections, mutual-TLS share) as tables, or the API's
//! JSON with `-o json`; `--around-revision N` sets the window before a change beside
//! the window after it, which is how an operator judges a canary.

use anyhow::bail;
use serde_json::Value;

use crate::cli::{age, print_rows, ApiClient, Output};

/// What `weft stat` is asked.
pub struct StatRequest<'a> {
    pub view: &'a str,
    pub name: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub window: &'a str,
    pub around_revision: Option<u64>,
    /// Each slot of the window too.
    pub series: bool,
    pub output: Output,
}

/// `weft stat VIEW [NAME]`.
pub async fn stat(api: &ApiClient, request: StatRequest<'_>) -> anyhow::Result<()> {
    let view = match request.view {
        "services" | "service" | "svc" => "services",
        "workloads" | "workload" => "workloads",
        "routes" | "route" => "routes",
        "edges" | "edge" => "edges",
        "authz" | "authorization" => "authz",
        "endpoints" | "endpoint" => "endpoints",
        other => bail!("weft stat {other}: use services, workloads, routes, edges, authz or endpoints"),
    };
    let mut query = vec![format!("window={}", request.window)];
    if let Some(namespace) = request.namespace {
        query.push(format!("namespace={namespace}"));
    }
    if let Some(name) = request.name {
        query.push(format!("name={name}"));
    }
    if let Some(revision) = request.around_revision {
        query.push(format!("aroundRevision={revision}"));
    }
    if request.series {
        query.push("series=true".into());
    }
    let answer = api.call(http::Method::GET, &format!("/api/v1/stat/{view}?{}", query.join("&")), None).await?;
    match request.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&answer)?),
        Output::Yaml => print!("{}", serde_norway::to_string(&answer)?),
        Output::Table if request.around_revision.is_some() => print_around(view, &answer),
        Output::Table => {
            print_window(view, &answer);
            if request.series {
                print_series(view, &answer);
            }
            print_changes(&answer);
        }
    }
    Ok(())
}

/// Each slot of the window: when it began, then its rows as the window's table shows
/// them.
fn print_series(view: &str, answer: &Value) {
    for point in answer["series"].as_array().into_iter().flatten() {
        let from = point["from"].as_u64().unwrap_or_default();
        println!(
            "\nslot from {} ({:.0}s):",
            weft_identity::rfc3339_millis(from * 1000),
            point["seconds"].as_f64().unwrap_or_default()
        );
        print_window(view, point);
    }
}

fn print_window(view: &str, window: &Value) {
    let rows = window["rows"].as_array().cloned().unwrap_or_default();
    warn_unreachable(window);
    if rows.is_empty() {
        eprintln!("no {view} with traffic in this window");
        return;
    }
    let table = match view {
        "services" => golden_table(&rows, false),
        "workloads" => golden_table(&rows, true),
        "routes" => routes(&rows),
        "edges" => edges(&rows),
        "authz" => authz(&rows),
        _ => endpoints(&rows),
    };
    print_rows(&table);
}

fn warn_unreachable(window: &Value) {
    for replica in window["unreachableReplicas"].as_array().into_iter().flatten() {
        eprintln!(
            "warning: control plane {} did not answer ({}); the traffic of its proxies is missing",
            replica["replica"].as_str().unwrap_or("?"),
            replica["reason"].as_str().unwrap_or("?"),
        );
    }
}

/// The changes made in the window, from the audit log, so that a shift in the figures
/// can be laid beside what caused it.
fn print_changes(window: &Value) {
    let changes = window["changes"].as_array().cloned().unwrap_or_default();
    if changes.is_empty() {
        return;
    }
    let now = crate::cli::unix_now();
    println!();
    println!("changes in this window:");
    for change in changes {
        println!(
            "  revision {}  {} ago  {} {}/{}/{} by {}",
            change["revision"],
            age(now.saturating_sub(change["time"].as_u64().unwrap_or(now))),
            change["action"].as_str().unwrap_or("?"),
            change["kind"].as_str().unwrap_or("?"),
            change["namespace"].as_str().unwrap_or("?"),
            change["name"].as_str().unwrap_or("?"),
            change["by"].as_str().unwrap_or("?"),
        );
    }
}

fn text(value: &Value) -> String {
    value.as_str().filter(|s| !s.is_empty()).unwrap_or("-").to_string()
}

/// A share as a percentage, `-` when there is nothing to share.
fn percent(value: &Value) -> String {
    match value.as_f64() {
        Some(share) if share >= 0.99995 => "100.00%".into(),
        Some(share) => format!("{:.2}%", share * 100.0),
        None => "-".into(),
    }
}

fn rps(value: &Value) -> String {
    match value.as_f64() {
        Some(rate) if rate >= 100.0 => format!("{rate:.0}"),
        Some(rate) => format!("{rate:.1}"),
        None => "-".into(),
    }
}

/// A latency in milliseconds, with the precision it deserves.
pub fn latency(value: &Value) -> String {
    match value.as_f64() {
        None => "-".into(),
        Some(ms) if ms < 10.0 => format!("{ms:.2}ms"),
        Some(ms) if ms < 100.0 => format!("{ms:.1}ms"),
        Some(ms) if ms < 10_000.0 => format!("{ms:.0}ms"),
        Some(ms) => format!("{:.1}s", ms / 1000.0),
    }
}

/// Latency columns, empty when there were no requests.
fn quantiles(row: &Value) -> [String; 3] {
    [latency(&row["p50Ms"]), latency(&row["p95Ms"]), latency(&row["p99Ms"])]
}

fn header(names: &[&str]) -> Vec<String> {
    names.iter().map(|name| name.to_string()).collect()
}

/// Services (or, with `service_column`, workloads and their Service): one line each.
fn golden_table(rows: &[Value], service_column: bool) -> Vec<Vec<String>> {
    let mut names = vec!["NAMESPACE", "NAME"];
    if service_column {
        names.push("SERVICE");
    }
    names.extend(["SUCCESS", "RPS", "P50", "P95", "P99", "TCP_CONN", "MTLS"]);
    let mut table = vec![header(&names)];
    for row in rows {
        let [p50, p95, p99] = quantiles(row);
        let mut line = vec![text(&row["namespace"]), text(&row["name"])];
        if service_column {
            line.push(text(&row["service"]));
        }
        line.extend([
            percent(&row["successRate"]),
            rps(&row["rps"]),
            p50,
            p95,
            p99,
            row["tcpConnections"].to_string(),
            percent(&row["mtlsShare"]),
        ]);
        table.push(line);
    }
    table
}

/// A route's name as tables show it: `[default]` when no route applied.
fn route_name(route: &Value) -> String {
    match route.as_str() {
        Some("") | None => "[default]".into(),
        Some(route) => route.split_once('/').map_or(route, |(_, rest)| rest).to_string(),
    }
}

fn routes(rows: &[Value]) -> Vec<Vec<String>> {
    let mut table = vec![header(&[
        "NAMESPACE",
        "SERVICE",
        "ROUTE",
        "BACKEND",
        "SPLIT",
        "SUCCESS",
        "RPS",
        "P50",
        "P95",
        "P99",
        "TRIES",
        "RETRIES",
        "MTLS",
    ])];
    for row in rows {
        let [p50, p95, p99] = quantiles(row);
        let (namespace, service, route) = (text(&row["namespace"]), text(&row["service"]), route_name(&row["route"]));
        table.push(vec![
            namespace.clone(),
            service.clone(),
            route.clone(),
            "(all)".into(),
            "-".into(),
            percent(&row["successRate"]),
            rps(&row["rps"]),
            p50,
            p95,
            p99,
            row["tries"].to_string(),
            percent(&row["retryRatio"]),
            percent(&row["mtlsShare"]),
        ]);
        for backend in row["backends"].as_array().into_iter().flatten() {
            let [p50, p95, p99] = quantiles(backend);
            table.push(vec![
                namespace.clone(),
                service.clone(),
                route.clone(),
                text(&backend["backend"]),
                percent(&backend["share"]),
                percent(&backend["successRate"]),
                rps(&backend["rps"]),
                p50,
                p95,
                p99,
                backend["tries"]["requests"].to_string(),
                "-".into(),
                "-".into(),
            ]);
        }
    }
    table
}

fn edges(rows: &[Value]) -> Vec<Vec<String>> {
    let mut table = vec![header(&[
        "SOURCE",
        "DESTINATION",
        "SOURCE_IDENTITY",
        "DESTINATION_IDENTITY",
        "RPS",
        "SUCCESS",
        "P99",
        "MTLS",
    ])];
    for row in rows {
        let mtls = match (row["mtls"].as_bool(), row["mtlsShare"].as_f64()) {
            (Some(true), _) => "yes".to_string(),
            (_, Some(share)) if share > 0.0 => format!("partly ({:.0}%)", share * 100.0),
            _ => "no".to_string(),
        };
        table.push(vec![
            text(&row["source"]["service"]),
            text(&row["destination"]["service"]),
            text(&row["source"]["identity"]),
            text(&row["destination"]["identity"]),
            rps(&row["rps"]),
            percent(&row["successRate"]),
            latency(&row["p99Ms"]),
            mtls,
        ]);
    }
    table
}

fn authz(rows: &[Value]) -> Vec<Vec<String>> {
    let mut table = vec![header(&["NAMESPACE", "SERVICE", "POLICY", "ALLOWED", "DENIED"])];
    for row in rows {
        table.push(vec![
            text(&row["namespace"]),
            text(&row["service"]),
            row["policy"].as_str().filter(|p| !p.is_empty()).unwrap_or("(default: allow)").to_string(),
            row["allowed"].to_string(),
            row["denied"].to_string(),
        ]);
    }
    table
}

fn endpoints(rows: &[Value]) -> Vec<Vec<String>> {
    let mut table =
        vec![header(&["NAMESPACE", "SERVICE", "ADDRESS", "WORKLOAD", "SEEN BY", "LATENCY", "IN_FLIGHT", "EJECTED"])];
    for row in rows {
        let ejected = match row["ejectedForMs"].as_u64() {
            Some(0) | None => "-".to_string(),
            Some(ms) => format!("for {}", age(ms.div_ceil(1000))),
        };
        table.push(vec![
            text(&row["namespace"]),
            text(&row["service"]),
            text(&row["address"]),
            text(&row["workload"]),
            text(&row["reporter"]),
            latency(&row["latencyEstimateMs"]),
            row["inFlight"].to_string(),
            ejected,
        ]);
    }
    table
}

/// `--around-revision`: what changed, then the window before beside the window after.
fn print_around(view: &str, answer: &Value) {
    for change in answer["change"].as_array().into_iter().flatten() {
        println!(
            "revision {}: {} {}/{}/{} by {}",
            answer["revision"],
            change["action"].as_str().unwrap_or("?"),
            change["kind"].as_str().unwrap_or("?"),
            change["namespace"].as_str().unwrap_or("?"),
            change["name"].as_str().unwrap_or("?"),
            change["by"].as_str().unwrap_or("?"),
        );
    }
    let (before, after) = (&answer["before"], &answer["after"]);
    println!(
        "before: {:.0}s up to the change; after: {:.0}s from the slot after it ({} s slots)",
        before["seconds"].as_f64().unwrap_or(0.0),
        after["seconds"].as_f64().unwrap_or(0.0),
        before["slotSeconds"],
    );
    warn_unreachable(before);
    warn_unreachable(after);
    if after["seconds"].as_f64().unwrap_or(0.0) <= 0.0 {
        eprintln!("the window after the change has not begun yet: ask again in a little while");
    }
    println!();
    if view != "routes" {
        println!("BEFORE");
        print_window(view, before);
        println!();
        println!("AFTER");
        print_window(view, after);
        return;
    }
    // Routes side by side, one line per route and backend.
    let key = |row: &Value, backend: &Value| {
        (text(&row["namespace"]), text(&row["service"]), route_name(&row["route"]), text(backend))
    };
    let mut lines: std::collections::BTreeMap<(String, String, String, String), [Option<Value>; 2]> =
        std::collections::BTreeMap::new();
    for (side, window) in [before, after].into_iter().enumerate() {
        for row in window["rows"].as_array().into_iter().flatten() {
            lines.entry(key(row, &Value::from("(all)"))).or_default()[side] = Some(row.clone());
            for backend in row["backends"].as_array().into_iter().flatten() {
                lines.entry(key(row, &backend["backend"])).or_default()[side] = Some(backend.clone());
            }
        }
    }
    if lines.is_empty() {
        eprintln!("no route traffic before or after this change");
        return;
    }
    let mut table =
        vec![header(&["NAMESPACE", "SERVICE", "ROUTE", "BACKEND", "SPLIT", "SUCCESS", "RPS", "P50", "P99"])];
    let pair = |sides: &[Option<Value>; 2], show: &dyn Fn(&Value) -> String| {
        let one = |side: &Option<Value>| side.as_ref().map_or_else(|| "-".to_string(), show);
        format!("{} → {}", one(&sides[0]), one(&sides[1]))
    };
    for ((namespace, service, route, backend), sides) in lines {
        let split = if backend == "(all)" { "-".to_string() } else { pair(&sides, &|v| percent(&v["share"])) };
        table.push(vec![
            namespace,
            service,
            route,
            backend,
            split,
            pair(&sides, &|v| percent(&v["successRate"])),
            pair(&sides, &|v| rps(&v["rps"])),
            pair(&sides, &|v| latency(&v["p50Ms"])),
            pair(&sides, &|v| latency(&v["p99Ms"])),
        ]);
    }
    print_rows(&table);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn figures_read_as_an_operator_expects() {
        assert_eq!(latency(&json!(0.4234)), "0.42ms");
        assert_eq!(latency(&json!(42.34)), "42.3ms");
        assert_eq!(latency(&json!(4234.0)), "4234ms");
        assert_eq!(latency(&json!(52_000.0)), "52.0s");
        assert_eq!(latency(&Value::Null), "-");
        assert_eq!(percent(&json!(0.999)), "99.90%");
        assert_eq!(percent(&json!(1.0)), "100.00%");
        assert_eq!(percent(&Value::Null), "-");
        assert_eq!(route_name(&json!("HTTPRoute/default/reviews#2")), "default/reviews#2");
        assert_eq!(route_name(&json!("")), "[default]");
    }

    #[test]
    fn every_line_of_every_table_has_a_cell_per_column() {
        let row = json!({
            "namespace": "default", "name": "reviews", "service": "reviews", "route": "HTTPRoute/default/r",
            "successRate": 0.99, "rps": 12.0, "p50Ms": 1.0, "p95Ms": 2.0, "p99Ms": 3.0, "tcpConnections": 2,
            "mtlsShare": 1.0, "tries": 5, "retryRatio": 0.1, "mtls": true, "policy": "default/p", "allowed": 3,
            "denied": 0, "address": "127.0.0.1:1", "workload": "r-1", "reporter": "default/web",
            "latencyEstimateMs": 1.5, "inFlight": 0, "ejectedForMs": 0,
            "source": {"service": "default/web", "identity": "spiffe://td/ns/default/sa/web"},
            "destination": {"service": "default/reviews", "identity": "spiffe://td/ns/default/sa/reviews"},
            "backends": [{"backend": "default/reviews", "share": 1.0, "successRate": 1.0, "rps": 1.0, "tries": {"requests": 5}}],
        });
        let rows = [row];
        for table in [
            golden_table(&rows, false),
            golden_table(&rows, true),
            routes(&rows),
            edges(&rows),
            authz(&rows),
            endpoints(&rows),
        ] {
            let columns = table[0].len();
            assert!(table.iter().all(|line| line.len() == columns), "{table:?}");
        }
    }
}
