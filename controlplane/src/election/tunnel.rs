//! Whether the tunnels to a route group member still carry anything, judged from what the
//! nodes that peer with it report: their WireGuard's per-peer receive counter and latest
//! handshake, sent with every agent's statistics (every 10 s).
//!
//! Every peer of a view has a persistent keepalive, so a live tunnel delivers at least one
//! packet per keepalive interval, and WireGuard renews each session's handshake within two
//! minutes while packets flow. So, for one reporter, the tunnel to a member is dead when
//! its receive counter stood still over [`SILENT_KEEPALIVES`] keepalive intervals, or its
//! handshake was not renewed within WireGuard's session lifetime ([`SESSION_EXPIRY`]: a
//! member whose handshake initiations arrive but whose sessions never complete). Both are
//! measured between the control plane's own receipt times, so the agents' clocks do not
//! matter, and only at a report: the control plane cannot see a counter move in between.
//!
//! A member's data path is dead when at least one node reports on it and every node that
//! reported recently says so: one reporter whose tunnel works outweighs any number that
//! say otherwise (a node with a broken uplink of its own, or a hostile one, cannot take a
//! working primary's prefix away from everyone).

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// Keepalive intervals without a received byte after which a tunnel counts as dead.
pub const SILENT_KEEPALIVES: u32 = 3;
/// WireGuard's REJECT_AFTER_TIME: no session outlives this after its handshake.
pub const SESSION_EXPIRY: Duration = Duration::from_secs(180);
/// A reporter's word counts this long (agents report every 10 s): one whose reports
/// stopped (its agent died, it left) says nothing about anyone.
pub const REPORT_FRESH: Duration = Duration::from_secs(35);

/// What the reporters say about a member's data path. Ordered by weight: merging takes
/// the greatest (one working tunnel outweighs dead ones, any word outweighs none).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tunnel {
    /// Nobody reported on it recently.
    Unknown,
    Dead,
    Alive,
}

/// One reporter's counters for one peer, as in a statistics report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    pub rx_bytes: u64,
    /// As reported (the reporter's clock); 0 = never. Only compared with itself.
    pub last_handshake: i64,
}

#[derive(Clone, Copy, Debug)]
struct Seen {
    sample: Sample,
    /// The report that brought `sample`.
    at: Instant,
    /// The first report with the current receive counter.
    rx_since: Instant,
    /// The first report with the current handshake time.
    handshake_since: Instant,
}

impl Seen {
    fn dead(&self, silence: Duration) -> bool {
        self.at.saturating_duration_since(self.rx_since) >= silence
            || self.at.saturating_duration_since(self.handshake_since) >= SESSION_EXPIRY
    }
}

/// Reporters' view of the members' tunnels.
#[derive(Debug)]
pub struct Tunnels {
    silence: Duration,
    /// member -> reporter -> latest word.
    seen: HashMap<String, HashMap<String, Seen>>,
}

impl Tunnels {
    /// For a mesh whose peers send a keepalive every `keepalive`.
    pub fn new(keepalive: Duration) -> Tunnels {
        Tunnels { silence: keepalive * SILENT_KEEPALIVES, seen: HashMap::new() }
    }

    /// Records what `reporter` says about its peer `member` in a report received `now`.
    pub fn record(&mut self, reporter: &str, member: &str, sample: Sample, now: Instant) {
        let by = self.seen.entry(member.to_owned()).or_default();
        match by.get_mut(reporter) {
            Some(s) => {
                if s.sample.rx_bytes != sample.rx_bytes {
                    s.rx_since = now;
                }
                if s.sample.last_handshake != sample.last_handshake {
                    s.handshake_since = now;
                }
                s.sample = sample;
                s.at = now;
            }
            None => {
                by.insert(reporter.to_owned(), Seen { sample, at: now, rx_since: now, handshake_since: now });
            }
        }
    }

    /// What the recent reports say about `member`'s tunnels as of `now` (see the
    /// module's rule).
    pub fn verdict(&self, member: &str, now: Instant) -> Tunnel {
        let Some(by) = self.seen.get(member) else { return Tunnel::Unknown };
        let recent: Vec<&Seen> = by.values().filter(|s| now.saturating_duration_since(s.at) < REPORT_FRESH).collect();
        if recent.is_empty() {
            Tunnel::Unknown
        } else if recent.iter().all(|s| s.dead(self.silence)) {
            Tunnel::Dead
        } else {
            Tunnel::Alive
        }
    }

