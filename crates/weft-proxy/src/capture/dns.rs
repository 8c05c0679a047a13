//! The DNS responder captured applications ask: a Service's names (`reviews`,
//! `reviews.NS`, `reviews.NS.svc`, `reviews.NS.svc.cluster.local`) resolve to its virtual
//! IP; any other name is forwarded, unchanged, to the resolvers of `/etc/resolv.conf`, and
//! their answer returned unchanged. A name under `svc.cluster.local` that is no Service
//! gets NXDOMAIN here, since the mesh is that zone's only authority.
//!
//! Messages are parsed and written with hickory-proto; what is answered is the mesh's.
//! UDP and TCP (length-prefixed, RFC 1035 §4.2.2) are both served, since the rules send
//! both to this responder. Forwarded queries leave on marked sockets, so capture lets
//! them out instead of sending them back here.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{
        rdata::{A, AAAA},
        RData, Record, RecordType,
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};
use weft_model::Snapshot;

use crate::{listener::DrainWatch, state::SharedState};

/// How long answers about Services may be cached: Services' virtual IPs rarely change,
/// and a removed Service should stop resolving soon.
const SERVICE_TTL: u32 = 30;
/// How long one upstream resolver gets before the next is asked.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// The zone the mesh answers for alone.
const MESH_ZONE: &str = ".svc.cluster.local";
/// The largest DNS message over UDP accepted or relayed (EDNS's common ceiling).
const MAX_UDP_MESSAGE: usize = 4096;

/// Where names the mesh does not know are sent.
#[derive(Clone, Debug)]
pub struct Upstreams {
    resolvers: Vec<SocketAddr>,
}

impl Upstreams {
    /// The `nameserver` lines of a resolv.conf, on port 53.
    pub fn from_resolv_conf(text: &str) -> Upstreams {
        let resolvers = text
            .lines()
            .filter_map(|line| line.trim().strip_prefix("nameserver"))
            .filter_map(|rest| rest.trim().parse::<IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, 53))
            .collect();
        Upstreams { resolvers }
    }

    /// The host's resolvers, from `/etc/resolv.conf` (none when it cannot be read: every
    /// forwarded name then fails with SERVFAIL).
    pub fn from_host() -> Upstreams {
        match std::fs::read_to_string("/etc/resolv.conf") {
            Ok(text) => Upstreams::from_resolv_conf(&text),
            Err(error) => {
                tracing::warn!(%error, "cannot read /etc/resolv.conf: names outside the mesh will not resolve");
                Upstreams { resolvers: vec![] }
            }
        }
    }

    pub fn resolvers(&self) -> &[SocketAddr] {
        &self.resolvers
    }
}

/// What the responder does with one query.
#[derive(Debug, PartialEq)]
pub enum Reply {
    /// The mesh answers: this message.
    Answer(Vec<u8>),
    /// Not the mesh's name: ask the upstream resolvers.
    Forward,
    /// Not a DNS message worth an answer.
    Drop,
}

/// Answers `query` from the snapshot when it names a Service or lies in the mesh's zone.
/// AAAA questions get the virtual IP's IPv6 twin when `ipv6` is on, else no records.
pub fn reply(snapshot: &Snapshot, query: &[u8], ipv6: bool) -> Reply {
    let Ok(request) = Message::from_vec(query) else {
        // Answer what has a header (FORMERR), so that the client stops waiting.
        return match query {
            [high, low, ..] if query.len() >= 12 => {
                let id = u16::from_be_bytes([*high, *low]);
                Reply::Answer(encode(&Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)))
            }
            _ => Reply::Drop,
        };
    };
    if request.metadata.message_type != MessageType::Query
        || request.metadata.op_code != OpCode::Query
        || request.queries.len() != 1
    {
        return Reply::Forward;
    }
    let question = &request.queries[0];
    let name = question.name().to_ascii().to_ascii_lowercase();
    let name = name.strip_suffix('.').unwrap_or(&name);
    let service = snapshot.service_by_host(name).and_then(|index| snapshot.services[index].virtual_ip);
    let mut response = Message::response(request.metadata.id, OpCode::Query);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.metadata.authoritative = true;
    response.add_query(question.clone());
    match service {
        Some(address) => {
            let owner = question.name().clone();
            match question.query_type() {
                RecordType::A => {
                    response.add_answer(Record::from_rdata(owner, SERVICE_TTL, RData::A(A(address))));
                }
                RecordType::AAAA if ipv6 => {
                    let twin = weft_model::virtual_ip::ipv6_twin(address);
                    response.add_answer(Record::from_rdata(owner, SERVICE_TTL, RData::AAAA(AAAA(twin))));
                }
                // The name exists, with no records of this type: NOERROR, empty.
                _ => {}
            }
        }
        None if name.ends_with(MESH_ZONE) => response.metadata.response_code = ResponseCode::NXDomain,
        None => return Reply::Forward,
    }
    Reply::Answer(encode(&response))
}

