//! `weft`: the one binary of the weft service mesh. Subcommands wire the crates together.

#![forbid(unsafe_code)]

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::Context;

mod api_client;
mod capture;
mod cli;
mod context;
mod demo;
mod demo_app;
mod operations;
mod stat;
mod tap;
use clap::{Args, Parser, Subcommand};
use weft_model::GoDuration;
use weft_proxy::{ProxySettings, UpstreamListener};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// weft: a service mesh. Sidecar proxies carry every service's traffic and add load
/// balancing, routing, resilience and telemetry without changing applications.
#[derive(Parser)]
#[command(name = "weft", version, propagate_version = true)]
struct Cli {
    /// Log filter, e.g. `info`, `debug`, `weft_proxy=debug`; overrides RUST_LOG.
    #[arg(long, global = true, env = "WEFT_LOG")]
    log: Option<String>,
    /// Log format on stderr: `text` for people, `json` (one object per line) for log
    /// pipelines.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a sidecar proxy beside one service instance.
    Proxy(Box<ProxyArgs>),
    /// Transparent capture's rules on their own, for an init step or a systemd unit:
    /// `install` before the application and its proxy start, `remove` after.
    #[command(subcommand)]
    Capture(crate::capture::CaptureCommand),
    /// Run a whole demo mesh on loopback: a control plane, six service instances behind
    /// their sidecars, traffic, and a canary route. Ctrl-C stops everything.
    Demo {
        /// The control plane's API address (the CLI's default server).
        #[arg(long, default_value = weft_control::control::DEFAULT_API_ADDR, value_name = "ADDR")]
        api_addr: SocketAddr,
        /// The entry proxy: an HTTP proxy into the mesh (`curl -x`).
        #[arg(long, default_value = "127.0.0.1:15001", value_name = "ADDR")]
        entry_addr: SocketAddr,
        /// Generated requests per second.
        #[arg(long, default_value_t = 20, value_name = "N")]
        rate: u32,
        /// Write the bound addresses as JSON to this file once the demo serves.
        #[arg(long, value_name = "PATH")]
        ports_file: Option<PathBuf>,
    },
    /// Run the control plane: the resource store and the HTTP API.
    Control(Box<ControlArgs>),
    /// Create or update resources from YAML files; all documents are validated first and
    /// applied together or not at all.
    Apply {
        /// A YAML file, a directory of them, or `-` for stdin; repeatable.
        #[arg(short = 'f', long = "filename", value_name = "PATH", required = true)]
        files: Vec<PathBuf>,
        /// Validate and print what would change, without changing anything.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        server: cli::ServerArgs,
    },
    /// List resources of a kind (`services`, `workloads`, `httproutes`, `grpcroutes`,
    /// `trafficpolicies`, or `all`), or show one.
    Get {
        kind: String,
        name: Option<String>,
        /// Namespace; all namespaces when listing without it.
        #[arg(short = 'n', long, value_name = "NS")]
        namespace: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: cli::Output,
        #[command(flatten)]
        server: cli::ServerArgs,
    },
    /// Delete one resource (`weft delete service reviews`) or those named in files (`-f`).
    Delete {
        /// KIND NAME.
        #[arg(num_args = 0..=2, value_name = "KIND NAME")]
        target: Vec<String>,
        #[arg(short = 'f', long = "filename", value_name = "PATH")]
        files: Vec<PathBuf>,
        #[arg(short = 'n', long, default_value = weft_model::DEFAULT_NAMESPACE, value_name = "NS")]
        namespace: String,
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        server: cli::ServerArgs,
    },
    /// Explain one Service (its routes, policy, endpoints, unresolved references) or one
    /// Workload (its health, identity and certificate).
    Describe {
        /// `service` (`svc`) or `workload` (`wl`).
        kind: String,
        name: String,
        #[arg(short = 'n', long, default_value = weft_model::DEFAULT_NAMESPACE, value_name = "NS")]
        namespace: String,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: cli::Output,
        #[command(flatten)]
        server: cli::ServerArgs,
    },
    /// Report what needs attention: proxies without a workload identity, certificates
    /// near expiry (renewal failing). Exits non-zero when something does.
    Check {
        #[command(flatten)]
        server: cli::ServerArgs,
    },
    /// Tokens: join tokens (a proxy joins as one workload) and operator tokens (the API,
    /// with a role).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Cut off a compromised identity or certificate, mesh-wide, at once.
    #[command(subcommand)]
    Revoke(RevokeCommand),
    /// Authorization as the control plane computes it from the policies.
    #[command(subcommand)]
    Authz(AuthzCommand),
    /// Golden signals, aggregated by the control plane: success rate, requests per
    /// second, latency percentiles, TCP connections and mutual-TLS share of `services`,
    /// `workloads`, `routes` (per backend, with tries and retries) or `edges` (caller to
    /// callee, with identities); also `authz` (decisions by policy) and `endpoints`
    /// (what proxies learned of each endpoint).
    Stat {
        /// services, workloads, routes, edges, authz or endpoints.
        view: String,
        /// Only this Service (routes: this Service or route), or workload.
        name: Option<String>,
        /// Only this namespace (all by default).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// The window: the last 10s, 1m, 10m or 1h.
        #[arg(short = 'w', long, default_value = "1m", value_parser = ["10s", "1m", "10m", "1h"])]
        window: String,
        /// The window before the change at this store revision beside the window after
        /// it (`weft history` shows revisions): how a canary is judged.
        #[arg(long, value_name = "REVISION")]
        around_revision: Option<u64>,
        /// Also each slot of the window, oldest first (10 s slots for 1m, 1 min for 10m,
        /// 10 min for 1h): what the dashboard's charts draw.
        #[arg(long, conflicts_with = "around_revision")]
        series: bool,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: cli::Output,
        #[command(flatten)]
        server: cli::ServerArgs,
    },
    /// Live requests, one by one, streamed from the proxies through the control plane,
    /// with why the mesh did what it did: the route rule, the backend and endpoint chosen
    /// (with the balancer's latency estimate), each try and what followed it (retry and
    /// budget left, ejection), the authorization verdict and policy, the proxy's own
    /// error. Runs until stopped; a viewer token is enough.
    Tap {
        /// A Service (`NAME` or `NS/NAME`), or a workload (`workload/NAME`).
        target: String,
        #[command(flatten)]
        filter: TapFilterArgs,
        /// Show these request headers' values (repeat for several); none by default.
        #[arg(long = "header", value_name = "NAME")]
        headers: Vec<String>,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: cli::Output,
        #[command(flatten)]
        server: cli::ServerArgs,
    },
    /// A live table of a Service's requests by method and path (count, best, worst and
    /// last latency, success), built on tap and redrawn in place.
    Top {
        /// A Service (`NAME` or `NS/NAME`).
        service: String,
        #[command(flatten)]
        filter: TapFilterArgs,
        /// How often the table is redrawn.
        #[arg(long, default_value = "1s", value_name = "DURATION")]
        interval: GoDuration,
        #[command(flatten)]
        server: cli::ServerArgs,
    },
    /// The audit log: every change, who made it, and what it changed.
    History {
        /// Only changes to this kind (`services`, `httproutes`, ..., `OperatorToken`,
        /// `JoinToken`, `Revocation`, `CertificateAuthority`).
        kind: Option<String>,
        /// Only changes to this name.
        name: Option<String>,
        /// The newest this many entries.
        #[arg(long, default_value_t = 100, value_name = "N")]
        limit: usize,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: cli::Output,
        #[command(flatten)]
        server: cli::ServerArgs,
    },
    /// Undoes the change at a store revision (`weft history` shows them): every resource
    /// it touched goes back as it was before (one it created is deleted). Recorded in
    /// the audit log as a change of its own.
    Revert {
        /// The change's store revision.
        revision: u64,
        /// Validate and report without writing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        server: cli::ServerArgs,
    },
    /// Named contexts (server, token file), like kubeconfig's.
    #[command(subcommand)]
    Context(ContextCommand),
    /// The mesh's certificate authority: its roots, and rotating them.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Check a configuration file without running anything; prints every error.
    Validate {
        /// The YAML file of resources.
        file: PathBuf,
    },
    /// Run a small HTTP/1.1 + HTTP/2 demo server (for examples and benchmarks).
    DemoApp {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9080", value_name = "ADDR")]
        listen: SocketAddr,
        /// Name reported in every answer (and the `x-app` header).
        #[arg(long, default_value = "demo", value_name = "NAME")]
        name: String,
        /// Added latency per request.
        #[arg(long, default_value = "0s", value_name = "DURATION")]
        latency: GoDuration,
        /// Share of requests answered with 500, between 0 and 1.
        #[arg(long, default_value_t = 0.0, value_name = "RATE")]
        error_rate: f64,
        /// A service to call through the mesh for every request (repeatable).
        #[arg(long = "call", value_name = "SERVICE")]
        calls: Vec<String>,
        /// The sidecar outbound listener calls go to; defaults to $WEFT_OUTBOUND, which
        /// `weft proxy ... --` sets.
        #[arg(long, env = "WEFT_OUTBOUND", value_name = "ADDR")]
        outbound: Option<SocketAddr>,
        /// Or: the sidecar's --ports-file, read at the first call (for an app started
        /// before its sidecar).
        #[arg(long, value_name = "PATH", conflicts_with = "outbound")]
        outbound_from: Option<PathBuf>,
        /// Write the bound address as JSON to this file (useful with port 0).
        #[arg(long, value_name = "PATH")]
        ports_file: Option<PathBuf>,
    },
}

