//! Differential test of the data path: random policies and random packets; the eBPF
//! classifiers' verdict (BPF_PROG_TEST_RUN on maps written by the real compiler and the real
//! [`Enforcer`]) against the reference evaluator [`evaluate`], which walks the rules one by
//! one. At least 100,000 cases per run, zero mismatches. Needs root (bpffs, eBPF).
//!
//! - Policies come from a seeded RNG (printed; `WIREFENCE_DIFF_SEED=<n>` replays a run):
//!   IPv4 and IPv6 prefixes drawn around a few anchor addresses (so they nest and overlap
//!   and packets land on their edges), protocols any/tcp/udp/udplite/sctp/icmp/icmpv6 and
//!   other numbers, port ranges around interesting edges, directions both/ingress/egress.
//!   Many policies per run go through one `Enforcer` (a fresh one now and then, adopting the
//!   pins as a restarted agent does), so every apply fills the inactive generation by
//!   difference with what it held two policies ago and flips the epoch; rule ids are reused
//!   across policies (stable counter slots, stable class ids).
//! - Packets are the first packets of flows, both directions, IPv4 and IPv6: TCP, UDP,
//!   UDP-Lite, SCTP, ICMP/ICMPv6 echo, informational and error messages (errors quote a
//!   packet), other protocols, non-first fragments (decided without ports), first
//!   fragments, IPv4 options and IPv6 extension headers.
//! - Conntrack: an allowed tracked packet inserts an entry under its tuple, and a later packet
//!   with that tuple or its reverse (or an ICMP error quoting it) would pass as established
//!   whatever the policy says. The test mirrors every entry the program must have created
//!   and never sends a packet whose conntrack lookups could hit one (it draws another); at
//!   the end of each policy the kernel's table must equal the mirror, and it is flushed.
//! - Checks per case: the verdict (TC_ACT_OK = allow, TC_ACT_SHOT = deny); for every allowed
//!   case the deciding rule — the conntrack entry's rule (tracked packets) or the rule
//!   counter that went up (fragments, ICMP informational and error messages) — must be the
//!   counter slot of `Decision.rule`'s id. Per policy: STATS deltas (nothing established,
//!   nothing malformed) and per-rule counter deltas.
//!
//! On mismatch the test collects up to 10 reports (seed, policy, packet, frame, both verdicts
//! and `simulate` on the compiled maps, which tells compiler from writer/program), shrinks
//! the first one to a minimal policy and fails. When all agree, a self-check corrupts the live
//! policy entries and asserts that the same comparisons report it.
//!
//! The frames carry an Ethernet header and the programs run with the Ethernet offset 14: the
//! kernel's test runner takes `skb->protocol` from bytes 12..14, so any address can be used
//! (the L3 offset 0 is covered by `bpf_program.rs`). IPv4-mapped IPv6 addresses are never
//! generated: the parser drops them on purpose (they would alias IPv4 conntrack entries),
//! which the evaluator does not model.
//!
//! Environment: `WIREFENCE_DIFF_SEED`, `WIREFENCE_DIFF_POLICIES` (default 60),
//! `WIREFENCE_DIFF_PACKETS` (per policy, default 2000).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuArray};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use ipnet::IpNet;
use wirefence_agent::enforce::{self, Enforcer};
use wirefence_agent::model::IfName;
use wirefence_agent::policy::{
    self as pol, compile, evaluate, simulate, Compiled, Decision, Direction, Policy, PortRange, Rule, RuleDirection,
};
use wirefence_common::{self as common, Counter, FlowKey, FlowValue, PolicyData, PolicyValue};
use wirefence_tests::bpf::{TC_ACT_OK, TC_ACT_SHOT};
use wirefence_tests::packet as wire;
use wirefence_tests::require_root_for;

// The crate root is this file, so the modules beside it are named by path.
#[path = "differential/generate.rs"]
mod generate;
#[path = "differential/shrink.rs"]
mod shrink;

use generate::{gen_case, gen_policy, mutate, tracked_key, Case, Kind, PolicyView, Rng};
use shrink::shrink;

/// IP header offset in the test frames (Ethernet).
const L3_OFFSET: u32 = 14;
const MAX_MISMATCHES: usize = 10;
/// Mismatches reported per policy before moving on to the next one.
const MAX_MISMATCHES_PER_POLICY: usize = 3;

