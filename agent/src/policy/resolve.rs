//! The `[policy]` config section: raw TOML (with spans) -> [`PolicyConfig`].
//!
//! Selectors (in `from`, `to` and groups): a CIDR (host bits set is an error), a bare
//! address (/32 or /128), `peer:<public key or name>` (that peer's allowed_ips),
//! `group:<name>`, `self` (this node's interface addresses as host prefixes), `any`
//! (0.0.0.0/0 and ::/0). Groups hold any selector but another group.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;
use wirefence_proto::policy::{valid_name, PortRangeError, NAME_CHARS};

use super::model::{parse_proto, Policy, PortRange, Rule, RuleDirection};
use super::PolicyError;
use crate::model::PublicKey;
use crate::primitives::{parse_prefix, PeerConfig};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/wirefence";

/// A present `[policy]` section: eBPF enforcement on, default deny.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyConfig {
    /// Where programs and maps are pinned in bpffs.
    pub pin_dir: PathBuf,
    pub policy: Policy,
}

/// An error at a byte range of the config text; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ResolveError {
    pub span: Range<usize>,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPolicy {
    pin_dir: Option<Spanned<PathBuf>>,
    #[serde(default)]
    groups: BTreeMap<Spanned<String>, Vec<Spanned<String>>>,
    #[serde(default)]
    rules: Vec<Spanned<RawRule>>,
}

impl RawPolicy {
    /// Where the first `[policy.groups]` entry is written, if there is one.
    pub(crate) fn first_group(&self) -> Option<Range<usize>> {
        self.groups.keys().map(|k| k.span()).min_by_key(|s| s.start)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    id: Spanned<String>,
    from: Spanned<Vec<Spanned<String>>>,
    to: Spanned<Vec<Spanned<String>>>,
    proto: Option<Spanned<toml::Value>>,
    ports: Option<Spanned<Vec<Spanned<toml::Value>>>>,
    direction: Option<Spanned<String>>,
}

enum Selector<'a> {
    Net(IpNet),
    Peer(&'a str),
    Group(&'a str),
    SelfAddrs,
    Any,
}

fn parse_selector(s: &str) -> Result<Selector<'_>, String> {
    Ok(match s {
        "any" => Selector::Any,
        "self" => Selector::SelfAddrs,
        _ => {
            if let Some(p) = s.strip_prefix("peer:") {
                if p.is_empty() {
                    return Err("\"peer:\" needs a public key or a peer name".into());
                }
                Selector::Peer(p)
            } else if let Some(g) = s.strip_prefix("group:") {
                Selector::Group(g)
            } else {
                Selector::Net(parse_prefix(s).map_err(|m| {
                    if m.contains("host bits") {
                        m
                    } else {
                        format!(
                            "{s:?} is not a selector: a CIDR, an address, peer:<key or name>, group:<name>, self or any"
                        )
                    }
                })?)
            }
        }
    })
}

struct Resolver<'a> {
    peers: &'a [PeerConfig],
    self_addrs: &'a BTreeSet<IpNet>,
    groups: BTreeMap<String, Vec<IpNet>>,
}

impl Resolver<'_> {
    fn peer(&self, who: &str) -> Result<&PeerConfig, String> {
        if let Ok(key) = who.parse::<PublicKey>() {
            if let Some(p) = self.peers.iter().find(|p| p.public_key == key) {
                return Ok(p);
            }
        }
        let named: Vec<(usize, &PeerConfig)> =
            self.peers.iter().enumerate().filter(|(_, p)| p.name.as_deref() == Some(who)).collect();
        match named[..] {
            [(_, p)] => Ok(p),
            [] => Err(format!("unknown peer {who:?}: no [[peers]] entry has this public key or name")),
            [(a, pa), (b, pb), ..] => Err(format!(
                "peer name {who:?} is ambiguous: peers[{a}] (line {}) and peers[{b}] (line {}) share it; use the public key",
                pa.line, pb.line
            )),
        }
    }

    /// Adds the prefixes of selector `s` to `out`; `field` names it in messages.
    fn select(
        &self,
        s: &Spanned<String>,
        field: &str,
        in_group: bool,
        out: &mut Vec<IpNet>,
    ) -> Result<(), ResolveError> {
        let err = |message: String| ResolveError { span: s.span(), message: format!("{field}: {message}") };
        match parse_selector(s.get_ref()).map_err(err)? {
            Selector::Net(n) => out.push(n),
            Selector::Any => out.extend(["0.0.0.0/0", "::/0"].map(|n| n.parse::<IpNet>().expect("valid"))),
            Selector::SelfAddrs => out.extend(self.self_addrs.iter().map(|a| IpNet::from(a.addr()))),
            Selector::Peer(who) => out.extend(self.peer(who).map_err(err)?.allowed_ips.iter().copied()),
            Selector::Group(g) if in_group => {
                return Err(err(format!("group:{g}: groups cannot contain groups")));
            }
            Selector::Group(g) => match self.groups.get(g) {
                Some(nets) => out.extend(nets.iter().copied()),
                None => return Err(err(format!("unknown group {g:?} (define it under [policy.groups])"))),
            },
        }
        Ok(())
    }

    fn select_all(&self, list: &[Spanned<String>], field: &str, in_group: bool) -> Result<Vec<IpNet>, ResolveError> {
        let mut out = Vec::new();
        for (i, s) in list.iter().enumerate() {
            self.select(s, &format!("{field}[{i}]"), in_group, &mut out)?;
        }
        Ok(out)
    }
}

