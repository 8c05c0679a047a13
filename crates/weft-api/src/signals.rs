//! The golden signals of one telemetry row (a direction, caller, callee, route and
//! backend): how many requests, how they ended, and how long they took to their first
//! response byte. Proxies fill them per worker; the control plane merges them into its
//! windows. One definition of "failed" lives here, so the proxy and `weft stat` agree.

use std::time::Duration;

use crate::{
    sketch::{CompactSketch, LatencySketch, SketchError},
    telemetry as proto,
};

/// gRPC status codes that count as failures: Unknown, DeadlineExceeded,
/// PermissionDenied, Internal, Unavailable and DataLoss. The others (OK, and the ones
/// that describe the request, such as NotFound or InvalidArgument) are answers.
pub const FAILING_GRPC_STATUSES: [u32; 6] = [2, 4, 7, 13, 14, 15];

/// How one request ended, as far as the signals care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response with this HTTP status and, for gRPC, this `grpc-status`.
    Response { status: u16, grpc_status: Option<u32> },
    /// No response from the application: a connection error, a reset, a timeout. The
    /// proxy's own answer (502, 504) is not the application's.
    TransportError,
}

impl Outcome {
    /// Whether the request failed: on 5xx, on a failing gRPC status (see
    /// [`FAILING_GRPC_STATUSES`]), and on transport errors and timeouts. 4xx is an
    /// answer, not a failure, as in Linkerd: the caller asked for something wrong.
    pub fn is_failure(self) -> bool {
        match self {
            Outcome::Response { status, grpc_status } => {
                status >= 500 || grpc_status.is_some_and(|code| FAILING_GRPC_STATUSES.contains(&code))
            }
            Outcome::TransportError => true,
        }
    }
}

/// The latency half of [`Signals`]: the dense sketch a proxy records into, or the
/// compact one the control plane keeps in its windows.
pub trait Distribution: Clone + Default + PartialEq + std::fmt::Debug {
    /// Adds every latency of `other`.
    fn merge(&mut self, other: &Self);
    /// The `q` quantile in nanoseconds; `None` when empty.
    fn quantile_nanos(&self, q: f64) -> Option<f64>;
    /// How many latencies it holds.
    fn count(&self) -> u64;
    /// The wire form.
    fn to_wire(&self) -> proto::Sketch;
    /// From the wire form, checked.
    fn from_wire(wire: &proto::Sketch) -> Result<Self, SignalsError>;
}

/// Counts of gRPC responses by `grpc-status` (0-16), sparse: most rows carry none, and
/// a gRPC row a handful.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GrpcStatuses(Vec<(u8, u64)>);

/// The highest gRPC status code (Unauthenticated).
const MAX_GRPC_STATUS: u32 = 16;

impl GrpcStatuses {
    fn add(&mut self, code: u8, count: u64) {
        match self.0.binary_search_by_key(&code, |(c, _)| *c) {
            Ok(at) => self.0[at].1 = self.0[at].1.saturating_add(count),
            Err(at) => self.0.insert(at, (code, count)),
        }
    }

    /// (code, count) of every status seen, ascending by code.
    pub fn iter(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.0.iter().map(|(code, count)| (u32::from(*code), *count))
    }
}

/// Counts and latency of one row over some interval; merging two is adding them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Signals<L = LatencySketch> {
    /// Requests that ended (a retried request counts once on its route row and once
    /// per try on its backend rows).
    pub requests: u64,
    /// Those of them that failed ([`Outcome::is_failure`]).
    pub failures: u64,
    /// Responses by status class: index 0 is 1xx, ..., 4 is 5xx.
    pub status_classes: [u64; 5],
    /// Requests that got no response (transport errors and timeouts).
    pub transport_errors: u64,
    /// Retries the proxy sent for these requests (counted on route rows).
    pub retries: u64,
    /// gRPC responses by status.
    pub grpc_statuses: GrpcStatuses,
    /// Time to the response's first byte.
    pub latency: L,
}

