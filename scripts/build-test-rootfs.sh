#!/usr/bin/env bash
# Builds the test root filesystem once per machine (no registry can be
# reached, so nothing is pulled): a minimal Debian bookworm with make, procps
# and python3, made by debootstrap. Prints the directory.
#   TANGO_ROOTFS_CACHE  where to keep it (default /var/cache/tango-rs)
set -euo pipefail
cache=${TANGO_ROOTFS_CACHE:-/var/cache/tango-rs}
dir=$cache/rootfs-bookworm
if [ ! -f "$dir/.complete" ]; then
  command -v debootstrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >&2; }
  rm -rf "$dir.tmp"
  mkdir -p "$cache"
  debootstrap --variant=minbase --include=make,procps,python3 bookworm "$dir.tmp" >&2
  rm -rf "$dir"
  mv "$dir.tmp" "$dir"
  touch "$dir/.complete"
fi
echo "$dir"
