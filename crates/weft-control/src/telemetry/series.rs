//! What the control plane keys telemetry by, and what it keeps per slot.
//!
//! A proxy reports rows from its own point of view (the peer, the Service it called);
//! the control plane turns each into a series that names both ends, folding in who
//! reported it, as its mutual-TLS stream proved: a caller's outbound row gets the
//! caller's Service and identity as its source; a callee's inbound row gets the callee's
//! workload, Service and identity as its destination. Outbound request series are
//! merged over the caller's instances (an edge is Service to Service); inbound ones keep
//! the workload, for `weft stat workloads`, but not their callers: who calls whom is the
//! callers' outbound rows' to say, and an inbound row only tells a meshed caller (mutual
//! TLS) from a plaintext one. Try rows keep their counts but not their latency (each
//! request's latency is on its request row): these two cuts leave a mesh of 10,000 edges
//! with about 11,000 sketches instead of 30,000. Every string is interned, so ten
//! thousand series naming one Service hold one copy of its name.

use std::{collections::HashSet, sync::Arc};

use weft_api::{
    signals::{Signals, SignalsError},
    sketch::CompactSketch,
    telemetry::{self as proto, Direction, RowKind},
};

use super::window::SlotValue;

/// The signals of one series in one slot.
pub type SlotSignals = Signals<CompactSketch>;

impl SlotValue for SlotSignals {
    fn absorb(&mut self, later: &Self) {
        self.merge(later);
    }

    /// Counts one by one, latency sketches all at once (encoded once, not per slot).
    fn sum_of<'a>(values: impl Iterator<Item = &'a Self>) -> Option<Self> {
        let values: Vec<&SlotSignals> = values.collect();
        let (first, rest) = values.split_first()?;
        if rest.is_empty() {
            return Some((*first).clone());
        }
        let mut total = SlotSignals { latency: Default::default(), ..(*first).clone() };
        for value in rest {
            total.merge_counts(value);
        }
        total.latency = weft_api::sketch::CompactSketch::merge_all(values.iter().map(|value| &value.latency));
        Some(total)
    }

    fn heap_bytes(&self) -> usize {
        self.latency.heap_bytes()
    }
}

/// One request series: a row with both ends named.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesKey {
    pub direction: Direction,
    pub kind: RowKind,
    /// Inbound: the reporting workload (`namespace/proxy-id`); outbound: empty.
    pub workload: Arc<str>,
    /// Outbound: the caller's `namespace/name` (empty for a proxy without a Service);
    /// inbound: empty.
    pub source_service: Arc<str>,
    /// Outbound: the caller's SPIFFE ID; inbound: empty.
    pub source_identity: Arc<str>,
    pub destination: Arc<str>,
    /// SPIFFE ID; empty when the hop was plaintext.
    pub destination_identity: Arc<str>,
    pub route: Arc<str>,
    pub backend: Arc<str>,
    pub tls: bool,
}

/// One TCP series. Always per reporting workload: its open-connection gauge is that
/// proxy's.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TcpKey {
    pub direction: Direction,
    pub workload: Arc<str>,
    pub source_service: Arc<str>,
    pub source_identity: Arc<str>,
    pub destination: Arc<str>,
    pub destination_identity: Arc<str>,
    pub tls: bool,
}

/// Connection counts of a TCP series.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TcpTotals {
    pub opened: u64,
    pub closed: u64,
    /// Connections open when `open_at` (Unix milliseconds) was reported.
    pub open: u64,
    pub open_at: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

impl TcpTotals {
    fn add_counts(&mut self, other: &TcpTotals) {
        self.opened += other.opened;
        self.closed += other.closed;
        self.bytes_sent += other.bytes_sent;
        self.bytes_received += other.bytes_received;
    }

    /// Adds another series (another proxy): gauges add up too.
    pub fn group(&mut self, other: &TcpTotals) {
        self.add_counts(other);
        self.open += other.open;
        self.open_at = self.open_at.max(other.open_at);
    }
}

impl SlotValue for TcpTotals {
    /// The same series later (or as another replica saw it): counts add, the gauge is
    /// the newer one.
    fn absorb(&mut self, later: &Self) {
        self.add_counts(later);
        if later.open_at >= self.open_at {
            self.open = later.open;
            self.open_at = later.open_at;
        }
    }
}

/// Authorization decisions of one Service's proxies by one policy.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AuthzKey {
    pub service: Arc<str>,
    pub policy: Arc<str>,
}

