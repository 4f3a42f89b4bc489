//! Parsing and validating a policy file. Everything that can be checked without knowing
//! the nodes is checked here: syntax, unknown fields, names, selectors, groups (unknown,
//! cyclic), protocols and ports, and satisfiability by address family. Tests are checked
//! for shape here and run against the nodes by [`super::eval::run_tests`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::ops::Range;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;
use wirefence_proto::policy::{valid_name, PortRangeError};

use super::{
    has_ports, proto_name, Policy, PolicyError, PortRange, Pos, Problem, RuleDef, Selector, TestDef, TestEnd, Verdict,
    PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP,
};
use crate::model::valid_hostname;

type List = Spanned<Vec<Spanned<String>>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    groups: BTreeMap<String, List>,
    #[serde(default)]
    rules: Vec<Spanned<RawRule>>,
    #[serde(default)]
    tests: Vec<Spanned<RawTest>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    id: Spanned<String>,
    from: List,
    to: List,
    proto: Option<Spanned<NumOrText>>,
    ports: Option<Spanned<Vec<Spanned<NumOrText>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTest {
    from: Spanned<String>,
    to: Spanned<String>,
    proto: Option<Spanned<NumOrText>>,
    port: Option<Spanned<i64>>,
    expect: Spanned<Verdict>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrText {
    Num(i64),
    Text(String),
}

impl NumOrText {
    fn text(&self) -> String {
        match self {
            NumOrText::Num(n) => n.to_string(),
            NumOrText::Text(s) => s.clone(),
        }
    }
}

/// Byte offsets -> line/column.
struct Locator<'a> {
    file: &'a str,
    source: &'a str,
}

impl Locator<'_> {
    fn pos(&self, span: Range<usize>) -> Pos {
        let upto = &self.source[..span.start.min(self.source.len())];
        let line = upto.matches('\n').count() + 1;
        let column = upto.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        Pos { line, column }
    }

    fn err(&self, span: Range<usize>, problem: Problem) -> PolicyError {
        PolicyError { file: self.file.to_owned(), pos: self.pos(span), problem }
    }
}

/// Parses and validates `source` (named `file` in errors).
pub fn parse(file: &str, source: &str) -> Result<Policy, PolicyError> {
    let loc = Locator { file, source };
    let raw: RawFile = toml::from_str(source)
        .map_err(|e| loc.err(e.span().unwrap_or(0..0), Problem::Syntax(e.message().to_owned())))?;
    let groups = expand_groups(&loc, &raw.groups)?;

    let mut rules = Vec::with_capacity(raw.rules.len());
    let mut ids: HashMap<String, usize> = HashMap::new();
    for (index, rule) in raw.rules.iter().enumerate() {
        let r = rule.get_ref();
        let id = r.id.get_ref();
        if !valid_name(id) {
            return Err(loc.err(r.id.span(), Problem::BadRuleId { index, id: id.clone() }));
        }
        let pos = loc.pos(rule.span());
        if let Some(first_line) = ids.insert(id.clone(), pos.line) {
            return Err(loc.err(r.id.span(), Problem::DuplicateRuleId { index, id: id.clone(), first_line }));
        }
        let from = selectors(&loc, &groups, &r.from, &format!("rules[{index}].from"))?;
        let to = selectors(&loc, &groups, &r.to, &format!("rules[{index}].to"))?;
        let protocol = match &r.proto {
            None => None,
            Some(p) => protocol(p.get_ref())
                .ok_or_else(|| loc.err(p.span(), bad_proto(format!("rules[{index}].proto"), p.get_ref())))?,
        };
        let mut ports = Vec::new();
        if let Some(list) = &r.ports {
            match protocol {
                Some(p) if has_ports(p) => {}
                _ => {
                    let proto = proto_name(protocol);
                    return Err(loc.err(list.span(), Problem::PortsWithoutPortProtocol { index, proto }));
                }
            }
            for (i, p) in list.get_ref().iter().enumerate() {
                ports.push(port_range(&loc, p, &format!("rules[{index}].ports[{i}]"))?);
            }
        }
        if let Some(reason) = unsatisfiable(&from, &to, protocol) {
            return Err(loc.err(rule.span(), Problem::Unsatisfiable { index, id: id.clone(), reason }));
        }
        rules.push(RuleDef { id: id.clone(), from, to, protocol, ports, pos });
    }

    let tests = raw.tests.iter().enumerate().map(|(index, t)| test(&loc, index, t)).collect::<Result<_, _>>()?;
    Ok(Policy { file_name: file.to_owned(), source: source.to_owned(), rules, tests })
}

