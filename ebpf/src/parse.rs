//! The parser: from the IP header at the load-time offset to a [`Pkt`] (flow tuple, policy
//! ports, kind), for IPv4 (options), IPv6 (a bounded walk of extension headers), TCP, UDP,
//! UDP-Lite, SCTP and ICMP/ICMPv6, and for the packet an ICMP error quotes. What it accepts
//! and rejects is described at the top of `main.rs`; anything it cannot parse is
//! [`Malformed`].

use aya_ebpf::{helpers::bpf_skb_load_bytes, programs::TcContext};
use wirefence_common::FlowKey;

/// A header could not be parsed: the packet is dropped and counted as malformed.
pub struct Malformed;

/// IPv6 extension headers walked before giving up (more => malformed).
const MAX_EXT_HEADERS: u32 = 6;

/// Offsets at or beyond this are read with `bpf_skb_load_bytes` only (a bound the verifier
/// can check; headers never start this deep in the linear area).
const MAX_DIRECT_OFFSET: u32 = 0x2000;

const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
pub const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_DSTOPTS: u8 = 60;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_UDPLITE: u8 = 136;

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
const ICMPV6_PARAMETER_PROBLEM: u8 = 4;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

/// What the decision needs about a packet, or about the packet an ICMP error quotes.
#[repr(C, align(8))]
pub struct Pkt {
    /// Forward tuple; `direction` is the packet's direction. IPv4 addresses are v4-mapped.
    pub key: FlowKey,
    /// Policy port of this packet (destination port, or ICMP type << 8 | code).
    pub port: u16,
    /// Policy port of the packet this one would answer (its reversed tuple): the source
    /// port, or the ICMP echo type of the other side.
    pub reply_port: u16,
    pub kind: u8,
    pub v6: u8,
    /// TCP flags (FIN, SYN, RST, ACK ... as on the wire); 0 for other protocols and quotes.
    pub tcp_flags: u8,
    _pad: u8,
    /// [`KIND_ICMP_ERROR`]: offset of the quoted packet.
    pub quoted: u32,
    /// `skb->len`, for conntrack's counts: set by the caller after parsing (0 until then,
    /// and in a quote).
    pub len: u32,
}

/// Looked up in and recorded into conntrack.
pub const KIND_TRACKED: u8 = 0;
/// ICMP informational message other than echo: judged by the policy every time.
const KIND_UNTRACKED: u8 = 1;
/// ICMP error quoting a packet at `Pkt::quoted`.
pub const KIND_ICMP_ERROR: u8 = 2;
/// Non-first fragment: no L4 header, ports 0.
pub const KIND_FRAGMENT: u8 = 3;

impl Pkt {
    /// Zeroes `slot` in place (kind [`KIND_TRACKED`]) with 8-byte word stores, and returns
    /// it. A zero initialiser by value becomes a call to a byte-loop memset.
    #[inline(always)]
    pub fn init(slot: &mut core::mem::MaybeUninit<Pkt>) -> &mut Pkt {
        const WORDS: usize = core::mem::size_of::<Pkt>() / 8;
        const _: () = assert!(core::mem::size_of::<Pkt>().is_multiple_of(8));
        let p = slot.as_mut_ptr() as *mut u64;
        let mut i = 0;
        while i < WORDS {
            // SAFETY: within the (8-byte aligned) Pkt; volatile so it stays word stores.
            unsafe { core::ptr::write_volatile(p.add(i), 0) };
            i += 1;
        }
        // SAFETY: every byte is written; all-zero is a valid Pkt.
        unsafe { &mut *slot.as_mut_ptr() }
    }
}

/// `parse` flags.
pub const PARSE_V6: u32 = 1;
/// The packet quoted by an ICMP error: only its first 8 L4 bytes are there, and it must be
/// something conntrack can hold.
pub const PARSE_QUOTED: u32 = 2;

