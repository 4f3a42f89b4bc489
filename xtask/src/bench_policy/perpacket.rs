//! Benchmark 1: per-packet cost under BPF_PROG_TEST_RUN at growing rule counts.
//!
//! For each rule count and family: the generated rules (see `rules`) are compiled by the
//! agent's compiler and written by the agent's `Enforcer` into maps pinned under the
//! bench's bpffs; the classifiers are then loaded a second time over those pins (so they
//! read exactly what the enforcer wrote) and run on crafted Ethernet frames (l3 offset 14,
//! as on veth). Measured, in kernel-reported ns per repetition:
//!
//! - **new flow (denied)**: a TCP SYN from the last rule's source to its destination, on a
//!   port no rule allows, through the copy without caches ([`Caches::Off`]). It takes the
//!   whole new-flow path — a conntrack miss (the canonical tuple), the src and dst class
//!   hash probes, the policy LPM lookup (which walks the last rule's key down to the port) —
//!   and inserts nothing, so every one of the repetitions is a new flow. This is the number
//!   the rule-count goal is judged on. **cached**: the same packet through the programs as
//!   loaded, where the verdict cache answers the policy lookup after the first repetition
//!   (as for new flows that differ only in source port).
//! - **new flow (allowed), 1-shot**: SYNs the last rule allows, each with a fresh source
//!   port, one BPF_PROG_TEST_RUN of one repetition each (an allowed new flow inserts its
//!   conntrack entry, so repeating one packet would measure an established flow): the
//!   median over many. Includes the test runner's own timer overhead, shown by the no-op
//!   measured the same way.
//! - **established (fwd)**: an ACK of a flow in conntrack with the current epoch;
//!   **established (reply)**: the reply direction on `wf_egress`. Repeated, both hit the
//!   per-CPU flow cache (the steady state of a flow on its CPU).
//! - **established, no cache**: the same two packets through the copy without caches, so
//!   they take the conntrack path (one lookup of the canonical tuple, either way), as the
//!   first packet of a flow on a CPU, or after a policy flip, does.
//! - **no-op**: a two-instruction classifier (`r0 = TC_ACT_OK; exit`) on the same frame;
//!   **not IP**: an ARP frame through `wf_ingress` (entry, protocol check, one counter).
//!
//! Every measurement checks the verdict and that the matching STATS counter went up by
//! exactly the number of repetitions, so each path measured is the one named. Every row has
//! its own enforcer; all are set up first, then measured in interleaved rounds.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use wirefence_agent::enforce::Enforcer;
use wirefence_agent::model::IfName;
use wirefence_agent::policy::compile;
use wirefence_common::{self as common, stat};
use wirefence_tests::bpf::{TC_ACT_OK, TC_ACT_SHOT};
use wirefence_tests::packet::{arp_frame, Packet};

use super::bpf::{self, Caches, Pins, Shared};
use super::median;
use super::rules::{self, DENIED_PORT};

pub const L3_OFFSET: u32 = 14;

/// One (rule count, family) row: medians in ns per packet.
pub struct Row {
    pub rules: u32,
    pub v6: bool,
    pub entries: usize,
    pub compile: Duration,
    pub apply: Duration,
    pub noop: f64,
    pub not_ip: f64,
    pub denied_new: f64,
    pub denied_cached: f64,
    pub est_fwd: f64,
    pub est_reply: f64,
    pub est_fwd_ct: f64,
    pub est_reply_ct: f64,
    pub new_1shot: f64,
    pub noop_1shot: f64,
}

impl Row {
    /// Established cost as the goal judges it: the slower direction.
    pub fn est(&self) -> f64 {
        self.est_fwd.max(self.est_reply)
    }
}

pub struct Params {
    pub repeat: u32,
    pub reps: usize,
    pub one_shots: u32,
}

/// A row's enforcer (its own pins), its classifiers loaded over those pins, its frames and
/// its samples.
struct Bed {
    _pins: Pins,
    enforcer: Enforcer,
    shared: Shared,
    /// The same programs without their caches ([`Caches::Off`]).
    uncached: Shared,
    frames: Frames,
    samples: [Vec<f64>; 8],
    row: Row,
}

struct Frames {
    denied: Vec<u8>,
    fwd: Vec<u8>,
    reply: Vec<u8>,
}

const NOOP: usize = 0;
const NOT_IP: usize = 1;
const DENIED: usize = 2;
const EST_FWD: usize = 3;
const EST_REPLY: usize = 4;
const EST_FWD_CT: usize = 5;
const EST_REPLY_CT: usize = 6;
const DENIED_CACHED: usize = 7;

