//! The agent's TOML config: parsed strictly, validated whole, errors name file, line and field.
//!
//! A config that fails here never reaches the reconciler, so the running state stays as it is.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use crate::control::config::{ControlConfig, RawControl};
use crate::model::{IfName, MssSetting, PublicKey, MAIN_TABLE};
use crate::policy::resolve::{resolve, RawPolicy};
use crate::policy::PolicyConfig;
use crate::primitives::{find_overlap, parse_prefix};
pub use crate::primitives::{Endpoint, PeerConfig};

mod document;
mod gateway;
mod incremental;
pub use gateway::{Forward, GatewayConfig};
pub use incremental::ConfigCache;

/// Default rtnetlink protocol number stamped on every route and rule the agent owns.
/// Not used by iproute2's /etc/iproute2/rt_protos or any routing daemon we know of.
pub const DEFAULT_ROUTE_PROTOCOL: u8 = 87;
/// Table and fwmark used for a default route through the tunnel (wg-quick uses the same).
pub const DEFAULT_POLICY_TABLE: u32 = 51820;
/// Priority of the first of the two policy rules; the second takes the next number.
pub const DEFAULT_RULE_PRIORITY: u32 = 5180;
/// Where the Prometheus metrics are served unless `[metrics] listen` says otherwise.
pub const DEFAULT_METRICS_LISTEN: SocketAddr =
    SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 9587));

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The I/O error is part of the message, not a `source` (shown once, in logs too).
    #[error("cannot read config {path}: {reason}")]
    Read { path: PathBuf, reason: std::io::Error },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid { path: PathBuf, line: usize, column: usize, message: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    Kernel,
    Userspace,
    #[default]
    Auto,
}

/// Where peer routes go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableChoice {
    /// Main table, unless an allowed-ip is a default route: then policy routing (as wg-quick).
    Auto,
    /// Always the main table, no rules.
    Main,
    /// This table, no rules (wg-quick's `Table = N`).
    Id(u32),
    /// No routes at all.
    Off,
}

#[derive(Clone, Debug)]
pub struct InterfaceConfig {
    pub name: IfName,
    pub backend: BackendChoice,
    pub private_key_file: PathBuf,
    pub listen_port: Option<u16>,
    pub addresses: BTreeSet<IpNet>,
    pub mtu: Option<u32>,
    /// `mss_clamp`: "auto" (default: what the MTU allows), an MSS, or "off".
    pub mss_clamp: MssSetting,
    pub fwmark: Option<u32>,
    /// Program serving the UAPI for the userspace backend (wireguard-go compatible).
    pub userspace_command: String,
}

#[derive(Clone, Debug)]
pub struct RoutingConfig {
    pub table: TableChoice,
    pub protocol: u8,
    pub rule_priority: u32,
    pub policy_table: u32,
    /// Prefixes that must never leave in clear: each gets an unreachable route below the
    /// tunnel's routes (`[routing] mesh_prefixes`; in control mode the control plane's list
    /// is added, see `control::effective_config`).
    pub mesh_prefixes: BTreeSet<IpNet>,
}

#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Where the agent remembers what it owns (survives kill -9).
    pub state_dir: PathBuf,
    /// Full resync period, on top of the netlink events that trigger one at once.
    pub resync_interval_secs: u64,
    /// Every flow event (new allowed flow, deny) as a JSON line in this file (absolute).
    pub flow_log: Option<PathBuf>,
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricsConfig {
    /// `None`: no endpoint (`listen = ""`).
    pub listen: Option<SocketAddr>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { listen: Some(DEFAULT_METRICS_LISTEN) }
    }
}

