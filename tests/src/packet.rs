//! A small builder of IPv4/IPv6 packets for program tests (BPF_PROG_TEST_RUN): TCP, UDP,
//! UDP-Lite, SCTP, ICMP/ICMPv6 (echo and errors quoting another packet), IPv4 fragments and
//! options, IPv6 extension-header chains, and deliberately broken headers.
//!
//! Checksums: the IPv4 header checksum is computed; L4 checksums are left zero (the
//! classifiers do not check them) unless asked for ([`Packet::with_tcp_checksum`], for the
//! MSS clamp, which updates it).

use std::net::IpAddr;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;
pub const IPPROTO_UDPLITE: u8 = 136;
pub const IPPROTO_GRE: u8 = 47;

/// IPv6 extension header types.
pub const EXT_HOP_BY_HOP: u8 = 0;
pub const EXT_ROUTING: u8 = 43;
pub const EXT_FRAGMENT: u8 = 44;
pub const EXT_AH: u8 = 51;
pub const EXT_DEST_OPTS: u8 = 60;

#[derive(Clone, Debug)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    /// L4 header and payload.
    pub l4: Vec<u8>,
    /// IPv4: fragment offset in 8-byte units and more-fragments flag. IPv6: a fragment
    /// header (appended to `ext`) carries them.
    pub frag: Option<(u16, bool)>,
    /// IPv4: value written into the IHL field instead of the real one.
    pub ihl_override: Option<u8>,
    /// IPv4 options (padded to 4 bytes).
    pub options: Vec<u8>,
    /// IPv6 extension headers, in order (type, as built by [`ext_header`]).
    pub ext: Vec<(u8, Vec<u8>)>,
    /// Cut the IP packet to this many bytes (after building: lengths still claim more).
    pub truncate: Option<usize>,
}

impl Packet {
    pub fn new(src: IpAddr, dst: IpAddr, proto: u8, l4: Vec<u8>) -> Packet {
        assert_eq!(src.is_ipv4(), dst.is_ipv4(), "mixed address families");
        Packet {
            src,
            dst,
            proto,
            l4,
            frag: None,
            ihl_override: None,
            options: Vec::new(),
            ext: Vec::new(),
            truncate: None,
        }
    }

    pub fn tcp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Packet {
        let mut h = vec![0u8; 20];
        h[0..2].copy_from_slice(&sport.to_be_bytes());
        h[2..4].copy_from_slice(&dport.to_be_bytes());
        h[12] = 5 << 4; // data offset
        h[13] = 0x02; // SYN
        h[14..16].copy_from_slice(&64240u16.to_be_bytes());
        Packet::new(src, dst, IPPROTO_TCP, h)
    }