/// The packet as the parser reads it: its context and `skb->len`, read once. (The linear
/// area's bounds are re-read from the context at each access: kept in registers they spill
/// to the stack across the parser's helper calls, which measured slower.)
pub struct Frame<'a> {
    ctx: &'a TcContext,
    len: u32,
}

impl<'a> Frame<'a> {
    #[inline(always)]
    pub fn of(ctx: &'a TcContext) -> Frame<'a> {
        Frame { ctx, len: ctx.len() }
    }
}

/// Reads a `T` at `off`: straight from the linear part of the skb when it holds those bytes
/// (a bounds-checked direct load, a few instructions), else through `bpf_skb_load_bytes`
/// (paged GSO/GRO data), so both kinds of skb parse alike.
#[inline(always)]
fn load<T: Copy>(f: &Frame, off: u32) -> Result<T, Malformed> {
    // The verifier needs the variable offset bounded before it is added to a packet pointer.
    if off < MAX_DIRECT_OFFSET {
        let p = f.ctx.data() + off as usize;
        if p + core::mem::size_of::<T>() <= f.ctx.data_end() {
            // SAFETY: [p, p + size_of::<T>()) is inside the packet's linear data (checked
            // above); `T` is a plain byte array or integer.
            return Ok(unsafe { core::ptr::read_unaligned(p as *const T) });
        }
    }
    // Through an 8-byte aligned stack buffer: the object is built with misaligned access
    // allowed (packet reads in words, see build.rs), and the verifier rejects misaligned
    // stack access, which copying out of a byte-aligned `T` could produce.
    #[repr(C, align(8))]
    struct Aligned<T>(T);
    let mut buf = core::mem::MaybeUninit::<Aligned<T>>::uninit();
    // SAFETY: the helper writes exactly size_of::<T>() bytes into `buf` or fails.
    let r = unsafe {
        bpf_skb_load_bytes(f.ctx.skb.skb as *const _, off, buf.as_mut_ptr() as *mut _, core::mem::size_of::<T>() as u32)
    };
    if r != 0 {
        return Err(Malformed);
    }
    // SAFETY: initialised by the helper (r == 0); `T` is a plain byte array or integer.
    Ok(unsafe { buf.assume_init() }.0)
}

/// ::ffff:0:0/96 (IPv4-mapped), in the wire-order words of `byte`.
#[inline(always)]
fn is_v4_mapped(a: [u64; 2]) -> bool {
    a[0] == 0 && a[1] as u32 == 0xffff_0000
}

// Header fields are read in words (the object allows misaligned access, see build.rs) and
// taken apart here. A word holds wire bytes in memory order, so on this little-endian
// target wire byte `i` of a word is bits `8 * i ..`.

/// Wire byte `i` of `w`.
#[inline(always)]
fn byte(w: u64, i: u32) -> u8 {
    (w >> (8 * i)) as u8
}

/// The big-endian 16-bit field at wire bytes `i`, `i + 1` of `w`.
#[inline(always)]
fn be16(w: u64, i: u32) -> u16 {
    u16::from_be((w >> (8 * i)) as u16)
}

/// Bytes 8-15 of `::ffff:a` (`a` in wire order), as a word.
#[inline(always)]
fn v4_mapped_word(a: u32) -> u64 {
    (0xffffu64 << 16) | (a as u64) << 32
}

/// `::ffff:s` and `::ffff:d` (`s`, `d` in wire order) into a zeroed key, in words.
#[inline(always)]
fn set_v4_addrs(k: &mut FlowKey, s: u32, d: u32) {
    // SAFETY: words 1 of `src` and `dst` (bytes 8-15) of the 8-byte aligned key.
    unsafe {
        (k.src.as_mut_ptr().add(8) as *mut u64).write(v4_mapped_word(s));
        (k.dst.as_mut_ptr().add(8) as *mut u64).write(v4_mapped_word(d));
    }
}

/// IPv6 addresses (wire-order words) into the key, in words.
#[inline(always)]
fn set_v6_addrs(k: &mut FlowKey, s: [u64; 2], d: [u64; 2]) {
    // SAFETY: 16 bytes each at offsets 0 and 16 of the 8-byte aligned key.
    unsafe {
        (k.src.as_mut_ptr() as *mut [u64; 2]).write(s);
        (k.dst.as_mut_ptr() as *mut [u64; 2]).write(d);
    }
}

/// The common case behind one bounds check: an IPv4 header without options or an IPv6
/// header without extension headers, not a non-first fragment, carrying TCP or UDP, with a
/// TCP header's worth of L4 bytes in the linear area. Then it writes the whole `Pkt` that
/// [`parse_into`] would have produced (in words, no zeroing pass first); for anything else
/// it returns `None` having written nothing, and `parse_into` decides, rejections included.
#[inline(always)]
pub fn parse_fast<'s>(
    f: &Frame,
    off: u32,
    v6: bool,
    dir: u8,
    slot: &'s mut core::mem::MaybeUninit<Pkt>,
) -> Option<&'s mut Pkt> {
    if off >= MAX_DIRECT_OFFSET {
        return None;
    }
    let p = f.ctx.data() + off as usize;
    let end = f.ctx.data_end();
    // SAFETY (every read): callers pass offsets inside the range checked before.
    let rd = |at: usize| unsafe { core::ptr::read_unaligned((p + at) as *const u64) };
    // Per family: the key's address words, the protocol, the first 8 L4 bytes and L4
    // bytes 8-15 (TCP's data offset is byte 12).
    let (addrs, proto, l4, l4_more) = if v6 {
        if p + 40 + 20 > end {
            return None;
        }
        let h = rd(0);
        let (src, dst) = ([rd(8), rd(16)], [rd(24), rd(32)]);
        if byte(h, 0) >> 4 != 6 || is_v4_mapped(src) || is_v4_mapped(dst) {
            return None;
        }
        ([src[0], src[1], dst[0], dst[1]], byte(h, 6), rd(40), rd(48))
    } else {
        if p + 20 + 20 > end {
            return None;
        }
        let (w0, w1) = (rd(0), rd(8));
        let total = be16(w0, 2);
        // Version 4, IHL 5; total length 0 (BIG TCP) or covering the header; fragment
        // offset 0.
        if byte(w0, 0) != 0x45 || (total != 0 && total < 20) || be16(w0, 6) & 0x1fff != 0 {
            return None;
        }
        let (src, dst) = ((w1 >> 32) as u32, rd(16) as u32);
        ([0, v4_mapped_word(src), 0, v4_mapped_word(dst)], byte(w1, 1), rd(20), rd(28))
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    // TCP with a data offset below 5 words is malformed: parse_into says so.
    if proto == IPPROTO_TCP && byte(l4_more, 4) >> 4 < 5 {
        return None;
    }
    let (sport, dport) = (be16(l4, 0) as u64, be16(l4, 2) as u64);
    let tcp_flags = if proto == IPPROTO_TCP { byte(l4_more, 5) as u64 } else { 0 };
    // The Pkt's words (layout checked below): key, then port = dport, reply_port = sport,
    // kind KIND_TRACKED, v6, tcp_flags; quoted and len 0.
    let words: [u64; 7] = [
        addrs[0],
        addrs[1],
        addrs[2],
        addrs[3],
        sport | dport << 16 | (proto as u64) << 32 | (dir as u64) << 40,
        dport | sport << 16 | (KIND_TRACKED as u64) << 32 | (v6 as u64) << 40 | tcp_flags << 48,
        0,
    ];
    // SAFETY: Pkt is 7 words, 8-byte aligned, and every bit pattern of its fields is valid.
    unsafe {
        (slot.as_mut_ptr() as *mut [u64; 7]).write(words);
        Some(slot.assume_init_mut())
    }
}

