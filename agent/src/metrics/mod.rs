//! The agent's Prometheus metrics (`[metrics] listen`, default 127.0.0.1:9587), in the
//! Prometheus text format at `GET /metrics`.
//!
//! Events (reconcile passes, their duration, failed operations) are counted by the daemon
//! where they happen. Everything else is read at each scrape from where it lives, so it
//! can never drift from what `status` shows: the policy counters and conntrack entries
//! from the pinned maps (opened by path, read only, as `status` does), the peers from the
//! WireGuard device, the connection state and certificate probe from the control-plane
//! client. Nothing here changes the kernel: the reconciler stays the only writer.

mod read;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::control::ControlHealth;
use crate::model::{IfName, PublicKey};
use crate::plan::Op;
use crate::reconcile::{Applied, ReconcileError};
use crate::wg::WgBackend;

#[derive(Debug, thiserror::Error)]
#[error("metrics.listen {addr}: {source}")]
pub struct BindError {
    addr: SocketAddr,
    source: std::io::Error,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

/// What a scrape reads: the interface and its policy pins as the daemon runs them now, and
/// the names the config gives the peers.
#[derive(Clone, Debug)]
pub struct Target {
    pub ifname: IfName,
    /// `(pin root, state directory)` when a policy is enforced.
    pub policy: Option<(PathBuf, PathBuf)>,
    pub peer_names: BTreeMap<PublicKey, String>,
}

/// Every metric of the agent: the event metrics (shared handles) and the sources read at
/// each scrape.
pub struct Metrics {
    events: Events,
    /// Flow events on their way to the control plane (what it dropped, full).
    flows: Arc<crate::enforce::flows::FlowQueue>,
    backend: Arc<dyn WgBackend>,
    control: Option<Arc<ControlHealth>>,
    target: Mutex<Arc<Target>>,
    /// One scrape at a time: a scrape walks the conntrack table, and concurrent scrapers
    /// must not multiply that.
    scraping: Mutex<()>,
}

impl Metrics {
    pub fn new(
        backend: Arc<dyn WgBackend>,
        control: Option<Arc<ControlHealth>>,
        target: Target,
        flows: Arc<crate::enforce::flows::FlowQueue>,
    ) -> Metrics {
        Metrics {
            events: Events::default(),
            flows,
            backend,
            control,
            target: Mutex::new(Arc::new(target)),
            scraping: Mutex::new(()),
        }
    }

    /// The daemon's desired state changed (reload, control view): scrapes read this now.
    pub fn set_target(&self, target: Target) {
        *self.target.lock().expect("not poisoned") = Arc::new(target);
    }

    /// A reconcile pass (or a change applied at once) that took `took` ended with `result`.
    pub fn pass(&self, took: Duration, result: &Result<Applied, ReconcileError>) {
        self.events.pass(took, result);
    }

    /// The text exposition, with the states read now. Blocks (map and device reads).
    pub fn render(&self) -> String {
        let _one = self.scraping.lock().expect("not poisoned");
        let target = self.target.lock().expect("not poisoned").clone();
        let mut reg = Registry::with_prefix("wirefence_agent");
        reg.register(
            "build",
            "The agent's version and the digest of its embedded eBPF object",
            prometheus_client::metrics::info::Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION").to_owned()),
                ("ebpf_object", crate::bpf::object_id()),
            ]),
        );
        self.events.register(&mut reg);
        let errors = Family::<read::SourceLabel, prometheus_client::metrics::gauge::Gauge>::default();
        read::policy(&mut reg, &target, &errors);
        read::flow_queue(&mut reg, &self.flows);
        read::peers(&mut reg, self.backend.as_ref(), &target, &errors);
        if let Some(control) = &self.control {
            read::control(&mut reg, control);
        }
        reg.register(
            "scrape_source_failed",
            "1 when a source of this scrape could not be read (its series are missing; the log says why)",
            errors,
        );
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &reg).expect("writing to a String cannot fail");
        out
    }
}

/// What the daemon counts as it happens: reconcile passes, their duration, failed operations.
struct Events {
    reconcile_seconds: Histogram,
    passes: Family<ResultLabel, Counter>,
    op_failures: Family<OpLabel, Counter>,
}

