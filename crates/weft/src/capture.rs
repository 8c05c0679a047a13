//! The capture flags `weft proxy --capture` and `weft capture install|remove` share, and
//! the `weft capture` command: installing the rules in an init step or a systemd unit
//! before the application starts, and removing them after.

use std::net::SocketAddr;

use anyhow::Context;
use clap::{Args, Subcommand};
use weft_model::virtual_ip::VirtualIpRange;
use weft_proxy::{
    capture::nft::Backend,
    capture::rules::{CaptureRules, Cidr, InboundPorts, ProxyTraffic, DEFAULT_MARK},
    settings::{CaptureSettings, DEFAULT_CAPTURED_INBOUND_PORT, DEFAULT_DNS_PORT},
};

/// Who installs the rules a capturing proxy serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CaptureMode {
    /// The proxy installs them at start and removes them on a clean exit.
    Install,
    /// `weft capture install` did (an init step); the proxy only serves what they capture.
    External,
}

/// Flags of transparent capture, on `weft proxy` and `weft capture install`.
#[derive(Args, Clone, Debug)]
pub struct CaptureFlags {
    /// Outbound destination ports never captured, e.g. `22,5432`.
    #[arg(long, value_name = "PORT[,PORT]", value_delimiter = ',')]
    pub capture_exclude_ports: Vec<u16>,
    /// Inbound ports never captured besides the proxy's own, e.g. `22`.
    #[arg(long, value_name = "PORT[,PORT]", value_delimiter = ',')]
    pub capture_exclude_inbound_ports: Vec<u16>,
    /// Outbound destinations never captured, e.g. `10.0.0.0/8,fd00::/8`.
    #[arg(long, value_name = "CIDR[,CIDR]", value_delimiter = ',')]
    pub capture_exclude_cidrs: Vec<Cidr>,
    /// Where the DNS responder listens (loopback); the rules send the application's DNS
    /// (port 53) there.
    #[arg(long, default_value_t = DEFAULT_DNS_PORT, value_name = "PORT")]
    pub capture_dns_port: u16,
    /// Where the rules send connections made to the application's own ports: a listener
    /// of the proxy apart from the mesh inbound port (whose traffic then needs no
    /// connection tracking), on the inbound address.
    #[arg(long, default_value_t = DEFAULT_CAPTURED_INBOUND_PORT, value_name = "PORT")]
    pub capture_inbound_port: u16,
}

impl CaptureFlags {
    /// The proxy's capture settings; `app_user` switches from the socket mark to the uid.
    pub fn settings(&self, mode: CaptureMode, app_user: Option<(u32, u32)>) -> anyhow::Result<CaptureSettings> {
        Ok(CaptureSettings {
            install: mode == CaptureMode::Install,
            proxy_traffic: match app_user {
                None => ProxyTraffic::Mark(DEFAULT_MARK),
                Some(_) => ProxyTraffic::Uid(own_uid()?),
            },
            dns_port: self.capture_dns_port,
            inbound_port: self.capture_inbound_port,
            exclude_ports: self.capture_exclude_ports.clone(),
            exclude_inbound_ports: self.capture_exclude_inbound_ports.clone(),
            exclude_cidrs: self.capture_exclude_cidrs.clone(),
        })
    }
}

/// The uid this process runs as (the owner of its `/proc` entry).
fn own_uid() -> anyhow::Result<u32> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata("/proc/self").context("cannot read /proc/self to learn the proxy's uid")?.uid())
}

/// `--app-user`: a user name from /etc/passwd, or `UID[:GID]`.
pub fn parse_app_user(text: &str) -> Result<(u32, u32), String> {
    let numeric = |s: &str| s.parse::<u32>().ok();
    if let Some(uid) = numeric(text) {
        return Ok((uid, uid));
    }
    if let Some((uid, gid)) = text.split_once(':').and_then(|(u, g)| Some((numeric(u)?, numeric(g)?))) {
        return Ok((uid, gid));
    }
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| format!("cannot read /etc/passwd: {e}"))?;
    passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| fields.len() > 3 && fields[0] == text)
        .and_then(|fields| Some((numeric(fields[2])?, numeric(fields[3])?)))
        .ok_or_else(|| format!("no user {text:?} in /etc/passwd; give a user name or UID[:GID]"))
}