impl Signals<LatencySketch> {
    /// Counts one request that ended with `outcome` after `latency`.
    pub fn record(&mut self, outcome: Outcome, latency: Duration) {
        self.count(outcome);
        self.latency.record(latency);
    }

    /// Counts one request that ended with `outcome`, without its latency: for tries,
    /// whose time is their request's business.
    pub fn count(&mut self, outcome: Outcome) {
        self.requests += 1;
        if outcome.is_failure() {
            self.failures += 1;
        }
        match outcome {
            Outcome::Response { status, grpc_status } => {
                if let Some(class) = (status / 100).checked_sub(1).filter(|class| *class < 5) {
                    self.status_classes[class as usize] += 1;
                }
                if let Some(code) = grpc_status.filter(|code| *code <= MAX_GRPC_STATUS) {
                    self.grpc_statuses.add(code as u8, 1);
                }
            }
            Outcome::TransportError => self.transport_errors += 1,
        }
    }
}

impl<L: Distribution> Signals<L> {
    /// Adds `other`'s requests to these.
    pub fn merge(&mut self, other: &Signals<L>) {
        self.merge_counts(other);
        self.latency.merge(&other.latency);
    }

    /// Adds `other`'s counts to these, but not its latencies: for a caller that merges
    /// many latency sketches at once.
    pub fn merge_counts(&mut self, other: &Signals<L>) {
        self.requests = self.requests.saturating_add(other.requests);
        self.failures = self.failures.saturating_add(other.failures);
        for (mine, theirs) in self.status_classes.iter_mut().zip(other.status_classes) {
            *mine = mine.saturating_add(theirs);
        }
        self.transport_errors = self.transport_errors.saturating_add(other.transport_errors);
        self.retries = self.retries.saturating_add(other.retries);
        for (code, count) in other.grpc_statuses.iter() {
            self.grpc_statuses.add(code as u8, count);
        }
    }

    /// The share of requests that did not fail; `None` without requests.
    pub fn success_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| 1.0 - self.failures as f64 / self.requests as f64)
    }
}

/// Why a peer's signals were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignalsError {
    #[error("latency sketch: {0}")]
    Sketch(#[from] SketchError),
    #[error("{0} status classes, not 5")]
    StatusClasses(usize),
    #[error("{failures} failures of {requests} requests")]
    MoreFailuresThanRequests { failures: u64, requests: u64 },
    #[error("bucket index overflows")]
    IndexOverflow,
    #[error("gRPC status {0} does not exist (0-16)")]
    GrpcStatus(u32),
}

/// Undoes the wire form's delta encoding, refusing repeated or overflowing indexes.
fn absolute_indexes(wire: &proto::Sketch) -> Result<Vec<u32>, SignalsError> {
    let mut index = 0u32;
    let mut indexes = Vec::with_capacity(wire.index_deltas.len());
    for (i, delta) in wire.index_deltas.iter().enumerate() {
        // Every delta after the first must move on, or two counts name one bucket.
        if i > 0 && *delta == 0 {
            return Err(SketchError::Unordered.into());
        }
        index = index.checked_add(*delta).ok_or(SignalsError::IndexOverflow)?;
        indexes.push(index);
    }
    Ok(indexes)
}

/// The wire form of any sketch given by its buckets and extremes.
fn wire_sketch(
    buckets: impl Iterator<Item = (u32, u64)>,
    sum_nanos: u64,
    extremes: Option<(u64, u64)>,
) -> proto::Sketch {
    let mut previous = 0;
    let (index_deltas, counts) = buckets
        .map(|(index, count)| {
            let delta = index - previous;
            previous = index;
            (delta, count)
        })
        .unzip();
    let (min_nanos, max_nanos) = extremes.unwrap_or_default();
    proto::Sketch { index_deltas, counts, sum_nanos, min_nanos, max_nanos }
}

