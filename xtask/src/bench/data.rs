//! The benchmark's data: WireGuard key pairs, peer sets, and the files both sides read
//! (the agent's TOML config; `wg syncconf` configs and `ip -batch` scripts for the baseline).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use anyhow::{Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

/// rtnetlink protocol number of the routes (the agent's default; the baseline uses it too).
pub const PROTO: u8 = 87;
pub const LISTEN_PORT: u16 = 51820;
/// The node's own addresses on the tunnel.
pub const NODE_ADDRESSES: [&str; 2] = ["10.0.0.1/8", "fd00::1/64"];

/// An address prefix as compared in checks: (network address, length).
pub type Prefix = (IpAddr, u8);

pub struct NodeKey {
    pub private: String,
    pub public: String,
}

#[derive(Clone)]
pub struct Peer {
    pub public_key: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

impl Peer {
    pub fn prefixes(&self) -> [Prefix; 2] {
        [(IpAddr::V4(self.v4), 32), (IpAddr::V6(self.v6), 128)]
    }
}

/// Reads `n` 32-byte secrets from the kernel's CSPRNG in one go.
fn secrets(n: usize) -> Result<Vec<[u8; 32]>> {
    let mut bytes = vec![0u8; n * 32];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).context("read /dev/urandom")?;
    Ok(bytes.chunks_exact(32).map(|c| c.try_into().expect("32 bytes")).collect())
}

fn public_of(secret: [u8; 32]) -> [u8; 32] {
    let secret = x25519_dalek::StaticSecret::from(secret);
    x25519_dalek::PublicKey::from(&secret).to_bytes()
}

pub fn node_key() -> Result<NodeKey> {
    let mut secret = secrets(1)?[0];
    // Clamped, as `wg genkey` writes it, so every tool prints the same private key.
    secret[0] &= 248;
    secret[31] = (secret[31] & 127) | 64;
    Ok(NodeKey { private: B64.encode(secret), public: B64.encode(public_of(secret)) })
}

/// `n` fresh public keys (real X25519 public keys of random secrets), computed on every core.
pub fn public_keys(n: usize) -> Result<Vec<String>> {
    let secrets = secrets(n)?;
    let threads = std::thread::available_parallelism().map_or(1, |p| p.get()).min(8);
    let chunk = n.div_ceil(threads).max(1);
    let keys = std::thread::scope(|s| {
        let handles: Vec<_> = secrets
            .chunks(chunk)
            .map(|part| s.spawn(move || part.iter().map(|k| B64.encode(public_of(*k))).collect::<Vec<_>>()))
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("key thread panicked")).collect::<Vec<_>>()
    });
    Ok(keys)
}

/// The addresses of peer number `i`: 10.1.0.1 onwards and fd00:0:0:1::1 onwards, outside
/// the node's own addresses and distinct for every `i` below 2^24 - 2^16.
pub fn peer_addresses(i: usize) -> (Ipv4Addr, Ipv6Addr) {
    let n = u32::try_from(i).expect("peer index fits u32") + 1;
    let v4 = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 1, 0, 0)) + n);
    let v6 = Ipv6Addr::from(u128::from(Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 0)) + u128::from(n));
    (v4, v6)
}

/// A converged peer set (`before`) and the same set with `changed` peers replaced by new
/// ones with new keys and new addresses (`after`), spread evenly over the list.
pub struct Scenario {
    pub before: Vec<Peer>,
    pub after: Vec<Peer>,
    /// Indices into `before`/`after` of the replaced peers.
    pub replaced: Vec<usize>,
}

impl Scenario {
    pub fn generate(peers: usize, changed: usize) -> Result<Scenario> {
        let changed = changed.min(peers);
        let keys = public_keys(peers + changed)?;
        let before: Vec<Peer> = (0..peers)
            .map(|i| {
                let (v4, v6) = peer_addresses(i);
                Peer { public_key: keys[i].clone(), v4, v6 }
            })
            .collect();
        let stride = peers.checked_div(changed).unwrap_or(1);
        let replaced: Vec<usize> = (0..changed).map(|j| j * stride + stride / 2).collect();
        let mut after = before.clone();
        for (j, &i) in replaced.iter().enumerate() {
            let (v4, v6) = peer_addresses(peers + j);
            after[i] = Peer { public_key: keys[peers + j].clone(), v4, v6 };
        }
        Ok(Scenario { before, after, replaced })
    }
}

/// What the device and routing table must hold once a peer set is applied.
pub struct Expected {
    pub peers: BTreeMap<String, BTreeSet<Prefix>>,
    pub routes: BTreeSet<Prefix>,
}