/// Sets up every (rule count, family) at once, each on an enforcer of its own, then runs
/// `reps` measurement rounds over all of them (so a burst of load elsewhere hits one sample
/// of each row rather than all samples of one).
pub fn run(root: &Path, state_dir: &Path, counts: &[u32], p: &Params) -> Result<Vec<Row>> {
    let noop = bpf::load_noop()?;
    let mut beds = Vec::new();
    for (i, &n) in counts.iter().enumerate() {
        for v6 in [false, true] {
            beds.push(setup(root, state_dir, i, n, v6, noop.as_raw_fd(), p)?);
        }
    }
    for _ in 0..p.reps {
        for bed in &mut beds {
            measure(bed, noop.as_raw_fd(), p)?;
        }
    }
    let mut rows = Vec::new();
    for bed in beds {
        let Bed { mut row, samples, enforcer, shared, uncached, _pins, .. } = bed;
        row.noop = median(&samples[NOOP]);
        row.not_ip = median(&samples[NOT_IP]);
        row.denied_new = median(&samples[DENIED]);
        row.denied_cached = median(&samples[DENIED_CACHED]);
        row.est_fwd = median(&samples[EST_FWD]);
        row.est_reply = median(&samples[EST_REPLY]);
        row.est_fwd_ct = median(&samples[EST_FWD_CT]);
        row.est_reply_ct = median(&samples[EST_REPLY_CT]);
        eprintln!(
            "bench-policy: per-packet {} {} rules: new(denied) {:.1} ns (verdict cached {:.1}), est {:.1}/{:.1} ns, \
             no-op {:.1} ns",
            fam(row.v6),
            row.rules,
            row.denied_new,
            row.denied_cached,
            row.est_fwd,
            row.est_reply,
            row.noop
        );
        rows.push(row);
        drop((shared, uncached));
        drop(enforcer);
    }
    Ok(rows)
}

fn setup(root: &Path, state_dir: &Path, i: usize, n: u32, v6: bool, noop: RawFd, p: &Params) -> Result<Bed> {
    let ifname: IfName = format!("wfbpp{}-{i}{}", std::process::id() % 100_000, if v6 { 6 } else { 4 }).parse()?;
    let pins = Pins { root: root.to_owned(), ifname: ifname.clone() };
    let mut enforcer = Enforcer::open(root, &ifname, L3_OFFSET, state_dir).context("Enforcer::open")?;
    let shared = Shared::load(enforcer.dir(), L3_OFFSET, Caches::On)?;
    let uncached = Shared::load(enforcer.dir(), L3_OFFSET, Caches::Off)?;
    let t = Instant::now();
    let policy = rules::policy(rules::generate(n, v6))?;
    let compiled = compile(&policy).map_err(|e| anyhow::anyhow!("compile: {e}"))?;
    let compile_time = t.elapsed();
    let t = Instant::now();
    enforcer.apply(&compiled, 1).context("Enforcer::apply")?;
    let apply_time = t.elapsed();
    let slots = read_slots(state_dir, &ifname)?;
    let last_slot = *slots.get(&format!("r{}", n - 1)).context("no slot for the last rule")?;
    let mut row = Row {
        rules: n,
        v6,
        entries: compiled.entries.len(),
        compile: compile_time,
        apply: apply_time,
        noop: 0.0,
        not_ip: 0.0,
        denied_new: 0.0,
        denied_cached: 0.0,
        est_fwd: 0.0,
        est_reply: 0.0,
        est_fwd_ct: 0.0,
        est_reply_ct: 0.0,
        new_1shot: 0.0,
        noop_1shot: 0.0,
    };
    let what = format!("{} rules {n}", fam(v6));
    let ingress = shared.prog_fd(common::PROG_INGRESS)?;
    let f = rules::flow_of(n - 1, v6);

    // Allowed new flows, one repetition each, fresh source ports.
    let base_port = 10000u16;
    let frames: Vec<Vec<u8>> =
        (0..p.one_shots).map(|k| Packet::tcp(f.src, f.dst, base_port + k as u16, f.dport).frame(L3_OFFSET)).collect();
    let before = shared.stat(stat::ALLOWED_NEW)?;
    let mut one = Vec::with_capacity(frames.len());
    let mut base = Vec::with_capacity(frames.len());
    for frame in &frames {
        let (ret, ns) = bpf::test_run(ingress, frame, 1)?;
        ensure!(ret == TC_ACT_OK, "{what}: allowed new flow: verdict {ret}");
        one.push(f64::from(ns));
        base.push(f64::from(bpf::test_run(noop, frame, 1)?.1));
    }
    let after = shared.stat(stat::ALLOWED_NEW)?;
    ensure!(after - before == u64::from(p.one_shots), "{what}: ALLOWED_NEW went up by {}", after - before);
    row.new_1shot = median(&one);
    row.noop_1shot = median(&base);

    // The flow of the first allowed SYN is in conntrack, under the last rule, this epoch.
    let key = f.key(base_port);
    let epoch = enforcer.state()?.epoch;
    let entry = shared.conntrack(&key)?.with_context(|| format!("{what}: allowed flow not in conntrack"))?;
    ensure!(
        entry.rule == last_slot && entry.epoch == epoch,
        "{what}: conntrack entry {entry:?}, expected rule slot {last_slot} (the last rule), epoch {epoch}"
    );
    let frames = Frames {
        denied: Packet::tcp(f.src, f.dst, 40000, DENIED_PORT).frame(L3_OFFSET),
        fwd: Packet::tcp_ack(f.src, f.dst, base_port, f.dport).frame(L3_OFFSET),
        reply: Packet::tcp_ack(f.dst, f.src, f.dport, base_port).frame(L3_OFFSET),
    };
    Ok(Bed { _pins: pins, enforcer, shared, uncached, frames, samples: Default::default(), row })
}

