//! `GET /api/v1/stat/{view}`: the golden signals of Services, workloads, routes and
//! edges over a window (`weft stat`), the authorization decisions by policy and the
//! endpoints' learned state (for the dashboard), and the audit log's changes in that
//! window. With `aroundRevision=N`, the window before the change at store revision N
//! and the window after it, side by side.
//!
//! Every view is a grouping of the same series (`crate::telemetry`), merged over every
//! replica first. What each view counts:
//! - services and workloads: what the Service's own proxies served (inbound rows), so a
//!   Service with ten callers is judged once; a Service without meshed instances of its
//!   own (an unmeshed one, or a route's backend such as a canary's `reviews-v2`) is
//!   judged by its callers (outbound rows), and says so (`measuredBy`);
//! - routes: what callers saw per route (after retries), and per backend the requests
//!   the split sent it and every try (a retried request is several);
//! - edges: caller to callee with both identities, from the caller's proxy (outbound
//!   rows); callers without a proxy appear from the callee's side, as `(unmeshed)`.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use axum::{
    extract::{Path, Query, State},
    http::StatusCode,
    Json,
};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use weft_api::{
    sketch::CompactSketch,
    telemetry::{Direction, RowKind},
};

use super::ApiError;
use crate::{
    discovery::Hub,
    telemetry::{
        series::{SeriesKey, SlotSignals, TcpTotals},
        service::{mesh_window, now_millis},
        window::{SlotRange, WindowLength, TIERS},
        WindowSeries,
    },
};

/// Quantiles every row shows.
const QUANTILES: [(&str, f64); 3] = [("p50Ms", 0.5), ("p95Ms", 0.95), ("p99Ms", 0.99)];

/// The source named for callers that have no proxy (no identity).
pub const UNMESHED: &str = "(unmeshed)";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct StatParams {
    namespace: Option<String>,
    /// A Service (services, routes, endpoints), workload or route name.
    name: Option<String>,
    window: Option<String>,
    around_revision: Option<u64>,
    /// Also the rows of every slot of the window, oldest first (`series`): what charts
    /// draw.
    #[serde(default)]
    series: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum View {
    Services,
    Workloads,
    Routes,
    Edges,
    Authz,
    Endpoints,
}

impl View {
    fn parse(text: &str) -> Result<View, ApiError> {
        match text {
            "services" | "service" | "svc" => Ok(View::Services),
            "workloads" | "workload" => Ok(View::Workloads),
            "routes" | "route" => Ok(View::Routes),
            "edges" | "edge" => Ok(View::Edges),
            "authz" | "authorization" => Ok(View::Authz),
            "endpoints" | "endpoint" => Ok(View::Endpoints),
            _ => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no stat view {text:?}: use services, workloads, routes, edges, authz or endpoints"),
            )),
        }
    }

    fn name(self) -> &'static str {
        match self {
            View::Services => "services",
            View::Workloads => "workloads",
            View::Routes => "routes",
            View::Edges => "edges",
            View::Authz => "authz",
            View::Endpoints => "endpoints",
        }
    }
}

/// The window a request asks for (`1m` when it names none).
pub(super) fn window_length(asked: Option<&str>) -> Result<WindowLength, ApiError> {
    asked.unwrap_or("1m").parse().map_err(|message: String| ApiError::new(StatusCode::BAD_REQUEST, message))
}

/// Which rows a request wants.
pub(super) struct Filter {
    pub(super) namespace: String,
    pub(super) name: Option<String>,
}

impl Filter {
    /// Whether `namespace/name` is wanted (by namespace, and by name when one is given).
    pub(super) fn wants(&self, qualified: &str) -> bool {
        let (namespace, name) = qualified.split_once('/').unwrap_or(("", qualified));
        (self.namespace.is_empty() || namespace == self.namespace) && self.name.as_deref().is_none_or(|n| n == name)
    }

    pub(super) fn in_namespace(&self, qualified: &str) -> bool {
        self.namespace.is_empty() || qualified.split_once('/').is_some_and(|(namespace, _)| namespace == self.namespace)
    }
}

