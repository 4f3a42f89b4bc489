#!/bin/sh
# The wirefence lab, one script for both places it runs, so that what CI proves is what a
# Vagrant user runs:
#   - the Vagrant machines (vagrant/Vagrantfile): packages installed with dpkg, daemons run
#     by their systemd units;
#   - the qemu VM test (`cargo xtask vm-test --systemd --script lab-vm.sh`): one Debian 12
#     machine with the same packages, the control plane and gw1 run by their units (this
#     script's systemd path), gw2 and lan1 network namespaces, gw2's agent started directly.
#
# Machines: a control plane, two gateways, and a LAN host behind gw1 that gw2 reaches
# through the route gw1 advertises; the policy lets gw2 ping the LAN and open tcp/80 there,
# nothing else.
#
#   lab.sh provision ROLE   ROLE: control | gw1 | gw2 | lan1 (run on that machine)
#   . lab.sh; check         the scenario, run where a function `on MACHINE COMMAND` runs a
#                           shell line on a machine with LAB_ETC set to that machine's
#                           (vagrant/check.sh over `vagrant ssh`, xtask/vm/lab-vm.sh with
#                           nsenter)
#
# Environment:
#   LAB_SHARED   a directory every machine sees: the CA and enrollment keys  [/vagrant/.lab]
#   LAB_ETC      configuration directory                                       [/etc/wirefence]
#   LAB_SERVICE  systemd: enable and start the packages' units; direct: start the binaries
#                in the background with state under LAB_ETC and logs there [systemd]
#   LAB_BACKEND  the agents' WireGuard backend                                 [kernel]
set -eu

LAB_SHARED=${LAB_SHARED:-/vagrant/.lab}
LAB_ETC=${LAB_ETC:-/etc/wirefence}
LAB_SERVICE=${LAB_SERVICE:-systemd}
LAB_BACKEND=${LAB_BACKEND:-kernel}

# The underlay (Vagrant's private network "wf-mesh") and gw1's LAN ("wf-lan1").
CONTROL_IP=192.168.56.10
GW1_IP=192.168.56.11
GW2_IP=192.168.56.12
LAN_NET=10.10.1.0/24
GW1_LAN_IP=10.10.1.1
LAN1_IP=10.10.1.10
OVERLAY_V4=100.64.0.0/24
OVERLAY_V6=fd7a:115c:a1e0::/64
CP_PORT=7443

say() { echo "lab: $*"; }
die() {
    echo "lab: FAIL: $*" >&2
    exit 1
}

# wait_for SECONDS WHAT COMMAND...: retries COMMAND once a second.
wait_for() {
    _secs=$1
    _what=$2
    shift 2
    _i=0
    until "$@" >/dev/null 2>&1; do
        _i=$((_i + 1))
        [ "$_i" -lt "$_secs" ] || die "gave up after ${_secs}s waiting for $_what"
        sleep 1
    done
}

# Where each mode keeps things: the packages' paths under systemd, LAB_ETC otherwise.
if [ "$LAB_SERVICE" = systemd ]; then
    ADMIN_SOCKET=/run/wirefence-control/control.sock
    TLS_DIR=/var/lib/wirefence-control/tls
    AGENT_KEY=/var/lib/wirefence/private.key
else
    ADMIN_SOCKET=$LAB_ETC/admin.sock
    TLS_DIR=$LAB_ETC/tls
    AGENT_KEY=$LAB_ETC/private.key
fi

control() { wirefence-control --admin-socket "$ADMIN_SOCKET" "$@"; }

# start NAME COMMAND...: a daemon, as the packages run it or directly.
start() {
    _name=$1
    shift
    if [ "$LAB_SERVICE" = systemd ]; then
        systemctl enable --now "$_name.service"
    else
        "$@" >"$LAB_ETC/$_name.log" 2>&1 &
        echo $! >"$LAB_ETC/$_name.pid"
    fi
}