// ---------------------------------------------------------------------------------------
// The bed: a bpffs of its own, the real Enforcer, and the programs on its pinned maps.

struct Bed {
    root: PathBuf,
    ifname: IfName,
    state_dir: PathBuf,
    enforcer: Enforcer,
    /// The classifiers, loaded on the enforcer's pinned maps.
    programs: aya::Ebpf,
    conntrack: BpfHashMap<MapData, FlowKey, FlowValue>,
    counters: PerCpuArray<MapData, Counter>,
    /// For the self-check only (the writer owns the policy maps).
    policy_map: LpmTrie<MapData, PolicyData, PolicyValue>,
}

impl Bed {
    fn new() -> Bed {
        let tag = format!("{}-{}", std::process::id(), std::time::UNIX_EPOCH.elapsed().unwrap().as_nanos() % 1_000_000);
        // Not under /sys/fs/bpf: `Enforcer::open` mounts a bpffs of its own at this root.
        let root = PathBuf::from(format!("/run/wirefence-diff-{tag}"));
        let state_dir = PathBuf::from(format!("/tmp/wirefence-diff-{tag}"));
        std::fs::create_dir_all(&state_dir).unwrap();
        let ifname: IfName = format!("wfd{:x}", std::process::id() % 0xffff).parse().unwrap();
        let enforcer = Enforcer::open(&root, &ifname, L3_OFFSET, &state_dir)
            .unwrap_or_else(|e| panic!("Enforcer::open({}): {e}", root.display()));
        let (programs, conntrack, counters, policy_map) = load_programs(enforcer.dir());
        Bed { root, ifname, state_dir, enforcer, programs, conntrack, counters, policy_map }
    }

    /// A new Enforcer adopting the pins, as a restarted agent opens them.
    fn reopen(&mut self) {
        self.enforcer = Enforcer::open(&self.root, &self.ifname, L3_OFFSET, &self.state_dir)
            .unwrap_or_else(|e| panic!("Enforcer::open again: {e}"));
    }

    fn apply(&mut self, compiled: &Compiled, digest: u64) -> (u32, BTreeMap<String, u32>) {
        let stats = self.enforcer.apply(compiled, digest).unwrap_or_else(|e| panic!("apply: {e}"));
        let state = self.enforcer.state().unwrap();
        assert_eq!((state.epoch, state.initialized), (stats.epoch, 1), "state after apply");
        // The writer's rule id -> counter slot table, as persisted for `status`.
        let file = self.state_dir.join(format!("{}.policy-slots.json", self.ifname));
        let slots: BTreeMap<String, u32> = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        (stats.epoch, slots)
    }

    fn run(&self, dir: u8, frame: &[u8]) -> u32 {
        let name = if dir == common::DIR_INGRESS { common::PROG_INGRESS } else { common::PROG_EGRESS };
        let prog: &SchedClassifier = self.programs.program(name).unwrap().try_into().unwrap();
        let opts = TestRunOptions { data_in: Some(frame), repeat: 1, ..Default::default() };
        prog.test_run(opts).unwrap_or_else(|e| panic!("test run of {name}: {e:?}")).return_value
    }

    fn rule_counter(&self, slot: u32) -> Counter {
        let v = self.counters.get(&slot, 0).unwrap();
        v.iter().fold(Counter::default(), |a, c| Counter { packets: a.packets + c.packets, bytes: a.bytes + c.bytes })
    }

    fn conntrack_entries(&self) -> HashMap<FlowKey, FlowValue> {
        self.conntrack.iter().map(|r| r.unwrap()).collect()
    }

    fn flush_conntrack(&mut self) {
        let keys: Vec<FlowKey> = self.conntrack.keys().map(|k| k.unwrap()).collect();
        for k in keys {
            match self.conntrack.remove(&k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => panic!("conntrack remove: {e}"),
            }
        }
        // The quota counts follow the (now empty) table, so sources never reach their quota
        // across policies.
        self.enforcer.sweep_conntrack().unwrap_or_else(|e| panic!("conntrack sweep: {e}"));
    }

    fn stats(&self) -> BTreeMap<&'static str, (u64, u64)> {
        let c = self.enforcer.counters().unwrap();
        c.stats.iter().map(|(k, v)| (*k, (v.packets, v.bytes))).collect()
    }
}