/// `weft token ...`.
#[derive(Subcommand)]
enum TokenCommand {
    /// Make a token; prints it alone on stdout (keep it like a password). With --service:
    /// a join token, which admits a proxy as that workload until it expires. With
    /// --role: an operator token for the API (viewer: reads; admin: everything).
    Create {
        /// A join token for the workload of this service; its identity is
        /// spiffe://DOMAIN/ns/NS/sa/ACCOUNT.
        #[arg(long, conflicts_with_all = ["role", "name"], required_unless_present = "role")]
        service: Option<String>,
        /// An operator token with this role.
        #[arg(long, value_parser = ["viewer", "admin"])]
        role: Option<String>,
        /// What to call an operator token (shown by `token list` and in the audit log).
        #[arg(long, requires = "role")]
        name: Option<String>,
        #[arg(short = 'n', long, default_value = weft_model::DEFAULT_NAMESPACE, value_name = "NS", conflicts_with = "role")]
        namespace: String,
        /// The service account of a join token; defaults to the service's name.
        #[arg(long, value_name = "ACCOUNT", conflicts_with = "role")]
        service_account: Option<String>,
        /// How long the token lasts: a join token 720h unless given, an operator token
        /// until revoked.
        #[arg(long, value_name = "DURATION")]
        ttl: Option<GoDuration>,
        #[command(flatten)]
        server: cli::ServerArgs,
    },
    /// List tokens of both kinds (never their secrets).
    List {
        #[command(flatten)]
        server: cli::ServerArgs,
    },
    /// Revoke a token by its id: a join token admits no proxy any more, an operator
    /// token no API call.
    Revoke {
        id: String,
        #[command(flatten)]
        server: cli::ServerArgs,
    },
}

