#!/usr/bin/env python3
"""A profile-guided release build of weft, reproducibly, in one command.

  1. an instrumented release build (rustc -Cprofile-generate), in target/pgo-generate;
  2. training: that binary carries representative loads, with real peers as in
     bench/bench.py (nginx or weft's demo app behind, wrk and h2load in front):
     HTTP/1.1 through a hop and a pair, h2c through the pair, gRPC through a pair whose
     Service says grpc, a mutual-TLS pair of a real control plane (HTTP/1.1 and h2c),
     and opaque TCP over mutual TLS with a new connection per request (handshakes);
     every process is stopped with SIGTERM, so that it writes its profile on the way out;
  3. the profiles merged with the llvm-profdata of rustc's own LLVM major version (Debian
     llvm-N, or rustup's llvm-tools);
  4. the final build (rustc -Cprofile-use) in target/pgo: target/pgo/release/weft.

The profile is generated each time, never committed; the plain `cargo build --release`
is untouched.

--quick is the same pipeline made light enough for CI (a few minutes): a second of each
load, and a lighter build. Only weft's own crates are instrumented and then optimised
with the profile (through RUSTC_WORKSPACE_WRAPPER, whose path cargo hashes into those
crates' artifacts, so they never mix with other builds), in the dev profile with the
gate's settings (bench/instructions.py) at opt-level 1: the dependencies are the ones
`cargo test` already built, so only the workspace is compiled, twice. It checks that the
profile covers the proxy and that the final binary carries a request; its binary,
target/pgo-quick/use/weft, is for that check, not for measuring.

--bolt then runs BOLT (Debian bolt-22) over the final binary: llvm-bolt instruments it,
the same loads train it, and llvm-bolt lays its functions and blocks out by that
profile: target/pgo/release/weft-bolt.

Usage: bench/pgo.py [--seconds 5] [--quick] [--reuse-profile] [--bolt]
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
import time

import bench
from bench import ROOT, start_nginx, stop_nginx, weft_mtls_stack, weft_stack
from instructions import GATE_BUILD, cargo_build_weft
from weft_mesh import free_port, wait_port

GENERATE_DIR = os.path.join(ROOT, "target", "pgo-generate")
FINAL_DIR = os.path.join(ROOT, "target", "pgo")
QUICK_DIR = os.path.join(ROOT, "target", "pgo-quick")
# The proxy's crate: a build fails unless the merged profile counted some of its
# functions (every training load runs them).
PROXY_CRATE = "weft_proxy"
# The quick mode's settings for weft's crates: the gate's, at opt-level 1, which halves
# the two builds; the pipeline it checks is the same.
QUICK_BUILD = [s if not s.startswith("opt-level=") else "opt-level=1" for s in GATE_BUILD]
# The final build keeps its relocations, so that BOLT (--bolt) can move its functions;
# they are not loaded at run time.
EMIT_RELOCS = "-Clink-arg=-Wl,--emit-relocs"


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


def quick_build(phase, flag):
    """The quick mode's build: weft's own crates get `flag` through a workspace wrapper
    (one per phase, so cargo keeps the phases' artifacts apart); the dependencies are the
    dev profile's, already built by `cargo test`. Returns the executable's path."""
    wrapper = os.path.join(QUICK_DIR, phase, "rustc")
    os.makedirs(os.path.dirname(wrapper), exist_ok=True)
    with open(wrapper, "w") as f:
        f.write(f"""#!/bin/sh
# RUSTC_WORKSPACE_WRAPPER of bench/pgo.py --quick ({phase}): compiling one of weft's
# crates, add the profile-guided flag; probes and build scripts run rustc unchanged.
rustc="$1"; shift
case " $* " in
  *" --crate-name build_script_build "*|*" --crate-name ___ "*) exec "$rustc" "$@" ;;
  *" --crate-name "*) exec "$rustc" "$@" '{flag}' ;;
  *) exec "$rustc" "$@" ;;
