//! Policy-language vocabulary shared by the agent's `[policy]` section and the control
//! plane's policy files (beside [`crate::iana`]'s protocol names), so both read a rule, and
//! pick the rule that decides a packet, the same way: names, destination port ranges, and
//! the specificity order among matching rules.

use std::fmt;
use std::str::FromStr;

use crate::v1;

/// What [`valid_name`] accepts, for messages.
pub const NAME_CHARS: &str = "1 to 64 of A-Z a-z 0-9 _ . -";

/// `[A-Za-z0-9_.-]{1,64}` ([`NAME_CHARS`]): rule ids, group names and tags.
pub fn valid_name(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// An inclusive range of destination ports, `first <= last` when built by [`PortRange::new`],
/// parsing (`"80"`, `"8000-8080"`) or from the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

/// Why a text, number or wire message is not a [`PortRange`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PortRangeError {
    #[error("not a port (0-65535) or a port range (first-last)")]
    NotAPort,
    #[error("port range {first}-{last} is inverted")]
    Inverted { first: u16, last: u16 },
}

impl PortRange {
    pub fn new(first: u16, last: u16) -> Result<PortRange, PortRangeError> {
        if first > last {
            return Err(PortRangeError::Inverted { first, last });
        }
        Ok(PortRange { first, last })
    }

    /// One port.
    pub fn single(port: u16) -> PortRange {
        PortRange { first: port, last: port }
    }

    pub fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }

    /// The largest aligned block of ports around `port` (which must be in the range) that
    /// fits in the range, as a prefix length: 16 = `port` alone, 0 = every port. This is the
    /// prefix containing `port` of the range's minimal cover by aligned blocks (aligned
    /// blocks nest, so the cover consists of exactly these maximal blocks): the port prefix
    /// the agent's policy map matches.
    pub fn prefix_bits_containing(&self, port: u16) -> u8 {
        debug_assert!(self.contains(port));
        let (first, last, port) = (u32::from(self.first), u32::from(self.last), u32::from(port));
        (0..=16u32)
            .find(|bits| {
                let size = 1u32 << (16 - bits);
                let start = port & !(size - 1);
                start >= first && start + size - 1 <= last
            })
            .expect("a 16-bit prefix always fits") as u8
    }
}

/// `80` or `8000-8080`, each side trimmed.
impl FromStr for PortRange {
    type Err = PortRangeError;

    fn from_str(s: &str) -> Result<PortRange, PortRangeError> {
        let num = |s: &str| s.trim().parse::<u16>().map_err(|_| PortRangeError::NotAPort);
        match s.split_once('-') {
            None => num(s).map(PortRange::single),
            Some((a, b)) => PortRange::new(num(a)?, num(b)?),
        }
    }
}

/// One port given as a number (a TOML integer).
impl TryFrom<i64> for PortRange {
    type Error = PortRangeError;

    fn try_from(n: i64) -> Result<PortRange, PortRangeError> {
        u16::try_from(n).map(PortRange::single).map_err(|_| PortRangeError::NotAPort)
    }
}

impl TryFrom<&v1::PortRange> for PortRange {
    type Error = PortRangeError;

    fn try_from(p: &v1::PortRange) -> Result<PortRange, PortRangeError> {
        match (u16::try_from(p.first), u16::try_from(p.last)) {
            (Ok(first), Ok(last)) => PortRange::new(first, last),
            _ => Err(PortRangeError::NotAPort),
        }
    }
}

