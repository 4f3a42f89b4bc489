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
//! - Packets are first packets of flows, both directions, IPv4 and IPv6: TCP (mostly SYN,
//!   sometimes other flags), UDP, UDP-Lite, SCTP, ICMP/ICMPv6 echo, informational and error
//!   messages (errors quote a packet), other protocols, non-first fragments (decided without
//!   ports), first fragments, IPv4 options and IPv6 extension headers; and about a third are
//!   more packets of recent flows (answers or the same direction again, TCP with random flags:
//!   SYN, SYN-ACK, ACK, FIN, RST and odd mixes). Virtual time advances between packets.
//! - Conntrack (`differential/conntrack.rs`): the reference keeps every entry the program must
//!   hold, with its rule, state and stamp on a virtual clock, under lifetimes the test writes
//!   to `WF_CT_CONFIG` per policy (read back through `CtConfig::timeout_ns` of common): an
//!   entry past its state's lifetime is deleted by the lookup and the packet judged as new;
//!   a live one passes the packet as established and advances the TCP / answered state; only
//!   a SYN opens a TCP entry. The real side is aged by rewriting the stamps of the entries a
//!   packet can meet just before it runs (see that module for why this is exact). ICMP
//!   errors that quote a tracked flow are not modelled: such draws are redone. At the end of
//!   each policy the kernel's table must equal the model (keys, rules, states, quota flags),
//!   and it is flushed.
//! - Checks per case: the verdict (TC_ACT_OK = allow, TC_ACT_SHOT = deny); for every allowed
//!   case the deciding rule (the rule counter that went up must be the counter slot of the
//!   reference's rule: the policy's, or the tracked entry's for an established packet); for
//!   tracked packets the entries of the tuple and of the reversed tuple (present or not,
//!   rule, epoch, state) and whether the entry met had its stamp refreshed. Per policy:
//!   STATS deltas (new, established, nothing malformed) and per-rule counter deltas.
//!
//! On mismatch the test collects up to 10 reports (seed, policy, packet, frame, both verdicts
//! and `simulate` on the compiled maps, which tells compiler from writer/program), shrinks
//! the first one to a minimal sequence of packets (with their virtual times) and a minimal
//! policy, and fails. When all agree, a self-check corrupts the live
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
    self as pol, compile, evaluate, simulate, Compiled, Direction, Policy, PortRange, Rule, RuleDirection,
};
use wirefence_common::{self as common, Counter, FlowKey, FlowValue, PolicyData, PolicyValue};
use wirefence_tests::packet as wire;
use wirefence_tests::require_root_for;

// The crate root is this file, so the modules beside it are named by path.
#[path = "differential/check.rs"]
mod check;
#[path = "differential/conntrack.rs"]
mod conntrack;
#[path = "differential/generate.rs"]
mod generate;
#[path = "differential/shrink.rs"]
mod shrink;

use check::{check_case, Outcome};
use conntrack::{gen_advance, gen_config, gen_follow_up, Lookup, Mirror};
use generate::{gen_case, gen_policy, mutate, tracked_key, Case, Kind, PolicyView, Rng};
use shrink::{describe_steps, shrink, Step};

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
    /// The `WF_CT_CONFIG` written last.
    ct_config: common::CtConfig,
}

