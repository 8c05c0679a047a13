#!/usr/bin/env python3
"""A profile-guided release build of weft, reproducibly, in one command.

  1. an instrumented release build (rustc -Cprofile-generate), in target/pgo-generate;
  2. training: that binary carries representative loads, with real peers as in
     bench/bench.py (nginx behind, wrk and h2load in front): HTTP/1.1 through a hop and a
     pair, h2c through the pair, a mutual-TLS pair of a real control plane (HTTP/1.1 and
     h2c), and opaque TCP over mutual TLS with a new connection per request (handshakes);
     every process is stopped with SIGTERM, so that it writes its profile on the way out;
  3. the profiles merged with the llvm-profdata of rustc's own LLVM major version (Debian
     llvm-N, or rustup's llvm-tools);
  4. the final build (rustc -Cprofile-use) in target/pgo: target/pgo/release/weft.

The profile is generated each time, never committed; the plain `cargo build --release`
is untouched. --quick trains for a second per load (the build steps dominate either way).

Usage: bench/pgo.py [--seconds 5] [--quick] [--reuse-profile]
"""

import argparse
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

import bench
from bench import ROOT, Stack, start_nginx, weft_mtls_stack, weft_stack

GENERATE_DIR = os.path.join(ROOT, "target", "pgo-generate")
FINAL_DIR = os.path.join(ROOT, "target", "pgo")


def llvm_profdata():
    """The llvm-profdata whose LLVM is rustc's: a profile from another major version is
    refused by rustc, or worse, silently ignored."""
    version = subprocess.run(["rustc", "-vV"], capture_output=True, text=True, check=True).stdout
    major = re.search(r"LLVM version: (\d+)", version).group(1)
    sysroot = subprocess.run(["rustc", "--print", "sysroot"], capture_output=True, text=True, check=True).stdout.strip()
    candidates = [shutil.which(f"llvm-profdata-{major}")]
    candidates += glob.glob(os.path.join(sysroot, "lib", "rustlib", "*", "bin", "llvm-profdata"))
    for candidate in filter(None, candidates):
        out = subprocess.run([candidate, "--version"], capture_output=True, text=True).stdout
        if re.search(rf"LLVM version {major}\.", out):
            return candidate
    raise SystemExit(f"no llvm-profdata for LLVM {major} (rustc's): apt-get install llvm-{major}, "
                     "or rustup component add llvm-tools")


def cargo_build(target_dir, rustflags):
    env = dict(os.environ, RUSTFLAGS=" ".join(filter(None, [os.environ.get("RUSTFLAGS", ""), rustflags])))
    print(f"pgo: cargo build --release -p weft --target-dir {os.path.relpath(target_dir, ROOT)} ({rustflags})",
          file=sys.stderr, flush=True)
    subprocess.run(["cargo", "build", "--release", "-p", "weft", "--target-dir", target_dir], cwd=ROOT, env=env,
                   check=True)
    return os.path.join(target_dir, "release", "weft")


def stop_cleanly(stack):
    """SIGTERM, then wait: an instrumented process writes its profile as it exits."""
    for proc in stack.procs:
        proc.send_signal(signal.SIGTERM)
    for proc in stack.procs:
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            print(f"pgo: {stack.name} did not stop on SIGTERM; its profile is lost", file=sys.stderr)


def wrk(stack, seconds, close=False):
    headers = ["-H", f"Host: {stack.host}"] + (["-H", "Connection: close"] if close else [])
    out = subprocess.run(["wrk", "-t1", "-c32", f"-d{seconds}s", *headers, f"http://127.0.0.1:{stack.port}/"],
                         capture_output=True, text=True).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    if requests == 0 or re.search(r"Non-2xx or 3xx responses", out):
        raise SystemExit(f"pgo: training through {stack.name} failed:\n{out}")
    return requests


def h2load(stack, seconds):
    out = subprocess.run(["h2load", "-c32", "-m10", "-t1", "-D", str(seconds), "-H", f":authority: {stack.host}",
                          f"http://127.0.0.1:{stack.port}/"], capture_output=True, text=True).stdout
    ok = re.search(r"status codes: (\d+) 2xx", out)
    if not ok or int(ok.group(1)) == 0:
        raise SystemExit(f"pgo: h2c training through {stack.name} failed:\n{out}")
    return int(ok.group(1))


def train(binary, seconds):
    """Runs the training loads through `binary`; the profiles land in the directory the
    instrumented build names."""
    bench.WEFT = binary
    tmp = tempfile.mkdtemp(prefix="weft-pgo-")
    nginx, upstream = start_nginx(tmp)
    loads = [
        ("hop", lambda: weft_stack(tmp, "pgo-hop", upstream, pair=False), ["http1"]),
        ("pair", lambda: weft_stack(tmp, "pgo-pair", upstream, pair=True), ["http1", "h2c"]),
        ("mtls-pair", lambda: weft_mtls_stack(tmp, "pgo-mtls", upstream), ["http1", "h2c"]),
        ("mtls-tcp-pair", lambda: weft_mtls_stack(tmp, "pgo-mtls-tcp", upstream, tcp=True), ["close"]),
    ]
    try:
        for name, make, kinds in loads:
            stack = make()
            try:
                for kind in kinds:
                    if kind == "h2c":
                        done = h2load(stack, seconds)
                    else:
                        done = wrk(stack, seconds, close=kind == "close")
                    print(f"pgo: trained {name} {kind}: {done} requests", file=sys.stderr, flush=True)
            finally:
                stop_cleanly(stack)
    finally:
        os.killpg(nginx.pid, signal.SIGTERM)
        nginx.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5, help="seconds of each training load")
    parser.add_argument("--quick", action="store_true", help="a second per load")
    parser.add_argument("--reuse-profile", action="store_true",
                        help="only the final build, from the profile the last run merged")
    args = parser.parse_args()
    merged = os.path.join(GENERATE_DIR, "merged.profdata")
    if args.reuse_profile:
        if not os.path.exists(merged):
            raise SystemExit(f"pgo: no merged profile at {merged}; run bench/pgo.py without --reuse-profile")
        print(cargo_build(FINAL_DIR, f"-Cprofile-use={merged}"))
        return
    for tool in ["nginx", "wrk", "h2load", "cargo", "rustc"]:
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed; see bench/README.md for the one-time setup")
    profdata = llvm_profdata()
    profiles = os.path.join(GENERATE_DIR, "profiles")
    shutil.rmtree(profiles, ignore_errors=True)
    os.makedirs(profiles)
    instrumented = cargo_build(GENERATE_DIR, f"-Cprofile-generate={profiles}")
    train(instrumented, 1 if args.quick else args.seconds)
    raw = glob.glob(os.path.join(profiles, "*.profraw"))
    if not raw:
        raise SystemExit("pgo: the training wrote no profile (did every process stop on SIGTERM?)")
    subprocess.run([profdata, "merge", "-o", merged, *raw], check=True)
    print(f"pgo: merged {len(raw)} profiles with {profdata}", file=sys.stderr, flush=True)
    final = cargo_build(FINAL_DIR, f"-Cprofile-use={merged}")
    print(final)


if __name__ == "__main__":
    main()