/// `weft authz ...`.
#[derive(Subcommand)]
enum AuthzCommand {
    /// Which identity may call which Service: every Service against every identity the
    /// mesh knows, and a plaintext caller. `allow`: every request; `partial`: some, by
    /// method, path, port or header (-o json names the policies); `deny`: none.
    Matrix {
        /// Only this namespace's Services.
        #[arg(short, long)]
        namespace: Option<String>,
        /// Another identity to show (a SPIFFE ID), beside those of registered workloads;
        /// repeat for more.
        #[arg(long = "identity")]
        identities: Vec<String>,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: cli::Output,
        #[command(flatten)]
        server: cli::ServerArgs,
    },
}

/// `weft revoke ...`.
#[derive(Subcommand)]
enum RevokeCommand {
    /// Revoke every certificate of a SPIFFE identity, and refuse it new ones.
    Identity {
        /// spiffe://DOMAIN/ns/NS/sa/ACCOUNT
        spiffe_id: String,
        #[command(flatten)]
        server: cli::ServerArgs,
    },
    /// Revoke one certificate by its serial (as `weft describe workload` shows it).
    Certificate {
        serial: String,
        #[command(flatten)]
        server: cli::ServerArgs,
    },
    /// What is revoked.
    List {
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: cli::Output,
        #[command(flatten)]
        server: cli::ServerArgs,
    },
    /// Take a revocation back, by its id or what it revoked.
    Undo {
        what: String,
        #[command(flatten)]
        server: cli::ServerArgs,
    },
}

/// `weft context ...`.
#[derive(Subcommand)]
enum ContextCommand {
    /// List contexts; `*` marks the current one.
    List,
    /// Make NAME the current context.
    Use { name: String },
    /// Create or update a context (the first one becomes current).
    Set {
        name: String,
        /// The control plane's API, e.g. https://10.0.0.1:15080.
        #[arg(long, value_name = "URL")]
        server: String,
        /// The file holding the operator token.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// CA certificates (PEM) for an API certificate from your own PKI.
        #[arg(long, value_name = "FILE")]
        ca_file: Option<PathBuf>,
        /// Make it the current context.
        #[arg(long = "use")]
        make_current: bool,
    },
    /// Remove a context.
    Delete { name: String },
}

/// `weft ca ...`.
#[derive(Subcommand)]
enum CaCommand {
    /// Print the mesh's root certificates (PEM), for clients other than the CLI that
    /// verify the API: Prometheus's `tls_config.ca_file`, curl's `--cacert`.
    Bundle {
        #[command(flatten)]
        server: cli::ServerArgs,
    },
    /// Start a root rotation: a new root signs from now on; the old one stays trusted
    /// (and join tokens made for it still work) until the rotation is finished.
    Rotate {
        #[command(flatten)]
        server: cli::ServerArgs,
    },
    /// Finish a rotation: only the new root is trusted. Refused until one certificate
    /// lifetime has passed since the rotation (every proxy has renewed), unless --force.
    FinishRotation {
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        server: cli::ServerArgs,
    },
}

/// `weft control`: the control plane.
/// What `weft tap` and `weft top` narrow the requests to.
#[derive(Args)]
struct TapFilterArgs {
    /// The namespace of a target given without one.
    #[arg(short = 'n', long, default_value = weft_model::DEFAULT_NAMESPACE, value_name = "NS")]
    namespace: String,
    /// Only requests with this method.
    #[arg(long)]
    method: Option<String>,
    /// Only requests whose path starts with this.
    #[arg(long, value_name = "PREFIX")]
    path_prefix: Option<String>,
    /// Only responses with this status (`503`) or class (`5xx`).
    #[arg(long, value_name = "CODE|CLASS")]
    status: Option<String>,
    /// Only requests that matched this route (`NAME`, `NS/NAME`, optionally `#RULE`).
    #[arg(long)]
    route: Option<String>,
    /// Requests per second for the whole session at most, split among the proxies.
    #[arg(long, default_value_t = 100.0, value_name = "N")]
    max_rps: f64,
}

