//! Route groups: one prefix routed by several nodes, one of them (the primary) at a time.
//! Pure logic driven by an explicit clock, so failover and hold-down are tested without
//! waiting; [`crate::registry`] feeds it reports and stream events and publishes a new
//! state whenever [`Election::evaluate`] names another primary.
//!
//! Rules: the primary stays while it is healthy (stability beats priority); when it is not,
//! the healthy member with the highest priority (tie: lowest node id) takes over at once; a
//! healthy member with a higher priority than the primary takes over only after it has been
//! healthy without interruption for the hold-down (so a member that flaps never takes the
//! prefix back and forth). With no healthy member the current primary stays: there is
//! nowhere better to send the traffic.
//!
//! A member is healthy while its report stream is open, its agent's checks pass (when it
//! runs any) with a heartbeat at least every three intervals, and the tunnels to it carry
//! traffic as the nodes that peer with it see them ([`tunnel`]).

mod tunnel;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use ipnet::IpNet;
pub use tunnel::Sample;
use tunnel::Tunnels;

/// Priority of a member that did not say (plain `advertise_routes`).
pub const DEFAULT_PRIORITY: u32 = 100;
/// Reported check intervals are clamped to this range: an agent cannot push its heartbeat
/// deadline (three intervals) out to hide a dead link, nor flood reports.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
pub const MAX_INTERVAL: Duration = Duration::from_secs(5);
/// Missed heartbeats after which a member is unhealthy.
pub const MISSED_HEARTBEATS: u32 = 3;
/// Default time a recovered member of higher priority waits before it takes over.
pub const DEFAULT_HOLD_DOWN: Duration = Duration::from_secs(10);

/// What a member's agent last said about one prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    pub healthy: bool,
    pub priority: u32,
    pub interval: Duration,
    pub at: Instant,
}

impl Report {
    /// A report as received: priority 0 means the default, the interval is clamped.
    pub fn new(healthy: bool, priority: u32, interval: Duration, at: Instant) -> Report {
        let priority = if priority == 0 { DEFAULT_PRIORITY } else { priority };
        Report { healthy, priority, interval: interval.clamp(MIN_INTERVAL, MAX_INTERVAL), at }
    }
}

#[derive(Clone, Debug, Default)]
struct Member {
    /// `None`: the agent never reported health for this prefix (an agent without checks):
    /// healthy while its report stream is open.
    report: Option<Report>,
    /// Since when it has been healthy without interruption (as of the last evaluation).
    healthy_since: Option<Instant>,
    /// Whether the nodes that peer with it said its tunnels were dead (as of the last
    /// evaluation).
    tunnel_dead: bool,
}

#[derive(Clone, Debug, Default)]
struct Group {
    members: BTreeMap<String, Member>,
    primary: Option<String>,
}

/// One member's state as shown to an operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberStatus {
    pub node: String,
    pub priority: u32,
    pub healthy: bool,
    /// Whether the agent runs a check for the prefix (else: healthy while connected).
    pub checked: bool,
    /// Whether the nodes that peer with it receive nothing from it (its data path is dead).
    pub tunnel_dead: bool,
}

/// A group as shown to an operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupStatus {
    pub prefix: IpNet,
    pub primary: Option<String>,
    pub members: Vec<MemberStatus>,
}

#[derive(Debug)]
pub struct Election {
    hold_down: Duration,
    groups: BTreeMap<IpNet, Group>,
    /// Open report streams per node.
    streams: HashMap<String, usize>,
    tunnels: Tunnels,
}

impl Election {
    /// An election with `hold_down`, for a mesh whose peers send a keepalive every
    /// `keepalive` (how long a silent tunnel may be).
    pub fn new(hold_down: Duration, keepalive: Duration) -> Election {
        Election { hold_down, groups: BTreeMap::new(), streams: HashMap::new(), tunnels: Tunnels::new(keepalive) }
    }

    pub fn set_hold_down(&mut self, hold_down: Duration) {
        self.hold_down = hold_down;
    }

    /// Makes the groups those of `groups` (prefix -> member node ids): new members start
    /// unhealthy-until-seen, departed members and groups are forgotten. A group keeps its
    /// primary while that is still a member.
    pub fn set_groups(&mut self, groups: &BTreeMap<IpNet, BTreeSet<String>>) {
        self.groups.retain(|p, _| groups.contains_key(p));
        for (prefix, ids) in groups {
            let g = self.groups.entry(*prefix).or_default();
            g.members.retain(|id, _| ids.contains(id));
            for id in ids {
                g.members.entry(id.clone()).or_default();
            }
            if g.primary.as_ref().is_some_and(|p| !ids.contains(p)) {
                g.primary = None;
            }
        }
    }

