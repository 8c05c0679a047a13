#!/usr/bin/env python3
"""weft data-path benchmark: weft against HAProxy and Envoy, as ratios in one run.

Setups (each proxy with one worker thread), all on loopback with an nginx upstream
serving a 1 KiB body:
  direct          client -> nginx
  <proxy>-hop     client -> proxy -> nginx
  <proxy>-pair    client -> proxy (outbound) -> proxy (inbound) -> nginx
for proxy in weft, haproxy, envoy.

Loads, interleaved round-robin over the setups for every round (the first round is a
warm-up and dropped; median, min and max of the rest are reported):
  wrk  -t1 -c32            saturation: requests/s, and proxy CPU seconds per 1k requests
  oha  -q 2000 (corrected) added p50/p99 latency over direct at a fixed 2,000 requests/s
  h2load -c32 -m10 (h2c)   HTTP/2 requests/s (haproxy on a second `proto h2` frontend)
Plus each proxy's peak RSS (VmHWM).

With --mtls, the mutual-TLS suite instead: weft-pair (plaintext, the baseline),
weft-mtls-pair (a real control plane, join tokens, mutual TLS between the proxies, telemetry
reported every 5 s), weft-mtls-pair-quiet (the same with --telemetry-interval 0),
haproxy-tls-pair and envoy-tls-pair (TLS 1.3 with client certificates between the two
proxies, made by openssl), on the same loads; plus the new-connection rate through each
pair in TCP mode (wrk with `Connection: close`: every request is a new client
connection, hence a new TLS handshake between the proxies).

With --tracing, the tracing suite: weft-pair (plaintext) and weft-mtls-pair against the
same mutual-TLS pair with MeshConfig tracing on at 0%, 1% and 100% sampling
(weft-mtls-pair-trace-N), exporting over OTLP/HTTP to a receiver in this process, and
with access logs on (weft-mtls-pair-log: every request logged by both proxies to a file).

With --pgo, the profile-guided build of bench/pgo.py (target/pgo/release/weft) runs beside
the plain release build, as weft-pgo-hop and weft-pgo-pair; with --bolt, BOLT's layout of
it (bench/pgo.py --bolt, target/pgo/release/weft-bolt) as weft-bolt-hop and weft-bolt-pair.

Usage: bench/bench.py [--mtls | --tracing] [--pgo] [--bolt] [--rounds 6] [--duration 5] [--out bench/results/latest.md]
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from weft_mesh import OtlpSink, free_port, mtls_pair, wait_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEFT = os.path.join(ROOT, "target", "release", "weft")
# The profile-guided build bench/pgo.py makes, and BOLT's layout of it (pgo.py --bolt).
WEFT_PGO = os.path.join(ROOT, "target", "pgo", "release", "weft")
WEFT_BOLT = os.path.join(ROOT, "target", "pgo", "release", "weft-bolt")
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Worker threads of every proxy: weft --workers, HAProxy nbthread, Envoy --concurrency
# (--workers sets it; one unless said).
WORKERS = 1


def cpu_times(pid):
    """A process's (user, system) CPU seconds so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid):
    return sum(cpu_times(pid))


def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Stack:
    """A set of processes for one setup; `port` is where clients connect."""

    def __init__(self, name, tmp):
        self.name, self.tmp, self.procs, self.proxy_pids = name, tmp, [], []
        self.port, self.host = None, "127.0.0.1"
        self.h2_port = None  # where h2c clients connect, when not `port`

    def spawn(self, args, proxy=True, **kw):
        log = open(os.path.join(self.tmp, f"{self.name}-{len(self.procs)}.log"), "w")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, **kw)
        self.procs.append(proc)
        if proxy:
            self.proxy_pids.append(proc.pid)
        return proc

    def cpu(self):
        return sum(cpu_seconds(p) for p in self.proxy_pids)

    def user_cpu(self):
        return sum(cpu_times(p)[0] for p in self.proxy_pids)

    def rss(self):
        return [peak_rss_mb(p) for p in self.proxy_pids]

    def reset_peak_rss(self):
        # Writing 5 to clear_refs resets VmHWM (Linux), so each load's peak is its own.
        for p in self.proxy_pids:
            with open(f"/proc/{p}/clear_refs", "w") as f:
                f.write("5")

    def stop(self):
        for p in self.procs:
            p.send_signal(signal.SIGKILL)
        for p in self.procs:
            p.wait()


