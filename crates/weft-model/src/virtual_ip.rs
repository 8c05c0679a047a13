//! Service virtual IPs: the addresses captured applications reach Services at.
//!
//! A Service's name resolves (through the proxy's DNS responder) to its virtual IP, and
//! a captured connection to that address is routed to the Service. A Service may declare
//! its address (`virtualIP`); otherwise one is derived from `namespace/name` by a hash
//! that never changes between releases or machines, inside MeshConfig's
//! `virtualIPRange`. Two names whose hashes meet are settled in name order (the later
//! takes the next free address), so proxies that see the same Services agree.
//!
//! A control plane stores each derived address once it is given (see weft-control's
//! `virtual_ips`), and stored addresses come before derived ones: a Service keeps its
//! address for as long as it exists, whatever Services come and go around it.
//!
//! Each IPv4 virtual IP has an IPv6 twin: the same 32 bits under [`IPV6_PREFIX`], for
//! applications that prefer IPv6.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

/// The range derived virtual IPs come from when MeshConfig names none: in 240.0.0.0/4,
/// which is reserved and never routed on the Internet, so it cannot shadow a real
/// address (Istio allocates from the same block).
pub const DEFAULT_RANGE: &str = "240.240.0.0/16";

/// The /96 prefix of the IPv6 twins (`fd77:6566:7669:70::/96`, "weftvip" in a ULA).
pub const IPV6_PREFIX: Ipv6Addr = Ipv6Addr::new(0xfd77, 0x6566, 0x7669, 0x70, 0, 0, 0, 0);

/// An IPv4 block virtual IPs are derived in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtualIpRange {
    network: u32,
    prefix: u8,
}

impl VirtualIpRange {
    /// Whether `address` lies in the block.
    pub fn contains(&self, address: Ipv4Addr) -> bool {
        self.prefix == 0 || (u32::from(address) >> (32 - self.prefix)) == (self.network >> (32 - self.prefix))
    }

    /// Usable addresses: all but the block's first and last.
    fn size(&self) -> u64 {
        (1u64 << (32 - self.prefix)).saturating_sub(2)
    }

    fn nth(&self, n: u64) -> Ipv4Addr {
        Ipv4Addr::from(self.network.wrapping_add(1 + n as u32))
    }
}

impl Default for VirtualIpRange {
    fn default() -> Self {
        DEFAULT_RANGE.parse().expect("the default range parses")
    }
}

impl FromStr for VirtualIpRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let usage = || format!("{text:?} is not an IPv4 CIDR; write it as e.g. {DEFAULT_RANGE}");
        let (address, prefix) = text.split_once('/').ok_or_else(usage)?;
        let address: Ipv4Addr = address.parse().map_err(|_| usage())?;
        let prefix: u8 = prefix.parse().map_err(|_| usage())?;
        if !(8..=30).contains(&prefix) {
            return Err(format!("{text:?}: the prefix must be from /8 to /30, so that the range holds Services"));
        }
        let mask = u32::MAX << (32 - prefix);
        if u32::from(address) & !mask != 0 {
            return Err(format!(
                "{text:?} has host bits set; the network is {}/{prefix}",
                Ipv4Addr::from(u32::from(address) & mask)
            ));
        }
        if address.is_loopback() || address.is_multicast() || address.is_unspecified() {
            return Err(format!(
                "{text:?} overlaps loopback, multicast or 0.0.0.0; choose a private or reserved block"
            ));
        }
        Ok(VirtualIpRange { network: u32::from(address), prefix })
    }
}

impl fmt::Display for VirtualIpRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.network), self.prefix)
    }
}

/// The IPv6 twin of an IPv4 virtual IP.
pub fn ipv6_twin(address: Ipv4Addr) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(IPV6_PREFIX) | u128::from(u32::from(address)))
}

