#!/usr/bin/env bash
# Builds, with no image registry, the three images docker-compose.yml in
# this directory runs: tango-rs (scripts/build-image.sh), and PostgreSQL 15
# and HAProxy 2.6 from Debian 12's packages (debootstrap, then docker
# import). Where Docker Hub can be reached, its postgres:15 and haproxy:2.6
# (the compose file's defaults) do instead of the last two. Prints the
# variables that point docker-compose.yml at the local images:
#   eval "$(deploy/compose/servers/build-local-images.sh)"
# Everything else goes to standard error. An image that exists is kept
# (remove it to rebuild). Needs root, debootstrap, docker, and what
# scripts/build-image.sh needs.
#   TANGO_IMAGE_MIRROR  Debian mirror [default: http://deb.debian.org/debian]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mirror=${TANGO_IMAGE_MIRROR:-http://deb.debian.org/debian}
pg_image=tango-rs-postgres:15
lb_image=tango-rs-haproxy:2.6

if [ "$(id -u)" != 0 ]; then
  echo "debootstrap needs root: run this as root" >&2
  exit 1
fi
command -v debootstrap >/dev/null || {
  echo "debootstrap is missing: apt-get install debootstrap" >&2
  exit 1
}

root=
trap 'if [ -n "$root" ]; then rm -rf "$root"; fi' EXIT

# debootstrap's minimal Debian with `packages`, `shape` given the chance to
# shape the tree ($root), packed by docker import with the `--change`s.
import() {
  local image=$1 packages=$2 shape=$3
  shift 3
  if docker image inspect "$image" >/dev/null 2>&1; then
    echo "$image exists; kept" >&2
    return
  fi
  root=$(mktemp -d)
  echo "building $image (debootstrap bookworm, $packages)" >&2
  debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror" >&2
  "$shape" "$root"
  # What a container needs not: package lists, caches, docs.
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
  tar -C "$root" --numeric-owner -c . | docker import "$@" - "$image" >&2
  rm -rf "$root"
  root=
}

shape_postgres() {
  local root=$1
  # The package's postinst made a cluster in /var/lib/postgresql/15/main;
  # the entrypoint makes its own in the volume.
  rm -rf "$root/var/lib/postgresql/15" "$root/etc/postgresql/15"
  install -m 0755 "$here/postgres-entrypoint.sh" "$root/usr/local/bin/postgres-entrypoint"
  # Owned by postgres, 0700: a new named volume on it takes both.
  install -d -m 0700 -o "$(chroot "$root" id -u postgres)" -g "$(chroot "$root" id -g postgres)" \
    "$root/var/lib/postgresql/data"
  install -d -m 2775 -o "$(chroot "$root" id -u postgres)" -g "$(chroot "$root" id -g postgres)" \
    "$root/run/postgresql"
}

shape_haproxy() {
  mkdir -p "$1/usr/local/etc/haproxy"
}

import "$pg_image" postgresql shape_postgres \
  --change 'USER postgres' \
  --change 'ENV PGDATA=/var/lib/postgresql/data' \
  --change 'VOLUME /var/lib/postgresql/data' \
  --change 'EXPOSE 5432' \
  --change 'ENTRYPOINT ["/usr/local/bin/postgres-entrypoint"]'
import "$lb_image" haproxy shape_haproxy \
  --change 'USER haproxy' \
  --change 'EXPOSE 3000' \
  --change 'CMD ["haproxy", "-W", "-db", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]'
tango_image=$("$here/../../../scripts/build-image.sh")

echo "export TANGO_RS_IMAGE=$tango_image TANGO_PG_IMAGE=$pg_image TANGO_LB_IMAGE=$lb_image"