impl Bed {
    fn new() -> Bed {
        let tag = format!("{}-{}", std::process::id(), std::time::UNIX_EPOCH.elapsed().unwrap().as_nanos() % 1_000_000);
        // A bpffs of the test's own (the agent mounts none), unmounted on drop.
        let root = PathBuf::from(format!("/run/wirefence-diff-{tag}"));
        wirefence_tests::mount_bpffs(&root);
        let state_dir = PathBuf::from(format!("/tmp/wirefence-diff-{tag}"));
        std::fs::create_dir_all(&state_dir).unwrap();
        let ifname: IfName = format!("wfd{:x}", std::process::id() % 0xffff).parse().unwrap();
        let enforcer = Enforcer::open(&root, &ifname, L3_OFFSET, &state_dir)
            .unwrap_or_else(|e| panic!("Enforcer::open({}): {e}", root.display()));
        let (programs, conntrack, counters, policy_map) = load_programs(enforcer.dir());
        let ct_config = common::CtConfig::default();
        Bed { root, ifname, state_dir, enforcer, programs, conntrack, counters, policy_map, ct_config }
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

    fn set_ct_config(&mut self, cfg: common::CtConfig) {
        self.enforcer.set_ct_config(cfg).unwrap_or_else(|e| panic!("set_ct_config: {e}"));
        self.ct_config = cfg;
    }

    /// Sets the entry `key`'s stamp so the program sees it `age_ms` old (see `conntrack.rs`):
    /// (the stamp written, the coarse clock it was computed from).
    fn restamp(&mut self, key: &FlowKey, age_ms: u64) -> Result<(u64, u64), String> {
        let Some(mut v) = self.ct_get(key) else {
            return Err(format!("conntrack entry {key:?} is missing before the packet"));
        };
        let now = coarse_now_ns();
        v.last_seen_ns = now - age_ms * 1_000_000;
        self.conntrack.insert(key.canonical().0, v, 0).unwrap_or_else(|e| panic!("conntrack update: {e}"));
        Ok((v.last_seen_ns, now))
    }

    /// The entry of the flow whose first packet had tuple `key` (the table files it under
    /// the canonical tuple; an entry of the flow the other way round is not this one).
    fn ct_get(&self, key: &FlowKey) -> Option<FlowValue> {
        let canonical = key.canonical().0;
        match self.conntrack.get(&canonical, 0) {
            Ok(v) if v.first_packet(&canonical) == *key => Some(v),
            Ok(_) | Err(MapError::KeyNotFound) => None,
            Err(e) => panic!("conntrack lookup: {e}"),
        }
    }

    /// Deletes the entry [`Bed::ct_get`] finds for `key`, if any.
    fn ct_remove(&mut self, key: &FlowKey) {
        if self.ct_get(key).is_some() {
            let _ = self.conntrack.remove(&key.canonical().0);
        }
    }

    /// The table by each flow's first-packet tuple.
    fn conntrack_entries(&self) -> HashMap<FlowKey, FlowValue> {
        self.conntrack.iter().map(|r| r.unwrap()).map(|(k, v)| (v.first_packet(&k), v)).collect()
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

/// CLOCK_MONOTONIC_COARSE, the clock of `bpf_ktime_get_coarse_ns`.
fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    assert_eq!(r, 0, "clock_gettime");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

type Loaded = (
    aya::Ebpf,
    BpfHashMap<MapData, FlowKey, FlowValue>,
    PerCpuArray<MapData, Counter>,
    LpmTrie<MapData, PolicyData, PolicyValue>,
);

fn load_programs(dir: &Path) -> Loaded {
    let paths = wirefence_agent::enforce::pin_paths(dir);
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
    /// Cases passed as established (by the reference conntrack).
    established: u64,
    /// Conntrack lookups that found an expired entry; established packets by the state after.
    expired: u64,
    hit_states: [u64; 4],
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
    let mut first: Option<(Policy, common::CtConfig, Vec<Step>, usize)> = None;
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
        bed.set_ct_config(gen_config(&mut rng));
        let mut mirror = Mirror::new(bed.ct_config);
        // Tracked cases of this policy that later packets continue, and every case so far
        // with its virtual time (for the shrinker).
        let mut recent: Vec<Case> = Vec::new();
        let mut history: Vec<(u64, Case)> = Vec::new();
        let stats_before = bed.stats();
        let counters_before: BTreeMap<u32, Counter> =
            policy.rules().iter().map(|r| (slots[&r.id], bed.rule_counter(slots[&r.id]))).collect();
        let view = PolicyView::new(&policy);
        let mut want_stats: BTreeMap<&'static str, (u64, u64)> = BTreeMap::new();
        let mut want_counters: BTreeMap<u32, Counter> = BTreeMap::new();
        let mut clean = true;
        let mut policy_mismatches = 0;

        for _ in 0..n_packets {
            mirror.now_ms += gen_advance(&mut rng);
            let case = if !recent.is_empty() && rng.pct(35) {
                // Mostly one of the last few flows (young enough to be alive).
                let n = recent.len() as u64;
                let i = if rng.pct(75) { n - 1 - rng.below(n.min(6)) } else { rng.below(n) } as usize;
                gen_follow_up(&mut rng, &recent[i])
            } else {
                loop {
                    let c = gen_case(&mut rng, &view);
                    // ICMP errors that quote a tracked flow are not modelled.
                    if c.kind != Kind::IcmpError || c.probes.iter().all(|k| !mirror.entries.contains_key(k)) {
                        break c;
                    }
                    tally.redrawn += 1;
                }
            };
            history.push((mirror.now_ms, case.clone()));
            let frame = case.wire.frame(L3_OFFSET);
            let len = frame.len() as u64;
            tally.cases += 1;
            match check_case(&mut bed, &ctx, &mut mirror, &case, &frame) {
                Err(why) => {
                    clean = false;
                    mismatches.push(report(seed, index, &policy, &compiled, &case, &frame, &why));
                    if first.is_none() {
                        first = Some((policy.clone(), bed.ct_config, history.clone(), index));
                    }
                    if mismatches.len() >= MAX_MISMATCHES {
                        break 'policies;
                    }
                    policy_mismatches += 1;
                    if policy_mismatches >= MAX_MISMATCHES_PER_POLICY {
                        break;
                    }
                }
                Ok(Outcome { decision: d, established, lookup }) => {
                    // Later packets continue allowed flows (and now and then a denied one).
                    if case.kind == Kind::Tracked && (d.allowed || rng.pct(10)) {
                        if recent.len() >= 48 {
                            recent.remove(0);
                        }
                        recent.push(case.clone());
                    }
                    match lookup {
                        Lookup::Expired { .. } => tally.expired += 1,
                        Lookup::Hit { key, .. } => tally.hit_states[mirror.entries[&key].state as usize] += 1,
                        Lookup::Miss => {}
                    }
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
                    if established {
                        add("allowed_established");
                        tally.established += 1;
                    } else if case.kind != Kind::Fragment {
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
            let extra: Vec<_> = table.keys().filter(|k| !mirror.entries.contains_key(k)).collect();
            let missing = mirror.entries.keys().filter(|k| !table.contains_key(k)).count();
            let wrong = table
                .iter()
                .filter(|(k, v)| mirror.entries.get(k).is_some_and(|m| ctx.slot_of(m.rule) != v.rule))
                .count();
            // Each entry is in the modelled state, and counts against its source's quota
            // exactly when an ingress packet made it.
            let life = table
                .iter()
                .filter(|(k, v)| {
                    mirror.entries.get(k).is_some_and(|m| m.state as u32 != v.state)
                        || (v.flags & common::FLOW_QUOTA_COUNTED != 0) != conntrack::counted(k)
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
         deciding rule checked for {} allowed cases ({} established, leaving new/established/closing/closed \
         {:?}; {} lookups met an expired entry); {} ICMP error draws redone (quoting a tracked flow)\n  {}",
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
        tally.established,
        tally.hit_states,
        tally.expired,
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
    if let Some((policy, cfg, history, index)) = first {
        let mut digest = 1 << 32;
        match shrink(&mut bed, &policy, cfg, &history, &mut digest) {
            Some((small, steps, why)) => {
                text += &format!(
                    "\nMINIMAL REPRODUCTION of the first mismatch (policy #{index} and its packets shrunk, replayed \
                     alone after the run): {why}\n  lifetimes (ms, WF_CT_CONFIG): {:?}\n{}policy:\n{}",
                    cfg.timeouts_ms,
                    describe_steps(&steps),
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
    let b = "10.0.0.2".parse().unwrap();
    // Each check after the corruption comes from a source not judged before: the programs'
    // verdict cache keeps this epoch's decisions (the agent never writes a live generation).
    let host = |n: u8| std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, n));
    let tcp = |a: std::net::IpAddr, sport| Case {
        eval: pol::Packet { direction: Direction::Ingress, src: a, dst: b, proto: 6, port: Some(80) },
        wire: wire::Packet::tcp(a, b, sport, 80),
        what: format!("self-check tcp {sport}->80"),
        kind: Kind::Tracked,
        track: tracked_key(false, a, b, 6, &wire::Packet::tcp(a, b, sport, 80).l4, common::DIR_INGRESS),
        probes: Vec::new(),
    };
    let timestamp = |a: std::net::IpAddr| Case {
        eval: pol::Packet { direction: Direction::Ingress, src: a, dst: b, proto: 1, port: Some(13 << 8) },
        wire: wire::Packet::icmp(a, b, 13, 0, [0; 4], &[0; 12]),
        what: "self-check icmp timestamp".into(),
        kind: Kind::Untracked,
        track: None,
        probes: Vec::new(),
    };
    let mut mirror = Mirror::new(bed.ct_config);
    let mut check = |bed: &mut Bed, case: &Case| check_case(bed, &ctx, &mut mirror, case, &case.wire.frame(L3_OFFSET));
    assert!(check(bed, &tcp(host(1), 1000)).is_ok_and(|d| d.decision.allowed), "self-check: tcp to 80 must pass");
    assert!(check(bed, &timestamp(host(1))).is_ok_and(|d| d.decision.allowed), "self-check: icmp must pass");

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
    let e = check(bed, &tcp(host(3), 1001)).expect_err("self-check: a wrong rule in conntrack must be reported");
    assert!(e.starts_with("deciding rule"), "{e}");
    let e = check(bed, &timestamp(host(4))).expect_err("self-check: a wrong rule counter must be reported");
    assert!(e.starts_with("deciding rule"), "{e}");
    for (k, _) in &live {
        bed.policy_map.remove(k).unwrap();
    }
    let e = check(bed, &tcp(host(5), 1002)).expect_err("self-check: a wrong verdict must be reported");
    assert!(e.starts_with("verdict"), "{e}");
    eprintln!(
        "differential: self-check: corrupted live entries are reported (rule via conntrack, rule via counter, verdict)"
    );
}