/// The name `query` asks about when it may name a Service this proxy has not
/// discovered yet (a proxy with a control plane learns Services as they are asked for):
/// a short name, `NAME.NS`, or a name under `.svc` or `svc.cluster.local`.
pub fn undiscovered_name(snapshot: &Snapshot, query: &[u8]) -> Option<String> {
    let request = Message::from_vec(query).ok()?;
    let [question] = request.queries.as_slice() else { return None };
    let name = question.name().to_ascii().to_ascii_lowercase();
    let name = name.strip_suffix('.').unwrap_or(&name).to_string();
    let service_like = name.matches('.').count() <= 1 || name.ends_with(".svc") || name.ends_with(MESH_ZONE);
    (service_like && snapshot.service_by_host(&name).is_none()).then_some(name)
}

/// Answers `query`, first asking the control plane about a name it may know
/// ([`undiscovered_name`]); `None`: forward it.
async fn reply_discovering(state: &SharedState, query: &[u8], ipv6: bool) -> Reply {
    if let Some(discovery) = state.discovery.get() {
        if let Some(name) = undiscovered_name(&state.config.load().snapshot, query) {
            discovery.discover_name(state, &name).await;
        }
    }
    reply(&state.config.load().snapshot, query, ipv6)
}

fn encode(message: &Message) -> Vec<u8> {
    message.to_vec().unwrap_or_default()
}

/// Whether this namespace speaks IPv6 (answers to AAAA questions carry the twins then).
pub fn ipv6_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6").is_ok_and(|value| value.trim() == "0")
}

/// Serves DNS over UDP on `socket` until the drain starts.
pub async fn serve_udp(
    state: Arc<SharedState>,
    socket: std::net::UdpSocket,
    upstreams: Arc<Upstreams>,
    mut drain: DrainWatch,
) {
    let socket = match socket.set_nonblocking(true).and_then(|()| UdpSocket::from_std(socket)) {
        Ok(socket) => Arc::new(socket),
        Err(error) => {
            tracing::error!(%error, "cannot serve DNS over UDP");
            return;
        }
    };
    let ipv6 = ipv6_enabled();
    let mut buffer = vec![0u8; MAX_UDP_MESSAGE];
    loop {
        let (length, client) = tokio::select! {
            _ = drain.signaled() => return,
            received = socket.recv_from(&mut buffer) => match received {
                Ok(received) => received,
                Err(error) => {
                    tracing::debug!(%error, "DNS receive failed");
                    continue;
                }
            },
        };
        let query = buffer[..length].to_vec();
        // Discovery and forwarding wait on the network: each query on its own task.
        let (state, socket, upstreams) = (state.clone(), socket.clone(), upstreams.clone());
        tokio::spawn(async move {
            let answer = match reply_discovering(&state, &query, ipv6).await {
                Reply::Answer(answer) => answer,
                Reply::Drop => return,
                Reply::Forward => match forward_udp(&upstreams, &query).await {
                    Some(answer) => {
                        state.resolved_external.learn(&state.config.load().snapshot, &answer);
                        answer
                    }
                    None => server_failure(&query),
                },
            };
            let _ = socket.send_to(&answer, client).await;
        });
    }
}

