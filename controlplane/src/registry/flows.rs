//! The most recent flow records, in memory. The log is shared by every node, so each node
//! has a quota within it: a node at its quota replaces its own oldest record, and only a
//! full log drops the oldest record overall. One node reporting a flood of flows therefore
//! keeps at most its quota and cannot push out the others' records.

use std::collections::{HashMap, VecDeque};

use wirefence_proto::v1::FlowRecord;

#[derive(Debug)]
pub struct FlowLog {
    capacity: usize,
    per_node: usize,
    records: VecDeque<(String, FlowRecord)>,
    counts: HashMap<String, usize>,
}

impl FlowLog {
    pub fn new(capacity: usize, per_node: usize) -> FlowLog {
        FlowLog {
            capacity,
            per_node: per_node.min(capacity),
            records: VecDeque::with_capacity(capacity),
            counts: HashMap::new(),
        }
    }

    pub fn push(&mut self, node: &str, record: FlowRecord) {
        if self.per_node == 0 {
            return;
        }
        let mine = self.counts.get(node).copied().unwrap_or(0);
        if mine >= self.per_node {
            // The log holds at most a few hundred records: a scan is cheap.
            if let Some(i) = self.records.iter().position(|(n, _)| n == node) {
                self.records.remove(i);
            }
        } else {
            if self.records.len() >= self.capacity {
                if let Some((old, _)) = self.records.pop_front() {
                    self.uncount(&old);
                }
            }
            *self.counts.entry(node.to_owned()).or_default() += 1;
        }
        self.records.push_back((node.to_owned(), record));
    }

    fn uncount(&mut self, node: &str) {
        if let Some(n) = self.counts.get_mut(node) {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(node);
            }
        }
    }

    /// Oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &(String, FlowRecord)> {
        self.records.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(port: u32) -> FlowRecord {
        FlowRecord { dst_port: port, ..Default::default() }
    }

    #[test]
    fn a_node_at_its_quota_replaces_its_own_oldest_records() {
        let mut log = FlowLog::new(10, 4);
        for p in 0..3 {
            log.push("quiet", rec(p));
        }
        for p in 100..1100 {
            log.push("loud", rec(p));
        }
        fn of(log: &FlowLog, node: &str) -> Vec<u32> {
            log.iter().filter(|(n, _)| n == node).map(|(_, r)| r.dst_port).collect()
        }
        assert_eq!(of(&log, "quiet"), vec![0, 1, 2], "the flood must not evict another node's records");
        assert_eq!(
            of(&log, "loud"),
            vec![1096, 1097, 1098, 1099],
            "the flooding node keeps its newest, up to its quota"
        );
        for p in 0..3 {
            log.push(&format!("n{p}"), rec(p));
        }
        assert_eq!(log.iter().count(), 10);
        log.push("late", rec(7));
        assert_eq!(log.iter().count(), 10, "a full log drops its oldest record");
        assert_eq!(of(&log, "quiet"), vec![1, 2]);
        assert_eq!(log.counts.values().sum::<usize>(), 10);
    }
}