pub(super) async fn stat(
    State(hub): State<Arc<Hub>>,
    Path(view): Path<String>,
    Query(params): Query<StatParams>,
) -> Result<Json<Value>, ApiError> {
    let view = View::parse(&view)?;
    let length = window_length(params.window.as_deref())?;
    let filter = Filter { namespace: params.namespace.clone().unwrap_or_default(), name: params.name.clone() };
    let now = now_millis();
    let Some(revision) = params.around_revision else {
        let range = SlotRange::recent(length, now / 1000);
        let mut answer = window_answer(&hub, view, range, &filter, now).await;
        answer.insert("view".into(), json!(view.name()));
        answer.insert("window".into(), json!(length.label()));
        if params.series {
            answer.insert("series".into(), Value::Array(slot_series(&hub, view, range, &filter, now).await));
        }
        return Ok(Json(Value::Object(answer)));
    };
    let changes = crate::audit::list(&hub.catalog, None, None, usize::MAX);
    let changed: Vec<_> = changes.iter().filter(|entry| entry.revision == revision).collect();
    let Some(applied_at) = changed.iter().map(|entry| entry.time).min() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no change has store revision {revision} in the audit log (see weft history)"),
        ));
    };
    let (before, after) = SlotRange::around(length, applied_at, now / 1000)
        .map_err(|message| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, message))?;
    let before = window_answer(&hub, view, before, &filter, now).await;
    let after = window_answer(&hub, view, after, &filter, now).await;
    Ok(Json(json!({
        "view": view.name(),
        "window": length.label(),
        "revision": revision,
        "appliedAt": applied_at,
        "change": changed.iter().map(|entry| change_json(entry)).collect::<Vec<_>>(),
        "before": before,
        "after": after,
    })))
}

/// The rows of `view` in each slot of `range`, oldest first: `{from, seconds, rows}`,
/// with rates over the time each slot covers (the slot in progress covers less).
async fn slot_series(hub: &Hub, view: View, range: SlotRange, filter: &Filter, now: u64) -> Vec<Value> {
    let slot = TIERS[range.tier].slot_seconds;
    let mut points = Vec::new();
    let mut from = range.from;
    while from < range.to && from * 1000 <= now {
        let one = SlotRange { tier: range.tier, from, to: from + slot };
        let (series, _) = mesh_window(hub, one, &filter.namespace).await;
        let seconds = one.covered_seconds(now, series.since_millis);
        points.push(json!({"from": from, "seconds": seconds, "rows": view_rows(hub, view, &series, filter, seconds)}));
        from += slot;
    }
    points
}

/// The rows of `view` over `series`.
fn view_rows(hub: &Hub, view: View, series: &WindowSeries, filter: &Filter, seconds: f64) -> Vec<Value> {
    match view {
        View::Services => services(hub, series, filter, seconds),
        View::Workloads => workloads(hub, series, filter, seconds),
        View::Routes => routes(series, filter, seconds),
        View::Edges => edges(series, filter, seconds),
        View::Authz => authz(series, filter),
        View::Endpoints => endpoints(series, filter),
    }
}

/// One window of `view`: its rows, what it covers, the changes made in it.
async fn window_answer(hub: &Hub, view: View, range: SlotRange, filter: &Filter, now: u64) -> Map<String, Value> {
    let (series, unreachable) = mesh_window(hub, range, &filter.namespace).await;
    let seconds = range.covered_seconds(now, series.since_millis);
    let rows = view_rows(hub, view, &series, filter, seconds);
    let end = (range.to * 1000).min(now) / 1000;
    let changes: Vec<Value> = crate::audit::list(&hub.catalog, None, None, usize::MAX)
        .iter()
        .filter(|entry| (range.from..=end).contains(&entry.time))
        .map(change_json)
        .collect();
    let mut answer = Map::new();
    answer.insert("from".into(), json!(range.from));
    answer.insert("to".into(), json!(end));
    answer.insert("seconds".into(), json!(seconds));
    answer.insert("slotSeconds".into(), json!(TIERS[range.tier].slot_seconds));
    answer.insert("rows".into(), Value::Array(rows));
    answer.insert("changes".into(), Value::Array(changes));
    answer.insert("unreachableReplicas".into(), Value::Array(unreachable));
    answer
}

