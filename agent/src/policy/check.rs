//! `wirefence-agent policy check`: what the policy decides for one packet.

use std::net::IpAddr;

use super::eval::{evaluate, Packet};
use super::model::{has_ports, parse_proto, proto_name, Direction, PROTO_ICMP, PROTO_ICMPV6};
use super::resolve::PolicyConfig;

/// Parses `<proto>[/<port>]`: `tcp/443`, `udp/53`, `icmp/8` or `icmp/3:1` (type and code),
/// `gre` or `47`. `fragment`: a non-first fragment (no port).
pub fn parse_proto_port(spec: &str, fragment: bool) -> Result<(u8, Option<u16>), String> {
    let (name, port) = match spec.split_once('/') {
        Some((n, p)) => (n, Some(p)),
        None => (spec, None),
    };
    let proto = parse_proto(name)?.ok_or("a packet has one protocol: name it (tcp, udp, icmp, ... or a number)")?;
    if fragment {
        return match port {
            Some(_) => Err(format!("{spec}: a non-first fragment has no port; drop /{}", port.unwrap_or(""))),
            None => Ok((proto, None)),
        };
    }
    let number = |s: &str, what: &str, max: u32| {
        s.parse::<u32>().ok().filter(|n| *n <= max).ok_or_else(|| format!("{spec}: {s:?} is not a {what} (0-{max})"))
    };
    match (proto, port) {
        (p, Some(port)) if has_ports(p) => Ok((p, Some(number(port, "port", 65535)? as u16))),
        (p, None) if has_ports(p) => {
            Err(format!("{name} needs a destination port ({name}/443), or --fragment for a non-first fragment"))
        }
        (PROTO_ICMP | PROTO_ICMPV6, port) => {
            let (t, c) = match port {
                None => (0, 0),
                Some(s) => match s.split_once(':') {
                    Some((t, c)) => (number(t, "type", 255)?, number(c, "code", 255)?),
                    None => (number(s, "type", 255)?, 0),
                },
            };
            Ok((proto, Some((t << 8 | c) as u16)))
        }
        (p, Some(_)) => Err(format!("{spec}: proto {} has no ports", proto_name(Some(p)))),
        (p, None) => Ok((p, Some(0))),
    }
}

/// The verdict line: `allow (rule "web")`, `deny (no rule allows it)`.
pub fn check(
    policy: Option<&PolicyConfig>,
    direction: Direction,
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    port: Option<u16>,
) -> Result<String, String> {
    if src.is_ipv4() != dst.is_ipv4() {
        return Err(format!("{src} and {dst} are of different address families"));
    }
    let Some(config) = policy else {
        return Ok("allow (no [policy] section: eBPF enforcement is off)".into());
    };
    let d = evaluate(&config.policy, &Packet { direction, src, dst, proto, port });
    Ok(match d.rule {
        Some(i) => format!("allow (rule {:?})", config.policy.rules()[i as usize].id),
        None => "deny (no rule allows it)".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proto_port_specs() {
        assert_eq!(parse_proto_port("tcp/443", false), Ok((6, Some(443))));
        assert_eq!(parse_proto_port("udp/53", true), Err("udp/53: a non-first fragment has no port; drop /53".into()));
        assert_eq!(parse_proto_port("udp", true), Ok((17, None)));
        assert_eq!(parse_proto_port("icmp/3:1", false), Ok((1, Some(0x0301))));
        assert_eq!(parse_proto_port("icmpv6/128", false), Ok((58, Some(0x8000))));
        assert_eq!(parse_proto_port("47", false), Ok((47, Some(0))));
        assert!(parse_proto_port("tcp", false).unwrap_err().contains("needs a destination port"));
        assert!(parse_proto_port("tcp/70000", false).unwrap_err().contains("not a port"));
        assert!(parse_proto_port("gre/1", false).is_err());
        assert!(parse_proto_port("any", false).is_err());
        assert!(parse_proto_port("bogus/1", false).is_err());
    }
}
