#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS seconds each (default
# 20); exits non-zero if any target crashes (the input that crashed it is
# kept under fuzz/artifacts/<target>/ and printed).
#
# cargo-fuzz needs nightly-only rustc flags (-Zsanitizer, sanitizer
# coverage). RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them, so no
# nightly toolchain is needed.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
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
# Sanitizer flags differ from a normal build's: keep these artifacts apart
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

start=$SECONDS
cargo fuzz build --target-dir "$target_dir"
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
  if ! cargo fuzz run --target-dir "$target_dir" "$target" "$corpus" "${seeds[@]}" -- \
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
