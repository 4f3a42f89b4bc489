//! The daemon's guard against hot loops: when pass after pass changes the kernel again
//! (another tool undoing what the agent sets, or a kernel reporting an object differently
//! from how it was made), the agent would otherwise rewrite it as fast as the events come.
//! After [`STREAK`] such passes in a row, passes are held apart (doubling up to
//! [`MAX_HOLD`]) and a warning names what keeps changing. A pass that changes nothing ends it.

use std::time::Duration;

use crate::plan::Op;

/// Passes in a row that each change something before the guard holds passes apart. A
/// config change or a new view takes one pass (two when a kernel event races it).
pub const STREAK: u32 = 4;
const FIRST_HOLD: Duration = Duration::from_secs(1);
pub const MAX_HOLD: Duration = Duration::from_secs(30);
/// Operations named in the warning.
const NAMED: usize = 6;

#[derive(Debug, Default)]
pub struct HotLoopGuard {
    streak: u32,
    hold: Duration,
}

impl HotLoopGuard {
    /// Takes in the operations one pass applied; returns how long to wait before the next
    /// pass (zero unless the agent is looping).
    pub fn after_pass(&mut self, ops: &[Op]) -> Duration {
        if ops.is_empty() {
            *self = HotLoopGuard::default();
            return Duration::ZERO;
        }
        self.streak += 1;
        if self.streak < STREAK {
            return Duration::ZERO;
        }
        self.hold = if self.hold.is_zero() { FIRST_HOLD } else { (self.hold * 2).min(MAX_HOLD) };
        let mut named: Vec<String> = ops.iter().map(Op::to_string).collect();
        named.sort_unstable();
        named.dedup();
        let more = named.len().saturating_sub(NAMED);
        named.truncate(NAMED);
        tracing::warn!(
            passes = self.streak,
            hold = ?self.hold,
            changing = %named.join("; "),
            more,
            "every pass changes the kernel again: something keeps undoing what the agent sets; passes are held apart"
        );
        self.hold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_passes_apart_only_while_every_pass_changes_something() {
        let mut g = HotLoopGuard::default();
        let rule = crate::model::Rule {
            family: crate::model::Family::V4,
            priority: 5,
            action: crate::model::RuleAction::MainSuppressDefault,
        };
        let ops = vec![Op::AddRule(rule)];
        for _ in 1..STREAK {
            assert_eq!(g.after_pass(&ops), Duration::ZERO, "a few changing passes are normal");
        }
        assert_eq!(g.after_pass(&ops), FIRST_HOLD);
        assert_eq!(g.after_pass(&ops), FIRST_HOLD * 2);
        for _ in 0..10 {
            g.after_pass(&ops);
        }
        assert_eq!(g.after_pass(&ops), MAX_HOLD, "bounded");
        assert_eq!(g.after_pass(&[]), Duration::ZERO, "a quiet pass ends it");
        assert_eq!(g.after_pass(&ops), Duration::ZERO, "and the streak starts again");
    }
}
