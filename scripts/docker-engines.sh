#!/usr/bin/env bash
# Extra Docker engines beside the default one, for the benchmark of several
# Docker hosts (bench/docker_hosts.sh) and for trying a fleet by hand:
#   scripts/docker-engines.sh start NAME...   # then unix:///run/NAME.sock
#   scripts/docker-engines.sh stop NAME...
# Each dockerd runs in a network namespace of its own (/run/netns/NAME):
# started with --bridge none in the host's namespace, dockerd deletes the
# host's docker0 and breaks the default engine. Its data root is kept under
# /var/cache/tango-rs/engines/NAME, so the test images are loaded once.
# The tests use the same layout (crates/tango-vmms/tests/support/engines.rs).
set -euo pipefail
root=/var/cache/tango-rs/engines
images=(tango-test-bookworm tango-test-busybox)

usage() { echo "usage: $0 start|stop NAME..." >&2; exit 2; }

# SIGTERM, then SIGKILL after $2 seconds.
terminate() {
  local pid=$1 i
  kill "$pid" 2>/dev/null || return 0
  for i in $(seq 1 $(($2 * 10))); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
}

stop() {
  local name=$1 pid
  if pid=$(cat "/run/$name.pid" 2>/dev/null) && grep -qa "/run/$name.sock" "/proc/$pid/cmdline" 2>/dev/null; then
    terminate "$pid" 30
  fi
  # What a dockerd that did not stop cleanly leaves mounted, deepest first.
  awk -v a="$root/$name/data" -v b="/run/$name-exec/" 'index($5, a) == 1 || index($5, b) == 1 {print $5}' \
    /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l
  rm -f "/run/$name.pid" "/run/$name.sock"
  if [ -e "/run/netns/$name" ]; then ip netns delete "$name"; fi
}

start() {
  local name=$1 sock=/run/$1.sock i img
  [[ $name =~ ^[a-z0-9-]+$ ]] || { echo "engine name $name: use a-z, 0-9 and -" >&2; exit 2; }
  stop "$name"
  mkdir -p "$root/$name/data"
  ip netns add "$name"
  ip -n "$name" link set lo up
  setsid nsenter --net="/run/netns/$name" dockerd --host "unix://$sock" \
    --data-root "$root/$name/data" --exec-root "/run/$name-exec" --pidfile "/run/$name.pid" \
    --bridge none --iptables=false --ip6tables=false \
    >>"$root/$name/dockerd.log" 2>&1 </dev/null &
  for i in $(seq 1 600); do
    docker -H "unix://$sock" version >/dev/null 2>&1 && break
    sleep 0.1
  done
  docker -H "unix://$sock" version >/dev/null 2>&1 || {
    echo "dockerd $name did not start; its log ends:" >&2
    tail -15 "$root/$name/dockerd.log" >&2
    exit 1
  }
  for img in "${images[@]}"; do
    if ! docker -H "unix://$sock" image inspect "$img" >/dev/null 2>&1 && docker image inspect "$img" >/dev/null 2>&1; then
      docker save "$img" | docker -H "unix://$sock" load >/dev/null
    fi
  done
  echo "unix://$sock"
}

[ $# -ge 2 ] || usage
cmd=$1; shift
case $cmd in
  start) for n in "$@"; do start "$n"; done ;;
  stop) for n in "$@"; do stop "$n"; done ;;
  *) usage ;;
esac