/// [allowed, denied].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuthzCounts {
    pub allowed: u64,
    pub denied: u64,
}

impl SlotValue for AuthzCounts {
    fn absorb(&mut self, later: &Self) {
        self.allowed += later.allowed;
        self.denied += later.denied;
    }
}

/// Who sent a report, as the control plane knows it (never as the report says).
#[derive(Clone, Debug)]
pub struct Reporter {
    /// `namespace/proxy-id`.
    pub workload: String,
    /// `namespace/name` of its registered Service, if it registered one.
    pub service: Option<String>,
    /// Its SPIFFE ID, as its certificate proved it.
    pub identity: String,
}

/// One copy of every string the series name.
#[derive(Default)]
pub struct Interner(HashSet<Arc<str>>);

impl Interner {
    pub fn get(&mut self, text: &str) -> Arc<str> {
        if let Some(known) = self.0.get(text) {
            return known.clone();
        }
        let fresh: Arc<str> = text.into();
        self.0.insert(fresh.clone());
        fresh
    }

    /// Bytes its strings take: text, the `Arc`'s counts, the set's slot.
    pub fn bytes(&self) -> usize {
        self.0.iter().map(|text| text.len() + 16 + std::mem::size_of::<Arc<str>>()).sum()
    }

    /// Forgets strings no series uses any more.
    pub fn prune(&mut self) {
        self.0.retain(|text| Arc::strong_count(text) > 1);
    }
}

/// A report's rows, checked and turned into series (outside any lock).
#[derive(Debug, Default)]
pub struct Checked {
    pub requests: Vec<(SeriesKey, SlotSignals)>,
    pub tcp: Vec<(TcpKey, TcpTotals)>,
    pub authz: Vec<(AuthzKey, AuthzCounts)>,
}

/// Why a report was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("row {row}: {error}")]
    Signals { row: usize, error: SignalsError },
    #[error("row {0}: no direction or kind")]
    Unspecified(usize),
    #[error("{0} rows; at most {max} per report", max = MAX_ROWS_PER_REPORT)]
    TooManyRows(usize),
}

/// Rows one report may carry: a proxy's rows come from its configuration, far below.
pub const MAX_ROWS_PER_REPORT: usize = 100_000;

/// Checks `report` from `reporter` and keys its rows, at `now_millis`.
pub fn check(
    report: &proto::ProxyReport,
    reporter: &Reporter,
    interner: &mut Interner,
    now_millis: u64,
) -> Result<Checked, ReportError> {
    let rows = report.requests.len() + report.tcp.len() + report.authz.len();
    if rows > MAX_ROWS_PER_REPORT {
        return Err(ReportError::TooManyRows(rows));
    }
    let reporter_service = reporter.service.clone().unwrap_or_default();
    let mut checked = Checked::default();
    for (index, row) in report.requests.iter().enumerate() {
        let direction = Direction::try_from(row.direction).ok().filter(|d| *d != Direction::Unspecified);
        let kind = RowKind::try_from(row.kind).ok().filter(|k| *k != RowKind::Unspecified);
        let (Some(direction), Some(kind)) = (direction, kind) else {
            return Err(ReportError::Unspecified(index));
        };
        let mut signals = match &row.signals {
            Some(wire) => SlotSignals::try_from(wire).map_err(|error| ReportError::Signals { row: index, error })?,
            None => continue,
        };
        if kind == RowKind::Try {
            signals.latency = Default::default();
        }
        // Inbound traffic is a registered workload's to report: a proxy without one has
        // no Service to report it for, and may not name somebody else's.
        if direction == Direction::Inbound && reporter.service.is_none() {
            continue;
        }
        let key = match direction {
            Direction::Inbound => SeriesKey {
                direction,
                kind: RowKind::Request,
                workload: interner.get(&reporter.workload),
                source_service: interner.get(""),
                source_identity: interner.get(""),
                destination: interner.get(&reporter_service),
                destination_identity: interner.get(&reporter.identity),
                route: interner.get(""),
                backend: interner.get(""),
                tls: row.tls,
            },
            _ => SeriesKey {
                direction,
                kind,
                workload: interner.get(""),
                source_service: interner.get(&reporter_service),
                source_identity: interner.get(&reporter.identity),
                destination: interner.get(&row.destination),
                destination_identity: interner.get(&row.peer_identity),
                route: interner.get(&row.route),
                backend: interner.get(&row.backend),
                tls: row.tls,
            },
        };
        checked.requests.push((key, signals));
    }
    for (index, row) in report.tcp.iter().enumerate() {
        let direction = Direction::try_from(row.direction)
            .ok()
            .filter(|d| *d != Direction::Unspecified)
            .ok_or(ReportError::Unspecified(index))?;
        if direction == Direction::Inbound && reporter.service.is_none() {
            continue;
        }
        let (source_service, source_identity, destination, destination_identity) = match direction {
            // As for requests: inbound keeps the workload, not its callers.
            Direction::Inbound => (String::new(), "", reporter_service.as_str(), reporter.identity.as_str()),
            _ => (
                reporter_service.clone(),
                reporter.identity.as_str(),
                row.destination.as_str(),
                row.peer_identity.as_str(),
            ),
        };
        let key = TcpKey {
            direction,
            workload: interner.get(&reporter.workload),
            source_service: interner.get(&source_service),
            source_identity: interner.get(source_identity),
            destination: interner.get(destination),
            destination_identity: interner.get(destination_identity),
            tls: row.tls,
        };
        let totals = TcpTotals {
            opened: row.opened,
            closed: row.closed,
            open: row.open,
            open_at: now_millis,
            bytes_sent: row.bytes_sent,
            bytes_received: row.bytes_received,
        };
        checked.tcp.push((key, totals));
    }
    for row in &report.authz {
        let key = AuthzKey { service: interner.get(&reporter_service), policy: interner.get(&row.policy) };
        checked.authz.push((key, AuthzCounts { allowed: row.allowed, denied: row.denied }));
    }
    Ok(checked)
}

