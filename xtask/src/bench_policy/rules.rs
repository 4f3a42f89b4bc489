//! The benchmark's rule sets: a realistic mix, built as the agent's own policy model
//! (`wirefence_agent::policy::Rule`) so the real compiler and writer see them.
//!
//! Rule `i` (id `r<i>`, direction both, protocol TCP):
//! - from: a distinct host — IPv4 `10.0.0.0 + i + 1`/32, IPv6 `fd00::i+1`/128;
//! - to: one of up to 4,096 destination subnets, `i % 4096` — IPv4 `172.16.0.0/12` cut into
//!   /24s, IPv6 `fd01:0:0:<j>::/64`;
//! - ports by `i % 10`: 0-6 one well-known port (22, 80, 443, 3306, 5432, 6379, 8080, 9090,
//!   9200 or 27017 by `i / 10 % 10`), 7: 8000-8099, 8: 30000-32767, 9: a ten-port range
//!   9000-9499.
//!
//! No generated rule allows port 7 (ranges start at 1024), so a packet to port 7 is a new
//! flow every rule set denies after the full lookup path.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use wirefence_agent::policy::{Policy, PortRange, Rule, RuleDirection};

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
/// Denied by every generated rule set.
pub const DENIED_PORT: u16 = 7;
const DST_SUBNETS: u32 = 4096;
const WELL_KNOWN: [u16; 10] = [22, 80, 443, 3306, 5432, 6379, 8080, 9090, 9200, 27017];

/// A packet the last rule allows (source, destination, destination port).
#[derive(Clone, Copy, Debug)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub dport: u16,
}

impl Flow {
    /// The tuple of this flow's TCP packets from source port `sport`, arriving (ingress).
    pub fn key(&self, sport: u16) -> wirefence_common::FlowKey {
        wirefence_common::FlowKey {
            src: wirefence_tests::bpf::mapped(self.src),
            dst: wirefence_tests::bpf::mapped(self.dst),
            sport,
            dport: self.dport,
            proto: TCP,
            direction: wirefence_common::DIR_INGRESS,
            _pad: [0; 2],
        }
    }
}

pub fn src_of(i: u32, v6: bool) -> IpNet {
    if v6 {
        IpNet::V6(Ipv6Net::new(Ipv6Addr::from(0xfd00u128 << 112 | u128::from(i + 1)), 128).expect("/128"))
    } else {
        IpNet::V4(Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 | (i + 1)), 32).expect("/32"))
    }
}

pub fn dst_of(i: u32, v6: bool) -> IpNet {
    let j = i % DST_SUBNETS;
    if v6 {
        IpNet::V6(Ipv6Net::new(Ipv6Addr::from(0xfd01u128 << 112 | u128::from(j) << 64), 64).expect("/64"))
    } else {
        IpNet::V4(Ipv4Net::new(Ipv4Addr::from(0xac10_0000 | j << 8), 24).expect("/24"))
    }
}

pub fn ports_of(i: u32) -> Vec<PortRange> {
    let one = |p: u16| vec![PortRange::single(p)];
    match i % 10 {
        0..=6 => one(WELL_KNOWN[(i / 10 % 10) as usize]),
        7 => vec![PortRange { first: 8000, last: 8099 }],
        8 => vec![PortRange { first: 30000, last: 32767 }],
        _ => {
            let lo = 9000 + (i / 10 % 50) as u16 * 10;
            vec![PortRange { first: lo, last: lo + 9 }]
        }
    }
}

pub fn rule(i: u32, v6: bool) -> Rule {
    Rule {
        id: format!("r{i}"),
        from: vec![src_of(i, v6)],
        to: vec![dst_of(i, v6)],
        proto: Some(TCP),
        ports: ports_of(i),
        direction: RuleDirection::Both,
    }
}

/// `n` generated rules of one family.
pub fn generate(n: u32, v6: bool) -> Vec<Rule> {
    (0..n).map(|i| rule(i, v6)).collect()
}

pub fn policy(rules: Vec<Rule>) -> Result<Policy> {
    Policy::new(rules).map_err(|e| anyhow::anyhow!("{e}")).context("generated policy is invalid")
}

/// A flow allowed by generated rule `i`: its source, host .10 (::10) of its destination,
/// the first port it allows.
pub fn flow_of(i: u32, v6: bool) -> Flow {
    let host = |net: IpNet| match net {
        IpNet::V4(n) => IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) + 10)),
        IpNet::V6(n) => IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) + 0x10)),
    };
    Flow { src: src_of(i, v6).addr(), dst: host(dst_of(i, v6)), dport: ports_of(i)[0].first }
}

/// The rule with a changed port set (a one-rule edit: same id, same addresses).
pub fn edited(rule: &Rule, generation: u16) -> Rule {
    let mut r = rule.clone();
    let lo = 40000 + generation * 16;
    r.ports = vec![PortRange { first: lo, last: lo + 3 }];
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_rules_are_valid_and_distinct() {
        for v6 in [false, true] {
            let rules = generate(1000, v6);
            let p = policy(rules).unwrap();
            assert_eq!(p.rules().len(), 1000);
            let f = flow_of(999, v6);
            assert!(p.rules()[999].from[0].contains(&f.src) && p.rules()[999].to[0].contains(&f.dst));
            assert!(!p.rules().iter().any(|r| r.ports.iter().any(|pr| pr.contains(DENIED_PORT))));
        }
    }
}
