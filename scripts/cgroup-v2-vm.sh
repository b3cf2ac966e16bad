#!/usr/bin/env bash
# Runs a command (by default the sandbox backend's integration tests) inside a
# small KVM guest whose only cgroup hierarchy is cgroup v2, for hosts that
# mount cgroup v1 and so never exercise the v2 code path.
#
# The guest boots the distribution kernel (one with 9p modules, e.g. Debian's
# linux-image-amd64) with a tiny busybox initramfs that mounts the host's /
# read-only over virtio-9p, under an overlay whose writes stay in the guest's
# memory, as its root, then mounts cgroup2 (and no v1 hierarchy:
# cgroup_no_v1=all) at /sys/fs/cgroup and runs the command. The script exits
# with the command's exit status (124 on timeout, 125 when the guest never
# reported one).
#
# Usage: scripts/cgroup-v2-vm.sh [options] [-- command args...]
#   --cgroup service  run the command in /tango.service, a non-root cgroup
#                     that holds it, as under systemd (default)
#   --cgroup root     run it in the root cgroup
#   --cgroup container  run it in /tango.service behind a cgroup namespace
#                     with its own cgroup2 mount, as in a privileged Docker
#                     container on a v2 host (cgroupns=private)
#   --timeout SECS    bound for the whole guest run (default 900)
#   --memory MB       guest memory (default 4096)
#   --log FILE        serial console log (default $CARGO_TARGET_DIR/cgroup-v2-vm.log)
#   --no-build        with no command: use the test binary built last
#   --tangod          instead of the tests: start tangod (debug build, sandbox
#                     backend) in the guest and run examples/jobs/hello
#                     through the `tango` CLI, then stop tangod
#   --accel kvm|tcg   default kvm, except tcg when /dev/kvm is PVM's
# Without a command it builds the static autodriver and the sandbox test
# binary on the host, then runs that binary in the guest (extra arguments
# after `--tests` go to the test binary, e.g. `--tests --test-threads=1`).
#
# Needs root, /dev/kvm, qemu-system-x86 and busybox-static:
#   apt-get install qemu-system-x86 linux-image-amd64 busybox-static
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
target_dir=${CARGO_TARGET_DIR:-$repo/target}
musl=x86_64-unknown-linux-musl

cgroup_mode=service
timeout_secs=900
memory_mb=4096
log=$target_dir/cgroup-v2-vm.log
build=1
accel=
tangod=0
test_args=()
command=()
while [ $# -gt 0 ]; do
  case $1 in
    --cgroup) cgroup_mode=$2; shift 2 ;;
    --timeout) timeout_secs=$2; shift 2 ;;
    --memory) memory_mb=$2; shift 2 ;;
    --log) log=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    --tangod) tangod=1; shift ;;
    --accel) accel=$2; shift 2 ;;
    --tests) shift; test_args=("$@"); break ;;
    --) shift; command=("$@"); break ;;
    *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
case $cgroup_mode in service|root|container) ;; *) echo "--cgroup is service, root or container" >&2; exit 2 ;; esac

for tool in qemu-system-x86_64 cpio; do
  command -v "$tool" >/dev/null || { echo "$tool is missing (apt-get install qemu-system-x86 cpio)" >&2; exit 2; }
done
# busybox-static installs /bin/busybox; the initramfs has no shared libraries.
busybox=${TANGO_VM_BUSYBOX:-/bin/busybox}
[ -x "$busybox" ] || busybox=
[ -n "$busybox" ] || { echo "busybox (static) is missing: apt-get install busybox-static" >&2; exit 2; }
# /dev/kvm backed by PVM (kvm_pvm, nested virtualization without VMX, as in
# Firecracker sandboxes) only runs kernels built as PVM guests: a
# distribution kernel hangs before its first console line. Emulate then.
if [ -z "$accel" ]; then
  if [ -w /dev/kvm ] && [ ! -d /sys/module/kvm_pvm ]; then accel=kvm; else accel=tcg; fi
fi
case $accel in
  kvm) accel_args=(-enable-kvm -cpu host) ;;
  tcg) accel_args=(-accel tcg,thread=multi -cpu max) ;;
  *) echo "--accel is kvm or tcg" >&2; exit 2 ;;
esac