type Loaded = (
    aya::Ebpf,
    BpfHashMap<MapData, FlowKey, FlowValue>,
    PerCpuArray<MapData, Counter>,
    LpmTrie<MapData, PolicyData, PolicyValue>,
);

fn load_programs(dir: &Path) -> Loaded {
    let paths: Vec<(&str, PathBuf)> = common::MAPS.iter().map(|m| (*m, dir.join(m))).collect();
    let mut loader = aya::EbpfLoader::new();
    loader.override_global(common::GLOBAL_L3_OFFSET, &L3_OFFSET, true);
    for (name, path) in &paths {
        assert!(path.exists(), "{} is not pinned", path.display());
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(wirefence_agent::bpf::object()).expect("load the eBPF object on the pinned maps");
    for name in [common::PROG_INGRESS, common::PROG_EGRESS] {
        let prog: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
        prog.load().unwrap_or_else(|e| panic!("load {name}: {e:?}"));
    }
    let conntrack = BpfHashMap::try_from(ebpf.take_map(common::CONNTRACK).unwrap()).unwrap();
    let counters = PerCpuArray::try_from(ebpf.take_map(common::RULE_COUNTERS).unwrap()).unwrap();
    let policy_map = LpmTrie::try_from(ebpf.take_map(common::POLICY).unwrap()).unwrap();
    (ebpf, conntrack, counters, policy_map)
}

impl Drop for Bed {
    fn drop(&mut self) {
        if let Err(e) = enforce::remove(&self.root, &self.ifname) {
            eprintln!("cleanup: removing pins under {}: {e}", self.root.display());
        }
        let c = std::ffi::CString::new(self.root.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C string; MNT_DETACH so open map fds do not keep it busy.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&self.root);
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

// ---------------------------------------------------------------------------------------
// Checking.

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(v.trim().parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")))
}

fn describe_policy(policy: &Policy) -> String {
    if policy.rules().is_empty() {
        return "  (no rules)\n".into();
    }
    let mut s = String::new();
    for (i, r) in policy.rules().iter().enumerate() {
        let nets = |v: &[IpNet]| v.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",");
        let ports = r.ports.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",");
        s += &format!(
            "  [{i}] {:?} from {} to {} proto {} ports [{ports}] {:?}\n",
            r.id,
            nets(&r.from),
            nets(&r.to),
            pol::model::proto_name(r.proto),
            r.direction
        );
    }
    s
}

struct Ctx<'a> {
    policy: &'a Policy,
    slots: &'a BTreeMap<String, u32>,
    epoch: u32,
}

impl Ctx<'_> {
    fn slot_of(&self, rule: u32) -> u32 {
        let id = &self.policy.rules()[rule as usize].id;
        *self.slots.get(id).unwrap_or_else(|| panic!("no counter slot for rule id {id:?}"))
    }

    fn id_of_slot(&self, slot: u32) -> String {
        self.slots.iter().find(|(_, s)| **s == slot).map_or_else(|| format!("slot {slot}"), |(id, _)| id.clone())
    }
}