/// A validated config.
#[derive(Clone, Debug)]
pub struct Config {
    pub path: PathBuf,
    pub interface: InterfaceConfig,
    pub peers: Vec<PeerConfig>,
    pub routing: RoutingConfig,
    pub agent: AgentConfig,
    /// `[policy]`: `None` = no eBPF enforcement at all; present = default deny, fail closed.
    pub policy: Option<PolicyConfig>,
    /// `[control]`: peers, addresses and policy come from a control plane.
    pub control: Option<ControlConfig>,
    pub metrics: MetricsConfig,
    /// `[gateway]`: forwarding, masquerade, the source of the node's own traffic.
    pub gateway: GatewayConfig,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    interface: RawInterface,
    #[serde(default)]
    peers: Vec<Spanned<RawPeer>>,
    #[serde(default)]
    routing: Option<RawRouting>,
    #[serde(default)]
    agent: Option<RawAgent>,
    #[serde(default)]
    policy: Option<RawPolicy>,
    #[serde(default)]
    control: Option<Spanned<RawControl>>,
    #[serde(default)]
    metrics: Option<RawMetrics>,
    #[serde(default)]
    gateway: Option<Spanned<gateway::RawGateway>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInterface {
    name: Spanned<String>,
    #[serde(default)]
    backend: BackendChoice,
    private_key_file: PathBuf,
    listen_port: Option<u16>,
    #[serde(default)]
    addresses: Vec<Spanned<String>>,
    mtu: Option<Spanned<u32>>,
    mss_clamp: Option<Spanned<toml::Value>>,
    fwmark: Option<u32>,
    userspace_command: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    public_key: Spanned<String>,
    name: Option<String>,
    endpoint: Option<Spanned<String>>,
    #[serde(default)]
    allowed_ips: Vec<Spanned<String>>,
    persistent_keepalive: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouting {
    table: Option<Spanned<toml::Value>>,
    protocol: Option<Spanned<u8>>,
    rule_priority: Option<u32>,
    policy_table: Option<Spanned<u32>>,
    #[serde(default)]
    mesh_prefixes: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    state_dir: Option<PathBuf>,
    resync_interval_secs: Option<Spanned<u64>>,
    flow_log: Option<Spanned<PathBuf>>,
}

/// Smallest MSS `mss_clamp` accepts: IPv4's minimum (576-byte datagrams).
const MIN_MSS: i64 = 536;
/// Largest: a 65535-byte IPv4 datagram less the headers.
const MAX_MSS: i64 = 65495;

fn parse_mss_clamp(v: &toml::Value) -> Result<MssSetting, String> {
    match v {
        toml::Value::String(s) if s == "auto" => Ok(MssSetting::Auto),
        toml::Value::String(s) if s == "off" => Ok(MssSetting::Off),
        toml::Value::Integer(n) if (MIN_MSS..=MAX_MSS).contains(n) => Ok(MssSetting::Fixed(*n as u16)),
        toml::Value::Integer(n) => Err(format!("{n} is outside {MIN_MSS}..={MAX_MSS}")),
        other => Err(format!("expected \"auto\", \"off\" or an MSS ({MIN_MSS}..={MAX_MSS}), found {other}")),
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|reason| ConfigError::Read { path: path.to_owned(), reason })?;
        Config::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = document::deserialize(path, text)?;
        Config::validate(path, text, raw, None)
    }

    /// Validates a parsed document. `peers`: `None` validates `raw.peers`; `Some` are peers
    /// validated already, one by one and free of duplicate keys (the incremental parser's,
    /// which passes the sections around the peers as a `text` of their own: what is built
    /// here must not depend on positions in `text`, only error messages may).
    fn validate(
        path: &Path,
        text: &str,
        raw: RawConfig,
        peers: Option<Vec<PeerConfig>>,
    ) -> Result<Config, ConfigError> {
        let at = |span: Range<usize>, message: String| {
            let (line, column) = line_col(text, span.start);
            ConfigError::Invalid { path: path.to_owned(), line, column, message }
        };
        // Line starts, once: a config of 10,000 peers must not rescan the text per peer.
        let starts: Vec<usize> = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
        let line_of = |span: Range<usize>| starts.partition_point(|&s| s <= span.start);

        let iface = raw.interface;
        // In control mode these come from the control plane; refused before anything
        // resolves them (a group may name peers, which this file has none of).
        if raw.control.is_some() {
            if let Some(a) = iface.addresses.first() {
                return Err(at(
                    a.span(),
                    "interface.addresses: in control mode ([control]) the control plane sends the addresses".into(),
                ));
            }
            if let Some(span) = raw.policy.as_ref().and_then(RawPolicy::first_group) {
                return Err(at(
                    span,
                    "policy.groups: in control mode ([control]) the control plane sends the groups; keep only [policy] pin_dir"
                        .into(),
                ));
            }
        }
        let name: IfName =
            iface.name.get_ref().parse().map_err(|e| at(iface.name.span(), format!("interface.name: {e}")))?;
        let mut addresses = BTreeSet::new();
        for a in &iface.addresses {
            let net: IpNet = a.get_ref().parse().map_err(|_| {
                at(
                    a.span(),
                    format!("interface.addresses: {:?} is not an address/prefix (e.g. 10.77.0.1/24)", a.get_ref()),
                )
            })?;
            if !addresses.insert(net) {
                return Err(at(a.span(), format!("interface.addresses: {net} is listed twice")));
            }
        }
        if let Some(mtu) = &iface.mtu {
            if !(576..=65535).contains(mtu.get_ref()) {
                return Err(at(mtu.span(), format!("interface.mtu: {} is outside 576..=65535", mtu.get_ref())));
            }
        }
        let mss_clamp = match &iface.mss_clamp {
            None => MssSetting::Auto,
            Some(v) => parse_mss_clamp(v.get_ref()).map_err(|m| at(v.span(), format!("interface.mss_clamp: {m}")))?,
        };
        let interface = InterfaceConfig {
            mss_clamp,
            name,
            backend: iface.backend,
            private_key_file: iface.private_key_file,
            listen_port: iface.listen_port,
            addresses,
            mtu: iface.mtu.map(|m| m.into_inner()),
            fwmark: iface.fwmark.filter(|m| *m != 0),
            userspace_command: iface.userspace_command.unwrap_or_else(|| "wireguard-go".into()),
        };

        let peers = match peers {
            Some(peers) => peers,
            None => {
                let mut peers = Vec::with_capacity(raw.peers.len());
                let mut seen: BTreeMap<PublicKey, usize> = BTreeMap::new();
                for (i, peer) in raw.peers.iter().enumerate() {
                    let line = line_of(peer.span());
                    let peer = peer.get_ref();
                    let public_key = peer_key(i, peer).map_err(|(span, m)| at(span, m))?;
                    if let Some(first) = seen.insert(public_key, line) {
                        return Err(at(
                            peer.public_key.span(),
                            format!(
                                "peers[{i}].public_key: duplicate peer {public_key} (first defined on line {first})"
                            ),
                        ));
                    }
                    peers.push(peer_config(i, peer, public_key, line).map_err(|(span, m)| at(span, m))?);
                }
                peers
            }
        };
        // `peer:<name>` in a policy must mean one peer, whether or not a rule uses it yet.
        let mut names: BTreeMap<&str, usize> = BTreeMap::new();
        for (b, peer) in peers.iter().enumerate() {
            let Some(name) = peer.name.as_deref() else { continue };
            if let Some(a) = names.insert(name, b) {
                return Err(ConfigError::Invalid {
                    path: path.to_owned(),
                    line: peer.line,
                    column: 1,
                    message: format!(
                        "peers[{b}].name: {name:?} is already the name of peers[{a}] (line {}); peer names must be unique",
                        peers[a].line
                    ),
                });
            }
        }
        if let Some((a, b, net_a, net_b)) = find_overlap(&peers) {
            let (pa, pb) = (&peers[a], &peers[b]);
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                line: pb.line,
                column: 1,
                message: format!(
                    "peers[{b}].allowed_ips: {net_b} of peer {} overlaps {net_a} of peer {} (line {}); \
                     WireGuard routes each address to exactly one peer",
                    pb.public_key, pa.public_key, pa.line
                ),
            });
        }

