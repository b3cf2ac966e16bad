#!/usr/bin/env bash
# Issue 19's benchmark, in one run on one machine:
#  (a) hello jobs (examples/jobs/hello) at concurrency C through tangod
#      against the default Docker engine alone;
#  (b) the same against three engines: the default one and two more
#      (scripts/docker-engines.sh, each dockerd in its own network
#      namespace) as [[docker.hosts]]. They share this machine's cores, so
#      the ratio (b)/(a) is the cost of placement and health checks
#      (target: at least 0.9); and a fleet of the default engine alone
#      ([[docker.hosts]] with one host), the fleet's cost without the
#      extra daemons;
#  (c) the time to move the test image to a new host: `docker save |
#      docker load` by hand, and tangod's own streaming (a job whose only
#      host with the image is drained, so it is streamed first).
# Needs root, a running dockerd (the extra engines use unix sockets) and the
# test image (scripts/build-docker-test-image.sh).
#   usage: bench/docker_hosts.sh [N] [C] [IMAGE] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-1000}
concurrency=${2:-16}
image=${3:-tango-test-bookworm}
rounds=${4:-2}
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
musl=x86_64-unknown-linux-musl
engines=(tango-e2 tango-e3)
fresh=tango-e4
port=3981
url=http://127.0.0.1:$port

cargo build --release -q -p autodriver --target "$musl"
cargo build --release -q -p tango-server -p tango-cli
tangod=$target_dir/release/tangod
tango=$target_dir/release/tango
export TANGO_URL=$url TANGO_KEY=bench

work=$(mktemp -d)
pid=
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  scripts/docker-engines.sh stop "${engines[@]}" "$fresh" || true
  rm -rf "$work"
}
trap cleanup EXIT

# Starts tangod with the config $1 (a file); fails if it does not answer.
start_tangod() {
  "$tangod" --listen "127.0.0.1:$port" --data-dir "$work/data-$2" --key bench \
    --config "$1" --autodriver "$target_dir/$musl/release/autodriver" \
    >"$work/tangod-$2.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 100); do curl -sf "$url/" >/dev/null && return 0; kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  echo "tangod did not start ($2); its log ends:" >&2
  tail -5 "$work/tangod-$2.log" >&2
  pid=
  return 1
}

stop_tangod() { kill "$pid"; wait "$pid" || true; pid=; }

# Prints the jobs/s of N hello jobs at concurrency C, once a warm-up batch
# has filled the pools: how many containers a short run starts depends on
# how fast the first ones come up, and starting them would weigh more than
# the jobs (200 jobs started 9 containers on one engine, 16 on three).
throughput() {
  "$tango" bench hello -n $((concurrency * 4)) -c "$concurrency" --image "$image" --json >/dev/null
  "$tango" bench hello -n "$runs" -c "$concurrency" --image "$image" --json |
    python3 -c 'import json,sys; r=json.load(sys.stdin); print("%.2f" % r["throughput_jobs_per_sec"]); sys.exit(1 if r["failures"] else 0)'
}

common_config="vmms = \"docker\"
[engine]
max_vms = $concurrency"

urls=()
for name in "${engines[@]}"; do urls+=("$(scripts/docker-engines.sh start "$name")"); done
echo "$common_config" >"$work/one.toml"
# A host of the fleet, per host a third of the total.
host() {
  printf '[[docker.hosts]]\nname = "%s"\nurl = "%s"\nmax_vms = %s\n' "$1" "$2" "$3"
}
per_host=$(((concurrency + 2) / 3))
{
  echo "$common_config"
  host local unix:///var/run/docker.sock "$per_host"
  host "${engines[0]}" "${urls[0]}" "$per_host"
  host "${engines[1]}" "${urls[1]}" "$per_host"
} >"$work/three.toml"
# The fleet's own cost apart from that of two more daemons: the fleet code
# over the default engine alone.
{ echo "$common_config"; host local unix:///var/run/docker.sock "$concurrency"; } >"$work/fleet1.toml"

# (a) and (b) take turns, so that a load elsewhere on the machine weighs on
# both alike; the best round of each counts.
best_one=0 best_fleet1=0 best_three=0
for round in $(seq 1 "$rounds"); do
  for setup in one fleet1 three; do
    start_tangod "$work/$setup.toml" "$setup-$round"
    jobs_per_sec=$(throughput)
    if [ "$setup" = three ]; then
      # Every host took part: its VM starts.
      curl -sf -H "Authorization: Bearer bench" "$url/v2/hosts" |
        python3 -c 'import json,sys; print("  starts per host:", {h["name"]: h["vm_starts"] for h in json.load(sys.stdin)["hosts"]})'
    fi
    stop_tangod
    echo "(round $round) $setup: $jobs_per_sec jobs/s"
    best=best_$setup
    if python3 -c "import sys; sys.exit(0 if $jobs_per_sec > ${!best} else 1)"; then
      printf -v "$best" %s "$jobs_per_sec"
    fi
  done
done
echo "== one engine: $best_one jobs/s; a fleet of that one engine: $best_fleet1 jobs/s; three engines: $best_three jobs/s"
python3 -c "print('ratio three/one: %.2fx (target >= 0.9x); fleet of one/one: %.2fx' % ($best_three / $best_one, $best_fleet1 / $best_one))"

echo "== (c) moving $image to a new host"
fresh_url=$(scripts/docker-engines.sh start "$fresh")
size=$(docker image inspect --format '{{.Size}}' "$image")
docker -H "$fresh_url" rmi -f "$image" >/dev/null 2>&1 || true
start_ns=$(date +%s%N)
docker save "$image" | docker -H "$fresh_url" load >/dev/null
echo "docker save | docker load: $(( ($(date +%s%N) - start_ns) / 1000000 )) ms for $((size / 1000000)) MB"

docker -H "$fresh_url" rmi -f "$image" >/dev/null
{
  echo "$common_config"
  host local unix:///var/run/docker.sock "$concurrency"
  host "$fresh" "$fresh_url" "$concurrency"
} >"$work/stream.toml"
start_tangod "$work/stream.toml" stream
"$tango" run examples/jobs/hello --image "$image" >/dev/null # warm up on local
start_ns=$(date +%s%N)
"$tango" run examples/jobs/hello --image "$image" >/dev/null
plain_ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
# The only host with the image takes no new containers: the next job's
# container is made on the fresh host, after the image is streamed there.
curl -sf -X POST -H "Authorization: Bearer bench" "$url/v2/hosts/local/drain" >/dev/null
start_ns=$(date +%s%N)
"$tango" run examples/jobs/hello --image "$image" >/dev/null
stream_ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
docker -H "$fresh_url" image inspect "$image" >/dev/null ||
  { echo "the job ran but $image is not on $fresh: nothing was streamed" >&2; exit 1; }
stop_tangod
echo "tangod streaming: $((stream_ms - plain_ms)) ms (a job that streamed first: $stream_ms ms, one that did not: $plain_ms ms)"