fn change_json(entry: &crate::audit::AuditEntry) -> Value {
    json!({
        "revision": entry.revision,
        "time": entry.time,
        "action": entry.action,
        "kind": entry.subject.kind,
        "namespace": entry.subject.namespace,
        "name": entry.subject.name,
        "by": entry.operator.name,
    })
}

/// The golden signals of `signals` over `seconds`: counts, rates, quantiles (null
/// where there is nothing to say).
fn golden(signals: Option<&SlotSignals>, seconds: f64) -> Map<String, Value> {
    let empty = SlotSignals::default();
    let signals = signals.unwrap_or(&empty);
    let mut row = Map::new();
    row.insert("requests".into(), json!(signals.requests));
    row.insert("failures".into(), json!(signals.failures));
    row.insert("successRate".into(), json!(signals.success_rate()));
    row.insert("rps".into(), json!(if seconds > 0.0 { signals.requests as f64 / seconds } else { 0.0 }));
    for (name, q) in QUANTILES {
        row.insert(name.into(), json!(signals.latency.quantile_nanos(q).map(|nanos| nanos / 1e6)));
    }
    let classes: Map<String, Value> = signals
        .status_classes
        .iter()
        .enumerate()
        .filter(|(_, count)| **count > 0)
        .map(|(class, count)| (format!("{}xx", class + 1), json!(count)))
        .collect();
    row.insert("statusClasses".into(), Value::Object(classes));
    let grpc: Map<String, Value> =
        signals.grpc_statuses.iter().map(|(code, count)| (code.to_string(), json!(count))).collect();
    if !grpc.is_empty() {
        row.insert("grpcStatuses".into(), Value::Object(grpc));
    }
    row.insert("transportErrors".into(), json!(signals.transport_errors));
    row
}

fn split(qualified: &str) -> (&str, &str) {
    qualified.split_once('/').unwrap_or(("", qualified))
}

/// Requests and those of them over mutual TLS, for the mTLS share. Latency sketches are
/// gathered and merged once, when the group is complete ([`Group::settle`]): a Service
/// with many callers would otherwise re-encode its growing sketch for each.
#[derive(Default)]
struct Group<'a> {
    signals: SlotSignals,
    latencies: Vec<&'a CompactSketch>,
    mtls: u64,
    tcp: Option<TcpTotals>,
}

impl<'a> Group<'a> {
    fn add(&mut self, key: &SeriesKey, signals: &'a SlotSignals) {
        self.signals.merge_counts(signals);
        self.latencies.push(&signals.latency);
        if key.tls {
            self.mtls += signals.requests;
        }
    }

    /// Merges the gathered latencies into `signals`.
    fn settle(&mut self) {
        if !self.latencies.is_empty() {
            let merged = CompactSketch::merge_all(self.latencies.drain(..).chain([&self.signals.latency]));
            self.signals.latency = merged;
        }
    }

    fn add_tcp(&mut self, totals: &TcpTotals) {
        self.tcp.get_or_insert_with(TcpTotals::default).group(totals);
    }

    fn row(&self, seconds: f64) -> Map<String, Value> {
        let mut row = golden(Some(&self.signals), seconds);
        let share = (self.signals.requests > 0).then(|| self.mtls as f64 / self.signals.requests as f64);
        row.insert("mtlsShare".into(), json!(share));
        let tcp = self.tcp.clone().unwrap_or_default();
        row.insert("tcpConnections".into(), json!(tcp.open));
        row.insert("tcpOpened".into(), json!(tcp.opened));
        row.insert("tcpBytesSent".into(), json!(tcp.bytes_sent));
        row.insert("tcpBytesReceived".into(), json!(tcp.bytes_received));
        row
    }
}

/// Every Service resource `filter` wants, as `namespace/name`: the Services a view
/// shows whether or not they had traffic.
pub(super) fn service_names(hub: &Hub, filter: &Filter) -> BTreeSet<String> {
    hub.world()
        .resources()
        .iter()
        .filter(|r| r.kind() == weft_model::ResourceKind::Service)
        .map(|r| format!("{}/{}", r.metadata.namespace, r.metadata.name))
        .filter(|qualified| filter.wants(qualified))
        .collect()
}

