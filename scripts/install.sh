#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine (as root) for building, testing and running wirefence.
# Idempotent: a second run only checks. Needs a Rust toolchain installed with rustup.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (it installs Debian packages)" >&2
    exit 1
fi

packages=(
    build-essential pkg-config ca-certificates git
    iproute2 iputils-ping procps kmod          # namespaces, veth, ping, pgrep, modprobe
    wireguard-go wireguard-tools               # userspace WireGuard for host tests, `wg`
    iperf3 nftables ethtool                    # demo throughput, benchmark baselines (offloads off)
    prometheus                                 # promtool: the metrics endpoints' output is checked
    postgresql haproxy                         # the control plane on PostgreSQL; replicas behind an L4 balancer
    qemu-system-x86 busybox-static binutils    # VM test of the kernel backend (strip)
    mmdebstrap e2fsprogs                       # vm-test --systemd: a Debian 12 root disk for the lab
    dpkg-dev lintian systemd                   # cargo xtask deb: shlibdeps, lintian, systemd-analyze verify
    vagrant                                    # vagrant validate of the lab (vagrant/)
    llvm-22-dev libpolly-22-dev zlib1g-dev libzstd-dev   # bpf-linker (eBPF programs)
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "install.sh: installing ${missing[*]}"
    apt-get update -q
    # No recommends: wireguard recommends a kernel image, which a build host does not need.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null || ! command -v rustup >/dev/null; then
    echo "install.sh: cargo/rustup not found: install Rust with rustup (https://rustup.rs) and re-run" >&2
    exit 1
fi
rustup component list --installed | grep -q '^rust-src' || rustup component add rust-src

export PATH="/usr/lib/llvm-22/bin:$PATH"
if ! command -v bpf-linker >/dev/null; then
    echo "install.sh: building bpf-linker against LLVM 22 (a few minutes, once)"
    cargo install bpf-linker --no-default-features --features llvm-22
fi
# `cargo xtask test` fuzzes the update decoder (fuzz/) briefly.
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "install.sh: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
# `cargo xtask test` checks the dependency policy (deny.toml) first; pinned, as deny.toml's
# format follows cargo-deny's releases (keep in step with xtask/src/deny.rs).
deny_version=0.20.2
if [ "$(cargo deny --version 2>/dev/null)" != "cargo-deny $deny_version" ]; then
    echo "install.sh: installing cargo-deny $deny_version (a few minutes, once)"
    cargo install --locked "cargo-deny@$deny_version"
fi
# `cargo xtask deb` builds the Debian packages with it; pinned, as the packaging metadata
# follows its releases (keep in step with xtask/src/deb.rs).
cargo_deb_version=3.8.0
if [ "$(cargo deb --version 2>/dev/null)" != "cargo-deb $cargo_deb_version" ]; then
    echo "install.sh: installing cargo-deb $cargo_deb_version (a few minutes, once)"
    cargo install --locked "cargo-deb@$cargo_deb_version"
fi
echo "install.sh: ready"
