#!/usr/bin/env python3
"""Where the data path's cycles go beyond instruction counts: simulated cache misses per
request, for weft's builds against HAProxy, under concurrency.

The instruction-count gate (bench/instructions.py) counts work on one connection; two
proxies that execute the same instructions per request can still differ in cycles by how
their code and data fit the caches. This runs each proxy as one hop under callgrind with
its cache simulation (--cache-sim=yes with fixed caches, so that machines compare: 32 KiB
8-way L1 caches, an 8 MiB 16-way last level), carries a warm-up, zeroes the counters,
then carries REQUESTS HTTP/1.1 requests over 32 connections (h2load, nginx behind), and
reports per request:

  Ir     instructions
  I1mr   L1 instruction-cache misses (code layout: what PGO and BOLT change)
  D1mr   L1 data-cache read misses
  D1mw   L1 data-cache write misses (buffers and futures written per request)
  LLm    last-level misses, instruction and data

Setups: weft-hop (target/release/weft), weft-pgo-hop and weft-bolt-hop when bench/pgo.py
built them, haproxy-hop (nbthread 1, bench.py's configuration). Simulated counts are
deterministic enough to compare builds run to run, unlike wall-clock time; they are a
model of the caches, not the machine's counters. Writes bench/results/cache.md.

Usage: bench/cachegrind.py [--requests 20000] [--h2c]
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import instructions
from bench import ROOT, WEFT, WEFT_BOLT, WEFT_PGO, haproxy_config, start_nginx, stop_nginx
from instructions import Run
from weft_mesh import free_port, wait_port

WARMUP = 2000
EVENTS = ["Ir", "I1mr", "D1mr", "D1mw", "LLm"]


def weft_hop(run, binary, upstream):
    """One weft hop under callgrind: the gate's static stack, run from `binary`."""
    instructions.WEFT = binary
    return instructions.static_stack(run, upstream, "http", pair=False), None


def haproxy_hop(run, upstream):
    port, h2_port = free_port(), free_port()
    cfg = os.path.join(run.tmp, f"{run.name}.cfg")
    with open(cfg, "w") as f:
        f.write(haproxy_config(f"127.0.0.1:{port}", f"127.0.0.1:{upstream}",
                               f"frontend f2\n  bind 127.0.0.1:{h2_port} proto h2\n  default_backend b\n"))
    run.spawn(["haproxy", "-f", cfg, "-db"], measured=True)
    wait_port(port, run.name, timeout=60)
    return port, h2_port


def load(port, n, h2c, what):
    """n requests over 32 connections; fails unless every one succeeds."""
    args = ["h2load", "-n", str(n), "-c32", "-t1", "-H", ":authority: upstream"]
    args += ["-m10"] if h2c else ["--h1", "-m1"]
    out = subprocess.run(args + [f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=900).stdout
    line = next((l for l in out.splitlines() if l.startswith("requests:")), "")
    if f"{n} succeeded" not in line:
        raise SystemExit(f"{what}: not every request succeeded: {line or out}")


def measure(tmp, name, start, upstream, requests, h2c):
    run = Run(tmp, name, cache_sim=True)
    try:
        port, h2_port = start(run, upstream)
        target = h2_port if h2c and h2_port else port
        load(target, WARMUP, h2c, name)
        run.callgrind_control("-z")
        load(target, requests, h2c, name)
        run.callgrind_control("-d")
        events = run.events()
        events["LLm"] = events.get("ILmr", 0) + events.get("DLmr", 0) + events.get("DLmw", 0)
        return {e: events.get(e, 0) / requests for e in EVENTS}
    finally:
        run.stop()


def figure(value):
    """Per-request counts: whole numbers, but the last level's, often below one, kept."""
    return f"{value:.0f}" if value >= 10 else f"{value:.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--h2c", action="store_true", help="h2c clients (32 connections × 10 streams)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    for tool in ["valgrind", "callgrind_control", "h2load", "nginx", "haproxy"]:
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed; see bench/README.md for the one-time setup")
    if not os.path.exists(WEFT):
        raise SystemExit("build weft first: cargo build --release")
    setups = [("weft-hop", lambda run, up: weft_hop(run, WEFT, up))]
    for name, binary in [("weft-pgo-hop", WEFT_PGO), ("weft-bolt-hop", WEFT_BOLT)]:
        if os.path.exists(binary):
            setups.append((name, lambda run, up, binary=binary: weft_hop(run, binary, up)))
    setups.append(("haproxy-hop", haproxy_hop))
    tmp = tempfile.mkdtemp(prefix="weft-cache-")
    nginx, upstream = start_nginx(tmp)
    figures = {}
    try:
        for name, start in setups:
            started = time.time()
            figures[name] = measure(tmp, name, start, upstream, args.requests, args.h2c)
            print(f"{name}: " + ", ".join(f"{e} {figure(figures[name][e])}" for e in EVENTS)
                  + f" ({time.time() - started:.0f}s)", file=sys.stderr, flush=True)
    finally:
        stop_nginx(nginx)
        shutil.rmtree(tmp, ignore_errors=True)
    kind = "h2c (32 connections × 10 streams)" if args.h2c else "HTTP/1.1 (32 connections)"
    lines = [f"Measured {time.strftime('%Y-%m-%d')}: one hop, {kind}, {args.requests} requests after {WARMUP} "
             f"of warm-up, callgrind --cache-sim=yes ({Run.CACHES_SAID}); per request.", "",
             "| setup | " + " | ".join(EVENTS) + " |", "|---|" + "---|" * len(EVENTS)]
    for name, f in figures.items():
        lines.append(f"| {name} | " + " | ".join(figure(f[e]) for e in EVENTS) + " |")
    lines.append("")
    base = figures.get("haproxy-hop")
    for name, f in figures.items():
        if base and name != "haproxy-hop":
            lines.append(f"- {name} / haproxy-hop: " + ", ".join(
                f"{e} ×{f[e] / base[e]:.2f}" for e in EVENTS if base[e]))
    report = "\n".join(lines) + "\n"
    out = args.out or os.path.join(ROOT, "bench", "results", "cache-h2c.md" if args.h2c else "cache.md")
    with open(out, "w") as f:
        f.write(report)
    print(report)


if __name__ == "__main__":
    main()
