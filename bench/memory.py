#!/usr/bin/env python3
"""Where a proxy's memory goes under load: weft's heap at its peak, by jemalloc size class,
against HAProxy's resident memory on the same load.

bench/bench.py reports peak RSS (VmHWM) only. This builds weft with jemalloc's statistics
(the `jemalloc-stats` feature of the weft crate; statistics cost work on every allocation,
so the binary goes to its own target directory, target/memory, and nothing else uses it),
runs one hop with bench.py's configuration (nginx upstream, one worker) under each of
bench.py's saturating loads:
  h1   wrk -c32 (HTTP/1.1)
  h2c  h2load -c32 -m10 (320 streams at once, so 320 upstream HTTP/1.1 connections)
with jemalloc printing its statistics every STATS_INTERVAL bytes allocated, and reports the
sample with the most bytes allocated:
  VmHWM          the process's peak resident memory (what bench.py reports)
  resident       pages jemalloc has resident: allocated + slab fragmentation + metadata
  allocated      bytes live in allocations
  metadata       jemalloc's own (its radix tree of extents most of it)
  tcache         bytes cached in thread caches, free but not returned
  per size class, largest first: live bytes, live regions, and slab utilisation
and HAProxy's VmHWM and heap ([heap] and anonymous mappings) after the same load. Which
types live in which class is for a reader to attribute (`-Zprint-type-sizes`, see
bench/README.md "Profiling"); the figures are the allocator's own counts.

Writes bench/results/memory.md. Usage: bench/memory.py [--duration 5] [--out FILE]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import bench
from bench import ROOT, haproxy_stack, peak_rss_mb, start_nginx, stop_nginx, weft_stack

TARGET_DIR = os.path.join(ROOT, "target", "memory")
WEFT_STATS = os.path.join(TARGET_DIR, "release", "weft")
# Bytes allocated between two printings of the statistics: under the h2c load weft
# allocates a few hundred MB/s, so this samples every second or so.
STATS_INTERVAL = 256 * 1024 * 1024
# JSON; per-arena (a), destroyed-arena (d), mutex (x), extent (e) and HPA (h) sections off.
STATS_OPTS = "Jadxeh"
LOADS = ["h1", "h2c"]


def build():
    started = time.time()
    args = ["cargo", "build", "--release", "-p", "weft", "--bin", "weft", "--features", "jemalloc-stats"]
    env = dict(os.environ, CARGO_TARGET_DIR=TARGET_DIR)
    if subprocess.run(args, cwd=ROOT, env=env).returncode != 0:
        raise SystemExit("the build of weft with jemalloc's statistics failed (cargo's messages above)")
    print(f"built {WEFT_STATS} in {time.time() - started:.0f}s", flush=True)


def run_load(stack, load, duration):
    """Saturates `stack` with `load`; fails unless requests succeeded."""
    if load == "h1":
        return bench.run_wrk(stack, duration)["rps"]
    rps = bench.run_h2load(stack, duration)["h2_rps"]
    if rps != rps:  # NaN: no 2xx
        raise SystemExit(f"h2load against {stack.name} saw no successful request")
    return rps


def stats_documents(text):
    """The JSON documents jemalloc printed into a log, in order."""
    decoder, docs, at = json.JSONDecoder(), [], 0
    while True:
        key = text.find('"jemalloc"', at)
        if key < 0:
            return docs
        start = text.rfind("{", 0, key)
        doc, length = decoder.raw_decode(text[start:])
        docs.append(doc["jemalloc"])
        at = start + length


def heap_summary(doc):
    """Totals and live bytes per size class from one jemalloc statistics document."""
    stats, arenas = doc["stats"], doc["arenas"]
    merged = doc["stats.arenas"]["merged"]
    classes = []
    for shape, counts in zip(arenas["bin"], merged["bins"]):
        if counts["curregs"]:
            slabs_regions = counts["curslabs"] * shape["nregs"]
            classes.append({"size": shape["size"], "regions": counts["curregs"],
                            "bytes": counts["curregs"] * shape["size"],
                            "util": counts["curregs"] / slabs_regions if slabs_regions else 1.0})
    for shape, counts in zip(arenas["lextent"], merged["lextents"]):
        if counts["curlextents"]:
            classes.append({"size": shape["size"], "regions": counts["curlextents"],
                            "bytes": counts["curlextents"] * shape["size"], "util": 1.0})
    classes.sort(key=lambda c: -c["bytes"])
    return {"allocated": stats["allocated"], "resident": stats["resident"], "metadata": stats["metadata"],
            "tcache": merged.get("tcache_bytes", 0), "classes": classes}


def anonymous_mb(pid):
    """Resident anonymous memory ([heap] included) of a process, in MB."""
    total, anonymous = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                anonymous = len(fields) < 6 or fields[5] == "[heap]"
            elif fields[0] == "Rss:" and anonymous:
                total += int(fields[1])
    return total / 1024


def measure_weft(tmp, load, duration):
    nginx, upstream = start_nginx(tmp)
    os.environ["_RJEM_MALLOC_CONF"] = f"stats_interval:{STATS_INTERVAL},stats_interval_opts:{STATS_OPTS}"
    try:
        stack = weft_stack(tmp, f"weft-{load}", upstream, pair=False, binary=WEFT_STATS)
    finally:
        del os.environ["_RJEM_MALLOC_CONF"]
    try:
        rps = run_load(stack, load, duration)
        hwm = peak_rss_mb(stack.proxy_pids[0])
    finally:
        stack.stop()
        stop_nginx(nginx)
    with open(os.path.join(tmp, f"weft-{load}-0.log")) as f:
        docs = stats_documents(f.read())
    if not docs:
        raise SystemExit(f"weft printed no jemalloc statistics under the {load} load: was it built with them?")
    peak = max(docs, key=lambda d: d["stats"]["allocated"])
    return {"rps": rps, "hwm": hwm, "samples": len(docs), **heap_summary(peak)}


def measure_haproxy(tmp, load, duration):
    nginx, upstream = start_nginx(tmp)
    stack = haproxy_stack(tmp, f"haproxy-{load}", upstream, pair=False)
    try:
        rps = run_load(stack, load, duration)
        pid = stack.proxy_pids[0]
        return {"rps": rps, "hwm": peak_rss_mb(pid), "heap": anonymous_mb(pid)}
    finally:
        stack.stop()
        stop_nginx(nginx)


def mb(n):
    return f"{n / 1048576:.1f}"


def render(results, args):
    lines = [
        "# Where the memory goes: one hop at its peak",
        "",
        f"`bench/memory.py --duration {args.duration}`, {time.strftime('%Y-%m-%d')}. weft built with jemalloc's "
        "statistics (`--features jemalloc-stats`, release profile); its heap is the statistics sample with the most "
        "bytes allocated during the load. HAProxy: VmHWM, and its resident anonymous memory after the load.",
        "",
        "| load | weft req/s | weft VmHWM MB | resident MB | allocated MB | metadata MB | thread caches MB "
        "| HAProxy req/s | HAProxy VmHWM MB | HAProxy heap MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for load in LOADS:
        w, h = results[load]["weft"], results[load]["haproxy"]
        lines.append(f"| {load} | {w['rps']:.0f} | {w['hwm']:.1f} | {mb(w['resident'])} | {mb(w['allocated'])} "
                     f"| {mb(w['metadata'])} | {mb(w['tcache'])} | {h['rps']:.0f} | {h['hwm']:.1f} | {h['heap']:.1f} |")
    for load in LOADS:
        w = results[load]["weft"]
        lines += ["", f"## weft's live allocations under {load}, by size class (largest first)", "",
                  "| size class (bytes) | live regions | live MB | share of allocated | slab utilisation |",
                  "|---|---|---|---|---|"]
        for c in w["classes"][:12]:
            lines.append(f"| {c['size']} | {c['regions']} | {mb(c['bytes'])} | {c['bytes'] / w['allocated']:.0%} "
                         f"| {c['util']:.2f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=5, help="seconds per load (default 5)")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "memory.md"))
    args = parser.parse_args()
    for tool in ["nginx", "wrk", "h2load", "haproxy"]:
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: run bench/setup.sh")
    build()
    results = {}
    for load in LOADS:
        tmp = tempfile.mkdtemp(prefix=f"weft-memory-{load}-")
        results[load] = {"weft": measure_weft(tmp, load, args.duration),
                         "haproxy": measure_haproxy(tmp, load, args.duration)}
        w = results[load]["weft"]
        print(f"{load}: weft VmHWM {w['hwm']:.1f} MB, allocated {mb(w['allocated'])} MB at its peak "
              f"({w['samples']} samples); HAProxy VmHWM {results[load]['haproxy']['hwm']:.1f} MB", flush=True)
    report = render(results, args)
    with open(args.out, "w") as f:
        f.write(report)
    sys.stdout.write(report)


if __name__ == "__main__":
    main()