impl TapFilterArgs {
    fn query(self, target: String, headers: Vec<String>) -> tap::TapQuery {
        tap::TapQuery {
            target,
            namespace: self.namespace,
            method: self.method,
            path_prefix: self.path_prefix,
            status: self.status,
            route: self.route,
            max_rps: self.max_rps,
            headers,
        }
    }
}

#[derive(Args)]
struct ControlArgs {
    /// HTTP API address (JSON under /api/v1). Port 0 picks a free port.
    #[arg(long, default_value = weft_control::control::DEFAULT_API_ADDR, value_name = "ADDR")]
    api_addr: SocketAddr,
    /// Discovery and certificate signing (gRPC over TLS), where proxies connect
    /// (`weft proxy --control`). Every call is authenticated: a join token, then the
    /// proxy's certificate.
    #[arg(long, default_value = weft_control::control::DEFAULT_GRPC_ADDR, value_name = "ADDR")]
    grpc_addr: SocketAddr,
    /// How long a proxy's registered endpoint outlives its discovery stream (a proxy that
    /// stops cleanly is removed at once).
    #[arg(long, default_value = "15s", value_name = "DURATION")]
    lease: GoDuration,
    /// Where resources are kept: `embedded` (a file under --data-dir, one control plane)
    /// or `etcd://HOST:PORT[,HOST:PORT]` (an etcd cluster).
    #[arg(long, default_value = "embedded", value_name = "STORE")]
    store: weft_control::StoreSpec,
    /// TLS to etcd: the CA certificate (PEM) that signed etcd's server certificates.
    #[arg(long, value_name = "FILE")]
    etcd_ca: Option<PathBuf>,
    /// TLS to etcd: a client certificate (PEM), for an etcd started with
    /// --client-cert-auth; needs --etcd-key.
    #[arg(long, value_name = "FILE", requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    /// TLS to etcd: the client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// Directory of the embedded store (created if missing). Default:
    /// $XDG_DATA_HOME/weft or ~/.local/share/weft.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Write the bound addresses as JSON to this file (useful with port 0).
    #[arg(long, value_name = "PATH")]
    ports_file: Option<PathBuf>,
    /// The mesh's trust domain, in every workload identity
    /// (spiffe://DOMAIN/ns/NS/sa/ACCOUNT). Fixed when the CA is made, at first start.
    #[arg(long, default_value = weft_control::ca::DEFAULT_TRUST_DOMAIN, value_name = "DOMAIN", value_parser = parse_trust_domain)]
    trust_domain: weft_identity::TrustDomain,
    /// At first start, use this CA certificate (PEM: a root, or an intermediate followed
    /// by its chain up to the root) instead of making a root. Needs --ca-key.
    #[arg(long, value_name = "FILE", requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// The ECDSA P-256 key of --ca-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// 32 bytes (raw, or 64 hex digits) that encrypt the CA's key in the store. Required
    /// with an etcd store, the same file on every replica.
    #[arg(long, value_name = "FILE")]
    ca_encryption_key: Option<PathBuf>,
    /// How long the workload certificates this CA signs last; proxies renew at about 70%
    /// of it.
    #[arg(long, default_value = "24h", value_name = "DURATION")]
    cert_lifetime: GoDuration,
    /// A further DNS name or IP address for the API's certificate (repeatable), beyond
    /// --api-addr's: the names browsers and Prometheus reach the API by.
    #[arg(long = "api-san", value_name = "NAME|IP")]
    api_sans: Vec<String>,
    /// Serve the API with your own certificate chain (PEM) instead of one from the mesh
    /// CA, so browsers trust it through your PKI. Needs --api-key.
    #[arg(long, value_name = "FILE", requires = "api_key", conflicts_with = "api_http")]
    api_cert: Option<PathBuf>,
    /// The key of --api-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "api_cert")]
    api_key: Option<PathBuf>,
    /// Serve the API as plain HTTP; refused unless --api-addr is loopback.
    #[arg(long)]
    api_http: bool,
    /// The host other replicas reach this one at, when --api-addr or --grpc-addr binds
    /// every interface (default: this host's primary address).
    #[arg(long, value_name = "HOST")]
    advertise_host: Option<String>,
    /// How many audit log entries are kept.
    #[arg(long, default_value_t = weft_control::audit::DEFAULT_MAX_ENTRIES, value_name = "N")]
    audit_max_entries: usize,
    /// How long audit log entries are kept.
    #[arg(long, default_value = "2160h", value_name = "DURATION")]
    audit_max_age: GoDuration,
}

fn parse_trust_domain(text: &str) -> Result<weft_identity::TrustDomain, String> {
    weft_identity::TrustDomain::new(text).map_err(|e| e.to_string())
}

