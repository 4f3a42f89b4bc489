#!/bin/sh
# The Vagrant lab (vagrant/lab.sh) on one Debian 12 machine booted with systemd as PID 1
# (`cargo xtask vm-test --systemd --debs target/debian --script lab-vm.sh`):
#
# - the packages are installed with dpkg -i, as the README's Deploy section says;
# - the control plane and gw1 are this machine, run by the packages' units (lab.sh's
#   systemd path, which the Vagrant machines take); gw2 and lan1 are network namespaces
#   wired as the Vagrantfile wires the machines, gw2's agent started directly from the
#   same package's binary (lab.sh's direct path);
# - the lab's scenario runs (lab.sh check), then what an operator relies on from gw1's
#   unit: readiness when converged, the service user with exactly its capabilities,
#   reload, a stop that leaves the data plane and the policy in force, a start that adopts
#   them, a restart after a crash, and a package upgrade of the running agent.
set -eu
. /wirefence-vm/lib.sh

LAB=/tmp/lab
export LAB_SHARED=$LAB/shared LAB_BACKEND=kernel
# gw1's tunnel and pins, as lab.sh names them.
GW1_IF=wf-gw1
GW1_PINS=/sys/fs/bpf/wirefence/$GW1_IF
# CAP_NET_ADMIN (12), CAP_PERFMON (38) and CAP_BPF (39): the unit's set.
AGENT_CAPS=000000c000001000

# Where each machine lives: control and gw1 on this machine, under systemd.
is_here() { [ "$1" = control ] || [ "$1" = gw1 ]; }
machine_etc() { if is_here "$1"; then echo /etc/wirefence; else echo "$LAB/$1"; fi; }

# on MACHINE LINE: LINE on the machine, with its LAB_ETC and LAB_SERVICE.
on() {
    if is_here "$1"; then
        env LAB_ETC=/etc/wirefence LAB_SERVICE=systemd sh -c "$2"
    else
        nsenter --net="/run/netns/$1" env LAB_ETC="$(machine_etc "$1")" LAB_SERVICE=direct sh -c "$2"
    fi
}

dump() {
    for unit in wirefence-control wirefence-agent; do
        echo "---- $unit"
        systemctl status --no-pager "$unit" || true
        journalctl --no-pager -o short-monotonic -u "$unit" || true
    done
    for m in gw2 lan1; do
        echo "---- $m"
        ip -n "$m" addr show || true
        ip -n "$m" route show || true
        for log in "$(machine_etc "$m")"/*.log; do
            [ -e "$log" ] && sed "s|^|[$m $(basename "$log")] |" "$log"
        done
    done
}
trap 'rc=$?; if [ "$rc" -ne 0 ]; then echo "---- state after the failure"; dump; fi' EXIT

unit_prop() { systemctl show -P "$2" "$1"; }
agent_pid() { unit_prop wirefence-agent MainPID; }
is_active() { [ "$(systemctl is-active "$1")" = active ]; }
# What identifies gw1's attachments: cls_bpf program ids (clsact), tcx link pins' inodes.
attachments() {
    if [ -e "$GW1_PINS/link_ingress" ]; then
        stat -c %i "$GW1_PINS/link_ingress" "$GW1_PINS/link_egress"
    else
        for dir in ingress egress; do
            tc filter show dev "$GW1_IF" "$dir" | sed -n 's/.* bpf .* id \([0-9]*\) .*/\1/p'
        done
    fi
}
# The policy on the wire, from gw2: lan1's tcp/80 answers, its tcp/8080 does not.
. /wirefence-vm/lab.sh
enforcing() {
    retry 30 on gw2 "$(http_get 10.10.1.10 80) | grep -q 'lan1 web'" || fail "$1: gw2 no longer reaches lan1:80"
    if on gw2 "$(http_get 10.10.1.10 8080)" | grep -q 'lan1 web'; then fail "$1: gw2 opened lan1:8080"; fi
}

step "systemd: $(systemctl --version | head -n 1), state $(systemctl is-system-running || true)"
[ "$(cat /proc/1/comm)" = systemd ] || fail "PID 1 is $(cat /proc/1/comm), not systemd (run vm-test with --systemd)"
grep -q ' /sys/fs/bpf bpf ' /proc/mounts || fail "systemd mounted no bpffs at /sys/fs/bpf"

step "packages: dpkg -i, as the README's Deploy section"
dpkg -i /root/debs/wirefence-agent_*.deb /root/debs/wirefence-control_*.deb
step "lab: $(wirefence-agent --version), $(wirefence-control --version)"
id wirefence >/dev/null || fail "the agent's package made no user wirefence"
id wirefence-control >/dev/null || fail "the control plane's package made no user wirefence-control"
[ -d /var/lib/wirefence-control ] || fail "no /var/lib/wirefence-control after install"
for unit in wirefence-agent wirefence-control; do
    [ "$(systemctl is-enabled "$unit")" = enabled ] || fail "$unit is not enabled after install"
    if is_active "$unit"; then fail "the package started $unit before it had a config"; fi
done
systemctl start wirefence-agent
[ "$(unit_prop wirefence-agent ConditionResult)" = no ] || fail "wirefence-agent started without /etc/wirefence/agent.toml"
if is_active wirefence-agent; then fail "wirefence-agent is active without a config"; fi

