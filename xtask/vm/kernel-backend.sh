#!/bin/sh
# The agent's kernel WireGuard backend, end to end (`cargo xtask vm-test`).
#
# Two network namespaces A and B joined by a veth pair (underlay 192.168.77.0/24 and
# fd00:77::/64). Each runs `wirefence-agent run --once` with backend = "kernel" and the other
# as its peer; B also routes 10.78.2.0/24 and fd78:2::/64 (addresses on its lo) through the
# tunnel. Then:
#   - A pings B's overlay addresses and the routed subnet over IPv4 and IPv6;
#   - A's routes for B's allowed-ips exist on wf0, and `status` lists the peer;
#   - a second `run --once` changes nothing;
#   - after dropping B's routed subnets from A's config, `run --once` removes their routes
#     and keeps the rest;
#   - `down` in A removes the interface and its routes, and leaves foreign routes and the
#     policy rules alone; a second `down` succeeds too.
set -eu
. /wirefence-vm/lib.sh

agent() { # agent NS ARGS...: the agent in namespace NS with its config
    _ns=$1
    shift
    # Logs go through a file: on the console (a tty) they would be coloured for the CI log.
    _rc=0
    ip netns exec "$_ns" wirefence-agent "$@" --config "/tmp/$_ns/agent.toml" \
        2>"/tmp/$_ns/agent.log" || _rc=$?
    sed "s/^/[$_ns] /" "/tmp/$_ns/agent.log"
    return "$_rc"
}

dump() {
    for ns in A B; do
        echo "---- namespace $ns"
        ip -n "$ns" -d link show || true
        ip -n "$ns" addr show || true
        ip -n "$ns" -4 route show table all || true
        ip -n "$ns" -6 route show table all || true
        ip -n "$ns" rule show || true
        if command -v wg >/dev/null; then ip netns exec "$ns" wg show all || true; fi
    done
}
trap 'rc=$?; if [ "$rc" -ne 0 ]; then echo "---- state after the failure"; dump; fi' EXIT

step "agent: $(wirefence-agent --version 2>&1 || true)"

step "underlay: namespaces A and B, veth va <-> vb"
for ns in A B; do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    mkdir -p "/tmp/$ns/state"
done
ip link add va netns A type veth peer name vb netns B
ip -n A addr add 192.168.77.1/24 dev va
ip -n A addr add fd00:77::1/64 dev va nodad
ip -n B addr add 192.168.77.2/24 dev vb
ip -n B addr add fd00:77::2/64 dev vb nodad
ip -n A link set va up
ip -n B link set vb up
# What B routes behind itself, and a route that belongs to someone else in A.
ip -n B addr add 10.78.2.1/32 dev lo
ip -n B addr add fd78:2::1/128 dev lo
ip -n A route add 10.200.0.0/24 via 192.168.77.2
ip -n A -6 route add fd00:200::/64 via fd00:77::2
rules_before=$(ip -n A rule show; ip -n A -6 rule show)
retry 10 ip netns exec A ping -c 1 -W 1 192.168.77.2 >/dev/null || fail "underlay IPv4 ping"
retry 10 ip netns exec A ping -6 -c 1 -W 1 fd00:77::2 >/dev/null || fail "underlay IPv6 ping"

step "keygen"
for ns in A B; do
    wirefence-agent keygen --out "/tmp/$ns/private.key" >"/tmp/$ns/public.key" ||
        fail "keygen for $ns"
    mode=$(stat -c %a "/tmp/$ns/private.key")
    [ "$mode" = 600 ] || fail "keygen wrote /tmp/$ns/private.key with mode $mode, want 600"
    pub=$(cat "/tmp/$ns/public.key")
    # 32 bytes of key in base64: 43 characters and a '=' pad.
    echo "$pub" | grep -Eq '^[A-Za-z0-9+/]{43}=$' || fail "keygen printed '$pub', not a public key"
