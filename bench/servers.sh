#!/usr/bin/env bash
# Issue 21's benchmark, in one run on one machine (sandbox backend, hello
# job of examples/jobs, release builds, one real PostgreSQL):
#   (a) one tangod on SQLite,
#   (b) one tangod on PostgreSQL,
#   (b') (b) with 16 runtime threads (TOKIO_WORKER_THREADS) instead of
#       one per core: a store call blocks the runtime thread that makes
#       it, so with two threads at most two calls (two addJobs) are in
#       flight, each waiting on PostgreSQL;
#   (c) three tangod on that PostgreSQL (own data dir, VM prefix and
#       [server] name each), `tango bench` adding jobs to them in turn.
# Each setup has two phases, each on fresh servers and a fresh store:
#   addJob rate: `tango bench --add-only`, N addJobs, C requests at once,
#     against servers with `max_vms = 0`, so nothing runs: on this machine's
#     two cores, running the jobs would take the CPU the servers need to
#     accept them, and three servers would run three times the jobs at once.
#     This is the rate of the accepting path alone (HTTP, engine, store).
#   job latency: `tango bench`, M hello jobs, L in flight at once (each
#     client adds a job and waits for its callback), after a warm-up of 2L
#     jobs; latency is from sending addJob to the callback arriving (tangod
#     stores the output before it calls back, so the output was pollable).
# The setups take turns for ROUNDS rounds, so that a load elsewhere weighs
# on all alike; the best round of each counts. Everything shares two cores
# with the client and PostgreSQL: three servers cannot have more CPU than
# one, so (c)/(b) shows whether one server leaves the machine idle (waiting
# on its store), not how far servers on their own machines would scale.
# PostgreSQL runs with its defaults (a commit waits for its WAL flush);
# SQLite's store uses WAL with synchronous=NORMAL (no flush per commit).
# PG_OPTIONS adds server options, e.g. PG_OPTIONS="-c synchronous_commit=off".
# Needs root (the sandbox backend) and Debian's postgresql package.
#   usage: bench/servers.sh [N=2000] [C=16] [M=300] [L=4] [ROUNDS=2]
set -euo pipefail
cd "$(dirname "$0")/.."
adds=${1:-2000}
add_conc=${2:-16}
runs=${3:-300}
run_conc=${4:-4}
rounds=${5:-2}
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
musl=x86_64-unknown-linux-musl
image=host
key=bench
first_port=3991

