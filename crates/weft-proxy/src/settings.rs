//! The proxy's typed settings: everything `weft proxy` flags can set, with defaults and
//! the reason for each default.

use std::{net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

/// How long to wait for an upstream TCP connect. 1s: long enough for a loaded host on the
/// same network, short enough that a retry to another endpoint still helps the caller.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long an idle pooled upstream connection is kept. 15s: under common server
/// keep-alive timeouts (nginx 75s, Go 90s) so weft rarely reuses a half-closed one.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// HTTP/2 PING interval on upstream and downstream connections: finds dead peers on
/// long-lived gRPC streams within about 30s.
pub const DEFAULT_H2_KEEPALIVE: Duration = Duration::from_secs(10);
/// How long inbound detection waits for a client's first bytes before treating the
/// connection as opaque TCP. Ports declared `tcp` skip detection entirely.
pub const DEFAULT_DETECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a client may take to send a whole request head, from connecting or from the
/// end of its previous request (so it also ends idle keep-alive connections). 30s: far
/// above what any real client needs, and it caps what a slowloris connection holds.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a meshed caller's TLS handshake may take on the inbound listener: generous
/// for a loaded peer, and a bound on what a caller that stalls mid-handshake holds.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long SIGTERM waits for in-flight requests before exiting anyway.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a proxy with a control plane reports its golden signals. 5s: the control
/// plane's shortest window is 10s, so every window holds at least one report, and a
/// report costs one small RPC per interval.
pub const DEFAULT_TELEMETRY_INTERVAL: Duration = Duration::from_secs(5);
/// Request bodies up to this size are buffered so that the request can be retried.
pub const DEFAULT_MAX_REPLAY_BODY: usize = 64 * 1024;

/// Settings of one proxy process.
#[derive(Clone, Debug)]
pub struct ProxySettings {
    /// The YAML file of resources; re-read on SIGHUP and when it changes.
    pub config_path: Option<PathBuf>,
    /// The Service this proxy's application belongs to (labels metrics, picks the
    /// inbound port declaration).
    pub service: Option<String>,
    pub namespace: String,
    /// Where the local application listens; inbound traffic goes there.
    pub app_addr: Option<SocketAddr>,
    pub outbound_addr: SocketAddr,
    pub inbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub upstreams: Vec<UpstreamListener>,
    pub ports_file: Option<PathBuf>,
    /// Worker threads, each a single-threaded runtime with its own `SO_REUSEPORT`
    /// listeners: no work stealing, no cross-core wake-ups on the hot path.
    pub workers: usize,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub h2_keepalive: Duration,
    pub detect_timeout: Duration,
    pub header_read_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    pub drain_timeout: Duration,
    pub max_replay_body: usize,
    /// How often the config file is checked for changes.
    pub reload_interval: Duration,
    /// How often telemetry is reported to the control plane; zero turns it off (and
    /// nothing on the request path records).
    pub telemetry_interval: Duration,
    /// Take configuration from a control plane instead of a file.
    pub control: Option<crate::discovery::ControlSettings>,
    /// How the local application's health is checked (with `control` and `app_addr`).
    pub health_check: crate::health::HealthCheck,
    pub health_interval: Duration,
    /// The application to run once ready (program and arguments), if any.
    pub app_command: Vec<String>,
    /// The uid (and gid) the application runs as, when not the proxy's own.
    pub app_user: Option<(u32, u32)>,
    /// Transparent capture of the application's traffic (`--capture`).
    pub capture: Option<CaptureSettings>,
}

/// What `--capture` installs and how the proxy serves what it captures.
#[derive(Clone, Debug)]
pub struct CaptureSettings {
    /// Whether the proxy installs the rules (and removes them on exit), or an init step
    /// did (`weft capture install`).
    pub install: bool,
    /// How the rules tell the proxy's own connections from the application's.
    pub proxy_traffic: crate::capture::rules::ProxyTraffic,
    /// Where the DNS responder listens (loopback); the rules send port 53 there.
    pub dns_port: u16,
    /// Where the captured-inbound listener listens (on the inbound address); the rules
    /// send connections made to the application's ports there.
    pub inbound_port: u16,
    /// Outbound destination ports left alone (`--capture-exclude-ports`).
    pub exclude_ports: Vec<u16>,
    /// Inbound ports left alone besides the proxy's own (`--capture-exclude-inbound-ports`).
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destinations left alone (`--capture-exclude-cidrs`).
    pub exclude_cidrs: Vec<crate::capture::rules::Cidr>,
}

/// The DNS responder's default port: not 53, which a proxy that is not root cannot bind;
/// the rules redirect the application's port-53 queries to it.
pub const DEFAULT_DNS_PORT: u16 = 15053;

/// The captured-inbound listener's default port, next to the mesh inbound port (15006):
/// connections to the application's own ports, redirected by capture's rules.
pub const DEFAULT_CAPTURED_INBOUND_PORT: u16 = 15007;

impl ProxySettings {
    /// Settings with every default, for the given config file.
    pub fn new(config_path: Option<PathBuf>) -> Self {
        ProxySettings {
            config_path,
            service: None,
            namespace: weft_model::DEFAULT_NAMESPACE.to_string(),
            app_addr: None,
            outbound_addr: ([127, 0, 0, 1], 15001).into(),
            inbound_addr: ([0, 0, 0, 0], 15006).into(),
            admin_addr: ([127, 0, 0, 1], 15000).into(),
            upstreams: vec![],
            ports_file: None,
            workers: 1,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            h2_keepalive: DEFAULT_H2_KEEPALIVE,
            detect_timeout: DEFAULT_DETECT_TIMEOUT,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            tls_handshake_timeout: DEFAULT_TLS_HANDSHAKE_TIMEOUT,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            max_replay_body: DEFAULT_MAX_REPLAY_BODY,
            reload_interval: Duration::from_secs(1),
            telemetry_interval: DEFAULT_TELEMETRY_INTERVAL,
            control: None,
            health_check: crate::health::HealthCheck::Tcp,
            health_interval: Duration::from_secs(2),
            app_command: vec![],
            app_user: None,
            capture: None,
        }
    }
}

/// `--upstream NAME[:PORT]=LISTEN`: a local port that forwards opaque TCP to a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamListener {
    pub service: String,
    /// The Service port; its first port when omitted.
    pub port: Option<u16>,
    pub listen: SocketAddr,
}

impl FromStr for UpstreamListener {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let usage =
            || format!("invalid --upstream {text:?}: expected SERVICE[:PORT]=LISTEN_ADDR, e.g. db=127.0.0.1:5433");
        let (target, listen) = text.split_once('=').ok_or_else(usage)?;
        let listen = listen.parse().map_err(|_| usage())?;
        let (service, port) = match target.split_once(':') {
            Some((service, port)) => (service, Some(port.parse().map_err(|_| usage())?)),
            None => (target, None),
        };
        if service.is_empty() {
            return Err(usage());
        }
        Ok(UpstreamListener { service: service.to_string(), port, listen })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_flag_parses() {
        assert_eq!(
            "db=127.0.0.1:5433".parse(),
            Ok(UpstreamListener { service: "db".into(), port: None, listen: "127.0.0.1:5433".parse().unwrap() })
        );
        assert_eq!("db:5432=127.0.0.1:0".parse::<UpstreamListener>().unwrap().port, Some(5432));
        assert!("db".parse::<UpstreamListener>().is_err());
        assert!("=127.0.0.1:1".parse::<UpstreamListener>().is_err());
    }
}
