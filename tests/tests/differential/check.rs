//! One case of the differential test against the program: the reference decision (the
//! reference conntrack first for tracked packets, then `evaluate`), the run, and the
//! comparisons of verdict, deciding rule and the conntrack entries the packet can meet.

use wirefence_agent::policy::{evaluate, Decision};
use wirefence_common::{self as common, Counter, FlowKey};
use wirefence_tests::bpf::{TC_ACT_OK, TC_ACT_SHOT};

use super::conntrack::{flags_of, may_start, Lookup, Mirror};
use super::generate::{Case, Kind};
use super::{Bed, Ctx};

/// A case's decision, and whether it passed as established.
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    pub decision: Decision,
    pub established: bool,
    pub lookup: Lookup,
}

/// Runs one case at the mirror's time and compares (verdict, deciding rule, and the conntrack
/// entries its lookups can meet: presence, state, rule, stamp); `Err` describes a mismatch.
pub fn check_case(bed: &mut Bed, ctx: &Ctx, mirror: &mut Mirror, case: &Case, frame: &[u8]) -> Result<Outcome, String> {
    let flags = flags_of(case);
    let tracked = if case.kind == Kind::Tracked { case.track } else { None };
    let mut stamps = Vec::new();
    if let Some(key) = tracked {
        for k in [key, key.reversed()] {
            if let Some(e) = mirror.entries.get(&k) {
                stamps.push((k, bed.restamp(&k, mirror.now_ms - e.last_ms)?));
            }
        }
    }
    let lookup = match tracked {
        Some(key) => mirror.established(&key, flags),
        None => Lookup::Miss,
    };
    let (want, established) = match lookup {
        Lookup::Hit { rule, .. } => (Decision { allowed: true, rule: Some(rule) }, true),
        _ => (evaluate(ctx.policy, &case.eval), false),
    };
    let mut witness = established;
    if let (Some(key), Some(rule), false) = (tracked, want.rule, established) {
        if may_start(case.eval.proto, flags) {
            mirror.insert(key, rule);
            witness = true;
        }
    }
    // The deciding rule's witness: the conntrack entry the packet met or made (checked
    // below), else the rule counter, read around the run (per-policy totals check all).
    let counter_slot = if witness { None } else { want.rule.map(|r| ctx.slot_of(r)) };
    let before = counter_slot.map(|s| bed.rule_counter(s));
    let ret = bed.run(case.dir(), frame);
    let outcome = Outcome { decision: want, established, lookup };
    let result = compare(bed, ctx, mirror, case, frame, ret, outcome, lookup, &stamps, before);
    if result.is_err() {
        // Keep the table equal to the mirror for the cases that follow.
        for k in tracked.map(|k| vec![k, k.reversed()]).unwrap_or_default() {
            bed.ct_remove(&k);
            mirror.entries.remove(&k);
        }
    }
    result.map(|()| outcome)
}

#[allow(clippy::too_many_arguments)]
fn compare(
    bed: &mut Bed,
    ctx: &Ctx,
    mirror: &Mirror,
    case: &Case,
    frame: &[u8],
    ret: u32,
    outcome: Outcome,
    lookup: Lookup,
    stamps: &[(FlowKey, (u64, u64))],
    before: Option<Counter>,
) -> Result<(), String> {
    let want = outcome.decision;
    let allowed = match ret {
        TC_ACT_OK => true,
        TC_ACT_SHOT => false,
        other => return Err(format!("program returned {other} (neither TC_ACT_OK nor TC_ACT_SHOT)")),
    };
    if allowed != want.allowed {
        let prog = if allowed { "ALLOW" } else { "DENY" };
        return Err(format!("verdict: program {prog}, reference {want:?} after conntrack lookup {lookup:?}"));
    }
    if let (Some(rule), Some(before)) = (want.rule, before) {
        let s = ctx.slot_of(rule);
        let after = bed.rule_counter(s);
        let expect = (1, frame.len() as u64);
        let got = (after.packets - before.packets, after.bytes - before.bytes);
        if got != expect {
            return Err(format!(
                "deciding rule: counter of rule {rule} ({:?}, slot {s}) changed by {got:?}, expected {expect:?}",
                ctx.policy.rules()[rule as usize].id
            ));
        }
    }
    let Some(key) = (if case.kind == Kind::Tracked { case.track } else { None }) else { return Ok(()) };
    for k in [key, key.reversed()] {
        let real = bed.ct_get(&k);
        let model = mirror.entries.get(&k);
        match (real, model) {
            (None, None) => {}
            (Some(v), Some(m)) => {
                let slot = ctx.slot_of(m.rule);
                if v.rule != slot {
                    return Err(format!(
                        "deciding rule: conntrack entry slot {} ({}), reference rule {} (slot {slot})",
                        v.rule,
                        ctx.id_of_slot(v.rule),
                        m.rule
                    ));
                }
                if v.epoch != ctx.epoch {
                    return Err(format!("conntrack entry epoch {} (live epoch {})", v.epoch, ctx.epoch));
                }
                if v.state != m.state as u32 {
                    return Err(format!(
                        "conntrack state: program {:?}, reference {:?} (after {lookup:?})",
                        common::CtState::from_u32(v.state),
                        m.state
                    ));
                }
                if let (Lookup::Hit { key: hit, stamped, .. }, Some((_, (written, now)))) =
                    (lookup, stamps.iter().find(|(s, _)| *s == k))
                {
                    let refreshed = v.last_seen_ns != *written;
                    if hit == k && stamped != refreshed && !(stamped && v.last_seen_ns >= *now) {
                        return Err(format!(
                            "conntrack stamp: program {}, reference {} (age {} ms)",
                            if refreshed { "refreshed" } else { "kept" },
                            if stamped { "refreshed" } else { "kept" },
                            (now - written) / 1_000_000
                        ));
                    }
                }
            }
            (real, model) => {
                return Err(format!(
                    "conntrack entry {}: program {}, reference {} (after {lookup:?})",
                    if k == key { "of the tuple" } else { "of the reversed tuple" },
                    real.map_or("none".into(), |v| format!("{:?}", common::CtState::from_u32(v.state))),
                    model.map_or("none".into(), |m| format!("{:?}", m.state)),
                ))
            }
        }
    }
    Ok(())
}
