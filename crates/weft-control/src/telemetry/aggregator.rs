//! The telemetry one replica holds: every series its proxies reported, in rings of
//! slots (`window.rs`), and the endpoint state each proxy last reported.
//!
//! A report is checked and keyed outside the lock, then merged under one short lock.
//! Memory is bounded three ways: a series nobody reported within the hour is dropped
//! (swept every minute), rings hold at most 25 slots, and the number of series is capped
//! ([`MAX_SERIES`]); rows past the cap are dropped and counted, never silently lost.

use std::{collections::HashMap, sync::Mutex};

use weft_api::telemetry as proto;

use super::{
    series::{
        check, AuthzCounts, AuthzKey, Interner, ReportError, Reporter, SeriesKey, SlotSignals, TcpKey, TcpTotals,
    },
    window::{Rings, SlotRange},
};

/// Series one replica keeps, of every kind together. A mesh of 1,000 proxies and
/// 10,000 edges makes about 30,000 (README, "Golden signals").
pub const MAX_SERIES: usize = 250_000;

/// A proxy's endpoint state older than this is not shown: the proxy stopped reporting.
const ENDPOINT_STATE_TTL_MILLIS: u64 = 60_000;

/// What a window holds, merged: the answer of one replica, or of several combined.
#[derive(Clone, Debug, Default)]
pub struct WindowSeries {
    pub requests: HashMap<SeriesKey, SlotSignals>,
    pub tcp: HashMap<TcpKey, TcpTotals>,
    pub authz: HashMap<AuthzKey, AuthzCounts>,
    /// The endpoint state each proxy last reported: (reporter workload, Unix
    /// milliseconds, rows).
    pub endpoints: Vec<(String, u64, Vec<proto::EndpointRow>)>,
    /// Unix milliseconds since which the answering replicas have telemetry: before it
    /// they know nothing (which is not zero traffic), so rates do not count that time.
    pub since_millis: Option<u64>,
}

impl WindowSeries {
    /// Adds another replica's answer. The same series on two replicas (a proxy that
    /// moved between them) merges as one.
    pub fn merge(&mut self, other: WindowSeries) {
        use super::window::SlotValue;
        for (key, signals) in other.requests {
            self.requests.entry(key).and_modify(|mine| mine.absorb(&signals)).or_insert(signals);
        }
        for (key, totals) in other.tcp {
            self.tcp.entry(key).and_modify(|mine| mine.absorb(&totals)).or_insert(totals);
        }
        for (key, counts) in other.authz {
            self.authz.entry(key).and_modify(|mine| mine.absorb(&counts)).or_insert(counts);
        }
        self.since_millis = match (self.since_millis, other.since_millis) {
            (Some(mine), Some(theirs)) => Some(mine.min(theirs)),
            (mine, theirs) => mine.or(theirs),
        };
        for reported in other.endpoints {
            match self.endpoints.iter_mut().find(|(reporter, _, _)| *reporter == reported.0) {
                Some(mine) if mine.1 < reported.1 => *mine = reported,
                Some(_) => {}
                None => self.endpoints.push(reported),
            }
        }
    }

    /// The wire form, for the replica that asked.
    pub fn to_wire(&self, replica: &str) -> proto::SeriesAnswer {
        proto::SeriesAnswer {
            replica: replica.to_string(),
            series: self.requests.iter().map(|(key, signals)| key.to_wire(signals)).collect(),
            tcp: self.tcp.iter().map(|(key, totals)| key.to_wire(totals)).collect(),
            authz: self
                .authz
                .iter()
                .map(|(key, counts)| proto::AuthzSeries {
                    service: key.service.to_string(),
                    policy: key.policy.to_string(),
                    allowed: counts.allowed,
                    denied: counts.denied,
                })
                .collect(),
            endpoints: self
                .endpoints
                .iter()
                .flat_map(|(reporter, at, rows)| {
                    rows.iter().map(move |row| proto::ReportedEndpoint {
                        reporter: reporter.clone(),
                        reported_at: *at,
                        endpoint: Some(row.clone()),
                    })
                })
                .collect(),
            since_millis: self.since_millis.unwrap_or(0),
        }
    }

