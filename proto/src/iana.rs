//! IANA protocol numbers and the names policy files use for them, shared by the agent's
//! `[policy]` section and the control plane's policy files so both read a rule the same way.

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_GRE: u8 = 47;
pub const PROTO_ESP: u8 = 50;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_SCTP: u8 = 132;
pub const PROTO_UDPLITE: u8 = 136;

/// Protocols whose packets carry a destination port (TCP, UDP, SCTP, UDP-Lite); only rules
/// for these may name ports.
pub fn has_ports(proto: u8) -> bool {
    matches!(proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP | PROTO_UDPLITE)
}

/// `tcp`, `udp`, `icmp`, `icmpv6` (or `ipv6-icmp`), `sctp`, `udplite`, `gre`, `esp`, a number
/// 0-255 (`Some(Some(n))`), or `any` (`Some(None)`); `None` for anything else. Names are
/// case-insensitive.
pub fn parse_proto(s: &str) -> Option<Option<u8>> {
    Some(Some(match s.to_ascii_lowercase().as_str() {
        "any" => return Some(None),
        "tcp" => PROTO_TCP,
        "udp" => PROTO_UDP,
        "icmp" => PROTO_ICMP,
        "icmpv6" | "ipv6-icmp" => PROTO_ICMPV6,
        "sctp" => PROTO_SCTP,
        "udplite" => PROTO_UDPLITE,
        "gre" => PROTO_GRE,
        "esp" => PROTO_ESP,
        n => n.parse::<u8>().ok()?,
    }))
}

/// The name used in messages (`any`, `tcp`, ..., or the number).
pub fn proto_name(proto: Option<u8>) -> String {
    match proto {
        None => "any".into(),
        Some(PROTO_TCP) => "tcp".into(),
        Some(PROTO_UDP) => "udp".into(),
        Some(PROTO_ICMP) => "icmp".into(),
        Some(PROTO_ICMPV6) => "icmpv6".into(),
        Some(PROTO_SCTP) => "sctp".into(),
        Some(PROTO_UDPLITE) => "udplite".into(),
        Some(n) => n.to_string(),
    }
}

/// Whether a rule for `proto` can match packets of this family: ICMP is IPv4 only, ICMPv6
/// IPv6 only, every other protocol (and any) both.
pub fn proto_allows_family(proto: Option<u8>, v6: bool) -> bool {
    match proto {
        Some(PROTO_ICMP) => !v6,
        Some(PROTO_ICMPV6) => v6,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        assert_eq!(parse_proto("TCP"), Some(Some(PROTO_TCP)));
        assert_eq!(parse_proto("ipv6-icmp"), Some(Some(PROTO_ICMPV6)));
        assert_eq!(parse_proto("any"), Some(None));
        assert_eq!(parse_proto("47"), Some(Some(PROTO_GRE)));
        assert_eq!(parse_proto("256"), None);
        assert_eq!(parse_proto("tcpp"), None);
        for p in [PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_UDPLITE, 99] {
            assert_eq!(parse_proto(&proto_name(Some(p))), Some(Some(p)));
        }
        assert!(has_ports(PROTO_SCTP) && !has_ports(PROTO_ICMP));
        assert!(proto_allows_family(Some(PROTO_ICMP), false) && !proto_allows_family(Some(PROTO_ICMP), true));
    }
}