esac
""")
    os.chmod(wrapper, 0o755)
    print(f"pgo: cargo build -p weft (dev profile, opt-level 1 for weft's crates, {flag} on them)",
          file=sys.stderr, flush=True)
    started = time.time()
    executable = cargo_build_weft(QUICK_BUILD, f"pgo: the {phase} build",
                                  env=dict(os.environ, RUSTC_WORKSPACE_WRAPPER=wrapper))
    copy = os.path.join(QUICK_DIR, phase, "weft")
    shutil.copy2(executable, copy)
    print(f"pgo: {phase} build took {time.time() - started:.0f}s", file=sys.stderr, flush=True)
    return copy


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


def h2load(stack, seconds, grpc=False):
    """h2c requests, or gRPC unary calls (a 5-byte message, content-type
    application/grpc, te: trailers), over 32 connections × 10 streams."""
    args = ["h2load", "-c32", "-m10", "-t1", "-D", str(seconds), "-H", f":authority: {stack.host}"]
    url = f"http://127.0.0.1:{stack.port}/"
    if grpc:
        body = os.path.join(stack.tmp, "grpc-call.bin")
        with open(body, "wb") as f:
            f.write(b"\x00\x00\x00\x00\x05hello")
        args += ["-d", body, "-H", "content-type: application/grpc", "-H", "te: trailers"]
        url += "weft.bench.Echo/Call"
    out = subprocess.run(args + [url], capture_output=True, text=True).stdout
    ok = re.search(r"status codes: (\d+) 2xx", out)
    if not ok or int(ok.group(1)) == 0:
        raise SystemExit(f"pgo: {'gRPC' if grpc else 'h2c'} training through {stack.name} failed:\n{out}")
    return int(ok.group(1))


def start_demo_app(tmp, binary):
    """weft's demo app, the gRPC load's upstream (it answers HTTP/1.1 and h2c). Its own
    profile goes to a directory that is not merged: it is an application, not the mesh."""
    port = free_port()
    app = subprocess.Popen([binary, "demo-app", "--name", "upstream", "--listen", f"127.0.0.1:{port}"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                           env=dict(os.environ, LLVM_PROFILE_FILE=os.path.join(tmp, "app-%p.profraw")))
    wait_port(port, what="the demo app")
    return app, port


def train(binary, seconds, app_binary=None):
    """Runs the training loads through `binary`; the profiles land where its
    instrumentation says. The demo app (the gRPC upstream) runs `app_binary`, or
    `binary` with its profile sent elsewhere."""
    bench.WEFT = binary
    tmp = tempfile.mkdtemp(prefix="weft-pgo-")
    nginx, upstream = start_nginx(tmp)
    app, app_port = start_demo_app(tmp, app_binary or binary)
    loads = [
        ("hop", lambda: weft_stack(tmp, "pgo-hop", upstream, pair=False), ["http1"]),
        ("pair", lambda: weft_stack(tmp, "pgo-pair", upstream, pair=True), ["http1", "h2c"]),
        ("grpc-pair", lambda: weft_stack(tmp, "pgo-grpc", app_port, pair=True, protocol="grpc"), ["grpc"]),
        ("mtls-pair", lambda: weft_mtls_stack(tmp, "pgo-mtls", upstream), ["http1", "h2c"]),
        ("mtls-tcp-pair", lambda: weft_mtls_stack(tmp, "pgo-mtls-tcp", upstream, tcp=True), ["close"]),
    ]
    try:
        for name, make, kinds in loads:
            stack = make()
            try:
                for kind in kinds:
                    if kind in ("h2c", "grpc"):
                        done = h2load(stack, seconds, grpc=kind == "grpc")
                    else:
                        done = wrk(stack, seconds, close=kind == "close")
                    print(f"pgo: trained {name} {kind}: {done} requests", file=sys.stderr, flush=True)
            finally:
                stop_cleanly(stack)
    finally:
        stop_nginx(nginx)
        app.kill()
        app.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def bolt_tool(name):
    """BOLT's tools: any LLVM version's will do (BOLT reads machine code, not rustc's IR)."""
    for candidate in [f"{name}-22", name, *sorted(glob.glob(f"/usr/bin/{name}-*"), reverse=True)]:
        if shutil.which(candidate):
            return shutil.which(candidate)
    raise SystemExit(f"pgo: {name} is not installed: apt-get install bolt-22")


def bolt(binary, seconds):
    """BOLT over the profile-guided binary: instrumented by llvm-bolt, trained on the same
    loads, then its functions and blocks laid out by the profile. Needs the binary linked
    with --emit-relocs (cargo_build's final build is). Returns the optimised binary."""
    llvm_bolt, merge_fdata = bolt_tool("llvm-bolt"), bolt_tool("merge-fdata")
    work = os.path.join(FINAL_DIR, "bolt")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.join(work, "profiles"))
    instrumented = os.path.join(work, "weft-instrumented")
    subprocess.run([llvm_bolt, binary, "-instrument", "-o", instrumented,
                    f"--instrumentation-file={os.path.join(work, 'profiles', 'weft.fdata')}",
                    "--instrumentation-file-append-pid"], check=True, stdout=subprocess.DEVNULL)
    train(instrumented, seconds, app_binary=binary)
    fdata = glob.glob(os.path.join(work, "profiles", "*.fdata"))
    if not fdata:
        raise SystemExit("pgo: BOLT's training wrote no profile (did every process stop on SIGTERM?)")
    merged = os.path.join(work, "merged.fdata")
    with open(merged, "w") as out:
        subprocess.run([merge_fdata, *fdata], check=True, stdout=out)
    optimised = os.path.join(FINAL_DIR, "release", "weft-bolt")
    subprocess.run([llvm_bolt, binary, "-o", optimised, f"-data={merged}", "-reorder-blocks=ext-tsp",
                    "-reorder-functions=cdsort", "-split-functions", "-split-all-cold", "-split-eh", "-icf=1",
                    "-use-gnu-stack", "-dyno-stats"], check=True)
    print(f"pgo: BOLT merged {len(fdata)} profiles into {optimised}", file=sys.stderr, flush=True)
    return optimised


