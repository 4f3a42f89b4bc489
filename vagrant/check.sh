#!/bin/sh
# The lab's scenario (lab.sh's `check`) from the host, over `vagrant ssh`: run it in this
# directory once `vagrant up` has provisioned every machine.
set -eu
cd "$(dirname "$0")"

# on MACHINE LINE: LINE as root on MACHINE (through stdin: no quoting layers).
on() {
    echo "$2" | vagrant ssh "$1" -c "sudo LAB_ETC=/etc/wirefence sh -s" -- -q
}

. ./lab.sh
check
