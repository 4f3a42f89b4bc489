#!/bin/sh
# PID 1 of the VM test guest: `cargo xtask vm-test` puts this file in the initramfs as /init.
# It prepares a minimal system, loads the modules listed in /wirefence-vm/modules (already in
# dependency order), runs the test script named by $WF_VM_TEST and reports the outcome on the
# serial console as the last line, which the host waits for:
#   WIREFENCE-VM-RESULT: PASS
#   WIREFENCE-VM-RESULT: FAIL <reason>
#
# With WF_VM_ROOT set (`vm-test --systemd`) it only loads the modules, mounts that disk (a
# Debian 12 root filesystem) and hands over to systemd; there the unit wirefence-vm-test
# runs `init.sh under-systemd`, which runs the test and reports the same way.
export PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
# The console is a tty, but it ends up in CI logs: no colours.
export NO_COLOR=1 WG_COLOR_MODE=never

finish() {
    echo "WIREFENCE-VM-RESULT: $*"
    sync
    poweroff -f
    echo o >/proc/sysrq-trigger
    sleep 10
}

run_test() {
    echo "wirefence-vm: kernel $WF_VM_KERNEL, $(nproc) CPUs, up for $(cut -d' ' -f1 /proc/uptime)s; running $WF_VM_TEST"
    cd /tmp || finish "FAIL no /tmp"
    sh "$WF_VM_TEST" </dev/null
    rc=$?
    echo "wirefence-vm: $WF_VM_TEST exited with status $rc at $(cut -d' ' -f1 /proc/uptime)s uptime"
    if [ "$rc" -eq 0 ]; then
        finish PASS
    else
        finish "FAIL $(basename "$WF_VM_TEST") exited with status $rc"
    fi
}

set -a
. /wirefence-vm/env
set +a

if [ "${1:-}" = under-systemd ]; then
    run_test
    exit 1
fi

export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
grep -q ' /dev ' /proc/mounts 2>/dev/null || mount -t devtmpfs devtmpfs /dev
while read -r module; do
    [ -n "$module" ] || continue
    insmod "$module" || finish "FAIL cannot load $module"
done </wirefence-vm/modules

if [ -n "${WF_VM_ROOT:-}" ]; then
    mount -t proc proc /proc
    i=0
    until [ -b "$WF_VM_ROOT" ]; do
        i=$((i + 1))
        [ "$i" -lt 100 ] || finish "FAIL no root disk $WF_VM_ROOT"
        sleep 0.1
    done
    mkdir -p /newroot
    mount -t ext4 "$WF_VM_ROOT" /newroot || finish "FAIL cannot mount $WF_VM_ROOT"
    mount --move /dev /newroot/dev
    umount /proc
    exec switch_root /newroot /sbin/init
fi

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs tmpfs /tmp
# No bpffs at /sys/fs/bpf yet: kernel-backend.sh checks that the agent refuses to run its
# policy without one (it mounts none), then mounts it as systemd would at boot.
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
hostname wirefence-vm
ip link set lo up

run_test
