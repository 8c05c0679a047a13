#!/usr/bin/env bash
# Runs weft's libFuzzer targets (fuzz/, cargo-fuzz on nightly) and prints, per target,
# the inputs executed, the coverage reached and whether it crashed.
#
#   bench/fuzz.sh                 every target for 1,000,000 inputs
#   bench/fuzz.sh --runs N        every target for N inputs
#   bench/fuzz.sh --smoke         every target for 5 seconds (what CI runs)
#   bench/fuzz.sh [...] TARGET..  only the named targets
#
# Each target starts from its committed seeds (fuzz/seeds/TARGET: real documents and
# requests from the tests, and every input that ever crashed it) and grows a working
# corpus in fuzz/corpus/TARGET (not committed). A crash leaves its input in
# fuzz/artifacts/TARGET; copy it into fuzz/seeds/TARGET and add a unit test with it.
# Exits non-zero if any target crashed.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=1000000
limit=()
build=(-O)
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs="$2"; shift 2 ;;
    # Unoptimized: the build is most of a smoke's time, and 5 s find what they find.
    --smoke) runs=""; limit=(-max_total_time=5); build=(--dev); shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) targets+=("$1"); shift ;;
  esac
done
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz on a nightly toolchain is needed: rustup toolchain install nightly && cargo install cargo-fuzz --locked" >&2
  exit 2
fi
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi
[ -n "$runs" ] && limit=(-runs="$runs")

if ! cargo +nightly fuzz build "${build[@]}" >/tmp/weft-fuzz-build.log 2>&1; then
  cat /tmp/weft-fuzz-build.log >&2
  exit 2
fi
printf '%-20s %12s %10s %8s %8s %s\n' target executions exec/s cov features result
failed=0
for target in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$target"
  log=$(mktemp)
  if cargo +nightly fuzz run "${build[@]}" "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
      "${limit[@]}" -print_final_stats=1 -rss_limit_mb=2048 >"$log" 2>&1; then
    result=ok
  else
    result="CRASH (see fuzz/artifacts/$target; log $log)"
    failed=1
  fi
  executions=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | cut -d' ' -f2)
  features=$(grep -oE 'ft: [0-9]+' "$log" | tail -1 | cut -d' ' -f2)
  printf '%-20s %12s %10s %8s %8s %s\n' "$target" "${executions:-?}" "${speed:-?}" "${cov:-?}" "${features:-?}" "$result"
  [ "$result" = ok ] && rm -f "$log"
done
exit $failed
