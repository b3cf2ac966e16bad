#!/usr/bin/env bash
# Issue 20's queue of 100,000 jobs: addJob's accept rate and tangod's memory
# per queued job as the queue grows (a real tangod over HTTP, sandbox
# backend, SQLite store), then add_job and dispatch cost per job with 1k,
# 10k and 100k queued (the engine in process). Prints two tables; the
# targets are reported, not asserted. Needs root (the sandbox backend).
# About a minute once built.
#   usage: bench/queue_scale.sh [JOBS] [CONNECTIONS]   (100000 8)
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${1:-100000}
conns=${2:-8}
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
musl=x86_64-unknown-linux-musl

cargo build --release -q -p autodriver --target "$musl"
cargo build --release -q -p tango-server --bin tangod --example queue_scale_http
cargo build --release -q -p tango-core --example queue_scale

echo "== tangod over HTTP: $jobs addJobs from $conns connections =="
"$target_dir/release/examples/queue_scale_http" --tangod "$target_dir/release/tangod" \
  --autodriver "$target_dir/$musl/release/autodriver" --jobs "$jobs" --conns "$conns"
echo
echo "== the engine in process: add_job and dispatch per job =="
"$target_dir/release/examples/queue_scale" 1000 10000 100000