fn services(hub: &Hub, series: &WindowSeries, filter: &Filter, seconds: f64) -> Vec<Value> {
    let mut served: BTreeMap<String, Group> = BTreeMap::new();
    let mut called: BTreeMap<String, Group> = BTreeMap::new();
    for (key, signals) in &series.requests {
        if key.kind != RowKind::Request {
            continue;
        }
        if key.direction == Direction::Inbound {
            if filter.wants(&key.destination) {
                served.entry(key.destination.to_string()).or_default().add(key, signals);
            }
            continue;
        }
        // Callers' view: of the Service they addressed, and of the backend Service a
        // route sent them to (a canary's `reviews-v2` has no instances of its own: its
        // workloads register as `reviews`).
        for service in [&key.destination, &key.backend] {
            if !service.is_empty()
                && filter.wants(service)
                && (service == &key.destination || key.backend != key.destination)
            {
                called.entry(service.to_string()).or_default().add(key, signals);
            }
        }
    }
    for (key, totals) in &series.tcp {
        if key.direction == Direction::Inbound && filter.wants(&key.destination) {
            served.entry(key.destination.to_string()).or_default().add_tcp(totals);
        }
    }
    // Every Service there is, with traffic or not; and any that had traffic.
    let mut names = service_names(hub, filter);
    names.extend(served.keys().cloned());
    names.extend(called.keys().cloned());
    served.values_mut().chain(called.values_mut()).for_each(Group::settle);
    names
        .into_iter()
        .map(|qualified| {
            let (namespace, name) = split(&qualified);
            let (group, measured_by) = match (served.get(&qualified), called.get(&qualified)) {
                (Some(group), _) => (Some(group), "service"),
                (None, Some(group)) => (Some(group), "callers"),
                (None, None) => (None, "none"),
            };
            let mut row = group.map_or_else(|| Group::default().row(seconds), |g| g.row(seconds));
            row.insert("namespace".into(), json!(namespace));
            row.insert("name".into(), json!(name));
            row.insert("measuredBy".into(), json!(measured_by));
            Value::Object(row)
        })
        .collect()
}

fn workloads(hub: &Hub, series: &WindowSeries, filter: &Filter, seconds: f64) -> Vec<Value> {
    let mut groups: BTreeMap<String, (String, Group)> = BTreeMap::new();
    for (key, signals) in &series.requests {
        if key.direction != Direction::Inbound || !filter.wants(&key.workload) {
            continue;
        }
        let entry =
            groups.entry(key.workload.to_string()).or_insert_with(|| (key.destination.to_string(), Group::default()));
        entry.1.add(key, signals);
    }
    for (key, totals) in &series.tcp {
        if key.direction == Direction::Inbound && filter.wants(&key.workload) {
            let entry = groups
                .entry(key.workload.to_string())
                .or_insert_with(|| (key.destination.to_string(), Group::default()));
            entry.1.add_tcp(totals);
        }
    }
    // Registered workloads without traffic too.
    for entry in hub.registry.entries() {
        let registration = &entry.registration;
        let qualified = format!("{}/{}", registration.namespace, registration.proxy_id);
        if filter.wants(&qualified) {
            groups
                .entry(qualified)
                .or_insert_with(|| (format!("{}/{}", registration.namespace, registration.service), Group::default()));
        }
    }
    groups
        .into_iter()
        .map(|(qualified, (service, mut group))| {
            group.settle();
            let (namespace, name) = split(&qualified);
            let mut row = group.row(seconds);
            row.insert("namespace".into(), json!(namespace));
            row.insert("name".into(), json!(name));
            row.insert("service".into(), json!(split(&service).1));
            Value::Object(row)
        })
        .collect()
}

/// One route's rows: what callers saw (and how much of it over mutual TLS), and per
/// backend its share and its tries.
#[derive(Default)]
struct RouteGroup {
    requests: SlotSignals,
    mtls: u64,
    backends: BTreeMap<String, (SlotSignals, SlotSignals)>,
}