    /// Another replica's answer, checked like a proxy's report.
    pub fn from_wire(answer: &proto::SeriesAnswer) -> Result<WindowSeries, String> {
        let mut interner = Interner::default();
        let mut window = WindowSeries::default();
        for wire in &answer.series {
            let (key, signals) = SeriesKey::from_wire(wire, &mut interner)?;
            window.requests.insert(key, signals);
        }
        for wire in &answer.tcp {
            let (key, totals) = TcpKey::from_wire(wire, &mut interner)?;
            window.tcp.insert(key, totals);
        }
        for wire in &answer.authz {
            let key = AuthzKey { service: interner.get(&wire.service), policy: interner.get(&wire.policy) };
            window.authz.insert(key, AuthzCounts { allowed: wire.allowed, denied: wire.denied });
        }
        let mut endpoints: HashMap<(String, u64), Vec<proto::EndpointRow>> = HashMap::new();
        for reported in &answer.endpoints {
            if let Some(row) = &reported.endpoint {
                endpoints.entry((reported.reporter.clone(), reported.reported_at)).or_default().push(row.clone());
            }
        }
        window.endpoints = endpoints.into_iter().map(|((reporter, at), rows)| (reporter, at, rows)).collect();
        window.since_millis = (answer.since_millis > 0).then_some(answer.since_millis);
        Ok(window)
    }
}

/// Which series a query wants: those that touch `namespace` (any, when empty).
pub fn touches(namespace: &str, names: &[&str]) -> bool {
    namespace.is_empty() || names.iter().any(|name| name.split_once('/').is_some_and(|(ns, _)| ns == namespace))
}

/// The request series one replica holds, borrowed under its lock
/// ([`Aggregator::read_request_series`]).
#[derive(Clone, Copy)]
pub struct RequestSeries<'a>(&'a HashMap<SeriesKey, Rings<SlotSignals>>);

impl<'a> RequestSeries<'a> {
    /// Every series: its key and its rings of slots.
    pub fn iter(&self) -> impl Iterator<Item = (&'a SeriesKey, &'a Rings<SlotSignals>)> + 'a {
        self.0.iter()
    }
}

/// How much a report brought.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Ingested {
    pub rows: usize,
    /// Rows of series beyond [`MAX_SERIES`].
    pub dropped: usize,
}

#[derive(Default)]
struct Held {
    requests: HashMap<SeriesKey, Rings<SlotSignals>>,
    tcp: HashMap<TcpKey, Rings<TcpTotals>>,
    authz: HashMap<AuthzKey, Rings<AuthzCounts>>,
    endpoints: HashMap<String, (u64, Vec<proto::EndpointRow>)>,
    interner: Interner,
    /// When the first report merged here began (its arrival less its interval).
    since_millis: Option<u64>,
}

impl Held {
    fn series(&self) -> usize {
        self.requests.len() + self.tcp.len() + self.authz.len()
    }
}

/// One replica's telemetry.
#[derive(Default)]
pub struct Aggregator {
    held: Mutex<Held>,
}

/// Merges `value` into `key`'s rings, unless the cap is reached by a new series.
fn add<K: std::hash::Hash + Eq, V: super::window::SlotValue>(
    map: &mut HashMap<K, Rings<V>>,
    key: K,
    value: &V,
    now: u64,
    room: &mut usize,
) -> bool {
    if let Some(rings) = map.get_mut(&key) {
        rings.add(now, value);
        return true;
    }
    if *room == 0 {
        return false;
    }
    *room -= 1;
    map.entry(key).or_default().add(now, value);
    true
}