/// The IPv4 virtual IP an IPv6 twin stands for.
pub fn from_ipv6_twin(address: Ipv6Addr) -> Option<Ipv4Addr> {
    let bits = u128::from(address);
    (bits >> 32 == u128::from(IPV6_PREFIX) >> 32).then(|| Ipv4Addr::from(bits as u32))
}

/// FNV-1a, 64 bits: fixed by its definition, so every release and machine derives the
/// same address from the same name.
fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3))
}

/// Gives every Service (`(namespace, name)` → declared address) its virtual IP: the
/// declared one, else the one `stored` for it (if in `range` and not declared by
/// another), else one derived in `range`. A declared address another Service already
/// declared is refused (the reason is returned); a full range leaves the rest without.
pub fn assign(
    services: &BTreeMap<(String, String), Option<Ipv4Addr>>,
    stored: &BTreeMap<(String, String), Ipv4Addr>,
    range: VirtualIpRange,
) -> (BTreeMap<(String, String), Ipv4Addr>, Vec<String>) {
    let mut assigned = BTreeMap::new();
    let mut taken: HashSet<Ipv4Addr> = HashSet::new();
    let mut problems = Vec::new();
    let mut owner: BTreeMap<Ipv4Addr, &(String, String)> = BTreeMap::new();
    for (key, declared) in services {
        if let Some(address) = declared {
            match owner.get(address) {
                Some(first) => problems.push(format!(
                    "Service {}/{} declares virtualIP {address}, which {}/{} declares too; it gets none until one \
                     of them changes",
                    key.0, key.1, first.0, first.1
                )),
                None => {
                    owner.insert(*address, key);
                    taken.insert(*address);
                    assigned.insert(key.clone(), *address);
                }
            }
        }
    }
    for (key, declared) in services {
        match (declared, stored.get(key)) {
            (None, Some(address)) if range.contains(*address) && taken.insert(*address) => {
                assigned.insert(key.clone(), *address);
            }
            _ => {}
        }
    }
    let size = range.size();
    for (key, declared) in services {
        if declared.is_some() || assigned.contains_key(key) {
            continue;
        }
        let start = stable_hash(&format!("{}/{}", key.0, key.1)) % size;
        let free = (0..size).map(|step| range.nth((start + step) % size)).find(|address| !taken.contains(address));
        match free {
            Some(address) => {
                taken.insert(address);
                assigned.insert(key.clone(), address);
            }
            None => problems.push(format!(
                "Service {}/{} gets no virtual IP: the range {range} is full; widen MeshConfig's virtualIPRange",
                key.0, key.1
            )),
        }
    }
    (assigned, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> (String, String) {
        ("default".into(), name.into())
    }

    #[test]
    fn derived_addresses_are_stable_in_range_and_distinct() {
        let range = VirtualIpRange::default();
        let services: BTreeMap<_, _> = (0..2000).map(|i| (key(&format!("svc-{i}")), None)).collect();
        let (first, problems) = assign(&services, &BTreeMap::new(), range);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(first.len(), 2000);
        assert!(first.values().all(|a| range.contains(*a) && *a != Ipv4Addr::new(240, 240, 0, 0)));
        let distinct: HashSet<_> = first.values().collect();
        assert_eq!(distinct.len(), 2000, "no two Services share an address");
        // The same names give the same addresses, whatever else is there; one name's
        // address does not depend on the others unless their hashes meet.
        let (again, _) = assign(&services, &BTreeMap::new(), range);
        assert_eq!(first, again);
        let alone: BTreeMap<_, _> = [(key("reviews"), None)].into();
        let with_others: BTreeMap<_, _> = [(key("reviews"), None), (key("ratings"), None)].into();
        assert_eq!(
            assign(&alone, &BTreeMap::new(), range).0[&key("reviews")],
            assign(&with_others, &BTreeMap::new(), range).0[&key("reviews")]
        );
        // Pinned by the hash's definition: a change here moves every Service's address.
        assert_eq!(assign(&alone, &BTreeMap::new(), range).0[&key("reviews")], Ipv4Addr::new(240, 240, 36, 79));
    }

    #[test]
    fn declared_addresses_win_and_a_second_claim_is_refused() {
        let range: VirtualIpRange = "10.96.0.0/24".parse().unwrap();
        let declared = Ipv4Addr::new(10, 96, 0, 10);
        let services: BTreeMap<_, _> =
            [(key("a"), Some(declared)), (key("b"), Some(declared)), (key("c"), None)].into();
        let (assigned, problems) = assign(&services, &BTreeMap::new(), range);
        assert_eq!(assigned[&key("a")], declared);
        assert!(!assigned.contains_key(&key("b")));
        assert!(problems[0].contains("default/b declares virtualIP 10.96.0.10, which default/a"), "{problems:?}");
        assert_ne!(assigned[&key("c")], declared);
    }

    #[test]
    fn a_stored_address_is_kept_whatever_comes_before_it() {
        let range: VirtualIpRange = "10.96.0.0/24".parse().unwrap();
        let alone = |name: &str| assign(&[(key(name), None)].into(), &BTreeMap::new(), range).0[&key(name)];
        let address = alone("b");
        // A newcomer that sorts before b and whose hash meets b's: derived alone in name
        // order, it would take b's address and move b.
        let newcomer = (0..10_000).map(|i| format!("a{i}")).find(|name| alone(name) == address).unwrap();
        let both: BTreeMap<_, _> = [(key(&newcomer), None), (key("b"), None)].into();
        assert_eq!(assign(&both, &BTreeMap::new(), range).0[&key(&newcomer)], address);
        // With b's address stored, b keeps it and the newcomer takes the next.
        let stored: BTreeMap<_, _> = [(key("b"), address)].into();
        let (assigned, problems) = assign(&both, &stored, range);
        assert!(problems.is_empty());
        assert_eq!(assigned[&key("b")], address);
        assert_ne!(assigned[&key(&newcomer)], address);
        // A stored address outside the range (MeshConfig changed it), or one a Service now
        // declares, is not used.
        let outside: BTreeMap<_, _> = [(key("b"), Ipv4Addr::new(10, 97, 0, 1))].into();
        assert!(range.contains(assign(&both, &outside, range).0[&key("b")]));
        let claimed: BTreeMap<_, _> = [(key(&newcomer), Some(address)), (key("b"), None)].into();
        let (assigned, _) = assign(&claimed, &stored, range);
        assert_eq!(assigned[&key(&newcomer)], address);
        assert_ne!(assigned[&key("b")], address);
    }

    #[test]
    fn a_full_range_says_so() {
        let range: VirtualIpRange = "10.96.0.0/30".parse().unwrap();
        let services: BTreeMap<_, _> = (0..3).map(|i| (key(&format!("s{i}")), None)).collect();
        let (assigned, problems) = assign(&services, &BTreeMap::new(), range);
        assert_eq!(assigned.len(), 2);
        assert!(problems[0].contains("range 10.96.0.0/30 is full"), "{problems:?}");
    }

    #[test]
    fn ranges_parse_with_reasons_and_twins_round_trip() {
        assert_eq!("240.240.0.0/16".parse::<VirtualIpRange>().unwrap().to_string(), "240.240.0.0/16");
        assert!("240.240.0.1/16".parse::<VirtualIpRange>().unwrap_err().contains("host bits"));
        assert!("127.0.0.0/8".parse::<VirtualIpRange>().unwrap_err().contains("loopback"));
        assert!("10.0.0.0/31".parse::<VirtualIpRange>().unwrap_err().contains("/30"));
        assert!("10.0.0.0".parse::<VirtualIpRange>().is_err());
        let address = Ipv4Addr::new(240, 240, 1, 2);
        assert_eq!(ipv6_twin(address).to_string(), "fd77:6566:7669:70::f0f0:102");
        assert_eq!(from_ipv6_twin(ipv6_twin(address)), Some(address));
        assert_eq!(from_ipv6_twin("fd00::1".parse().unwrap()), None);
    }
}
