//! `GET /api/v1/topology`: the dashboard's graph in one answer. Every Service (with
//! traffic or not) with its golden signals, judged as `weft stat services` judges it
//! (by its own proxies, or by its callers when it has none), and every edge between
//! Services (caller and callee merged over identities, as indices into the Service
//! list), over a window (default 1m).
//!
//! It is the dashboard's most frequent and largest question (1,000 Services, 10,000
//! edges, every few seconds), so it is answered from the slots as they are held, in one
//! pass: each slot's counts and latency buckets go straight into their node's and edge's
//! tally ([`SketchSum`]), where `stat` sums each series' slots into a window first and
//! then merges the sums again per group. Only p99 is read, and nothing is re-encoded.
//! The answer is serialised from plain structs, with numbers at the precision the page
//! shows: that halves the bytes gzip has to go through.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
};

use axum::{
    extract::{Query, State},
    Json,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use weft_api::{
    sketch::{CompactSketch, SketchSum},
    telemetry::{Direction, RowKind},
};

use super::{
    stat::{service_names, window_length, Filter, UNMESHED},
    ApiError,
};
use crate::{
    discovery::Hub,
    telemetry::{
        aggregator::touches,
        series::{SeriesKey, SlotSignals},
        service::{now_millis, other_replicas_windows},
        window::SlotRange,
    },
};

#[derive(Deserialize)]
pub(super) struct TopologyParams {
    namespace: Option<String>,
    window: Option<String>,
}

/// What the answer holds per edge, in this order (an edge is an array, not an object:
/// 10,000 edges stay a few hundred kilobytes before gzip).
const EDGE_FIELDS: [&str; 7] = ["source", "destination", "rps", "successRate", "p99Ms", "mtlsShare", "requests"];

/// One edge as sent: the fields of [`EDGE_FIELDS`].
type EdgeRow = (usize, usize, f64, Option<f64>, Option<f64>, Option<f64>, u64);

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Answer {
    window: &'static str,
    seconds: f64,
    revision: u64,
    services: Vec<Node>,
    edge_fields: [&'static str; 7],
    edges: Vec<EdgeRow>,
    unreachable_replicas: Vec<Value>,
}

/// A Service as the graph draws it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Node {
    name: String,
    rps: f64,
    success_rate: Option<f64>,
    p99_ms: Option<f64>,
    mtls_share: Option<f64>,
    /// Whose proxies measured it (`service`, `callers`, `none`); absent for an edge's end
    /// that is no Service (an unmeshed caller).
    #[serde(skip_serializing_if = "Option::is_none")]
    measured_by: Option<&'static str>,
}

pub(super) async fn topology(
    State(hub): State<Arc<Hub>>,
    Query(params): Query<TopologyParams>,
) -> Result<Json<Answer>, ApiError> {
    let length = window_length(params.window.as_deref())?;
    let filter = Filter { namespace: params.namespace.unwrap_or_default(), name: None };
    let now = now_millis();
    let range = SlotRange::recent(length, now / 1000);
    let services = service_names(&hub, &filter);
    // Other replicas answer with their series summed; this one's slots are read as held,
    // under its telemetry's lock, and so is the whole graph: its tallies borrow them.
    let (theirs, unreachable) = other_replicas_windows(&hub, range, &filter.namespace).await;
    let (seconds, services, edges) = hub.aggregator.read_request_series(|mine, since| {
        let mut graph = Graph::new(&filter);
        let local = || {
            mine.iter()
                .filter(|(key, _)| touches(&filter.namespace, &[&key.source_service, &key.destination, &key.workload]))
        };
        let remote = || theirs.iter().flat_map(|window| window.requests.iter());
        // First which Services their own proxies measured, so that their callers' view
        // of them is not tallied for nothing. Only keys are read: the slots are most of
        // the memory a pass goes through.
        for (key, rings) in local() {
            if graph.serves(key) && rings.slots(&range).next().is_some() {
                graph.note_served(key);
            }
        }
        remote().for_each(|(key, _)| {
            if graph.serves(key) {
                graph.note_served(key)
            }
        });
        // Tries (about half the series) are no edge and no Service's signals.
        for (key, rings) in local().filter(|(key, _)| key.kind == RowKind::Request) {
            graph.add(key, rings.slots(&range));
        }
        remote().for_each(|(key, signals)| graph.add(key, std::iter::once(signals)));
        let since = theirs.iter().filter_map(|window| window.since_millis).chain(since).min();
        let seconds = range.covered_seconds(now, since);
        let (services, edges) = graph.answer(&services, seconds);
        (seconds, services, edges)
    });
    let answer = Answer {
        window: length.label(),
        seconds,
        revision: hub.catalog.revision(),
        services,
        edge_fields: EDGE_FIELDS,
        edges,
        unreachable_replicas: unreachable,
    };
    // Serialised straight from the structs: a `Value` would build 80,000 small maps
    // first.
    Ok(Json(answer))
}

/// Sketches read together up to this many; more are summed first (reading together
/// costs the number of sketches per bucket read).
const READ_TOGETHER: usize = 16;

/// A node's or an edge's requests, failures, requests over mutual TLS, and the latency
/// sketches of every slot that went into it, as held: only p99 is read, walking down
/// from their tops together, so no sketch is decoded whole or merged.
#[derive(Default)]
struct Tally<'a> {
    requests: u64,
    failures: u64,
    mtls: u64,
    latencies: Vec<&'a CompactSketch>,
}

