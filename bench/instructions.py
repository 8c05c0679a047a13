#!/usr/bin/env python3
"""The instruction-count gate: user-space instructions the proxies execute per request,
counted by callgrind, for one hop and a pair, HTTP/1.1, h2c, gRPC, mutual TLS and opaque
TCP over mutual TLS.

Wall-clock timings on these shared machines move 10-30% from run to run; instruction
counts barely move, as long as nothing batches differently. So the client is sequential
(h2load -c1 -m1: one connection, one request at a time), the upstream is `weft demo-app`,
and only the proxies run under callgrind (the client, the upstream and the control plane
are excluded). Counters are zeroed after a warm-up and dumped after the measured
requests, so start-up, joining and first-use discovery are not counted either.

  bench/instructions.py            measure and compare with bench/instructions-baseline.json;
                                   exits 1 when any figure is more than 3% above it
  bench/instructions.py --update   measure and write the baseline (commit it, with the
                                   reason in the commit message)
  bench/instructions.py --only http1-hop,h2c-pair   a subset

Builds what it measures first: the weft binary with the workspace's crates compiled as a
release build compiles them (opt-level 3, no debug assertions or overflow checks, 16
codegen units), passed to cargo with --config over the dev profile. The dependencies are
the dev profile's own, which Cargo.toml already builds that way, so after `cargo test`
only the workspace's six crates are compiled again (about three minutes on two cores,
with the few dependencies whose features the tests' dev-dependencies widen) instead of
the whole tree in another profile. No LTO: the release build's fat LTO takes
ten minutes; the gate compares a build with its own baseline, and a change that costs
instructions without LTO costs them with it. The binary is copied to target/gate/weft.
WEFT_BINARY=path measures another binary instead (and builds nothing); WEFT_GATE_KEEP=1 keeps
the callgrind dumps for callgrind_annotate. Needs valgrind and
h2load (nghttp2-client).
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from weft_mesh import OtlpSink, free_port, mtls_pair, wait_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEFT = os.environ.get("WEFT_BINARY", os.path.join(ROOT, "target", "gate", "weft"))
# The workspace crates' settings for the gate's build; the dependencies get the same from
# `[profile.dev.package."*"]` in Cargo.toml, so their artifacts are shared with the tests'.
GATE_BUILD = ["opt-level=3", "debug=false", "debug-assertions=false", "overflow-checks=false",
              "codegen-units=16", "incremental=false"]
BASELINE = os.path.join(ROOT, "bench", "instructions-baseline.json")
TOLERANCE = 0.03
WARMUP = 300
REQUESTS = 2000

# (name, client protocol, Service protocol, pair, mutual TLS, opaque TCP). The mutual-TLS
# setups have a control plane, so their proxies report telemetry (every 5 s, the
# default); `-quiet` is the same pair with `--telemetry-interval 0`, so every run also
# says what telemetry costs on the request path. `-trace-N` is the pair with MeshConfig
# tracing on at N% sampling, exporting over OTLP/HTTP to a receiver in this process:
# what tracing costs, with the export counted (it runs in the proxies). `-log` is the pair
# with MeshConfig accessLog on, every request logged by both proxies to a file.
SETUPS = [
    ("http1-hop", "http1", "http", False, False, False),
    ("http1-pair", "http1", "http", True, False, False),
    ("h2c-hop", "h2c", "http2", False, False, False),
    ("h2c-pair", "h2c", "http2", True, False, False),
    ("grpc-pair", "grpc", "grpc", True, False, False),
    ("mtls-http1-pair", "http1", "http", True, True, False),
    ("mtls-http1-pair-quiet", "http1", "http", True, True, False),
    ("mtls-tcp-pair", "http1", "http", True, True, True),
    ("mtls-http1-pair-trace-0", "http1", "http", True, True, False),
    ("mtls-http1-pair-trace-1", "http1", "http", True, True, False),
    ("mtls-http1-pair-trace-100", "http1", "http", True, True, False),
    ("mtls-http1-pair-log", "http1", "http", True, True, False),
]


def mesh_yaml(port, protocol):
    return f"""apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {{name: upstream}}
