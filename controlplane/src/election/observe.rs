//! What one server sees of the route group members: the report streams open on it, the
//! health reports that came over them, and what the nodes reporting to it say about the
//! members' tunnels. Each server turns that into [`Observation`]s and shares them (through
//! the database); [`merge`] combines every server's into the one view the elector decides
//! on, so a member's stream and its peers' words count wherever they arrived.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use ipnet::IpNet;

use super::tunnel::{Sample, Tunnel, Tunnels};
use super::{Report, DEFAULT_PRIORITY, MISSED_HEARTBEATS};

/// One server's (or, merged, all servers') word on one member of one group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observation {
    /// A report stream of the member is open.
    pub stream: bool,
    /// With `stream`: its checks pass with heartbeats on time, or it runs none.
    pub healthy: bool,
    /// With `stream`: it runs a check for the prefix.
    pub checked: bool,
    pub priority: u32,
    /// What its peers' WireGuard counters say about its data path.
    pub tunnel: Tunnel,
}

impl Default for Observation {
    /// Nothing seen: no stream, no word on the tunnel.
    fn default() -> Observation {
        Observation {
            stream: false,
            healthy: false,
            checked: false,
            priority: DEFAULT_PRIORITY,
            tunnel: Tunnel::Unknown,
        }
    }
}

impl Observation {
    /// Whether the member may be primary.
    pub fn healthy(&self) -> bool {
        self.stream && self.healthy && self.tunnel != Tunnel::Dead
    }
}

/// Members' observations keyed by group prefix and node id.
pub type Observed = BTreeMap<(IpNet, String), Observation>;

/// Combines servers' observations: a member streams if it streams to any server (health
/// and priority come from the servers it streams to); its tunnels are alive if any
/// server's reporters say so (one working tunnel outweighs any number of dead ones, as
/// within one server), dead if some say dead and none alive.
pub fn merge(servers: impl IntoIterator<Item = Observed>) -> Observed {
    let mut out = Observed::new();
    for observed in servers {
        for (key, o) in observed {
            let m = out.entry(key).or_default();
            if o.stream {
                if m.stream {
                    m.healthy |= o.healthy;
                    m.checked |= o.checked;
                    m.priority = m.priority.max(o.priority);
                } else {
                    (m.healthy, m.checked, m.priority) = (o.healthy, o.checked, o.priority);
                }
                m.stream = true;
            }
            m.tunnel = m.tunnel.max(o.tunnel);
        }
    }
    out
}

/// One server's inputs about the members.
#[derive(Debug)]
pub struct Observer {
    groups: BTreeMap<IpNet, BTreeSet<String>>,
    reports: HashMap<(IpNet, String), Report>,
    /// Open report streams per node.
    streams: HashMap<String, usize>,
    tunnels: Tunnels,
}

impl Observer {
    /// For a mesh whose peers send a keepalive every `keepalive`.
    pub fn new(keepalive: std::time::Duration) -> Observer {
        Observer {
            groups: BTreeMap::new(),
            reports: HashMap::new(),
            streams: HashMap::new(),
            tunnels: Tunnels::new(keepalive),
        }
    }

    /// Makes the groups those of `groups`; what concerned departed members is forgotten.
    pub fn set_groups(&mut self, groups: &BTreeMap<IpNet, BTreeSet<String>>) {
        if self.groups != *groups {
            self.groups = groups.clone();
            self.reports.retain(|(p, id), _| groups.get(p).is_some_and(|ids| ids.contains(id)));
        }
    }

    /// Records a health report of `node` for `prefix`; ignored unless the node is a member
    /// of that group (an agent cannot affect a prefix it does not route).
    pub fn report(&mut self, node: &str, prefix: IpNet, report: Report) {
        if self.groups.get(&prefix).is_some_and(|ids| ids.contains(node)) {
            self.reports.insert((prefix, node.to_owned()), report);
        }
    }

    /// Records what `reporter`'s WireGuard says about its peer `member` (a statistics
    /// report received `now`); ignored unless `member` is in a group.
    pub fn tunnel(&mut self, reporter: &str, member: &str, sample: Sample, now: Instant) {
        if self.groups.values().any(|ids| ids.contains(member)) {
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

    /// What this server can say about each member as of `now`: members it has neither a
    /// stream of nor a word on are left out.
    pub fn observe(&mut self, now: Instant) -> Observed {
        self.tunnels.retain(&self.groups.values().flatten().collect(), now);
        let mut out = Observed::new();
        for (prefix, ids) in &self.groups {
            for id in ids {
                let stream = self.streams.contains_key(id);
                let tunnel = self.tunnels.verdict(id, now);
                if !stream && tunnel == Tunnel::Unknown {
                    continue;
                }
                let report = self.reports.get(&(*prefix, id.clone()));
                let healthy = stream
                    && report.is_none_or(|r| {
                        r.healthy && now.saturating_duration_since(r.at) < r.interval * MISSED_HEARTBEATS
                    });
                let o = Observation {
                    stream,
                    healthy,
                    checked: stream && report.is_some(),
                    priority: report.map_or(DEFAULT_PRIORITY, |r| r.priority),
                    tunnel,
                };
                out.insert((*prefix, id.clone()), o);
            }
        }
        out
    }
}