/// `weft proxy`: the data plane.
#[derive(Args)]
struct ProxyArgs {
    /// YAML file of resources (Service, Workload, HTTPRoute, GRPCRoute, TrafficPolicy).
    /// Re-read on SIGHUP and when it changes; a bad new file is refused and the old
    /// configuration keeps serving.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// The Service this proxy's application belongs to: labels its metrics, and its port
    /// declarations decide the inbound protocol (`tcp` ports skip detection).
    #[arg(long, value_name = "NAME")]
    service: Option<String>,
    /// Namespace of this proxy: short host names (`reviews`) resolve in it.
    #[arg(long, default_value = weft_model::DEFAULT_NAMESPACE, value_name = "NS")]
    namespace: String,
    /// Address of the local application; inbound traffic is forwarded there. Without it
    /// no inbound listener is started.
    #[arg(long, value_name = "ADDR")]
    app_addr: Option<SocketAddr>,
    /// Outbound listener: the application sends HTTP here with the Service as Host (or
    /// uses it as HTTP_PROXY). Port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:15001", value_name = "ADDR")]
    outbound_addr: SocketAddr,
    /// Inbound listener: other services' traffic for this instance. Port 0 picks one.
    #[arg(long, default_value = "0.0.0.0:15006", value_name = "ADDR")]
    inbound_addr: SocketAddr,
    /// Admin listener: /metrics, /ready, /live, /config. /config answers loopback only
    /// even when this is bound wider for Prometheus. Port 0 picks one.
    #[arg(long, default_value = "127.0.0.1:15000", value_name = "ADDR")]
    admin_addr: SocketAddr,
    /// Forward opaque TCP from a local port to a Service, e.g. `db=127.0.0.1:5433` or
    /// `db:5432=127.0.0.1:5433` to pick the Service port. Repeatable.
    #[arg(long = "upstream", value_name = "SERVICE[:PORT]=ADDR")]
    upstreams: Vec<UpstreamListener>,
    /// Write the bound addresses (ports resolved) as JSON to this file once listening.
    #[arg(long, value_name = "PATH")]
    ports_file: Option<PathBuf>,
    /// Worker threads, each with its own single-threaded runtime and SO_REUSEPORT
    /// sockets. One is right for a sidecar sharing cores with its application.
    #[arg(long, default_value_t = 1, value_name = "N")]
    workers: usize,
    /// Timeout for connecting to an endpoint.
    #[arg(long, default_value = "1s", value_name = "DURATION")]
    connect_timeout: GoDuration,
    /// How long idle pooled upstream connections are kept.
    #[arg(long, default_value = "15s", value_name = "DURATION")]
    idle_timeout: GoDuration,
    /// HTTP/2 keepalive PING interval (a peer silent for twice this is dropped).
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    h2_keepalive: GoDuration,
    /// How long inbound protocol detection waits for a client's first bytes before
    /// treating the connection as opaque TCP.
    #[arg(long, default_value = "1s", value_name = "DURATION")]
    detect_timeout: GoDuration,
    /// How long a client may take to send a request's head (line and headers), from
    /// connecting or from the end of its previous request: slow clients (slowloris) and
    /// idle keep-alive connections are closed after it.
    #[arg(long, default_value = "30s", value_name = "DURATION")]
    header_read_timeout: GoDuration,
    /// How long a meshed caller's TLS handshake may take on the inbound listener.
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    tls_handshake_timeout: GoDuration,
    /// On SIGTERM, how long in-flight requests may take to finish.
    #[arg(long, default_value = "30s", value_name = "DURATION")]
    drain_timeout: GoDuration,
    /// Request bodies up to this many bytes are buffered so that they can be retried.
    #[arg(long, default_value_t = weft_proxy::settings::DEFAULT_MAX_REPLAY_BODY, value_name = "BYTES")]
    max_replay_body: usize,
    /// With --control: how often the proxy reports its golden signals (requests,
    /// failures, latency sketches, TCP, authorization) to the control plane, for
    /// `weft stat`. `0` turns telemetry off: then nothing on the request path records it.
    #[arg(long, default_value = "5s", value_name = "DURATION", value_parser = parse_interval)]
    telemetry_interval: GoDuration,
    /// Take configuration from control planes (discovery gRPC `HOST:PORT`s,
    /// comma-separated, tried in turn) instead of --config. With --service and
    /// --app-addr, the proxy also registers its workload there.
    #[arg(long, value_name = "ADDR[,ADDR]", value_delimiter = ',', requires = "token_file")]
    control: Vec<String>,
    /// With --control: the join token (from `weft token create`) this proxy joins the
    /// mesh with. It is read once at start; keep the file readable by the proxy only.
    #[arg(long, env = "WEFT_JOIN_TOKEN_FILE", value_name = "PATH", requires = "control")]
    token_file: Option<PathBuf>,
    /// The service account of this proxy's identity: --service by default, else the one
    /// the token was made for.
    #[arg(long, value_name = "ACCOUNT")]
    service_account: Option<String>,
    /// This proxy's id in the mesh, also the name of its registered workload: a stable
    /// one (a pod or host name) lets a restarted proxy take its registration back.
    /// Default: SERVICE-RANDOM.
    #[arg(long, env = "WEFT_PROXY_ID", value_name = "ID", value_parser = parse_proxy_id)]
    id: Option<String>,
    /// Labels of the registered workload besides `app: SERVICE`, e.g. `version=v2,tier=web`.
    #[arg(long, value_name = "K=V[,K=V]", value_delimiter = ',', value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Failure domain of the registered workload.
    #[arg(long, value_name = "ZONE")]
    zone: Option<String>,
    /// Relative share of traffic of the registered workload (0 drains it).
    #[arg(long, default_value_t = 1, value_name = "N")]
    weight: u32,
    /// The address other proxies should dial for this workload; needed when the inbound
    /// listener is bound to a wildcard address (the default 0.0.0.0).
    #[arg(long, value_name = "IP:PORT")]
    advertise_addr: Option<SocketAddr>,
    /// Port and protocol of the Service port this workload serves, used when no Service
    /// resource declares them (callers address `SERVICE:PORT`).
    #[arg(long, default_value_t = 80, value_name = "PORT")]
    service_port: u16,
    #[arg(long, default_value = "http", value_parser = ["http", "http2", "grpc", "tcp"])]
    protocol: String,
    /// How the application's health is checked and reported: `tcp` (connect), `http:/PATH`
    /// (2xx/3xx), or `none`. Unhealthy instances get no traffic.
    #[arg(long, default_value = "tcp", value_name = "CHECK")]
    health_check: weft_proxy::health::HealthCheck,
    /// How often the health check runs.
    #[arg(long, default_value = "2s", value_name = "DURATION")]
    health_interval: GoDuration,
    /// Capture the application's traffic transparently (nftables in this network
    /// namespace; root or CAP_NET_ADMIN): its outbound TCP reaches the outbound listener,
    /// connections to its ports the inbound listener, its DNS the proxy's responder.
    /// `install` (the default) installs the rules at start and removes them on exit;
    /// `external` serves rules `weft capture install` put in place.
    #[arg(long, value_name = "MODE", num_args = 0..=1, default_missing_value = "install")]
    capture: Option<crate::capture::CaptureMode>,
    #[command(flatten)]
    capture_flags: crate::capture::CaptureFlags,
    /// Run the application (after `--`) as this user (NAME or UID[:GID]). Under capture
    /// the proxy's traffic is then told apart by uid instead of by socket mark.
    #[arg(long, value_name = "USER", value_parser = crate::capture::parse_app_user)]
    app_user: Option<(u32, u32)>,
    /// The application to run beside the proxy, after `--`: started once the proxy is
    /// ready, stopped first on SIGTERM (the outbound listener serves until it has exited);
    /// the proxy exits with its exit code.
    #[arg(last = true, value_name = "APP")]
    app: Vec<String>,
}