done
[ "$(cat /tmp/A/public.key)" != "$(cat /tmp/B/public.key)" ] || fail "keygen made the same key twice"
if command -v wg >/dev/null; then
    for ns in A B; do
        [ "$(wg pubkey <"/tmp/$ns/private.key")" = "$(cat "/tmp/$ns/public.key")" ] ||
            fail "the public key keygen printed for $ns does not match its private key"
    done
fi

cat >/tmp/A/agent.toml <<EOF
[interface]
name = "wf0"
backend = "kernel"
private_key_file = "/tmp/A/private.key"
listen_port = 51820
addresses = ["10.77.0.1/24", "fd77::1/64"]

[[peers]]
public_key = "$(cat /tmp/B/public.key)"
endpoint = "192.168.77.2:51820"
allowed_ips = ["10.77.0.2/32", "fd77::2/128", "10.78.2.0/24", "fd78:2::/64"]
persistent_keepalive = 25

[agent]
state_dir = "/tmp/A/state"
EOF
cat >/tmp/B/agent.toml <<EOF
[interface]
name = "wf0"
backend = "kernel"
private_key_file = "/tmp/B/private.key"
listen_port = 51820
addresses = ["10.77.0.2/24", "fd77::2/64"]

[[peers]]
public_key = "$(cat /tmp/A/public.key)"
endpoint = "[fd00:77::1]:51820"
allowed_ips = ["10.77.0.1/32", "fd77::1/128"]

[agent]
state_dir = "/tmp/B/state"
EOF

step "run --once in A and B"
for ns in A B; do
    agent "$ns" run --once || fail "run --once in $ns exited with status $?"
    ip -n "$ns" -d link show wf0 | grep -q wireguard || fail "no wireguard interface wf0 in $ns"
done

step "status"
agent A status | tee /tmp/A/status.txt
grep -qF "$(cat /tmp/B/public.key)" /tmp/A/status.txt || fail "status in A does not list peer B"
grep -q '10.78.2.0/24' /tmp/A/status.txt || fail "status in A does not show 10.78.2.0/24"
agent A status --json >/tmp/A/status.json || fail "status --json in A"
grep -qF "$(cat /tmp/B/public.key)" /tmp/A/status.json || fail "status --json in A does not list peer B"
agent B status >/tmp/B/status.txt || fail "status in B"
grep -q 'fd00:77::1' /tmp/B/status.txt || fail "status in B does not show the IPv6 endpoint [fd00:77::1]:51820"

step "routes for B's allowed-ips in A"
check_routes() {
    route4=$(ip -n A route show 10.78.2.0/24 dev wf0)
    route6=$(ip -n A -6 route show fd78:2::/64 dev wf0)
    [ -n "$route4" ] || fail "no route 10.78.2.0/24 dev wf0 in A"
    [ -n "$route6" ] || fail "no route fd78:2::/64 dev wf0 in A"
    for peer in 10.77.0.2 fd77::2 10.78.2.1 fd78:2::1; do
        ip -n A route get "$peer" | grep -q 'dev wf0' ||
            fail "A does not route $peer through wf0: $(ip -n A route get "$peer")"
    done
}
check_routes
echo "$route4"
echo "$route6"
for route in "$route4" "$route6"; do
    case "$route" in
    *"proto kernel"* | *"proto boot"* | *"proto static"*)
        fail "the agent's route is not tagged with its own protocol: $route" ;;
    esac
done

step "pings from A through the tunnel"
for target in 10.77.0.2 10.78.2.1; do
    retry 20 ip netns exec A ping -c 1 -W 2 "$target" || fail "no IPv4 ping through the tunnel to $target"
done
for target in fd77::2 fd78:2::1; do
    retry 20 ip netns exec A ping -6 -c 1 -W 2 "$target" || fail "no IPv6 ping through the tunnel to $target"
