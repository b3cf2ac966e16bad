#!/usr/bin/env bash
# Builds the Docker test images once per machine (no registry can be reached,
# so nothing is pulled; this CI script uses the docker CLI on purpose):
#   tango-test-bookworm:latest  Debian bookworm minbase with make, procps,
#                               python3 (from scripts/build-test-rootfs.sh)
#   tango-test-busybox:latest   /bin/busybox and its applet links only: no
#                               make, no users, for testing minimal images
#   tango-test-autograde:latest the bookworm image plus user autograde (uid
#                               1001), like Tango's images
# Set TANGO_REBUILD_IMAGES=1 to rebuild images that exist.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

image_exists() {
  [ "${TANGO_REBUILD_IMAGES:-0}" != 1 ] && docker image inspect "$1" >/dev/null 2>&1
}

if ! image_exists tango-test-bookworm:latest; then
  rootfs=$("$here/build-test-rootfs.sh")
  # The rootfs marker file is ours, not the image's.
  tar -C "$rootfs" --exclude=./.complete -c . \
    | docker import -c 'WORKDIR /home' - tango-test-bookworm:latest >/dev/null
  echo "built tango-test-bookworm:latest" >&2
fi

if ! image_exists tango-test-busybox:latest; then
  busybox=$(command -v busybox || true)
  if [ -z "$busybox" ] || ! "$busybox" --list >/dev/null 2>&1; then
    echo "busybox (static) is required: apt-get install busybox-static" >&2
    exit 1
  fi
  dir=$(mktemp -d)
  trap 'rm -rf "$dir"' EXIT
  mkdir -p "$dir/bin" "$dir/tmp" "$dir/home" "$dir/etc"
  chmod 1777 "$dir/tmp"
  cp "$busybox" "$dir/bin/busybox"
  for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$dir/bin/$applet"
  done
  # Only root: the backend must cope with an image without a grading user.
  echo 'root:x:0:0:root:/root:/bin/sh' >"$dir/etc/passwd"
  echo 'root:x:0:' >"$dir/etc/group"
  tar -C "$dir" -c . \
    | docker import -c 'WORKDIR /home' -c 'ENV PATH=/bin' - tango-test-busybox:latest >/dev/null
  echo "built tango-test-busybox:latest" >&2
fi

if ! image_exists tango-test-autograde:latest; then
  printf 'FROM tango-test-bookworm:latest\nRUN useradd -m -u 1001 -s /bin/bash autograde\n' \
    | docker build -q -t tango-test-autograde:latest - >/dev/null
  echo "built tango-test-autograde:latest" >&2
fi