impl Aggregator {
    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Merges `report` from `reporter`, received at `now_millis` (Unix milliseconds).
    /// A malformed report is refused whole: nothing of it is merged.
    pub fn ingest(
        &self,
        report: &proto::ProxyReport,
        reporter: &Reporter,
        now_millis: u64,
    ) -> Result<Ingested, ReportError> {
        // Checked with an interner of its own, outside the lock; the strings are
        // interned again (cheaply) under it.
        let mut scratch = Interner::default();
        let checked = check(report, reporter, &mut scratch, now_millis)?;
        let now = now_millis / 1000;
        let mut held = self.lock();
        let mut room = MAX_SERIES.saturating_sub(held.series());
        let mut ingested = Ingested::default();
        let Held { requests, tcp, authz, endpoints, interner, since_millis } = &mut *held;
        since_millis.get_or_insert(now_millis.saturating_sub(report.interval_millis));
        for (key, signals) in checked.requests {
            ingested.rows += 1;
            if !add(requests, key.interned(interner), &signals, now, &mut room) {
                ingested.dropped += 1;
            }
        }
        for (key, totals) in checked.tcp {
            ingested.rows += 1;
            if !add(tcp, key.interned(interner), &totals, now, &mut room) {
                ingested.dropped += 1;
            }
        }
        for (key, counts) in checked.authz {
            let key = AuthzKey { service: interner.get(&key.service), policy: interner.get(&key.policy) };
            ingested.rows += 1;
            if !add(authz, key, &counts, now, &mut room) {
                ingested.dropped += 1;
            }
        }
        endpoints.insert(reporter.workload.clone(), (now_millis, report.endpoints.clone()));
        Ok(ingested)
    }

    /// Forgets a proxy's endpoint state (its stream ended).
    pub fn forget_endpoints(&self, workload: &str) {
        self.lock().endpoints.remove(workload);
    }

    /// Everything in `range` that touches `namespace`, merged per series, with the
    /// endpoint state reported within the last minute.
    pub fn window(&self, range: &SlotRange, namespace: &str, now_millis: u64) -> WindowSeries {
        let held = self.lock();
        let mut window = WindowSeries { since_millis: held.since_millis, ..WindowSeries::default() };
        for (key, rings) in &held.requests {
            if !touches(namespace, &[&key.source_service, &key.destination, &key.workload]) {
                continue;
            }
            if let Some(signals) = rings.sum(range) {
                window.requests.insert(key.clone(), signals);
            }
        }
        for (key, rings) in &held.tcp {
            if !touches(namespace, &[&key.source_service, &key.destination, &key.workload]) {
                continue;
            }
            if let Some(totals) = rings.sum(range) {
                window.tcp.insert(key.clone(), totals);
            }
        }
        for (key, rings) in &held.authz {
            if !touches(namespace, &[&key.service]) {
                continue;
            }
            if let Some(counts) = rings.sum(range) {
                window.authz.insert(key.clone(), counts);
            }
        }
        for (reporter, (at, rows)) in &held.endpoints {
            if now_millis.saturating_sub(*at) > ENDPOINT_STATE_TTL_MILLIS || !touches(namespace, &[reporter]) {
                continue;
            }
            window.endpoints.push((reporter.clone(), *at, rows.clone()));
        }
        window
    }