// The word layout `parse_fast` writes.
const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<Pkt>() == 56 && core::mem::align_of::<Pkt>() == 8);
    assert!(offset_of!(FlowKey, sport) == 32 && offset_of!(FlowKey, dport) == 34);
    assert!(offset_of!(FlowKey, proto) == 36 && offset_of!(FlowKey, direction) == 37);
    assert!(offset_of!(Pkt, port) == 40 && offset_of!(Pkt, reply_port) == 42);
    assert!(offset_of!(Pkt, kind) == 44 && offset_of!(Pkt, v6) == 45 && offset_of!(Pkt, quoted) == 48);
    assert!(offset_of!(Pkt, tcp_flags) == 46 && offset_of!(Pkt, len) == 52);
};

/// Parses the packet whose IP header is at `off` into `out` (`flags`: [`PARSE_V6`],
/// [`PARSE_QUOTED`]); `false` if it cannot be parsed (or, quoted, cannot be tracked).
#[inline(never)]
pub fn parse(f: &Frame, off: u32, flags: u32, dir: u8, out: &mut Pkt) -> bool {
    parse_into(f, off, flags, dir, out).is_ok()
}

#[inline(always)]
pub fn parse_into(f: &Frame, off: u32, flags: u32, dir: u8, out: &mut Pkt) -> Result<(), Malformed> {
    let v6 = flags & PARSE_V6 != 0;
    let quoted = flags & PARSE_QUOTED != 0;
    out.v6 = v6 as u8;
    out.key.direction = dir;
    let (l4, nonfirst) = if v6 { parse_v6(f, off, out)? } else { parse_v4(f, off, out)? };
    if nonfirst {
        if quoted {
            return Err(Malformed);
        }
        out.kind = KIND_FRAGMENT;
        return Ok(());
    }
    let proto = out.key.proto;
    let icmp = if v6 { IPPROTO_ICMPV6 } else { IPPROTO_ICMP };
    // Bytes of L4 header that must be present.
    let need = match proto {
        _ if quoted => 8,
        IPPROTO_TCP => 20,
        IPPROTO_SCTP => 12,
        _ => 8,
    };
    if !matches!(proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_UDPLITE | IPPROTO_SCTP) && proto != icmp {
        // Other protocols: tracked by addresses and protocol, ports 0.
        return Ok(());
    }
    if l4 + need > f.len {
        return Err(Malformed);
    }
    let h: u64 = load(f, l4)?;
    if proto != icmp {
        if proto == IPPROTO_TCP && !quoted {
            // Two bytes, not one: for a 1-byte direct read LLVM turns the bounds check into
            // `p < data_end`, which the verifier does not take as a range.
            let doff: u16 = load(f, l4 + 12)?;
            if byte(doff as u64, 0) >> 4 < 5 {
                return Err(Malformed);
            }
            out.tcp_flags = byte(doff as u64, 1);
        }
        let sport = be16(h, 0);
        let dport = be16(h, 2);
        out.key.sport = sport;
        out.key.dport = dport;
        out.port = dport;
        out.reply_port = sport;
        return Ok(());
    }
    let (ty, code) = (byte(h, 0), byte(h, 1));
    let id = be16(h, 4);
    let port = (ty as u16) << 8 | code as u16;
    out.port = port;
    out.reply_port = port;
    let (req, rep) = if v6 { (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY) } else { (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY) };
    if ty == req {
        out.key.sport = id;
        out.reply_port = (rep as u16) << 8;
        return Ok(());
    }
    if ty == rep {
        out.key.dport = id;
        out.reply_port = (req as u16) << 8;
        return Ok(());
    }
    if quoted {
        // Nothing conntrack holds (and no error about an error).
        return Err(Malformed);
    }
    out.key.dport = port;
    let error = if v6 {
        matches!(ty, ICMPV6_DEST_UNREACH | ICMPV6_PACKET_TOO_BIG | ICMPV6_TIME_EXCEEDED | ICMPV6_PARAMETER_PROBLEM)
    } else {
        matches!(ty, ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM)
    };
    if error {
        out.kind = KIND_ICMP_ERROR;
        out.quoted = l4 + 8;
    } else {
        out.kind = KIND_UNTRACKED;
    }
    Ok(())
}

