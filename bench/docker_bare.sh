#!/usr/bin/env bash
# Baseline for the docker backend (issue 5): a bare loop of
# `docker run --rm IMAGE true` through the docker CLI (on purpose: this is
# what the backend is compared against), N runs sequentially and N runs at
# concurrency C. Prints p50/p90 latency and throughput of each.
#   usage: bench/docker_bare.sh [N] [C] [IMAGE]
#   DOCKER_RUN_ARGS  extra `docker run` options, e.g. "--network none"
#                    (default none: the literal command)
set -euo pipefail
runs=${1:-50}
concurrency=${2:-8}
image=${3:-tango-test-bookworm:latest}
docker image inspect "$image" >/dev/null

now_ns() { date +%s%N; }

# One timed run; prints its latency in ms.
one_run() {
  local start end
  start=$(now_ns)
  docker run --rm ${DOCKER_RUN_ARGS:-} "$1" true >/dev/null
  end=$(now_ns)
  echo $(((end - start) / 1000000))
}
export -f one_run now_ns

report() { # label wall_ms < latencies
  local label=$1 wall_ms=$2
  sort -n | awk -v label="$label" -v wall="$wall_ms" '
    { v[NR] = $1 }
    END {
      p50 = v[int((NR + 1) * 0.5)]; p90 = v[int((NR * 0.9) + 0.5)]
      printf "%-22s runs=%d p50=%dms p90=%dms throughput=%.2f/s\n",
        label, NR, p50, p90, NR / (wall / 1000)
    }'
}

one_run "$image" >/dev/null # warm the image cache

start=$(now_ns)
for _ in $(seq "$runs"); do one_run "$image"; done >/tmp/docker_bare_seq.$$
end=$(now_ns)
report "sequential" $(((end - start) / 1000000)) </tmp/docker_bare_seq.$$

start=$(now_ns)
seq "$runs" | xargs -P "$concurrency" -I{} bash -c 'one_run "$0"' "$image" >/tmp/docker_bare_par.$$
end=$(now_ns)
report "concurrency=$concurrency" $(((end - start) / 1000000)) </tmp/docker_bare_par.$$
rm -f /tmp/docker_bare_seq.$$ /tmp/docker_bare_par.$$
