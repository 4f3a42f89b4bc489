//! MSS clamping: a TCP SYN or SYN-ACK crossing the tunnel device announces at most the MSS
//! its MTU allows (`CT_CONFIG[0].mss_clamp`, per family), so hosts behind a gateway that
//! see a 1500-byte LAN never send segments the tunnel must fragment or drop (PMTU discovery
//! often fails across the Internet).
//!
//! Only the MSS option's value is rewritten, and the TCP checksum is updated incrementally
//! (`bpf_l4_csum_replace`; with a partial checksum the kernel leaves the field to the final
//! computation). The options are read whole (at most 40 bytes) and walked kind by kind:
//! EOL ends them, NOP is one byte, anything else carries its length. An option that is
//! truncated or has a length below 2 ends the walk with nothing changed: clamping never
//! drops or judges a packet (the policy does), it only leaves odd packets alone. IPv4
//! options are skipped (the header length is read); non-first IPv4 fragments carry no TCP
//! header and IPv6 packets whose TCP header follows extension headers (fragment header
//! included) are left alone (SYNs carry none in practice).

use aya_ebpf::{
    helpers::{bpf_loop, bpf_skb_load_bytes},
    programs::TcContext,
};
use wirefence_common::MssClamp;

use crate::conntrack;

const IPPROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const OPT_EOL: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_MSS: u8 = 2;
const OPT_MSS_LEN: u8 = 4;
const MAX_OPTIONS: usize = 40;
/// `bpf_l4_csum_replace` flags: the replaced field is 2 bytes (not the pseudo-header).
const CSUM_FIELD_2: u64 = 2;

/// The limits the agent set; `None` when clamping is off for both families.
#[inline(always)]
pub fn limits() -> Option<MssClamp> {
    let m = conntrack::settings()?.mss_clamp;
    if m.v4 == 0 && m.v6 == 0 {
        return None;
    }
    Some(m)
}

/// Clamps the MSS option of the TCP SYN or SYN-ACK whose IP header is at `l3` (IPv6 if
/// `v6`) to `limits`. Anything else, and anything it cannot read, is left as it is.
#[inline(never)]
pub fn clamp(ctx: &TcContext, l3: u32, v6: bool, limits: &MssClamp) {
    let limit = if v6 { limits.v6 } else { limits.v4 };
    if limit == 0 {
        return;
    }
    let Some(l4) = tcp_offset(ctx, l3 as usize, v6) else { return };
    // Data offset (high nibble) and flags.
    let Ok(hdr) = ctx.load::<[u8; 2]>(l4 + 12) else { return };
    if hdr[1] & TCP_SYN == 0 {
        return;
    }
    let doff = (hdr[0] >> 4) as usize * 4;
    if doff <= 20 {
        return; // no options (or a header too short to be TCP: the policy's business)
    }
    let len = doff - 20;
    let mut walk = Walk { opts: [0; MAX_OPTIONS], len: len as u64, next: 0, found: 0 };
    // 4..=40 bytes (a 4-bit data offset); the verifier needs the bounds said where the
    // helper's length is passed.
    if len == 0 || len > MAX_OPTIONS {
        return;
    }
    // SAFETY: the helper writes at most `len` <= 40 bytes into `opts`, or fails.
    let r = unsafe {
        bpf_skb_load_bytes(ctx.skb.skb as *const _, (l4 + 20) as u32, walk.opts.as_mut_ptr() as *mut _, len as u32)
    };
    if r != 0 {
        return; // fewer bytes than the data offset claims
    }
    // Each step consumes at least one byte: 40 steps reach the end of any option list.
    // SAFETY: `walk_step` takes `&mut Walk` as its context, which is what is passed.
    unsafe { bpf_loop(MAX_OPTIONS as u32, walk_step as *mut _, &mut walk as *mut Walk as *mut _, 0) };
    if walk.found == 0 {
        return;
    }
    let at = (walk.found - 1) as usize;
    let (Some(hi), Some(lo)) = (walk.opts.get(at), walk.opts.get(at + 1)) else { return };
    // Byte by byte: merged into one 2-byte load at a variable stack offset, the verifier
    // refuses it as possibly misaligned.
    // SAFETY: references into `opts`.
    let old = unsafe { u16::from_be_bytes([core::ptr::read_volatile(hi), core::ptr::read_volatile(lo)]) };
    if old <= limit {
        return;
    }
    let value_off = l4 + 20 + at;
    if ctx.store(value_off, &limit.to_be_bytes(), 0).is_err() {
        return;
    }
    // The checksum sums 16-bit words from the TCP header's start: a value at an even
    // offset is one word (its bytes in memory order), at an odd one its bytes fall into
    // two words, which adds up to the value with its bytes swapped: on this little-endian
    // target, the value itself.
    let (from, to) = if at % 2 == 0 {
        (u16::from_ne_bytes(old.to_be_bytes()), u16::from_ne_bytes(limit.to_be_bytes()))
    } else {
        (old, limit)
    };
    let _ = ctx.l4_csum_replace(l4 + 16, from as u64, to as u64, CSUM_FIELD_2);
}

