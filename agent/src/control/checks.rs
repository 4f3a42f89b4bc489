//! Health checks of advertised routes, reported to the control plane on the Report stream
//! (`RouteHealth`): on every change and as a heartbeat every (shortest) interval, so the
//! control plane moves a route group's traffic to another member when a check fails, and
//! notices a silent agent after three intervals.
//!
//! A check is a TCP connect to a LAN address with the interval as its timeout (no ICMP:
//! the agent holds no CAP_NET_RAW). A route flips to unhealthy after `fail_after` failed
//! checks in a row and back after `recover_after` passed ones; a route without a check is
//! healthy (the control plane then watches only the agent's stream and heartbeats).

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use wirefence_proto::v1;

use super::config::{Advertised, Check, RouteCheck};

/// One route's streaks and verdict.
#[derive(Clone, Debug)]
struct State {
    route: RouteCheck,
    healthy: bool,
    /// Consecutive results against the current verdict.
    against: u32,
    due: Instant,
}

impl State {
    fn new(route: RouteCheck, now: Instant) -> State {
        // Healthy until proven otherwise: a restarted gateway does not withdraw its routes
        // before its first checks ran (`fail_after` of them will, if the LAN is down).
        State { route, healthy: true, against: 0, due: now }
    }

    /// Takes one check result; returns whether the verdict changed.
    fn record(&mut self, passed: bool) -> bool {
        if passed == self.healthy {
            self.against = 0;
            return false;
        }
        self.against += 1;
        let needed = if self.healthy { self.route.fail_after } else { self.route.recover_after };
        if self.against >= needed {
            self.healthy = passed;
            self.against = 0;
            return true;
        }
        false
    }
}

/// Runs one check, bounded by the route's interval.
async fn run_check(check: Check, timeout: Duration) -> bool {
    match check {
        Check::None => true,
        Check::Tcp(addr) => {
            matches!(tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await, Ok(Ok(_)))
        }
    }
}

fn report(states: &[State]) -> v1::AgentReport {
    let prefixes = states
        .iter()
        .map(|s| v1::PrefixHealth {
            prefix: Some(s.route.prefix.into()),
            healthy: s.healthy,
            priority: s.route.priority,
            interval_ms: u32::try_from(s.route.interval.as_millis()).unwrap_or(u32::MAX),
        })
        .collect();
    v1::AgentReport { body: Some(v1::agent_report::Body::RouteHealth(v1::RouteHealth { prefixes })) }
}

/// Checks the advertised routes and sends their health to `reports` until the queue
/// closes; a reload that changes the routes starts over with the new ones.
pub async fn run(mut advertised: watch::Receiver<Advertised>, reports: mpsc::Sender<v1::AgentReport>) {
    loop {
        let routes = advertised.borrow_and_update().checks.clone();
        if routes.is_empty() {
            if advertised.changed().await.is_err() {
                return;
            }
            continue;
        }
        let now = Instant::now();
        let mut states: Vec<State> = routes.into_iter().map(|r| State::new(r, now)).collect();
        let heartbeat = states.iter().map(|s| s.route.interval).min().unwrap_or(Duration::from_secs(1));
        let mut next_heartbeat = now;
        loop {
            let now = Instant::now();
            let due: Vec<usize> = (0..states.len()).filter(|i| states[*i].due <= now).collect();
            let results = futures::future::join_all(
                due.iter().map(|i| run_check(states[*i].route.check, states[*i].route.interval)),
            )
            .await;
            let mut changed = false;
            for (i, passed) in due.into_iter().zip(results) {
                let s = &mut states[i];
                s.due = now + s.route.interval;
                if s.record(passed) {
                    tracing::warn!(route = %s.route.prefix, healthy = s.healthy, "advertised route health changed");
                    changed = true;
                }
            }
            let now = Instant::now();
            if changed || now >= next_heartbeat {
                if reports.send(report(&states)).await.is_err() {
                    return;
                }
                next_heartbeat = now + heartbeat;
            }
            let wake = states.iter().map(|s| s.due).min().unwrap_or(now + heartbeat).min(next_heartbeat);
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                r = advertised.changed() => match r {
                    Ok(()) => break,
                    Err(_) => return,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(fail_after: u32, recover_after: u32) -> RouteCheck {
        RouteCheck {
            prefix: "10.88.1.0/24".parse().unwrap(),
            priority: 100,
            check: Check::None,
            interval: Duration::from_millis(100),
            fail_after,
            recover_after,
        }
    }

    #[test]
    fn verdicts_flip_only_after_their_streaks() {
        let mut s = State::new(route(2, 3), Instant::now());
        assert!(s.healthy);
        assert!(!s.record(false));
        assert!(!s.record(true), "a pass resets the failure streak");
        assert!(!s.record(false));
        assert!(s.record(false) && !s.healthy);
        assert!(!s.record(true) && !s.record(true));
        assert!(!s.record(false), "a failure resets the recovery streak");
        assert!(!s.record(true) && !s.record(true));
        assert!(s.record(true) && s.healthy);
    }

    #[tokio::test]
    async fn tcp_checks_pass_on_a_listener_and_fail_without_one() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        assert!(run_check(Check::Tcp(addr), Duration::from_millis(500)).await);
        drop(l);
        assert!(!run_check(Check::Tcp(addr), Duration::from_millis(500)).await);
    }

    #[tokio::test]
    async fn health_goes_out_on_change_and_as_a_heartbeat() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut r = route(1, 1);
        r.check = Check::Tcp(addr);
        let adv = Advertised { checks: vec![r], ..Default::default() };
        let (_tx, rx) = watch::channel(adv);
        let (reports, mut out) = mpsc::channel(16);
        let task = tokio::spawn(run(rx, reports));
        let healthy = |m: v1::AgentReport| match m.body {
            Some(v1::agent_report::Body::RouteHealth(h)) => h.prefixes[0].healthy,
            other => panic!("{other:?}"),
        };
        assert!(healthy(out.recv().await.unwrap()));
        assert!(healthy(out.recv().await.unwrap()), "heartbeat");
        drop(l);
        let start = std::time::Instant::now();
        while healthy(out.recv().await.unwrap()) {}
        assert!(start.elapsed() < Duration::from_millis(400), "{:?}", start.elapsed());
        task.abort();
    }
}