    /// A TCP header without the SYN flag (an ACK), e.g. for replies.
    pub fn tcp_ack(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Packet {
        let mut p = Packet::tcp(src, dst, sport, dport);
        p.l4[13] = 0x10;
        p
    }

    pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Packet {
        Packet::new(src, dst, IPPROTO_UDP, udp_like(sport, dport, b"hello"))
    }

    pub fn udplite(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Packet {
        Packet::new(src, dst, IPPROTO_UDPLITE, udp_like(sport, dport, b"hello"))
    }

    pub fn sctp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Packet {
        let mut h = vec![0u8; 12];
        h[0..2].copy_from_slice(&sport.to_be_bytes());
        h[2..4].copy_from_slice(&dport.to_be_bytes());
        h[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes()); // verification tag
        Packet::new(src, dst, IPPROTO_SCTP, h)
    }

    /// A packet of a protocol with ports: TCP (a SYN), UDP, SCTP, and UDP-Lite for any other.
    pub fn ported(src: IpAddr, dst: IpAddr, proto: u8, sport: u16, dport: u16) -> Packet {
        match proto {
            IPPROTO_TCP => Packet::tcp(src, dst, sport, dport),
            IPPROTO_UDP => Packet::udp(src, dst, sport, dport),
            IPPROTO_SCTP => Packet::sctp(src, dst, sport, dport),
            _ => Packet::udplite(src, dst, sport, dport),
        }
    }

    /// ICMP (IPv4) or ICMPv6 (IPv6) message: type, code, the 4 bytes after the checksum,
    /// then `body`.
    pub fn icmp(src: IpAddr, dst: IpAddr, ty: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Packet {
        let mut h = vec![ty, code, 0, 0];
        h.extend_from_slice(&rest);
        h.extend_from_slice(body);
        let proto = if src.is_ipv4() { IPPROTO_ICMP } else { IPPROTO_ICMPV6 };
        Packet::new(src, dst, proto, h)
    }

    /// Echo request (or reply) with identifier `id`, sequence 1 and a little payload.
    pub fn echo(src: IpAddr, dst: IpAddr, request: bool, id: u16) -> Packet {
        let ty = match (src.is_ipv4(), request) {
            (true, true) => 8,
            (true, false) => 0,
            (false, true) => 128,
            (false, false) => 129,
        };
        let id = id.to_be_bytes();
        Packet::icmp(src, dst, ty, 0, [id[0], id[1], 0, 1], b"ping-payload")
    }

    /// An ICMP error of `ty`/`code` from `src` to `dst` quoting `quoted` (its IP header and
    /// the first 8 bytes of its L4 header, as routers send); `rest` is e.g. the MTU.
    pub fn icmp_error(src: IpAddr, dst: IpAddr, ty: u8, code: u8, rest: [u8; 4], quoted: &Packet) -> Packet {
        let q = quoted.ip_bytes();
        let l4_start = q.len() - quoted.l4.len();
        let cut = (l4_start + 8).min(q.len());
        Packet::icmp(src, dst, ty, code, rest, &q[..cut])
    }

    /// IPv4 fragment fields / IPv6 fragment header (offset in 8-byte units).
    pub fn fragment(mut self, offset: u16, more: bool) -> Packet {
        if self.src.is_ipv4() {
            self.frag = Some((offset, more));
        } else {
            self.ext.push((EXT_FRAGMENT, fragment_header(offset, more)));
        }
        self
    }

    /// Appends an IPv6 extension header of `kind` (minimal, well-formed).
    pub fn ext(mut self, kind: u8) -> Packet {
        assert!(self.src.is_ipv6());
        self.ext.push((kind, ext_header(kind)));
        self
    }

    /// Appends a raw IPv6 extension header (`body[0]`, the next header, is filled in).
    pub fn ext_raw(mut self, kind: u8, body: Vec<u8>) -> Packet {
        self.ext.push((kind, body));
        self
    }

    pub fn ihl(mut self, ihl: u8) -> Packet {
        self.ihl_override = Some(ihl);
        self
    }

    pub fn options(mut self, options: &[u8]) -> Packet {
        self.options = options.to_vec();
        while !self.options.len().is_multiple_of(4) {
            self.options.push(0); // end of options list
        }
        self
    }

    /// A TCP packet's options replaced by `options` (a multiple of 4 bytes, as given: no
    /// padding is added, so malformed lists stay malformed), its data offset set to match.
    pub fn tcp_options(mut self, options: &[u8]) -> Packet {
        assert_eq!(self.proto, IPPROTO_TCP);
        assert!(options.len().is_multiple_of(4) && options.len() <= 40, "TCP options of {} bytes", options.len());
        let payload = self.l4.split_off(self.tcp_header_len());
        self.l4.truncate(20);
        self.l4.extend_from_slice(options);
        self.l4[12] = (((20 + options.len()) / 4) as u8) << 4;
        self.l4.extend_from_slice(&payload);
        self
    }

    /// TCP flags set to `flags` (SYN 0x02, ACK 0x10, ...).
    pub fn tcp_flags(mut self, flags: u8) -> Packet {
        assert_eq!(self.proto, IPPROTO_TCP);
        self.l4[13] = flags;
        self
    }

    /// The TCP checksum filled in (over the pseudo-header, as the stack does).
    pub fn with_tcp_checksum(mut self) -> Packet {
        assert_eq!(self.proto, IPPROTO_TCP);
        self.l4[16..18].fill(0);
        let sum = checksum(&pseudo_header(self.src, self.dst, &self.l4));
        self.l4[16..18].copy_from_slice(&sum.to_be_bytes());
        self
    }

    fn tcp_header_len(&self) -> usize {
        (self.l4[12] >> 4) as usize * 4
    }

    pub fn truncate(mut self, ip_len: usize) -> Packet {
        self.truncate = Some(ip_len);
        self
    }

    /// The IP packet.
    pub fn ip_bytes(&self) -> Vec<u8> {
        let mut out = match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let hl = 20 + self.options.len();
                let total = hl + self.l4.len();
                let mut h = vec![0u8; hl];
                let ihl = self.ihl_override.unwrap_or((hl / 4) as u8);
                h[0] = 0x40 | (ihl & 0x0f);
                h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
                h[4..6].copy_from_slice(&0x4242u16.to_be_bytes());
                let (off, more) = self.frag.unwrap_or((0, false));
                let flags = if self.frag.is_none() {
                    0x4000
                } else if more {
                    0x2000
                } else {
                    0
                };
                h[6..8].copy_from_slice(&(flags | (off & 0x1fff)).to_be_bytes());
                h[8] = 64;
                h[9] = self.proto;
                h[12..16].copy_from_slice(&s.octets());
                h[16..20].copy_from_slice(&d.octets());
                h[20..].copy_from_slice(&self.options);
                let sum = checksum(&h);
                h[10..12].copy_from_slice(&sum.to_be_bytes());
                h.extend_from_slice(&self.l4);
                h
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut chain = Vec::new();
                for (i, (_, body)) in self.ext.iter().enumerate() {
                    let next = self.ext.get(i + 1).map(|e| e.0).unwrap_or(self.proto);
                    let mut body = body.clone();
                    body[0] = next;
                    chain.extend_from_slice(&body);
                }
                let payload = chain.len() + self.l4.len();
                let mut h = vec![0u8; 40];
                h[0] = 0x60;
                h[4..6].copy_from_slice(&(payload as u16).to_be_bytes());
                h[6] = self.ext.first().map(|e| e.0).unwrap_or(self.proto);
                h[7] = 64;
                h[8..24].copy_from_slice(&s.octets());
                h[24..40].copy_from_slice(&d.octets());
                h.extend_from_slice(&chain);
                h.extend_from_slice(&self.l4);
                h
            }
            _ => unreachable!(),
        };
        if let Some(n) = self.truncate {
            out.truncate(n);
        }
        out
    }

    /// The frame as a device with the IP header at `l3_offset` sees it: 0 => the IP packet
    /// alone; 14 => Ethernet header + IP packet; more => Ethernet header, `l3_offset - 14`
    /// filler bytes, IP packet. (BPF_PROG_TEST_RUN insists on a whole IP header right after
    /// the Ethernet header, so packets whose own IP header is cut short are tested behind
    /// such a filler, with the program's L3 offset set to match.)
    pub fn frame(&self, l3_offset: u32) -> Vec<u8> {
        let ip = self.ip_bytes();
        let ethertype: u16 = if self.src.is_ipv4() { 0x0800 } else { 0x86dd };
        match l3_offset {
            0 => ip,
            1..=13 => panic!("unsupported l3 offset {l3_offset}"),
            n => {
                let mut payload = vec![0u8; n as usize - 14];
                payload.extend_from_slice(&ip);
                ethernet(ethertype, &payload)
            }
        }
    }
}

/// An Ethernet frame (fixed MACs) around `payload`.
pub fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An ARP request frame (Ethernet).
pub fn arp_frame() -> Vec<u8> {
    let mut arp = vec![0, 1, 0x08, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 10, 0, 0, 2]);
    ethernet(0x0806, &arp)
}