/// IPv4 header at `off` into `out.key`; returns (L4 offset, non-first fragment).
#[inline(always)]
fn parse_v4(f: &Frame, off: u32, out: &mut Pkt) -> Result<(u32, bool), Malformed> {
    // Wire bytes 0-7, 8-15, 16-19 (see `byte`).
    let w0: u64 = load(f, off)?;
    let w1: u64 = load(f, off + 8)?;
    let dst: u32 = load(f, off + 16)?;
    if byte(w0, 0) >> 4 != 4 {
        return Err(Malformed);
    }
    let hdr_len = (byte(w0, 0) & 0x0f) as u32 * 4;
    if hdr_len < 20 {
        return Err(Malformed);
    }
    // Total length 0 is legal for BIG TCP GSO packets; otherwise it covers the header.
    let total = be16(w0, 2) as u32;
    if total != 0 && total < hdr_len {
        return Err(Malformed);
    }
    // Options, if any, must be present.
    if off + hdr_len > f.len {
        return Err(Malformed);
    }
    set_v4_addrs(&mut out.key, (w1 >> 32) as u32, dst);
    out.key.proto = byte(w1, 1);
    let frag = be16(w0, 6);
    Ok((off + hdr_len, frag & 0x1fff != 0))
}

/// IPv6 header and extension headers at `off` into `out.key`; returns (L4 offset, non-first
/// fragment).
#[inline(always)]
fn parse_v6(f: &Frame, off: u32, out: &mut Pkt) -> Result<(u32, bool), Malformed> {
    let h: u64 = load(f, off)?;
    if byte(h, 0) >> 4 != 6 {
        return Err(Malformed);
    }
    let src: [u64; 2] = load(f, off + 8)?;
    let dst: [u64; 2] = load(f, off + 24)?;
    if is_v4_mapped(src) || is_v4_mapped(dst) {
        return Err(Malformed);
    }
    set_v6_addrs(&mut out.key, src, dst);
    let (proto, l4, nonfirst) = walk_ext(f, byte(h, 6), off + 40)?;
    out.key.proto = proto;
    Ok((l4, nonfirst))
}

