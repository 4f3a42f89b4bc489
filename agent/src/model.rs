//! Typed desired and observed state: the planner compares exactly these values.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use base64::Engine as _;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The main routing table (RT_TABLE_MAIN).
pub const MAIN_TABLE: u32 = 254;

/// A Linux interface name: 1..=15 bytes, no '/', no whitespace, not "." or "..".
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct IfName(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid interface name {name:?}: {reason}")]
pub struct InvalidIfName {
    pub name: String,
    pub reason: &'static str,
}

impl FromStr for IfName {
    type Err = InvalidIfName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason| Err(InvalidIfName { name: s.to_owned(), reason });
        if s.is_empty() {
            return bad("it is empty");
        }
        if s.len() > 15 {
            return bad("Linux allows at most 15 bytes");
        }
        if s == "." || s == ".." {
            return bad("it is a path component");
        }
        if s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control()) {
            return bad("it contains '/', ':', whitespace or a control character");
        }
        Ok(IfName(s.to_owned()))
    }
}

impl<'de> Deserialize<'de> for IfName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl IfName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a WireGuard key: expected 32 bytes in base64 (44 characters)")]
pub struct InvalidKey;

fn decode_key(s: &str) -> Result<[u8; 32], InvalidKey> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(s.trim()).map_err(|_| InvalidKey)?;
    bytes.try_into().map_err(|_| InvalidKey)
}

/// A WireGuard public key. Safe to log and display (base64).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey(pub [u8; 32]);

impl FromStr for PublicKey {
    type Err = InvalidKey;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        decode_key(s).map(PublicKey)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&base64::engine::general_purpose::STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A WireGuard private key. Never printed: `Debug` is redacted and there is no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey([u8; 32]);

impl PrivateKey {
    pub fn generate() -> Self {
        PrivateKey(wireguard_control::Key::generate_private().0)
    }

    pub fn from_base64(s: &str) -> Result<Self, InvalidKey> {
        decode_key(s).map(PrivateKey)
    }

    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(wireguard_control::Key(self.0).get_public().0)
    }

    pub fn as_wg(&self) -> wireguard_control::Key {
        wireguard_control::Key(self.0)
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// What a peer looks like on the WireGuard device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PeerSpec {
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: BTreeSet<IpNet>,
    /// Seconds; `None` means off (the UAPI's 0).
    pub persistent_keepalive: Option<u16>,
}

/// Device-wide WireGuard settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    pub private_key: PrivateKey,
    /// `None`: let the device choose (and keep whatever it chose).
    pub listen_port: Option<u16>,
    /// `None`: no fwmark (0).
    pub fwmark: Option<u32>,
}

/// A route the agent owns, in table `table` with its protocol number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Route {
    pub dst: IpNet,
    pub table: u32,
    pub kind: RouteKind,
    /// Preferred source of the host's own packets on this route (`src` in `ip route`):
    /// only a gateway's `own_traffic = "lan"` sets one (see [`crate::gateway::source`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src: Option<std::net::IpAddr>,
}

/// What an owned route does with the packets it takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum RouteKind {
    /// `dev <our link>`: into the tunnel, to the peer whose allowed-ips take it.
    Tunnel,
    /// `unreachable ... metric FALLBACK_METRIC`: a mesh prefix no peer carries is refused
    /// (an ICMP error to the sender) instead of following a less specific route, such as
    /// the default route out of the WAN, in clear. Below every tunnel route of the same
    /// prefix (a higher metric), so it only takes what no peer carries; it needs no link,
    /// so it outlives the tunnel device and the agent.
    Unreachable,
}

