//! `weft tap` and `weft top`: live requests, streamed by the control plane from the
//! proxies (`GET /api/v1/tap`), for as long as the command runs.
//!
//! `tap` prints each request with why the mesh did what it did (or the API's JSON with
//! `-o json`); `top` folds them into a table by method and path, redrawn in place every
//! second.

use std::{collections::HashMap, io::IsTerminal, time::Duration};

use anyhow::{bail, Context};
use bytes::{Buf, BytesMut};
use http_body_util::BodyExt;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde_json::Value;

use crate::cli::{format_rows, ApiClient, Output};

/// What to tap, as the command line says it.
pub struct TapQuery {
    /// A Service (`NAME`, `NS/NAME`) or `workload/NAME` (`wl/NAME`, `workload/NS/NAME`).
    pub target: String,
    pub namespace: String,
    pub method: Option<String>,
    pub path_prefix: Option<String>,
    pub status: Option<String>,
    pub route: Option<String>,
    pub max_rps: f64,
    pub headers: Vec<String>,
}

/// Whether a target names a workload, and its `namespace/name`.
fn target(query: &TapQuery) -> anyhow::Result<(bool, String)> {
    let (workload, rest) = match query.target.split_once('/') {
        Some(("workload" | "workloads" | "wl", rest)) => (true, rest),
        Some(("service" | "services" | "svc", rest)) => (false, rest),
        _ => (false, query.target.as_str()),
    };
    let name = match rest.split('/').collect::<Vec<_>>().as_slice() {
        [name] if !name.is_empty() => format!("{}/{name}", query.namespace),
        [ns, name] if !ns.is_empty() && !name.is_empty() => format!("{ns}/{name}"),
        _ => bail!("tap a Service (NAME or NS/NAME) or a workload (workload/NAME), not {:?}", query.target),
    };
    Ok((workload, name))
}

/// The API path a query asks for.
fn api_path(query: &TapQuery) -> anyhow::Result<String> {
    let (workload, name) = target(query)?;
    let encode = |value: &str| utf8_percent_encode(value, NON_ALPHANUMERIC).to_string();
    let mut parts = vec![format!("{}={}", if workload { "workload" } else { "service" }, encode(&name))];
    let optional = [
        ("method", &query.method),
        ("pathPrefix", &query.path_prefix),
        ("status", &query.status),
        ("route", &query.route),
    ];
    for (key, value) in optional {
        if let Some(value) = value {
            parts.push(format!("{key}={}", encode(value)));
        }
    }
    parts.push(format!("maxRps={}", query.max_rps));
    if !query.headers.is_empty() {
        parts.push(format!("headers={}", encode(&query.headers.join(","))));
    }
    Ok(format!("/api/v1/tap?{}", parts.join("&")))
}

/// The lines of a streamed answer, each a JSON object.
struct Lines {
    body: hyper::body::Incoming,
    buffer: BytesMut,
}

impl Lines {
    /// The next line; `None` when the server ended the stream. Cancel-safe: a frame is
    /// taken whole into the buffer or not at all.
    async fn next(&mut self) -> anyhow::Result<Option<Value>> {
        loop {
            if let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                let line = self.buffer.split_to(end + 1);
                if line.len() <= 1 {
                    continue;
                }
                return serde_json::from_slice(&line[..end])
                    .map(Some)
                    .context("the control plane sent a tap line that is not JSON");
            }
            match self.body.frame().await {
                Some(frame) => {
                    let frame = frame.context("the tap stream broke")?;
                    if let Ok(mut data) = frame.into_data() {
                        while data.has_remaining() {
                            let chunk = data.chunk();
                            self.buffer.extend_from_slice(chunk);
                            let n = chunk.len();
                            data.advance(n);
                        }
                    }
                }
                None => return Ok(None),
            }
        }
    }
}

async fn open(api: &ApiClient, query: &TapQuery) -> anyhow::Result<Lines> {
    let body = api.stream(&api_path(query)?).await?;
    Ok(Lines { body, buffer: BytesMut::new() })
}

