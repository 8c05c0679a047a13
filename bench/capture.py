#!/usr/bin/env python3
"""What transparent capture costs: the same weft pair addressed explicitly and captured,
and HAProxy's pair, in one run (root: network namespaces and nftables).

Each setup gets two network namespaces joined by a veth pair, the client's (10.253.N.1)
and the server's (10.253.N.2), with nginx serving a 1 KiB body on the server's loopback:
  weft-explicit   wrk -> 127.0.0.1:15001 (Host: upstream) -> weft -> weft (10.253.N.2:15006) -> nginx
  weft-captured   wrk -> http://<virtual IP>/ : captured by nftables into the same pair, both
                  sidecars with --capture (the server's redirects nothing here: the client's
                  sidecar dials its inbound port, which capture leaves alone)
  haproxy-pair    wrk -> 127.0.0.1:15001 -> haproxy -> haproxy (10.253.N.2:15006) -> nginx

Loads, interleaved over the setups every round, the two weft setups back to back in an order
that alternates from round to round (the first round is a warm-up and dropped; median, min and
max of the rest). The machines here are shared and their speed drifts by 20% over a minute, so
the comparison of captured with explicit is the median of each round's own ratio, the two
measured seconds apart, not the ratio of the medians:
  keep-alive  wrk -t1 -c32: requests/s, and the proxies' CPU seconds per 1k requests
  close       the same with `Connection: close`: a new client connection per request, where
              capture's per-connection work (NAT, SO_ORIGINAL_DST) shows

Usage: sudo bench/capture.py [--rounds 11] [--duration 3] [--out bench/results/capture.md]
"""

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from bench import ROOT, WEFT, cpu_times, haproxy_config, mesh_yaml, nginx_config


def run(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw).stdout


class Setup:
    """Two namespaces joined by a veth pair, and the processes in them."""

    def __init__(self, name, index, tmp):
        self.name, self.tmp, self.procs, self.proxy_pids = name, tmp, [], []
        tag = f"{os.getpid() % 10000}{index}"
        self.client, self.server = f"wbc{tag}", f"wbs{tag}"
        self.client_ip, self.server_ip = f"10.253.{index}.1", f"10.253.{index}.2"
        for ns in (self.client, self.server):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            run("ip", "netns", "add", ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "link", "add", f"vc{tag}", "netns", self.client, "type", "veth", "peer", "name", f"vs{tag}",
            "netns", self.server)
        for ns, link, ip in ((self.client, f"vc{tag}", self.client_ip), (self.server, f"vs{tag}", self.server_ip)):
            run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", link)
            run("ip", "-n", ns, "link", "set", link, "up")
        self.url, self.host = "http://127.0.0.1:15001/", "upstream"

    def spawn(self, ns, args, proxy=True):
        log = open(os.path.join(self.tmp, f"{self.name}-{len(self.procs)}.log"), "w")
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *args], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        if proxy:
            self.proxy_pids.append(proc.pid)
        return proc

    def wait_port(self, ns, address, timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            probe = subprocess.run(["ip", "netns", "exec", ns, "bash", "-c", f"exec 3<>/dev/tcp/{address.replace(':', '/')}"],
                                   capture_output=True)
            if probe.returncode == 0:
                return
            time.sleep(0.05)
        raise SystemExit(f"{self.name}: nothing listens on {address} in {ns}; see the logs in {self.tmp}")

    def cpu(self):
        """(user, system) CPU seconds of the proxies."""
        times = [cpu_times(p) for p in self.proxy_pids]
        return sum(t[0] for t in times), sum(t[1] for t in times)

    def stop(self):
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for ns in (self.client, self.server):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def start_nginx(setup):
    conf = os.path.join(setup.tmp, f"{setup.name}-nginx.conf")
    with open(conf, "w") as f:
        f.write(nginx_config(setup.tmp, f"{setup.name}-nginx", 8080))
    setup.spawn(setup.server, ["nginx", "-c", conf, "-p", setup.tmp], proxy=False)
    setup.wait_port(setup.server, "127.0.0.1:8080")


def weft_setup(name, index, tmp, captured):
    setup = Setup(name, index, tmp)
    start_nginx(setup)
    cfg = os.path.join(tmp, f"{name}.yaml")
    with open(cfg, "w") as f:
        f.write(mesh_yaml(15006, setup.server_ip))
    capture = ["--capture"] if captured else []
    setup.spawn(setup.server, [WEFT, "proxy", "--config", cfg, "--service", "upstream", "--app-addr", "127.0.0.1:8080",
                               "--inbound-addr", "0.0.0.0:15006", "--log", "warn", *capture])
    setup.spawn(setup.client, [WEFT, "proxy", "--config", cfg, "--log", "warn", *capture])
    setup.wait_port(setup.server, f"{setup.server_ip}:15006")
    setup.wait_port(setup.client, "127.0.0.1:15001")
    if captured:
        # The virtual IP, as the application would resolve it (through the responder).
        deadline = time.time() + 20
        while True:
            answer = subprocess.run(["ip", "netns", "exec", setup.client, "getent", "ahostsv4", "upstream"],
                                    capture_output=True, text=True).stdout.split()
            if answer:
                break
            if time.time() > deadline:
                raise SystemExit(f"{name}: upstream never resolved through the DNS responder")
            time.sleep(0.1)
        setup.url = f"http://{answer[0]}/"
    return setup


def haproxy_setup(name, index, tmp):
    setup = Setup(name, index, tmp)
    start_nginx(setup)
    for ns, listen, target in ((setup.server, "0.0.0.0:15006", "127.0.0.1:8080"),
                               (setup.client, "127.0.0.1:15001", f"{setup.server_ip}:15006")):
        cfg = os.path.join(tmp, f"{name}-{ns}.cfg")
        with open(cfg, "w") as f:
            f.write(haproxy_config(listen, target))
        setup.spawn(ns, ["haproxy", "-f", cfg, "-db"])
    setup.wait_port(setup.server, f"{setup.server_ip}:15006")
    setup.wait_port(setup.client, "127.0.0.1:15001")
    return setup


def run_wrk(setup, duration, close):
    headers = ["-H", f"Host: {setup.host}"] + (["-H", "Connection: close"] if close else [])
    (user0, system0) = setup.cpu()
    out = subprocess.run(["ip", "netns", "exec", setup.client, "wrk", "-t1", "-c32", f"-d{duration}s", *headers,
                          setup.url], capture_output=True, text=True).stdout
    (user1, system1) = setup.cpu()
    user, cpu = user1 - user0, (user1 - user0) + (system1 - system0)
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out) or re.search(r"Socket errors: .*", out)
    if requests == 0 or (errors and not close):
        raise SystemExit(f"wrk against {setup.name} saw errors:\n{out}")
    return {"rps": requests / duration, "cpu_per_1k": cpu / requests * 1000, "user_per_1k": user / requests * 1000}