impl<'a> Tally<'a> {
    fn add(&mut self, key: &SeriesKey, slots: impl Iterator<Item = &'a SlotSignals>) {
        for signals in slots {
            self.requests = self.requests.saturating_add(signals.requests);
            self.failures = self.failures.saturating_add(signals.failures);
            if key.tls {
                self.mtls = self.mtls.saturating_add(signals.requests);
            }
            self.latencies.push(&signals.latency);
        }
    }

    fn p99_nanos(&self) -> Option<f64> {
        if self.latencies.len() <= READ_TOGETHER {
            return CompactSketch::quantile_of_all(&self.latencies, 0.99);
        }
        let mut sum = SketchSum::default();
        self.latencies.iter().for_each(|sketch| sum.add(sketch));
        sum.quantile_nanos(0.99)
    }

    /// (requests per second, success rate, p99 in ms, mutual-TLS share), at the
    /// precision the page shows.
    fn signals(&self, seconds: f64) -> (f64, Option<f64>, Option<f64>, Option<f64>) {
        let rps = if seconds > 0.0 { significant(self.requests as f64 / seconds) } else { 0.0 };
        let share = |part: u64| (self.requests > 0).then(|| share_floor(part as f64 / self.requests as f64));
        let p99 = self.p99_nanos().map(|nanos| (nanos / 1e4).round() / 100.0);
        (rps, share(self.requests - self.failures.min(self.requests)), p99, share(self.mtls))
    }
}

/// Keyed by names borrowed from the series, hashed with foldhash: the topology looks a
/// name up for every series, and SipHash was a tenth of its time.
type Tallies<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Requests grouped as the graph shows them.
struct Graph<'a> {
    filter: &'a Filter,
    /// What each Service's own proxies served (inbound).
    served: Tallies<&'a str, Tally<'a>>,
    /// What callers saw of each Service they addressed, or a route sent them to, for
    /// the Services with no `served` tally.
    called: Tallies<&'a str, Tally<'a>>,
    /// Caller Service to callee Service.
    edges: Tallies<(&'a str, &'a str), Tally<'a>>,
}