/// The metric of the unreachable routes: the lowest preference short of the maximum, so
/// any other route of the same prefix (the tunnel's: 0 for IPv4, 1024 for IPv6) wins.
pub const FALLBACK_METRIC: u32 = 0xffff_fff0;

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            RouteKind::Tunnel => write!(f, "{} table {}", self.dst, self.table)?,
            RouteKind::Unreachable => write!(f, "unreachable {} table {}", self.dst, self.table)?,
        }
        match self.src {
            Some(src) => write!(f, " src {src}"),
            None => Ok(()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }

    pub fn of_addr(addr: &std::net::IpAddr) -> Family {
        match addr {
            std::net::IpAddr::V4(_) => Family::V4,
            std::net::IpAddr::V6(_) => Family::V6,
        }
    }

    /// "ipv4" / "ipv6", as in sysctl paths and `status`.
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }
}

/// The two policy-routing rules wg-quick installs for a default route through the tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum RuleAction {
    /// `not fwmark <fwmark> lookup <table>`: everything but the tunnel's own packets.
    NotFwmarkLookup { fwmark: u32, table: u32 },
    /// `lookup main suppress_prefixlength 0`: keep more specific main-table routes working.
    MainSuppressDefault,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Rule {
    pub family: Family,
    pub priority: u32,
    pub action: RuleAction,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fam = match self.family {
            Family::V4 => "-4",
            Family::V6 => "-6",
        };
        match self.action {
            RuleAction::NotFwmarkLookup { fwmark, table } => {
                write!(f, "{fam} prio {} not fwmark {fwmark:#x} lookup {table}", self.priority)
            }
            RuleAction::MainSuppressDefault => {
                write!(f, "{fam} prio {} lookup main suppress_prefixlength 0", self.priority)
            }
        }
    }
}

/// A rule carrying the agent's protocol number in a shape the agent never makes, kept as
/// the kernel reported it so that exactly this rule is deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownRule(pub netlink_packet_route::rule::RuleMessage);

impl fmt::Display for UnknownRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use netlink_packet_route::rule::RuleAttribute;
        let h = &self.0.header;
        let prio = self.0.attributes.iter().find_map(|a| match a {
            RuleAttribute::Priority(p) => Some(*p),
            _ => None,
        });
        write!(f, "{:?} prio {} action {:?} table {}", h.family, prio.unwrap_or(0), h.action, h.table)
    }
}

/// The access policy to enforce on the tunnel device, compiled to map entries.
#[derive(Clone, Debug)]
pub struct DesiredPolicy {
    /// bpffs directory; the interface's programs and maps are pinned below it.
    pub pin_root: std::path::PathBuf,
    pub compiled: std::sync::Arc<crate::policy::Compiled>,
    /// Identifies the compiled content (what the maps hold once it is applied).
    pub digest: u64,
}

impl PartialEq for DesiredPolicy {
    fn eq(&self, other: &Self) -> bool {
        self.pin_root == other.pin_root && self.digest == other.digest
    }
}

impl Eq for DesiredPolicy {}

/// The policy enforcement as found: are the programs on the device, what did this agent
/// write into the maps, and is anything pinned at all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyObserved {
    pub attached: bool,
    pub applied: Option<u64>,
    pub pinned: bool,
    /// The MSS limits in the maps of the policy this agent has open (`None`: none open).
    pub mss: Option<MssClamp>,
}

pub use wirefence_common::MssClamp;

/// WireGuard's MTU for a device created without one (the kernel's and wireguard-go's).
pub const WIREGUARD_DEFAULT_MTU: u32 = 1420;

/// `[interface] mss_clamp`: what TCP SYNs and SYN-ACKs crossing the tunnel may announce.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MssSetting {
    /// What the tunnel's MTU allows: MTU - 40 (IPv4), MTU - 60 (IPv6).
    #[default]
    Auto,
    /// This MSS for both families.
    Fixed(u16),
    Off,
}

impl MssSetting {
    /// The limits on a tunnel of `mtu` bytes.
    pub fn limits(self, mtu: u32) -> MssClamp {
        match self {
            MssSetting::Auto => MssClamp::for_mtu(mtu),
            MssSetting::Fixed(mss) => MssClamp { v4: mss, v6: mss },
            MssSetting::Off => MssClamp::OFF,
        }
    }
}

