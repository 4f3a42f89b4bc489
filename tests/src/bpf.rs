//! What the tests that run the classifiers through BPF_PROG_TEST_RUN (and xtask's per-packet
//! bench) share: the verdicts the programs return and the address form of their flow keys.

use std::net::IpAddr;

/// `TC_ACT_OK` (linux/pkt_cls.h): the packet passes. The test run reports it as `u32`.
pub const TC_ACT_OK: u32 = 0;
/// `TC_ACT_SHOT`: the packet is dropped.
pub const TC_ACT_SHOT: u32 = 2;

/// `a` as the programs hold addresses (`FlowKey::src`/`dst`): IPv4 as IPv4-mapped IPv6.
pub fn mapped(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}