def nginx_config(tmp, name, port):
    """nginx serving a 1 KiB body on 127.0.0.1:`port`, its files named `name` in `tmp`."""
    return f"""
worker_processes 1;
daemon off;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{port};
    default_type text/plain;
    location / {{ return 200 "{"x" * 1024}"; }}
  }}
}}
"""


def start_nginx(tmp):
    port = free_port()
    conf = os.path.join(tmp, "nginx.conf")
    with open(conf, "w") as f:
        f.write(nginx_config(tmp, "nginx", port))
    # Its own process group, so that stopping it also stops its worker.
    proc = subprocess.Popen(["nginx", "-c", conf, "-p", tmp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    wait_port(port)
    return proc, port


def stop_nginx(nginx):
    """Stops what start_nginx started: its master and workers, a process group."""
    os.killpg(nginx.pid, signal.SIGKILL)
    nginx.wait()


def weft_stack(tmp, name, upstream, pair, binary=None, protocol="http"):
    """weft as a hop or a pair; `binary` another build of it (the PGO one), else WEFT;
    `protocol` the Service's (http, http2 or grpc)."""
    binary = binary or WEFT
    stack = Stack(name, tmp)
    admin_ports = []
    target = upstream
    if pair:
        inbound, admin = free_port(), free_port()
        cfg = os.path.join(tmp, f"{name}-in.yaml")
        with open(cfg, "w") as f:
            f.write(mesh_yaml(upstream, protocol=protocol))
        stack.spawn([binary, "proxy", "--config", cfg, "--service", "upstream", "--app-addr", f"127.0.0.1:{upstream}",
                     "--inbound-addr", f"127.0.0.1:{inbound}", "--outbound-addr", "127.0.0.1:0",
                     "--admin-addr", f"127.0.0.1:{admin}", "--log", "warn", "--workers", str(WORKERS)])
        admin_ports.append(admin)
        target = inbound
    outbound, admin = free_port(), free_port()
    cfg = os.path.join(tmp, f"{name}-out.yaml")
    with open(cfg, "w") as f:
        f.write(mesh_yaml(target, protocol=protocol))
    stack.spawn([binary, "proxy", "--config", cfg, "--outbound-addr", f"127.0.0.1:{outbound}",
                 "--admin-addr", f"127.0.0.1:{admin}", "--log", "warn", "--workers", str(WORKERS)])
    admin_ports.append(admin)
    for a in admin_ports:
        wait_port(a)
    wait_port(outbound)
    stack.port, stack.host = outbound, "upstream"
    return stack


def mesh_yaml(port, host="127.0.0.1", protocol="http"):
    """The Service `upstream` with one Workload at `host`:`port`."""
    return f"""apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {{name: upstream}}
spec: {{selector: {{app: upstream}}, ports: [{{port: 80, protocol: {protocol}}}]}}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {{name: upstream-1}}
spec: {{labels: {{app: upstream}}, address: "{host}:{port}"}}
"""


def haproxy_config(listen, target, extra_frontends=""):
    """One HAProxy hop with the settings every benchmark uses: WORKERS threads, HTTP
    keep-alive on both sides, connections to `target` reused across clients."""
    return f"""global
  nbthread {WORKERS}
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
frontend f
  bind {listen}
  default_backend b
{extra_frontends}backend b
  http-reuse always
  server s1 {target}
"""


def haproxy_stack(tmp, name, upstream, pair):
    stack = Stack(name, tmp)
    target = upstream
    hops = 2 if pair else 1
    for hop in range(hops):
        port = free_port()
        # HAProxy serves h2c only on a frontend declared `proto h2`: the client-facing
        # hop gets a second one for h2load.
        h2_frontend = ""
        if hop == hops - 1:
            stack.h2_port = free_port()
            h2_frontend = f"frontend f2\n  bind 127.0.0.1:{stack.h2_port} proto h2\n  default_backend b\n"
        cfg = os.path.join(tmp, f"{name}-{hop}.cfg")
        with open(cfg, "w") as f:
            f.write(haproxy_config(f"127.0.0.1:{port}", f"127.0.0.1:{target}", h2_frontend))
        stack.spawn(["haproxy", "-f", cfg, "-db"])
        wait_port(port, what=name, log_dir=tmp)
        target = port
    stack.port = target
    return stack


# Envoy's HTTP proxying filter, routing everything to the cluster `upstream`.
ENVOY_HTTP_FILTER = """- name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{match: {prefix: "/"}, route: {cluster: upstream}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}"""


def envoy_stack(tmp, name, upstream, pair):
    stack = Stack(name, tmp)
    target = upstream
    for hop in range(2 if pair else 1):
        port, admin = free_port(), free_port()
        cfg = os.path.join(tmp, f"{name}-{hop}.yaml")
        with open(cfg, "w") as f:
            f.write(f"""
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
static_resources:
  listeners:
  - address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      {ENVOY_HTTP_FILTER}
  clusters:
  - name: upstream
    type: STATIC
    load_assignment:
      cluster_name: upstream
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {target}}}}}}}}}]}}]
""")
        stack.spawn(["envoy", "-c", cfg, "--concurrency", str(WORKERS), "--log-level", "warn", "--base-id", str(free_port())])
        wait_port(port, timeout=30, what=name, log_dir=tmp)
        target = port
    stack.port = target
    return stack


def make_certs(tmp):
    """A CA, and a server and a client certificate it signs (ECDSA P-256), for the peers."""
    d = os.path.join(tmp, "pki")
    os.makedirs(d, exist_ok=True)

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
        "-subj", "/CN=bench-ca", "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.crt")
    for role in ["server", "client"]:
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN={role}",
            "-keyout", f"{d}/{role}.key", "-out", f"{d}/{role}.csr")
        ext = f"{d}/{role}.ext"
        with open(ext, "w") as f:
            f.write(f"subjectAltName=DNS:{role},IP:127.0.0.1\nextendedKeyUsage={'serverAuth' if role == 'server' else 'clientAuth'}\n")
        run("x509", "-req", "-in", f"{d}/{role}.csr", "-CA", f"{d}/ca.crt", "-CAkey", f"{d}/ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", ext, "-out", f"{d}/{role}.crt")
        with open(f"{d}/{role}.pem", "w") as f:
            f.write(open(f"{d}/{role}.crt").read() + open(f"{d}/{role}.key").read())
    return d


