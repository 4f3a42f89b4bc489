//! Rule hits for the control plane (`RuleHits`, for `policy show --usage`): what the policy
//! programs' per-rule counters counted since the previous report. The counters live in
//! pinned maps and outlast the agent; a restarted agent that finds them takes its first
//! reading as the baseline, so nothing counted before it is reported twice (what was
//! counted between the last report and the restart is not reported at all). Maps not
//! there yet count from zero once they are.

use std::collections::BTreeMap;
use std::sync::Mutex;

use wirefence_proto::v1;

use crate::enforce::Count;

/// Reads the counters: `None` while the policy maps are not there.
pub type ReadCounters = Box<dyn Fn() -> Option<BTreeMap<String, Count>> + Send + Sync>;

pub struct RuleHits {
    read: ReadCounters,
    /// The previous reading; `None` before the first.
    last: Mutex<Option<BTreeMap<String, Count>>>,
}

impl RuleHits {
    pub fn new(read: ReadCounters) -> RuleHits {
        RuleHits { read, last: Mutex::new(None) }
    }

    /// The increments since the previous call; `None` on the first reading or when there
    /// is nothing to report.
    pub fn next(&self) -> Option<v1::RuleHits> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let Some(now) = (self.read)() else {
            last.get_or_insert_with(BTreeMap::new);
            return None;
        };
        let rules = last.as_ref().map(|before| increments(before, &now));
        *last = Some(now);
        rules.filter(|r| !r.is_empty()).map(|rules| v1::RuleHits { rules })
    }
}

impl RuleHits {
    /// Takes back increments [`RuleHits::next`] returned that could not be sent: they are
    /// reported with the next ones.
    pub fn unsent(&self, hits: &v1::RuleHits) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let Some(last) = last.as_mut() else { return };
        for h in &hits.rules {
            if let Some(c) = last.get_mut(&h.rule_id) {
                c.packets = c.packets.saturating_sub(h.packets);
                c.bytes = c.bytes.saturating_sub(h.bytes);
            }
        }
    }
}

/// Per rule, what `now` counted beyond `before`. A rule absent before counts from zero; a
/// counter below its previous value was restarted (its slot given to a new rule of that
/// id) and counts from zero too.
fn increments(before: &BTreeMap<String, Count>, now: &BTreeMap<String, Count>) -> Vec<v1::RuleHit> {
    now.iter()
        .filter_map(|(id, c)| {
            let base = before.get(id).copied().unwrap_or_default();
            let (packets, bytes) = match c.packets >= base.packets && c.bytes >= base.bytes {
                true => (c.packets - base.packets, c.bytes - base.bytes),
                false => (c.packets, c.bytes),
            };
            (packets > 0).then(|| v1::RuleHit { rule_id: id.clone(), packets, bytes })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn counts(v: &[(&str, u64)]) -> BTreeMap<String, Count> {
        v.iter().map(|(id, n)| (id.to_string(), Count { packets: *n, bytes: n * 100 })).collect()
    }

    #[test]
    fn reports_what_was_counted_since_the_previous_reading() {
        let readings = Arc::new(Mutex::new(vec![
            counts(&[("web", 7), ("ssh", 0)]),
            counts(&[("web", 10), ("ssh", 0)]),
            counts(&[("web", 10)]),
            // web's slot restarted below its last value; db is new.
            counts(&[("web", 4), ("db", 2)]),
        ]));
        let source = readings.clone();
        let hits = RuleHits::new(Box::new(move || {
            let mut r = source.lock().unwrap();
            (!r.is_empty()).then(|| r.remove(0))
        }));
        assert_eq!(hits.next(), None, "the first reading is the baseline");
        let got = hits.next().unwrap().rules;
        assert_eq!(got, [v1::RuleHit { rule_id: "web".into(), packets: 3, bytes: 300 }]);
        assert_eq!(hits.next(), None, "nothing new");
        let mut got = hits.next().unwrap().rules;
        got.sort_by(|a, b| a.rule_id.cmp(&b.rule_id));
        let want = [
            v1::RuleHit { rule_id: "db".into(), packets: 2, bytes: 200 },
            v1::RuleHit { rule_id: "web".into(), packets: 4, bytes: 400 },
        ];
        assert_eq!(got, want);
        assert_eq!(hits.next(), None, "no maps: nothing");
    }

    #[test]
    fn increments_not_sent_come_again_with_the_next() {
        let readings = Arc::new(Mutex::new(vec![counts(&[("web", 1)]), counts(&[("web", 5)]), counts(&[("web", 6)])]));
        let source = readings.clone();
        let hits = RuleHits::new(Box::new(move || Some(source.lock().unwrap().remove(0))));
        assert_eq!(hits.next(), None);
        let lost = hits.next().unwrap();
        hits.unsent(&lost);
        assert_eq!(hits.next().unwrap().rules, [v1::RuleHit { rule_id: "web".into(), packets: 5, bytes: 500 }]);
    }

    #[test]
    fn maps_that_appear_after_the_start_count_from_zero() {
        let readings = Arc::new(Mutex::new(vec![None, Some(counts(&[("web", 5)]))]));
        let source = readings.clone();
        let hits = RuleHits::new(Box::new(move || source.lock().unwrap().remove(0)));
        assert_eq!(hits.next(), None);
        assert_eq!(hits.next().unwrap().rules, [v1::RuleHit { rule_id: "web".into(), packets: 5, bytes: 500 }]);
    }
}
