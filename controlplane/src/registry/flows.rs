//! Flow records from the agents into the database, and back out for `flows`.
//!
//! Intake never waits for the database: a report's records are checked ([`Flow::from_wire`]),
//! held to the node's rate ([`crate::limits::FLOWS_PER_SEC`]) and queued; one task per server
//! writes the queue in batches ([`Registry::run_flow_writer`]) and prunes by age and count.
//! What is refused (over the rate, the queue full, or invalid) is counted per node in the
//! database, so `flows` shows it whichever server the node reported to.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::mpsc;
use wirefence_proto::v1;

use super::{lock, Registry};
use crate::flows::{FarEnds, Flow, Retention, Verdict};
use crate::store::{FlowQuery, Refused};
use crate::Error;

/// Records queued for the database, at most.
const QUEUE: usize = 50_000;
/// Records written in one transaction, at most.
const BATCH: usize = 2_000;
/// How often the writer prunes.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// `flows` without a limit.
pub const DEFAULT_LIMIT: u32 = 1_000;
pub const MAX_LIMIT: u32 = 100_000;

/// The intake of one server.
pub struct FlowIntake {
    queue: mpsc::Sender<(String, Flow)>,
    /// Taken by the writer for each batch (and by [`Registry::flush_flows`]).
    pending: tokio::sync::Mutex<mpsc::Receiver<(String, Flow)>>,
    /// Refused records not yet added to the database's counts.
    refused: Mutex<HashMap<String, Refused>>,
    rates: super::throttle::Rates,
    retention: Retention,
    /// Rule hits not yet written ([`super::usage`]).
    pub(super) usage: Mutex<HashMap<String, crate::store::Hits>>,
    /// When each node's last rule hits were taken.
    pub(super) usage_reports: Mutex<HashMap<String, std::time::Instant>>,
}

impl FlowIntake {
    pub fn new(per_sec: u32, burst: u32, retention: Retention) -> FlowIntake {
        let (queue, pending) = mpsc::channel(QUEUE);
        FlowIntake {
            queue,
            pending: tokio::sync::Mutex::new(pending),
            refused: Mutex::default(),
            rates: super::throttle::Rates::new(per_sec, burst),
            retention,
            usage: Mutex::default(),
            usage_reports: Mutex::default(),
        }
    }
}

/// A request's window start (Unix ms): as given, or [`crate::flows::DEFAULT_WINDOW_MS`]
/// before now when 0.
pub(super) fn window_start(since_unix_ms: i64) -> i64 {
    match since_unix_ms {
        0 => now_ms().saturating_sub(crate::flows::DEFAULT_WINDOW_MS),
        s => s,
    }
}

