//! Part 5: what the live trace costs per packet, on one object over an enforcer's pins (one
//! rule, IPv4), in interleaved rounds:
//!
//! - **before tracing**: the programs loaded with `WF_TRACE_BUILT = 0`, so the verifier
//!   removes the trace's check: the programs as they were before the trace existed;
//! - **no trace**: as the agent loads them, no tracer running (the shipped state): one read
//!   of the filter's `armed` word per packet;
//! - **armed, no match**: a tracer runs with a filter this packet misses (another source);
//! - **armed, matching**: every packet is recorded (runs of at most 4,000 repetitions, the
//!   ring drained between them, so each record is written, not lost to a full ring).
//!
//! Paths: an established ACK through `wf_ingress` (flow cache), the path of nearly every
//! packet, and a denied SYN (verdict cache). Each run checks its verdict and counter; the
//! matching runs check that every packet was recorded, and the "before tracing" copy that
//! it records nothing even with a matching filter armed.

use std::net::IpAddr;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use aya::maps::{Array, MapData, RingBuf};
use wirefence_agent::enforce::pin_path;
use wirefence_agent::enforce::trace::TraceSpec;
use wirefence_common::trace::TraceFilter;
use wirefence_common::{self as common, stat};
use wirefence_tests::bpf::{TC_ACT_OK, TC_ACT_SHOT};
use wirefence_tests::packet::Packet;

use super::bpf::{self, Caches, Shared};
use super::median;
use super::perpacket::L3_OFFSET;
use super::rules::{self, DENIED_PORT};

/// Runs that record every packet stay within the ring (256 KiB: 4,096 records of 64 bytes).
const MATCHING_REPEAT: u32 = 4000;

/// Medians in ns per packet: `[before tracing, no trace, armed no match, armed matching]`.
pub struct Results {
    pub est: [f64; 4],
    pub denied: [f64; 4],
    pub matching_repeat: u32,
}

struct Trace {
    filter: Array<MapData, TraceFilter>,
    switch: Array<MapData, u32>,
    ring: RingBuf<MapData>,
}

impl Trace {
    fn open(dir: &Path) -> Result<Trace> {
        let map = |name: &'static str| wirefence_agent::bpf::from_pin(&pin_path(dir, name), name);
        Ok(Trace {
            filter: Array::try_from(map(common::TRACE)?)?,
            switch: Array::try_from(map(common::TRACE_ARMED)?)?,
            ring: RingBuf::try_from(map(common::TRACE_EVENTS)?)?,
        })
    }

    /// Armed with a filter of source `src`, or disarmed.
    fn set(&mut self, src: Option<IpAddr>) -> Result<()> {
        let filter = match src {
            Some(a) => TraceSpec::new(Some(a.into()), None, None, None)?.filter(std::process::id()),
            None => TraceFilter::default(),
        };
        self.filter.set(0, filter, 0)?;
        Ok(self.switch.set(0, u32::from(src.is_some()), 0)?)
    }

    fn drain(&mut self) -> u64 {
        let mut n = 0;
        while self.ring.next().is_some() {
            n += 1;
        }
        n
    }
}

/// One run: ns per repetition, after checking the verdict, the counter and how many records
/// the trace got.
#[allow(clippy::too_many_arguments)]
fn timed(
    shared: &Shared,
    trace: &mut Trace,
    prog: &str,
    frame: &[u8],
    repeat: u32,
    want: u32,
    counter: u32,
    records: u64,
) -> Result<f64> {
    let before = shared.stat(counter)?;
    let (ret, ns) = bpf::test_run(shared.prog_fd(prog)?, frame, repeat)?;
    ensure!(ret == want, "verdict {ret}, expected {want}");
    ensure!(shared.stat(counter)? - before == u64::from(repeat), "STATS[{counter}] did not count every repetition");
    let got = trace.drain();
    ensure!(got == records, "{got} trace records, expected {records}");
    Ok(f64::from(ns))
}

