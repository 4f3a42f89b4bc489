//! Program tests of MSS clamping (`ebpf/src/mss.rs`) through BPF_PROG_TEST_RUN: SYNs and
//! SYN-ACKs in, the rewritten packet out. The clamp alone (`wf_mss`) is run here on every
//! case; the policy programs' clamping of the packets they pass is in `bpf_program.rs`.
//! Needs root (loading programs). Addresses are chosen as in `bpf_program.rs` so the test
//! runner's Ethernet reading of an L3 frame finds the right protocol.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::programs::{TestRun, TestRunOptions};
use wirefence_agent::bpf::Programs;
use wirefence_common::{CtConfig, MssClamp};
use wirefence_tests::packet::{tcp_checksum_ok, tcp_mss, Packet};
use wirefence_tests::require_root_for;

/// `TC_ACT_UNSPEC` as the test run reports it: the clamp hands every packet on.
const NEXT: u32 = u32::MAX;
const OFFSETS: [u32; 2] = [14, 0];
/// What a 1420-byte tunnel allows.
const LIMITS: MssClamp = MssClamp::for_mtu(1420);

const SYN_ACK: u8 = 0x12;
const ACK: u8 = 0x10;

fn syn(v6: bool) -> Packet {
    if v6 {
        let a = |h| IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0x86dd, 0, 0, 0, 0, h));
        Packet::tcp(a(1), a(2), 40000, 443)
    } else {
        Packet::tcp(IpAddr::V4(Ipv4Addr::new(8, 0, 0, 1)), IpAddr::V4(Ipv4Addr::new(8, 0, 1, 1)), 40000, 443)
    }
}

fn mss(v: u16) -> [u8; 4] {
    let b = v.to_be_bytes();
    [2, 4, b[0], b[1]]
}

const TS: [u8; 10] = [8, 10, 1, 2, 3, 4, 0, 0, 0, 0];

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// The clamp alone, loaded with `limits`, run over frames at l3 offset `off`.
struct Clamp {
    p: Programs,
    off: u32,
}

impl Clamp {
    fn new(off: u32, limits: MssClamp) -> Clamp {
        require_root_for("loading eBPF programs needs root");
        let mut p = Programs::load(off).unwrap_or_else(|e| panic!("load (l3 offset {off}): {e:?}"));
        p.set_ct_config(CtConfig { mss_clamp: limits, ..Default::default() }).unwrap();
        Clamp { p, off }
    }

    /// The IP packet after `wf_mss`, which must hand it on.
    fn run(&self, pkt: &Packet) -> Vec<u8> {
        let frame = pkt.frame(self.off);
        let mut out = vec![0u8; frame.len() + 64];
        let opts = TestRunOptions { data_in: Some(&frame), data_out: Some(&mut out), ..Default::default() };
        let r = self.p.mss().unwrap().test_run(opts).unwrap();
        assert_eq!(r.return_value, NEXT, "wf_mss must hand every packet on");
        out.truncate(r.data_size_out as usize);
        out.split_off(self.off as usize)
    }

    /// `pkt` comes out clamped to `want`: only the MSS value and the checksum changed, and
    /// the checksum verifies.
    fn expect_clamped(&self, what: &str, pkt: &Packet, want: u16) {
        let pkt = pkt.clone().with_tcp_checksum();
        let before = pkt.ip_bytes();
        let after = self.run(&pkt);
        let off = self.off;
        assert_eq!(tcp_mss(&after), Some(want), "{what} (l3 offset {off}): MSS not clamped");
        assert!(tcp_checksum_ok(&after), "{what} (l3 offset {off}): checksum broken by the clamp");
        let changed = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        assert!(changed <= 4 && before.len() == after.len(), "{what} (l3 offset {off}): {changed} bytes changed");
    }

    /// `pkt` comes out exactly as it went in.
    fn expect_untouched(&self, what: &str, pkt: &Packet) {
        let pkt = pkt.clone().with_tcp_checksum();
        assert_eq!(self.run(&pkt), pkt.ip_bytes(), "{what} (l3 offset {}): changed", self.off);
    }
}

