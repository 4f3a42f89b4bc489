//! Shrinks a mismatch of the differential test to a minimal case: first the packets (only
//! those sharing a conntrack tuple with the failing one can matter; then greedily fewer,
//! each keeping its virtual time), then the policy (rules, prefixes, port ranges), so a
//! failure reports the few packets and rules that matter.

use wirefence_agent::policy::{compile, Policy, Rule};
use wirefence_common::CtConfig;

use super::conntrack::Mirror;
use super::generate::Case;
use super::{check_case, Bed, Ctx, L3_OFFSET};

/// A packet of a policy's sequence and its virtual time (ms).
pub type Step = (u64, Case);

/// Replays `steps` (virtual time, case) alone under `policy` and `cfg`: the first mismatch.
fn replay(bed: &mut Bed, p: &Policy, cfg: CtConfig, steps: &[Step], digest: &mut u64) -> Option<String> {
    let compiled = compile(p).ok()?;
    *digest += 1;
    bed.flush_conntrack();
    let (epoch, slots) = bed.apply(&compiled, *digest);
    bed.set_ct_config(cfg);
    let ctx = Ctx { policy: p, slots: &slots, epoch };
    let mut mirror = Mirror::new(cfg);
    let mut r = None;
    for (at, case) in steps {
        mirror.now_ms = *at;
        if let Err(why) = check_case(bed, &ctx, &mut mirror, case, &case.wire.frame(L3_OFFSET)) {
            r = Some(why);
            break;
        }
    }
    bed.flush_conntrack();
    r
}

/// The packets as the report lists them.
pub fn describe_steps(steps: &[Step]) -> String {
    let t0 = steps.first().map_or(0, |s| s.0);
    steps.iter().map(|(at, c)| format!("  t+{} ms: {:?}\n    wire: {}\n", at - t0, c.eval, c.what)).collect()
}

/// Greedily drops packets, then rules, prefixes and port ranges while a mismatch remains.
pub fn shrink(
    bed: &mut Bed,
    policy: &Policy,
    cfg: CtConfig,
    history: &[Step],
    digest: &mut u64,
) -> Option<(Policy, Vec<Step>, String)> {
    let (_, last) = history.last()?;
    // The failing packet is among them (its probes are its own).
    let mut steps: Vec<Step> =
        history.iter().filter(|(_, c)| c.probes.iter().any(|k| last.probes.contains(k))).cloned().collect();
    let mut why = match replay(bed, policy, cfg, &steps, digest) {
        Some(w) => w,
        None => {
            // Not reproduced from the related packets alone: all of them.
            steps = history.to_vec();
            replay(bed, policy, cfg, &steps, digest)?
        }
    };
    let mut i = 0;
    while i < steps.len() && steps.len() > 1 {
        let mut c = steps.clone();
        c.remove(i);
        match replay(bed, policy, cfg, &c, digest) {
            Some(w) => {
                steps = c;
                why = w;
            }
            None => i += 1,
        }
    }
    let mut cur = policy.rules().to_vec();
    let mut progress = true;
    while progress {
        progress = false;
        let mut candidates: Vec<Vec<Rule>> = Vec::new();
        for i in 0..cur.len() {
            let mut c = cur.clone();
            c.remove(i);
            candidates.push(c);
            for field in 0..3 {
                let len = match field {
                    0 => cur[i].from.len(),
                    1 => cur[i].to.len(),
                    _ => cur[i].ports.len(),
                };
                for j in 0..len {
                    let mut c = cur.clone();
                    match field {
                        0 => {
                            c[i].from.remove(j);
                        }
                        1 => {
                            c[i].to.remove(j);
                        }
                        _ => {
                            c[i].ports.remove(j);
                        }
                    }
                    if field < 2 || !c[i].ports.is_empty() {
                        candidates.push(c);
                    }
                }
            }
        }
        for c in candidates {
            let Ok(p) = Policy::new(c.clone()) else { continue };
            if let Some(w) = replay(bed, &p, cfg, &steps, digest) {
                cur = c;
                why = w;
                progress = true;
                break;
            }
        }
    }
    Some((Policy::new(cur).unwrap(), steps, why))
}