#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Aligned16([u8; 16]);

/// Whether the packet may be a TCP SYN: `false` only when the linear data shows it is not
/// (direct loads, no helper call), so the clamp alone costs little on every other packet.
#[inline(always)]
pub fn maybe_syn(ctx: &TcContext, l3: u32, v6: bool) -> bool {
    let (data, end) = (ctx.data(), ctx.data_end());
    // Bounded so the verifier can add it to a packet pointer.
    if l3 > 64 {
        return true;
    }
    let ip = data + l3 as usize;
    let byte = |p: usize| -> Option<u8> {
        if p + 1 > end {
            return None;
        }
        // SAFETY: within the linear data, checked against `data_end` just above.
        Some(unsafe { *(p as *const u8) })
    };
    let l4 = if v6 {
        match byte(ip + 6) {
            Some(IPPROTO_TCP) => ip + 40,
            Some(_) => return false, // not TCP, or behind extension headers: left alone anyway
            None => return true,
        }
    } else {
        let (Some(ver_ihl), Some(proto)) = (byte(ip), byte(ip + 9)) else { return true };
        if proto != IPPROTO_TCP {
            return false;
        }
        ip + (ver_ihl & 0x0f) as usize * 4
    };
    match byte(l4 + 13) {
        Some(flags) => flags & TCP_SYN != 0,
        None => true,
    }
}

/// Offset of the TCP header of an unfragmented (or first-fragment) TCP packet.
#[inline(always)]
fn tcp_offset(ctx: &TcContext, l3: usize, v6: bool) -> Option<usize> {
    if v6 {
        // Next header (6).
        let next = ctx.load::<u8>(l3 + 6).ok()?;
        return (next == IPPROTO_TCP).then_some(l3 + 40);
    }
    // Version/IHL .. protocol in one load, into an aligned buffer (the compiler merges
    // neighbouring byte reads; the verifier refuses misaligned stack loads).
    let h = ctx.load::<Aligned16>(l3).ok()?.0;
    let (ver_ihl, frag, proto) = (h[0], [h[6], h[7]], h[9]);
    // A non-first fragment carries no TCP header.
    if proto != IPPROTO_TCP || (frag[0] & 0x1f != 0 || frag[1] != 0) {
        return None;
    }
    let ihl = (ver_ihl & 0x0f) as usize * 4;
    (ihl >= 20).then_some(l3 + ihl)
}

/// The option walk's state, for `bpf_loop`: a loop the verifier checks once, where an
/// unrolled walk of variable-length options costs it seconds.
#[repr(C, align(8))]
// Words of 8 bytes: the compiler merges stores to neighbouring fields, and the verifier
// refuses a merged store that is not aligned to its size.
struct Walk {
    opts: [u8; MAX_OPTIONS],
    /// Bytes of options.
    len: u64,
    /// Offset of the option the next step reads.
    next: u64,
    /// 1 + offset of the value of a well-formed MSS option; 0 while none is found.
    found: u64,
}

/// One option: 0 to go on, 1 to stop (end of the list, the MSS found, or a malformed
/// option, which leaves `found` at 0 so nothing changes).
extern "C" fn walk_step(_index: u32, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `clamp` passes its `Walk` as the context.
    let w = unsafe { &mut *(ctx as *mut Walk) };
    let (i, len) = (w.next as usize, w.len as usize);
    if i >= len {
        return 1;
    }
    let Some(kind) = w.opts.get(i) else { return 1 };
    // SAFETY: a reference into `opts` (volatile: see `clamp`).
    match unsafe { core::ptr::read_volatile(kind) } {
        OPT_EOL => 1,
        OPT_NOP => {
            w.next += 1;
            0
        }
        kind => {
            let Some(olen) = w.opts.get(i + 1) else { return 1 };
            // SAFETY: as above.
            let olen = unsafe { core::ptr::read_volatile(olen) } as usize;
            if i + 1 >= len || olen < 2 || i + olen > len {
                return 1; // malformed: change nothing
            }
            if kind == OPT_MSS {
                if olen == OPT_MSS_LEN as usize {
                    w.found = (i + 3) as u64;
                }
                return 1;
            }
            w.next += olen as u64;
            0
        }
    }
}
