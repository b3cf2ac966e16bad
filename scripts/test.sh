#!/usr/bin/env bash
# The whole test suite: what `.ci/run` runs, and what a developer runs.
# Needs root (the sandbox tests make namespaces, mounts and cgroups) and a
# running dockerd for the Docker tests (they skip, saying so, without one).
set -euo pipefail
cd "$(dirname "$0")/.."
# Absolute: the tests run from their crate directories.
target_dir=$(realpath -m "${CARGO_TARGET_DIR:-$PWD/target}")
musl=x86_64-unknown-linux-musl

if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx "$musl"; then
  rustup target add "$musl"
fi
# The static autodriver every backend puts into its VMs.
cargo build --release -p autodriver --target "$musl"
export TANGO_AUTODRIVER="$target_dir/$musl/release/autodriver"
# The autodriver's static_chroot test takes this one instead of building
# its own copy into <target>/musl-for-tests.
export AUTODRIVER_MUSL_BIN="$TANGO_AUTODRIVER"

# A Debian root filesystem for image tests (built once per machine).
TANGO_TEST_ROOTFS=$(scripts/build-test-rootfs.sh)
export TANGO_TEST_ROOTFS
if [ -S /var/run/docker.sock ] && [ -x scripts/build-docker-test-image.sh ]; then
  scripts/build-docker-test-image.sh
fi

cargo test --workspace "$@"
# tangod built with the worked example backend of docs/writing-a-vmms.md.
cargo test -p tango-server --features local-example --test local_example "$@"
# The ec2 backend (feature ec2, not in the default build) against moto and a
# local sshd: TANGO_TEST_EC2=1 (CI sets it).
if [ "${TANGO_TEST_EC2:-0}" = 1 ]; then
  cargo test -p tango-vmms --features ec2 --lib --test ec2 "$@"
  cargo test -p tango-server --features ec2 --test ec2 "$@"
fi