fn parse_port(v: &toml::Value) -> Result<PortRange, String> {
    let parsed = match v {
        toml::Value::Integer(n) => PortRange::try_from(*n),
        toml::Value::String(s) => s.parse(),
        _ => Err(PortRangeError::NotAPort),
    };
    parsed.map_err(|e| match e {
        PortRangeError::NotAPort => format!("{v} is not a port (0-65535) or a range (\"low-high\")"),
        PortRangeError::Inverted { first, last } => format!("{first}-{last} is inverted (write low-high)"),
    })
}

/// Resolves `[policy]` against the config's peers and interface addresses.
pub(crate) fn resolve(
    raw: RawPolicy,
    peers: &[PeerConfig],
    self_addrs: &BTreeSet<IpNet>,
) -> Result<PolicyConfig, ResolveError> {
    let pin_dir = match raw.pin_dir {
        None => PathBuf::from(DEFAULT_PIN_DIR),
        Some(p) if p.get_ref().is_absolute() => p.into_inner(),
        Some(p) => {
            return Err(ResolveError {
                span: p.span(),
                message: format!("policy.pin_dir: {} is not an absolute path", p.get_ref().display()),
            })
        }
    };

    let mut r = Resolver { peers, self_addrs, groups: BTreeMap::new() };
    for (name, members) in &raw.groups {
        let field = format!("policy.groups.{}", name.get_ref());
        if !valid_name(name.get_ref()) {
            return Err(ResolveError { span: name.span(), message: format!("{field}: a group name is {NAME_CHARS}") });
        }
        let nets = r.select_all(members, &field, true)?;
        r.groups.insert(name.get_ref().clone(), nets);
    }

    let mut rules = Vec::with_capacity(raw.rules.len());
    for (i, spanned) in raw.rules.iter().enumerate() {
        let raw = spanned.get_ref();
        let field = |f: &str| format!("policy.rules[{i}].{f}");
        let proto = match &raw.proto {
            None => None,
            Some(v) => {
                let parsed = match v.get_ref() {
                    toml::Value::String(s) => parse_proto(s),
                    toml::Value::Integer(n) => {
                        u8::try_from(*n).map(Some).map_err(|_| format!("{n} is not a protocol number (0-255)"))
                    }
                    other => Err(format!("{other} is not a protocol name or number")),
                };
                parsed.map_err(|m| ResolveError { span: v.span(), message: format!("{}: {m}", field("proto")) })?
            }
        };
        let mut ports = Vec::new();
        for (j, p) in raw.ports.iter().flat_map(|p| p.get_ref()).enumerate() {
            ports.push(parse_port(p.get_ref()).map_err(|m| ResolveError {
                span: p.span(),
                message: format!("{}: {m}", field(&format!("ports[{j}]"))),
            })?);
        }
        let direction = match &raw.direction {
            None => RuleDirection::Both,
            Some(d) => RuleDirection::parse(d.get_ref())
                .map_err(|m| ResolveError { span: d.span(), message: format!("{}: {m}", field("direction")) })?,
        };
        rules.push(Rule {
            id: raw.id.get_ref().clone(),
            from: r.select_all(raw.from.get_ref(), &field("from"), false)?,
            to: r.select_all(raw.to.get_ref(), &field("to"), false)?,
            proto,
            ports,
            direction,
        });
    }

    let policy = Policy::new(rules).map_err(|e| {
        let span = match (e.rule_index().map(|i| &raw.rules[i]), &e) {
            (Some(r), PolicyError::InvalidId { .. } | PolicyError::DuplicateId { .. }) => r.get_ref().id.span(),
            (Some(r), PolicyError::PortsWithoutPortProtocol { .. }) => {
                r.get_ref().ports.as_ref().map_or(r.span(), |p| p.span())
            }
            (Some(r), _) => r.span(),
            (None, _) => 0..0,
        };
        ResolveError { span, message: format!("policy.{e}") }
    })?;
    Ok(PolicyConfig { pin_dir, policy })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Config, ConfigError};
    use crate::policy::model::{Policy, PortRange, RuleDirection, PROTO_TCP};

    const KEY_A: &str = "YFCnHVjyRuQ7Ay8kU/1jHeGKCVXAntoDIWcl5gSOE2U=";
    const KEY_B: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

    /// 14 lines; `[policy]` text starts on line 15.
    fn base() -> String {
        format!(
            "[interface]\nname = \"wf0\"\nprivate_key_file = \"/k\"\naddresses = [\"10.77.0.1/24\", \"fd77::1/64\"]\n\n\
             [[peers]]\npublic_key = \"{KEY_A}\"\nname = \"gw-2\"\nallowed_ips = [\"10.77.0.2/32\", \"fd77::2/128\"]\n\n\
             [[peers]]\npublic_key = \"{KEY_B}\"\nallowed_ips = [\"10.88.0.0/24\"]\n\n"
        )
    }

    fn parse(policy: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("agent.toml"), &(base() + policy))
    }

    fn policy(text: &str) -> Policy {
        parse(text).unwrap().policy.expect("a [policy] section").policy
    }

    fn err(policy: &str) -> String {
        parse(policy).unwrap_err().to_string()
    }

    fn nets(s: &[&str]) -> Vec<ipnet::IpNet> {
        s.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn absent_section_means_no_enforcement() {
        assert!(parse("").unwrap().policy.is_none());
        let c = parse("[policy]\n").unwrap().policy.unwrap();
        assert_eq!(c.pin_dir, Path::new(super::DEFAULT_PIN_DIR));
        assert!(c.policy.rules().is_empty(), "present and empty: deny everything");
        let c = parse("[policy]\npin_dir = \"/sys/fs/bpf/x\"\n").unwrap().policy.unwrap();
        assert_eq!(c.pin_dir, Path::new("/sys/fs/bpf/x"));
    }

    #[test]
    fn resolves_selectors() {
        let p = policy(&format!(
            "[policy]\n[policy.groups]\nweb = [\"10.77.0.2/32\", \"fd77::2/128\"]\n\
             admins = [\"peer:{KEY_B}\", \"peer:gw-2\", \"10.99.0.7\"]\n\n\
             [[policy.rules]]\nid = \"web\"\nfrom = [\"10.77.0.0/24\", \"fd77::/64\"]\nto = [\"group:web\"]\n\
             proto = \"tcp\"\nports = [\"80\", \"8000-8080\", 443, \"79\"]\n\n\
             [[policy.rules]]\nid = \"admin-ssh\"\nfrom = [\"group:admins\"]\nto = [\"self\"]\nproto = 6\n\
             ports = [\"22\"]\ndirection = \"ingress\"\n\n\
             [[policy.rules]]\nid = \"out\"\nfrom = [\"self\"]\nto = [\"any\"]\ndirection = \"egress\"\n"
        ));
        let r = p.rules();
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].id, "web");
        assert_eq!(r[0].from, nets(&["10.77.0.0/24", "fd77::/64"]));
        assert_eq!(r[0].to, nets(&["10.77.0.2/32", "fd77::2/128"]));
        assert_eq!(r[0].proto, Some(PROTO_TCP));
        // Sorted and merged: 79 and 80 are adjacent.
        assert_eq!(
            r[0].ports,
            [
                PortRange { first: 79, last: 80 },
                PortRange { first: 443, last: 443 },
                PortRange { first: 8000, last: 8080 }
            ]
        );
        assert_eq!(r[0].direction, RuleDirection::Both);
        assert_eq!(r[1].from, nets(&["10.77.0.2/32", "10.88.0.0/24", "10.99.0.7/32", "fd77::2/128"]));
        assert_eq!(r[1].to, nets(&["10.77.0.1/32", "fd77::1/128"]));
        assert_eq!(r[1].direction, RuleDirection::Ingress);
        assert_eq!(r[2].to, nets(&["0.0.0.0/0", "::/0"]));
        assert_eq!(r[2].proto, None);
    }

    fn rule(body: &str) -> String {
        // The rule header is line 15, `id` line 16, the body from line 17.
        format!("[[policy.rules]]\nid = \"r\"\n{body}")
    }

    #[test]
    fn errors_name_line_and_field() {
        let cases: &[(String, &str, &[&str])] = &[
            (
                rule("from = [\"group:nope\"]\nto = [\"any\"]\n"),
                "17",
                &["policy.rules[0].from[0]", "unknown group \"nope\""],
            ),
            (
                rule("from = [\"any\"]\nto = [\"peer:ghost\"]\n"),
                "18",
                &["policy.rules[0].to[0]", "unknown peer \"ghost\""],
            ),
            (
                rule("from = [\"any\"]\nto = [\"any\"]\nproto = \"tcpp\"\n"),
                "19",
                &["policy.rules[0].proto", "\"tcpp\" is not a protocol"],
            ),
            (rule("from = [\"any\"]\nto = [\"any\"]\nproto = 256\n"), "19", &["policy.rules[0].proto", "256"]),
            (
                rule("from = [\"any\"]\nto = [\"any\"]\nproto = \"icmp\"\nports = [\"8\"]\n"),
                "20",
                &["ports", "proto icmp has no ports"],
            ),
            (rule("from = [\"any\"]\nto = [\"any\"]\nports = [\"80\"]\n"), "19", &["ports", "proto any has no ports"]),
            (
                rule("from = [\"any\"]\nto = [\"any\"]\nproto = \"udp\"\nports = [\"53\", \"9000-8000\"]\n"),
                "20",
                &["policy.rules[0].ports[1]", "9000-8000 is inverted"],
            ),
            (
                rule("from = [\"any\"]\nto = [\"any\"]\nproto = \"udp\"\nports = [\"70000\"]\n"),
                "20",
                &["policy.rules[0].ports[0]", "not a port"],
            ),
            (
                rule("from = [\"fd77::/64\"]\nto = [\"any\"]\nproto = \"icmp\"\n"),
                "15",
                &["policy.rules[0] (\"r\") can never match", "icmp matches IPv4 only"],
            ),
            (
                rule("from = [\"10.0.0.0/8\"]\nto = [\"fd77::/64\"]\n"),
                "15",
                &["can never match", "from has only IPv4 prefixes and to has only IPv6"],
            ),
            (
                rule("from = [\"10.0.0.1/8\"]\nto = [\"any\"]\n"),
                "17",
                &["policy.rules[0].from[0]", "did you mean 10.0.0.0/8"],
            ),
            (rule("from = [\"bogus\"]\nto = [\"any\"]\n"), "17", &["policy.rules[0].from[0]", "not a selector"]),
            (rule("from = [\"any\"]\nto = [\"any\"]\ndirection = \"inbound\"\n"), "19", &["policy.rules[0].direction"]),
            (rule("from = [\"any\"]\nto = [\"any\"]\ncolour = \"red\"\n"), "19", &["unknown field `colour`"]),
            (rule("from = [\"any\"]\n"), "15", &["missing field `to`"]),
            (
                "[[policy.rules]]\nid = \"a b\"\nfrom = [\"any\"]\nto = [\"any\"]\n".into(),
                "16",
                &["policy.rules[0].id", "\"a b\""],
            ),
            (
                format!(
                    "{}\n{}",
                    rule("from = [\"any\"]\nto = [\"any\"]\n"),
                    rule("from = [\"any\"]\nto = [\"any\"]\n")
                ),
                "21",
                &["policy.rules[1].id", "duplicate rule id \"r\" (first used by rules[0])"],
            ),
            (
                "[policy.groups]\na = [\"10.0.0.0/8\"]\nb = [\"group:a\"]\n".into(),
                "17",
                &["policy.groups.b[0]", "groups cannot contain groups"],
            ),
            ("[policy.groups]\nb = [\"peer:nobody\"]\n".into(), "16", &["policy.groups.b[0]", "unknown peer"]),
            ("[policy.groups]\n\"b c\" = []\n".into(), "16", &["policy.groups.b c", "group name"]),
            ("[policy]\npin_dir = \"relative\"\n".into(), "16", &["policy.pin_dir"]),
            ("[policy]\nfoo = 1\n".into(), "16", &["unknown field `foo`"]),
        ];
        for (text, line, needles) in cases {
            let e = err(text);
            assert!(e.starts_with(&format!("agent.toml:{line}:")), "want line {line}: {e}\n{text}");
            for n in *needles {
                assert!(e.contains(n), "want {n:?} in: {e}");
            }
        }
    }

    /// Refused where the second name is, before the policy: the peers are checked first.
    #[test]
    fn ambiguous_peer_name_is_an_error() {
        let text = format!(
            "[interface]\nname = \"wf0\"\nprivate_key_file = \"/k\"\n[[peers]]\npublic_key = \"{KEY_A}\"\nname = \"x\"\n\
             [[peers]]\npublic_key = \"{KEY_B}\"\nname = \"x\"\n[[policy.rules]]\nid = \"r\"\nfrom = [\"peer:x\"]\nto = [\"any\"]\n"
        );
        let e = Config::parse(Path::new("agent.toml"), &text).unwrap_err().to_string();
        assert!(e.starts_with("agent.toml:7:1: peers[1].name: \"x\" is already the name of peers[0]"), "{e}");
    }
}