/// A duration, or a bare `0` for "off".
fn parse_interval(text: &str) -> Result<GoDuration, String> {
    if text == "0" {
        return Ok(GoDuration::default());
    }
    text.parse()
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("{text:?} is not a label; write KEY=VALUE")),
    }
}

impl ProxyArgs {
    fn into_settings(self) -> anyhow::Result<ProxySettings> {
        let mut settings = ProxySettings::new(self.config);
        settings.service = self.service;
        settings.namespace = self.namespace;
        settings.app_addr = self.app_addr;
        settings.outbound_addr = self.outbound_addr;
        settings.inbound_addr = self.inbound_addr;
        settings.admin_addr = self.admin_addr;
        settings.upstreams = self.upstreams;
        settings.ports_file = self.ports_file;
        settings.workers = self.workers;
        settings.connect_timeout = self.connect_timeout.get();
        settings.idle_timeout = self.idle_timeout.get();
        settings.h2_keepalive = self.h2_keepalive.get();
        settings.detect_timeout = self.detect_timeout.get();
        settings.header_read_timeout = self.header_read_timeout.get();
        settings.tls_handshake_timeout = self.tls_handshake_timeout.get();
        for (flag, value) in [
            ("--header-read-timeout", settings.header_read_timeout),
            ("--tls-handshake-timeout", settings.tls_handshake_timeout),
        ] {
            if value.is_zero() {
                anyhow::bail!("{flag} must be above 0 (it bounds what a slow or stalled client holds)");
            }
        }
        settings.drain_timeout = self.drain_timeout.get();
        settings.max_replay_body = self.max_replay_body;
        settings.telemetry_interval = self.telemetry_interval.get();
        settings.health_check = self.health_check;
        settings.health_interval = self.health_interval.get();
        settings.app_command = self.app;
        settings.app_user = self.app_user;
        if self.app_user.is_some() && settings.app_command.is_empty() {
            anyhow::bail!("--app-user names who runs the application after `--`; give the command after `--`");
        }
        if let Some(mode) = self.capture {
            settings.capture = Some(self.capture_flags.settings(mode, self.app_user)?);
        }
        if !self.control.is_empty() {
            let registration = match (&settings.service, settings.app_addr) {
                (Some(service), Some(_)) => Some(weft_proxy::discovery::Registration {
                    service: service.clone(),
                    labels: self.labels.into_iter().collect(),
                    address: self.advertise_addr.unwrap_or(settings.inbound_addr),
                    zone: self.zone,
                    weight: self.weight,
                    protocol: self.protocol,
                    service_port: self.service_port,
                }),
                _ => None,
            };
            let prefix = settings.service.clone().unwrap_or_else(|| "proxy".into());
            let path = self.token_file.expect("clap requires --token-file with --control");
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read the join token file {} (--token-file)", path.display()))?;
            let token = weft_proxy::identity::JoinTokenSecret::new(&text, &format!("--token-file {}", path.display()))
                .map_err(anyhow::Error::msg)?;
            settings.control = Some(weft_proxy::discovery::ControlSettings {
                addresses: self.control,
                proxy_id: self.id.unwrap_or_else(|| format!("{prefix}-{:08x}", rand::random::<u32>())),
                registration,
                identity: weft_proxy::identity::IdentitySettings {
                    token,
                    namespace: settings.namespace.clone(),
                    // An identity's service account is its service's name unless given.
                    service_account: self.service_account.or_else(|| settings.service.clone()),
                },
            });
        }
        Ok(settings)
    }
}