fn bad_proto(field: String, v: &NumOrText) -> Problem {
    Problem::BadProto { field, text: v.text() }
}

/// `Some(None)` for any, `Some(Some(n))` for a protocol, `None` if unknown.
fn protocol(v: &NumOrText) -> Option<Option<u8>> {
    match v {
        NumOrText::Num(n) => u8::try_from(*n).ok().map(Some),
        NumOrText::Text(s) => wirefence_proto::iana::parse_proto(s),
    }
}

fn port_range(loc: &Locator, p: &Spanned<NumOrText>, field: &str) -> Result<PortRange, PolicyError> {
    let parsed = match p.get_ref() {
        NumOrText::Num(n) => PortRange::try_from(*n),
        NumOrText::Text(s) => s.parse(),
    };
    parsed.map_err(|e| {
        let field = field.to_owned();
        let problem = match e {
            PortRangeError::NotAPort => Problem::BadPort { field, text: p.get_ref().text() },
            PortRangeError::Inverted { first, last } => Problem::InvertedRange { field, first, last },
        };
        loc.err(p.span(), problem)
    })
}

/// One selector as written; groups are returned by name for expansion.
enum Written {
    Sel(Selector),
    Group(String),
}

fn written(loc: &Locator, s: &Spanned<String>, field: &str) -> Result<Written, PolicyError> {
    let text = s.get_ref().trim();
    let bad = || loc.err(s.span(), Problem::BadSelector { field: field.to_owned(), text: text.to_owned() });
    if text == "*" {
        return Ok(Written::Sel(Selector::All));
    }
    if let Some((kind, name)) = text.split_once(':') {
        match kind {
            "node" if valid_hostname(name) => return Ok(Written::Sel(Selector::Node(name.to_owned()))),
            "route" if valid_hostname(name) => return Ok(Written::Sel(Selector::Routes(name.to_owned()))),
            "tag" if valid_name(name) => return Ok(Written::Sel(Selector::Tag(name.to_owned()))),
            "group" if valid_name(name) => return Ok(Written::Group(name.to_owned())),
            "node" | "route" | "tag" | "group" => return Err(bad()),
            _ => {} // perhaps an IPv6 address
        }
    }
    let net = match text.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => IpNet::from(text.parse::<IpAddr>().map_err(|_| bad())?),
    };
    if net.trunc() != net {
        return Err(loc.err(s.span(), Problem::HostBits { field: field.to_owned(), net, trunc: net.trunc() }));
    }
    Ok(Written::Sel(Selector::Net(net)))
}

/// Expands every group to a sorted set of non-group selectors (nested groups allowed,
/// cycles rejected).
fn expand_groups(loc: &Locator, raw: &BTreeMap<String, List>) -> Result<HashMap<String, Vec<Selector>>, PolicyError> {
    for (name, list) in raw {
        if !valid_name(name) {
            return Err(loc.err(list.span(), Problem::BadGroupName(name.clone())));
        }
    }
    let mut done: HashMap<String, Vec<Selector>> = HashMap::new();
    for name in raw.keys() {
        let mut path = Vec::new();
        expand(loc, raw, name, &mut path, &mut done)?;
    }
    Ok(done)
}

fn expand(
    loc: &Locator,
    raw: &BTreeMap<String, List>,
    name: &str,
    path: &mut Vec<String>,
    done: &mut HashMap<String, Vec<Selector>>,
) -> Result<(), PolicyError> {
    if done.contains_key(name) {
        return Ok(());
    }
    let list = &raw[name];
    path.push(name.to_owned());
    let mut out = BTreeSet::new();
    for (i, s) in list.get_ref().iter().enumerate() {
        let field = format!("groups.{name}[{i}]");
        match written(loc, s, &field)? {
            Written::Sel(sel) => {
                out.insert(sel);
            }
            Written::Group(g) => {
                if path.contains(&g) {
                    let cycle = path.iter().chain(std::iter::once(&g)).cloned().collect::<Vec<_>>().join(" -> ");
                    return Err(loc.err(s.span(), Problem::GroupCycle { group: name.to_owned(), path: cycle }));
                }
                if !raw.contains_key(&g) {
                    return Err(loc.err(s.span(), Problem::UnknownGroup { field, name: g }));
                }
                expand(loc, raw, &g, path, done)?;
                out.extend(done[&g].iter().cloned());
            }
        }
    }
    path.pop();
    done.insert(name.to_owned(), out.into_iter().collect());
    Ok(())
}

