#!/bin/sh
# The Vagrant lab (vagrant/lab.sh) in one guest (`cargo xtask vm-test --script lab-vm.sh`):
# each lab machine is a network namespace wired as the Vagrantfile wires the machines
# (underlay 192.168.56.0/24 on a bridge; gw1 <-> lan1 on 10.10.1.0/24), provisioned and
# checked by the same script, with the binaries unpacked from the .deb packages and the
# kernel's WireGuard. Daemons run directly (no systemd in the guest).
set -eu
. /wirefence-vm/lib.sh

LAB=/tmp/lab
export LAB_SHARED=$LAB/shared LAB_SERVICE=direct LAB_BACKEND=kernel

machine_etc() { echo "$LAB/$1"; }

# on MACHINE LINE: LINE in the machine's network namespace, with its LAB_ETC.
on() {
    nsenter --net="/run/netns/$1" env LAB_ETC="$(machine_etc "$1")" sh -c "$2"
}

dump() {
    for m in control gw1 gw2 lan1; do
        echo "---- $m"
        ip -n "$m" addr show || true
        ip -n "$m" route show || true
        for log in "$(machine_etc "$m")"/*.log; do
            [ -e "$log" ] && sed "s|^|[$m $(basename "$log")] |" "$log"
        done
    done
}
trap 'rc=$?; if [ "$rc" -ne 0 ]; then echo "---- state after the failure"; dump; fi' EXIT

step "lab: $(wirefence-agent --version), $(wirefence-control --version)"
# The host's bpffs, as systemd mounts it on a Debian machine.
grep -q ' /sys/fs/bpf bpf ' /proc/mounts || mount -t bpf -o mode=0700 bpf /sys/fs/bpf

step "lab: machines as namespaces, wired as in the Vagrantfile"
ip link add mesh type bridge
ip link set mesh up
n=0
for m in control gw1 gw2 lan1; do
    ip netns add "$m"
    ip -n "$m" link set lo up
    mkdir -p "$(machine_etc "$m")"
done
mkdir -p "$LAB_SHARED"
for m in control gw1 gw2; do
    n=$((n + 1))
    ip link add "m-$m" type veth peer name eth1 netns "$m"
    ip link set "m-$m" master mesh up
    ip -n "$m" addr add "192.168.56.$((9 + n))/24" dev eth1
    ip -n "$m" link set eth1 up
done
ip link add lan netns gw1 type veth peer name eth1 netns lan1
ip -n gw1 addr add 10.10.1.1/24 dev lan
ip -n gw1 link set lan up
ip -n lan1 addr add 10.10.1.10/24 dev eth1
ip -n lan1 link set eth1 up

step "lab: provisioning (vagrant/lab.sh, as the Vagrantfile runs it)"
for m in control lan1 gw1 gw2; do
    nsenter --net="/run/netns/$m" env LAB_ETC="$(machine_etc "$m")" sh /wirefence-vm/lab.sh provision "$m" ||
        fail "provisioning $m"
done

step "lab: the scenario (vagrant/lab.sh check)"
. /wirefence-vm/lab.sh
check