[ "$(id -u)" = 0 ] || { echo "run as root: the sandbox backend needs it" >&2; exit 1; }
pg_bin=${TANGO_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
[ -x "$pg_bin/initdb" ] || {
  echo "no PostgreSQL found: apt-get install postgresql (or set TANGO_PG_BIN to the directory of initdb)" >&2
  exit 1
}

cargo build --release -q -p autodriver --target "$musl"
cargo build --release -q -p tango-server -p tango-cli
tangod=$target_dir/release/tangod
tango=$target_dir/release/tango

work=$(mktemp -d)
chmod 755 "$work"
pids=()
pg_data=$work/pg/data
cleanup() {
  stop_servers
  [ -f "$pg_data/postmaster.pid" ] && runuser -u postgres -- "$pg_bin/pg_ctl" -D "$pg_data" -m immediate -w stop >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT

# PostgreSQL as the postgres user (it refuses root) on a free loopback port.
mkdir -p "$work/pg" && chown postgres: "$work/pg"
runuser -u postgres -- "$pg_bin/initdb" -D "$pg_data" -A trust -U postgres -E UTF8 --no-locale --no-sync >/dev/null
pg_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
runuser -u postgres -- "$pg_bin/pg_ctl" -D "$pg_data" -w -l "$work/pg/log" \
  -o "-k $work/pg -p $pg_port -h 127.0.0.1 ${PG_OPTIONS:-}" start >/dev/null
echo "$("$pg_bin/postgres" --version) on 127.0.0.1:$pg_port, options: ${PG_OPTIONS:-(defaults)}"
export PGOPTIONS="-c client_min_messages=warning"
psql() { "$pg_bin/psql" -h 127.0.0.1 -p "$pg_port" -U postgres -XAtq -v ON_ERROR_STOP=1 "$@"; }

stop_servers() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  pids=()
}

# Starts COUNT servers on STORE (sqlite, or a new database of that name)
# with MAX_VMS each; sets $urls to their URLs, comma-separated. A server
# that does not answer: its log's end on stderr, status 1.
urls=
start_servers() {
  local run=$1 count=$2 store=$3 max_vms=$4 list=() i
  if [ "$store" != sqlite ]; then
    psql -d postgres -c "DROP DATABASE IF EXISTS $store" -c "CREATE DATABASE $store"
    store="postgres://postgres@127.0.0.1:$pg_port/$store"
  fi
  for i in $(seq 1 "$count"); do
    local name=$run-$i port=$((first_port + i - 1))
    rm -rf "$work/data-$name"
    printf 'store = "%s"\n[engine]\nprefix = "bench%s"\nmax_vms = %s\nshutdown_grace_secs = 1\n[server]\nname = "%s"\n' \
      "$store" "$i" "$max_vms" "$name" >"$work/$name.toml"
    env ${workers:+TOKIO_WORKER_THREADS=$workers} "$tangod" --listen "127.0.0.1:$port" --data-dir "$work/data-$name" --key "$key" --vmms sandbox \
      --config "$work/$name.toml" --autodriver "$target_dir/$musl/release/autodriver" \
      >"$work/tangod-$name.log" 2>&1 &
    pids+=($!)
    local up=
    for _ in $(seq 1 100); do
      curl -sf "http://127.0.0.1:$port/" >/dev/null && { up=1; break; }
      kill -0 "${pids[-1]}" 2>/dev/null || break
      sleep 0.1
    done
    if [ -z "$up" ]; then
      echo "tangod $name did not start: $(grep -m1 -i error "$work/tangod-$name.log" || tail -1 "$work/tangod-$name.log")" >&2
      return 1
    fi
    list+=("http://127.0.0.1:$port")
  done
  urls=$(IFS=,; echo "${list[*]}")
}

# CPU seconds used so far by the tangod servers and by PostgreSQL (the
# postmaster, its live backends and those that exited): "TANGOD PG".
cpu_secs() {
  python3 - "$(head -1 "$pg_data/postmaster.pid")" "${pids[@]}" <<'EOF'
import os, sys
def ticks(pid, with_children=False):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime, stime (and cutime, cstime): fields 14 to 17 of proc(5).
    return sum(int(x) for x in fields[11:15 if with_children else 13])
def parent(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[1]
postmaster, servers = sys.argv[1], sys.argv[2:]
pg = ticks(postmaster, True)
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        if parent(pid) == postmaster:
            pg += ticks(pid)
    except (OSError, IndexError):
        pass
hz = os.sysconf("SC_CLK_TCK")
print(sum(ticks(p) for p in servers) / hz, pg / hz)
EOF
}

# CPU seconds of this script's finished children in the file of `times`
# (run in this shell, not in a subshell, whose children they are not).
child_secs() {
  tail -1 "$1" | python3 -c 'import re,sys; print(sum(int(m)*60+float(s) for m,s in re.findall(r"(\d+)m([\d.]+)s", sys.stdin.read())))'
}

# Reads one `tango bench --json` summary; prints the fields asked for.
field() { python3 -c 'import json,sys; r=json.load(sys.stdin); print(" ".join("%.1f" % eval(e, {}, {"r": r}) for e in sys.argv[1:]))' "$@"; }

# One setup: NAME SERVERS STORE [WORKERS: tangod's runtime threads, by
# default one per core]. Appends "addjob/s addjob-p50 tangod-cpu-us
# pg-cpu-us client-cpu-us p50 p95 jobs/s" to $work/results-NAME, or "-"
# when its servers did not start.
measure() {
  local name=$1 count=$2 store=$3 out
  workers=${4:-}
  if ! start_servers "$name" "$count" "$store" 0; then
    stop_servers; echo "-" >>"$work/results-$name"; return
  fi
  local before after client_before client_after rate
  before=$(cpu_secs)
  times >"$work/times-before"
  out=$("$tango" --url "$urls" --key "$key" bench hello --image "$image" --add-only \
    -n "$adds" -c "$add_conc" --json) || { echo "$out" >&2; exit 1; }
  times >"$work/times-after"
  after=$(cpu_secs)
  client_before=$(child_secs "$work/times-before")
  client_after=$(child_secs "$work/times-after")
  # Per addJob, the CPU of the servers, of PostgreSQL and of the client,
  # in microseconds.
  rate=$(echo "$out" | field 'r["addjob_per_sec"]' 'r["addjob_ms"]["p50_ms"]' \
    "(${after% *} - ${before% *}) * 1e6 / r['added']" "(${after#* } - ${before#* }) * 1e6 / r['added']" \
    "($client_after - $client_before) * 1e6 / r['added']")
  stop_servers
  # A fresh store: the queued jobs of the addJob phase stay out of it.
  [ "$store" = sqlite ] || store=${store}_run
  start_servers "$name" "$count" "$store" "$((run_conc * 2))"
  "$tango" --url "$urls" --key "$key" bench hello --image "$image" \
    -n $((run_conc * 2)) -c "$run_conc" --json >/dev/null
  out=$("$tango" --url "$urls" --key "$key" bench hello --image "$image" \
    -n "$runs" -c "$run_conc" --json) || { echo "$out" >&2; exit 1; }
  stop_servers
  echo "$rate $(echo "$out" | field 'r["p50_ms"]' 'r["p95_ms"]' 'r["throughput_jobs_per_sec"]')" >>"$work/results-$name"
  echo "  $name: addJob/s, addJob p50 ms, CPU µs per addJob of tangod, PostgreSQL, client | job p50 ms, p95 ms, jobs/s: $(tail -1 "$work/results-$name")"
}

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg) (other work on this machine takes its share of the cores)"
for round in $(seq 1 "$rounds"); do
  echo "== round $round"
  measure a 1 sqlite
  measure b 1 bench_b
  measure b16 1 bench_b16 16
  measure c 3 bench_c
done

echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$work" "$adds" "$add_conc" "$runs" "$run_conc" <<'EOF'
import sys
work, adds, add_conc, runs, run_conc = sys.argv[1:]
names = {
    "a": "(a) one tangod, SQLite",
    "b": "(b) one tangod, PostgreSQL",
    "b16": "(b') as (b), 16 runtime threads",
    "c": "(c) three tangod, PostgreSQL",
}
best = {}
for key in names:
    rows = [l.split() for l in open(f"{work}/results-{key}") if l.strip() != "-"]
    rows = [[float(x) for x in r] for r in rows]
    if rows:
        # Best round: highest addJob rate; lowest job p50 (its p95 and
        # jobs/s from that same round).
        add = max(rows, key=lambda r: r[0])
        run = min(rows, key=lambda r: r[5])
        best[key] = add[:5] + run[5:]
print(f"\n{adds} addJobs {add_conc} at once (servers run nothing); {runs} hello jobs {run_conc} in flight; best of the rounds")
print("cores busy: the addJob rate times the CPU per addJob of servers, PostgreSQL and client (this machine has 2)")
print("| setup | addJob/s | addJob answer p50 | CPU per addJob: tangod, PostgreSQL, client | cores busy | job latency p50 | p95 | jobs/s |")
print("|---|---|---|---|---|---|---|---|")
for key, label in names.items():
    if key in best:
        r = best[key]
        busy = r[0] * (r[2] + r[3] + r[4]) / 1e6
        print(f"| {label} | {r[0]:.0f} | {r[1]:.1f} ms | {r[2]:.0f}, {r[3]:.0f}, {r[4]:.0f} µs | {busy:.2f} | {r[5]:.1f} ms | {r[6]:.1f} ms | {r[7]:.1f} |")
    else:
        print(f"| {label} | did not start (see above) | | | | | | |")
if "c" in best:
    for one in ("b", "a"):
        if one in best:
            print(f"addJob rate c/{one}: {best['c'][0] / best[one][0]:.2f}x (target: (c) at least 2x one server's)")
    if "a" in best:
        print(f"job p50 c/a: {best['c'][5] / best['a'][5]:.2f}x (target: at most 2x SQLite's)")
for one in ("b", "b16"):
    if one in best and "a" in best:
        print(f"addJob rate {one}/a: {best[one][0] / best['a'][0]:.2f}x; job p50 {one}/a: {best[one][5] / best['a'][5]:.2f}x")
EOF