step "lab: gw2 and lan1 as namespaces, wired to this machine (control, gw1) as in the Vagrantfile"
ip link add mesh type bridge
ip addr add 192.168.56.10/24 dev mesh
ip addr add 192.168.56.11/24 dev mesh
ip link set mesh up
for m in gw2 lan1; do
    ip netns add "$m"
    ip -n "$m" link set lo up
    mkdir -p "$(machine_etc "$m")"
done
mkdir -p "$LAB_SHARED"
ip link add m-gw2 type veth peer name eth1 netns gw2
ip link set m-gw2 master mesh up
ip -n gw2 addr add 192.168.56.12/24 dev eth1
ip -n gw2 link set eth1 up
ip link add lan type veth peer name eth1 netns lan1
ip addr add 10.10.1.1/24 dev lan
ip link set lan up
ip -n lan1 addr add 10.10.1.10/24 dev eth1
ip -n lan1 link set eth1 up

step "lab: provisioning (vagrant/lab.sh, as the Vagrantfile runs it)"
for m in control lan1 gw1 gw2; do
    on "$m" "sh /wirefence-vm/lab.sh provision $m" || fail "provisioning $m"
done
is_active wirefence-control || fail "wirefence-control is not running"
# Type=notify: `systemctl enable --now` returned once the agent said it had converged.
is_active wirefence-agent || fail "wirefence-agent is not active after its start returned"

step "lab: the scenario (vagrant/lab.sh check)"
export LAB_SERVICE=systemd
check

step "unit: Type=notify, run as user wirefence with exactly CAP_NET_ADMIN CAP_BPF CAP_PERFMON"
[ "$(unit_prop wirefence-agent Type)" = notify ] || fail "wirefence-agent is not Type=notify"
pid=$(agent_pid)
[ "$(stat -c %U "/proc/$pid")" = wirefence ] || fail "the agent runs as $(stat -c %U "/proc/$pid"), not wirefence"
for set in CapEff CapPrm CapBnd; do
    got=$(sed -n "s/^$set:\t*//p" "/proc/$pid/status")
    [ "$got" = "$AGENT_CAPS" ] || fail "the agent's $set is $got, want $AGENT_CAPS"
done
[ "$(unit_prop wirefence-agent StatusText)" = converged ] || fail "the unit's status is '$(unit_prop wirefence-agent StatusText)', not converged"
journalctl -u wirefence-agent -o cat | grep -q converged || fail "the journal has no 'converged' from the agent"
ip route show proto wirefence | grep -q "$GW1_IF" || fail "ip route shows no 'proto wirefence' route on $GW1_IF"
wirefence-agent status >/dev/null || fail "'wirefence-agent status' as root (default config path) failed"
# gw1's [gateway] forward = true: the sandboxed agent turned IPv4 forwarding on (the boot's
# value was 0; the lab's check above crossed gw1), and status says what `down` gives back.
[ "$(cat /proc/sys/net/ipv4/ip_forward)" = 1 ] || fail "IPv4 forwarding is off on gw1"
wirefence-agent status | grep -q 'gateway: forwarding ipv4 on (down restores off)' ||
    fail "status does not show forwarding turned on by the agent: $(wirefence-agent status)"
# TCP MSS: clamped by the policy programs (their maps hold the limits of gw1's tunnel).
wirefence-agent status | grep -q 'MSS clamp: .* by the policy programs' ||
    fail "status does not show the MSS clamped by the policy programs: $(wirefence-agent status)"
before=$(attachments)
[ -n "$before" ] || fail "gw1 has no eBPF attachment on $GW1_IF"

step "unit: reload keeps the process and the policy"
systemctl reload wirefence-agent
[ "$(agent_pid)" = "$pid" ] || fail "reload replaced the agent process"
is_active wirefence-agent || fail "wirefence-agent is not active after a reload"
enforcing "after a reload"

step "unit: stop leaves the tunnel, the routes and the policy in force"
systemctl stop wirefence-agent
if is_active wirefence-agent; then fail "wirefence-agent still active after stop"; fi
ip link show "$GW1_IF" >/dev/null || fail "stopping the unit removed $GW1_IF"
[ "$(attachments)" = "$before" ] || fail "stopping the unit changed the attachments"
enforcing "with the unit stopped"

step "unit: start adopts the pinned programs (no second copy)"
systemctl start wirefence-agent
is_active wirefence-agent || fail "wirefence-agent did not start again"
[ "$(attachments)" = "$before" ] || fail "the started agent attached anew: $(attachments), was $before"
enforcing "after a start"

step "unit: Restart=on-failure brings a killed agent back"
restarts=$(unit_prop wirefence-agent NRestarts)
systemctl kill -s KILL wirefence-agent
retry 60 sh -c "[ \"\$(systemctl show -P NRestarts wirefence-agent)\" -gt $restarts ] && [ \"\$(systemctl is-active wirefence-agent)\" = active ]" ||
    fail "the killed agent was not restarted (NRestarts $(unit_prop wirefence-agent NRestarts), $(systemctl is-active wirefence-agent))"
enforcing "after a crash and restart"

step "packages: upgrading the running agent's package restarts it on its pins"
pid=$(agent_pid)
dpkg -i /root/debs/wirefence-agent_*.deb
is_active wirefence-agent || fail "wirefence-agent is not active after the package upgrade"
[ "$(agent_pid)" != "$pid" ] || fail "the package upgrade did not restart the agent"
[ "$(attachments)" = "$before" ] || fail "the upgraded agent attached anew"
enforcing "after the package upgrade"
wirefence-agent status >/dev/null || fail "'wirefence-agent status' failed after the upgrade"
step "lab: all checks passed under systemd"