/// Proxy ids name Workloads, so they follow the same rule as resource names.
fn parse_proxy_id(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let valid = !text.is_empty()
        && text.len() <= 253
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-' || *b == b'.')
        && bytes[0].is_ascii_alphanumeric()
        && bytes[text.len() - 1].is_ascii_alphanumeric();
    if valid {
        Ok(text.to_string())
    } else {
        Err("use lowercase letters, digits, '-' and '.', starting and ending with a letter or digit".into())
    }
}

fn init_logging(filter: Option<&str>, json: bool) {
    let filter = match filter {
        Some(filter) => tracing_subscriber::EnvFilter::new(filter),
        None => tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// A control plane rebuilds its views in bursts (an apply, a wave of registrations) and
/// then idles: jemalloc's default of keeping freed pages for 10 s before returning them
/// let the bursts pile up in RSS (bench/control-scale: peak 277-301 MB). One second is
/// plenty for a process whose hot path is not the allocator. The proxies keep the
/// default, where reusing pages across requests is what matters.
fn return_memory_promptly() {
    use tikv_jemalloc_ctl::{Access, AsName};
    const DECAY_MS: isize = 1000;
    // `arenas.*` sets it for arenas made later, `arena.4096.*` (all arenas) for those
    // that exist already.
    for name in [&b"arenas.dirty_decay_ms\0"[..], &b"arena.4096.dirty_decay_ms\0"[..]] {
        if let Err(error) = name.name().write(DECAY_MS) {
            tracing::debug!(%error, "cannot shorten jemalloc's decay time");
        }
    }
}

/// Raises the soft limit on open files to the hard limit. Every connection is a file: at
/// the usual soft default of 1024, a peer holding a thousand idle connections would stop
/// the proxy from accepting anyone else (Go's runtime does the same at start).
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open file limit"),
        Err(error) => tracing::warn!(%error, "cannot raise the open file limit; connections beyond it are refused"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log.as_deref(), cli.log_format == "json");
    // jemalloc returns freed pages only during allocator calls unless its background
    // thread runs: without it, memory from a burst stays resident while the proxy idles.
    if let Err(error) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::debug!(%error, "jemalloc background purging is unavailable");
    }
    raise_open_file_limit();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one operator command on a small runtime of its own.
fn block_on<F: std::future::Future<Output = anyhow::Result<()>>>(future: F) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(future)
}