impl From<PortRange> for v1::PortRange {
    fn from(p: PortRange) -> v1::PortRange {
        v1::PortRange { first: p.first.into(), last: p.last.into() }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// A rule's port list in normal form: sorted, overlapping or adjacent ranges merged, and a
/// list covering 0-65535 made empty ("all ports"). The agent holds every rule's ports so,
/// and [`specificity`] ranks by it. The ranges must not be inverted.
pub fn normalize_ports(mut ports: Vec<PortRange>) -> Vec<PortRange> {
    ports.sort();
    let mut out: Vec<PortRange> = Vec::with_capacity(ports.len());
    for p in ports {
        match out.last_mut() {
            Some(last) if u32::from(p.first) <= u32::from(last.last) + 1 => last.last = last.last.max(p.last),
            _ => out.push(p),
        }
    }
    if out == [PortRange { first: 0, last: u16::MAX }] {
        out.clear();
    }
    out
}

/// How specifically a rule for `rule_proto` (`None`: any protocol) and `rule_ports`
/// ([`normalize_ports`] form; empty = all ports) matches a packet of `proto` to `port`
/// (`None`: no port, e.g. a non-first fragment); `None` when the rule's protocol or ports
/// do not match it. Addresses are not considered here.
///
/// Among the rules that match a packet the one with the highest specificity decides, ties
/// going to the first rule. This is the agent's order, the one its policy map implements
/// (the value is the length of the map key's prefix past the two classes): any protocol
/// (0) < a protocol with all ports (8) < a protocol with port ranges, by the length of the
/// port prefix containing the port (8 + [`PortRange::prefix_bits_containing`], 9 to 24).
/// A rule with ports never matches a packet without one.
pub fn specificity(rule_proto: Option<u8>, rule_ports: &[PortRange], proto: u8, port: Option<u16>) -> Option<u32> {
    match rule_proto {
        None => Some(0),
        Some(p) if p != proto => None,
        Some(_) if rule_ports.is_empty() => Some(8),
        Some(_) => {
            let port = port?;
            let range = rule_ports.iter().find(|r| r.contains(port))?;
            Some(8 + u32::from(range.prefix_bits_containing(port)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(first: u16, last: u16) -> PortRange {
        PortRange { first, last }
    }

    #[test]
    fn names() {
        assert!(valid_name("admin-ssh.v2_1"));
        assert!(!valid_name(""));
        assert!(!valid_name("a/b"));
        assert!(!valid_name("a b"));
        assert!(valid_name(&"x".repeat(64)));
        assert!(!valid_name(&"x".repeat(65)));
    }

    #[test]
    fn parsing_and_display() {
        assert_eq!("80".parse(), Ok(r(80, 80)));
        assert_eq!(" 8000 - 8080 ".parse(), Ok(r(8000, 8080)));
        assert_eq!("0-65535".parse(), Ok(r(0, 65535)));
        assert_eq!("8080-80".parse::<PortRange>(), Err(PortRangeError::Inverted { first: 8080, last: 80 }));
        for bad in ["", "http", "70000", "-5", "1-", "1-2-3", "80 81"] {
            assert_eq!(bad.parse::<PortRange>(), Err(PortRangeError::NotAPort), "{bad:?}");
        }
        assert_eq!(PortRange::try_from(443i64), Ok(r(443, 443)));
        assert_eq!(PortRange::try_from(-1i64), Err(PortRangeError::NotAPort));
        assert_eq!(PortRange::try_from(65536i64), Err(PortRangeError::NotAPort));
        assert_eq!(PortRange::try_from(&v1::PortRange { first: 1, last: 70000 }), Err(PortRangeError::NotAPort));
        assert_eq!(
            PortRange::try_from(&v1::PortRange { first: 9, last: 8 }),
            Err(PortRangeError::Inverted { first: 9, last: 8 })
        );
        assert_eq!(PortRange::try_from(&v1::PortRange::from(r(22, 23))), Ok(r(22, 23)));
        assert_eq!((r(80, 80).to_string(), r(1, 2).to_string()), ("80".into(), "1-2".into()));
        assert_eq!(PortRangeError::Inverted { first: 2, last: 1 }.to_string(), "port range 2-1 is inverted");
    }

    #[test]
    fn normal_form() {
        assert_eq!(
            normalize_ports(vec![r(8000, 8080), r(79, 80), r(443, 443), r(81, 81)]),
            [r(79, 81), r(443, 443), r(8000, 8080)]
        );
        assert_eq!(normalize_ports(vec![r(0, 7), r(2, 3)]), [r(0, 7)]);
        assert_eq!(normalize_ports(vec![r(32768, 65535), r(0, 32767)]), []);
        assert_eq!(normalize_ports(vec![]), []);
    }

    #[test]
    fn prefix_bits() {
        // 8000-8080 = 8000/10 + 8064/12 + 8080/16.
        assert_eq!(r(8000, 8080).prefix_bits_containing(8001), 10);
        assert_eq!(r(8000, 8080).prefix_bits_containing(8070), 12);
        assert_eq!(r(8000, 8080).prefix_bits_containing(8080), 16);
        assert_eq!(r(0, 65535).prefix_bits_containing(1234), 0);
        assert_eq!(r(0, 65534).prefix_bits_containing(1000), 1);
        assert_eq!(r(1, 65534).prefix_bits_containing(32768), 2);
    }

    #[test]
    fn specificity_order() {
        let tcp = Some(crate::iana::PROTO_TCP);
        assert_eq!(specificity(None, &[], 17, Some(53)), Some(0));
        assert_eq!(specificity(tcp, &[], 17, Some(53)), None);
        assert_eq!(specificity(tcp, &[], 6, None), Some(8));
        assert_eq!(specificity(tcp, &[r(80, 80)], 6, None), None, "a fragment has no port");
        assert_eq!(specificity(tcp, &[r(80, 80)], 6, Some(81)), None);
        assert_eq!(specificity(tcp, &[r(80, 80)], 6, Some(80)), Some(24));
        assert_eq!(specificity(tcp, &[r(1, 2), r(8000, 8080)], 6, Some(8001)), Some(18));
        assert_eq!(specificity(tcp, &[r(8000, 8080)], 6, Some(8070)), Some(20));
        assert_eq!(specificity(tcp, &[r(8000, 8080)], 6, Some(8080)), Some(24));
    }
}
