#!/usr/bin/env bash
# Makes crates/tango-server/tests/fixtures/data-0c57581/: a data dir that the
# release before schema versions (commit 0c57581) wrote, for
# tests/upgrade.rs. As root (sandbox backend), with sqlite3 and curl:
#
#   git worktree add --detach /tmp/tango-0c57581 0c57581
#   (cd /tmp/tango-0c57581 && cargo build -p tango-server --bin tangod)
#   scripts/make-upgrade-fixture.sh /tmp/tango-0c57581/target/debug/tangod AUTODRIVER
#
# The old tangod runs one fast job to its end, starts a slow one, and is
# killed with -9 while that one runs and two more wait behind it (max_vms
# = 1). The database is dumped as SQL (sqlite3 .dump), with the data dir's
# path replaced by @DATA_DIR@; the uploaded files, their blobs and the
# finished job's output are copied as they are.
set -euo pipefail
tangod=${1:?usage: make-upgrade-fixture.sh OLD_TANGOD AUTODRIVER}
autodriver=${2:?usage: make-upgrade-fixture.sh OLD_TANGOD AUTODRIVER}
out="$(cd "$(dirname "$0")/.." && pwd)/crates/tango-server/tests/fixtures/data-0c57581"
work=$(mktemp -d /tmp/tango-upgrade-fixture.XXXXXX)
data=$work/data
key=testkey
port=3917
url=http://127.0.0.1:$port
mkdir -p "$data"
printf '[engine]\nprefix = "fixture"\nmax_vms = 1\n' >"$work/tangod.toml"
"$tangod" --listen 127.0.0.1:$port --data-dir "$data" --key $key \
  --autodriver "$autodriver" --config "$work/tangod.toml" 2>"$work/tangod.log" &
pid=$!
trap 'kill -9 $pid 2>/dev/null || true' EXIT
until curl -sf "$url/" >/dev/null; do sleep 0.1; done

curl -sf "$url/open/$key/lab/" >/dev/null
upload() { curl -sf -H "Filename: $1" --data-binary "$2" "$url/upload/$key/lab/" >/dev/null; }
upload fast.mk $'all:\n\t@cat id.txt\n'
upload slow.mk $'all:\n\t@sleep 4\n\t@cat id.txt\n'
for i in 1 2 3 4; do upload "id$i.txt" "job $i ran"; done
add() { # name, makefile, id file, output file
  curl -sf --data-binary "{\"image\": \"host\", \"jobName\": \"$1\", \"output_file\": \"$4\",
    \"timeout\": 60, \"files\": [{\"localFile\": \"$2\", \"destFile\": \"Makefile\"},
    {\"localFile\": \"$3\", \"destFile\": \"id.txt\"}]}" "$url/addJob/$key/lab/"
  echo
}
add finished fast.mk id1.txt out1
until [ -f "$data/courselabs/$key-lab/output/out1" ]; do sleep 0.1; done
add running slow.mk id2.txt out2
add queued3 fast.mk id3.txt out3
add queued4 fast.mk id4.txt out4
until curl -sf "$url/jobs/$key/0/" | grep -q '"assigned":true'; do sleep 0.1; done
sleep 0.5
kill -9 $pid
wait $pid 2>/dev/null || true

sqlite3 "$data/tango.db" "SELECT id, state FROM jobs ORDER BY id"
rm -rf "$out"
mkdir -p "$out"
sqlite3 "$data/tango.db" .dump | sed "s#$data#@DATA_DIR@#g" >"$out/tango.sql"
cp -r "$data/courselabs" "$data/blobs" "$out/"
# The killed job's sandbox is still mounted; a tangod with prefix "fixture"
# would sweep it at its start, this does it here.
findmnt -rn -o TARGET | grep "^$work/" | sort -r | xargs -r -n1 umount -l
rm -rf "$work"
echo "wrote $out"