pub fn run(root: &Path, state_dir: &Path, repeat: u32, reps: usize) -> Result<Results> {
    let (_pins, enforcer) = bpf::one_rule(root, state_dir, "wfbtr", L3_OFFSET)?;
    let shipped = Shared::load(enforcer.dir(), L3_OFFSET, Caches::On)?;
    let before = Shared::load_traceless(enforcer.dir(), L3_OFFSET)?;
    let mut trace = Trace::open(enforcer.dir())?;
    let f = rules::flow_of(0, false);
    let other = rules::flow_of(0, true).src; // a source no IPv4 packet has
    let ingress = common::PROG_INGRESS;
    let (ret, _) =
        bpf::test_run(shipped.prog_fd(ingress)?, &Packet::tcp(f.src, f.dst, 9999, f.dport).frame(L3_OFFSET), 1)?;
    ensure!(ret == TC_ACT_OK, "the flow's SYN: verdict {ret}");
    let ack = Packet::tcp_ack(f.src, f.dst, 9999, f.dport).frame(L3_OFFSET);
    let denied = Packet::tcp(f.src, f.dst, 40000, DENIED_PORT).frame(L3_OFFSET);
    let est = stat::ALLOWED_ESTABLISHED;
    let m = repeat.min(MATCHING_REPEAT);
    let mut s: [[Vec<f64>; 4]; 2] = Default::default();
    for _ in 0..reps {
        for (path, frame, want, counter) in [(0, &ack, TC_ACT_OK, est), (1, &denied, TC_ACT_SHOT, stat::DENIED)] {
            trace.set(None)?;
            s[path][0].push(timed(&before, &mut trace, ingress, frame, repeat, want, counter, 0)?);
            s[path][1].push(timed(&shipped, &mut trace, ingress, frame, repeat, want, counter, 0)?);
            trace.set(Some(other))?;
            s[path][2].push(timed(&shipped, &mut trace, ingress, frame, repeat, want, counter, 0)?);
            trace.set(Some(f.src))?;
            s[path][3].push(timed(&shipped, &mut trace, ingress, frame, m, want, counter, u64::from(m))?);
            timed(&before, &mut trace, ingress, frame, m, want, counter, 0).context("before tracing, armed")?;
        }
    }
    trace.set(None)?;
    let med = |v: &[Vec<f64>; 4]| [median(&v[0]), median(&v[1]), median(&v[2]), median(&v[3])];
    Ok(Results { est: med(&s[0]), denied: med(&s[1]), matching_repeat: m })
}

pub fn print(r: &Results, reps: usize, repeat: u32) {
    println!();
    println!(
        "5. Live trace (wirefence-agent trace), IPv4, 1 rule; kernel-timed ns/packet, median of {reps} interleaved \
         rounds ({repeat} repetitions; matching: {}, the ring drained between runs)",
        r.matching_repeat
    );
    println!(
        "{:<36} {:>10} {:>10} {:>7} {:>10} {:>7} {:>10} {:>7}",
        "path", "before", "no trace", "ratio", "armed,miss", "ratio", "matching", "ratio"
    );
    let row = |what: &str, v: &[f64; 4]| {
        println!(
            "{what:<36} {:>10.1} {:>10.1} {:>7.2} {:>10.1} {:>7.2} {:>10.1} {:>7.2}",
            v[0],
            v[1],
            v[1] / v[0],
            v[2],
            v[2] / v[0],
            v[3],
            v[3] / v[0]
        )
    };
    row("established ACK (flow cache)", &r.est);
    row("denied SYN (verdict cached)", &r.denied);
    let worst = (r.est[1] / r.est[0]).max(r.denied[1] / r.denied[0]) - 1.0;
    println!(
        "   no trace running: at most {:+.1}% from before tracing existed ({})",
        worst * 100.0,
        if worst.abs() <= 0.05 { "within noise (5%)" } else { "outside 5%: rerun on a quiet machine" }
    );
}