    /// Forgets nodes that are no members any more, and words too old to count.
    pub fn retain(&mut self, members: &BTreeSet<&String>, now: Instant) {
        self.seen.retain(|m, _| members.contains(m));
        for by in self.seen.values_mut() {
            by.retain(|_, s| now.saturating_duration_since(s.at) < REPORT_FRESH);
        }
        self.seen.retain(|_, by| !by.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEEPALIVE: Duration = Duration::from_secs(1);
    const EVERY: Duration = Duration::from_secs(10);

    fn dead(tun: &Tunnels, member: &str, now: Instant) -> bool {
        tun.verdict(member, now) == Tunnel::Dead
    }

    /// Alive, or no word at all.
    fn not_dead(tun: &Tunnels, member: &str, now: Instant) -> bool {
        !dead(tun, member, now)
    }

    fn sample(rx_bytes: u64, last_handshake: i64) -> Sample {
        Sample { rx_bytes, last_handshake }
    }

    #[test]
    fn a_counter_that_stands_still_over_three_keepalives_is_a_dead_tunnel() {
        let t = Instant::now();
        let mut tun = Tunnels::new(Duration::from_secs(25));
        tun.record("x", "m", sample(100, 5), t);
        assert!(not_dead(&tun, "m", t), "a first word proves nothing either way");
        tun.record("x", "m", sample(200, 5), t + EVERY);
        assert!(not_dead(&tun, "m", t + EVERY + EVERY / 2), "between reports nothing changes");
        for i in 2..=8 {
            tun.record("x", "m", sample(200, 5), t + EVERY * i);
            assert!(not_dead(&tun, "m", t + EVERY * i), "{}s of silence is under 75s", 10 * (i - 1));
        }
        tun.record("x", "m", sample(200, 5), t + EVERY * 9);
        assert!(dead(&tun, "m", t + EVERY * 9), "80s without a byte");
        tun.record("x", "m", sample(260, 5), t + EVERY * 10);
        assert!(not_dead(&tun, "m", t + EVERY * 10), "a byte again: alive");
    }

    #[test]
    fn a_handshake_not_renewed_within_the_session_lifetime_is_a_dead_tunnel() {
        // Bytes keep arriving (the member's handshake initiations), no session completes.
        let t = Instant::now();
        let mut tun = Tunnels::new(KEEPALIVE);
        let mut now = t;
        let mut rx = 0;
        while now < t + SESSION_EXPIRY {
            tun.record("x", "m", sample(rx, 42), now);
            assert!(not_dead(&tun, "m", now));
            rx += 148;
            now += EVERY;
        }
        tun.record("x", "m", sample(rx, 42), now);
        assert!(dead(&tun, "m", now));
        tun.record("x", "m", sample(rx + 148, 43), now + EVERY);
        assert!(not_dead(&tun, "m", now + EVERY), "renewed");
    }

    #[test]
    fn one_working_tunnel_outweighs_any_number_of_dead_ones() {
        let t = Instant::now();
        let mut tun = Tunnels::new(KEEPALIVE);
        for (i, rx) in [(0, 1), (1, 2), (2, 3)] {
            let now = t + EVERY * i;
            tun.record("x", "m", sample(0, 0), now);
            tun.record("y", "m", sample(0, 0), now);
            tun.record("z", "m", sample(rx, 1), now);
        }
        assert_eq!(tun.verdict("m", t + EVERY * 2), Tunnel::Alive, "z receives from it");
        // z's reports stop (its agent died): its word expires, x and y decide.
        tun.record("x", "m", sample(0, 0), t + EVERY * 6);
        tun.record("y", "m", sample(0, 0), t + EVERY * 6);
        assert!(dead(&tun, "m", t + EVERY * 6));
        // Nobody reports any more: no evidence, not dead.
        assert_eq!(tun.verdict("m", t + EVERY * 6 + REPORT_FRESH), Tunnel::Unknown);
        assert_eq!(tun.verdict("other", t), Tunnel::Unknown, "a member nobody reported on");
    }

    #[test]
    fn retain_forgets_departed_members_and_old_words() {
        let t = Instant::now();
        let mut tun = Tunnels::new(KEEPALIVE);
        tun.record("x", "m", sample(0, 0), t);
        tun.record("x", "n", sample(0, 0), t);
        tun.record("y", "m", sample(0, 0), t + REPORT_FRESH);
        let m = "m".to_string();
        tun.retain(&[&m].into(), t + REPORT_FRESH);
        assert_eq!(tun.seen.len(), 1);
        assert_eq!(tun.seen["m"].keys().collect::<Vec<_>>(), ["y"]);
    }
}