/// Serves DNS over TCP on `listener` until the drain starts.
pub async fn serve_tcp(
    state: Arc<SharedState>,
    listener: std::net::TcpListener,
    upstreams: Arc<Upstreams>,
    drain: DrainWatch,
) {
    let ipv6 = ipv6_enabled();
    crate::listener::accept_loop(listener, drain, move |stream, _peer, _drain| {
        let (state, upstreams) = (state.clone(), upstreams.clone());
        async move {
            let _ = serve_tcp_client(&state, stream, &upstreams, ipv6).await;
        }
    })
    .await;
}

/// Answers length-prefixed queries on one connection until the client closes it.
async fn serve_tcp_client(
    state: &SharedState,
    mut stream: TcpStream,
    upstreams: &Upstreams,
    ipv6: bool,
) -> std::io::Result<()> {
    loop {
        let query = match tokio::time::timeout(FORWARD_TIMEOUT * 5, read_framed(&mut stream)).await {
            Ok(Ok(query)) => query,
            _ => return Ok(()),
        };
        let answer = match reply_discovering(state, &query, ipv6).await {
            Reply::Answer(answer) => answer,
            Reply::Drop => return Ok(()),
            Reply::Forward => match forward_tcp(upstreams, &query).await {
                Some(answer) => {
                    state.resolved_external.learn(&state.config.load().snapshot, &answer);
                    answer
                }
                None => server_failure(&query),
            },
        };
        write_framed(&mut stream, &answer).await?;
    }
}

async fn read_framed(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let length = stream.read_u16().await?;
    let mut message = vec![0u8; usize::from(length)];
    stream.read_exact(&mut message).await?;
    Ok(message)
}

async fn write_framed(stream: &mut TcpStream, message: &[u8]) -> std::io::Result<()> {
    let length = u16::try_from(message.len()).map_err(|_| std::io::ErrorKind::InvalidData)?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&length.to_be_bytes());
    framed.extend_from_slice(message);
    stream.write_all(&framed).await
}

/// SERVFAIL for `query`: no upstream resolver answered.
fn server_failure(query: &[u8]) -> Vec<u8> {
    let id = match query {
        [high, low, ..] => u16::from_be_bytes([*high, *low]),
        _ => 0,
    };
    let mut message = Message::error_msg(id, OpCode::Query, ResponseCode::ServFail);
    if let Ok(request) = Message::from_vec(query) {
        message.metadata.recursion_desired = request.metadata.recursion_desired;
        message.add_queries(request.queries);
    }
    encode(&message)
}

/// Asks each upstream resolver in turn over UDP; the first answer is returned as is.
async fn forward_udp(upstreams: &Upstreams, query: &[u8]) -> Option<Vec<u8>> {
    for resolver in upstreams.resolvers() {
        let attempt = async {
            let local: SocketAddr = match resolver {
                SocketAddr::V4(_) => ([0, 0, 0, 0], 0).into(),
                SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
            };
            let socket = UdpSocket::bind(local).await?;
            if let Some(mark) = super::proxy_mark() {
                super::original_dst::mark_as_proxy(&socket, mark)?;
            }
            socket.connect(resolver).await?;
            socket.send(query).await?;
            let mut buffer = vec![0u8; MAX_UDP_MESSAGE];
            loop {
                let length = socket.recv(&mut buffer).await?;
                // Only the answer to this query (same id) counts.
                if length >= 2 && buffer[..2] == query[..2.min(query.len())] {
                    buffer.truncate(length);
                    return Ok::<_, std::io::Error>(buffer);
                }
            }
        };
        match tokio::time::timeout(FORWARD_TIMEOUT, attempt).await {
            Ok(Ok(answer)) => return Some(answer),
            Ok(Err(error)) => tracing::debug!(%resolver, %error, "DNS forward failed"),
            Err(_) => tracing::debug!(%resolver, "DNS forward timed out"),
        }
    }
    None
}