provision_control() {
    mkdir -p "$LAB_SHARED" "$LAB_ETC"
    _opts="--listen $CONTROL_IP:$CP_PORT --tls-cert $TLS_DIR/server.pem --tls-key $TLS_DIR/server.key --overlay-v4 $OVERLAY_V4 --overlay-v6 $OVERLAY_V6"
    if [ "$LAB_SERVICE" = systemd ]; then
        # The service's user reads the key: it makes them (as the README's Deploy says).
        [ -e "$TLS_DIR/server.pem" ] ||
            runuser -u wirefence-control -- wirefence-control certs init --dir "$TLS_DIR" --san "$CONTROL_IP"
        cat >/etc/default/wirefence-control <<EOF
# Written by the wirefence lab (vagrant/lab.sh).
WIREFENCE_CONTROL_OPTS="$_opts"
EOF
        start wirefence-control
    else
        [ -e "$TLS_DIR/server.pem" ] || wirefence-control certs init --dir "$TLS_DIR" --san "$CONTROL_IP"
        # shellcheck disable=SC2086 # _opts is a list of options
        start wirefence-control wirefence-control --admin-socket "$ADMIN_SOCKET" serve --db "$LAB_ETC/control.db" $_opts
    fi
    wait_for 30 "the control plane's admin socket" control nodes list

    cat >"$LAB_ETC/policy.toml" <<EOF
# gw2 may ping the LAN behind gw1 and open its web server; nothing else crosses the mesh.
# (No [[tests]]: they may only name nodes that exist, and the gateways enroll later;
# the lab's check tests the same on the wire.)
[[rules]]
id = "lan-ping"
from = ["node:gw2"]
to = ["$LAN_NET"]
proto = "icmp"

[[rules]]
id = "lan-web"
from = ["node:gw2"]
to = ["$LAN_NET"]
proto = "tcp"
ports = ["80"]

EOF
    control policy apply "$LAB_ETC/policy.toml"

    # One single-use key per gateway, bound to its name; gw1's may advertise the LAN.
    for gw in gw1 gw2; do
        [ -s "$LAB_SHARED/$gw.key" ] && continue
        if [ "$gw" = gw1 ]; then routes="--route $LAN_NET"; else routes=""; fi
        # shellcheck disable=SC2086 # routes is empty or two words
        control keys create --hostname "$gw" --tag gw $routes --json |
            sed -n 's/.*"key": *"\([^"]*\)".*/\1/p' >"$LAB_SHARED/$gw.key.tmp"
        [ -s "$LAB_SHARED/$gw.key.tmp" ] || die "keys create printed no key for $gw"
        mv "$LAB_SHARED/$gw.key.tmp" "$LAB_SHARED/$gw.key"
    done
    cp "$TLS_DIR/ca.pem" "$LAB_SHARED/ca.pem"
    say "control plane up at $CONTROL_IP:$CP_PORT"
}

provision_gateway() {
    _gw=$1
    mkdir -p "$LAB_ETC"
    wait_for 120 "the control plane's CA and $_gw's key in $LAB_SHARED" test -s "$LAB_SHARED/$_gw.key" -a -s "$LAB_SHARED/ca.pem"
    cp "$LAB_SHARED/ca.pem" "$LAB_ETC/ca.pem"
    (umask 077 && cp "$LAB_SHARED/$_gw.key" "$LAB_ETC/enroll.key")
    if [ "$_gw" = gw1 ]; then
        _ip=$GW1_IP
        _site="advertise_routes = [\"$LAN_NET\"]"
        # The agent turns forwarding on (and `down` gives back what was there).
        _gateway="[gateway]
forward = true
"
    else
        _ip=$GW2_IP
        _site="accept_routes = [\"$LAN_NET\"]"
        _gateway=""
    fi
    if [ "$LAB_SERVICE" = direct ]; then
        _dirs="[agent]
state_dir = \"$LAB_ETC/state\"
"
    else
        _dirs=""
    fi
    cat >"$LAB_ETC/agent.toml" <<EOF
# Written by the wirefence lab (vagrant/lab.sh).
[interface]
name = "wf-$_gw"
backend = "$LAB_BACKEND"
private_key_file = "$AGENT_KEY"   # made by the agent on its first start
listen_port = 51820

$_dirs
$_gateway
[policy]
pin_dir = "/sys/fs/bpf/wirefence"

[control]
endpoints = ["$CONTROL_IP:$CP_PORT"]
ca_file = "$LAB_ETC/ca.pem"
enrollment_key_file = "$LAB_ETC/enroll.key"
hostname = "$_gw"
advertise_endpoints = ["$_ip:51820"]
$_site
EOF
    if [ "$LAB_SERVICE" = systemd ]; then
        # The unit runs the agent as its own user: it must own its secrets.
        chown wirefence:wirefence "$LAB_ETC/enroll.key"
    fi
    start wirefence-agent wirefence-agent run --config "$LAB_ETC/agent.toml"
    say "$_gw: agent started"
}