fn udp_like(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 8];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// A minimal well-formed IPv6 extension header of `kind` (next header filled in later).
pub fn ext_header(kind: u8) -> Vec<u8> {
    match kind {
        // 8 bytes: next, hdr ext len 0, PadN option of 4 data bytes.
        EXT_HOP_BY_HOP | EXT_DEST_OPTS => vec![0, 0, 1, 4, 0, 0, 0, 0],
        // Segment routing header type 4 with segments left 0 and no segments (8 bytes).
        EXT_ROUTING => vec![0, 0, 4, 0, 0, 0, 0, 0],
        // 16 bytes: payload len (16/4 - 2 = 2), reserved, SPI, sequence, 4-byte ICV.
        EXT_AH => vec![0, 2, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0xaa, 0xbb, 0xcc, 0xdd],
        EXT_FRAGMENT => fragment_header(0, false),
        other => panic!("not an extension header: {other}"),
    }
}

pub fn fragment_header(offset: u16, more: bool) -> Vec<u8> {
    let field = (offset << 3) | more as u16;
    let f = field.to_be_bytes();
    vec![0, 0, f[0], f[1], 0, 0, 0x42, 0x42]
}

/// The TCP segment of an IP packet (IPv4 with any header length, IPv6 without extension
/// headers) with its addresses, or `None` if it is not one.
pub fn tcp_segment(ip: &[u8]) -> Option<(IpAddr, IpAddr, &[u8])> {
    match ip.first()? >> 4 {
        4 if ip.get(9) == Some(&IPPROTO_TCP) => {
            let hl = (ip[0] & 0x0f) as usize * 4;
            let src: [u8; 4] = ip[12..16].try_into().ok()?;
            let dst: [u8; 4] = ip[16..20].try_into().ok()?;
            Some((IpAddr::from(src), IpAddr::from(dst), ip.get(hl..)?))
        }
        6 if ip.get(6) == Some(&IPPROTO_TCP) => {
            let src: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            Some((IpAddr::from(src), IpAddr::from(dst), ip.get(40..)?))
        }
        _ => None,
    }
}

