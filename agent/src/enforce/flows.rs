//! Flow events on their way to the control plane: every new allowed flow and every deny the
//! policy programs report ([`super::denies::follow`] reads them off the ring buffer), with
//! the deciding rule's id, and every allowed flow that ended (the conntrack sweep found its
//! entry expired: [`FlowQueue::ended`]) with what it carried. Bounded: when the control
//! plane is away or slow, what does not fit is counted and dropped, never held without
//! limit.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use wirefence_common as common;

use super::sweep::EndedFlow;

/// Events held at most (about a minute of the programs' event budget on one CPU).
pub const FLOW_QUEUE: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowEvent {
    /// Unix ms, when the agent read the event.
    pub at_ms: i64,
    pub allowed: bool,
    /// The deciding rule; empty for a deny (or a rule the slot table does not name yet).
    pub rule: String,
    /// Arriving from the tunnel (else leaving into it).
    pub ingress: bool,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    /// What an ended flow carried, both directions; 0 in the record of its start.
    pub packets: u64,
    pub bytes: u64,
}

impl FlowEvent {
    /// Whether this is a flow's end (only an end has counts: every flow passed a packet).
    pub fn ended(&self) -> bool {
        self.packets > 0
    }
}

#[derive(Debug, Default)]
pub struct FlowQueue {
    events: Mutex<VecDeque<FlowEvent>>,
    /// Ended flows the sweep found, not yet named and queued by the event reader.
    ended: Mutex<Vec<EndedFlow>>,
    dropped: AtomicU64,
}

impl FlowQueue {
    pub fn push(&self, e: FlowEvent) {
        let mut q = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= FLOW_QUEUE {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.push_back(e);
    }

    /// Everything queued, oldest first; the queue is empty afterwards.
    pub fn drain(&self) -> Vec<FlowEvent> {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect()
    }

    /// Hands the flows a sweep found ended to the event reader ([`FlowQueue::take_ended`]),
    /// which names their rules and queues them; those over [`FLOW_QUEUE`] are dropped.
    pub fn ended(&self, flows: Vec<EndedFlow>) {
        let mut held = self.ended.lock().unwrap_or_else(|p| p.into_inner());
        let room = FLOW_QUEUE.saturating_sub(held.len());
        if flows.len() > room {
            self.dropped.fetch_add((flows.len() - room) as u64, Ordering::Relaxed);
        }
        held.extend(flows.into_iter().take(room));
    }

    /// The ended flows handed over since the last call.
    pub fn take_ended(&self) -> Vec<EndedFlow> {
        std::mem::take(&mut *self.ended.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Events dropped because the queue was full, since the agent started.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Rule ids by counter slot (an event names its rule by slot), from the table the policy
/// writer saves before each flip; read again, at most once a second, when an event names
/// a slot the last reading did not have.
pub struct RuleNames {
    file: PathBuf,
    by_slot: HashMap<u32, String>,
    read_at: Option<Instant>,
}

impl RuleNames {
    pub fn new(file: PathBuf) -> RuleNames {
        RuleNames { file, by_slot: HashMap::new(), read_at: None }
    }

    pub fn name(&mut self, slot: u32) -> String {
        if slot == common::NO_RULE {
            return String::new();
        }
        if !self.by_slot.contains_key(&slot) && self.read_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            self.read_at = Some(Instant::now());
            self.by_slot = invert(super::read_slots(&self.file));
        }
        self.by_slot.get(&slot).cloned().unwrap_or_default()
    }
}

fn invert(slots: BTreeMap<String, u32>) -> HashMap<u32, String> {
    slots.into_iter().map(|(id, slot)| (slot, id)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(port: u16) -> FlowEvent {
        FlowEvent {
            at_ms: 1,
            allowed: true,
            rule: "web".into(),
            ingress: false,
            src: "10.77.0.1".parse().unwrap(),
            dst: "10.77.0.2".parse().unwrap(),
            proto: 6,
            sport: 40000,
            dport: port,
            packets: 0,
            bytes: 0,
        }
    }

    #[test]
    fn the_queue_is_bounded_and_counts_what_it_drops() {
        let q = FlowQueue::default();
        for p in 0..(FLOW_QUEUE + 10) {
            q.push(event(p as u16));
        }
        assert_eq!(q.dropped(), 10);
        let all = q.drain();
        assert_eq!(all.len(), FLOW_QUEUE);
        assert_eq!(all[0], event(0), "oldest first; the newest are what is dropped");
        assert!(q.drain().is_empty());
    }

    #[test]
    fn ended_flows_are_bounded_too() {
        let q = FlowQueue::default();
        let key = common::FlowKey::default();
        let ended = |n: usize| vec![EndedFlow { first: key, rule: 0, first_seen_ns: 1, packets: 2, bytes: 3 }; n];
        q.ended(ended(FLOW_QUEUE - 1));
        q.ended(ended(3));
        assert_eq!(q.dropped(), 2);
        assert_eq!(q.take_ended().len(), FLOW_QUEUE);
        assert!(q.take_ended().is_empty());
    }

    #[test]
    fn rules_are_named_by_their_slot_from_the_saved_table() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("wf0.policy-slots.json");
        std::fs::write(&file, r#"{"web": 0, "ssh": 3}"#).unwrap();
        let mut names = RuleNames::new(file.clone());
        assert_eq!(names.name(3), "ssh");
        assert_eq!(names.name(common::NO_RULE), "");
        // A rule added since: read again (not sooner than a second after the last reading).
        std::fs::write(&file, r#"{"web": 0, "ssh": 3, "db": 4}"#).unwrap();
        assert_eq!(names.name(4), "", "read less than a second ago");
        names.read_at = Some(Instant::now() - Duration::from_secs(2));
        assert_eq!(names.name(4), "db");
    }
}
