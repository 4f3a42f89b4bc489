//! Per-node rates. A node's credential lets it talk, not cost the control plane without
//! bound:
//!
//! - [`Rates`]: report messages (each may be a store write) go through a token bucket per
//!   node; a node above it has its report stream ended with `ResourceExhausted`.
//! - [`Coalescer`]: a re-registration that changes endpoints or routes bumps the global
//!   version and reaches every other node, so per node at most one such change is applied
//!   per interval. Changes arriving sooner are accepted and parked (the latest wins) and
//!   [`Registry::run_coalescer`] applies them when the interval is over; a flapping node
//!   costs one version per interval, not one per call.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::sync::Notify;

use super::{detached, lock, Registry};

/// Token buckets by node id.
#[derive(Debug)]
pub struct Rates {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl Rates {
    pub fn new(per_sec: u32, burst: u32) -> Rates {
        Rates { per_sec: f64::from(per_sec), burst: f64::from(burst.max(1)), buckets: Mutex::default() }
    }

    /// Takes one token of `node`'s bucket; false when it is empty.
    pub fn allow(&self, node: &str) -> bool {
        self.take(node, 1) == 1
    }

    /// Takes up to `n` tokens of `node`'s bucket; returns how many it had.
    pub fn take(&self, node: &str, n: usize) -> usize {
        let now = Instant::now();
        let mut buckets = lock(&self.buckets);
        let (tokens, at) = buckets.entry(node.to_owned()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_sec).min(self.burst);
        *at = now;
        // Whole tokens only: the bucket holds at most `burst`, so this fits.
        let granted = (tokens.floor() as usize).min(n);
        *tokens -= granted as f64;
        granted
    }
}

/// What a re-registration may change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub endpoints: Vec<SocketAddr>,
    pub routes: Vec<IpNet>,
    pub refused_routes: Vec<crate::model::RefusedRoute>,
}

/// What to do with a re-registration.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Apply it now.
    Now,
    /// Parked until the node's interval is over.
    Later,
    /// Same as the node's current record: nothing to apply (and a parked change is
    /// dropped, since this is now the latest word).
    Unchanged,
}

#[derive(Debug)]
struct Node {
    last_applied: Instant,
    pending: Option<Change>,
}

#[derive(Debug)]
pub struct Coalescer {
    interval: Duration,
    nodes: Mutex<HashMap<String, Node>>,
    wake: Notify,
}

impl Coalescer {
    pub fn new(interval: Duration) -> Coalescer {
        Coalescer { interval, nodes: Mutex::default(), wake: Notify::new() }
    }

    /// `change` is `None` when the re-registration matches the node's current record.
    pub fn offer(&self, node: &str, change: Option<Change>) -> Admit {
        let now = Instant::now();
        let mut nodes = lock(&self.nodes);
        let Some(change) = change else {
            if let Some(n) = nodes.get_mut(node) {
                n.pending = None;
            }
            return Admit::Unchanged;
        };
        match nodes.get_mut(node) {
            Some(n) if now.duration_since(n.last_applied) < self.interval => {
                n.pending = Some(change);
                drop(nodes);
                self.wake.notify_one();
                Admit::Later
            }
            _ => {
                nodes.insert(node.to_owned(), Node { last_applied: now, pending: None });
                Admit::Now
            }
        }
    }

    /// Takes the parked changes whose interval is over (counting them as applied now) and
    /// says when the next one is due.
    fn take_due(&self) -> (Vec<(String, Change)>, Option<Instant>) {
        let now = Instant::now();
        let mut due = Vec::new();
        let mut next: Option<Instant> = None;
        for (id, n) in lock(&self.nodes).iter_mut() {
            if n.pending.is_none() {
                continue;
            }
            let at = n.last_applied + self.interval;
            if at <= now {
                due.extend(n.pending.take().map(|c| (id.clone(), c)));
                n.last_applied = now;
            } else {
                next = Some(next.map_or(at, |t| t.min(at)));
            }
        }
        // Nodes idle for a whole interval need no entry (the next change applies at once).
        lock(&self.nodes).retain(|_, n| n.pending.is_some() || now.duration_since(n.last_applied) < self.interval);
        (due, next)
    }
}

impl Registry {
    /// Applies parked re-registrations when their interval is over; runs until shutdown
    /// (started by [`crate::server::serve`]).
    pub async fn run_coalescer(self: Arc<Self>) {
        let mut shutdown = self.shutdown_signal();
        loop {
            let (due, next) = self.reregistrations.take_due();
            for (node, change) in due {
                let registry = self.clone();
                let id = node.clone();
                if let Err(e) = detached(async move { registry.apply_reregistration(&id, change).await }).await {
                    tracing::info!(node = %node, error = %e, "parked re-registration not applied");
                }
            }
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.reregistrations.wake.notified() => {}
                _ = sleep => {}
                _ = super::stopped(&mut shutdown) => return,
            }
        }
    }

    /// Takes a report token of `node`.
    pub fn admit_report(&self, node: &str) -> Result<(), crate::Error> {
        if self.reports.allow(node) {
            return Ok(());
        }
        Err(crate::Error::ReportRate {
            node: node.to_owned(),
            per_sec: self.limits.reports_per_sec,
            burst: self.limits.report_burst,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(port: u16) -> Option<Change> {
        Some(Change {
            endpoints: vec![SocketAddr::from(([192, 0, 2, 1], port))],
            routes: vec![],
            refused_routes: vec![],
        })
    }

    #[test]
    fn flapping_is_parked_and_the_latest_change_wins() {
        let c = Coalescer::new(Duration::from_millis(200));
        assert_eq!(c.offer("n1", change(1)), Admit::Now);
        assert_eq!(c.offer("n2", change(1)), Admit::Now, "nodes are limited separately");
        for p in 2..10 {
            assert_eq!(c.offer("n1", change(p)), Admit::Later);
        }
        let (due, next) = c.take_due();
        assert!(due.is_empty() && next.is_some());
        std::thread::sleep(Duration::from_millis(220));
        let (due, next) = c.take_due();
        assert_eq!(due, vec![("n1".to_owned(), change(9).unwrap())]);
        assert_eq!(next, None);
        assert_eq!(c.offer("n1", change(10)), Admit::Later, "the parked apply starts a new interval");
        assert_eq!(c.offer("n1", None), Admit::Unchanged);
        std::thread::sleep(Duration::from_millis(220));
        assert!(c.take_due().0.is_empty(), "a later unchanged registration drops the parked change");
    }

    #[test]
    fn report_tokens_refill_at_the_rate() {
        let r = Rates::new(10, 3);
        assert!((0..3).all(|_| r.allow("n1")));
        assert!(!r.allow("n1"));
        assert!(r.allow("n2"));
        std::thread::sleep(Duration::from_millis(120));
        assert!(r.allow("n1"));
        assert!(!r.allow("n1"));
    }
}
