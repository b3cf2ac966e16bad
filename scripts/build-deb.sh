#!/usr/bin/env bash
# Builds the Debian package tango-rs_<version>_amd64.deb (tangod, tango, the
# static autodriver, the systemd unit, /etc/tango-rs/tangod.toml) with
# cargo-deb, installing cargo-deb first when it is missing. Prints the path
# of the .deb.
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir=$(realpath -m "${CARGO_TARGET_DIR:-$PWD/target}")
export CARGO_TARGET_DIR=$target_dir
musl=x86_64-unknown-linux-musl

if ! cargo deb --version >/dev/null 2>&1; then
  echo "installing cargo-deb" >&2
  # Its own build directory: it shares no crates with tango-rs, and the
  # shared one would stay locked for the whole install.
  CARGO_TARGET_DIR="$target_dir/tools/cargo-deb" cargo install --locked cargo-deb >&2
fi
if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx "$musl"; then
  rustup target add "$musl" >&2
fi

# The autodriver runs inside every image, whatever its libc: static, musl.
cargo build --release -p autodriver --target "$musl" >&2
# Built here, not by cargo-deb, which builds only the packaged crate's
# binaries and takes every target/release/ asset for one of them.
cargo build --release -p tango-server -p tango-cli >&2
# cargo-deb reads binaries from target/release/ only; a name of its own
# keeps this one apart from a host-libc autodriver built there.
install -m 0755 "$target_dir/$musl/release/autodriver" "$target_dir/release/autodriver-static"

version=$(cargo pkgid -p tango-server | sed 's/.*[#@]//')
out=$target_dir/debian/tango-rs_${version}_amd64.deb
cargo deb -p tango-server --no-build --output "$out" >&2
echo "$out"
