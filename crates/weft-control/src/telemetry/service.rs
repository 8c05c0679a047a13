//! The gRPC side of telemetry, on the discovery port: proxies' reports come in
//! ([`TelemetryService`]), and replicas ask each other for their series
//! ([`AggregatesService`], [`mesh_window`]) so that any replica answers for the whole
//! mesh. Each replica holds what its own proxies reported (a report goes to the replica
//! that holds the proxy's discovery stream, over the same connection); a question is
//! answered by merging every replica's window, which the sketches allow without loss.

use std::{sync::Arc, time::Duration};

use tonic::{Request, Response, Status};
use weft_api::telemetry::{
    aggregates_client::AggregatesClient, aggregates_server::Aggregates, telemetry_server::Telemetry, ProxyReport,
    ReportReply, SeriesAnswer, SeriesQuery,
};

use super::{
    aggregator::WindowSeries,
    window::{SlotRange, TIERS},
};
use crate::{control_tls::Peer, discovery::Hub};

/// How long another replica may take to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(3);

/// Now, in Unix milliseconds.
pub fn now_millis() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Proxies' reports.
pub struct TelemetryService {
    hub: Arc<Hub>,
}

impl TelemetryService {
    pub fn new(hub: Arc<Hub>) -> Self {
        TelemetryService { hub }
    }
}

#[tonic::async_trait]
impl Telemetry for TelemetryService {
    async fn report(&self, request: Request<ProxyReport>) -> Result<Response<ReportReply>, Status> {
        let identity = request.extensions().get::<Peer>().and_then(|peer| peer.identity.clone());
        let identity = match identity {
            Some(identity) if !identity.is_control_plane() && identity.workload_parts().is_some() => identity,
            _ => {
                self.hub.metrics.telemetry_report("refused");
                return Err(Status::unauthenticated("a telemetry report needs the proxy's workload certificate"));
            }
        };
        let (namespace, _) = identity.workload_parts().expect("checked above");
        let report = request.into_inner();
        let reporter =
            match self.hub.telemetry_reporter(namespace, &report.proxy_id, &identity.to_string(), report.sequence) {
                Ok(Some(reporter)) => reporter,
                Ok(None) => {
                    self.hub.metrics.telemetry_report("duplicate");
                    return Ok(Response::new(ReportReply {}));
                }
                Err(status) => {
                    self.hub.metrics.telemetry_report("refused");
                    return Err(status);
                }
            };
        match self.hub.aggregator.ingest(&report, &reporter, now_millis()) {
            Ok(ingested) => {
                self.hub.metrics.telemetry_report("accepted");
                self.hub.metrics.telemetry_rows_dropped(ingested.dropped as u64 + report.dropped_rows);
                if ingested.dropped > 0 {
                    tracing::warn!(
                        dropped = ingested.dropped,
                        "telemetry rows dropped: this replica holds the most series it keeps"
                    );
                }
                Ok(Response::new(ReportReply {}))
            }
            Err(error) => {
                self.hub.metrics.telemetry_report("refused");
                tracing::info!(proxy = %reporter.workload, %error, "refused a malformed telemetry report");
                Err(Status::invalid_argument(format!("telemetry report refused: {error}")))
            }
        }
    }
}

/// Other replicas' questions.
pub struct AggregatesService {
    hub: Arc<Hub>,
}

impl AggregatesService {
    pub fn new(hub: Arc<Hub>) -> Self {
        AggregatesService { hub }
    }
}

#[tonic::async_trait]
impl Aggregates for AggregatesService {
    async fn local_series(&self, request: Request<SeriesQuery>) -> Result<Response<SeriesAnswer>, Status> {
        crate::replicas::require_replica(&self.hub, request.extensions(), "this replica's telemetry")?;
        let query = request.into_inner();
        let tier = TIERS
            .iter()
            .position(|tier| tier.slot_seconds == query.slot_seconds)
            .ok_or_else(|| Status::invalid_argument(format!("no ring has {} s slots", query.slot_seconds)))?;
        let range = SlotRange { tier, from: query.from, to: query.to };
        let window = self.hub.aggregator.window(&range, &query.namespace, now_millis());
        Ok(Response::new(window.to_wire(self.hub.registry.cluster().replica())))
    }
}

/// `range` over the whole mesh: this replica's series and every other replica's, asked
/// over mutual TLS; the replicas that did not answer are named (their proxies' traffic
/// is missing from the answer, and it says so).
pub async fn mesh_window(hub: &Hub, range: SlotRange, namespace: &str) -> (WindowSeries, Vec<serde_json::Value>) {
    let mut window = hub.aggregator.window(&range, namespace, now_millis());
    let (theirs, unreachable) = other_replicas_windows(hub, range, namespace).await;
    theirs.into_iter().for_each(|theirs| window.merge(theirs));
    (window, unreachable)
}

/// `range` as every other replica holds it, each answer apart, and the replicas that
/// did not answer.
pub async fn other_replicas_windows(
    hub: &Hub,
    range: SlotRange,
    namespace: &str,
) -> (Vec<WindowSeries>, Vec<serde_json::Value>) {
    let cluster = hub.registry.cluster();
    let mut answers = Vec::new();
    let mut unreachable = Vec::new();
    let query = SeriesQuery {
        slot_seconds: TIERS[range.tier].slot_seconds,
        from: range.from,
        to: range.to,
        namespace: namespace.to_string(),
    };
    for replica in cluster.replicas().await.unwrap_or_default() {
        if replica.id == cluster.replica() {
            continue;
        }
        match peer_window(hub, &replica.grpc, query.clone()).await {
            Ok(theirs) => answers.push(theirs),
            Err(reason) => {
                tracing::warn!(replica = %replica.id, grpc = %replica.grpc, %reason, "cannot ask another replica for its telemetry");
                unreachable.push(serde_json::json!({"replica": replica.id, "grpc": replica.grpc, "reason": reason}));
            }
        }
    }
    (answers, unreachable)
}

async fn peer_window(hub: &Hub, grpc: &str, query: SeriesQuery) -> Result<WindowSeries, String> {
    let ask = async {
        let channel = crate::replicas::dial(hub, grpc).await?;
        let answer = AggregatesClient::new(channel)
            .max_decoding_message_size(256 * 1024 * 1024)
            .local_series(query)
            .await
            .map_err(|status| status.message().to_string())?;
        WindowSeries::from_wire(&answer.into_inner())
    };
    tokio::time::timeout(ASK_TIMEOUT, ask).await.map_err(|_| format!("no answer within {ASK_TIMEOUT:?}"))?
}