/// Completes on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGTERM; stop with Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Proxy(args) => match weft_proxy::run(args.into_settings()?).context("weft proxy")? {
            // The application's exit code becomes ours, so that batch jobs report truly.
            Some(code) if code != 0 => std::process::exit(code),
            _ => Ok(()),
        },
        Command::Capture(command) => crate::capture::run(command),
        Command::Control(args) => {
            return_memory_promptly();
            let settings = weft_control::ControlSettings {
                api_addr: args.api_addr,
                grpc_addr: args.grpc_addr,
                store: args.store,
                etcd_tls: weft_control::EtcdTls { ca: args.etcd_ca, cert: args.etcd_cert, key: args.etcd_key },
                lease: args.lease.get(),
                data_dir: args.data_dir.unwrap_or_else(weft_control::default_data_dir),
                ports_file: args.ports_file,
                ca: weft_control::CaSettings {
                    trust_domain: args.trust_domain,
                    cert: args.ca_cert,
                    key: args.ca_key,
                    encryption_key: args.ca_encryption_key,
                },
                cert_lifetime: args.cert_lifetime.get(),
                api_tls: match (args.api_http, args.api_cert, args.api_key) {
                    (true, _, _) => weft_control::api_tls::ApiTlsSettings::Plaintext,
                    (false, Some(cert), Some(key)) => weft_control::api_tls::ApiTlsSettings::Operator { cert, key },
                    _ => weft_control::api_tls::ApiTlsSettings::Mesh { extra_names: args.api_sans },
                },
                advertise_host: args.advertise_host,
                audit_max_entries: args.audit_max_entries,
                audit_max_age: args.audit_max_age.get(),
            };
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(weft_control::run(settings, shutdown_signal())).context("weft control")
        }
        Command::Demo { api_addr, entry_addr, rate, ports_file } => {
            let options = demo::DemoOptions { api_addr, entry_addr, rate, ports_file };
            tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(demo::run(options))
        }
        Command::Apply { files, dry_run, server } => {
            block_on(async { cli::apply(&cli::ApiClient::new(&server)?, &files, dry_run).await })
        }
        Command::Get { kind, name, namespace, output, server } => block_on(async {
            cli::get(&cli::ApiClient::new(&server)?, &kind, name.as_deref(), namespace.as_deref(), output).await
        }),
        Command::Delete { target, files, namespace, dry_run, server } => {
            block_on(async { cli::delete(&cli::ApiClient::new(&server)?, &target, &files, &namespace, dry_run).await })
        }
        Command::Describe { kind, name, namespace, output, server } => {
            block_on(async { cli::describe(&cli::ApiClient::new(&server)?, &kind, &name, &namespace, output).await })
        }
        Command::Token(TokenCommand::Create { service, role, name, namespace, service_account, ttl, server }) => {
            let what = match (service, role) {
                (Some(service), _) => operations::NewToken::Join { service, namespace, service_account },
                (None, Some(role)) => operations::NewToken::Operator { role, name },
                (None, None) => anyhow::bail!("give --service (a join token) or --role (an operator token)"),
            };
            block_on(operations::create_token(&server, what, ttl.map(|t| t.to_string())))
        }
        Command::Token(TokenCommand::List { server }) => block_on(operations::list_tokens(&server)),
        Command::Token(TokenCommand::Revoke { id, server }) => block_on(operations::revoke_token(&server, &id)),
        Command::Revoke(RevokeCommand::Identity { spiffe_id, server }) => {
            block_on(operations::revoke(&server, "identity", &spiffe_id))
        }
        Command::Revoke(RevokeCommand::Certificate { serial, server }) => {
            block_on(operations::revoke(&server, "certificate", &serial))
        }
        Command::Revoke(RevokeCommand::List { output, server }) => {
            block_on(operations::list_revocations(&server, output))
        }
        Command::Revoke(RevokeCommand::Undo { what, server }) => block_on(operations::undo_revocation(&server, &what)),
        Command::Authz(AuthzCommand::Matrix { namespace, identities, output, server }) => {
            block_on(operations::authz_matrix(&server, namespace.as_deref(), &identities, output))
        }
        Command::Stat { view, name, namespace, window, around_revision, series, output, server } => block_on(async {
            let request = stat::StatRequest {
                view: &view,
                name: name.as_deref(),
                namespace: namespace.as_deref(),
                window: &window,
                around_revision,
                series,
                output,
            };
            stat::stat(&cli::ApiClient::new(&server)?, request).await
        }),
        Command::Tap { target, filter, headers, output, server } => {
            block_on(async { tap::tap(&cli::ApiClient::new(&server)?, &filter.query(target, headers), output).await })
        }
        Command::Top { service, filter, interval, server } => block_on(async {
            tap::top(&cli::ApiClient::new(&server)?, &filter.query(service, Vec::new()), interval.0).await
        }),
        Command::History { kind, name, limit, output, server } => {
            block_on(operations::history(&server, kind.as_deref(), name.as_deref(), limit, output))
        }
        Command::Revert { revision, dry_run, server } => block_on(async {
            let body = serde_json::json!({"revision": revision, "dryRun": dry_run});
            let report = cli::ApiClient::new(&server)?.call(http::Method::POST, "/api/v1/revert", Some(body)).await?;
            cli::print_report(&report);
            Ok(())
        }),
        Command::Context(ContextCommand::List) => context::list(),
        Command::Context(ContextCommand::Use { name }) => context::use_context(&name),
        Command::Context(ContextCommand::Set { name, server, token_file, ca_file, make_current }) => {
            context::set(context::Context { name, server, token_file, ca_file }, make_current)
        }
        Command::Context(ContextCommand::Delete { name }) => context::delete(&name),
        Command::Ca(CaCommand::Bundle { server }) => block_on(async {
            let answer = cli::ApiClient::new(&server)?.call(http::Method::GET, "/api/v1/ca/bundle", None).await?;
            print!("{}", answer["bundle"].as_str().unwrap_or_default());
            Ok(())
        }),
        Command::Ca(CaCommand::Rotate { server }) => {
            block_on(async { operations::ca(&cli::ApiClient::new(&server)?, None).await })
        }
        Command::Ca(CaCommand::FinishRotation { force, server }) => {
            block_on(async { operations::ca(&cli::ApiClient::new(&server)?, Some(force)).await })
        }
        Command::Check { server } => block_on(async { cli::check(&cli::ApiClient::new(&server)?).await }),
        Command::Validate { file } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let resources = weft_model::parse_documents(&file.display().to_string(), &text)?;
            let snapshot = weft_model::compile(&resources, weft_model::DEFAULT_NAMESPACE);
            eprintln!("{}: {} resources valid", file.display(), resources.len());
            for unresolved in &snapshot.unresolved {
                eprintln!("warning: unresolved: {unresolved}");
            }
            Ok(())
        }
        Command::DemoApp { listen, name, latency, error_rate, calls, outbound, outbound_from, ports_file } => {
            if !(0.0..=1.0).contains(&error_rate) {
                anyhow::bail!("--error-rate must be between 0 and 1, got {error_rate}");
            }
            let app = demo_app::DemoApp {
                name,
                latency: latency.get(),
                error_rate,
                calls,
                outbound,
                outbound_file: outbound_from,
                ports_file,
            };
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(app.serve(listen))
        }
    }
}