/// The clamp alone (`wf_mss` as a cls_bpf filter on both hooks, for a device without a
/// policy), as found on the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClampObserved {
    /// The limits, when both hooks carry exactly one filter of the clamp, with the same ones.
    pub limits: Option<MssClamp>,
    /// Any filter of the clamp on either hook.
    pub present: bool,
}

/// Everything the agent wants the kernel to have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub ifname: IfName,
    pub mtu: Option<u32>,
    pub device: DeviceSpec,
    pub addresses: BTreeSet<IpNet>,
    pub peers: BTreeMap<PublicKey, PeerSpec>,
    pub routes: BTreeSet<Route>,
    pub rules: BTreeSet<Rule>,
    /// `None`: no eBPF enforcement (and none left behind).
    pub policy: Option<DesiredPolicy>,
    /// `[gateway]`: forwarding, masquerade and the source of the host's own traffic.
    pub gateway: crate::gateway::DesiredGateway,
    /// MSS clamping: in the policy programs, or by the clamp alone without a policy.
    pub mss: MssSetting,
}

impl Desired {
    /// The MSS limits for a tunnel whose link is `link` (its MTU, unless one is configured).
    pub fn mss_limits(&self, link: Option<&LinkState>) -> MssClamp {
        let mtu = self.mtu.or(link.map(|l| l.mtu)).unwrap_or(WIREGUARD_DEFAULT_MTU);
        self.mss.limits(mtu)
    }
}

/// The tunnel link as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct LinkState {
    pub index: u32,
    pub mtu: u32,
    pub up: bool,
}

/// The WireGuard device as the backend reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceState {
    pub public_key: Option<PublicKey>,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    pub peers: BTreeMap<PublicKey, PeerSpec>,
    /// Peers with a current session (a handshake within the last [`SESSION_SECS`]): the
    /// endpoint the device has for them is proven to work, wherever they roamed to.
    pub live: BTreeSet<PublicKey>,
}

/// How long a WireGuard session stays usable after its handshake (REJECT_AFTER_TIME).
pub const SESSION_SECS: u64 = 180;

/// An owned route found in the kernel, with the link it points at (0 for an unreachable one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct OwnedRoute {
    pub route: Route,
    pub oif: u32,
}

/// What the kernel has of everything the agent owns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub link: Option<LinkState>,
    /// Addresses on the tunnel link (IPv6 link-local ones excluded).
    pub addresses: BTreeSet<IpNet>,
    pub device: Option<DeviceState>,
    /// Every route carrying the agent's protocol number, on any link, in any table.
    pub routes: BTreeSet<OwnedRoute>,
    /// Every rule carrying the agent's protocol number, read back as the agent makes them.
    pub rules: BTreeSet<Rule>,
    /// Rules carrying the agent's protocol number in a shape it never makes.
    pub unknown_rules: Vec<UnknownRule>,
    pub policy: PolicyObserved,
    pub clamp: ClampObserved,
    /// The endpoint this agent last wrote for each peer (its record in the state
    /// directory). A live peer found elsewhere roamed there, and stays.
    pub endpoints_set: BTreeMap<PublicKey, SocketAddr>,
    /// Forwarding sysctls, the records of their previous values, our nftables table and the
    /// host's addresses (for `own_traffic = "lan"`).
    pub gateway: crate::gateway::ObservedGateway,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifname_rules() {
        assert!("wf0".parse::<IfName>().is_ok());
        assert!("a234567890123456".parse::<IfName>().is_err());
        assert!("".parse::<IfName>().is_err());
        assert!("a/b".parse::<IfName>().is_err());
        assert!("a b".parse::<IfName>().is_err());
    }

    #[test]
    fn keys_roundtrip_and_redact() {
        let k = PrivateKey::generate();
        let back = PrivateKey::from_base64(&k.to_base64()).unwrap();
        assert_eq!(k, back);
        assert_eq!(format!("{k:?}"), "PrivateKey(<redacted>)");
        let p = k.public_key();
        assert_eq!(p.to_string().parse::<PublicKey>().unwrap(), p);
        assert!("abc".parse::<PublicKey>().is_err());
    }
}