def weft_mtls_stack(tmp, name, upstream, tcp=False, telemetry=True, sink=None, sampling=None, access_log=False,
                    binary=None):
    """A control plane, an inbound proxy registered for nginx and an outbound proxy, each
    joined with its own token: every hop between them is mutual TLS. The proxies report
    telemetry every 5 s (the default), or, with telemetry=False, not at all. With a
    sampling rate, MeshConfig turns tracing on, exporting to `sink`; with access_log,
    MeshConfig has both proxies log every request to a file."""
    stack = Stack(name, tmp)
    extra = ("--workers", str(WORKERS)) + (() if telemetry else ("--telemetry-interval", "0"))
    resources = sink.mesh_config(sampling) if sampling is not None else None
    if access_log:
        log = os.path.join(tmp, f"{name}-access.log")
        resources = ("apiVersion: weft.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec:\n"
                     f"  accessLog: {{path: \"{log}\"}}\n")
    port = mtls_pair(binary or WEFT, tmp, name, upstream, lambda args: stack.spawn(args, proxy=False), stack.spawn, tcp=tcp,
                     proxy_args=extra, resources=resources)
    stack.port, stack.host = (port, "127.0.0.1") if tcp else (port, "upstream")
    return stack


def haproxy_tls_stack(tmp, name, upstream, pki, tcp=False):
    """Two HAProxies with TLS 1.3 and client certificates between them."""
    stack = Stack(name, tmp)
    mode = "tcp" if tcp else "http"
    inner, outer = free_port(), free_port()
    tls = "ssl-min-ver TLSv1.3 ca-file {pki}/ca.crt verify required".format(pki=pki)
    configs = [
        (inner, f"frontend f\n  bind 127.0.0.1:{inner} ssl crt {pki}/server.pem {tls}\n  default_backend b\n"
                f"backend b\n  server s1 127.0.0.1:{upstream}\n"),
        (outer, f"frontend f\n  bind 127.0.0.1:{outer}\n  default_backend b\n"
                f"backend b\n{'' if tcp else '  http-reuse always' + chr(10)}  server s1 127.0.0.1:{inner} ssl crt {pki}/client.pem {tls}\n"),
    ]
    for i, (port, body) in enumerate(configs):
        cfg = os.path.join(tmp, f"{name}-{i}.cfg")
        with open(cfg, "w") as f:
            f.write(f"global\n  nbthread {WORKERS}\n  maxconn 4096\ndefaults\n  mode {mode}\n  timeout connect 5s\n"
                    f"  timeout client 30s\n  timeout server 30s\n{'' if tcp else '  option http-keep-alive' + chr(10)}{body}")
        stack.spawn(["haproxy", "-f", cfg, "-db"])
        wait_port(port, what=name, log_dir=tmp)
    stack.port = outer
    return stack