        let routing = match raw.routing {
            None => RoutingConfig {
                table: TableChoice::Auto,
                protocol: DEFAULT_ROUTE_PROTOCOL,
                rule_priority: DEFAULT_RULE_PRIORITY,
                policy_table: DEFAULT_POLICY_TABLE,
                mesh_prefixes: BTreeSet::new(),
            },
            Some(r) => {
                let table = match &r.table {
                    None => TableChoice::Auto,
                    Some(v) => parse_table(v.get_ref()).map_err(|m| at(v.span(), format!("routing.table: {m}")))?,
                };
                let protocol = match &r.protocol {
                    None => DEFAULT_ROUTE_PROTOCOL,
                    // 0..=4 are the kernel's own (unspec, redirect, kernel, boot, static).
                    Some(p) if *p.get_ref() <= 4 => {
                        return Err(at(
                            p.span(),
                            format!("routing.protocol: {} is reserved for the kernel and static routes", p.get_ref()),
                        ))
                    }
                    Some(p) => *p.get_ref(),
                };
                let policy_table = match &r.policy_table {
                    None => DEFAULT_POLICY_TABLE,
                    Some(t) if reserved_table(*t.get_ref()) => {
                        return Err(at(t.span(), format!("routing.policy_table: {} is a reserved table", t.get_ref())))
                    }
                    Some(t) => *t.get_ref(),
                };
                let mut mesh_prefixes = BTreeSet::new();
                for p in &r.mesh_prefixes {
                    let net = crate::primitives::parse_prefix(p.get_ref())
                        .map_err(|m| at(p.span(), format!("routing.mesh_prefixes: {m}")))?;
                    if net.prefix_len() == 0 {
                        return Err(at(
                            p.span(),
                            format!("routing.mesh_prefixes: {net} takes in every address; it would cut this host off"),
                        ));
                    }
                    if !mesh_prefixes.insert(net) {
                        return Err(at(p.span(), format!("routing.mesh_prefixes: {net} is listed twice")));
                    }
                }
                RoutingConfig {
                    table,
                    protocol,
                    rule_priority: r.rule_priority.unwrap_or(DEFAULT_RULE_PRIORITY),
                    policy_table,
                    mesh_prefixes,
                }
            }
        };

