//! Shrinks a mismatch of the differential test to a minimal policy, so a failure reports
//! the few rules that matter rather than the random policy it was found under.

use wirefence_agent::policy::{compile, Policy, Rule};

use super::generate::Case;
use super::{check_case, Bed, Ctx, L3_OFFSET};

/// Greedily drops rules, prefixes and port ranges while the case still mismatches.
pub fn shrink(bed: &mut Bed, policy: &Policy, case: &Case, digest: &mut u64) -> Option<(Policy, String)> {
    let frame = case.wire.frame(L3_OFFSET);
    let mut still = |bed: &mut Bed, p: &Policy| -> Option<String> {
        let compiled = compile(p).ok()?;
        *digest += 1;
        bed.flush_conntrack();
        let (epoch, slots) = bed.apply(&compiled, *digest);
        let ctx = Ctx { policy: p, slots: &slots, epoch };
        let r = check_case(bed, &ctx, case, &frame).err();
        bed.flush_conntrack();
        r
    };
    let mut why = still(bed, policy)?;
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
            if let Some(w) = still(bed, &p) {
                cur = c;
                why = w;
                progress = true;
                break;
            }
        }
    }
    Some((Policy::new(cur).unwrap(), why))
}