/// Runs one case and compares; `Err` describes a mismatch.
fn check_case(bed: &mut Bed, ctx: &Ctx, case: &Case, frame: &[u8]) -> Result<Decision, String> {
    let want = evaluate(ctx.policy, &case.eval);
    // The rule counter is read around the run when it is the only witness of the rule.
    let counter_slot = match (want.rule, case.kind) {
        (Some(rule), kind) if kind != Kind::Tracked => Some(ctx.slot_of(rule)),
        _ => None,
    };
    let before = counter_slot.map(|s| bed.rule_counter(s));
    let ret = bed.run(case.dir(), frame);
    let allowed = match ret {
        TC_ACT_OK => true,
        TC_ACT_SHOT => false,
        other => return Err(format!("program returned {other} (neither TC_ACT_OK nor TC_ACT_SHOT)")),
    };
    let entry = case.track.map(|k| (k, bed.conntrack.get(&k, 0)));
    if allowed != want.allowed {
        // Keep the conntrack table equal to the mirror.
        if let Some((k, Ok(_))) = &entry {
            let _ = bed.conntrack.remove(k);
        }
        let prog = if allowed { "ALLOW" } else { "DENY" };
        return Err(format!("verdict: program {prog}, evaluator {want:?}"));
    }
    let Some(rule) = want.rule else { return Ok(want) };
    let slot = ctx.slot_of(rule);
    let rule_text = |got: u32| {
        format!(
            "deciding rule: program slot {got} ({}), evaluator rule {rule} ({:?}, slot {slot})",
            ctx.id_of_slot(got),
            ctx.policy.rules()[rule as usize].id
        )
    };
    match entry {
        Some((_, Ok(v))) => {
            if v.rule != slot {
                return Err(rule_text(v.rule));
            }
            if v.epoch != ctx.epoch {
                return Err(format!("conntrack entry epoch {} (live epoch {})", v.epoch, ctx.epoch));
            }
        }
        Some((_, Err(MapError::KeyNotFound))) => {
            return Err("allowed tracked packet left no conntrack entry (or another key than modelled)".into())
        }
        Some((_, Err(e))) => panic!("conntrack lookup: {e}"),
        None => {
            let (s, before) = (counter_slot.unwrap(), before.unwrap());
            let after = bed.rule_counter(s);
            let want = (1, frame.len() as u64);
            let got = (after.packets - before.packets, after.bytes - before.bytes);
            if got != want {
                return Err(format!(
                    "deciding rule: counter of rule {rule} ({:?}, slot {s}) changed by {got:?}, expected {want:?}",
                    ctx.policy.rules()[rule as usize].id
                ));
            }
        }
    }
    Ok(want)
}

fn report(
    seed: u64,
    index: usize,
    policy: &Policy,
    compiled: &Compiled,
    case: &Case,
    frame: &[u8],
    why: &str,
) -> String {
    let sim = simulate(compiled, &case.eval);
    let hint = if sim == evaluate(policy, &case.eval) {
        "agrees with the evaluator: look at the map writer or the program"
    } else {
        "differs from the evaluator: look at the compiler (or the evaluator)"
    };
    format!(
        "MISMATCH (seed {seed}, policy #{index}): {why}\n  packet: {:?}\n  wire: {}\n  frame ({} bytes): {:02x?}\n  \
         simulate(compiled) = {sim:?}: the userspace LPM simulation {hint}\n\
         policy:\n{}",
        case.eval,
        case.what,
        frame.len(),
        frame,
        describe_policy(policy)
    )
}

#[derive(Default)]
struct Tally {
    cases: u64,
    allowed: u64,
    by_kind: BTreeMap<(Kind, bool), (u64, u64)>,
    /// Allowed cases by the deciding rule's specificity: any protocol, all ports, port prefix.
    by_specificity: [u64; 3],
    rule_checks: u64,
    /// Allowed cases that more than one rule matches (specificity and ties decide).
    contested: u64,
    redrawn: u64,
    entries: u64,
    rules: u64,
}