pub fn expected(peers: &[Peer]) -> Expected {
    Expected {
        peers: peers.iter().map(|p| (p.public_key.clone(), p.prefixes().into_iter().collect())).collect(),
        routes: peers.iter().flat_map(|p| p.prefixes()).collect(),
    }
}

pub struct AgentConfig<'a> {
    pub ifname: &'a str,
    pub private_key_file: &'a Path,
    pub state_dir: &'a Path,
}

/// The agent's TOML config for a peer set.
pub fn agent_config(c: &AgentConfig, peers: &[Peer]) -> String {
    let mut s = String::with_capacity(200 + peers.len() * 120);
    let _ = writeln!(s, "[interface]");
    let _ = writeln!(s, "name = {:?}", c.ifname);
    let _ = writeln!(s, "backend = \"userspace\"");
    let _ = writeln!(s, "private_key_file = {:?}", c.private_key_file.display().to_string());
    let _ = writeln!(s, "listen_port = {LISTEN_PORT}");
    let _ = writeln!(s, "addresses = [{:?}, {:?}]", NODE_ADDRESSES[0], NODE_ADDRESSES[1]);
    let _ = writeln!(s, "\n[agent]");
    let _ = writeln!(s, "state_dir = {:?}", c.state_dir.display().to_string());
    for p in peers {
        let _ = writeln!(s, "\n[[peers]]");
        let _ = writeln!(s, "public_key = {:?}", p.public_key);
        let _ = writeln!(s, "allowed_ips = [\"{}/32\", \"{}/128\"]", p.v4, p.v6);
    }
    s
}

/// A `wg syncconf` config for a peer set.
pub fn wg_config(key: &NodeKey, peers: &[Peer]) -> String {
    let mut s = String::with_capacity(100 + peers.len() * 110);
    let _ = writeln!(s, "[Interface]\nPrivateKey = {}\nListenPort = {LISTEN_PORT}", key.private);
    for p in peers {
        let _ = writeln!(s, "\n[Peer]\nPublicKey = {}\nAllowedIPs = {}/32, {}/128", p.public_key, p.v4, p.v6);
    }
    s
}

/// `ip -batch` script bringing a fresh tunnel up with its addresses and every peer route.
pub fn ip_batch_from_scratch(ifname: &str, peers: &[Peer]) -> String {
    let mut s = String::with_capacity(100 + peers.len() * 100);
    let _ = writeln!(s, "link set dev {ifname} up");
    for a in NODE_ADDRESSES {
        let _ = writeln!(s, "address add {a} dev {ifname}");
    }
    for p in peers {
        let _ = writeln!(s, "route add {}/32 dev {ifname} proto {PROTO}", p.v4);
        let _ = writeln!(s, "route add {}/128 dev {ifname} proto {PROTO}", p.v6);
    }
    s
}

/// `ip -batch` script for the hand-made minimal change: the replaced peers' routes out,
/// their successors' routes in.
pub fn ip_batch_change(ifname: &str, sc: &Scenario) -> String {
    let mut s = String::new();
    for &i in &sc.replaced {
        let p = &sc.before[i];
        let _ = writeln!(s, "route del {}/32 dev {ifname} proto {PROTO}", p.v4);
        let _ = writeln!(s, "route del {}/128 dev {ifname} proto {PROTO}", p.v6);
    }
    for &i in &sc.replaced {
        let p = &sc.after[i];
        let _ = writeln!(s, "route add {}/32 dev {ifname} proto {PROTO}", p.v4);
        let _ = writeln!(s, "route add {}/128 dev {ifname} proto {PROTO}", p.v6);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenario_replaces_exactly_the_requested_peers() {
        let sc = Scenario::generate(100, 3).unwrap();
        let changed: Vec<usize> = (0..100).filter(|&i| sc.before[i].public_key != sc.after[i].public_key).collect();
        assert_eq!(changed, sc.replaced);
        let all: BTreeSet<Prefix> = sc.before.iter().chain(&sc.after).flat_map(|p| p.prefixes()).collect();
        assert_eq!(all.len(), 2 * 103, "addresses must be distinct");
    }

    #[test]
    fn node_key_matches_wg_conventions() {
        let k = node_key().unwrap();
        let private = B64.decode(&k.private).unwrap();
        assert_eq!(private[0] & 7, 0);
        assert_eq!(private[31] & 0xc0, 0x40);
        assert_eq!(B64.encode(public_of(private.try_into().unwrap())), k.public);
    }
}
