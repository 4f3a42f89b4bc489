#!/bin/sh
# Smoke test of the VM pipeline itself (`cargo xtask vm-test --smoke`), no agent involved:
# two namespaces joined by a veth pair, a kernel WireGuard interface in each and, when the
# host provided `wg`, a handshake and pings through the tunnel.
set -eu
. /wirefence-vm/lib.sh

step "wireguard module: $(cat /sys/module/wireguard/version 2>/dev/null || echo '?')"
for ns in A B; do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
done
ip link add va netns A type veth peer name vb netns B
ip -n A addr add 192.168.77.1/24 dev va
ip -n B addr add 192.168.77.2/24 dev vb
ip -n A link set va up
ip -n B link set vb up
ip netns exec A ping -c 1 -W 5 192.168.77.2 >/dev/null
step "underlay ping ok"

ip -n A link add wgt0 type wireguard
ip -n B link add wgt0 type wireguard
ip -n A -d link show wgt0 | grep -q wireguard
ip -n B -d link show wgt0 | grep -q wireguard
step "wireguard interfaces created"

if command -v wg >/dev/null; then
    umask 077
    wg genkey >/tmp/a.key
    wg genkey >/tmp/b.key
    apub=$(wg pubkey </tmp/a.key)
    bpub=$(wg pubkey </tmp/b.key)
    ip netns exec A wg set wgt0 private-key /tmp/a.key listen-port 51820 \
        peer "$bpub" endpoint 192.168.77.2:51820 allowed-ips 10.77.0.2/32
    ip netns exec B wg set wgt0 private-key /tmp/b.key listen-port 51820 \
        peer "$apub" endpoint 192.168.77.1:51820 allowed-ips 10.77.0.1/32
    ip -n A addr add 10.77.0.1/24 dev wgt0
    ip -n B addr add 10.77.0.2/24 dev wgt0
    ip -n A link set wgt0 up
    ip -n B link set wgt0 up
    ip netns exec A ping -c 3 -i 0.2 -W 5 10.77.0.2
    ip netns exec A wg show wgt0 latest-handshakes | grep -qv '	0$'
    step "tunnel ping ok"
else
    step "no wg in the guest, skipping the tunnel ping"
fi
step "done"
