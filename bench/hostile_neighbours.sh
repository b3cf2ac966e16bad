#!/usr/bin/env bash
# Issue 7's neighbour check: the latency of normal jobs (examples/jobs/hello,
# 5 at a time) on an idle tangod, then while hostile example jobs run beside
# them, measured in one run on one machine. Prints both p50s and their ratio
# (target: at most 2).
# Needs root (the sandbox backend); for docker, a running dockerd and the
# test image (scripts/build-docker-test-image.sh).
#   usage: bench/hostile_neighbours.sh [VMMS] [IMAGE] [HOSTILE JOB...]
#   default: sandbox host, and every hostile job of examples/jobs; a job
#   with a / in its name is a directory (bench/jobs/sleeper, nine times,
#   is a benign burst to compare with)
#   RUNS (25), CONCURRENCY (5): normal jobs measured, and how many at once
#   CORES: the jobs' CPU limit (default: the server's)
#   SETTLE_SECS (2): wait between starting the hostile jobs and measuring
#   WARM_SECS (2): wait after the warm-up jobs, before the idle measure
#   PREALLOC (0): if set, the image's pool is preallocated to this many VMs
#     (`[[pools]]` in the config) and the bench waits until they are all
#     free, before the warm-up; a pool sized for the burst (hostile and
#     normal jobs at once) takes the making of VMs off the normal jobs' path
#   PORT (3981): tangod's port, also naming its VM prefix (hn<PORT>), so
#     that two runs side by side do not collide
#   TANGOD: the tangod binary to measure (default: the release build), for
#     A/B runs of two builds in one sitting
set -euo pipefail
cd "$(dirname "$0")/.."
vmms=${1:-sandbox}
image=${2:-host}
shift $(($# > 2 ? 2 : $#))
hostile=("$@")
if [ ${#hostile[@]} -eq 0 ]; then
  hostile=(endless output_flood fork_bomb memory_hog daemon disk_filler network_probe snoop kill_autodriver)
fi
runs=${RUNS:-25}
concurrency=${CONCURRENCY:-5}
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
musl=x86_64-unknown-linux-musl

cargo build --release -q -p autodriver --target "$musl"
cargo build --release -q -p tango-server -p tango-cli
tangod=${TANGOD:-$target_dir/release/tangod}
tango=$target_dir/release/tango

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  kill "$server" 2>/dev/null || true
  wait 2>/dev/null || true
  if ! rm -rf "$work" 2>/dev/null; then
    echo "tangod left files in $work; its log:" >&2
    tail -20 "$work/tangod.log" >&2
  fi
}
trap cleanup EXIT
cores=${CORES:+cores = $CORES}
cat >"$work/tangod.toml" <<TOML
vmms = "$vmms"
[engine]
max_vms = 32
prefix = "hn${PORT:-3981}"
[sandbox]
memory_mb = 256
max_pids = 64
$cores
[docker]
memory_mb = 256
max_pids = 64
$cores
TOML
if [ "${PREALLOC:-0}" -gt 0 ]; then
  printf '[[pools]]\nimage = "%s"\nsize = %d\n' "$image" "$PREALLOC" >>"$work/tangod.toml"
fi
port=${PORT:-3981}
"$tangod" --listen 127.0.0.1:$port --data-dir "$work/data" --key bench \
  --config "$work/tangod.toml" --autodriver "$target_dir/$musl/release/autodriver" \
  >"$work/tangod.log" 2>&1 &
server=$!
# A start first removes what an earlier run left (a docker run's containers
# can take seconds).
for _ in $(seq 1 600); do curl -sf http://127.0.0.1:$port/ >/dev/null && break; sleep 0.1; done
curl -sf http://127.0.0.1:$port/ >/dev/null || { echo "tangod did not start:" >&2; tail -20 "$work/tangod.log" >&2; exit 1; }
export TANGO_URL=http://127.0.0.1:$port TANGO_KEY=bench

p50() {
  "$tango" bench hello -n "$runs" -c "$concurrency" --image "$image" --json |
    python3 -c 'import json,sys; r=json.load(sys.stdin); assert r["failures"] == 0, r; print("%.1f" % r["p50_ms"])'
}
if [ "${PREALLOC:-0}" -gt 0 ]; then
  free_vms() {
    "$tango" pool "$image" --json |
      python3 -c 'import json,sys; p=json.load(sys.stdin)["pools"]; print(len(next(iter(p.values()), {}).get("free", [])))'
  }
  for _ in $(seq 1 600); do
    [ "$(free_vms)" -ge "$PREALLOC" ] && break
    sleep 0.1
  done
  echo "pool: $(free_vms) free VMs (prealloc $PREALLOC)"
fi
# Warm up: as many VMs as the normal jobs use at once, so that both
# measures see a warm pool (a docker container takes 0.1-0.2 s to start);
# the VMs made for the warm-up's jobs finish starting meanwhile.
"$tango" bench hello -n $((2 * concurrency)) -c "$concurrency" --image "$image" >/dev/null
sleep "${WARM_SECS:-2}"
idle=$(p50)
echo "idle:   p50 ${idle} ms"

# The hostile jobs get a long limit so that they all still run while the
# normal jobs are measured.
for i in "${!hostile[@]}"; do
  name=${hostile[$i]}
  case $name in */*) job=$name ;; *) job=examples/jobs/$name ;; esac
  "$tango" run "$job" --image "$image" --timeout 60 --max-kb 64 \
    >"$work/hostile-$i.out" 2>&1 &
  pids+=($!)
done
sleep "${SETTLE_SECS:-2}"
beside=$(p50)
echo "beside ${hostile[*]}: p50 ${beside} ms"
python3 -c "print('ratio: %.2f (target: at most 2)' % ($beside / $idle))"
