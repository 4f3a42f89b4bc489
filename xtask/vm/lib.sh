# Helpers for the VM test scripts; source it first: `. /wirefence-vm/lib.sh`.
#
# The guest's shell is busybox-static, which runs its own applets in preference to
# programs found on PATH. The real tools the guest ships under the same names as applets
# are therefore wrapped here. (Programs started by other programs, e.g.
# `ip netns exec A ip ...`, go through PATH and get the real ones; `sh -c '...'` does not.)
ip() { /sbin/ip "$@"; }
tc() { /sbin/tc "$@"; }

step() { echo "== $*"; }

fail() {
    echo "FAIL: $*"
    exit 1
}

# retry SECONDS CMD...: runs CMD every 0.2 s until it succeeds or SECONDS have passed.
retry() {
    _deadline=$(($(cut -d. -f1 /proc/uptime) + $1))
    shift
    until "$@"; do
        [ "$(cut -d. -f1 /proc/uptime)" -lt "$_deadline" ] || return 1
        sleep 0.2
    done
}