fn routes(series: &WindowSeries, filter: &Filter, seconds: f64) -> Vec<Value> {
    let mut groups: BTreeMap<(String, String), RouteGroup> = BTreeMap::new();
    for (key, signals) in &series.requests {
        if key.direction != Direction::Outbound || !filter.in_namespace(&key.destination) {
            continue;
        }
        let route_name = key.route.rsplit('/').next().unwrap_or_default().split('#').next().unwrap_or_default();
        let service_name = split(&key.destination).1;
        if let Some(wanted) = &filter.name {
            if wanted != service_name && wanted != route_name {
                continue;
            }
        }
        let group = groups.entry((key.destination.to_string(), key.route.to_string())).or_default();
        let backend = group.backends.entry(key.backend.to_string()).or_default();
        match key.kind {
            RowKind::Try => backend.1.merge(signals),
            _ => {
                group.requests.merge(signals);
                backend.0.merge(signals);
                if key.tls {
                    group.mtls += signals.requests;
                }
            }
        }
    }
    groups
        .into_iter()
        .map(|((destination, route), group)| {
            let (namespace, service) = split(&destination);
            let mut row = golden(Some(&group.requests), seconds);
            row.insert("namespace".into(), json!(namespace));
            row.insert("service".into(), json!(service));
            row.insert("route".into(), json!(route));
            row.insert("retries".into(), json!(group.requests.retries));
            let tries: u64 = group.backends.values().map(|(_, tries)| tries.requests).sum();
            row.insert("tries".into(), json!(tries));
            let ratio =
                (group.requests.requests > 0).then(|| group.requests.retries as f64 / group.requests.requests as f64);
            row.insert("retryRatio".into(), json!(ratio));
            let share = (group.requests.requests > 0).then(|| group.mtls as f64 / group.requests.requests as f64);
            row.insert("mtlsShare".into(), json!(share));
            let backends: Vec<Value> = group
                .backends
                .iter()
                .map(|(backend, (requests, tries))| {
                    let mut row = golden(Some(requests), seconds);
                    row.insert("backend".into(), json!(backend));
                    let share = (group.requests.requests > 0)
                        .then(|| requests.requests as f64 / group.requests.requests as f64);
                    row.insert("share".into(), json!(share));
                    row.insert("tries".into(), Value::Object(golden(Some(tries), seconds)));
                    Value::Object(row)
                })
                .collect();
            row.insert("backends".into(), Value::Array(backends));
            Value::Object(row)
        })
        .collect()
}

/// A caller and a callee: (source service, source identity, destination, destination
/// identity).
type Ends = (String, String, String, String);

/// The window's requests grouped by edge.
fn edge_groups<'a>(series: &'a WindowSeries, filter: &Filter) -> BTreeMap<Ends, Group<'a>> {
    let mut groups: BTreeMap<Ends, Group> = BTreeMap::new();
    for (key, signals) in &series.requests {
        let ends = match (key.direction, key.kind) {
            (Direction::Outbound, RowKind::Request) => (
                key.source_service.to_string(),
                key.source_identity.to_string(),
                key.destination.to_string(),
                key.destination_identity.to_string(),
            ),
            // A caller without a proxy reports nothing; its callee does (in plaintext: a
            // meshed caller comes over mutual TLS, and reports the edge itself).
            (Direction::Inbound, _) if !key.tls => {
                (UNMESHED.to_string(), String::new(), key.destination.to_string(), key.destination_identity.to_string())
            }
            _ => continue,
        };
        let source_in = filter.in_namespace(&ends.0);
        let destination_in = filter.in_namespace(&ends.2);
        if !(source_in || destination_in) {
            continue;
        }
        if let Some(wanted) = &filter.name {
            if split(&ends.0).1 != wanted && split(&ends.2).1 != wanted {
                continue;
            }
        }
        groups.entry(ends).or_default().add(key, signals);
    }
    groups.values_mut().for_each(Group::settle);
    groups
}

fn edges(series: &WindowSeries, filter: &Filter, seconds: f64) -> Vec<Value> {
    edge_groups(series, filter)
        .into_iter()
        .map(|((source, source_identity, destination, destination_identity), group)| {
            let mut row = golden(Some(&group.signals), seconds);
            row.insert("source".into(), json!({"service": source, "identity": source_identity}));
            row.insert("destination".into(), json!({"service": destination, "identity": destination_identity}));
            let share = (group.signals.requests > 0).then(|| group.mtls as f64 / group.signals.requests as f64);
            row.insert("mtlsShare".into(), json!(share));
            row.insert("mtls".into(), json!(group.signals.requests > 0 && group.mtls == group.signals.requests));
            Value::Object(row)
        })
        .collect()
}