def envoy_tls_stack(tmp, name, upstream, pki, tcp=False):
    """Two Envoys with TLS 1.3 and client certificates between them."""
    stack = Stack(name, tmp)
    params = "tls_params: {tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3}"

    def context(kind, role, extra=""):
        return (f'{{name: envoy.transport_sockets.tls, typed_config: {{"@type": '
                f'type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.{kind}, {extra}common_tls_context: {{'
                f'{params}, tls_certificates: [{{certificate_chain: {{filename: {pki}/{role}.crt}}, '
                f'private_key: {{filename: {pki}/{role}.key}}}}], validation_context: {{trusted_ca: {{filename: {pki}/ca.crt}}}}}}}}}}')

    def listener(port, downstream_tls):
        if tcp:
            chain = ('- name: envoy.filters.network.tcp_proxy\n        typed_config: {"@type": '
                     'type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: bench, cluster: upstream}')
        else:
            chain = ENVOY_HTTP_FILTER
        socket = f"\n      transport_socket: {context('DownstreamTlsContext', 'server', 'require_client_certificate: true, ')}" if downstream_tls else ""
        return f"""  - address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      {chain}{socket}
"""

    inner, outer = free_port(), free_port()
    for i, (port, target, downstream_tls, upstream_tls) in enumerate(
            [(inner, upstream, True, False), (outer, inner, False, True)]):
        admin = free_port()
        cluster_tls = f"\n    transport_socket: {context('UpstreamTlsContext', 'client')}" if upstream_tls else ""
        cfg = os.path.join(tmp, f"{name}-{i}.yaml")
        with open(cfg, "w") as f:
            f.write(f"""admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
static_resources:
  listeners:
{listener(port, downstream_tls)}  clusters:
  - name: upstream
    type: STATIC{cluster_tls}
    load_assignment:
      cluster_name: upstream
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {target}}}}}}}}}]}}]
""")
        stack.spawn(["envoy", "-c", cfg, "--concurrency", str(WORKERS), "--log-level", "warn", "--base-id", str(free_port())])
        wait_port(port, timeout=30, what=name, log_dir=tmp)
    stack.port = outer
    return stack


def run_handshakes(stack, duration):
    """New connections per second through a TCP-mode pair: each request on its own
    client connection, so each one is a new TLS handshake between the proxies."""
    cpu0 = stack.cpu()
    out = subprocess.run(["wrk", "-t1", "-c16", f"-d{duration}s", "-H", "Connection: close",
                          f"http://127.0.0.1:{stack.port}/"], capture_output=True, text=True).stdout
    cpu = stack.cpu() - cpu0
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    if requests == 0 or re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        raise SystemExit(f"wrk (new connections) against {stack.name} saw errors:\n{out}")
    return {"conn_per_s": requests / duration, "cpu_per_1k_conn": cpu / requests * 1000}


def direct_stack(tmp, upstream):
    stack = Stack("direct", tmp)
    stack.port = upstream
    return stack


def run_wrk(stack, duration):
    cpu0, user0 = stack.cpu(), stack.user_cpu()
    out = subprocess.run(["wrk", "-t1", "-c32", f"-d{duration}s", "-H", f"Host: {stack.host}",
                          f"http://127.0.0.1:{stack.port}/"], capture_output=True, text=True).stdout
    cpu, user = stack.cpu() - cpu0, stack.user_cpu() - user0
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors or requests == 0:
        raise SystemExit(f"wrk against {stack.name} saw errors:\n{out}")
    sample = {"rps": requests / duration, "cpu_per_1k": cpu / requests * 1000 if stack.proxy_pids else 0.0}
    if stack.proxy_pids and cpu > 0:
        sample["user_share"] = user / cpu
    return sample


def run_oha(stack, duration):
    out = subprocess.run(["oha", "-z", f"{duration}s", "-q", "2000", "--latency-correction", "--no-tui",
                          "--output-format", "json", "-c", "32", "-H", f"Host: {stack.host}",
                          f"http://127.0.0.1:{stack.port}/"], capture_output=True, text=True)
    data = json.loads(out.stdout)
    pct = data["latencyPercentiles"]
    return {"p50_ms": pct["p50"] * 1000, "p99_ms": pct["p99"] * 1000}