# A kernel whose modules include 9p (Debian's cloud kernel has none).
kernel=${TANGO_VM_KERNEL:-}
if [ -z "$kernel" ]; then
  for candidate in $(ls -1v /boot/vmlinuz-* 2>/dev/null | tac); do
    version=${candidate#/boot/vmlinuz-}
    if [ -f "/lib/modules/$version/kernel/fs/9p/9p.ko" ]; then
      kernel=$candidate
      break
    fi
  done
fi
[ -n "$kernel" ] || { echo "no /boot/vmlinuz-* with 9p modules: apt-get install linux-image-amd64" >&2; exit 2; }
kernel_version=${TANGO_VM_KERNEL_VERSION:-${kernel#/boot/vmlinuz-}}

if [ ${#command[@]} -eq 0 ] && [ "$tangod" = 1 ]; then
  if [ "$build" = 1 ]; then
    cargo build --release -p autodriver --target "$musl" >&2
    cargo build -p tango-server -p tango-cli >&2
  fi
  # shellcheck disable=SC2016 # expanded by the guest's shell
  command=(sh -c '
    target=$0 data=/var/lib/tango-e2e
    mkdir -p "$data"
    "$target/debug/tangod" --listen 127.0.0.1:3000 --data-dir "$data" --key e2e-key \
      --autodriver "$target/x86_64-unknown-linux-musl/release/autodriver" >"$data/tangod.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 300); do curl -sf http://127.0.0.1:3000/ >/dev/null 2>&1 && break; sleep 0.2; done
    echo "e2e: tangod runs in cgroup $(cat /proc/$pid/cgroup)"
    TANGO_URL=http://127.0.0.1:3000 TANGO_KEY=e2e-key \
      "$target/debug/tango" run examples/jobs/hello --image host --timeout 60
    status=$?
    echo "e2e: tango run exited $status; cgroups:"; find /sys/fs/cgroup -mindepth 1 -type d
    kill -TERM $pid; wait $pid; echo "e2e: tangod exited $?; cgroups:"
    find /sys/fs/cgroup -mindepth 1 -type d
    tail -n 20 "$data/tangod.log"
    exit $status' "$target_dir")
fi
if [ ${#command[@]} -eq 0 ]; then
  if [ "$build" = 1 ]; then
    cargo build --release -p autodriver --target "$musl" >&2
    cargo test -p tango-vmms --no-default-features --features sandbox --no-run >&2
  fi
  # The newest build of each sandbox test target.
  binaries=
  for name in sandbox sandbox_cgroup_limits; do
    binary=$(ls -t "$target_dir"/debug/deps/"$name"-* 2>/dev/null | grep -v '\.d$' | head -n1 || true)
    [ -n "$binary" ] || { echo "no $name test binary under $target_dir/debug/deps" >&2; exit 2; }
    binaries="$binaries $binary"
  done
  # shellcheck disable=SC2016 # expanded by the guest's shell
  command=(sh -c 'status=0; for t in $0; do echo "== $t"; "$t" "$@" || status=$?; done; exit $status'
    "$binaries" "${test_args[@]}")
  export TANGO_AUTODRIVER=${TANGO_AUTODRIVER:-$target_dir/$musl/release/autodriver}
fi

work=$(mktemp -d /tmp/cgroup-v2-vm.XXXXXX)
trap 'rm -rf "$work"' EXIT

# --- the initramfs: busybox, the modules for virtio-9p, and /init ---
initramfs=$work/initramfs
mkdir -p "$initramfs"/{bin,dev,proc,sys,newroot,modules}
cp "$busybox" "$initramfs/bin/busybox"
: >"$initramfs/modules/order"
for module in virtio_pci 9pnet_virtio 9p overlay; do
  modprobe --show-depends --set-version="$kernel_version" "$module" | while read -r verb path _; do
    [ "$verb" = insmod ] || continue
    name=$(basename "$path")
    if ! grep -qx "$name" "$initramfs/modules/order"; then
      cp "$path" "$initramfs/modules/$name"
      echo "$name" >>"$initramfs/modules/order"
    fi
  done
done

# The guest's second stage runs from the host's filesystem, so with the
# host's tools, under bash (it reads the %q quoting below); the command and
# its environment are baked in here.
{
  echo '#!/bin/bash'
  printf 'export PATH=%q HOME=/root RUST_BACKTRACE=0\n' "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  [ -n "${TANGO_AUTODRIVER:-}" ] && printf 'export TANGO_AUTODRIVER=%q\n' "$TANGO_AUTODRIVER"
  printf 'cgroup_mode=%q\n' "$cgroup_mode"
  printf 'guest_timeout=%q\n' "$((timeout_secs > 60 ? timeout_secs - 30 : timeout_secs))"
  printf 'workdir=%q\n' "$PWD"
  printf 'set --'; printf ' %q' "${command[@]}"; echo
  cat <<'STAGE2'
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts 2>/dev/null || { mkdir -p /dev/pts && mount -t devpts devpts /dev/pts; }
mkdir -p /dev/shm && mount -t tmpfs -o nosuid,nodev tmpfs /dev/shm
# Pure cgroup v2: the unified hierarchy, no v1 controller anywhere.
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
echo "+memory +pids +cpu" >/sys/fs/cgroup/cgroup.subtree_control
ip link set lo up 2>/dev/null || busybox ip link set lo up
hostname cgroup-v2-guest
echo "guest: kernel $(uname -r), cgroup mounts:"
grep cgroup /proc/self/mountinfo
echo "guest: root controllers: $(cat /sys/fs/cgroup/cgroup.subtree_control)"
if [ "$cgroup_mode" != root ]; then
  # As under systemd: the command runs in a non-root cgroup that holds it.
  mkdir /sys/fs/cgroup/tango.service
  echo $$ >/sys/fs/cgroup/tango.service/cgroup.procs
fi
echo "guest: running in cgroup $(cat /proc/self/cgroup): $*"
cd "$workdir"
started=$(date +%s)
if [ "$cgroup_mode" = container ]; then
  # The namespace's root is /tango.service, which holds this shell.
  set -- unshare --cgroup --mount --propagation private sh -c \
    'umount /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup &&
     echo "guest: in a cgroup namespace: $(cat /proc/self/cgroup)" && exec "$@"' sh "$@"
fi
timeout -k 10 "$guest_timeout" "$@" </dev/null
status=$?
echo "guest: command took $(( $(date +%s) - started )) s"
echo "guest: cgroups left below /sys/fs/cgroup:"
find /sys/fs/cgroup -mindepth 1 -type d | head -n 50
echo "TANGO-VM-EXIT=$status"
sync
busybox poweroff -f
STAGE2
} >"$initramfs/stage2.sh"
chmod +x "$initramfs/stage2.sh"

cat >"$initramfs/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for module in $(cat /modules/order); do
  insmod "/modules/$module" || echo "init: insmod $module failed"
done
fail() { echo "init: $*"; echo "TANGO-VM-EXIT=125"; poweroff -f; }
mkdir -p /lower /upper
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=262144,cache=loose hostroot /lower \
  || fail "mounting the host's / over 9p failed"
# One writable root: the host's files below, the guest's writes in memory.
# A single mount (not tmpfs on /var/lib and such) because the sandbox's
# "host" image is a non-recursive bind of / and the tests expect files they
# write under /var/lib to be seen through it, as on a host.
mount -t tmpfs -o mode=0755 tmpfs /upper
mkdir -p /upper/data /upper/work
mount -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work overlay /newroot \
  || fail "mounting the overlay root failed"
mkdir -p /newroot/run
cp /stage2.sh /newroot/run/stage2.sh
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /bin/bash /run/stage2.sh
INIT
chmod +x "$initramfs/init"
(cd "$initramfs" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/initramfs.cpio.gz"

mkdir -p "$(dirname "$log")"
echo "cgroup-v2-vm: kernel $kernel, accel $accel, log $log, timeout ${timeout_secs}s" >&2
started=$(date +%s)
set +e
# The guest's root is a non-recursive bind of the host's / (in a private
# mount namespace), so the host's /proc, /sys, /dev and /run are not seen
# through it: the sandbox's "host" image checks that /sys is empty. Host
# filesystems mounted below / (other than the root one) are thereby absent.
exported=$work/hostroot
mkdir -p "$exported"
timeout -k 10 "$timeout_secs" unshare --mount --propagation private -- \
  sh -c 'mount --bind / "$0" && exec "$@"' "$exported" qemu-system-x86_64 \
  "${accel_args[@]}" -smp "$(nproc)" -m "$memory_mb" \
  -kernel "$kernel" -initrd "$work/initramfs.cpio.gz" \
  -append "console=ttyS0 panic=-1 cgroup_no_v1=all rdinit=/init" \
  -fsdev local,id=hostroot,path="$exported",security_model=none,readonly=on \
  -device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot \
  -nic none -display none -vga none -monitor none -serial stdio -no-reboot </dev/null 2>&1 | tee "$log"
qemu_status=${PIPESTATUS[0]}
set -e
echo "cgroup-v2-vm: guest ran $(( $(date +%s) - started )) s (qemu status $qemu_status)" >&2
[ "$qemu_status" = 124 ] && { echo "cgroup-v2-vm: timed out after ${timeout_secs}s" >&2; exit 124; }
status=$(tr -d '\r' <"$log" | sed -n 's/^TANGO-VM-EXIT=\([0-9]*\)$/\1/p' | tail -n1)
[ -n "$status" ] || { echo "cgroup-v2-vm: the guest reported no exit status" >&2; exit 125; }
exit "$status"