def median(samples, key):
    values = [s[key] for s in samples]
    return statistics.median(values), min(values), max(values)


def render(results, args):
    lines = [
        "# What transparent capture costs",
        "",
        f"`bench/capture.py`, {args.rounds} rounds x {args.duration} s (first dropped), one worker per proxy, "
        "two network namespaces per setup joined by a veth pair, nginx 1 KiB behind the pair; "
        "median (min-max) of the rounds.",
        "",
    ]
    for load, title in (("keepalive", "Keep-alive (wrk -c32)"), ("close", "A new connection per request (Connection: close)")):
        lines += [f"## {title}", "",
                  "| setup | requests/s | CPU ms per 1k requests (both proxies) | of which user |",
                  "| --- | --- | --- | --- |"]
        for name, samples in results.items():
            rps, cpu = median(samples[load], "rps"), median(samples[load], "cpu_per_1k")
            user = median(samples[load], "user_per_1k")
            lines.append(f"| {name} | {rps[0]:,.0f} ({rps[1]:,.0f}-{rps[2]:,.0f}) | "
                         f"{cpu[0] * 1000:.1f} ({cpu[1] * 1000:.1f}-{cpu[2] * 1000:.1f}) | {user[0] * 1000:.1f} |")
        lines.append("")
        def paired(key, over="weft-explicit"):
            ratios = [c[key] / b[key] for c, b in zip(results["weft-captured"][load], results[over][load])]
            return statistics.median(ratios), min(ratios), max(ratios)

        cpu, rps, haproxy = paired("cpu_per_1k"), paired("rps"), paired("cpu_per_1k", "haproxy-pair")
        lines += [
            f"Captured vs explicit, the median of each round's ratio (min-max): CPU per request {cpu[0]:.3f}x "
            f"({cpu[1]:.3f}-{cpu[2]:.3f}), throughput {rps[0]:.3f}x ({rps[1]:.3f}-{rps[2]:.3f}); captured weft vs "
            f"HAProxy's pair: CPU per request {haproxy[0]:.3f}x.",
            "",
        ]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--duration", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "capture.md"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/capture.py needs root (network namespaces and nftables)")
    for tool in ["nginx", "wrk", "haproxy", "nft", "ip"]:
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed; see bench/README.md for the one-time setup")
    if not os.path.exists(WEFT):
        raise SystemExit("build weft first: cargo build --release")
    tmp = tempfile.mkdtemp(prefix="weft-capture-bench-")
    makers = {
        "weft-explicit": lambda: weft_setup("weft-explicit", 1, tmp, captured=False),
        "weft-captured": lambda: weft_setup("weft-captured", 2, tmp, captured=True),
        "haproxy-pair": lambda: haproxy_setup("haproxy-pair", 3, tmp),
    }
    setups = {}
    results = {name: {"keepalive": [], "close": []} for name in makers}
    try:
        for name, make in makers.items():
            setups[name] = make()
        for round_index in range(args.rounds):
            order = ["weft-explicit", "weft-captured"] if round_index % 2 == 0 else ["weft-captured", "weft-explicit"]
            for load, close in (("keepalive", False), ("close", True)):
                for name in order + ["haproxy-pair"]:
                    setup = setups[name]
                    sample = run_wrk(setup, args.duration, close)
                    if round_index > 0 or args.rounds == 1:
                        results[name][load].append(sample)
                    print(f"round {round_index + 1}/{args.rounds} {name} {load}: rps={sample['rps']:.0f} "
                          f"cpu_per_1k={sample['cpu_per_1k']:.4f}", file=sys.stderr)
    finally:
        for setup in setups.values():
            setup.stop()
    report = render(results, args)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(report)
    print(report)


if __name__ == "__main__":
    main()
