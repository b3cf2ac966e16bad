#!/usr/bin/env bash
# Builds the tango-rs container image (deploy/docker/Dockerfile) from static
# musl builds of tangod, tango and the autodriver, with no registry: the
# image is FROM scratch. Prints the image's name on standard output; all
# else goes to standard error. Quick when nothing changed (cargo and
# docker's build cache).
#   TANGO_RS_IMAGE  name of the image [default: tango-rs:latest]
# Needs: the x86_64-unknown-linux-musl Rust target, musl-gcc (Debian:
# musl-tools, for the bundled SQLite and ring), ca-certificates, strip
# (binutils), docker.
set -euo pipefail
cd "$(dirname "$0")/.."
image=${TANGO_RS_IMAGE:-tango-rs:latest}
musl=x86_64-unknown-linux-musl
target_dir=$(realpath -m "${CARGO_TARGET_DIR:-$PWD/target}")
certs=/etc/ssl/certs/ca-certificates.crt

if ! command -v musl-gcc >/dev/null; then
  echo "musl-gcc is required to build static binaries: apt-get install musl-tools" >&2
  exit 1
fi
if [ ! -f "$certs" ]; then
  echo "$certs is missing: apt-get install ca-certificates" >&2
  exit 1
fi
if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx "$musl"; then
  rustup target add "$musl" >&2
fi
# C code (SQLite, ring) compiled for musl, not glibc.
export CC_x86_64_unknown_linux_musl=${CC_x86_64_unknown_linux_musl:-musl-gcc}
# Run from a test, this script inherits cargo's variables for the test's
# crate; ring's build script tracks CARGO_MANIFEST_DIR, so with them every
# other run would rebuild ring and all above it.
for var in $(compgen -e | grep -E '^CARGO_(MANIFEST_|PKG_|BIN_EXE_|CRATE_|PRIMARY_PACKAGE|TARGET_TMPDIR)' || true); do
  unset "$var"
done
cargo build --release --target "$musl" -p tango-server -p tango-cli -p autodriver >&2

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
root=$context/root
mkdir -p "$root/usr/local/bin" "$root/etc/ssl/certs" "$root/etc/tango-rs" \
  "$root/var/lib/tango-rs" "$root/run/tango-rs" "$root/tmp"
chmod 0700 "$root/var/lib/tango-rs" "$root/run/tango-rs"
chmod 1777 "$root/tmp"
for bin in tangod tango autodriver; do
  cp "$target_dir/$musl/release/$bin" "$root/usr/local/bin/$bin"
done
# Symbols are a third of a release binary's size.
strip "$root/usr/local/bin/"*
cp deploy/docker/passwd deploy/docker/group "$root/etc/"
cp deploy/docker/tangod.toml "$root/etc/tango-rs/"
cp "$certs" "$root/etc/ssl/certs/"
chmod -R go-w,a+rX "$root/etc" "$root/usr"
# One tar with the owners and modes the image needs (COPY cannot set a
# directory's mode), the same bytes for the same files so that docker's
# build cache reuses its layer: root's files, then the state directories
# of tangod's user (uid and gid 10001, as in deploy/docker/passwd).
pack() {
  tar -C "$root" --sort=name --mtime=@0 "$@"
}
pack --owner=root:0 --group=root:0 --no-recursion -cf "$context/rootfs.tar" \
  $(cd "$root" && find . ! -path './var/lib/tango-rs' ! -path './run/tango-rs' | sort)
pack --owner=tango:10001 --group=tango:10001 -rf "$context/rootfs.tar" ./var/lib/tango-rs ./run/tango-rs
cp deploy/docker/Dockerfile "$context/"
docker build -q -t "$image" "$context" >/dev/null
echo "$image"