/// Says on stderr what the opening line says is tapped.
fn announce(opening: &Value) {
    let tapping = &opening["tapping"];
    let target = tapping["target"]
        .as_object()
        .and_then(|t| t.iter().next())
        .map(|(kind, name)| format!("{kind} {}", name.as_str().unwrap_or("?")))
        .unwrap_or_default();
    let proxies = tapping["proxies"].as_u64().unwrap_or(0);
    let mut message = format!(
        "tapping {target}: at most {} requests/s, from {proxies} prox{} on replica {}",
        tapping["maxRps"],
        if proxies == 1 { "y" } else { "ies" },
        tapping["replica"].as_str().unwrap_or("?"),
    );
    if proxies == 0 {
        message.push_str(" (none yet: the session waits for them)");
    }
    eprintln!("{message}; Ctrl-C to stop");
}

/// `weft tap TARGET`.
pub async fn tap(api: &ApiClient, query: &TapQuery, output: Output) -> anyhow::Result<()> {
    let mut lines = open(api, query).await?;
    while let Some(line) = lines.next().await? {
        if line.get("tapping").is_some() {
            announce(&line);
        } else if let Some(event) = line.get("event") {
            match output {
                Output::Json | Output::Yaml => println!("{event}"),
                Output::Table => print!("{}", describe(event)),
            }
        } else if let Some(notice) = line["notice"].as_str() {
            eprintln!("warning: {notice}");
        }
    }
    bail!("the control plane ended the tap session")
}

fn text(value: &Value) -> &str {
    value.as_str().unwrap_or("-")
}

fn millis(value: &Value) -> String {
    format!("{:.1}ms", value.as_f64().unwrap_or(0.0))
}