def run_h2load(stack, duration):
    out = subprocess.run(["h2load", "-c32", "-m10", "-t1", "-D", str(duration), "-H", f":authority: {stack.host}",
                          f"http://127.0.0.1:{stack.h2_port or stack.port}/"], capture_output=True, text=True).stdout
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    ok = re.search(r"status codes: (\d+) 2xx", out)
    if not m or not ok or int(ok.group(1)) == 0:
        return {"h2_rps": float("nan")}
    return {"h2_rps": float(m.group(1))}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6, help="rounds, the first dropped as warm-up (default 6)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per load per setup (default 5)")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "latest.md"))
    parser.add_argument("--only", default="", help="comma-separated setup names to run (default: all)")
    parser.add_argument("--mtls", action="store_true", help="the mutual-TLS suite (writes bench/results/mtls.md)")
    parser.add_argument("--tracing", action="store_true", help="the tracing suite (writes bench/results/tracing.md)")
    parser.add_argument("--pgo", action="store_true",
                        help="also the profile-guided build (bench/pgo.py) as weft-pgo-hop and weft-pgo-pair")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker threads of every proxy (default 1; writes bench/results/workers-N.md)")
    parser.add_argument("--bolt", action="store_true",
                        help="also BOLT's layout of it (bench/pgo.py --bolt) as weft-bolt-hop and weft-bolt-pair")
    args = parser.parse_args()
    if args.mtls and args.out.endswith("latest.md"):
        args.out = os.path.join(ROOT, "bench", "results", "mtls.md")
    if args.tracing and args.out.endswith("latest.md"):
        args.out = os.path.join(ROOT, "bench", "results", "tracing.md")
    if args.workers != 1 and args.out.endswith("latest.md"):
        args.out = os.path.join(ROOT, "bench", "results", f"workers-{args.workers}.md")
    global WORKERS
    WORKERS = args.workers
    for tool in ["nginx", "wrk", "h2load", "oha", "haproxy", "envoy"]:
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed; see bench/README.md for the one-time setup")
    if not os.path.exists(WEFT):
        raise SystemExit("build weft first: cargo build --release")
    if args.pgo and not os.path.exists(WEFT_PGO):
        raise SystemExit("build the profile-guided weft first: bench/pgo.py")
    if args.bolt and not os.path.exists(WEFT_BOLT):
        raise SystemExit("build BOLT's layout of weft first: bench/pgo.py --bolt")

    tmp = tempfile.mkdtemp(prefix="weft-bench-")
    nginx, upstream = start_nginx(tmp)
    setups = {
        "direct": lambda: direct_stack(tmp, upstream),
        "weft-hop": lambda: weft_stack(tmp, "weft-hop", upstream, False),
        "weft-pair": lambda: weft_stack(tmp, "weft-pair", upstream, True),
        **({
            "weft-pgo-hop": lambda: weft_stack(tmp, "weft-pgo-hop", upstream, False, WEFT_PGO),
            "weft-pgo-pair": lambda: weft_stack(tmp, "weft-pgo-pair", upstream, True, WEFT_PGO),
        } if args.pgo else {}),
        **({
            "weft-bolt-hop": lambda: weft_stack(tmp, "weft-bolt-hop", upstream, False, WEFT_BOLT),
            "weft-bolt-pair": lambda: weft_stack(tmp, "weft-bolt-pair", upstream, True, WEFT_BOLT),
        } if args.bolt else {}),
        "haproxy-hop": lambda: haproxy_stack(tmp, "haproxy-hop", upstream, False),
        "haproxy-pair": lambda: haproxy_stack(tmp, "haproxy-pair", upstream, True),
        "envoy-hop": lambda: envoy_stack(tmp, "envoy-hop", upstream, False),
        "envoy-pair": lambda: envoy_stack(tmp, "envoy-pair", upstream, True),
    }
    handshake_setups = {}
    if args.mtls:
        pki = make_certs(tmp)
        setups = {
            "direct": setups["direct"],
            "weft-pair": setups["weft-pair"],
            "weft-mtls-pair": lambda: weft_mtls_stack(tmp, "weft-mtls-pair", upstream),
            "weft-mtls-pair-quiet": lambda: weft_mtls_stack(tmp, "weft-mtls-pair-quiet", upstream, telemetry=False),
            "haproxy-tls-pair": lambda: haproxy_tls_stack(tmp, "haproxy-tls-pair", upstream, pki),
            "envoy-tls-pair": lambda: envoy_tls_stack(tmp, "envoy-tls-pair", upstream, pki),
        }
        handshake_setups = {
            "weft-mtls-tcp": lambda: weft_mtls_stack(tmp, "weft-mtls-tcp", upstream, tcp=True),
            "haproxy-tls-tcp": lambda: haproxy_tls_stack(tmp, "haproxy-tls-tcp", upstream, pki, tcp=True),
            "envoy-tls-tcp": lambda: envoy_tls_stack(tmp, "envoy-tls-tcp", upstream, pki, tcp=True),
        }
        for variant, binary, wanted in [("pgo", WEFT_PGO, args.pgo), ("bolt", WEFT_BOLT, args.bolt)]:
            if wanted:
                setups[f"weft-{variant}-mtls-pair"] = (
                    lambda variant=variant, binary=binary: weft_mtls_stack(tmp, f"weft-{variant}-mtls-pair", upstream,
                                                                           binary=binary))
                handshake_setups[f"weft-{variant}-mtls-tcp"] = (
                    lambda variant=variant, binary=binary: weft_mtls_stack(tmp, f"weft-{variant}-mtls-tcp", upstream,
                                                                           tcp=True, binary=binary))
    sink = None
    if args.tracing:
        sink = OtlpSink()
        setups = {
            "direct": setups["direct"],
            "weft-pair": setups["weft-pair"],
            "weft-mtls-pair": lambda: weft_mtls_stack(tmp, "weft-mtls-pair", upstream),
        }
        for rate in [0, 1, 100]:
            setups[f"weft-mtls-pair-trace-{rate}"] = (
                lambda rate=rate: weft_mtls_stack(tmp, f"weft-mtls-pair-trace-{rate}", upstream, sink=sink,
                                                  sampling=rate / 100))
        setups["weft-mtls-pair-log"] = lambda: weft_mtls_stack(tmp, "weft-mtls-pair-log", upstream, access_log=True)
    if args.only:
        setups = {k: v for k, v in setups.items() if k in args.only.split(",") or k == "direct"}
        handshake_setups = {k: v for k, v in handshake_setups.items() if k in args.only.split(",")}
    stacks = {}
    results = {name: [] for name in setups}
    handshakes = {name: [] for name in handshake_setups}
    rss = {}
    try:
        for name, make in setups.items():
            stacks[name] = make()
        for name, make in handshake_setups.items():
            stacks[name] = make()
        for round_index in range(args.rounds):
            for name in handshake_setups:
                sample = run_handshakes(stacks[name], args.duration)
                if round_index > 0 or args.rounds == 1:
                    handshakes[name].append(sample)
                print(f"round {round_index + 1}/{args.rounds} {name}: " + ", ".join(f"{k}={v:.3f}" for k, v in sample.items()), file=sys.stderr)
            for name, stack in stacks.items():
                if name in handshake_setups:
                    continue
                stack.reset_peak_rss()
                sample = run_wrk(stack, args.duration)
                sample.update(run_oha(stack, args.duration))
                rss_h1 = rss.setdefault(name, {}).setdefault("h1", [0.0] * len(stack.proxy_pids))
                for i, mb in enumerate(stack.rss()):
                    rss_h1[i] = max(rss_h1[i], mb)
                if name != "direct":
                    stack.reset_peak_rss()
                    sample.update(run_h2load(stack, args.duration))
                    rss_h2 = rss[name].setdefault("h2", [0.0] * len(stack.proxy_pids))
                    for i, mb in enumerate(stack.rss()):
                        rss_h2[i] = max(rss_h2[i], mb)
                if round_index > 0 or args.rounds == 1:
                    results[name].append(sample)
                print(f"round {round_index + 1}/{args.rounds} {name}: " + ", ".join(f"{k}={v:.3f}" for k, v in sample.items()), file=sys.stderr)
    finally:
        for stack in stacks.values():
            stack.stop()
        stop_nginx(nginx)
        if sink:
            sink.stop()
    report = render(results, rss, args)
    if args.mtls:
        report += render_mtls(results, handshakes, rss)
    if args.tracing:
        report += render_tracing(results, sink)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(report)
    print(report)