provision_lan1() {
    # The mesh's addresses are reached through gw1.
    ip route replace "$OVERLAY_V4" via "$GW1_LAN_IP"
    mkdir -p "$LAB_ETC/www"
    echo "lan1 web" >"$LAB_ETC/www/index.html"
    for port in 80 8080; do
        busybox httpd -p "$port" -h "$LAB_ETC/www"
    done
    say "lan1: web servers on :80 and :8080"
}

# A shell line fetching http://HOST:PORT/ (busybox nc: its wget crashes in Debian 12's
# busybox-static).
http_get() {
    printf '%s' "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 3 $1 $2"
}

# json_packets JSON NAME: the "packets" of the counter NAME in `status --json` (0 if none).
json_packets() {
    echo "$1" | awk -v name="\"$2\"" '
        index($0, name) { found = 1 }
        found && /"packets"/ { gsub(/[^0-9]/, ""); print; exit }
        END { if (!found) print 0 }'
}

# The scenario, from wherever `on MACHINE COMMAND` runs COMMAND (a shell line) on MACHINE.
check() {
    say "gw2 reaches lan1 ($LAN1_IP) through gw1's advertised route"
    wait_for 120 "gw2 -> lan1 tcp/80 through the tunnel" \
        on gw2 "$(http_get "$LAN1_IP" 80) | grep -q 'lan1 web'"
    on gw2 "ping -c 1 -W 2 $LAN1_IP" >/dev/null || die "gw2 cannot ping lan1 (rule lan-ping)"
    on gw2 "ip route show $LAN_NET" | grep -q 'dev wf-gw2' || die "gw2 has no route to $LAN_NET on its tunnel"

    say "the ACL: lan1:8080 is closed to gw2, though lan1 serves it"
    on lan1 "$(http_get 127.0.0.1 8080)" | grep -q 'lan1 web' || die "lan1 does not serve :8080"
    if on gw2 "$(http_get "$LAN1_IP" 8080)" | grep -q 'lan1 web'; then
        die "gw2 opened lan1:8080, which no rule allows"
    fi

    say "both ends enforce: gw1 counted gw2's web traffic under lan-web, gw2 dropped the 8080 flow leaving it"
    # shellcheck disable=SC2016 # expanded on the machine, with its LAB_ETC
    _status=$(on gw1 'wirefence-agent status --json --config "$LAB_ETC/agent.toml"') || die "status on gw1 failed"
    [ "$(json_packets "$_status" lan-web)" -gt 0 ] || die "gw1 counted no packets for rule lan-web: $_status"
    # shellcheck disable=SC2016
    _status=$(on gw2 'wirefence-agent status --json --config "$LAB_ETC/agent.toml"') || die "status on gw2 failed"
    [ "$(json_packets "$_status" denied)" -gt 0 ] || die "gw2 counted no denied packets: $_status"
    say "all checks passed"
}

case "${1:-}" in
provision)
    case "${2:-}" in
    control) provision_control ;;
    gw1 | gw2) provision_gateway "$2" ;;
    lan1) provision_lan1 ;;
    *) die "provision: unknown role '${2:-}' (control, gw1, gw2, lan1)" ;;
    esac
    ;;
"") ;; # sourced for `check`
*) die "unknown command '$1' (provision ROLE)" ;;
esac