impl<'a> Graph<'a> {
    fn new(filter: &'a Filter) -> Graph<'a> {
        Graph { filter, served: Tallies::default(), called: Tallies::default(), edges: Tallies::default() }
    }

    /// Whether `key` is what a Service's own proxies served.
    fn serves(&self, key: &SeriesKey) -> bool {
        (key.direction, key.kind) == (Direction::Inbound, RowKind::Request)
            && !key.destination.is_empty()
            && self.filter.wants(&key.destination)
    }

    /// Notes that `key`'s Service is measured by its own proxies. Every series is
    /// noted before any is added: callers' views are tallied only of Services that are
    /// not.
    fn note_served(&mut self, key: &'a SeriesKey) {
        self.served.entry(&key.destination).or_default();
    }

    /// Counts one series' slots (or one replica's sum of them).
    fn add(&mut self, key: &'a SeriesKey, slots: impl Iterator<Item = &'a SlotSignals> + Clone) {
        match (key.direction, key.kind) {
            (Direction::Inbound, RowKind::Request) => {
                if self.serves(key) {
                    self.served.entry(&key.destination).or_default().add(key, slots.clone());
                }
                // A caller without a proxy reports nothing; its callee does (in
                // plaintext: a meshed caller comes over mutual TLS, and reports the
                // edge itself).
                if !key.tls {
                    self.add_edge(UNMESHED, key, slots);
                }
            }
            (Direction::Outbound, RowKind::Request) => {
                // Callers' view: of the Service they addressed, and of the backend
                // Service a route sent them to (a canary's `reviews-v2` has no instances
                // of its own: its workloads register as `reviews`).
                let unserved =
                    |name: &str| !name.is_empty() && !self.served.contains_key(name) && self.filter.wants(name);
                let (destination, backend) = (unserved(&key.destination), unserved(&key.backend));
                if destination {
                    self.called.entry(&key.destination).or_default().add(key, slots.clone());
                }
                if backend && key.backend != key.destination {
                    self.called.entry(&key.backend).or_default().add(key, slots.clone());
                }
                self.add_edge(&key.source_service, key, slots);
            }
            _ => {}
        }
    }

    fn add_edge(&mut self, source: &'a str, key: &'a SeriesKey, slots: impl Iterator<Item = &'a SlotSignals>) {
        if self.filter.in_namespace(source) || self.filter.in_namespace(&key.destination) {
            self.edges.entry((source, &key.destination)).or_default().add(key, slots);
        }
    }

    /// The nodes (every Service in `services`, then any edge's end that is none) and
    /// the edges between them, sorted.
    fn answer(&self, services: &'a BTreeSet<String>, seconds: f64) -> (Vec<Node>, Vec<EdgeRow>) {
        let mut names: BTreeSet<&str> = services.iter().map(String::as_str).collect();
        names.extend(self.served.keys());
        names.extend(self.called.keys());
        let mut index: Tallies<&str, usize> = Tallies::with_capacity_and_hasher(names.len(), Default::default());
        let mut nodes: Vec<Node> = Vec::with_capacity(names.len());
        for name in names {
            let (tally, measured_by) = match (self.served.get(name), self.called.get(name)) {
                (Some(tally), _) => (Some(tally), "service"),
                (None, Some(tally)) => (Some(tally), "callers"),
                (None, None) => (None, "none"),
            };
            let (rps, success_rate, p99_ms, mtls_share) = tally.map_or((0.0, None, None, None), |t| t.signals(seconds));
            index.insert(name, nodes.len());
            nodes.push(Node {
                name: name.to_string(),
                rps,
                success_rate,
                p99_ms,
                mtls_share,
                measured_by: Some(measured_by),
            });
        }
        let mut edges = Vec::with_capacity(self.edges.len());
        for ((source, destination), tally) in &self.edges {
            let mut at = |name: &'a str| {
                *index.entry(name).or_insert_with(|| {
                    nodes.push(Node {
                        name: name.to_string(),
                        rps: 0.0,
                        success_rate: None,
                        p99_ms: None,
                        mtls_share: None,
                        measured_by: None,
                    });
                    nodes.len() - 1
                })
            };
            let ends = (at(source), at(destination));
            let (rps, success_rate, p99_ms, mtls_share) = tally.signals(seconds);
            edges.push((ends.0, ends.1, rps, success_rate, p99_ms, mtls_share, tally.requests));
        }
        edges.sort_unstable_by_key(|edge| (edge.0, edge.1));
        (nodes, edges)
    }
}

/// `value` to four significant digits: what a rate needs on the page, in far fewer
/// bytes than an `f64`'s seventeen.
fn significant(value: f64) -> f64 {
    if value == 0.0 || !value.is_finite() {
        return value;
    }
    // Divided or multiplied by an exact power of ten, so that the shortest form of the
    // result is the rounded decimal itself.
    let shift = 3 - value.abs().log10().floor() as i32;
    if shift >= 0 {
        let scale = 10f64.powi(shift);
        (value * scale).round() / scale
    } else {
        let scale = 10f64.powi(-shift);
        (value / scale).round() * scale
    }
}