/// `weft capture`: the rules alone, for an init step or a systemd unit.
#[derive(Subcommand)]
pub enum CaptureCommand {
    /// Install (or replace) the capture table and the virtual-IP routes in this network
    /// namespace. Needs root or CAP_NET_ADMIN. The proxy then runs with
    /// `--capture=external` and the same ports.
    Install(Box<InstallArgs>),
    /// Remove the capture table and routes; the ruleset is left as it was before install.
    Remove,
}

#[derive(Args)]
pub struct InstallArgs {
    /// The proxy's outbound listener port.
    #[arg(long, default_value_t = 15001, value_name = "PORT")]
    outbound_port: u16,
    /// The proxy's (mesh) inbound listener port, never redirected; `0` leaves arriving
    /// connections alone.
    #[arg(long, default_value_t = 15006, value_name = "PORT")]
    inbound_port: u16,
    /// The proxy's admin port, left alone so that Prometheus reaches it.
    #[arg(long, default_value_t = 15000, value_name = "PORT")]
    admin_port: u16,
    /// The control planes' discovery addresses, let through.
    #[arg(long, value_name = "ADDR[,ADDR]", value_delimiter = ',')]
    control: Vec<String>,
    /// The uid the proxy runs as, when the application runs as another user; without it
    /// the proxy's sockets are told apart by their mark.
    #[arg(long, value_name = "UID")]
    proxy_uid: Option<u32>,
    /// MeshConfig's virtualIPRange, routed in this namespace.
    #[arg(long, default_value = weft_model::virtual_ip::DEFAULT_RANGE, value_name = "CIDR")]
    virtual_ip_range: VirtualIpRange,
    #[command(flatten)]
    flags: CaptureFlags,
}

/// Runs `weft capture ...`.
pub fn run(command: CaptureCommand) -> anyhow::Result<()> {
    match command {
        CaptureCommand::Install(args) => {
            let exclude_destinations: Vec<SocketAddr> = args
                .control
                .iter()
                .map(|address| {
                    std::net::ToSocketAddrs::to_socket_addrs(address)
                        .with_context(|| format!("--control {address}: not an address HOST:PORT that resolves"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?
                .into_iter()
                .flatten()
                .collect();
            let rules = CaptureRules {
                outbound_port: args.outbound_port,
                inbound: (args.inbound_port != 0)
                    .then_some(InboundPorts { mesh: args.inbound_port, captured: args.flags.capture_inbound_port }),
                dns_port: Some(args.flags.capture_dns_port),
                proxy_traffic: match args.proxy_uid {
                    Some(uid) => ProxyTraffic::Uid(uid),
                    None => ProxyTraffic::Mark(DEFAULT_MARK),
                },
                exclude_inbound_ports: [args.admin_port]
                    .into_iter()
                    .chain(args.flags.capture_exclude_inbound_ports)
                    .collect(),
                exclude_outbound_ports: args.flags.capture_exclude_ports,
                exclude_cidrs: args.flags.capture_exclude_cidrs,
                exclude_destinations,
                untrack: true,
            };
            let upstreams = weft_proxy::capture::dns::Upstreams::from_host();
            let resolvers: Vec<_> = upstreams.resolvers().iter().map(|r| r.ip()).collect();
            weft_proxy::capture::routes::install(args.virtual_ip_range, &resolvers).context("weft capture install")?;
            match weft_proxy::capture::nft::install(&rules).context("weft capture install")? {
                Backend::Nft => println!("capture installed: table {}", weft_proxy::capture::rules::TABLE),
                Backend::IptablesNft => {
                    println!("capture installed: chains WEFT_OUTPUT, WEFT_PREROUTING (iptables-nft)")
                }
            }
            Ok(())
        }
        CaptureCommand::Remove => {
            let removed = weft_proxy::capture::nft::remove().context("weft capture remove")?;
            weft_proxy::capture::routes::remove().context("weft capture remove")?;
            println!("{}", if removed { "capture removed" } else { "no capture table was installed" });
            Ok(())
        }
    }
}