#[inline(always)]
fn is_ext(nh: u8) -> bool {
    matches!(nh, IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_FRAGMENT | IPPROTO_DSTOPTS | IPPROTO_AH)
}

/// Walks at most [`MAX_EXT_HEADERS`] IPv6 extension headers from `off`; returns the upper
/// protocol, its offset and whether this is a non-first fragment (then the protocol is the
/// fragment header's next header and the offset is meaningless).
#[inline(always)]
fn walk_ext(f: &Frame, first: u8, off: u32) -> Result<(u8, u32, bool), Malformed> {
    let len = f.len;
    let mut nh = first;
    let mut off = off;
    let mut i = 0;
    while i < MAX_EXT_HEADERS {
        match nh {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let e: u16 = load(f, off)?;
                nh = byte(e as u64, 0);
                off += (byte(e as u64, 1) as u32 + 1) * 8;
            }
            IPPROTO_AH => {
                let e: u16 = load(f, off)?;
                nh = byte(e as u64, 0);
                off += (byte(e as u64, 1) as u32 + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                let e: u64 = load(f, off)?;
                nh = byte(e, 0);
                off += 8;
                if be16(e, 2) & 0xfff8 != 0 {
                    return Ok((nh, off, true));
                }
            }
            _ => return Ok((nh, off, false)),
        }
        // The whole extension header must be present.
        if off > len {
            return Err(Malformed);
        }
        i += 1;
    }
    if is_ext(nh) {
        return Err(Malformed);
    }
    Ok((nh, off, false))
}
