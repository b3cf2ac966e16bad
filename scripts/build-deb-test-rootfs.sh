#!/usr/bin/env bash
# Builds, once per machine, the root filesystem the Debian package test
# installs tango-rs into: a minimal Debian bookworm with systemd (for
# `systemd-analyze verify --root`, which needs the units the package's unit
# depends on), and make, procps and python3 for the example jobs (run on
# image `host`, the root itself), made by debootstrap.
# Prints the directory.
#   TANGO_ROOTFS_CACHE  where to keep it (default /var/cache/tango-rs)
set -euo pipefail
cache=${TANGO_ROOTFS_CACHE:-/var/cache/tango-rs}
dir=$cache/rootfs-bookworm-systemd
if [ ! -f "$dir/.complete" ]; then
  command -v debootstrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >&2; }
  rm -rf "$dir.tmp"
  mkdir -p "$cache"
  debootstrap --variant=minbase --include=make,procps,python3,systemd bookworm "$dir.tmp" >&2
  rm -rf "$dir"
  mv "$dir.tmp" "$dir"
  touch "$dir/.complete"
fi
echo "$dir"
