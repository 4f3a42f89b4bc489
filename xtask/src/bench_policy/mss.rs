//! Part 4: what MSS clamping costs per packet, clamp off against on (the default: limits for
//! a 1420-byte tunnel), in interleaved rounds on one object (the agent's, over an enforcer's
//! pins, one rule):
//!
//! - **established**: an ACK of a tracked flow through `wf_ingress`, repeated (flow cache):
//!   the path of nearly every packet, which clamping must leave as it was (it tests one
//!   flag there);
//! - **allowed SYN, 1-shot**: a SYN announcing MSS 1460, fresh source port each, one
//!   repetition per run: with the clamp on, the option walk and the rewrite;
//! - **the clamp alone** (`wf_mss`, for a device without a policy): on the ACK, repeated
//!   (next to the no-op classifier), and on the SYN, 1-shot.
//!
//! Each run checks its verdict (and the policy's counters), so the path measured is the
//! one named.

use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::{ensure, Result};
use wirefence_common::{self as common, stat, MssClamp};
use wirefence_tests::bpf::TC_ACT_OK;
use wirefence_tests::packet::Packet;

use super::bpf::{self, Caches, Shared};
use super::median;
use super::perpacket::L3_OFFSET;
use super::rules;

/// `TC_ACT_UNSPEC` as the test run reports it: `wf_mss` hands every packet on.
const NEXT: u32 = u32::MAX;
const MSS_1460: [u8; 4] = [2, 4, 0x05, 0xb4];

/// Medians in ns per packet.
pub struct Results {
    pub est_off: f64,
    pub est_on: f64,
    pub syn_off: f64,
    pub syn_on: f64,
    pub noop: f64,
    pub noop_1shot: f64,
    pub alone_ack: f64,
    pub alone_syn: f64,
}

pub fn run(root: &Path, state_dir: &Path, repeat: u32, reps: usize, one_shots: u32) -> Result<Results> {
    let (_pins, mut enforcer) = bpf::one_rule(root, state_dir, "wfbmss", L3_OFFSET)?;
    let shared = Shared::load(enforcer.dir(), L3_OFFSET, Caches::On)?;
    let (ingress, alone) = (shared.prog_fd(common::PROG_INGRESS)?, shared.prog_fd(common::PROG_MSS)?);
    let noop = bpf::load_noop()?;
    let f = rules::flow_of(0, false);
    let syn = |sport: u16| Packet::tcp(f.src, f.dst, sport, f.dport).tcp_options(&MSS_1460).frame(L3_OFFSET);
    // The tracked flow the ACKs belong to.
    let (ret, _) = bpf::test_run(ingress, &syn(9999), 1)?;
    ensure!(ret == TC_ACT_OK, "the flow's SYN: verdict {ret}");
    let ack = Packet::tcp_ack(f.src, f.dst, 9999, f.dport).frame(L3_OFFSET);

    let mut s: [Vec<f64>; 8] = Default::default();
    let mut sport = 10000u16;
    let ack_flow = f.key(9999).canonical().0;
    for _ in 0..reps {
        // The SYNs' source ports wrap after 55,536 flows: their entries go first, so every
        // SYN is a new flow (an entry's SYN would pass as established).
        forget_flows_but(enforcer.dir(), &ack_flow)?;
        for (on, est, syn_slot) in [(false, 0, 2), (true, 1, 3)] {
            enforcer.set_mss(if on { MssClamp::for_mtu(1420) } else { MssClamp::OFF })?;
            let before = shared.stat(stat::ALLOWED_ESTABLISHED)?;
            let (ret, ns) = bpf::test_run(ingress, &ack, repeat)?;
            ensure!(ret == TC_ACT_OK, "established: verdict {ret}");
            ensure!(shared.stat(stat::ALLOWED_ESTABLISHED)? - before == u64::from(repeat), "established: not counted");
            s[est].push(f64::from(ns));
            let before = shared.stat(stat::ALLOWED_NEW)?;
            for _ in 0..one_shots {
                sport = sport.checked_add(1).unwrap_or(10000);
                let (ret, ns) = bpf::test_run(ingress, &syn(sport), 1)?;
                ensure!(ret == TC_ACT_OK, "allowed SYN: verdict {ret}");
                s[syn_slot].push(f64::from(ns));
            }
            let counted = shared.stat(stat::ALLOWED_NEW)? - before;
            ensure!(counted == u64::from(one_shots), "allowed SYNs: {counted} of {one_shots} counted");
        }
        s[4].push(f64::from(bpf::test_run(noop.as_raw_fd(), &ack, repeat)?.1));
        let (ret, ns) = bpf::test_run(alone, &ack, repeat)?;
        ensure!(ret == NEXT, "wf_mss on an ACK: returned {ret}");
        s[6].push(f64::from(ns));
        for _ in 0..one_shots {
            sport = sport.checked_add(1).unwrap_or(10000);
            s[5].push(f64::from(bpf::test_run(noop.as_raw_fd(), &syn(sport), 1)?.1));
            let (ret, ns) = bpf::test_run(alone, &syn(sport), 1)?;
            ensure!(ret == NEXT, "wf_mss on a SYN: returned {ret}");
            s[7].push(f64::from(ns));
        }
    }
    Ok(Results {
        est_off: median(&s[0]),
        est_on: median(&s[1]),
        syn_off: median(&s[2]),
        syn_on: median(&s[3]),
        noop: median(&s[4]),
        noop_1shot: median(&s[5]),
        alone_ack: median(&s[6]),
        alone_syn: median(&s[7]),
    })
}

/// Deletes every conntrack entry but `keep`'s (a canonical key).
fn forget_flows_but(dir: &Path, keep: &common::FlowKey) -> Result<()> {
    let pinned = wirefence_agent::bpf::from_pin(&dir.join(common::CONNTRACK), common::CONNTRACK)?;
    let mut map: aya::maps::HashMap<_, common::FlowKey, common::FlowValue> = aya::maps::HashMap::try_from(pinned)?;
    let keys: Vec<common::FlowKey> = map.keys().collect::<Result<_, _>>()?;
    for k in keys.iter().filter(|k| *k != keep) {
        map.remove(k)?;
    }
    Ok(())
}

pub fn print(r: &Results, reps: usize, repeat: u32, one_shots: u32) {
    println!();
    println!(
        "4. MSS clamping, clamp off vs on (limits of a 1420-byte tunnel: 1380/1360), IPv4, 1 rule; kernel-timed \
         ns/packet, median of {reps} interleaved rounds ({repeat} repetitions; 1-shot: {one_shots} runs per round)"
    );
    println!("{:<44} {:>10} {:>10} {:>7}", "path", "off", "on", "on/off");
    let row = |what: &str, off: f64, on: f64| println!("{what:<44} {off:>10.1} {on:>10.1} {:>7.2}", on / off);
    row("established ACK, wf_ingress (flow cache)", r.est_off, r.est_on);
    row("allowed SYN with MSS 1460, wf_ingress, 1-shot", r.syn_off, r.syn_on);
    println!("{:<44} {:>10} {:>10} {:>7}", "", "no-op", "wf_mss", "ratio");
    row("clamp alone: ACK", r.noop, r.alone_ack);
    row("clamp alone: SYN with MSS 1460, 1-shot", r.noop_1shot, r.alone_syn);
    let within = (r.est_on / r.est_off - 1.0).abs() <= 0.05;
    println!(
        "   established packets with the clamp on: {:.1}% from off ({})",
        (r.est_on / r.est_off - 1.0) * 100.0,
        if within { "within noise (5%)" } else { "outside 5%: rerun on a quiet machine" }
    );
}