def summary(samples, key):
    values = [s[key] for s in samples if key in s and s[key] == s[key]]
    if not values:
        return None
    return statistics.median(values), min(values), max(values)


def render(results, rss, args):
    def cell(name, key, fmt="{:.0f}"):
        s = summary(results[name], key)
        if s is None:
            return "n/a"
        return f"{fmt.format(s[0])} ({fmt.format(s[1])}–{fmt.format(s[2])})"

    direct = {k: summary(results["direct"], k) for k in ["rps", "p50_ms", "p99_ms", "h2_rps"]}
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} cores; {args.rounds} rounds "
        f"(first dropped) × {args.duration}s per load; median (min–max). nginx upstream, 1 KiB body, {WORKERS} worker thread{'s' if WORKERS > 1 else ''} per proxy.",
        "",
        "| setup | wrk rps (h1, c32) | × direct | CPU-s / 1k req | p50 +ms @2k rps | p99 +ms @2k rps | h2load rps (h2c) | peak RSS MB, h1 loads | peak RSS MB, h2c load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in results:
        rps = summary(results[name], "rps")
        ratio = f"{rps[0] / direct['rps'][0]:.2f}" if rps and direct["rps"] else "n/a"
        p50 = summary(results[name], "p50_ms")
        p99 = summary(results[name], "p99_ms")
        add50 = f"{p50[0] - direct['p50_ms'][0]:+.3f}" if p50 and direct["p50_ms"] else "n/a"
        add99 = f"{p99[0] - direct['p99_ms'][0]:+.3f}" if p99 and direct["p99_ms"] else "n/a"
        cpu = cell(name, "cpu_per_1k", "{:.4f}") if name != "direct" else "—"
        mem = {kind: " / ".join(f"{m:.1f}" for m in rss.get(name, {}).get(kind, [])) or "—" for kind in ["h1", "h2"]}
        lines.append(f"| {name} | {cell(name, 'rps')} | {ratio} | {cpu} | {add50} | {add99} | {cell(name, 'h2_rps')} | {mem['h1']} | {mem['h2']} |")
    lines.append("")
    for variant in ["weft", "weft-pgo", "weft-bolt"]:
        for kind in ["hop", "pair"]:
            for peer in ["haproxy", "envoy"]:
                line = comparison(results, rss, f"{variant}-{kind}", f"{peer}-{kind}")
                if line:
                    lines.append(f"- {variant}/{peer} {kind}: {line}")
    return "\n".join(lines) + "\n"


