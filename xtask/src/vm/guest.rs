//! What runs inside the VM: `/init` (in the cached base initramfs) and the suite script (in
//! the per-run payload, so editing it costs no base rebuild).
//!
//! The guest is a busybox userland on the initramfs (a tmpfs), plus the host's `/usr`
//! read-only over 9p (so dynamically linked test binaries find their glibc at the paths
//! they were linked against, and scripts can use the host's tools) and the workspace (and
//! target directory) read-only over 9p at their host paths, so no binary is copied.
//!
//! The result leaves the VM twice: a serial marker `@@NIXB-VM-EXIT=<rc>@@` (full 0..255),
//! then `isa-debug-exit` (QEMU exits with `rc << 1 | 1`, rc capped at 127), which is also
//! the fastest way to stop the machine.

/// The isolation modes a per-mode suite runs in, first the default (every other suite runs
/// in it only). `NIXB_VM_MODE` tells the suite which: `build-users` (members of `nixbld`),
/// `auto-allocate-uids` (blocks of uids, no users), `use-cgroups` (build users, and a cgroup
/// per build).
pub const MODES: &[&str] = &["build-users", "auto-allocate-uids", "use-cgroups"];

/// Marker printed on the serial console with the suite's exit status.
pub const EXIT_MARKER: &str = "@@NIXB-VM-EXIT=";

/// PID 1. Reads `/xtask-vm/config` (from the payload) for the 9p shares and the modules.
pub const INIT: &str = r#"#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb
# pivot_root(2) refuses to move the initramfs (rootfs has no parent mount), and every
# sandbox (nixb's, real Nix's) pivots its root. So first move to a tmpfs that is a proper
# mount and start again from there.
if [ -z "$XTASK_VM_SWITCHED" ]; then
  mkdir -p /newroot && mount -t tmpfs -o mode=0755 newroot /newroot
  for d in /*; do
    case "$d" in /newroot|/proc|/sys|/dev) mkdir -p "/newroot$d" ;; *) cp -a "$d" /newroot/ ;; esac
  done
  export XTASK_VM_SWITCHED=1
  exec switch_root /newroot /init
fi
# The kernel passes cmdline words it does not know (e.g. nokaslr) to init as arguments.
set --
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm /run /tmp /root /var/empty
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 shm /dev/shm
# The rootfs is already a tmpfs; a tmpfs on /tmp would hide payload files placed there.
chmod 1777 /tmp
ln -sf /proc/self/fd /dev/fd; ln -sf pts/ptmx /dev/ptmx 2>/dev/null
hostname nixb-vm; ip link set lo up 2>/dev/null
. /xtask-vm/config
# One module a line, then its parameters.
while read -r m params; do
  insmod "/xtask-vm/modules.d/${m##*/}" $params || echo "xtask-vm: insmod $m failed"
done < /xtask-vm/modules
mkdir -p /usr
if mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose usr /usr; then
  for d in lib lib64 lib32 libx32; do [ -e /$d ] || [ ! -e /usr/$d ] || ln -s usr/$d /$d; done
else
  echo "xtask-vm: mounting the host /usr failed"
fi
i=0
for p in $SHARES; do
  mkdir -p "$p"
  mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=mmap "ws$i" "$p" || echo "xtask-vm: mounting $p failed"
  i=$((i + 1))
done
cd /root
/bin/sh /xtask-vm/suite.sh
rc=$?
sync
echo "@@NIXB-VM-EXIT=$rc@@"
v=$rc; [ $v -gt 127 ] && v=127
printf "\\$(printf %o $v)" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
poweroff -f
"#;

/// The nixb-specific part: build users, a store, then every VM test binary and script.
/// `/xtask-vm/tests` has one `<executable>\t<package dir>\t<modes, comma-separated>` per
/// line; `/xtask-vm/scripts` one script path per line.
pub const SUITE: &str = r#"
. /xtask-vm/config

# cgroup v2 with every controller the kernel has enabled for the cgroups below the root
# (where builds get theirs: the suite runs in the root cgroup).
mkdir -p /sys/fs/cgroup
mount -t cgroup2 cgroup2 /sys/fs/cgroup || echo "xtask-vm: mounting cgroup2 failed"
for c in $(cat /sys/fs/cgroup/cgroup.controllers); do
  echo "+$c" > /sys/fs/cgroup/cgroup.subtree_control || echo "xtask-vm: enabling the $c controller failed"
done

# ext4 on the RAM disk, for what only a block device shows (bytes written).
mkdir -p /disk
if ! { mkfs.ext4 -q -F /dev/ram0 && mount -t ext4 /dev/ram0 /disk; }; then
  echo "xtask-vm: making /disk (ext4 on /dev/ram0) failed"
fi

# Build users as nixb's VM tests expect them: group nixbld (30000) with nixbld1..8
# (30001..30008); an empty group; an extra group holding nixbld2 (supplementary gids).
members=""
for i in 1 2 3 4 5 6 7 8; do
  echo "nixbld$i:x:$((30000 + i)):30000:Nix build user $i:/var/empty:/bin/false" >> /etc/passwd
  members="$members${members:+,}nixbld$i"
done
echo "nixbld:x:30000:$members" >> /etc/group
echo "nixbempty:x:30100:" >> /etc/group
echo "nixbextra:x:30200:nixbld2" >> /etc/group

# A store on the guest's tmpfs with the permissions a multi-user store needs. Numeric ids:
# the static busybox cannot resolve names through NSS.
mkdir -p /nix/store /nix/var/nix /nix/var/log/nix /etc/nix
chown 0:30000 /nix/store
chmod 1775 /nix/store
printf 'build-users-group = nixbld\nsandbox = false\n' > /etc/nix/nix.conf

export NIXB_IN_VM=1 NIXB_VM_GROUP=nixbld NIXB_BIN
export NIX_STORE_DIR=/nix/store NIX_STATE_DIR=/nix/var/nix NIX_LOG_DIR=/nix/var/log/nix NIX_CONF_DIR=/etc/nix
export TMPDIR=/tmp RUST_BACKTRACE=1
[ -n "$NIXB_BIN" ] && export PATH="${NIXB_BIN%/*}:$PATH"

if [ -n "$BENCH" ]; then
  echo "xtask-vm: running xtask bench $BENCH"
  "$XTASK_BIN" bench $BENCH
  exit $?
fi

failed=""
ran=0
tab=$(printf '\t')
while IFS="$tab" read -r exe dir modes; do
  [ -n "$exe" ] || continue
  for mode in $(echo "$modes" | tr , ' '); do
    echo "xtask-vm: running ${exe##*/} in mode $mode (tests matching '$FILTER')"
    ran=$((ran + 1))
    if ! (cd "$dir" && CARGO_MANIFEST_DIR="$dir" NIXB_VM_MODE="$mode" "$exe" "$FILTER" --test-threads=1); then
      failed="$failed ${exe##*/}[$mode]"
    fi
  done
done < /xtask-vm/tests
while read -r s; do
  [ -n "$s" ] || continue
  echo "xtask-vm: running script $s"
  ran=$((ran + 1))
  if ! (cd /tmp && sh "$s"); then failed="$failed $s"; fi
done < /xtask-vm/scripts
if [ -n "$failed" ]; then
  echo "xtask-vm: FAILED:$failed"
  exit 1
fi
echo "xtask-vm: all $ran VM suites passed"
exit 0
"#;