// Interning a key's strings into a store's interner, and the wire form between replicas.

impl SeriesKey {
    /// The same key, its strings taken from `interner`.
    pub fn interned(self, interner: &mut Interner) -> Self {
        SeriesKey {
            workload: interner.get(&self.workload),
            source_service: interner.get(&self.source_service),
            source_identity: interner.get(&self.source_identity),
            destination: interner.get(&self.destination),
            destination_identity: interner.get(&self.destination_identity),
            route: interner.get(&self.route),
            backend: interner.get(&self.backend),
            ..self
        }
    }

    pub fn to_wire(&self, signals: &SlotSignals) -> proto::Series {
        proto::Series {
            direction: self.direction as i32,
            kind: self.kind as i32,
            workload: self.workload.to_string(),
            source_service: self.source_service.to_string(),
            source_identity: self.source_identity.to_string(),
            destination: self.destination.to_string(),
            destination_identity: self.destination_identity.to_string(),
            route: self.route.to_string(),
            backend: self.backend.to_string(),
            tls: self.tls,
            signals: Some(signals.into()),
        }
    }

    pub fn from_wire(wire: &proto::Series, interner: &mut Interner) -> Result<(Self, SlotSignals), String> {
        let signals = match &wire.signals {
            Some(signals) => SlotSignals::try_from(signals).map_err(|e| e.to_string())?,
            None => SlotSignals::default(),
        };
        let key = SeriesKey {
            direction: Direction::try_from(wire.direction).map_err(|e| e.to_string())?,
            kind: RowKind::try_from(wire.kind).map_err(|e| e.to_string())?,
            workload: interner.get(&wire.workload),
            source_service: interner.get(&wire.source_service),
            source_identity: interner.get(&wire.source_identity),
            destination: interner.get(&wire.destination),
            destination_identity: interner.get(&wire.destination_identity),
            route: interner.get(&wire.route),
            backend: interner.get(&wire.backend),
            tls: wire.tls,
        };
        Ok((key, signals))
    }
}

impl TcpKey {
    /// The same key, its strings taken from `interner`.
    pub fn interned(self, interner: &mut Interner) -> Self {
        TcpKey {
            workload: interner.get(&self.workload),
            source_service: interner.get(&self.source_service),
            source_identity: interner.get(&self.source_identity),
            destination: interner.get(&self.destination),
            destination_identity: interner.get(&self.destination_identity),
            ..self
        }
    }