def comparison(results, rss, name, other):
    """One setup against another on every figure of the targets: throughput, CPU per
    request, h2c throughput, added p50/p99 latency at 2k rps (ms, this minus the other)
    and the largest proxy's peak RSS over both loads."""
    def median(setup, key):
        s = summary(results.get(setup, []), key)
        return s[0] if s else None

    rps, other_rps = median(name, "rps"), median(other, "rps")
    cpu, other_cpu = median(name, "cpu_per_1k"), median(other, "cpu_per_1k")
    if not (rps and other_rps and cpu and other_cpu):
        return None
    parts = [f"throughput ×{rps / other_rps:.2f}", f"CPU per request ×{cpu / other_cpu:.2f}"]
    h2, other_h2 = median(name, "h2_rps"), median(other, "h2_rps")
    if h2 and other_h2:
        parts.append(f"h2c throughput ×{h2 / other_h2:.2f}")
    for key in ["p50_ms", "p99_ms"]:
        mine, theirs = median(name, key), median(other, key)
        if mine is not None and theirs is not None:
            parts.append(f"{key[:3]} {mine - theirs:+.3f} ms")
    peak = max((mb for kind in rss.get(name, {}).values() for mb in kind), default=0)
    other_peak = max((mb for kind in rss.get(other, {}).values() for mb in kind), default=0)
    if peak and other_peak:
        parts.append(f"peak RSS ×{peak / other_peak:.2f}")
    return ", ".join(parts)