#[test]
fn ebpf_verdicts_match_the_reference_evaluator() {
    require_root_for("mounting bpffs and loading eBPF programs need root");
    let seed = env_u64("WIREFENCE_DIFF_SEED")
        .unwrap_or_else(|| std::time::UNIX_EPOCH.elapsed().unwrap().as_nanos() as u64 ^ u64::from(std::process::id()));
    let n_policies = env_u64("WIREFENCE_DIFF_POLICIES").unwrap_or(60) as usize;
    let n_packets = env_u64("WIREFENCE_DIFF_PACKETS").unwrap_or(2000) as usize;
    // The mirror must stay exact: far fewer live flows than the LRU conntrack holds.
    assert!(n_packets <= 20_000, "WIREFENCE_DIFF_PACKETS: at most 20000 per policy (use more policies)");
    eprintln!(
        "differential: seed {seed} (WIREFENCE_DIFF_SEED={seed} replays it), {n_policies} policies x {n_packets} packets"
    );
    let start = Instant::now();
    let mut rng = Rng(seed);
    let mut bed = Bed::new();
    let mut tally = Tally::default();
    let mut mismatches: Vec<String> = Vec::new();
    let mut first: Option<(Policy, Case, usize)> = None;
    let mut prev: Option<Policy> = None;

    'policies: for index in 0..n_policies {
        let policy = match &prev {
            Some(p) if rng.pct(40) => mutate(&mut rng, p),
            _ => gen_policy(&mut rng),
        };
        let compiled = compile(&policy).unwrap_or_else(|e| panic!("compile (seed {seed}, policy #{index}): {e}"));
        tally.entries += compiled.entries.len() as u64;
        tally.rules += policy.rules().len() as u64;
        if index % 20 == 19 {
            bed.reopen();
        }
        let (epoch, slots) = bed.apply(&compiled, index as u64);
        let ctx = Ctx { policy: &policy, slots: &slots, epoch };
        let stats_before = bed.stats();
        let counters_before: BTreeMap<u32, Counter> =
            policy.rules().iter().map(|r| (slots[&r.id], bed.rule_counter(slots[&r.id]))).collect();
        let view = PolicyView::new(&policy);
        let mut mirror: HashMap<FlowKey, u32> = HashMap::new();
        let mut want_stats: BTreeMap<&'static str, (u64, u64)> = BTreeMap::new();
        let mut want_counters: BTreeMap<u32, Counter> = BTreeMap::new();
        let mut clean = true;
        let mut policy_mismatches = 0;

        for _ in 0..n_packets {
            let case = loop {
                let c = gen_case(&mut rng, &view);
                // A packet that could meet a live conntrack entry is not a first packet.
                if c.probes.iter().all(|k| !mirror.contains_key(k)) {
                    break c;
                }
                tally.redrawn += 1;
            };
            let frame = case.wire.frame(L3_OFFSET);
            let len = frame.len() as u64;
            tally.cases += 1;
            match check_case(&mut bed, &ctx, &case, &frame) {
                Err(why) => {
                    clean = false;
                    mismatches.push(report(seed, index, &policy, &compiled, &case, &frame, &why));
                    if first.is_none() {
                        first = Some((policy.clone(), case.clone(), index));
                    }
                    if mismatches.len() >= MAX_MISMATCHES {
                        break 'policies;
                    }
                    policy_mismatches += 1;
                    if policy_mismatches >= MAX_MISMATCHES_PER_POLICY {
                        break;
                    }
                }
                Ok(d) => {
                    let e = tally.by_kind.entry((case.kind, d.allowed)).or_default();
                    e.0 += 1;
                    e.1 += u64::from(case.eval.src.is_ipv6());
                    let mut add = |name: &'static str| {
                        let s = want_stats.entry(name).or_default();
                        s.0 += 1;
                        s.1 += len;
                    };
                    if case.kind == Kind::Fragment {
                        add("fragments");
                    }
                    let Some(rule) = d.rule else {
                        add("denied");
                        continue;
                    };
                    if case.kind != Kind::Fragment {
                        add("allowed_new");
                    }
                    tally.allowed += 1;
                    tally.rule_checks += 1;
                    tally.contested += u64::from(matching_rules(&policy, &case.eval) > 1);
                    let r = &policy.rules()[rule as usize];
                    tally.by_specificity[match (r.proto, r.ports.is_empty()) {
                        (None, _) => 0,
                        (Some(_), true) => 1,
                        (Some(_), false) => 2,
                    }] += 1;
                    let slot = ctx.slot_of(rule);
                    let c = want_counters.entry(slot).or_default();
                    c.packets += 1;
                    c.bytes += len;
                    if let Some(k) = case.track {
                        mirror.insert(k, slot);
                    }
                }
            }
        }

        // Per policy: STATS and rule counters add up, conntrack holds exactly the mirror.
        if clean {
            let after = bed.stats();
            let mut problems = Vec::new();
            for (name, (p, b)) in &after {
                let (p0, b0) = stats_before[name];
                let got = (p - p0, b - b0);
                let want = want_stats.get(name).copied().unwrap_or((0, 0));
                // Events are rate-limited: EVENTS_LOST is whatever the budget left.
                if *name != "events_lost" && got != want {
                    problems.push(format!("STATS {name}: changed by {got:?}, expected {want:?}"));
                }
            }
            for (slot, c0) in &counters_before {
                let c = bed.rule_counter(*slot);
                let got = (c.packets - c0.packets, c.bytes - c0.bytes);
                let w = want_counters.get(slot).copied().unwrap_or_default();
                if got != (w.packets, w.bytes) {
                    problems.push(format!(
                        "rule counter {} (slot {slot}): changed by {got:?}, expected {:?}",
                        ctx.id_of_slot(*slot),
                        (w.packets, w.bytes)
                    ));
                }
            }
            let table = bed.conntrack_entries();
            let extra: Vec<_> = table.keys().filter(|k| !mirror.contains_key(k)).collect();
            let missing = mirror.keys().filter(|k| !table.contains_key(k)).count();
            let wrong = table.iter().filter(|(k, v)| mirror.get(k).is_some_and(|s| *s != v.rule)).count();
            // Every case is a flow's first packet: each entry is unanswered (state new), and
            // counts against its source's quota exactly when an ingress packet made it.
            let life = table
                .iter()
                .filter(|(k, v)| {
                    v.state != common::CtState::New as u32
                        || (v.flags == common::FLOW_QUOTA_COUNTED) != (k.direction == common::DIR_INGRESS)
                })
                .count();
            if !extra.is_empty() || missing > 0 || wrong > 0 || life > 0 {
                problems.push(format!(
                    "conntrack: {} entries not expected (e.g. {:?}), {missing} missing, {wrong} with another rule, \
                     {life} in another state or quota accounting",
                    extra.len(),
                    extra.first()
                ));
            }
            if !problems.is_empty() {
                mismatches.push(format!(
                    "MISMATCH (seed {seed}, policy #{index}) in the per-policy totals:\n  {}\npolicy:\n{}",
                    problems.join("\n  "),
                    describe_policy(&policy)
                ));
                if mismatches.len() >= MAX_MISMATCHES {
                    break 'policies;
                }
            }
        }
        bed.flush_conntrack();
        prev = Some(policy);
    }
    let elapsed = start.elapsed();

    let kinds: Vec<String> = tally
        .by_kind
        .iter()
        .map(|((k, allowed), (n, v6))| format!("{k:?}/{}: {n} ({v6} v6)", if *allowed { "allow" } else { "deny" }))
        .collect();
    eprintln!(
        "differential: {} cases under {} policies ({} rules, {} policy entries) in {:.1?}: {} allowed \
         (deciding rule: any-protocol {}, all-ports {}, port-prefix {}; {} matched by several rules), {} denied; \
         deciding rule checked for {} allowed cases; {} draws redone to keep flows fresh\n  {}",
        tally.cases,
        n_policies,
        tally.rules,
        tally.entries,
        elapsed,
        tally.allowed,
        tally.by_specificity[0],
        tally.by_specificity[1],
        tally.by_specificity[2],
        tally.contested,
        tally.cases - tally.allowed,
        tally.rule_checks,
        tally.redrawn,
        kinds.join("\n  ")
    );

    if mismatches.is_empty() {
        assert!(tally.cases >= 100_000 || n_packets * n_policies < 100_000, "fewer cases than planned");
        let by = |k: Kind| tally.by_kind.iter().filter(|((kind, _), _)| *kind == k).map(|(_, (n, _))| n).sum::<u64>();
        for k in [Kind::Tracked, Kind::Untracked, Kind::IcmpError, Kind::Fragment] {
            assert!(by(k) > 0 || tally.cases < 10_000, "no {k:?} cases: the generator is broken");
        }
        let share = tally.allowed as f64 / tally.cases.max(1) as f64;
        assert!(
            tally.cases < 10_000 || (0.1..0.9).contains(&share),
            "allowed share {share:.2}: too one-sided to test much"
        );
        self_check(&mut bed);
        return;
    }
    let mut text = mismatches.join("\n");
    if let Some((policy, case, index)) = first {
        let mut digest = 1 << 32;
        match shrink(&mut bed, &policy, &case, &mut digest) {
            Some((small, why)) => {
                text += &format!(
                    "\nMINIMAL REPRODUCTION of the first mismatch (policy #{index} shrunk, applied alone after the run): \
                     {why}\n  packet: {:?}\n  wire: {}\npolicy:\n{}",
                    case.eval,
                    case.what,
                    describe_policy(&small)
                );
            }
            None => text += "\n(the first mismatch does not reproduce with its policy applied again alone)",
        }
    }
    panic!(
        "{} mismatch(es) between the eBPF programs and the reference evaluator (seed {seed}):\n{text}",
        mismatches.len()
    );
}

