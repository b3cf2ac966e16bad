#!/usr/bin/env bash
# One command on a fresh machine (as root): builds tango-rs, starts tangod on
# 127.0.0.1:3000 with the embedded sandbox backend, and runs
# examples/jobs/hello through it with the `tango` client.
#   TANGO_KEY       the key clients must send (default: a random one)
#   TANGO_DATA_DIR  the server's data dir (default: ./tango-data)
#   TANGO_LISTEN    address to listen on (default: 127.0.0.1:3000)
set -euo pipefail
cd "$(dirname "$0")/.."
musl=x86_64-unknown-linux-musl
target_dir=${CARGO_TARGET_DIR:-$PWD/target}

if [ "$(id -u)" != 0 ]; then
  echo "quickstart: the sandbox backend makes namespaces and cgroups: run this as root" >&2
  exit 1
fi
for tool in make python3; do
  command -v "$tool" >/dev/null || { apt-get update -qq && apt-get install -y -qq make python3 >/dev/null; }
done
if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx "$musl"; then
  rustup target add "$musl"
fi
cargo build --release -p autodriver --target "$musl"
cargo build --release -p tango-server -p tango-cli

key=${TANGO_KEY:-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')}
data=${TANGO_DATA_DIR:-$PWD/tango-data}
listen=${TANGO_LISTEN:-127.0.0.1:3000}
mkdir -p "$data"
"$target_dir/release/tangod" --listen "$listen" --data-dir "$data" --key "$key" \
  --autodriver "$target_dir/$musl/release/autodriver" >"$data/tangod.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
  curl -sf "http://$listen/" >/dev/null 2>&1 && break
  kill -0 "$pid" 2>/dev/null || { echo "tangod failed to start:"; cat "$data/tangod.log"; exit 1; }
  sleep 0.1
done

export TANGO_URL="http://$listen" TANGO_KEY="$key"
"$target_dir/release/tango" run examples/jobs/hello --image host --timeout 30

cat <<INFO

tangod is running: pid $pid, http://$listen, key $key, data $data
  log:      $data/tangod.log
  a job:    TANGO_URL=http://$listen TANGO_KEY=$key $target_dir/release/tango run examples/jobs/hello --image host
  stop:     kill $pid
INFO