    /// Runs `read` on every request series held and since when this replica has
    /// telemetry (Unix milliseconds), under the lock. For a question that groups series
    /// and reads only the groups (the dashboard's topology): it borrows each series'
    /// slots as held, where [`Aggregator::window`] copies and sums them first.
    pub fn read_request_series<R>(&self, read: impl FnOnce(RequestSeries<'_>, Option<u64>) -> R) -> R {
        let held = self.lock();
        read(RequestSeries(&held.requests), held.since_millis)
    }

    /// Drops series with nothing left within the retention at `now` (Unix seconds);
    /// returns how many remain.
    pub fn sweep(&self, now: u64, now_millis: u64) -> usize {
        let mut held = self.lock();
        held.requests.retain(|_, rings| rings.is_live(now));
        held.tcp.retain(|_, rings| rings.is_live(now));
        held.authz.retain(|_, rings| rings.is_live(now));
        held.endpoints.retain(|_, (at, _)| now_millis.saturating_sub(*at) <= ENDPOINT_STATE_TTL_MILLIS);
        held.interner.prune();
        held.series()
    }

    /// Series held, and an estimate of their memory in bytes (slots, sketches and
    /// keys; not the allocator's overhead).
    pub fn footprint(&self) -> (usize, usize) {
        let held = self.lock();
        let entry = |key: usize| key + std::mem::size_of::<Rings<SlotSignals>>();
        let requests: usize =
            held.requests.values().map(|rings| entry(std::mem::size_of::<SeriesKey>()) + rings.heap_bytes()).sum();
        let tcp: usize = held.tcp.values().map(|rings| entry(std::mem::size_of::<TcpKey>()) + rings.heap_bytes()).sum();
        let authz: usize =
            held.authz.values().map(|rings| entry(std::mem::size_of::<AuthzKey>()) + rings.heap_bytes()).sum();
        (held.series(), requests + tcp + authz + held.interner.bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::window::WindowLength;
    use weft_api::telemetry::{Direction, RowKind};

    fn report(destination: &str, requests: u64, failures: u64) -> proto::ProxyReport {
        let mut signals = weft_api::signals::Signals::default();
        for i in 0..requests {
            let status = if i < failures { 503 } else { 200 };
            signals.record(
                weft_api::signals::Outcome::Response { status, grpc_status: None },
                std::time::Duration::from_millis(10),
            );
        }
        proto::ProxyReport {
            requests: vec![proto::RequestRow {
                direction: Direction::Outbound as i32,
                kind: RowKind::Request as i32,
                destination: destination.into(),
                signals: Some((&signals).into()),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn reporter(workload: &str) -> Reporter {
        Reporter {
            workload: workload.into(),
            service: Some("a/web".into()),
            identity: "spiffe://td/ns/a/sa/web".into(),
        }
    }

    #[test]
    fn reports_merge_into_windows_and_namespaces_filter_them() {
        let aggregator = Aggregator::default();
        let now = 1_000_000_000_000u64;
        // Two instances of one Service calling the same destination: one series.
        aggregator.ingest(&report("a/catalog", 10, 1), &reporter("a/web-1"), now).unwrap();
        aggregator.ingest(&report("a/catalog", 5, 2), &reporter("a/web-2"), now + 5000).unwrap();
        aggregator.ingest(&report("b/other", 7, 0), &reporter("a/web-1"), now + 5000).unwrap();
        let range = SlotRange::recent(WindowLength::OneMinute, (now + 6000) / 1000);
        let window = aggregator.window(&range, "", now + 6000);
        assert_eq!(window.requests.len(), 2);
        let catalog = window.requests.iter().find(|(k, _)| &*k.destination == "a/catalog").unwrap().1;
        assert_eq!((catalog.requests, catalog.failures), (15, 3));
        assert_eq!(aggregator.window(&range, "b", now + 6000).requests.len(), 1);
        assert_eq!(aggregator.window(&range, "c", now + 6000).requests.len(), 0);
        assert_eq!(window.endpoints.len(), 2, "the state of both reporters");

        // Across replicas: merging answers adds the same series up.
        let wire = window.to_wire("r2");
        let mut merged = window.clone();
        merged.merge(WindowSeries::from_wire(&wire).unwrap());
        let catalog = merged.requests.iter().find(|(k, _)| &*k.destination == "a/catalog").unwrap().1;
        assert_eq!(catalog.requests, 30);

        // An hour and more later, the series are gone.
        assert_eq!(aggregator.sweep(now / 1000 + 2 * 3600, now + 2 * 3600 * 1000), 0);
        assert_eq!(aggregator.footprint().0, 0);
    }
}