    /// Records a health report of `node` for `prefix`; ignored unless the node is a member
    /// of that group (an agent cannot affect a prefix it does not route).
    pub fn report(&mut self, node: &str, prefix: IpNet, report: Report) {
        if let Some(m) = self.groups.get_mut(&prefix).and_then(|g| g.members.get_mut(node)) {
            m.report = Some(report);
        }
    }

    /// Records what `reporter`'s WireGuard says about its peer `member` (a statistics
    /// report received `now`); ignored unless `member` is in a group.
    pub fn tunnel(&mut self, reporter: &str, member: &str, sample: Sample, now: Instant) {
        if self.groups.values().any(|g| g.members.contains_key(member)) {
            self.tunnels.record(reporter, member, sample, now);
        }
    }

    /// A report stream of `node` opened (`true`) or ended.
    pub fn stream(&mut self, node: &str, open: bool) {
        let n = self.streams.entry(node.to_owned()).or_default();
        if open {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.streams.remove(node);
            }
        }
    }

    /// `tunnel_dead`: what [`Tunnels::dead`] says of the node now.
    fn healthy(&self, node: &str, m: &Member, now: Instant, tunnel_dead: bool) -> bool {
        if !self.streams.contains_key(node) || tunnel_dead {
            return false;
        }
        match m.report {
            None => true,
            Some(r) => r.healthy && now.saturating_duration_since(r.at) < r.interval * MISSED_HEARTBEATS,
        }
    }

    /// Brings every member's health up to `now` and returns each group's primary (groups
    /// without one are left out).
    pub fn evaluate(&mut self, now: Instant) -> BTreeMap<IpNet, String> {
        self.tunnels.retain(&self.groups.values().flat_map(|g| g.members.keys()).collect(), now);
        let mut health: Vec<(IpNet, String, bool, bool)> = Vec::new();
        for (prefix, g) in &self.groups {
            for (id, m) in &g.members {
                let tunnel_dead = self.tunnels.dead(id, now);
                health.push((*prefix, id.clone(), self.healthy(id, m, now, tunnel_dead), tunnel_dead));
            }
        }
        for (prefix, id, ok, tunnel_dead) in health {
            let m = self.groups.get_mut(&prefix).and_then(|g| g.members.get_mut(&id)).expect("collected above");
            m.tunnel_dead = tunnel_dead;
            if ok != m.healthy_since.is_some() {
                tracing::info!(prefix = %prefix, node = %id, healthy = ok, tunnel_dead, "route group member health changed");
            }
            m.healthy_since = match (ok, m.healthy_since) {
                (true, Some(since)) => Some(since),
                (true, None) => Some(now),
                (false, _) => None,
            };
        }
        let hold_down = self.hold_down;
        let mut out = BTreeMap::new();
        for (prefix, g) in &mut self.groups {
            let priority = |m: &Member| m.report.map_or(DEFAULT_PRIORITY, |r| r.priority);
            // Best first: highest priority, then lowest id (BTreeMap order).
            let mut ranked: Vec<(&String, &Member)> = g.members.iter().collect();
            ranked.sort_by_key(|(_, m)| std::cmp::Reverse(priority(m)));
            let current = g.primary.as_ref().and_then(|p| g.members.get_key_value(p));
            let next = match current {
                Some((id, m)) if m.healthy_since.is_some() => {
                    // A better member takes over only once it has proven itself stable.
                    ranked
                        .iter()
                        .find(|(_, c)| {
                            priority(c) > priority(m)
                                && c.healthy_since.is_some_and(|s| now.saturating_duration_since(s) >= hold_down)
                        })
                        .map_or(id, |(cid, _)| cid)
                }
                _ => match ranked.iter().find(|(_, c)| c.healthy_since.is_some()) {
                    Some((id, _)) => id,
                    // Nobody healthy: keep the primary, or start with the preferred member.
                    None => match current.map(|(id, _)| id).or_else(|| ranked.first().map(|(id, _)| *id)) {
                        Some(id) => id,
                        None => continue,
                    },
                },
            };
            let next = next.clone();
            if g.primary.as_ref() != Some(&next) {
                tracing::info!(prefix = %prefix, from = ?g.primary, to = %next, "route group primary changed");
            }
            g.primary = Some(next.clone());
            out.insert(*prefix, next);
        }
        out
    }

    /// The groups as of the last evaluation.
    pub fn status(&self) -> Vec<GroupStatus> {
        self.groups
            .iter()
            .map(|(prefix, g)| GroupStatus {
                prefix: *prefix,
                primary: g.primary.clone(),
                members: g
                    .members
                    .iter()
                    .map(|(id, m)| MemberStatus {
                        node: id.clone(),
                        priority: m.report.map_or(DEFAULT_PRIORITY, |r| r.priority),
                        healthy: m.healthy_since.is_some(),
                        checked: m.report.is_some(),
                        tunnel_dead: m.tunnel_dead,
                    })
                    .collect(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOLD: Duration = Duration::from_secs(10);
    const TICK: Duration = Duration::from_millis(500);
    const KEEPALIVE: Duration = Duration::from_secs(1);

    fn net() -> IpNet {
        "10.10.1.0/24".parse().unwrap()
    }

    /// A group of `members` with their report streams open.
    fn group(members: &[&str]) -> Election {
        let mut e = Election::new(HOLD, KEEPALIVE);
        let ids = members.iter().map(|s| s.to_string()).collect();
        e.set_groups(&[(net(), ids)].into());
        for m in members {
            e.stream(m, true);
        }
        e
    }

    fn say(e: &mut Election, node: &str, healthy: bool, priority: u32, at: Instant) {
        e.report(node, net(), Report::new(healthy, priority, TICK, at));
    }

    fn primary(e: &mut Election, now: Instant) -> String {
        e.evaluate(now)[&net()].clone()
    }

    #[test]
    fn highest_priority_then_lowest_id() {
        let t = Instant::now();
        let mut e = group(&["a", "b", "c"]);
        assert_eq!(primary(&mut e, t), "a", "all default: lowest id");
        let mut e = group(&["a", "b", "c"]);
        say(&mut e, "a", true, 100, t);
        say(&mut e, "b", true, 200, t);
        say(&mut e, "c", true, 200, t);
        assert_eq!(primary(&mut e, t), "b");
    }

    #[test]
    fn fails_over_on_an_unhealthy_report_and_comes_back_only_after_the_hold_down() {
        let t = Instant::now();
        let mut e = group(&["a", "b"]);
        say(&mut e, "a", true, 200, t);
        say(&mut e, "b", true, 100, t);
        assert_eq!(primary(&mut e, t), "a");
        say(&mut e, "a", false, 200, t + TICK);
        say(&mut e, "b", true, 100, t + TICK);
        assert_eq!(primary(&mut e, t + TICK), "b", "failover is immediate");
        // a recovers, then flaps: the clock of its hold-down starts again.
        let back = t + 2 * TICK;
        say(&mut e, "a", true, 200, back);
        say(&mut e, "b", true, 100, back);
        assert_eq!(primary(&mut e, back), "b");
        say(&mut e, "a", false, 200, back + HOLD / 2);
        say(&mut e, "b", true, 100, back + HOLD / 2);
        assert_eq!(primary(&mut e, back + HOLD / 2), "b");
        let again = back + HOLD / 2 + TICK;
        say(&mut e, "a", true, 200, again);
        // The registry evaluates on every report: a's hold-down starts here.
        assert_eq!(primary(&mut e, again), "b");
        for i in 1..=19 {
            let now = again + TICK * i;
            say(&mut e, "a", true, 200, now);
            say(&mut e, "b", true, 100, now);
            assert_eq!(primary(&mut e, now), "b", "still in a's hold-down at {i}");
        }
        let now = again + HOLD;
        say(&mut e, "a", true, 200, now);
        say(&mut e, "b", true, 100, now);
        assert_eq!(primary(&mut e, now), "a", "after the hold-down");
    }

    #[test]
    fn an_equal_priority_member_never_takes_over_a_healthy_primary() {
        let t = Instant::now();
        let mut e = group(&["a", "b"]);
        e.stream("a", false);
        assert_eq!(primary(&mut e, t), "b");
        e.stream("a", true);
        assert_eq!(primary(&mut e, t + HOLD * 3), "b");
    }

    #[test]
    fn fails_over_when_heartbeats_stop() {
        let t = Instant::now();
        let mut e = group(&["a", "b"]);
        say(&mut e, "a", true, 200, t);
        say(&mut e, "b", true, 100, t);
        assert_eq!(primary(&mut e, t), "a");
        // b keeps reporting, a goes silent (its namespace is gone, its stream not yet).
        for i in 1..=2 {
            say(&mut e, "b", true, 100, t + TICK * i);
            assert_eq!(primary(&mut e, t + TICK * i), "a");
        }
        say(&mut e, "b", true, 100, t + TICK * 3);
        assert_eq!(primary(&mut e, t + TICK * 3), "b", "three intervals without a heartbeat");
    }

    #[test]
    fn fails_over_when_the_report_stream_ends() {
        let t = Instant::now();
        let mut e = group(&["a", "b"]);
        assert_eq!(primary(&mut e, t), "a");
        e.stream("a", false);
        assert_eq!(primary(&mut e, t), "b");
        // A second stream of b (a reconnect) ending leaves b's first one.
        e.stream("b", true);
        e.stream("b", false);
        assert_eq!(primary(&mut e, t), "b");
    }

    #[test]
    fn nobody_healthy_keeps_the_primary() {
        let t = Instant::now();
        let mut e = group(&["a", "b"]);
        assert_eq!(primary(&mut e, t), "a");
        e.stream("a", false);
        e.stream("b", false);
        assert_eq!(primary(&mut e, t), "a");
        let mut fresh = Election::new(HOLD, KEEPALIVE);
        fresh.set_groups(&[(net(), ["x".to_string(), "y".to_string()].into())].into());
        assert_eq!(primary(&mut fresh, t), "x", "a new group starts with its preferred member");
    }

    #[test]
    fn intervals_are_clamped_and_foreign_prefixes_ignored() {
        let t = Instant::now();
        let mut e = group(&["a", "b"]);
        // A huge interval does not stretch the deadline past 3 x MAX_INTERVAL.
        e.report("a", net(), Report::new(true, 300, Duration::from_secs(3600), t));
        say(&mut e, "b", true, 100, t);
        assert_eq!(primary(&mut e, t), "a");
        let late = t + MAX_INTERVAL * MISSED_HEARTBEATS;
        say(&mut e, "b", true, 100, late);
        assert_eq!(primary(&mut e, late), "b");
        // A report for a prefix the node is no member of changes nothing.
        e.report("c", net(), Report::new(true, 1000, TICK, late));
        e.report("b", "10.99.0.0/24".parse().unwrap(), Report::new(false, 1, TICK, late));
        assert_eq!(primary(&mut e, late), "b");
        assert_eq!(e.status()[0].members.len(), 2);
    }

    #[test]
    fn fails_over_when_its_peers_receive_nothing_from_it() {
        let t = Instant::now();
        let every = Duration::from_secs(10);
        let mut e = group(&["a", "b"]);
        let sample = |rx| Sample { rx_bytes: rx, last_handshake: 1 };
        // Both pass their checks throughout; x peers with both, and its counter for a
        // stops after the first report.
        let step = |e: &mut Election, now, a_rx, b_rx| {
            say(e, "a", true, 200, now);
            say(e, "b", true, 100, now);
            e.tunnel("x", "a", sample(a_rx), now);
            e.tunnel("x", "b", sample(b_rx), now);
            // A node that is no member is not tracked.
            e.tunnel("x", "c", sample(0), now);
            primary(e, now)
        };
        assert_eq!(step(&mut e, t, 10, 0), "a");
        assert_eq!(step(&mut e, t + every, 10, 1), "b", "10 s without a byte is over 3 keepalives");
        let a = e.status()[0].members.iter().find(|m| m.node == "a").unwrap().clone();
        assert!(!a.healthy && a.tunnel_dead, "{a:?}");
        // a's tunnels carry traffic again: healthy, back only after the hold-down.
        let back = t + every * 2;
        assert_eq!(step(&mut e, back, 11, 2), "b");
        assert!(!e.status()[0].members[0].tunnel_dead);
        assert_eq!(step(&mut e, back + HOLD, 12, 3), "a");
    }

    #[test]
    fn a_departed_primary_is_replaced() {
        let t = Instant::now();
        let mut e = group(&["a", "b", "c"]);
        assert_eq!(primary(&mut e, t), "a");
        e.set_groups(&[(net(), ["b".to_string(), "c".to_string()].into())].into());
        assert_eq!(primary(&mut e, t), "b");
        e.set_groups(&BTreeMap::new());
        assert!(e.evaluate(t).is_empty());
    }
}
