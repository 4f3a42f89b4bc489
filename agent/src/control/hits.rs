//! Rule hits for the control plane (`RuleHits`, for `policy show --usage`): what the policy
//! programs' per-rule counters counted since the previous report. The counters live in
//! pinned maps and outlast the agent; a restarted agent that finds them takes its first
//! reading as the baseline, so nothing counted before it is reported twice (what was
//! counted between the last report and the restart is not reported at all). Maps not
//! there yet count from zero once they are.
//!
//! Reports keep to what the control plane takes ([`wirefence_proto::rule_hits`]): none
//! sooner than its minimum gap after the previous one (a reconnect's first tick can come
//! early), and per rule at most its caps, the rest kept for the next reports (after a long
//! disconnection the counts arrive in parts, not dropped whole).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use wirefence_proto::rule_hits::{MAX_BYTES, MAX_PACKETS, MIN_GAP};
use wirefence_proto::v1;

use crate::enforce::Count;

/// Reads the counters: `None` while the policy maps are not there.
pub type ReadCounters = Box<dyn Fn() -> Option<BTreeMap<String, Count>> + Send + Sync>;

pub struct RuleHits {
    read: ReadCounters,
    /// The counts reported so far (`None` before the first reading): the previous reading,
    /// less what was held back.
    last: Mutex<Option<BTreeMap<String, Count>>>,
    /// When the last report was handed out, and the gap kept after it.
    sent_at: Mutex<Option<Instant>>,
    gap: Duration,
}

impl RuleHits {
    pub fn new(read: ReadCounters) -> RuleHits {
        RuleHits::with_gap(read, MIN_GAP + Duration::from_millis(500))
    }

    fn with_gap(read: ReadCounters, gap: Duration) -> RuleHits {
        RuleHits { read, last: Mutex::new(None), sent_at: Mutex::new(None), gap }
    }

    /// The increments since the previous report, each rule's within the caps; `None` on
    /// the first reading, within the gap after the last report, or when there is nothing
    /// to report.
    pub fn next(&self) -> Option<v1::RuleHits> {
        let mut sent_at = self.sent_at.lock().unwrap_or_else(|e| e.into_inner());
        if sent_at.is_some_and(|t| t.elapsed() < self.gap) {
            return None; // all of it comes with the next report; the counters are not read
        }
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let Some(now) = (self.read)() else {
            last.get_or_insert_with(BTreeMap::new);
            return None;
        };
        let Some(before) = last.as_ref() else {
            *last = Some(now);
            return None;
        };
        let mut rules = increments(before, &now);
        let held: Vec<v1::RuleHit> = rules.iter_mut().filter_map(cap).collect();
        let mut reported = now;
        give_back(&mut reported, &held);
        *last = Some(reported);
        if rules.is_empty() {
            return None;
        }
        *sent_at = Some(Instant::now());
        Some(v1::RuleHits { rules })
    }

    /// Takes back increments [`RuleHits::next`] returned that could not be sent: they are
    /// reported with the next ones.
    pub fn unsent(&self, hits: &v1::RuleHits) {
        if let Some(last) = self.last.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            give_back(last, &hits.rules);
        }
    }
}

/// Cuts `h` to the control plane's caps; returns the part held back, if any.
fn cap(h: &mut v1::RuleHit) -> Option<v1::RuleHit> {
    if h.packets <= MAX_PACKETS && h.bytes <= MAX_BYTES {
        return None;
    }
    let held = v1::RuleHit {
        rule_id: h.rule_id.clone(),
        packets: h.packets.saturating_sub(MAX_PACKETS),
        bytes: h.bytes.saturating_sub(MAX_BYTES),
    };
    h.packets = h.packets.min(MAX_PACKETS);
    h.bytes = h.bytes.min(MAX_BYTES);
    Some(held)
}

/// Lowers the counts reported so far by `hits`, so they are reported again.
fn give_back(reported: &mut BTreeMap<String, Count>, hits: &[v1::RuleHit]) {
    for h in hits {
        if let Some(c) = reported.get_mut(&h.rule_id) {
            c.packets = c.packets.saturating_sub(h.packets);
            c.bytes = c.bytes.saturating_sub(h.bytes);
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
        let hits = RuleHits::with_gap(
            Box::new(move || {
                let mut r = source.lock().unwrap();
                (!r.is_empty()).then(|| r.remove(0))
            }),
            Duration::ZERO,
        );
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
        let hits = RuleHits::with_gap(Box::new(move || Some(source.lock().unwrap().remove(0))), Duration::ZERO);
        assert_eq!(hits.next(), None);
        let lost = hits.next().unwrap();
        hits.unsent(&lost);
        assert_eq!(hits.next().unwrap().rules, [v1::RuleHit { rule_id: "web".into(), packets: 5, bytes: 500 }]);
    }

    #[test]
    fn maps_that_appear_after_the_start_count_from_zero() {
        let readings = Arc::new(Mutex::new(vec![None, Some(counts(&[("web", 5)]))]));
        let source = readings.clone();
        let hits = RuleHits::with_gap(Box::new(move || source.lock().unwrap().remove(0)), Duration::ZERO);
        assert_eq!(hits.next(), None);
        assert_eq!(hits.next().unwrap().rules, [v1::RuleHit { rule_id: "web".into(), packets: 5, bytes: 500 }]);
    }

    /// After a long disconnection a rule's increment exceeds what the control plane takes
    /// in one report: it goes in parts of that size, nothing dropped.
    #[test]
    fn counts_over_the_caps_go_in_parts() {
        let big = Count { packets: 2 * MAX_PACKETS + 7, bytes: 3 * MAX_BYTES };
        let readings = Arc::new(Mutex::new(vec![counts(&[("web", 0)]), BTreeMap::from([("web".to_string(), big)])]));
        let source = readings.clone();
        let hits = RuleHits::with_gap(
            Box::new(move || {
                let mut r = source.lock().unwrap();
                Some(if r.len() > 1 { r.remove(0) } else { r[0].clone() })
            }),
            Duration::ZERO,
        );
        assert_eq!(hits.next(), None);
        let mut sent = Count::default();
        for _ in 0..3 {
            let h = hits.next().unwrap().rules;
            assert!(h[0].packets <= MAX_PACKETS && h[0].bytes <= MAX_BYTES, "{h:?}");
            sent.packets += h[0].packets;
            sent.bytes += h[0].bytes;
        }
        assert_eq!((sent.packets, sent.bytes), (big.packets, big.bytes));
        assert_eq!(hits.next(), None, "all of it was sent");
    }

    /// A report is never handed out within the gap after the previous one (the control plane
    /// would refuse it): its counts come with the next.
    #[test]
    fn no_report_within_the_gap_and_nothing_lost_by_waiting() {
        let readings = Arc::new(Mutex::new(vec![counts(&[("web", 0)]), counts(&[("web", 1)])]));
        let source = readings.clone();
        let hits =
            RuleHits::with_gap(Box::new(move || Some(source.lock().unwrap().remove(0))), Duration::from_secs(3600));
        assert_eq!(hits.next(), None, "baseline");
        assert_eq!(hits.next().unwrap().rules, [v1::RuleHit { rule_id: "web".into(), packets: 1, bytes: 100 }]);
        assert_eq!(hits.next(), None, "within the gap");
        *hits.sent_at.lock().unwrap() = Some(Instant::now() - Duration::from_secs(3601));
        readings.lock().unwrap().push(counts(&[("web", 4)]));
        assert_eq!(hits.next().unwrap().rules, [v1::RuleHit { rule_id: "web".into(), packets: 3, bytes: 300 }]);
    }
}