/// A share to four decimals, rounded down: a share under 1 never shows as 1 (a single
/// plaintext request still breaks the lock, a single failure still shows).
fn share_floor(share: f64) -> f64 {
    // The small nudge keeps 0.29 (stored a hair under) from flooring to 0.2899.
    let floored = (share * 1e4 + 1e-9).floor() / 1e4;
    if share < 1.0 {
        floored.min(0.9999)
    } else {
        floored
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn signals(statuses: &[u16], millis: u64) -> SlotSignals {
        let mut dense = weft_api::signals::Signals::default();
        for status in statuses {
            dense.record(
                weft_api::signals::Outcome::Response { status: *status, grpc_status: None },
                Duration::from_millis(millis),
            );
        }
        SlotSignals::try_from(&weft_api::telemetry::Signals::from(&dense)).unwrap()
    }

    fn key(direction: Direction, source: &str, destination: &str, backend: &str, tls: bool) -> SeriesKey {
        SeriesKey {
            direction,
            kind: RowKind::Request,
            workload: "".into(),
            source_service: source.into(),
            source_identity: "".into(),
            destination: destination.into(),
            destination_identity: "".into(),
            route: "".into(),
            backend: backend.into(),
            tls,
        }
    }

    #[test]
    fn slots_add_up_into_services_and_edges() {
        let everything = Filter { namespace: String::new(), name: None };
        let mut graph = Graph::new(&everything);
        let web_to_reviews = key(Direction::Outbound, "a/web", "a/reviews", "a/reviews-v2", true);
        let reviews_served = key(Direction::Inbound, "", "a/reviews", "", true);
        let unmeshed_to_web = key(Direction::Inbound, "", "a/web", "", false);
        // Tries are not edges.
        let mut retry = key(Direction::Outbound, "a/web", "a/reviews", "a/reviews-v2", true);
        retry.kind = RowKind::Try;
        let (fast, slow) = (signals(&[200, 200, 200], 10), signals(&[503], 500));
        let (served, from_outside, retried) = (signals(&[200; 4], 10), signals(&[200, 200], 5), signals(&[503; 9], 5));
        for key in [&web_to_reviews, &reviews_served, &unmeshed_to_web, &retry] {
            if graph.serves(key) {
                graph.note_served(key);
            }
        }
        // Two slots of one series, and what reviews' own proxies served.
        graph.add(&web_to_reviews, [&fast, &slow].into_iter());
        graph.add(&reviews_served, std::iter::once(&served));
        assert!(!graph.called.contains_key("a/reviews"), "a Service measured by its own proxies");
        // A caller outside the mesh, seen from the callee only.
        graph.add(&unmeshed_to_web, std::iter::once(&from_outside));
        graph.add(&retry, std::iter::once(&retried));

        let services: BTreeSet<String> = ["a/idle".to_string(), "a/reviews".into(), "a/web".into()].into();
        let (nodes, edges) = graph.answer(&services, 10.0);
        let names: Vec<&str> = nodes.iter().map(|node| node.name.as_str()).collect();
        assert_eq!(names, ["a/idle", "a/reviews", "a/reviews-v2", "a/web", UNMESHED]);
        let node = |name: &str| nodes.iter().find(|node| node.name == name).unwrap();
        assert_eq!((node("a/idle").measured_by, node("a/idle").success_rate), (Some("none"), None));
        // reviews is judged by its own proxies, the canary backend by its callers.
        assert_eq!((node("a/reviews").measured_by, node("a/reviews").rps), (Some("service"), 0.4));
        assert_eq!(node("a/reviews").success_rate, Some(1.0));
        let canary = node("a/reviews-v2");
        assert_eq!(
            (canary.measured_by, canary.success_rate, canary.p99_ms),
            (Some("callers"), Some(0.75), Some(500.0))
        );
        assert_eq!(node(UNMESHED).measured_by, None);

        let index = |name: &str| names.iter().position(|n| *n == name).unwrap();
        assert_eq!(
            edges,
            [
                (index("a/web"), index("a/reviews"), 0.4, Some(0.75), Some(500.0), Some(1.0), 4),
                (index(UNMESHED), index("a/web"), 0.2, Some(1.0), Some(5.0), Some(0.0), 2),
            ]
        );
        // A namespace keeps the edges that touch it.
        let b_only = Filter { namespace: "b".into(), name: None };
        let mut graph = Graph::new(&b_only);
        graph.add(&web_to_reviews, std::iter::once(&fast));
        assert!(graph.edges.is_empty() && graph.called.is_empty());
    }

    #[test]
    fn many_slots_read_as_one() {
        // More sketches than are read together are summed: the same p99 either way.
        let slots: Vec<SlotSignals> = (1..=40).map(|i| signals(&[200; 5], i * 3)).collect();
        let mut tally = Tally::default();
        let series = key(Direction::Outbound, "a/web", "a/reviews", "", true);
        tally.add(&series, slots.iter().take(READ_TOGETHER));
        let together = tally.p99_nanos();
        let mut merged = CompactSketch::default();
        slots.iter().take(READ_TOGETHER).for_each(|slot| merged.merge(&slot.latency));
        assert_eq!(together, merged.quantile_nanos(0.99));
        tally.add(&series, slots.iter().skip(READ_TOGETHER));
        slots.iter().skip(READ_TOGETHER).for_each(|slot| merged.merge(&slot.latency));
        assert_eq!(tally.p99_nanos(), merged.quantile_nanos(0.99));
        assert_eq!(tally.requests, 200);
    }

    #[test]
    fn numbers_keep_what_the_page_shows_and_no_more() {
        assert_eq!(significant(20.123456789), 20.12);
        assert_eq!(significant(0.000277777), 0.0002778);
        assert_eq!(significant(123456.7), 123500.0);
        assert_eq!(significant(0.0), 0.0);
        assert_eq!(serde_json::to_string(&significant(1.0 / 3.0)).unwrap(), "0.3333");
        assert_eq!(share_floor(1.0), 1.0);
        assert_eq!(share_floor(0.29), 0.29);
        assert_eq!(share_floor(0.99999), 0.9999, "a share under 1 stays under 1");
        assert_eq!(share_floor(1.0 - 1e-9), 0.9999);
        assert_eq!(share_floor(1.0 - 1e-15), 0.9999);
        assert_eq!(share_floor(0.0), 0.0);
    }
}