def merge(profdata, profiles, merged):
    raw = glob.glob(os.path.join(profiles, "*.profraw"))
    if not raw:
        raise SystemExit("pgo: the training wrote no profile (did every process stop on SIGTERM?)")
    subprocess.run([profdata, "merge", "-o", merged, *raw], check=True)
    print(f"pgo: merged {len(raw)} profiles with {profdata}", file=sys.stderr, flush=True)


def check_coverage(profdata, merged):
    """The profile must have counted the proxy's own code: a training load that silently
    stopped reaching weft (a broken stack, a renamed crate) would leave a profile that
    optimises nothing."""
    out = subprocess.run([profdata, "show", "--all-functions", "--counts", merged], capture_output=True, text=True,
                         check=True).stdout
    counted, name = 0, ""
    for line in out.splitlines():
        if line.startswith("  ") and not line.startswith("   ") and line.endswith(":"):
            name = line.strip()
        elif line.strip().startswith("Block counts: [") and PROXY_CRATE in name:
            counts = line.split("[", 1)[1].rstrip("]").split(",")
            if any(c.strip() not in ("", "0") for c in counts):
                counted += 1
    if counted == 0:
        raise SystemExit(f"pgo: the merged profile counted no function of {PROXY_CRATE}")
    print(f"pgo: the profile counted {counted} functions of {PROXY_CRATE}", file=sys.stderr, flush=True)


def smoke(binary):
    """One second of HTTP/1.1 through a hop of the final binary."""
    bench.WEFT = binary
    tmp = tempfile.mkdtemp(prefix="weft-pgo-smoke-")
    nginx, upstream = start_nginx(tmp)
    stack = weft_stack(tmp, "pgo-smoke", upstream, pair=False)
    try:
        print(f"pgo: the final binary carried {wrk(stack, 1)} requests through a hop", file=sys.stderr, flush=True)
    finally:
        stack.stop()
        stop_nginx(nginx)
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5, help="seconds of each training load")
    parser.add_argument("--quick", action="store_true",
                        help="CI's check of the pipeline: weft's crates only, a second per load")
    parser.add_argument("--reuse-profile", action="store_true",
                        help="only the final build, from the profile the last run merged")
    parser.add_argument("--bolt", action="store_true",
                        help="then BOLT over the final binary: target/pgo/release/weft-bolt")
    args = parser.parse_args()
    for tool in ["nginx", "wrk", "h2load", "cargo", "rustc"]:
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed; see bench/README.md for the one-time setup")
    if args.quick:
        profdata = llvm_profdata()
        profiles = os.path.join(QUICK_DIR, "profiles")
        merged = os.path.join(QUICK_DIR, "merged.profdata")
        instrumented = quick_build("generate", f"-Cprofile-generate={profiles}")
        shutil.rmtree(profiles, ignore_errors=True)
        os.makedirs(profiles)
        train(instrumented, 1)
        merge(profdata, profiles, merged)
        check_coverage(profdata, merged)
        final = quick_build("use", f"-Cprofile-use={merged}")
        smoke(final)
        print(final)
        return
    merged = os.path.join(GENERATE_DIR, "merged.profdata")
    if args.reuse_profile:
        if not os.path.exists(merged):
            raise SystemExit(f"pgo: no merged profile at {merged}; run bench/pgo.py without --reuse-profile")
        final = cargo_build(FINAL_DIR, f"-Cprofile-use={merged} {EMIT_RELOCS}")
        print(bolt(final, args.seconds) if args.bolt else final)
        return
    profdata = llvm_profdata()
    profiles = os.path.join(GENERATE_DIR, "profiles")
    instrumented = cargo_build(GENERATE_DIR, f"-Cprofile-generate={profiles}")
    # Build scripts and proc macros are instrumented too (RUSTFLAGS reaches them) and ran
    # during the build: their profiles are not the proxy's.
    shutil.rmtree(profiles, ignore_errors=True)
    os.makedirs(profiles)
    train(instrumented, args.seconds)
    merge(profdata, profiles, merged)
    check_coverage(profdata, merged)
    final = cargo_build(FINAL_DIR, f"-Cprofile-use={merged} {EMIT_RELOCS}")
    print(bolt(final, args.seconds) if args.bolt else final)


if __name__ == "__main__":
    main()