/// How many rules match `pkt` (for the coverage summary only; `evaluate` is the reference).
fn matching_rules(policy: &Policy, pkt: &pol::Packet) -> usize {
    let v6 = pkt.src.is_ipv6();
    policy
        .rules()
        .iter()
        .filter(|r| {
            r.direction.applies(pkt.direction)
                && pol::model::proto_allows_family(r.proto, v6)
                && r.from.iter().any(|n| n.contains(&pkt.src))
                && r.to.iter().any(|n| n.contains(&pkt.dst))
                && match r.proto {
                    None => true,
                    Some(p) if p != pkt.proto => false,
                    Some(_) if r.ports.is_empty() => true,
                    Some(_) => pkt.port.is_some_and(|port| r.ports.iter().any(|x| x.contains(port))),
                }
        })
        .count()
}

/// The checker checks: with the live policy entries rewritten behind the writer's back, the
/// same comparisons must report mismatches (a wrong deciding rule through the conntrack
/// entry and through the rule counter, then a wrong verdict).
fn self_check(bed: &mut Bed) {
    let net = |s: &str| -> IpNet { s.parse().unwrap() };
    let rule = |id: &str, proto, ports: Vec<PortRange>| Rule {
        id: id.into(),
        from: vec![net("10.0.0.0/8")],
        to: vec![net("10.0.0.0/8")],
        proto,
        ports,
        direction: RuleDirection::Both,
    };
    let policy = Policy::new(vec![
        rule("self-check-tcp", Some(6), vec![PortRange { first: 80, last: 80 }]),
        rule("self-check-icmp", Some(1), vec![]),
    ])
    .unwrap();
    bed.flush_conntrack();
    let (epoch, slots) = bed.apply(&compile(&policy).unwrap(), u64::MAX);
    let ctx = Ctx { policy: &policy, slots: &slots, epoch };
    let (a, b) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
    let tcp = |sport| Case {
        eval: pol::Packet { direction: Direction::Ingress, src: a, dst: b, proto: 6, port: Some(80) },
        wire: wire::Packet::tcp(a, b, sport, 80),
        what: format!("self-check tcp {sport}->80"),
        kind: Kind::Tracked,
        track: tracked_key(false, a, b, 6, &wire::Packet::tcp(a, b, sport, 80).l4, common::DIR_INGRESS),
        probes: Vec::new(),
    };
    let timestamp = Case {
        eval: pol::Packet { direction: Direction::Ingress, src: a, dst: b, proto: 1, port: Some(13 << 8) },
        wire: wire::Packet::icmp(a, b, 13, 0, [0; 4], &[0; 12]),
        what: "self-check icmp timestamp".into(),
        kind: Kind::Untracked,
        track: None,
        probes: Vec::new(),
    };
    let check = |bed: &mut Bed, case: &Case| check_case(bed, &ctx, case, &case.wire.frame(L3_OFFSET));
    assert!(check(bed, &tcp(1000)).is_ok_and(|d| d.allowed), "self-check: tcp to 80 must pass");
    assert!(check(bed, &timestamp).is_ok_and(|d| d.allowed), "self-check: icmp must pass");

    let gen = (epoch & 1) as u8;
    let live: Vec<(Key<PolicyData>, PolicyValue)> = bed
        .policy_map
        .iter()
        .map(|r| r.unwrap())
        .filter(|(k, _)| common::policy_data_parts(&k.data()).0 == gen)
        .collect();
    assert!(!live.is_empty(), "self-check: no live policy entries");
    let unused = (0..common::MAX_RULES).find(|s| !slots.values().any(|v| v == s)).unwrap();
    for (k, _) in &live {
        bed.policy_map.insert(k, PolicyValue { rules: [unused; 2] }, 0).unwrap();
    }
    let e = check(bed, &tcp(1001)).expect_err("self-check: a wrong rule in conntrack must be reported");
    assert!(e.starts_with("deciding rule"), "{e}");
    let e = check(bed, &timestamp).expect_err("self-check: a wrong rule counter must be reported");
    assert!(e.starts_with("deciding rule"), "{e}");
    for (k, _) in &live {
        bed.policy_map.remove(k).unwrap();
    }
    let e = check(bed, &tcp(1002)).expect_err("self-check: a wrong verdict must be reported");
    assert!(e.starts_with("verdict"), "{e}");
    eprintln!(
        "differential: self-check: corrupted live entries are reported (rule via conntrack, rule via counter, verdict)"
    );
}