spec: {{selector: {{app: upstream}}, ports: [{{port: 80, protocol: {protocol}}}]}}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {{name: upstream-1}}
spec: {{labels: {{app: upstream}}, address: "127.0.0.1:{port}"}}
"""


class Run:
    """The processes of one setup; proxies run under callgrind."""

    def __init__(self, tmp, name, cache_sim=False):
        self.tmp, self.name = tmp, name
        self.procs, self.measured = [], []
        self.sink = None
        # bench/cachegrind.py's runs simulate the caches too (callgrind --cache-sim=yes).
        self.cache_sim = cache_sim

    # The simulated caches are fixed, not read off the host: valgrind takes the host's
    # own sizes by default, and one machine here has 64 KiB L1 instruction caches and a
    # 480 MiB last level where earlier ones had 32 KiB L1s, which made I1 and LL misses
    # incomparable from one machine to the next. CACHES_SAID is how reports name them.
    CACHES = ["--cache-sim=yes", "--I1=32768,8,64", "--D1=32768,8,64", "--LL=8388608,16,64"]
    CACHES_SAID = "L1 32 KiB, LL 8 MiB"

    def spawn(self, args, measured=False, env=None):
        log = open(os.path.join(self.tmp, f"{self.name}-{len(self.procs)}.log"), "w")
        if measured:
            out = os.path.join(self.tmp, f"{self.name}-{len(self.procs)}.callgrind")
            args = ["valgrind", "--tool=callgrind", "--dump-instr=no", "--dump-line=no",
                    f"--callgrind-out-file={out}"] + (self.CACHES if self.cache_sim else []) + args
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append(proc)
        if measured:
            self.measured.append((proc, out))
        return proc

    def callgrind_control(self, flag):
        for proc, _ in self.measured:
            subprocess.run(["callgrind_control", flag, str(proc.pid)], check=True, capture_output=True)

    def instructions(self):
        """Instructions counted since the last zeroing, summed over the proxies."""
        return self.events()["Ir"]

    def events(self):
        """Every event callgrind counted since the last zeroing (Ir, and with the cache
        simulation I1mr, D1mr, D1mw, ...), summed over the proxies."""
        totals = {}
        for proc, out in self.measured:
            dumps = sorted(f for f in os.listdir(self.tmp) if f.startswith(os.path.basename(out) + "."))
            if not dumps:
                raise SystemExit(f"{self.name}: callgrind wrote no dump for pid {proc.pid}")
            names, values = [], []
            with open(os.path.join(self.tmp, dumps[-1])) as f:
                for line in f:
                    if line.startswith("events:"):
                        names = line.split()[1:]
                    elif line.startswith("summary:") or line.startswith("totals:"):
                        values = [int(v) for v in line.split()[1:]]
                        break
            for event, value in zip(names, values):
                totals[event] = totals.get(event, 0) + value
        return totals

    def stop(self):
        if self.sink:
            self.sink.stop()
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.procs:
            proc.wait()


def start_upstream(run):
    ports = os.path.join(run.tmp, f"{run.name}-app.json")
    run.spawn([WEFT, "demo-app", "--name", "upstream", "--listen", "127.0.0.1:0", "--ports-file", ports])
    deadline = time.time() + 20
    while not os.path.exists(ports) or os.path.getsize(ports) == 0:
        if time.time() > deadline:
            raise SystemExit(f"{run.name}: demo-app did not start")
        time.sleep(0.05)
    with open(ports) as f:
        return int(json.load(f)["listen"].rsplit(":", 1)[1])


def static_stack(run, upstream, protocol, pair):
    """Proxies configured from files: plaintext between them."""
    target = upstream
    if pair:
        inbound, admin = free_port(), free_port()
        cfg = os.path.join(run.tmp, f"{run.name}-in.yaml")
        with open(cfg, "w") as f:
            f.write(mesh_yaml(upstream, protocol))
        run.spawn([WEFT, "proxy", "--config", cfg, "--service", "upstream", "--app-addr", f"127.0.0.1:{upstream}",
                   "--inbound-addr", f"127.0.0.1:{inbound}", "--outbound-addr", "127.0.0.1:0",
                   "--admin-addr", f"127.0.0.1:{admin}", "--log", "warn"], measured=True)
        wait_port(inbound, run.name, timeout=60)
        target = inbound
    outbound, admin = free_port(), free_port()
    cfg = os.path.join(run.tmp, f"{run.name}-out.yaml")
    with open(cfg, "w") as f:
        f.write(mesh_yaml(target, protocol))
    run.spawn([WEFT, "proxy", "--config", cfg, "--outbound-addr", f"127.0.0.1:{outbound}",
               "--admin-addr", f"127.0.0.1:{admin}", "--log", "warn"], measured=True)
    wait_port(outbound, run.name, timeout=60)
    return outbound


def mtls_stack(run, upstream, tcp):
    """A control plane (not measured) and two joined proxies: every hop is mutual TLS.
    Slow to come up: both proxies run under callgrind. A `-quiet` setup's proxies report
    no telemetry."""
    extra = ["--telemetry-interval", "0"] if run.name.endswith("-quiet") else []
    resources = None
    if "-trace-" in run.name:
        run.sink = OtlpSink()
        resources = run.sink.mesh_config(int(run.name.rsplit("-", 1)[1]) / 100)
    if run.name.endswith("-log"):
        log = os.path.join(run.tmp, f"{run.name}-access.log")
        resources = f"apiVersion: weft.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: mesh}}\nspec:\n  accessLog: {{path: \"{log}\"}}\n"
    return mtls_pair(WEFT, run.tmp, run.name, upstream, run.spawn, lambda args: run.spawn(args, measured=True),
                     tcp=tcp, timeout=120, proxy_args=extra, resources=resources)


def load(port, client, n, what):
    """n sequential requests on one connection; fails unless every one succeeds."""
    args = ["h2load", "-n", str(n), "-c1", "-m1", "-t1", "-H", ":authority: upstream"]
    if client == "http1":
        args.append("--h1")
    if client == "grpc":
        body = os.path.join(tempfile.gettempdir(), "weft-gate-grpc.bin")
        with open(body, "wb") as f:
            f.write(b"\x00\x00\x00\x00\x05hello")
        args += ["-d", body, "-H", "content-type: application/grpc", "-H", "te: trailers"]
        url = f"http://127.0.0.1:{port}/weft.bench.Echo/Call"
    else:
        url = f"http://127.0.0.1:{port}/"
    out = subprocess.run(args + [url], capture_output=True, text=True, timeout=900).stdout
    line = next((l for l in out.splitlines() if l.startswith("requests:")), "")
    if f"{n} succeeded" not in line:
        raise SystemExit(f"{what}: not every request succeeded: {line or out}")


def measure(tmp, setup):
    name, client, protocol, pair, mtls, tcp = setup
    run = Run(tmp, name)
    try:
        upstream = start_upstream(run)
        port = mtls_stack(run, upstream, tcp) if mtls else static_stack(run, upstream, protocol, pair)
        load(port, client, WARMUP, name)
        run.callgrind_control("-z")
        load(port, client, REQUESTS, name)
        run.callgrind_control("-d")
        return run.instructions() / REQUESTS
    finally:
        run.stop()


def cargo_build_weft(settings, what, env=None):
    """`cargo build -p weft` in the dev profile with `settings` for the workspace's crates
    (the dependencies keep the dev profile's own); returns the executable's path."""
    args = ["cargo", "build", "-p", "weft", "--bin", "weft", "--message-format=json-render-diagnostics"]
    for setting in settings:
        args += ["--config", f"profile.dev.{setting}"]
    out = subprocess.run(args, cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{what} failed (cargo's messages above)")
    executable = None
    for line in out.stdout.splitlines():
        message = json.loads(line)
        if message.get("reason") == "compiler-artifact" and message["target"]["name"] == "weft" \
                and message.get("executable"):
            executable = message["executable"]
    if not executable:
        raise SystemExit(f"{what}: cargo built no weft executable")
    return executable


def build():
    """Builds the binary the gate measures and copies it to target/gate/weft."""
    started = time.time()
    executable = cargo_build_weft(GATE_BUILD, "the gate's build of weft")
    os.makedirs(os.path.dirname(WEFT), exist_ok=True)
    shutil.copy2(executable, WEFT)
    print(f"built {WEFT} in {time.time() - started:.0f}s", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update", action="store_true", help="write the baseline instead of checking it")
    parser.add_argument("--only", help="comma-separated setups")
    args = parser.parse_args()
    for tool in ["valgrind", "callgrind_control", "h2load"]:
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: apt-get install valgrind nghttp2-client")
    if "WEFT_BINARY" not in os.environ:
        build()
    elif not os.path.exists(WEFT):
        raise SystemExit(f"WEFT_BINARY names {WEFT}, which does not exist")
    setups = [s for s in SETUPS if not args.only or s[0] in args.only.split(",")]
    baseline = {}
    if os.path.exists(BASELINE):
        with open(BASELINE) as f:
            baseline = json.load(f).get("instructions_per_request", {})
    started = time.time()
    figures = {}
    tmp = tempfile.mkdtemp(prefix="weft-gate-")
    print(f"{'setup':<26} {'instr/request':>14} {'baseline':>10} {'change':>8} {'time':>6}")
    failed = []
    for setup in setups:
        name = setup[0]
        setup_started = time.time()
        figures[name] = round(measure(tmp, setup))
        took = f"{time.time() - setup_started:.0f}s"
        base = baseline.get(name)
        change = (figures[name] / base - 1) if base else None
        verdict = ""
        if change is not None and change > TOLERANCE:
            verdict = f"  FAIL: more than {TOLERANCE:.0%} above the baseline"
            failed.append(name)
        shown = f"{change:+.1%}" if change is not None else "new"
        print(f"{name:<26} {figures[name]:>14} {base or '-':>10} {shown:>8} {took:>6}{verdict}", flush=True)
    print(f"({REQUESTS} requests per setup after {WARMUP} of warm-up; {time.time() - started:.0f}s)")
    if "mtls-http1-pair" in figures and "mtls-http1-pair-quiet" in figures:
        cost = figures["mtls-http1-pair"] / figures["mtls-http1-pair-quiet"] - 1
        print(f"telemetry on the request path (mtls-http1-pair against -quiet): {cost:+.1%} instructions per request")
    traced = [(n, figures[n]) for n in figures if "-trace-" in n]
    if "mtls-http1-pair" in figures and traced:
        costs = ", ".join(f"{n.rsplit('-', 1)[1]}% {f / figures['mtls-http1-pair'] - 1:+.1%}" for n, f in traced)
        print(f"tracing on the request path, by sampling rate (against mtls-http1-pair): {costs} instructions per request")
    if "mtls-http1-pair" in figures and "mtls-http1-pair-log" in figures:
        cost = figures["mtls-http1-pair-log"] / figures["mtls-http1-pair"] - 1
        print(f"access logs on the request path (every request, both proxies): {cost:+.1%} instructions per request")
    if os.environ.get("WEFT_GATE_KEEP"):
        print(f"callgrind dumps kept in {tmp} (callgrind_annotate --inclusive=yes FILE)")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.update:
        merged = dict(baseline, **figures)
        with open(BASELINE, "w") as f:
            json.dump({"instructions_per_request": merged, "requests": REQUESTS, "warmup": WARMUP,
                       "tolerance": TOLERANCE}, f, indent=2, sort_keys=True)
            f.write("\n")
        print(f"wrote {BASELINE}")
        return 0
    if failed:
        print(f"the instruction-count gate failed for {', '.join(failed)}: a change made the request path more "
              "expensive. Make it cheaper, or update the baseline deliberately (bench/instructions.py --update, "
              "with the reason in the commit message).", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