pub(super) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Registry {
    /// How long and how many flow records are kept.
    pub fn with_flow_retention(mut self, retention: Retention) -> Registry {
        self.flows.retention = retention;
        self
    }

    /// Takes the records `node` reported: checked against what the node is, held to its
    /// rate, queued for the database.
    pub(super) fn take_flows(&self, node: &str, records: Vec<v1::FlowRecord>) {
        let Some(me) = self.current().node(node).cloned() else { return };
        let received = now_ms();
        let mut refused = Refused::default();
        let mut valid = Vec::with_capacity(records.len());
        for r in &records {
            match Flow::from_wire(r, &me, received) {
                Ok(f) => valid.push(f),
                Err(e) => {
                    tracing::debug!(node, error = %e, "flow record refused");
                    refused.invalid += 1;
                }
            }
        }
        let allowed = self.flows.rates.take(node, valid.len());
        refused.over_rate += (valid.len() - allowed) as u64;
        for f in valid.into_iter().take(allowed) {
            if self.flows.queue.try_send((node.to_owned(), f)).is_err() {
                refused.over_rate += 1;
            }
        }
        self.metrics.flow_records("over_rate", refused.over_rate);
        self.metrics.flow_records("invalid", refused.invalid);
        if refused != Refused::default() {
            self.keep_refused(vec![(node.to_owned(), refused)]);
        }
    }

    /// Writes the queued records in batches (and the rule hits) until shutdown; prunes every
    /// minute.
    pub async fn run_flow_writer(&self) {
        let mut shutdown = self.shutdown_signal();
        let mut last_prune = tokio::time::Instant::now();
        let mut failing = false;
        loop {
            let wrote = tokio::select! {
                w = self.write_flows(Some(Duration::from_secs(1))) => w,
                _ = super::stopped(&mut shutdown) => break,
            };
            let pruned = if last_prune.elapsed() >= PRUNE_EVERY {
                last_prune = tokio::time::Instant::now();
                self.prune_flows().await.map(|_| ())
            } else {
                Ok(())
            };
            match wrote.and(pruned) {
                Ok(()) => failing = false,
                // Logged once per outage: the queue goes on filling, and over its bound
                // records are counted as refused.
                Err(e) if !failing => {
                    tracing::warn!(error = %e, "writing flow records or rule usage failed");
                    failing = true;
                }
                Err(_) => {}
            }
        }
        // What arrived before the shutdown.
        let _ = self.write_flows(None).await;
    }

    /// Writes what is queued now, waiting up to `wait` for a first record; then the
    /// refused counts and the rule hits.
    async fn write_flows(&self, wait: Option<Duration>) -> Result<(), Error> {
        let mut pending = self.flows.pending.lock().await;
        let mut batch = Vec::new();
        if let Some(wait) = wait {
            if let Ok(Some(first)) = tokio::time::timeout(wait, pending.recv()).await {
                batch.push(first);
            }
        }
        while batch.len() < BATCH {
            match pending.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let mut refused: Vec<(String, Refused)> = lock(&self.flows.refused).drain().collect();
        let _turn = self.status_turn().await;
        if !batch.is_empty() {
            if let Err(e) = self.store.insert_flows(&batch).await {
                self.metrics.flow_records("failed", batch.len() as u64);
                self.keep_refused(refused);
                return Err(e.into());
            }
            self.metrics.flow_records("stored", batch.len() as u64);
        }
        while let Some((node, counts)) = refused.pop() {
            if let Err(e) = self.store.add_refused(&node, &counts).await {
                refused.push((node, counts));
                self.keep_refused(refused);
                return Err(e.into());
            }
        }
        self.write_rule_usage().await
    }

    /// Puts refused counts that were not written back for the next write.
    fn keep_refused(&self, counts: Vec<(String, Refused)>) {
        let mut all = lock(&self.flows.refused);
        for (node, r) in counts {
            let c = all.entry(node).or_default();
            c.over_rate += r.over_rate;
            c.invalid += r.invalid;
        }
    }

    async fn prune_flows(&self) -> Result<u64, Error> {
        let Retention { max_age, max_records } = self.flows.retention;
        let before = now_ms().saturating_sub(i64::try_from(max_age.as_millis()).unwrap_or(i64::MAX));
        let _turn = self.status_turn().await;
        let gone = self.store.prune_flows(before, max_records).await?;
        self.store.prune_rule_usage(before).await?;
        if gone > 0 {
            tracing::debug!(gone, "flow records pruned");
        }
        Ok(gone)
    }

    /// Writes every record queued so far, and prunes (tests: the writer's pace made
    /// deterministic).
    #[doc(hidden)]
    pub async fn flush_flows(&self) -> Result<(), Error> {
        loop {
            self.write_flows(None).await?;
            if self.flows.queue.capacity() == self.flows.queue.max_capacity() {
                break;
            }
        }
        self.prune_flows().await.map(|_| ())
    }

    /// The stored records `req` asks for, each with who should have seen its other end.
    pub async fn list_flows(&self, req: v1::ListFlowsRequest) -> Result<v1::ListFlowsReply, Error> {
        let verdict = match req.verdict {
            0 => None,
            v => Some(Verdict::from_code(v.into()).ok_or(Error::FlowVerdict(v))?),
        };
        if !crate::flows::rule_id_ok(&req.rule_id) {
            return Err(Error::FlowRuleId(req.rule_id));
        }
        let limit = match req.limit {
            0 => DEFAULT_LIMIT,
            l if l > MAX_LIMIT => return Err(Error::FlowLimit { limit: l, max: MAX_LIMIT }),
            l => l,
        };
        let rows = self.store.nodes().await?;
        let node = match req.node.as_str() {
            "" => None,
            sel => Some(super::admin::find_any(rows.clone(), sel)?.rec.id),
        };
        let names: HashMap<String, String> = rows.into_iter().map(|r| (r.rec.id.clone(), r.rec.peer_name())).collect();
        let name = |id: &str| names.get(id).cloned().unwrap_or_default();
        let q = FlowQuery {
            node,
            since_ms: req.since_unix_ms,
            verdict,
            rule_id: Some(req.rule_id).filter(|r| !r.is_empty()),
            unpaired: req.one_sided,
            limit,
        };
        let state = self.current();
        let ends = FarEnds::new(&state);
        let mut flows = Vec::new();
        for s in self.store.flows(&q).await? {
            let far = ends.of(&s.node, &s.flow);
            let pairing = match (far, s.paired) {
                (_, true) => v1::Pairing::Paired,
                (Some(_), false) => v1::Pairing::OneSided,
                (None, false) => v1::Pairing::NoneExpected,
            };
            if req.one_sided && pairing != v1::Pairing::OneSided {
                continue;
            }
            flows.push(v1::StoredFlow {
                hostname: name(&s.node),
                node_id: s.node,
                record: Some(s.flow.to_wire()),
                pairing: pairing.into(),
                peer_node_id: far.map(|n| n.id.clone()).unwrap_or_default(),
                peer_hostname: far.map(|n| n.peer_name()).unwrap_or_default(),
            });
        }
        let refused = self
            .store
            .refused()
            .await?
            .into_iter()
            .map(|(id, r)| v1::FlowsRefused {
                hostname: name(&id),
                node_id: id,
                over_rate: r.over_rate,
                invalid: r.invalid,
            })
            .collect();
        Ok(v1::ListFlowsReply { flows, refused })
    }
}