impl Default for Events {
    fn default() -> Events {
        Events {
            // 1 ms .. ~65 s.
            reconcile_seconds: Histogram::new(exponential_buckets(0.001, 4.0, 9)),
            passes: Family::default(),
            op_failures: Family::default(),
        }
    }
}

impl Events {
    fn pass(&self, took: Duration, result: &Result<Applied, ReconcileError>) {
        self.reconcile_seconds.observe(took.as_secs_f64());
        let result = match result {
            Ok(_) => "ok",
            Err(ReconcileError::Apply { failures, .. }) => {
                for f in failures {
                    self.failed(&f.op);
                }
                "failed"
            }
            // Observing the kernel failed: no operation ran.
            Err(_) => "failed",
        };
        self.passes.get_or_create(&ResultLabel { result }).inc();
    }

    fn failed(&self, op: &Op) {
        self.op_failures.get_or_create(&OpLabel { op: op.kind() }).inc();
    }

    /// Registers handles sharing these values.
    fn register(&self, reg: &mut Registry) {
        reg.register(
            "reconcile_duration_seconds",
            "Duration of reconcile passes (observe, plan, apply) and of changes applied at once",
            self.reconcile_seconds.clone(),
        );
        reg.register("reconcile_passes", "Reconcile passes by result", self.passes.clone());
        reg.register(
            "reconcile_operation_failures",
            "Operations that failed in a pass, by kind (the next pass retries them)",
            self.op_failures.clone(),
        );
    }
}

/// Binds the metrics listener at start: a taken or foreign address is a start error.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr).await.map_err(|source| BindError { addr, source })
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) -> std::io::Result<()> {
    use axum::http::header;
    use axum::response::IntoResponse;

    let handler = move || {
        let metrics = metrics.clone();
        async move {
            match tokio::task::spawn_blocking(move || metrics.render()).await {
                Ok(text) => {
                    ([(header::CONTENT_TYPE, prometheus_client::encoding::prometheus_text::CONTENT_TYPE)], text)
                        .into_response()
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics scrape failed");
                    (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
                }
            }
        }
    };
    let app = axum::Router::new().route("/metrics", axum::routing::get(handler));
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::{ApplyError, OpFailure};

    fn exposition(events: &Events) -> String {
        let mut reg = Registry::with_prefix("wirefence_agent");
        events.register(&mut reg);
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &reg).unwrap();
        out
    }

    #[test]
    fn flow_events_the_full_queue_dropped_are_counted() {
        let flows = crate::enforce::flows::FlowQueue::default();
        let ended = crate::enforce::sweep::EndedFlow {
            first: Default::default(),
            rule: 0,
            first_seen_ns: 1,
            packets: 1,
            bytes: 1,
        };
        flows.ended(vec![ended; crate::enforce::flows::FLOW_QUEUE + 7]);
        let mut reg = Registry::with_prefix("wirefence_agent");
        read::flow_queue(&mut reg, &flows);
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &reg).unwrap();
        assert!(out.contains("wirefence_agent_flow_events_dropped_total 7\n"), "{out}");
    }

    #[test]
    fn passes_are_timed_and_failed_operations_counted_by_kind() {
        let events = Events::default();
        events.pass(Duration::from_millis(3), &Ok(Applied::default()));
        let fail = |op: Op| OpFailure { op, error: Arc::new(ApplyError::Injected("test".into())) };
        let failed = Err(ReconcileError::Apply {
            total: 3,
            failures: vec![fail(Op::SetMtu(1400)), fail(Op::SetUp), fail(Op::SetUp)],
        });
        events.pass(Duration::from_millis(40), &failed);
        let text = exposition(&events);
        for line in [
            "wirefence_agent_reconcile_duration_seconds_count 2",
            "wirefence_agent_reconcile_duration_seconds_bucket{le=\"0.004\"} 1",
            "wirefence_agent_reconcile_passes_total{result=\"ok\"} 1",
            "wirefence_agent_reconcile_passes_total{result=\"failed\"} 1",
            "wirefence_agent_reconcile_operation_failures_total{op=\"set_up\"} 2",
            "wirefence_agent_reconcile_operation_failures_total{op=\"set_mtu\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
    }
}