    pub fn to_wire(&self, totals: &TcpTotals) -> proto::TcpSeries {
        proto::TcpSeries {
            direction: self.direction as i32,
            workload: self.workload.to_string(),
            source_service: self.source_service.to_string(),
            source_identity: self.source_identity.to_string(),
            destination: self.destination.to_string(),
            destination_identity: self.destination_identity.to_string(),
            tls: self.tls,
            opened: totals.opened,
            closed: totals.closed,
            open: totals.open,
            bytes_sent: totals.bytes_sent,
            bytes_received: totals.bytes_received,
            open_at: totals.open_at,
        }
    }

    pub fn from_wire(wire: &proto::TcpSeries, interner: &mut Interner) -> Result<(Self, TcpTotals), String> {
        let key = TcpKey {
            direction: Direction::try_from(wire.direction).map_err(|e| e.to_string())?,
            workload: interner.get(&wire.workload),
            source_service: interner.get(&wire.source_service),
            source_identity: interner.get(&wire.source_identity),
            destination: interner.get(&wire.destination),
            destination_identity: interner.get(&wire.destination_identity),
            tls: wire.tls,
        };
        let totals = TcpTotals {
            opened: wire.opened,
            closed: wire.closed,
            open: wire.open,
            open_at: wire.open_at,
            bytes_sent: wire.bytes_sent,
            bytes_received: wire.bytes_received,
        };
        Ok((key, totals))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signals(requests: u64) -> proto::Signals {
        let mut signals = Signals::default();
        for _ in 0..requests {
            signals.record(
                weft_api::signals::Outcome::Response { status: 200, grpc_status: None },
                std::time::Duration::from_millis(5),
            );
        }
        (&signals).into()
    }

    #[test]
    fn rows_are_keyed_with_both_ends_from_what_the_stream_proved() {
        let reporter = Reporter {
            workload: "shop/web-1".into(),
            service: Some("shop/web".into()),
            identity: "spiffe://td/ns/shop/sa/web".into(),
        };
        let report = proto::ProxyReport {
            requests: vec![
                proto::RequestRow {
                    direction: Direction::Outbound as i32,
                    kind: RowKind::Request as i32,
                    peer_identity: "spiffe://td/ns/shop/sa/catalog".into(),
                    destination: "shop/catalog".into(),
                    route: "HTTPRoute/shop/r".into(),
                    backend: "shop/catalog".into(),
                    tls: true,
                    signals: Some(signals(3)),
                },
                proto::RequestRow {
                    direction: Direction::Inbound as i32,
                    kind: RowKind::Request as i32,
                    peer_identity: "spiffe://td/ns/edge/sa/gateway".into(),
                    // A proxy cannot report traffic to another Service as its own.
                    destination: "shop/payments".into(),
                    tls: true,
                    signals: Some(signals(2)),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let mut interner = Interner::default();
        let checked = check(&report, &reporter, &mut interner, 0).unwrap();
        let (out, _) = &checked.requests[0];
        assert_eq!((&*out.source_service, &*out.source_identity), ("shop/web", "spiffe://td/ns/shop/sa/web"));
        assert_eq!((&*out.destination, &*out.workload), ("shop/catalog", ""));
        let (inbound, signals) = &checked.requests[1];
        assert_eq!((&*inbound.source_identity, &*inbound.destination), ("", "shop/web"), "callers are outbound's");
        assert_eq!(&*inbound.workload, "shop/web-1");
        assert_eq!(signals.requests, 2);
        assert!(Arc::ptr_eq(&out.source_service, &inbound.destination), "interned");

        let mut bad = report.clone();
        bad.requests[0].signals.as_mut().unwrap().failures = 99;
        assert!(check(&bad, &reporter, &mut interner, 0).unwrap_err().to_string().contains("row 0"));
        let mut bad = report;
        bad.requests[1].direction = 0;
        assert!(matches!(check(&bad, &reporter, &mut interner, 0), Err(ReportError::Unspecified(1))));
    }

    #[test]
    fn a_tcp_gauge_is_the_newest_and_adds_up_across_proxies() {
        let early = TcpTotals { opened: 2, open: 2, open_at: 10, ..Default::default() };
        let late = TcpTotals { opened: 1, closed: 2, open: 1, open_at: 20, ..Default::default() };
        let mut same = early.clone();
        same.absorb(&late);
        assert_eq!((same.opened, same.closed, same.open), (3, 2, 1));
        let mut stale = late.clone();
        stale.absorb(&early);
        assert_eq!(stale.open, 1, "an older gauge never replaces a newer one");
        let mut grouped = early;
        grouped.group(&late);
        assert_eq!(grouped.open, 3);
    }
}