def render_mtls(results, handshakes, rss):
    """The mutual-TLS comparisons: weft's cost of mTLS, and weft against the peers."""
    lines = ["", "| setup (TCP mode, new connection per request) | connections/s | CPU-s / 1k connections |", "|---|---|---|"]
    for name, samples in handshakes.items():
        def cell(key, fmt):
            s = summary(samples, key)
            return f"{fmt.format(s[0])} ({fmt.format(s[1])}–{fmt.format(s[2])})" if s else "n/a"
        lines.append(f"| {name} | {cell('conn_per_s', '{:.0f}')} | {cell('cpu_per_1k_conn', '{:.3f}')} |")
    lines.append("")
    plain, mtls = summary(results.get("weft-pair", []), "rps"), summary(results.get("weft-mtls-pair", []), "rps")
    plain_cpu, mtls_cpu = summary(results.get("weft-pair", []), "cpu_per_1k"), summary(results.get("weft-mtls-pair", []), "cpu_per_1k")
    if plain and mtls and plain_cpu and mtls_cpu:
        lines.append(f"- weft mTLS pair / weft plaintext pair: throughput ×{mtls[0] / plain[0]:.2f}, CPU per request ×{mtls_cpu[0] / plain_cpu[0]:.2f}")
    quiet, quiet_cpu = summary(results.get("weft-mtls-pair-quiet", []), "rps"), summary(results.get("weft-mtls-pair-quiet", []), "cpu_per_1k")
    if mtls and quiet and mtls_cpu and quiet_cpu:
        lines.append(f"- telemetry (reported every 5 s) / none (--telemetry-interval 0), mTLS pair: throughput ×{mtls[0] / quiet[0]:.2f}, CPU per request ×{mtls_cpu[0] / quiet_cpu[0]:.2f}")
    for variant in ["weft", "weft-pgo", "weft-bolt"]:
        for peer in ["haproxy", "envoy"]:
            line = comparison(results, rss, f"{variant}-mtls-pair", f"{peer}-tls-pair")
            if line:
                lines.append(f"- {variant} mTLS pair / {peer} TLS pair: {line}")
            mine, theirs = handshakes.get(f"{variant}-mtls-tcp", []), handshakes.get(f"{peer}-tls-tcp", [])
            conn, other_conn = summary(mine, "conn_per_s"), summary(theirs, "conn_per_s")
            cc, other_cc = summary(mine, "cpu_per_1k_conn"), summary(theirs, "cpu_per_1k_conn")
            if conn and other_conn and cc and other_cc:
                lines.append(f"- new connections, {variant} / {peer}: rate ×{conn[0] / other_conn[0]:.2f}, "
                             f"CPU per connection ×{cc[0] / other_cc[0]:.2f}")
    return "\n".join(lines) + "\n"


def paired_ratio(results, name, base, key):
    """The median, over rounds, of `name`'s figure over `base`'s in the same round, with the
    range: setups take turns within a round, so a ratio within one round is not moved by
    the machine getting busier or quieter from round to round as a ratio of medians is."""
    ratios = sorted(s[key] / b[key] for s, b in zip(results.get(name, []), results.get(base, []))
                    if s.get(key) and b.get(key) and s[key] == s[key] and b[key] == b[key])
    if not ratios:
        return None
    return statistics.median(ratios), ratios[0], ratios[-1]


def render_tracing(results, sink):
    """What tracing costs the mutual-TLS pair, by sampling rate, and what access logs cost it."""
    lines = [""]
    base = "weft-mtls-pair"

    def line(what, name):
        rps, cpu = paired_ratio(results, name, base, "rps"), paired_ratio(results, name, base, "cpu_per_1k")
        if rps and cpu:
            user = summary(results[name], "user_share")
            lines.append(f"- {what} / off, mTLS pair: throughput ×{rps[0]:.3f} ({rps[1]:.3f}–{rps[2]:.3f}), "
                         f"CPU per request ×{cpu[0]:.3f} ({cpu[1]:.3f}–{cpu[2]:.3f})"
                         + (f"; user-space {user[0] * 100:.0f}% of the proxies' CPU" if user else ""))

    for name in sorted((n for n in results if "-trace-" in n), key=lambda n: int(n.rsplit("-", 1)[1])):
        line(f"tracing at {name.rsplit('-', 1)[1]}%", name)
    line("access logs (every request, both proxies)", "weft-mtls-pair-log")
    base_user = summary(results.get(base, []), "user_share")
    if base_user:
        lines.append(f"- the plain mTLS pair's proxies spend {base_user[0] * 100:.0f}% of their CPU in user space, "
                     "the rest in the kernel (the instruction gate counts user space alone)")
    lines.append("- ratios are the median over rounds of each round's own ratio (setups take turns within a round), "
                 "with the range over rounds")
    if sink:
        lines.append(f"- the receiver took {sink.exports} exports, {sink.bytes / 1e6:.1f} MB of spans")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
