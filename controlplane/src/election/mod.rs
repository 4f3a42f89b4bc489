//! Route groups: one prefix routed by several nodes, one of them (the primary) at a time.
//! Pure logic driven by an explicit clock, so failover and hold-down are tested without
//! waiting. Two halves: every server's [`Observer`] turns the report streams, health
//! reports and tunnel counters it receives into [`Observation`]s; one server at a time (the
//! elector, see [`crate::registry`]) merges all servers' and runs the [`Election`], and
//! publishes a new state whenever it names another primary.
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

mod observe;
mod tunnel;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use ipnet::IpNet;
pub use observe::{merge, Observation, Observed, Observer};
pub use tunnel::{Sample, Tunnel};

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
    /// The merged observation of the last evaluation.
    seen: Observation,
    /// Since when it has been healthy without interruption (as of the last evaluation).
    healthy_since: Option<Instant>,
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

/// The decision: members' health over time and each group's primary.
#[derive(Debug)]
pub struct Election {
    hold_down: Duration,
    groups: BTreeMap<IpNet, BTreeMap<String, Member>>,
    /// As of the last evaluation.
    primaries: BTreeMap<IpNet, String>,
}

impl Election {
    pub fn new(hold_down: Duration) -> Election {
        Election { hold_down, groups: BTreeMap::new(), primaries: BTreeMap::new() }
    }

    pub fn set_hold_down(&mut self, hold_down: Duration) {
        self.hold_down = hold_down;
    }

    /// Brings every member of `groups` (prefix -> member node ids) up to `now` as
    /// `observed` says (a member nobody observed is unhealthy), and returns each group's
    /// primary. `incumbents` are the primaries in force (the state's): the decision
    /// depends on them, not on what this election said last, so a server that takes the
    /// election over continues it.
    pub fn evaluate(
        &mut self,
        now: Instant,
        groups: &BTreeMap<IpNet, BTreeSet<String>>,
        incumbents: &BTreeMap<IpNet, String>,
        observed: &Observed,
    ) -> BTreeMap<IpNet, String> {
        self.groups.retain(|p, _| groups.contains_key(p));
        for (prefix, ids) in groups {
            let g = self.groups.entry(*prefix).or_default();
            g.retain(|id, _| ids.contains(id));
            for id in ids {
                let m = g.entry(id.clone()).or_default();
                m.seen = observed.get(&(*prefix, id.clone())).copied().unwrap_or_default();
                let ok = m.seen.healthy();
                if ok != m.healthy_since.is_some() {
                    let tunnel_dead = m.seen.tunnel == Tunnel::Dead;
                    tracing::info!(prefix = %prefix, node = %id, healthy = ok, tunnel_dead, "route group member health changed");
                }
                m.healthy_since = match (ok, m.healthy_since) {
                    (true, Some(since)) => Some(since),
                    (true, None) => Some(now),
                    (false, _) => None,
                };
            }
        }
        let hold_down = self.hold_down;
        let mut out = BTreeMap::new();
        for (prefix, g) in &self.groups {
            let priority = |m: &Member| m.seen.priority;
            // Best first: highest priority, then lowest id (BTreeMap order).
            let mut ranked: Vec<(&String, &Member)> = g.iter().collect();
            ranked.sort_by_key(|(_, m)| std::cmp::Reverse(priority(m)));
            let current = incumbents.get(prefix).and_then(|p| g.get_key_value(p));
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
            out.insert(*prefix, next.clone());
        }
        self.primaries = out.clone();
        out
    }