/// One event as lines: the request, then why.
fn describe(event: &Value) -> String {
    let outbound = event["direction"] == "outbound";
    let party = |side: &Value| match (side["service"].as_str(), side["identity"].as_str()) {
        (Some(service), _) => service.to_string(),
        (None, Some(identity)) => identity.to_string(),
        (None, None) => "(plaintext)".to_string(),
    };
    let time = text(&event["time"]);
    let clock = time.split_once('T').map_or(time, |(_, clock)| clock.trim_end_matches('Z'));
    let mut out = format!(
        "{clock} {} {} -> {} {} {}{} {}{} {} {}B/{}B{}\n",
        if outbound { "OUT" } else { "IN " },
        party(&event["source"]),
        party(&event["destination"]),
        text(&event["method"]),
        text(&event["authority"]),
        text(&event["path"]),
        event["status"],
        event["error"].as_str().map(|e| format!(" weft-error={e}")).unwrap_or_default(),
        millis(&event["durationMs"]),
        event["bytesIn"],
        event["bytesOut"],
        if event["tls"] == true { " mtls" } else { "" },
    );
    let why = &event["why"];
    if let Some(route) = why["route"].as_str() {
        let path = why["httpRoute"].as_str().map(|p| format!(" (path {p})")).unwrap_or_default();
        out.push_str(&format!("    route {route}{path}\n"));
    }
    if let Some(backend) = why["backend"].as_str() {
        let split = match (why["backendWeight"].as_u64(), why["totalWeight"].as_u64()) {
            (Some(weight), Some(total)) => format!(" (weight {weight} of {total})"),
            _ => String::new(),
        };
        out.push_str(&format!("    backend {backend}{split}\n"));
    }
    for t in why["tries"].as_array().into_iter().flatten() {
        let answer = match (t["status"].as_u64(), t["error"].as_str()) {
            (_, Some(error)) => error.to_string(),
            (Some(status), None) => status.to_string(),
            (None, None) => "-".to_string(),
        };
        let mut line = format!(
            "    try {} {} (estimate {}, {} in flight) {answer} in {} -> {}",
            t["number"],
            text(&t["endpoint"]),
            millis(&t["estimateMs"]),
            t["inFlight"],
            millis(&t["durationMs"]),
            text(&t["then"]),
        );
        if let Some(left) = t["budgetLeft"].as_u64() {
            line.push_str(&format!(" (retry budget left: {left})"));
        }
        if let Some(ms) = t["ejectedMs"].as_u64() {
            line.push_str(&format!("; endpoint ejected for {ms}ms"));
        }
        let skipped: Vec<&str> =
            t["skippedEjected"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        if !skipped.is_empty() {
            line.push_str(&format!("; ejected, skipped: {}", skipped.join(", ")));
        }
        out.push_str(&line);
        out.push('\n');
    }
    if let Some(authz) = why["authz"].as_object() {
        let policy = authz.get("policy").and_then(Value::as_str).unwrap_or("(default)");
        out.push_str(&format!("    authz {} by {policy}\n", text(&authz["verdict"])));
    }
    if !outbound {
        if let Some(endpoint) = why["endpoint"].as_str() {
            out.push_str(&format!("    to the application at {endpoint}\n"));
        }
    }
    if let Some(trace) = event["traceId"].as_str() {
        out.push_str(&format!("    trace {trace}\n"));
    }
    for (name, value) in event["headers"].as_object().into_iter().flatten() {
        out.push_str(&format!("    {name}: {}\n", value.as_str().map_or_else(|| value.to_string(), str::to_string)));
    }
    out
}

/// One method and path's requests, as `weft top` counts them.
#[derive(Debug, Default, PartialEq)]
struct Row {
    count: u64,
    successes: u64,
    best: f64,
    worst: f64,
    last: f64,
}

/// Requests by method and path.
#[derive(Debug, Default)]
struct Table {
    rows: HashMap<(String, String), Row>,
}

impl Table {
    /// Counts `event` once per request: from the caller's side (outbound), or inbound
    /// when the caller was plaintext (it has no outbound side in the mesh).
    fn add(&mut self, event: &Value) {
        let outbound = event["direction"] == "outbound";
        if !outbound && event["source"]["identity"].is_string() {
            return;
        }
        let path = text(&event["path"]);
        let path = path.split_once('?').map_or(path, |(path, _)| path);
        let key = (text(&event["method"]).to_string(), path.to_string());
        let latency = event["durationMs"].as_f64().unwrap_or(0.0);
        // As the golden signals count: a 4xx is the application's answer.
        let success = event["status"].as_u64().is_some_and(|s| s < 500) && event["error"].is_null();
        let row = self.rows.entry(key).or_default();
        row.best = if row.count == 0 { latency } else { row.best.min(latency) };
        row.worst = row.worst.max(latency);
        row.last = latency;
        row.count += 1;
        row.successes += u64::from(success);
    }

    fn render(&self, limit: usize) -> String {
        let mut rows: Vec<_> = self.rows.iter().collect();
        rows.sort_by(|a, b| b.1.count.cmp(&a.1.count).then_with(|| a.0.cmp(b.0)));
        let mut table =
            vec![["METHOD", "PATH", "COUNT", "BEST", "WORST", "LAST", "SUCCESS"].map(String::from).to_vec()];
        for ((method, path), row) in rows.into_iter().take(limit) {
            table.push(vec![
                method.clone(),
                path.clone(),
                row.count.to_string(),
                format!("{:.1}ms", row.best),
                format!("{:.1}ms", row.worst),
                format!("{:.1}ms", row.last),
                format!("{:.1}%", 100.0 * row.successes as f64 / row.count as f64),
            ]);
        }
        format_rows(&table)
    }
}

/// `weft top SERVICE`.
pub async fn top(api: &ApiClient, query: &TapQuery, interval: Duration) -> anyhow::Result<()> {
    if target(query)?.0 {
        bail!("weft top takes a Service; watch a workload's requests with weft tap workload/NAME");
    }
    let mut lines = open(api, query).await?;
    let terminal = std::io::stdout().is_terminal();
    let mut table = Table::default();
    let mut heading = String::new();
    let mut redraw = tokio::time::interval(interval);
    loop {
        tokio::select! {
            line = lines.next() => match line? {
                Some(line) if line.get("tapping").is_some() => {
                    let tapping = &line["tapping"];
                    heading = format!(
                        "{} (at most {} requests/s tapped)",
                        tapping["target"]["service"].as_str().unwrap_or("?"),
                        tapping["maxRps"]
                    );
                }
                Some(line) => match line.get("event") {
                    Some(event) => table.add(event),
                    None => {
                        if let Some(notice) = line["notice"].as_str() {
                            eprintln!("warning: {notice}");
                        }
                    }
                },
                None => bail!("the control plane ended the tap session"),
            },
            _ = redraw.tick() => {
                let rows = if terminal { terminal_rows().saturating_sub(3) } else { usize::MAX };
                let screen = format!("{heading}\n\n{}", table.render(rows));
                if terminal {
                    // Home, clear, draw: the table refreshes in place.
                    print!("\x1b[H\x1b[2J{screen}");
                } else {
                    println!("{screen}");
                }
                use std::io::Write;
                let _ = std::io::stdout().flush();
            }
        }
    }
}

/// The terminal's height, from `LINES`, else a usual 24.
fn terminal_rows() -> usize {
    std::env::var("LINES").ok().and_then(|l| l.parse().ok()).unwrap_or(24)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn query(target: &str) -> TapQuery {
        TapQuery {
            target: target.into(),
            namespace: "shop".into(),
            method: Some("GET".into()),
            path_prefix: Some("/a b".into()),
            status: Some("5xx".into()),
            route: None,
            max_rps: 10.0,
            headers: vec!["x-request-id".into(), "x-b3".into()],
        }
    }

    #[test]
    fn targets_become_query_strings() {
        assert_eq!(
            api_path(&query("reviews")).unwrap(),
            "/api/v1/tap?service=shop%2Freviews&method=GET&pathPrefix=%2Fa%20b&status=5xx&maxRps=10&headers=x%2Drequest%2Did%2Cx%2Db3"
        );
        assert!(api_path(&query("other/reviews")).unwrap().starts_with("/api/v1/tap?service=other%2Freviews&"));
        assert!(api_path(&query("workload/front-1")).unwrap().starts_with("/api/v1/tap?workload=shop%2Ffront%2D1&"));
        assert!(api_path(&query("wl/ns/front-1")).unwrap().starts_with("/api/v1/tap?workload=ns%2Ffront%2D1&"));
        assert!(api_path(&query("a/b/c")).is_err());
        assert!(api_path(&query("workload/")).is_err());
    }

    #[test]
    fn top_counts_each_request_once_by_method_and_path() {
        let mut table = Table::default();
        let event = |direction: &str, caller: Value, path: &str, status: u64, ms: f64| {
            json!({"direction": direction, "source": {"identity": caller}, "method": "GET", "path": path,
                   "status": status, "error": null, "durationMs": ms})
        };
        let meshed = json!("spiffe://weft.local/ns/shop/sa/front");
        table.add(&event("outbound", meshed.clone(), "/items?id=1", 200, 3.0));
        table.add(&event("inbound", meshed.clone(), "/items?id=1", 200, 2.0));
        table.add(&event("outbound", meshed.clone(), "/items?id=2", 503, 9.0));
        table.add(&event("inbound", Value::Null, "/items", 404, 1.0));
        let row = &table.rows[&("GET".to_string(), "/items".to_string())];
        assert_eq!(*row, Row { count: 3, successes: 2, best: 1.0, worst: 9.0, last: 1.0 });
        let rendered = table.render(10);
        assert!(rendered.contains("66.7%"), "{rendered}");
    }

    #[test]
    fn an_event_reads_with_its_why() {
        let event = json!({
            "time": "2026-12-05T10:00:00.123Z", "direction": "outbound",
            "source": {"service": "shop/front", "identity": null}, "destination": {"service": "shop/reviews", "identity": null},
            "method": "GET", "authority": "reviews", "path": "/r", "status": 200, "error": null, "durationMs": 4.25,
            "bytesIn": 0, "bytesOut": 12, "tls": true, "traceId": null, "headers": {"x-request-id": "abc"},
            "why": {"route": "HTTPRoute/shop/split", "httpRoute": "/r", "backend": "shop/reviews-v2",
                    "backendWeight": 10, "totalWeight": 100, "authz": null, "endpoint": "127.0.0.1:2",
                    "tries": [{"number": 1, "endpoint": "127.0.0.1:1", "estimateMs": 1.0, "inFlight": 0,
                               "status": 503, "error": null, "durationMs": 1.0, "then": "retried",
                               "budgetLeft": 3, "ejectedMs": 30000, "skippedEjected": []}]}
        });
        let text = describe(&event);
        assert!(
            text.starts_with("10:00:00.123 OUT shop/front -> shop/reviews GET reviews/r 200 4.2ms 0B/12B mtls"),
            "{text}"
        );
        assert!(text.contains("route HTTPRoute/shop/split (path /r)"), "{text}");
        assert!(text.contains("backend shop/reviews-v2 (weight 10 of 100)"), "{text}");
        assert!(
            text.contains("503 in 1.0ms -> retried (retry budget left: 3); endpoint ejected for 30000ms"),
            "{text}"
        );
        assert!(text.contains("x-request-id: abc"), "{text}");
    }
}
