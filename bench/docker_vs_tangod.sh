#!/usr/bin/env bash
# Issue 5's comparison, in one run on one machine:
#  (a) a bare loop of `docker run --rm IMAGE true` (bench/docker_bare.sh),
#      sequential and at concurrency C;
#  (b) tangod with the docker backend running N trivial jobs
#      (examples/jobs/hello) through `tango bench`, at concurrency 1 and C,
#      with fresh containers (reuse_vms = false) and with reuse.
# Needs root, a running dockerd and the test image
# (scripts/build-docker-test-image.sh).
#   usage: bench/docker_vs_tangod.sh [N] [C] [IMAGE]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-100}
concurrency=${2:-8}
image=${3:-tango-test-bookworm}
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
musl=x86_64-unknown-linux-musl

cargo build --release -q -p autodriver --target "$musl"
cargo build --release -q -p tango-server -p tango-cli
tangod=$target_dir/release/tangod
tango=$target_dir/release/tango

echo "== (a) bare docker run --rm $image true"
bench/docker_bare.sh "$runs" "$concurrency" "$image"

work=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
for reuse in false true; do
  cat >"$work/tangod.toml" <<TOML
vmms = "docker"
[engine]
reuse_vms = $reuse
max_vms = $concurrency
TOML
  "$tangod" --listen 127.0.0.1:3979 --data-dir "$work/data-$reuse" --key bench \
    --config "$work/tangod.toml" --autodriver "$target_dir/$musl/release/autodriver" \
    >"$work/tangod-$reuse.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 100); do curl -sf http://127.0.0.1:3979/ >/dev/null && break; sleep 0.1; done
  export TANGO_URL=http://127.0.0.1:3979 TANGO_KEY=bench
  "$tango" run examples/jobs/hello --image "$image" >/dev/null # warm up
  for c in 1 "$concurrency"; do
    echo "== (b) tangod docker backend, reuse_vms=$reuse, concurrency $c"
    "$tango" bench hello -n "$runs" -c "$c" --image "$image" --json |
      python3 -c 'import json,sys; r=json.load(sys.stdin); print("p50=%.1fms p95=%.1fms throughput=%.2f/s failures=%d" % (r["p50_ms"], r["p95_ms"], r["throughput_jobs_per_sec"], r["failures"]))'
  done
  kill "$pid"; wait "$pid" || true
done