pub fn fam(v6: bool) -> &'static str {
    if v6 {
        "IPv6"
    } else {
        "IPv4"
    }
}

fn read_slots(state_dir: &Path, ifname: &IfName) -> Result<BTreeMap<String, u32>> {
    let path = state_dir.join(format!("{ifname}.policy-slots.json"));
    let bytes = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// One BPF_PROG_TEST_RUN of `repeat` repetitions: ns per repetition. Checks the verdict and
/// that `counter` went up by exactly `repeat`.
fn timed(
    shared: &Shared,
    prog: RawFd,
    frame: &[u8],
    repeat: u32,
    want: u32,
    counter: Option<u32>,
    what: &str,
) -> Result<f64> {
    let before = match counter {
        Some(c) => shared.stat(c)?,
        None => 0,
    };
    let (ret, ns) = bpf::test_run(prog, frame, repeat)?;
    ensure!(ret == want, "{what}: verdict {ret}, expected {want}");
    if let Some(c) = counter {
        let after = shared.stat(c)?;
        ensure!(
            after - before == u64::from(repeat),
            "{what}: STATS[{c}] went up by {}, expected {repeat}",
            after - before
        );
    }
    Ok(f64::from(ns))
}

/// One sample of every measurement of a row.
fn measure(bed: &mut Bed, noop: RawFd, p: &Params) -> Result<()> {
    let what = format!("{} rules {}", fam(bed.row.v6), bed.row.rules);
    let (s, fr) = (&bed.shared, &bed.frames);
    let ingress = s.prog_fd(common::PROG_INGRESS)?;
    let egress = s.prog_fd(common::PROG_EGRESS)?;
    let u = &bed.uncached;
    let r = p.repeat;
    let est = Some(stat::ALLOWED_ESTABLISHED);
    let runs = [
        (NOOP, timed(s, noop, &fr.denied, r, TC_ACT_OK, None, "no-op")?),
        (NOT_IP, timed(s, ingress, &arp_frame(), r, TC_ACT_OK, Some(stat::NOT_IP), &format!("{what}: ARP"))?),
        (
            DENIED_CACHED,
            timed(s, ingress, &fr.denied, r, TC_ACT_SHOT, Some(stat::DENIED), &format!("{what}: denied, cached"))?,
        ),
        (
            EST_FWD,
            timed(s, ingress, &fr.fwd, r, TC_ACT_OK, Some(stat::ALLOWED_ESTABLISHED), &format!("{what}: established"))?,
        ),
        (
            EST_REPLY,
            timed(
                s,
                egress,
                &fr.reply,
                r,
                TC_ACT_OK,
                Some(stat::ALLOWED_ESTABLISHED),
                &format!("{what}: established reply"),
            )?,
        ),
    ];
    let ct = [
        (
            DENIED,
            timed(
                u,
                u.prog_fd(common::PROG_INGRESS)?,
                &fr.denied,
                r,
                TC_ACT_SHOT,
                Some(stat::DENIED),
                &format!("{what}: new flow, denied"),
            )?,
        ),
        (
            EST_FWD_CT,
            timed(u, u.prog_fd(common::PROG_INGRESS)?, &fr.fwd, r, TC_ACT_OK, est, &format!("{what}: est, no cache"))?,
        ),
        (
            EST_REPLY_CT,
            timed(
                u,
                u.prog_fd(common::PROG_EGRESS)?,
                &fr.reply,
                r,
                TC_ACT_OK,
                est,
                &format!("{what}: reply, no cache"),
            )?,
        ),
    ];
    for (i, ns) in runs.into_iter().chain(ct) {
        bed.samples[i].push(ns);
    }
    Ok(())
}