impl Distribution for LatencySketch {
    fn merge(&mut self, other: &Self) {
        LatencySketch::merge(self, other)
    }
    fn quantile_nanos(&self, q: f64) -> Option<f64> {
        LatencySketch::quantile_nanos(self, q)
    }
    fn count(&self) -> u64 {
        LatencySketch::count(self)
    }
    fn to_wire(&self) -> proto::Sketch {
        wire_sketch(self.buckets(), self.sum_nanos(), self.min_max_nanos())
    }
    fn from_wire(wire: &proto::Sketch) -> Result<Self, SignalsError> {
        let indexes = absolute_indexes(wire)?;
        Ok(LatencySketch::from_parts(&indexes, &wire.counts, wire.sum_nanos, wire.min_nanos, wire.max_nanos)?)
    }
}

impl Distribution for CompactSketch {
    fn merge(&mut self, other: &Self) {
        CompactSketch::merge(self, other)
    }
    fn quantile_nanos(&self, q: f64) -> Option<f64> {
        CompactSketch::quantile_nanos(self, q)
    }
    fn count(&self) -> u64 {
        CompactSketch::count(self)
    }
    fn to_wire(&self) -> proto::Sketch {
        wire_sketch(self.buckets(), self.sum_nanos(), self.min_max_nanos())
    }
    fn from_wire(wire: &proto::Sketch) -> Result<Self, SignalsError> {
        let indexes = absolute_indexes(wire)?;
        Ok(CompactSketch::from_parts(&indexes, &wire.counts, wire.sum_nanos, wire.min_nanos, wire.max_nanos)?)
    }
}

impl From<&LatencySketch> for proto::Sketch {
    fn from(sketch: &LatencySketch) -> Self {
        sketch.to_wire()
    }
}

impl TryFrom<&proto::Sketch> for LatencySketch {
    type Error = SignalsError;

    fn try_from(wire: &proto::Sketch) -> Result<Self, SignalsError> {
        LatencySketch::from_wire(wire)
    }
}

impl<L: Distribution> From<&Signals<L>> for proto::Signals {
    fn from(signals: &Signals<L>) -> Self {
        proto::Signals {
            requests: signals.requests,
            failures: signals.failures,
            status_classes: signals.status_classes.to_vec(),
            transport_errors: signals.transport_errors,
            latency: Some(signals.latency.to_wire()),
            retries: signals.retries,
            grpc_statuses: signals
                .grpc_statuses
                .iter()
                .map(|(code, count)| proto::GrpcStatusCount { code, count })
                .collect(),
        }
    }
}

impl<L: Distribution> TryFrom<&proto::Signals> for Signals<L> {
    type Error = SignalsError;