        let agent = match raw.agent {
            None => AgentConfig { state_dir: default_state_dir(), resync_interval_secs: 30, flow_log: None },
            Some(a) => {
                let resync = match a.resync_interval_secs {
                    None => 30,
                    Some(s) if *s.get_ref() == 0 => {
                        return Err(at(s.span(), "agent.resync_interval_secs: must be at least 1".into()))
                    }
                    Some(s) => s.into_inner(),
                };
                let flow_log = match a.flow_log {
                    Some(p) if !p.get_ref().is_absolute() => {
                        return Err(at(p.span(), "agent.flow_log: must be an absolute path".into()))
                    }
                    p => p.map(Spanned::into_inner),
                };
                AgentConfig {
                    state_dir: a.state_dir.unwrap_or_else(default_state_dir),
                    resync_interval_secs: resync,
                    flow_log,
                }
            }
        };

        let policy = match raw.policy {
            None => None,
            Some(p) => Some(resolve(p, &peers, &interface.addresses).map_err(|e| at(e.span, e.message))?),
        };

        let control = match raw.control {
            None => None,
            Some(c) => {
                let span = c.span();
                if let Some(p) = peers.first() {
                    return Err(ConfigError::Invalid {
                        path: path.to_owned(),
                        line: p.line,
                        column: 1,
                        message: "peers: in control mode ([control]) the control plane sends the peers".into(),
                    });
                }
                if policy.as_ref().is_some_and(|p| !p.policy.rules().is_empty()) {
                    return Err(at(span, "policy.rules: in control mode ([control]) the control plane sends the policy; keep only [policy] pin_dir".into()));
                }
                Some(c.into_inner().resolve().map_err(|e| at(e.span, e.message))?)
            }
        };

        let metrics = match raw.metrics.and_then(|m| m.listen) {
            None => MetricsConfig::default(),
            Some(l) if l.get_ref().is_empty() => MetricsConfig { listen: None },
            Some(l) => match l.get_ref().parse::<SocketAddr>() {
                Ok(addr) if addr.port() != 0 => MetricsConfig { listen: Some(addr) },
                Ok(_) => return Err(at(l.span(), "metrics.listen: port 0 is not a port scrapers can find".into())),
                Err(_) => {
                    return Err(at(
                        l.span(),
                        format!(
                            "metrics.listen: {:?} is not ip:port (e.g. 127.0.0.1:9587 or [::1]:9587; \"\" turns metrics off)",
                            l.get_ref()
                        ),
                    ))
                }
            },
        };

        let gateway = match raw.gateway {
            None => GatewayConfig::default(),
            Some(g) => {
                let span = g.span();
                let cx = gateway::Context {
                    span,
                    address_families: control
                        .is_none()
                        .then(|| interface.addresses.iter().map(crate::model::Family::of).collect()),
                    advertise_routes: control.as_ref().map(|c| c.advertise_routes.as_slice()),
                };
                g.into_inner().resolve(cx).map_err(|(span, m)| at(span, m))?
            }
        };

        Ok(Config { path: path.to_owned(), interface, peers, routing, agent, policy, control, metrics, gateway })
    }
}

/// A message for the text at a byte range.
type FieldError = (Range<usize>, String);

/// A peer's public key; checked before its other fields (a duplicate is reported first).
fn peer_key(i: usize, peer: &RawPeer) -> Result<PublicKey, FieldError> {
    let key = &peer.public_key;
    key.get_ref().parse().map_err(|e| (key.span(), format!("peers[{i}].public_key: {e}")))
}

