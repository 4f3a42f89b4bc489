//! The live verdict trace (`wirefence-agent trace`): a filter the tracer writes into
//! [`TRACE`] (one entry), the switch it sets ([`TRACE_ARMED`]) and the records the programs
//! send to [`TRACE_EVENTS`] for every decided packet the filter matches.
//!
//! Per packet the programs load the switch once, after the decision (a global: one load,
//! no map lookup); only when it is set do they call the subprogram that matches the filter
//! and writes the record. The load-time global [`GLOBAL_TRACE`] (1 in the object) set to 0
//! lets the verifier remove even that load: the benchmark's "as before tracing existed" copy.
//!
//! [`TRACE`]: crate::TRACE
//! [`TRACE_ARMED`]: crate::TRACE_ARMED
//! [`TRACE_EVENTS`]: crate::TRACE_EVENTS

/// Load-time global: 0 compiles the trace out of the loaded programs (the verifier drops
/// the branch on a frozen read-only value).
pub const GLOBAL_TRACE: &str = "WF_TRACE_BUILT";

/// [`TraceFilter::proto`] holds a protocol to match.
pub const MATCH_PROTO: u32 = 1 << 8;
/// [`TraceFilter::port`] holds a port to match (either end's, or the ICMP type/code).
pub const MATCH_PORT: u32 = 1 << 16;

/// `TRACE[0]`, written by the tracer. Addresses are IPv4-mapped like [`crate::FlowKey`]'s,
/// so a prefix also selects the family; a zero mask matches every address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceFilter {
    /// The pid of the tracer that holds the trace (0: none), so one that died without
    /// disarming can be told from a live one.
    pub tracer: u32,
    pub _pad: u32,
    /// A packet matches when `src & src_mask == src` (same for `dst`), as two words each.
    pub src: [u64; 2],
    pub src_mask: [u64; 2],
    pub dst: [u64; 2],
    pub dst_mask: [u64; 2],
    /// Protocol number, with [`MATCH_PROTO`] set when it counts.
    pub proto: u32,
    /// Port, with [`MATCH_PORT`] set when it counts: matches the source or the destination
    /// port (TCP, UDP, UDP-Lite, SCTP); never ICMP or a non-first fragment.
    pub port: u32,
    /// Records the programs could not send (the ring buffer was full); not added
    /// atomically, so CPUs racing may lose a count.
    pub lost: u64,
}

/// Which way the decision was reached ([`TraceRecord::path`]).
pub mod path {
    /// The per-CPU flow cache: an established flow's recent verdict.
    pub const FLOW_CACHE: u8 = 1;
    /// The flow's conntrack entry (re-checked under the current policy if older).
    pub const CONNTRACK: u8 = 2;
    /// An ICMP error whose quoted flow is in conntrack.
    pub const ICMP_ERROR: u8 = 3;
    /// A non-first fragment, judged by the policy without ports.
    pub const FRAGMENT: u8 = 4;
    /// A new flow (or a packet no entry covers), judged by the policy.
    pub const NEW: u8 = 5;
}

/// [`TraceRecord::verdict`].
pub const TRACE_PASS: u8 = 1;
pub const TRACE_DROP: u8 = 2;

/// A record of [`crate::TRACE_EVENTS`]: one decided packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceRecord {
    /// The packet's own tuple and direction (not the flow's canonical one).
    pub flow: crate::FlowKey,
    /// The deciding rule's slot, [`crate::NO_RULE`] for a drop without one.
    pub rule: u32,
    /// `skb->len`.
    pub len: u32,
    /// The policy port (destination port, or ICMP `type << 8 | code`) with
    /// [`crate::EVENT_PORT`] set; 0 for a fragment without ports.
    pub port: u32,
    pub path: u8,
    pub verdict: u8,
    /// TCP flags as on the wire; 0 for other protocols.
    pub tcp_flags: u8,
    pub _pad: u8,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], padding-free, every bit pattern valid.
    unsafe impl aya::Pod for super::TraceFilter {}
    unsafe impl aya::Pod for super::TraceRecord {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn no_implicit_padding() {
        assert_eq!(size_of::<TraceFilter>(), 4 + 4 + 64 + 4 + 4 + 8);
        assert_eq!(size_of::<TraceRecord>(), 40 + 4 + 4 + 4 + 4);
    }
}