fn selectors(
    loc: &Locator,
    groups: &HashMap<String, Vec<Selector>>,
    list: &List,
    field: &str,
) -> Result<Vec<Selector>, PolicyError> {
    let mut out = BTreeSet::new();
    for (i, s) in list.get_ref().iter().enumerate() {
        let f = format!("{field}[{i}]");
        match written(loc, s, &f)? {
            Written::Sel(sel) => {
                out.insert(sel);
            }
            Written::Group(g) => match groups.get(&g) {
                Some(members) => out.extend(members.iter().cloned()),
                None => return Err(loc.err(s.span(), Problem::UnknownGroup { field: f, name: g })),
            },
        }
    }
    Ok(out.into_iter().collect())
}

const V4: u8 = 1;
const V6: u8 = 2;

/// The address families a side can contain: nodes have both, a prefix its own.
fn families(side: &[Selector]) -> u8 {
    side.iter().fold(0, |acc, s| {
        acc | match s {
            Selector::Net(IpNet::V4(_)) => V4,
            Selector::Net(IpNet::V6(_)) => V6,
            _ => V4 | V6,
        }
    })
}

fn fam_text(f: u8) -> &'static str {
    match f {
        0 => "nothing",
        V4 => "only IPv4",
        V6 => "only IPv6",
        _ => "IPv4 and IPv6",
    }
}

/// Why a rule can never match, if it can't.
fn unsatisfiable(from: &[Selector], to: &[Selector], protocol: Option<u8>) -> Option<String> {
    let (f, t) = (families(from), families(to));
    let proto = match protocol {
        Some(PROTO_ICMP) => V4,
        Some(PROTO_ICMPV6) => V6,
        _ => V4 | V6,
    };
    if f & t & proto != 0 {
        return None;
    }
    let base = format!("from has {} and to has {}", fam_text(f), fam_text(t));
    Some(match protocol {
        Some(PROTO_ICMP) if f & t != 0 => format!("{base}; icmp matches IPv4 only (use icmpv6 for IPv6)"),
        Some(PROTO_ICMPV6) if f & t != 0 => format!("{base}; icmpv6 matches IPv6 only (use icmp for IPv4)"),
        _ => format!("{base}: no source and destination of the same address family"),
    })
}

fn test(loc: &Locator, index: usize, t: &Spanned<RawTest>) -> Result<TestDef, PolicyError> {
    let r = t.get_ref();
    let end = |s: &Spanned<String>, field: &'static str| {
        let text = s.get_ref().trim();
        if let Ok(ip) = text.parse::<IpAddr>() {
            Ok(TestEnd::Ip(ip))
        } else if valid_hostname(text) {
            Ok(TestEnd::Node(text.to_owned()))
        } else {
            Err(loc.err(s.span(), Problem::BadTestEndpoint { index, field, text: text.to_owned() }))
        }
    };
    let from = end(&r.from, "from")?;
    let to = end(&r.to, "to")?;
    let protocol = match &r.proto {
        None => PROTO_TCP,
        Some(p) => match protocol(p.get_ref()) {
            Some(Some(n)) => n,
            Some(None) => return Err(loc.err(p.span(), Problem::TestAnyProto { index })),
            None => return Err(loc.err(p.span(), bad_proto(format!("tests[{index}].proto"), p.get_ref()))),
        },
    };
    let port = match (&r.port, has_ports(protocol)) {
        (Some(p), true) => Some(
            u16::try_from(*p.get_ref())
                .map_err(|_| loc.err(p.span(), Problem::TestPort { index, reason: "not a port (0-65535)" }))?,
        ),
        (None, true) => {
            return Err(loc.err(t.span(), Problem::TestPort { index, reason: "missing (the protocol has ports)" }))
        }
        (Some(p), false) => {
            return Err(loc.err(p.span(), Problem::TestPort { index, reason: "the protocol has no ports" }))
        }
        (None, false) => None,
    };
    Ok(TestDef {
        from,
        to,
        protocol,
        port,
        expect: *r.expect.get_ref(),
        pos: loc.pos(t.span()),
        from_pos: loc.pos(r.from.span()),
        to_pos: loc.pos(r.to.span()),
    })
}