done
retry 10 ip netns exec B ping -c 1 -W 2 10.77.0.1 >/dev/null || fail "no ping back from B to A"
if command -v wg >/dev/null; then
    ip netns exec A wg show wf0
    ip netns exec A wg show wf0 latest-handshakes | awk '{ exit !($2 > 0) }' ||
        fail "wg reports no handshake in A"
fi

step "run --once again in A changes nothing"
ifindex_before=$(ip netns exec A cat /sys/class/net/wf0/ifindex)
routes_before=$(ip -n A -4 route show table all; ip -n A -6 route show table all)
agent A run --once || fail "second run --once in A exited with status $?"
routes_after=$(ip -n A -4 route show table all; ip -n A -6 route show table all)
ifindex_after=$(ip netns exec A cat /sys/class/net/wf0/ifindex)
[ "$ifindex_before" = "$ifindex_after" ] ||
    fail "a second run --once re-created wf0 (ifindex $ifindex_before -> $ifindex_after)"
[ "$routes_before" = "$routes_after" ] || {
    echo "before:"
    echo "$routes_before"
    echo "after:"
    echo "$routes_after"
    fail "a second run --once changed the routes in A"
}
ip netns exec A ping -c 1 -W 2 10.78.2.1 >/dev/null || fail "tunnel broken after the second run --once"

step "dropping 10.78.2.0/24 and fd78:2::/64 from A's config"
sed -i 's|^allowed_ips = .*|allowed_ips = ["10.77.0.2/32", "fd77::2/128"]|' /tmp/A/agent.toml
agent A run --once || fail "run --once with the smaller config exited with status $?"
[ -z "$(ip -n A route show 10.78.2.0/24)" ] || fail "route 10.78.2.0/24 left after it left the config"
[ -z "$(ip -n A -6 route show fd78:2::/64)" ] || fail "route fd78:2::/64 left after it left the config"
ip -n A route get 10.77.0.2 | grep -q 'dev wf0' || fail "A lost its route to 10.77.0.2"
ip -n A route get fd77::2 | grep -q 'dev wf0' || fail "A lost its route to fd77::2"
if command -v wg >/dev/null; then
    allowed=$(ip netns exec A wg show wf0 allowed-ips)
    case "$allowed" in
    *10.78.2.0/24* | *fd78:2::/64*) fail "wg still lists the dropped allowed-ips: $allowed" ;;
    esac
fi
ip netns exec A ping -c 1 -W 2 10.77.0.2 >/dev/null || fail "tunnel broken after shrinking allowed-ips"
ip netns exec A ping -6 -c 1 -W 2 fd77::2 >/dev/null || fail "IPv6 tunnel broken after shrinking allowed-ips"

step "down in A"
agent A down || fail "down in A exited with status $?"
if ip -n A link show wf0 >/dev/null 2>&1; then fail "wf0 still exists in A after down"; fi
[ -z "$(ip -n A route show 10.78.2.0/24)" ] || fail "route 10.78.2.0/24 left in A after down"
[ -z "$(ip -n A -6 route show fd78:2::/64)" ] || fail "route fd78:2::/64 left in A after down"
if ip -n A -4 route show table all | grep -E '10\.7[78]\.' ||
    ip -n A -6 route show table all | grep -E 'fd7[78]:'; then
    fail "overlay routes left in A after down"
fi
[ -n "$(ip -n A route show 10.200.0.0/24)" ] || fail "down removed the foreign route 10.200.0.0/24"
[ -n "$(ip -n A -6 route show fd00:200::/64)" ] || fail "down removed the foreign route fd00:200::/64"
[ "$(ip -n A rule show; ip -n A -6 rule show)" = "$rules_before" ] ||
    fail "the policy rules in A differ after down: $(ip -n A rule show; ip -n A -6 rule show)"
ip netns exec A ping -c 1 -W 2 192.168.77.2 >/dev/null || fail "underlay broken after down"
agent A down || fail "a second down in A exited with status $?"
ip -n B link show wf0 >/dev/null || fail "down in A touched B"

step "kernel backend: all checks passed"