#[test]
fn option_orders_are_walked_and_the_checksum_follows() {
    let orders: Vec<(&str, Vec<u8>)> = vec![
        ("MSS alone", cat(&[&mss(1460)])),
        // Linux's SYN: MSS, SACK permitted, timestamps, NOP, window scale.
        ("Linux order", cat(&[&mss(1460), &[4, 2], &TS, &[1, 3, 3, 7]])),
        ("after a NOP (odd offset)", cat(&[&[1], &mss(1460), &[1, 1, 1]])),
        ("after timestamps (even)", cat(&[&[1, 1], &TS, &mss(1460)])),
        ("late, odd offset", cat(&[&[3, 3, 7], &TS, &mss(1460), &[0, 0, 0]])),
        ("last of 40 bytes", cat(&[&[1; 36], &mss(1460)])),
        ("jumbo MSS", cat(&[&mss(65495)])),
    ];
    for off in OFFSETS {
        let clamp = Clamp::new(off, LIMITS);
        for v6 in [false, true] {
            let limit = if v6 { LIMITS.v6 } else { LIMITS.v4 };
            for (what, opts) in &orders {
                let what = format!("{what}, {}", if v6 { "IPv6" } else { "IPv4" });
                clamp.expect_clamped(&what, &syn(v6).tcp_options(opts), limit);
                clamp.expect_clamped(&format!("{what}, SYN-ACK"), &syn(v6).tcp_options(opts).tcp_flags(SYN_ACK), limit);
            }
            // Data on the SYN (TCP Fast Open) stays as it was.
            let mut tfo = syn(v6).tcp_options(&mss(1460));
            tfo.l4.extend_from_slice(b"GET / HTTP/1.1\r\n");
            clamp.expect_clamped("SYN with data", &tfo, limit);
        }
    }
}

#[test]
fn what_needs_no_clamping_is_untouched() {
    for off in OFFSETS {
        let clamp = Clamp::new(off, LIMITS);
        for v6 in [false, true] {
            let limit = if v6 { LIMITS.v6 } else { LIMITS.v4 };
            let cases: Vec<(&str, Packet)> = vec![
                ("no options", syn(v6)),
                ("no MSS option", syn(v6).tcp_options(&cat(&[&[4, 2], &TS, &[1, 3, 3, 7]]))),
                ("small MSS", syn(v6).tcp_options(&mss(536))),
                ("MSS at the limit", syn(v6).tcp_options(&mss(limit))),
                ("not a SYN", syn(v6).tcp_options(&mss(1460)).tcp_flags(ACK)),
                ("MSS after EOL", syn(v6).tcp_options(&cat(&[&[0, 0, 0, 0], &mss(1460)]))),
            ];
            for (what, pkt) in cases {
                clamp.expect_untouched(&format!("{what}, {}", if v6 { "IPv6" } else { "IPv4" }), &pkt);
            }
        }
        // A non-first IPv4 fragment has no TCP header, whatever its bytes look like.
        clamp.expect_untouched("non-first fragment", &syn(false).tcp_options(&mss(1460)).fragment(8, false));
    }
}

#[test]
fn malformed_options_are_left_alone_and_passed_on() {
    let malformed: Vec<(&str, Vec<u8>)> = vec![
        ("length 0", cat(&[&[3, 0, 7, 1], &mss(1460)])),
        ("length 1", cat(&[&[3, 1, 7, 1], &mss(1460)])),
        ("kind in the last byte", vec![1, 1, 1, 2]),
        ("MSS cut short", vec![1, 2, 4, 5]),
        ("MSS of length 3", vec![2, 3, 5, 0xb4]),
        ("length past the end", cat(&[&[8, 40, 0, 0], &mss(1460)])),
        ("MSS of length 6", vec![2, 6, 5, 0xb4, 0, 0, 1, 1]),
    ];
    for off in OFFSETS {
        let clamp = Clamp::new(off, LIMITS);
        for v6 in [false, true] {
            for (what, opts) in &malformed {
                clamp.expect_untouched(
                    &format!("{what}, {}", if v6 { "IPv6" } else { "IPv4" }),
                    &syn(v6).tcp_options(opts),
                );
            }
            // A data offset claiming more options than the packet holds.
            let mut pkt = syn(v6).tcp_options(&mss(1460));
            pkt.l4[12] = 15 << 4;
            clamp.expect_untouched("data offset past the end", &pkt);
        }
    }
}

#[test]
fn each_family_has_its_own_limit_and_zero_is_off() {
    for off in OFFSETS {
        let off_both = Clamp::new(off, MssClamp::OFF);
        let v4_only = Clamp::new(off, MssClamp { v4: 1200, v6: 0 });
        for v6 in [false, true] {
            let pkt = syn(v6).tcp_options(&mss(1460));
            off_both.expect_untouched("clamping off", &pkt);
            if v6 {
                v4_only.expect_untouched("IPv6 with only an IPv4 limit", &pkt);
            } else {
                v4_only.expect_clamped("IPv4 limit", &pkt, 1200);
            }
        }
    }
}

#[test]
fn limits_follow_the_tunnel_mtu() {
    assert_eq!(MssClamp::for_mtu(1420), MssClamp { v4: 1380, v6: 1360 });
    assert_eq!(MssClamp::for_mtu(1280), MssClamp { v4: 1240, v6: 1220 });
    assert_eq!(MssClamp::for_mtu(65535), MssClamp { v4: 65495, v6: 65475 });
}