/// Asks each upstream resolver in turn over TCP.
async fn forward_tcp(upstreams: &Upstreams, query: &[u8]) -> Option<Vec<u8>> {
    for resolver in upstreams.resolvers() {
        let attempt = async {
            let mut stream = crate::transport::connect_tcp(*resolver, FORWARD_TIMEOUT)
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            write_framed(&mut stream, query).await?;
            read_framed(&mut stream).await
        };
        match tokio::time::timeout(FORWARD_TIMEOUT, attempt).await {
            Ok(Ok(answer)) => return Some(answer),
            Ok(Err(error)) => tracing::debug!(%resolver, %error, "DNS forward over TCP failed"),
            Err(_) => tracing::debug!(%resolver, "DNS forward over TCP timed out"),
        }
    }
    None
}

/// Binds the responder's UDP socket and TCP listener on `address`.
pub fn bind(address: SocketAddr) -> std::io::Result<(std::net::UdpSocket, std::net::TcpListener)> {
    let udp = std::net::UdpSocket::bind(address)?;
    let tcp = crate::listener::bind(address, 1, "DNS responder", "--capture-dns-port")
        .map_err(|error| std::io::Error::new(error.source.kind(), error.to_string()))?
        .remove(0);
    Ok((udp, tcp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::{op::Query, rr::Name};
    use std::str::FromStr;

    fn snapshot() -> Snapshot {
        let docs = "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: reviews}\n\
                    spec: {selector: {app: reviews}, virtualIP: 10.96.0.7, ports: [{port: 80}]}\n";
        weft_model::compile(&weft_model::parse_documents("f", docs).unwrap(), "default")
    }

    fn ask(name: &str, kind: RecordType) -> Vec<u8> {
        let mut message = Message::query();
        message.metadata.id = 4242;
        message.metadata.recursion_desired = true;
        message.add_query(Query::query(Name::from_str(name).unwrap(), kind));
        message.to_vec().unwrap()
    }

    fn answered(reply: Reply) -> Message {
        match reply {
            Reply::Answer(bytes) => Message::from_vec(&bytes).unwrap(),
            other => panic!("expected an answer, got {other:?}"),
        }
    }

    #[test]
    fn service_names_resolve_to_the_virtual_ip_and_its_twin() {
        let snap = snapshot();
        for name in ["reviews", "reviews.default", "Reviews.default.svc", "reviews.default.svc.cluster.local."] {
            let message = answered(reply(&snap, &ask(name, RecordType::A), true));
            assert_eq!(message.metadata.id, 4242);
            assert_eq!(message.metadata.response_code, ResponseCode::NoError);
            assert_eq!(message.answers.len(), 1, "{name}");
            assert_eq!(message.answers[0].data, RData::A(A("10.96.0.7".parse().unwrap())), "{name}");
        }
        let six = answered(reply(&snap, &ask("reviews", RecordType::AAAA), true));
        assert_eq!(six.answers[0].data, RData::AAAA(AAAA("fd77:6566:7669:70::a60:7".parse().unwrap())));
        let without = answered(reply(&snap, &ask("reviews", RecordType::AAAA), false));
        assert!(without.answers.is_empty() && without.metadata.response_code == ResponseCode::NoError);
    }

    #[test]
    fn the_mesh_zone_is_ours_and_other_names_are_forwarded() {
        let snap = snapshot();
        let missing = answered(reply(&snap, &ask("ratings.default.svc.cluster.local", RecordType::A), true));
        assert_eq!(missing.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(reply(&snap, &ask("example.com", RecordType::A), true), Reply::Forward);
        assert_eq!(reply(&snap, &ask("ratings", RecordType::A), true), Reply::Forward);
        // Garbage with a header gets FORMERR; shorter garbage nothing.
        let garbage = [0x12, 0x34, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(answered(reply(&snap, &garbage, true)).metadata.response_code, ResponseCode::FormErr);
        assert_eq!(reply(&snap, &[1, 2, 3], true), Reply::Drop);
    }

    #[test]
    fn resolv_conf_nameservers_are_the_upstreams() {
        let upstreams = Upstreams::from_resolv_conf(
            "# comment\nsearch example.com\nnameserver 10.0.0.2\nnameserver fd00::1\nnameserver bad\n",
        );
        assert_eq!(upstreams.resolvers(), &["10.0.0.2:53".parse().unwrap(), "[fd00::1]:53".parse().unwrap()]);
    }
}