    fn try_from(wire: &proto::Signals) -> Result<Self, SignalsError> {
        let status_classes: [u64; 5] = wire
            .status_classes
            .as_slice()
            .try_into()
            .map_err(|_| SignalsError::StatusClasses(wire.status_classes.len()))?;
        if wire.failures > wire.requests {
            return Err(SignalsError::MoreFailuresThanRequests { failures: wire.failures, requests: wire.requests });
        }
        let mut grpc_statuses = GrpcStatuses::default();
        for status in &wire.grpc_statuses {
            if status.code > MAX_GRPC_STATUS {
                return Err(SignalsError::GrpcStatus(status.code));
            }
            grpc_statuses.add(status.code as u8, status.count);
        }
        let latency = match &wire.latency {
            Some(sketch) => L::from_wire(sketch)?,
            None => L::default(),
        };
        Ok(Signals {
            requests: wire.requests,
            failures: wire.failures,
            status_classes,
            transport_errors: wire.transport_errors,
            retries: wire.retries,
            grpc_statuses,
            latency,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: u16) -> Outcome {
        Outcome::Response { status, grpc_status: None }
    }

    fn grpc(code: u32) -> Outcome {
        Outcome::Response { status: 200, grpc_status: Some(code) }
    }

    #[test]
    fn failures_are_5xx_failing_grpc_statuses_and_transport_errors_but_not_4xx() {
        for status in [500, 502, 503, 504, 599] {
            assert!(response(status).is_failure(), "{status}");
        }
        for status in [100, 200, 204, 301, 304, 400, 401, 403, 404, 429, 499] {
            assert!(!response(status).is_failure(), "{status}");
        }
        let failing: Vec<u32> = (0..=16).filter(|code| grpc(*code).is_failure()).collect();
        assert_eq!(
            failing,
            [2, 4, 7, 13, 14, 15],
            "Unknown, DeadlineExceeded, PermissionDenied, Internal, Unavailable, DataLoss"
        );
        assert!(Outcome::TransportError.is_failure());
    }

    #[test]
    fn signals_count_by_class_and_merge_by_adding() {
        let mut a = Signals::default();
        a.record(response(200), Duration::from_millis(1));
        a.record(response(404), Duration::from_millis(2));
        a.record(response(503), Duration::from_millis(3));
        let mut b = Signals::default();
        b.record(grpc(14), Duration::from_millis(4));
        b.record(Outcome::TransportError, Duration::from_millis(5));
        let mut merged = a.clone();
        merged.merge(&b);
        assert_eq!(merged.requests, 5);
        assert_eq!(merged.failures, 3, "503, gRPC Unavailable, the transport error");
        assert_eq!(merged.status_classes, [0, 2, 0, 1, 1]);
        assert_eq!(merged.transport_errors, 1);
        assert_eq!(merged.latency.count(), 5);
        assert_eq!(merged.grpc_statuses.iter().collect::<Vec<_>>(), [(14, 1)]);
        assert_eq!(merged.success_rate(), Some(0.4));
        assert_eq!(Signals::<LatencySketch>::default().success_rate(), None);
    }

    #[test]
    fn signals_cross_the_wire_unchanged_and_malformed_ones_are_refused() {
        let mut signals = Signals::default();
        for (status, millis) in [(200, 1), (200, 1), (201, 2), (503, 100), (404, 7_000)] {
            signals.record(response(status), Duration::from_millis(millis));
        }
        signals.record(Outcome::TransportError, Duration::from_secs(30));
        let wire = proto::Signals::from(&signals);
        let bytes = prost::Message::encode_to_vec(&wire);
        let decoded: proto::Signals = prost::Message::decode(bytes.as_slice()).unwrap();
        assert_eq!(Signals::try_from(&decoded).unwrap(), signals);
        // The control plane reads the same bytes into its compact form, and answers alike.
        let compact: Signals<CompactSketch> = Signals::try_from(&decoded).unwrap();
        assert_eq!(compact.latency, CompactSketch::from(&signals.latency));
        assert_eq!(proto::Signals::from(&compact), wire);
        // Neighbouring buckets are one delta apart: the two 1 ms requests share a bucket,
        // and every delta after the first is positive.
        let deltas = &wire.latency.as_ref().unwrap().index_deltas;
        assert!(deltas.iter().skip(1).all(|d| *d > 0), "{deltas:?}");

        let bad = |change: fn(&mut proto::Signals)| {
            let mut wire = proto::Signals::from(&signals);
            change(&mut wire);
            Signals::<LatencySketch>::try_from(&wire).unwrap_err()
        };
        assert_eq!(
            bad(|w| {
                w.status_classes.pop();
            }),
            SignalsError::StatusClasses(4)
        );
        assert_eq!(
            bad(|w| w.failures = w.requests + 1),
            SignalsError::MoreFailuresThanRequests { failures: 7, requests: 6 }
        );
        assert_eq!(
            bad(|w| w.latency.as_mut().unwrap().index_deltas[1] = 0),
            SignalsError::Sketch(SketchError::Unordered)
        );
        assert_eq!(bad(|w| w.latency.as_mut().unwrap().index_deltas[1] = u32::MAX), SignalsError::IndexOverflow);
        assert_eq!(
            bad(|w| w.grpc_statuses.push(proto::GrpcStatusCount { code: 17, count: 1 })),
            SignalsError::GrpcStatus(17)
        );
        assert!(matches!(
            bad(|w| w.latency.as_mut().unwrap().counts.push(1)),
            SignalsError::Sketch(SketchError::Mismatched { .. })
        ));
    }
}
