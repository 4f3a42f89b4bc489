//! Prometheus metrics of the control plane (`serve --metrics-listen`), in the Prometheus
//! text format at `GET /metrics`. Events (enrollments, pushes) are counted where they
//! happen; states (nodes, streams, versions, the certificate's expiry) are read from the
//! registry at each scrape, so they can never drift from what the admin API shows.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use tokio::net::TcpListener;

use crate::registry::{detached, Registry};
use crate::server::ServerTls;
use crate::Error;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FamilyLabel {
    family: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FirstLabel {
    first: &'static str,
}

/// What a Watch stream started with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchStart {
    /// A whole view: a new agent, or one whose version is not in the history.
    Snapshot,
    /// A delta from the version the agent resumed from.
    Delta,
    /// Nothing: the agent already had the current version.
    Current,
}

/// Every metric of the control plane, registered once.
pub struct Metrics {
    prom: prometheus_client::registry::Registry,
    nodes: Family<StateLabel, Gauge>,
    connected_agents: Gauge,
    open_streams: Gauge,
    state_version: Gauge,
    policy_version: Gauge,
    enrollments: Family<OutcomeLabel, Counter>,
    watch_starts: Family<FirstLabel, Counter>,
    flow_records: Family<OutcomeLabel, Counter>,
    push_seconds: Histogram,
    certificate_expiry: Gauge,
    reported_expiry: Family<FamilyLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut prom = prometheus_client::registry::Registry::with_prefix("wirefence_control");
        // The metrics are handles: registered clones and the fields share their values.
        let m = Metrics {
            prom: prometheus_client::registry::Registry::default(),
            nodes: Family::default(),
            connected_agents: Gauge::default(),
            open_streams: Gauge::default(),
            state_version: Gauge::default(),
            policy_version: Gauge::default(),
            enrollments: Family::default(),
            watch_starts: Family::default(),
            flow_records: Family::default(),
            // 100 us .. ~6.5 s.
            push_seconds: Histogram::new(exponential_buckets(0.0001, 4.0, 9)),
            certificate_expiry: Gauge::default(),
            reported_expiry: Family::default(),
        };
        prom.register(
            "nodes",
            "Nodes by state: connected (a Watch stream open), disconnected, removed (kept)",
            m.nodes.clone(),
        );
        prom.register("connected_agents", "Nodes with at least one open Watch stream", m.connected_agents.clone());
        prom.register("open_streams", "Open Watch streams", m.open_streams.clone());
        prom.register("state_version", "Version of the current global state", m.state_version.clone());
        prom.register(
            "policy_version",
            "Version at which the current policy was applied (0: none)",
            m.policy_version.clone(),
        );
        prom.register(
            "enrollments",
            "Enrollment attempts (Register with an enrollment key) by outcome",
            m.enrollments.clone(),
        );
        prom.register(
            "watch_starts",
            "Watch streams started, by what they started with: snapshot (a whole view), delta (a \
             resume from a version in the history), current (nothing to send)",
            m.watch_starts.clone(),
        );
        prom.register(
            "flow_records",
            "Flow records agents reported, by outcome: stored (written to the database by this \
             server), failed (the database refused the write), over_rate (over the node's rate, or \
             the queue to the database full), invalid",
            m.flow_records.clone(),
        );
        prom.register(
            "push_seconds",
            "From a change's commit to its delta queued on an affected node's stream",
            m.push_seconds.clone(),
        );
        prom.register(
            "certificate_expiry_timestamp_seconds",
            "Expiry (Unix time) of the agent listener's certificate being served (0: plaintext)",
            m.certificate_expiry.clone(),
        );
        prom.register(
            "agent_reported_certificate_expiry_timestamp_seconds",
            "Earliest expiry (Unix time) of the control plane's certificate any live agent reports, \
             per address family of the addresses the agents probed",
            m.reported_expiry.clone(),
        );
        Metrics { prom, ..m }
    }
}

impl Metrics {
    /// An enrollment ended: `Ok`, or refused with `code`.
    pub fn enrollment(&self, result: Result<(), tonic::Code>) {
        let outcome = match result {
            Ok(()) => "enrolled",
            // Revoked, used up or expired key; a name the key may not take.
            Err(tonic::Code::PermissionDenied) => "refused",
            // Unknown key, failed proof of possession.
            Err(tonic::Code::Unauthenticated) => "unauthenticated",
            Err(tonic::Code::ResourceExhausted) => "rate_limited",
            Err(tonic::Code::InvalidArgument) => "invalid",
            Err(tonic::Code::AlreadyExists) => "conflict",
            Err(_) => "error",
        };
        self.enrollments.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// A Watch stream started with `first`.
    pub fn watch_started(&self, first: WatchStart) {
        let first = match first {
            WatchStart::Snapshot => "snapshot",
            WatchStart::Delta => "delta",
            WatchStart::Current => "current",
        };
        self.watch_starts.get_or_create(&FirstLabel { first }).inc();
    }

    /// `n` flow records reached `outcome`: "stored", "failed", "over_rate" or "invalid".
    pub fn flow_records(&self, outcome: &'static str, n: u64) {
        if n > 0 {
            self.flow_records.get_or_create(&OutcomeLabel { outcome }).inc_by(n);
        }
    }

    /// A delta of a change committed `since` ago was queued on a stream.
    pub fn pushed(&self, since: Duration) {
        self.push_seconds.observe(since.as_secs_f64());
    }

    /// The text exposition, with the states read now.
    async fn render(&self, registry: &Registry, tls: Option<&ServerTls>) -> Result<String, Error> {
        let counts = registry.node_counts().await?;
        self.nodes.clear();
        for (state, n) in
            [("connected", counts.connected), ("disconnected", counts.disconnected), ("removed", counts.removed)]
        {
            self.nodes.get_or_create(&StateLabel { state }).set(n as i64);
        }
        self.connected_agents.set(counts.connected as i64);
        self.open_streams.set(counts.streams as i64);
        self.state_version.set(registry.current().version as i64);
        self.policy_version.set(counts.policy_version as i64);
        self.certificate_expiry.set(tls.and_then(ServerTls::not_after).unwrap_or(0));
        // Only families some agent reported: a missing series is "unknown", not an expiry.
        self.reported_expiry.clear();
        let reported = counts.reported_cert_expiry;
        for (family, expiry) in [("ipv4", reported.ipv4), ("ipv6", reported.ipv6)] {
            if let Some(t) = expiry {
                self.reported_expiry.get_or_create(&FamilyLabel { family }).set(t);
            }
        }
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.prom)
            .expect("writing to a String cannot fail");
        Ok(out)
    }
}

/// Serves `GET /metrics` on `listener` until `stopped` resolves.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    tls: Option<Arc<ServerTls>>,
    stopped: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;

    let handler = move || {
        let (registry, tls) = (registry.clone(), tls.clone());
        async move {
            let rendered = detached(async move { registry.metrics.render(&registry, tls.as_deref()).await }).await;
            match rendered {
                Ok(text) => {
                    ([(header::CONTENT_TYPE, prometheus_client::encoding::prometheus_text::CONTENT_TYPE)], text)
                        .into_response()
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics scrape failed");
                    (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
                }
            }
        }
    };
    let app = axum::Router::new().route("/metrics", axum::routing::get(handler));
    axum::serve(listener, app).with_graceful_shutdown(stopped).await
}

/// Binds the metrics listener (`serve --metrics-listen`).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source })
}