fn authz(series: &WindowSeries, filter: &Filter) -> Vec<Value> {
    let mut rows: Vec<_> = series.authz.iter().filter(|(key, _)| filter.wants(&key.service)).collect();
    rows.sort_by(|a, b| a.0.cmp(b.0));
    rows.into_iter()
        .map(|(key, counts)| {
            let (namespace, service) = split(&key.service);
            json!({
                "namespace": namespace,
                "service": service,
                "policy": &*key.policy,
                "allowed": counts.allowed,
                "denied": counts.denied,
            })
        })
        .collect()
}

fn endpoints(series: &WindowSeries, filter: &Filter) -> Vec<Value> {
    let mut rows = Vec::new();
    for (reporter, at, endpoints) in &series.endpoints {
        for endpoint in endpoints.iter().filter(|e| filter.wants(&e.service)) {
            let (namespace, service) = split(&endpoint.service);
            rows.push(json!({
                "reporter": reporter,
                "reportedAt": at / 1000,
                "namespace": namespace,
                "service": service,
                "port": endpoint.port,
                "address": endpoint.address,
                "workload": endpoint.workload,
                "identity": endpoint.identity,
                "latencyEstimateMs": endpoint.latency_estimate_micros as f64 / 1000.0,
                "inFlight": endpoint.in_flight,
                "ejectedForMs": endpoint.ejected_for_millis,
            }));
        }
    }
    rows.sort_by(|a, b| {
        let key = |v: &Value| (v["service"].to_string(), v["address"].to_string(), v["reporter"].to_string());
        key(a).cmp(&key(b))
    });
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn signals(statuses: &[u16]) -> SlotSignals {
        let mut dense = weft_api::signals::Signals::default();
        for status in statuses {
            dense.record(
                weft_api::signals::Outcome::Response { status: *status, grpc_status: None },
                Duration::from_millis(*status as u64 / 10),
            );
        }
        SlotSignals::try_from(&weft_api::telemetry::Signals::from(&dense)).unwrap()
    }

    fn key(direction: Direction, kind: RowKind, backend: &str, tls: bool) -> SeriesKey {
        SeriesKey {
            direction,
            kind,
            workload: "".into(),
            source_service: "a/web".into(),
            source_identity: "spiffe://td/ns/a/sa/web".into(),
            destination: "a/reviews".into(),
            destination_identity: "spiffe://td/ns/a/sa/reviews".into(),
            route: "HTTPRoute/a/reviews".into(),
            backend: backend.into(),
            tls,
        }
    }

    #[test]
    fn routes_show_the_split_and_tries_above_requests() {
        let mut series = WindowSeries::default();
        let mut v1 = signals(&[200, 200, 200]);
        v1.retries = 1;
        series.requests.insert(key(Direction::Outbound, RowKind::Request, "a/reviews-v1", true), v1);
        series.requests.insert(key(Direction::Outbound, RowKind::Request, "a/reviews-v2", true), signals(&[200]));
        series
            .requests
            .insert(key(Direction::Outbound, RowKind::Try, "a/reviews-v1", true), signals(&[503, 200, 200, 200]));
        series.requests.insert(key(Direction::Outbound, RowKind::Try, "a/reviews-v2", true), signals(&[200]));
        let filter = Filter { namespace: String::new(), name: Some("reviews".into()) };
        let rows = routes(&series, &filter, 10.0);
        assert_eq!(rows.len(), 1);
        let route = &rows[0];
        assert_eq!(
            (route["requests"].as_u64(), route["tries"].as_u64(), route["retries"].as_u64()),
            (Some(4), Some(5), Some(1))
        );
        assert_eq!(route["backends"][0]["share"], json!(0.75));
        assert_eq!(route["backends"][0]["tries"]["failures"], json!(1));
        assert_eq!(route["rps"], json!(0.4));

        let rows = edges(&series, &Filter { namespace: "a".into(), name: None }, 10.0);
        assert_eq!(rows.len(), 1, "one edge: tries are not edges");
        assert_eq!(rows[0]["mtls"], json!(true));
        assert_eq!(rows[0]["source"]["identity"], json!("spiffe://td/ns/a/sa/web"));
        assert!(edges(&series, &Filter { namespace: "b".into(), name: None }, 10.0).is_empty());
    }
}
