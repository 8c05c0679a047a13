//! ExternalServices by name: the addresses their hosts resolved to, as the DNS
//! responder forwarded the answers. An application that resolves `api.example.com` and
//! connects to the address it got is let out under `REGISTRY_ONLY` when an
//! ExternalService lists that host and port, for as long as the answer lives.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Mutex,
    time::{Duration, Instant},
};

use hickory_proto::{op::Message, rr::RData};
use weft_model::Snapshot;

/// The shortest time an address is remembered, whatever the answer's TTL: applications
/// often cache answers longer than they are told to.
const MIN_REMEMBERED: Duration = Duration::from_secs(60);
/// The longest time an address is remembered.
const MAX_REMEMBERED: Duration = Duration::from_secs(3600);
/// Addresses remembered at most; beyond it expired ones are dropped, then new ones are
/// not remembered.
const MAX_ADDRESSES: usize = 10_000;

/// Address → (the ExternalService's host name it answered for, until when).
#[derive(Default)]
pub struct ResolvedExternal {
    addresses: Mutex<HashMap<IpAddr, (String, Instant)>>,
}

impl ResolvedExternal {
    /// Remembers the addresses in `answer` (a forwarded DNS answer) when the name it
    /// answers is one of an ExternalService's hosts.
    pub fn learn(&self, snapshot: &Snapshot, answer: &[u8]) {
        let Ok(message) = Message::from_vec(answer) else { return };
        let Some(question) = message.queries.first() else { return };
        let name = question.name().to_ascii().to_ascii_lowercase();
        let name = name.strip_suffix('.').unwrap_or(&name).to_string();
        if snapshot.external_named(&name).is_none() {
            return;
        }
        let now = Instant::now();
        let mut addresses = self.addresses.lock().unwrap_or_else(|e| e.into_inner());
        if addresses.len() >= MAX_ADDRESSES {
            addresses.retain(|_, (_, until)| *until > now);
        }
        for record in &message.answers {
            let address = match &record.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(aaaa) => IpAddr::V6(aaaa.0),
                _ => continue,
            };
            if addresses.len() >= MAX_ADDRESSES && !addresses.contains_key(&address) {
                break;
            }
            let lifetime = Duration::from_secs(u64::from(record.ttl)).clamp(MIN_REMEMBERED, MAX_REMEMBERED);
            addresses.insert(address, (name.clone(), now + lifetime));
        }
    }

    /// The ExternalService `original` may reach: one whose addresses hold it, else one
    /// whose host resolved to it; on one of its ports.
    pub fn external_for(&self, snapshot: &Snapshot, original: SocketAddr) -> Option<usize> {
        if let Some(index) = snapshot.external_at(original) {
            return Some(index);
        }
        let name = {
            let addresses = self.addresses.lock().unwrap_or_else(|e| e.into_inner());
            let (name, until) = addresses.get(&original.ip())?;
            (*until > Instant::now()).then(|| name.clone())?
        };
        let index = snapshot.external_named(&name)?;
        snapshot.external[index].ports.contains(&original.port()).then_some(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::{
        op::{OpCode, Query},
        rr::{rdata::A, Name, Record, RecordType},
    };
    use std::str::FromStr;

    fn snapshot() -> Snapshot {
        let docs = "apiVersion: weft.dev/v1alpha1\nkind: ExternalService\nmetadata: {name: payments}\n\
                    spec: {hosts: ['*.payments.example'], addresses: [192.0.2.0/28], ports: [{port: 443}]}\n";
        weft_model::compile(&weft_model::parse_documents("f", docs).unwrap(), "default")
    }

    fn answer(name: &str, address: [u8; 4]) -> Vec<u8> {
        let mut message = Message::response(7, OpCode::Query);
        let name = Name::from_str(name).unwrap();
        message.add_query(Query::query(name.clone(), RecordType::A));
        message.add_answer(Record::from_rdata(name, 5, RData::A(A(address.into()))));
        message.to_vec().unwrap()
    }

    #[test]
    fn declared_addresses_and_resolved_hosts_are_let_out_on_their_ports() {
        let (snap, resolved) = (snapshot(), ResolvedExternal::default());
        let at = |address: &str| resolved.external_for(&snap, address.parse().unwrap());
        assert_eq!(at("192.0.2.9:443"), Some(0), "in the declared network");
        assert_eq!(at("192.0.2.99:443"), None);
        assert_eq!(at("203.0.113.5:443"), None, "not resolved yet");
        resolved.learn(&snap, &answer("api.payments.example.", [203, 0, 113, 5]));
        resolved.learn(&snap, &answer("elsewhere.example.", [203, 0, 113, 6]));
        assert_eq!(at("203.0.113.5:443"), Some(0), "resolved through the responder");
        assert_eq!(at("203.0.113.5:80"), None, "a port the ExternalService does not list");
        assert_eq!(at("203.0.113.6:443"), None, "a name no ExternalService lists");
    }
}