/// Whether the TCP checksum of the segment in `ip` verifies.
pub fn tcp_checksum_ok(ip: &[u8]) -> bool {
    let (src, dst, seg) = tcp_segment(ip).expect("a TCP packet");
    checksum(&pseudo_header(src, dst, seg)) == 0
}

/// The value of the first MSS option of the TCP segment in `ip`, walking the options as a
/// receiver would; `None` without one.
pub fn tcp_mss(ip: &[u8]) -> Option<u16> {
    let (_, _, seg) = tcp_segment(ip)?;
    let opts = seg.get(20..(seg[12] >> 4) as usize * 4)?;
    let mut i = 0;
    while i < opts.len() {
        match opts[i] {
            0 => return None,
            1 => i += 1,
            kind => {
                let len = *opts.get(i + 1)? as usize;
                if len < 2 || i + len > opts.len() {
                    return None;
                }
                if kind == 2 && len == 4 {
                    return Some(u16::from_be_bytes([opts[i + 2], opts[i + 3]]));
                }
                i += len;
            }
        }
    }
    None
}

/// The TCP/UDP pseudo-header followed by `l4`.
fn pseudo_header(src: IpAddr, dst: IpAddr, l4: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
            out.extend_from_slice(&[0, IPPROTO_TCP]);
            out.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
            out.extend_from_slice(&(l4.len() as u32).to_be_bytes());
            out.extend_from_slice(&[0, 0, 0, IPPROTO_TCP]);
        }
        _ => unreachable!("mixed address families"),
    }
    out.extend_from_slice(l4);
    out
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