    /// The groups as of the last evaluation.
    pub fn status(&self) -> Vec<GroupStatus> {
        self.groups
            .iter()
            .map(|(prefix, g)| GroupStatus {
                prefix: *prefix,
                primary: self.primaries.get(prefix).cloned(),
                members: g
                    .iter()
                    .map(|(id, m)| MemberStatus {
                        node: id.clone(),
                        priority: m.seen.priority,
                        healthy: m.healthy_since.is_some(),
                        checked: m.seen.checked,
                        tunnel_dead: m.seen.tunnel == Tunnel::Dead,
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

    /// One server: its observer feeding the election, the primaries it elects in force.
    struct Lab {
        observer: Observer,
        election: Election,
        groups: BTreeMap<IpNet, BTreeSet<String>>,
        primaries: BTreeMap<IpNet, String>,
    }

    impl Lab {
        fn new() -> Lab {
            Lab {
                observer: Observer::new(KEEPALIVE),
                election: Election::new(HOLD),
                groups: BTreeMap::new(),
                primaries: BTreeMap::new(),
            }
        }

        fn set_groups(&mut self, groups: &BTreeMap<IpNet, BTreeSet<String>>) {
            self.groups = groups.clone();
            self.observer.set_groups(groups);
        }

        fn stream(&mut self, node: &str, open: bool) {
            self.observer.stream(node, open);
        }

        fn report(&mut self, node: &str, prefix: IpNet, report: Report) {
            self.observer.report(node, prefix, report);
        }

        fn tunnel(&mut self, reporter: &str, member: &str, sample: Sample, now: Instant) {
            self.observer.tunnel(reporter, member, sample, now);
        }

        fn evaluate(&mut self, now: Instant) -> BTreeMap<IpNet, String> {
            let seen = merge([self.observer.observe(now)]);
            self.primaries = self.election.evaluate(now, &self.groups, &self.primaries, &seen);
            self.primaries.clone()
        }

        fn status(&self) -> Vec<GroupStatus> {
            self.election.status()
        }
    }

    /// A group of `members` with their report streams open.
    fn group(members: &[&str]) -> Lab {
        let mut e = Lab::new();
        let ids = members.iter().map(|s| s.to_string()).collect();
        e.set_groups(&[(net(), ids)].into());
        for m in members {
            e.stream(m, true);
        }
        e
    }

    fn say(e: &mut Lab, node: &str, healthy: bool, priority: u32, at: Instant) {
        e.report(node, net(), Report::new(healthy, priority, TICK, at));
    }

    fn primary(e: &mut Lab, now: Instant) -> String {
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
        let mut fresh = Lab::new();
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
        let step = |e: &mut Lab, now, a_rx, b_rx| {
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

    #[test]
    fn members_streaming_to_different_servers_are_one_group() {
        let t = Instant::now();
        let ids: BTreeSet<String> = ["a".to_string(), "b".to_string()].into();
        let groups = [(net(), ids)].into();
        let mut servers = [Observer::new(KEEPALIVE), Observer::new(KEEPALIVE)];
        for s in &mut servers {
            s.set_groups(&groups);
        }
        servers[0].stream("a", true);
        servers[0].report("a", net(), Report::new(true, 200, TICK, t));
        servers[1].stream("b", true);
        servers[1].report("b", net(), Report::new(true, 100, TICK, t));
        let mut e = Election::new(HOLD);
        let mut elect = |servers: &mut [Observer; 2], now, incumbents: &BTreeMap<IpNet, String>| {
            let seen = merge(servers.iter_mut().map(|s| s.observe(now)));
            e.evaluate(now, &groups, incumbents, &seen)
        };
        let primaries = elect(&mut servers, t, &BTreeMap::new());
        assert_eq!(primaries[&net()], "a");
        // a's stream ends on its server: b, whose stream is on the other, takes over.
        servers[0].stream("a", false);
        let primaries = elect(&mut servers, t + TICK, &primaries);
        assert_eq!(primaries[&net()], "b");
        // a reconnects to the other server: back after the hold-down only.
        servers[1].stream("a", true);
        servers[1].report("a", net(), Report::new(true, 200, TICK, t + TICK * 2));
        servers[1].report("b", net(), Report::new(true, 100, TICK, t + TICK * 2));
        assert_eq!(elect(&mut servers, t + TICK * 2, &primaries)[&net()], "b");
        let later = t + TICK * 2 + HOLD;
        servers[1].report("a", net(), Report::new(true, 200, TICK, later));
        servers[1].report("b", net(), Report::new(true, 100, TICK, later));
        assert_eq!(elect(&mut servers, later, &primaries)[&net()], "a");
    }

    #[test]
    fn a_new_elector_keeps_the_primary_in_force() {
        let t = Instant::now();
        let mut old = group(&["a", "b"]);
        say(&mut old, "a", true, 200, t);
        say(&mut old, "b", true, 100, t);
        let in_force = [(net(), "b".to_string())].into();
        // The server that elected b is gone; another one, with a's better priority
        // observed since just now, does not move the prefix before the hold-down.
        let mut new = Election::new(HOLD);
        let seen = merge([old.observer.observe(t)]);
        assert_eq!(new.evaluate(t, &old.groups, &in_force, &seen)[&net()], "b");
        let seen = merge([old.observer.observe(t + TICK)]);
        assert_eq!(new.evaluate(t + TICK, &old.groups, &in_force, &seen)[&net()], "b");
    }

    #[test]
    fn one_server_whose_reporters_receive_from_a_member_outweighs_another_whose_do_not() {
        let key = (net(), "a".to_string());
        let seen = |stream, tunnel| Observation { stream, healthy: stream, checked: false, priority: 100, tunnel };
        let merged = merge([
            [(key.clone(), seen(true, Tunnel::Dead))].into(),
            [(key.clone(), seen(false, Tunnel::Alive))].into(),
        ]);
        assert!(merged[&key].healthy(), "{:?}", merged[&key]);
        let merged = merge([
            [(key.clone(), seen(true, Tunnel::Unknown))].into(),
            [(key.clone(), seen(false, Tunnel::Dead))].into(),
        ]);
        assert!(!merged[&key].healthy(), "dead by the only word: {:?}", merged[&key]);
        let merged = merge([[(key.clone(), seen(false, Tunnel::Alive))].into()]);
        assert!(!merged[&key].healthy(), "no stream anywhere: {:?}", merged[&key]);
    }
}
