#!/usr/bin/env bash
# Runs the example mesh on loopback: two versions of `reviews`, each behind its own
# sidecar, and a client sidecar that splits traffic 90/10 between them (header
# `x-canary: true` pins v2). Ctrl-C stops everything.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"
cargo build --release --quiet --bin weft
weft="$root/target/release/weft"
config="$here/mesh.yaml"
logs="$(mktemp -d)"
pids=()
cleanup() {
  trap - INT TERM EXIT
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  echo "stopped; logs were in $logs"
}
trap cleanup INT TERM EXIT
start() { local name=$1; shift; "$weft" "$@" >"$logs/$name.log" 2>&1 & pids+=($!); }

start app-v1 demo-app --listen 127.0.0.1:19081 --name reviews-v1
start app-v2 demo-app --listen 127.0.0.1:19082 --name reviews-v2 --latency 20ms
start proxy-v1 proxy --config "$config" --service reviews-v1 --app-addr 127.0.0.1:19081 \
  --inbound-addr 127.0.0.1:19181 --outbound-addr 127.0.0.1:19101 --admin-addr 127.0.0.1:19201
start proxy-v2 proxy --config "$config" --service reviews-v2 --app-addr 127.0.0.1:19082 \
  --inbound-addr 127.0.0.1:19182 --outbound-addr 127.0.0.1:19102 --admin-addr 127.0.0.1:19202
start proxy-client proxy --config "$config" --service productpage \
  --outbound-addr 127.0.0.1:15001 --admin-addr 127.0.0.1:15000

for admin in 15000 19201 19202; do
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$admin/ready" >/dev/null && break
    sleep 0.1
  done
  curl -sf "http://127.0.0.1:$admin/ready" >/dev/null || { echo "a proxy did not become ready; see $logs"; exit 1; }
done

# A little steady traffic, so the metrics have something to show.
( while true; do curl -s -o /dev/null -H 'Host: reviews' http://127.0.0.1:15001/ || true; sleep 0.2; done ) &
pids+=($!)

cat <<MSG
weft example mesh is running (logs in $logs).

  curl -H 'Host: reviews' http://127.0.0.1:15001/           # 90% v1, 10% v2
  curl -H 'Host: reviews' -H 'x-canary: true' http://127.0.0.1:15001/   # always v2
  curl -x http://127.0.0.1:15001 http://reviews.default/    # as an HTTP proxy
  curl -H 'Host: nope' -i http://127.0.0.1:15001/           # 404 + weft-error: not an open proxy
  curl -s http://127.0.0.1:15000/metrics | grep weft_requests_total
  curl -s http://127.0.0.1:15000/config                     # the live configuration

Edit $config (e.g. weights 50/50) and the proxies apply it live;
a broken edit is refused and the old configuration keeps serving.
Ctrl-C stops everything.
MSG
wait
