#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS seconds each (default
# 20); exits non-zero if any target crashes (the input that crashed it is
# kept under fuzz/artifacts/<target>/ and printed).
#
# cargo-fuzz needs nightly-only rustc flags (-Zsanitizer, sanitizer
# coverage). RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them, so no
# nightly toolchain is needed.
#
# By default the targets are built unoptimized (with debug assertions and
# overflow checks) and without AddressSanitizer: that builds in about a
# quarter of the time from scratch (2.3 min instead of 9 on 2 cores), which
# is what matters for short CI runs, and the fuzzed code is safe Rust, where
# ASan finds little. For long runs set FUZZ_RELEASE=1: cargo-fuzz's default
# optimized ASan build, about 3-5 times more executions per second.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#   FUZZ_RELEASE=1 scripts/fuzz.sh 600 add_job_json
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-20}
shift || true
case "$seconds" in
  ''|*[!0-9]*) echo "usage: $0 [SECONDS] [TARGET...]" >&2; exit 2 ;;
esac

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install --locked cargo-fuzz
fi

export RUSTC_BOOTSTRAP=1
# Instrumentation flags differ from a normal build's: keep these artifacts apart
# so neither build invalidates the other.
if [ -n "${CARGO_TARGET_DIR:-}" ]; then
  target_dir=${FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR}-fuzz}
else
  target_dir=${FUZZ_TARGET_DIR:-$PWD/fuzz/target}
fi

if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi

build_flags=(--target-dir "$target_dir")
if [ "${FUZZ_RELEASE:-0}" = 0 ]; then
  build_flags+=(--dev --sanitizer none)
fi

start=$SECONDS
cargo fuzz build "${build_flags[@]}"
echo "fuzz: build took $((SECONDS - start)) s"

failed=()
for target in "${targets[@]}"; do
  corpus=fuzz/corpus/$target
  mkdir -p "$corpus"
  seeds=()
  [ -d "fuzz/seeds/$target" ] && seeds=("fuzz/seeds/$target")
  echo "fuzz: $target for ${seconds}s"
  # New inputs go to the first (untracked) corpus directory; the committed
  # seeds are only read.
  if ! cargo fuzz run "${build_flags[@]}" "$target" "$corpus" "${seeds[@]}" -- \
      -max_total_time="$seconds" -timeout=10 -print_final_stats=1 2>&1 \
      | { grep -v '^#[0-9]*	\(NEW\|REDUCE\|pulse\)' || true; }; then
    failed+=("$target")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: FAILED: ${failed[*]}; crashing inputs:" >&2
  for target in "${failed[@]}"; do
    ls -1 "fuzz/artifacts/$target" 2>/dev/null | sed "s|^|  fuzz/artifacts/$target/|" >&2
  done
  exit 1
fi
echo "fuzz: all ${#targets[@]} targets ran ${seconds}s each without a crash"