/// A peer's other fields. Depends on nothing but the entry itself (and `i`, `line` for
/// messages), so the incremental parser can keep the result per block.
fn peer_config(i: usize, peer: &RawPeer, public_key: PublicKey, line: usize) -> Result<PeerConfig, FieldError> {
    let field = |f: &str| format!("peers[{i}].{f}");
    let endpoint = match &peer.endpoint {
        None => None,
        Some(e) => Some(Endpoint::parse(e.get_ref()).map_err(|m| (e.span(), format!("{}: {m}", field("endpoint"))))?),
    };
    let mut allowed_ips = BTreeSet::new();
    for a in &peer.allowed_ips {
        let net = parse_prefix(a.get_ref()).map_err(|m| (a.span(), format!("{}: {m}", field("allowed_ips"))))?;
        allowed_ips.insert(net);
    }
    Ok(PeerConfig {
        public_key,
        name: peer.name.clone(),
        endpoint,
        allowed_ips,
        persistent_keepalive: peer.persistent_keepalive.filter(|k| *k != 0),
        line,
    })
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/wirefence")
}

fn reserved_table(t: u32) -> bool {
    // unspec, default, main, local
    matches!(t, 0 | 253 | 254 | 255)
}

fn parse_table(v: &toml::Value) -> Result<TableChoice, String> {
    match v {
        toml::Value::String(s) if s == "auto" => Ok(TableChoice::Auto),
        toml::Value::String(s) if s == "main" => Ok(TableChoice::Main),
        toml::Value::String(s) if s == "off" => Ok(TableChoice::Off),
        toml::Value::Integer(n) if *n == MAIN_TABLE as i64 => Ok(TableChoice::Main),
        toml::Value::Integer(n) if (1..=u32::MAX as i64).contains(n) && !reserved_table(*n as u32) => {
            Ok(TableChoice::Id(*n as u32))
        }
        other => {
            Err(format!("{other} is not \"auto\", \"main\", \"off\" or a table number (1..=4294967295, not 253/255)"))
        }
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "YFCnHVjyRuQ7Ay8kU/1jHeGKCVXAntoDIWcl5gSOE2U=";
    const KEY_B: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("agent.toml"), text)
    }

    fn base() -> String {
        "[interface]\nname = \"wf0\"\nprivate_key_file = \"/k\"\naddresses = [\"10.77.0.1/24\", \"fd77::1/64\"]\n"
            .into()
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn parses_the_documented_example() {
        let text = format!(
            "{}listen_port = 51820\nbackend = \"auto\"\n\n[[peers]]\npublic_key = \"{KEY_A}\"\nendpoint = \"192.0.2.2:51820\"\n\
             allowed_ips = [\"10.77.0.2/32\", \"fd77::2/128\", \"10.88.0.0/24\"]\npersistent_keepalive = 25\n\n\
             [[peers]]\npublic_key = \"{KEY_B}\"\nendpoint = \"[2001:db8::1]:51820\"\n",
            base()
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.interface.name.as_str(), "wf0");
        assert_eq!(c.interface.addresses.len(), 2);
        assert_eq!(c.peers.len(), 2);
        assert_eq!(c.peers[0].allowed_ips.len(), 3);
        assert_eq!(c.peers[0].persistent_keepalive, Some(25));
        assert_eq!(c.peers[1].endpoint, Some(Endpoint::Addr("[2001:db8::1]:51820".parse().unwrap())));
        assert_eq!(c.routing.table, TableChoice::Auto);
    }

    #[test]
    fn a_flow_log_is_an_absolute_path() {
        let c = parse(&format!("{}[agent]\nflow_log = \"/var/log/wirefence/flows.jsonl\"\n", base())).unwrap();
        assert_eq!(c.agent.flow_log.as_deref(), Some(Path::new("/var/log/wirefence/flows.jsonl")));
        assert!(parse(&base()).unwrap().agent.flow_log.is_none());
        let e = err(&format!("{}[agent]\nflow_log = \"flows.jsonl\"\n", base()));
        assert!(e.contains("agent.toml:6") && e.contains("agent.flow_log: must be an absolute path"), "{e}");
    }

    #[test]
    fn unknown_field_names_line_and_field() {
        let e = err(&format!("{}colour = \"blue\"\n", base()));
        assert!(e.starts_with("agent.toml:5:"), "{e}");
        assert!(e.contains("unknown field `colour`"), "{e}");
    }

    #[test]
    fn bad_key_names_line_and_field() {
        let e = err(&format!("{}[[peers]]\npublic_key = \"nope\"\n", base()));
        assert!(e.starts_with("agent.toml:6:"), "{e}");
        assert!(e.contains("peers[0].public_key"), "{e}");
    }

    #[test]
    fn bad_cidr_names_line_and_field() {
        let e = err(&format!("{}[[peers]]\npublic_key = \"{KEY_A}\"\nallowed_ips = [\"10.0.0.300/32\"]\n", base()));
        assert!(e.starts_with("agent.toml:7:"), "{e}");
        assert!(e.contains("peers[0].allowed_ips"), "{e}");
        let e = err(&format!("{}[[peers]]\npublic_key = \"{KEY_A}\"\nallowed_ips = [\"10.0.0.1/24\"]\n", base()));
        assert!(e.contains("did you mean 10.0.0.0/24"), "{e}");
        let e = err("[interface]\nname = \"wf0\"\nprivate_key_file = \"/k\"\naddresses = [\"bogus\"]\n");
        assert!(e.starts_with("agent.toml:4:") && e.contains("interface.addresses"), "{e}");
    }

    #[test]
    fn duplicate_peer_is_rejected() {
        let e = err(&format!("{}[[peers]]\npublic_key = \"{KEY_A}\"\n[[peers]]\npublic_key = \"{KEY_A}\"\n", base()));
        assert!(e.starts_with("agent.toml:8:"), "{e}");
        assert!(e.contains("duplicate peer") && e.contains("line 5"), "{e}");
    }

    #[test]
    fn duplicate_peer_name_is_rejected() {
        let peer = |key: &str, name: &str| format!("[[peers]]\npublic_key = \"{key}\"\nname = \"{name}\"\n");
        let e = err(&format!("{}{}{}", base(), peer(KEY_A, "db"), peer(KEY_B, "db")));
        assert!(e.starts_with("agent.toml:8:1: peers[1].name: \"db\" is already the name of peers[0] (line 5)"), "{e}");
        // The incremental parser falls back to the full parse, so it says the same.
        let text = format!("{}{}{}", base(), peer(KEY_A, "db"), peer(KEY_B, "db"));
        let e = ConfigCache::default().parse(Path::new("agent.toml"), &text).unwrap_err().to_string();
        assert!(e.contains("is already the name of peers[0]"), "{e}");
        parse(&format!("{}{}{}", base(), peer(KEY_A, "db"), peer(KEY_B, "web"))).unwrap();
    }

    #[test]
    fn an_endpoint_without_a_port_names_the_field() {
        let e = err(&format!("{}[[peers]]\npublic_key = \"{KEY_A}\"\nendpoint = \"[fd00::1]\"\n", base()));
        assert!(e.starts_with("agent.toml:7:12: peers[0].endpoint: endpoint \"[fd00::1]\" has no port"), "{e}");
    }

    #[test]
    fn overlapping_allowed_ips_between_peers_rejected() {
        let e = err(&format!(
            "{}[[peers]]\npublic_key = \"{KEY_A}\"\nallowed_ips = [\"10.88.0.0/16\"]\n\
             [[peers]]\npublic_key = \"{KEY_B}\"\nallowed_ips = [\"10.99.0.1/32\", \"10.88.3.0/24\"]\n",
            base()
        ));
        assert!(e.starts_with("agent.toml:8:"), "{e}");
        assert!(e.contains("10.88.3.0/24") && e.contains("10.88.0.0/16"), "{e}");
        // Within one peer, nesting is allowed (WireGuard keeps the most specific).
        parse(&format!(
            "{}[[peers]]\npublic_key = \"{KEY_A}\"\nallowed_ips = [\"10.88.0.0/16\", \"10.88.1.0/24\"]\n",
            base()
        ))
        .unwrap();
        // v4 and v6 never overlap.
        parse(&format!(
            "{}[[peers]]\npublic_key = \"{KEY_A}\"\nallowed_ips = [\"0.0.0.0/0\"]\n[[peers]]\npublic_key = \"{KEY_B}\"\nallowed_ips = [\"::/0\"]\n",
            base()
        ))
        .unwrap();
    }

    #[test]
    fn mss_clamp_is_auto_a_number_or_off() {
        let with = |v: &str| format!("[interface]\nname = \"wf0\"\nprivate_key_file = \"/k\"\nmss_clamp = {v}\n");
        assert_eq!(
            parse("[interface]\nname = \"wf0\"\nprivate_key_file = \"/k\"\n").unwrap().interface.mss_clamp,
            MssSetting::Auto
        );
        assert_eq!(parse(&with("\"auto\"")).unwrap().interface.mss_clamp, MssSetting::Auto);
        assert_eq!(parse(&with("\"off\"")).unwrap().interface.mss_clamp, MssSetting::Off);
        assert_eq!(parse(&with("1360")).unwrap().interface.mss_clamp, MssSetting::Fixed(1360));
        for (v, says) in [
            ("100", "100 is outside 536..=65495"),
            ("70000", "outside"),
            ("\"on\"", "expected \"auto\", \"off\" or an MSS"),
            ("true", "expected"),
            ("-1", "outside"),
        ] {
            let e = err(&with(v));
            assert!(
                e.starts_with("agent.toml:4:") && e.contains("interface.mss_clamp") && e.contains(says),
                "{v}: {e}"
            );
        }
    }

    #[test]
    fn syntax_error_has_position() {
        let e = err("[interface\nname = 1\n");
        assert!(e.starts_with("agent.toml:1:"), "{e}");
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            Endpoint::parse("gw.example:51820").unwrap(),
            Endpoint::Host { host: "gw.example".into(), port: 51820 }
        );
        assert!(Endpoint::parse("gw.example").is_err());
        assert!(Endpoint::parse("fd00::1:51820").is_err());
        assert!(Endpoint::parse("h:99999").is_err());
    }

    #[test]
    fn mesh_prefixes_are_parsed_and_checked() {
        let c = parse(&format!("{}[routing]\nmesh_prefixes = [\"10.20.0.0/16\", \"fd20::/48\"]\n", base())).unwrap();
        assert_eq!(c.routing.mesh_prefixes.len(), 2);
        let e = err(&format!("{}[routing]\nmesh_prefixes = [\"0.0.0.0/0\"]\n", base()));
        assert!(e.contains("routing.mesh_prefixes: 0.0.0.0/0 takes in every address"), "{e}");
        let e = err(&format!("{}[routing]\nmesh_prefixes = [\"10.20.0.1/16\"]\n", base()));
        assert!(e.starts_with("agent.toml:") && e.contains("routing.mesh_prefixes"), "{e}");
        let e = err(&format!("{}[routing]\nmesh_prefixes = [\"10.20.0.0/16\", \"10.20.0.0/16\"]\n", base()));
        assert!(e.contains("listed twice"), "{e}");
    }

    #[test]
    fn routing_table_values() {
        let c = parse(&format!("{}[routing]\ntable = 1234\n", base())).unwrap();
        assert_eq!(c.routing.table, TableChoice::Id(1234));
        let e = err(&format!("{}[routing]\ntable = \"nope\"\n", base()));
        assert!(e.starts_with("agent.toml:6:") && e.contains("routing.table"), "{e}");
        let e = err(&format!("{}[routing]\nprotocol = 2\n", base()));
        assert!(e.contains("routing.protocol"), "{e}");
    }

    #[test]
    fn metrics_listen_default_off_and_errors() {
        assert_eq!(parse(&base()).unwrap().metrics.listen, Some(DEFAULT_METRICS_LISTEN));
        assert_eq!(DEFAULT_METRICS_LISTEN.to_string(), "127.0.0.1:9587");
        let c = parse(&format!("{}[metrics]\nlisten = \"[::1]:9100\"\n", base())).unwrap();
        assert_eq!(c.metrics.listen, Some("[::1]:9100".parse().unwrap()));
        assert_eq!(parse(&format!("{}[metrics]\nlisten = \"\"\n", base())).unwrap().metrics.listen, None);
        let e = err(&format!("{}[metrics]\nlisten = \"localhost:9587\"\n", base()));
        assert!(e.starts_with("agent.toml:6:10: metrics.listen: \"localhost:9587\" is not ip:port"), "{e}");
        let e = err(&format!("{}[metrics]\nlisten = \"127.0.0.1:0\"\n", base()));
        assert!(e.starts_with("agent.toml:6:") && e.contains("port 0"), "{e}");
        let e = err(&format!("{}[metrics]\nport = 1\n", base()));
        assert!(e.contains("unknown field") && e.contains("port"), "{e}");
    }
}
