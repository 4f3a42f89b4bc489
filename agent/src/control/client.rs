//! The control-plane client: registers, watches, hands each accepted view to the daemon
//! (which applies it through the reconciler) and reports the outcome. It only produces
//! desired state; it never touches the kernel.

use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use tonic::metadata::MetadataValue;
use tonic::{Request, Status};
use wirefence_proto::v1;
use wirefence_proto::v1::agent_service_client::AgentServiceClient;

use super::config::ControlConfig;
use super::connect::{Connected, Connector};
use super::guard::{self, GuardConfig, GuardError, Surroundings};
use super::persist::{ControlFiles, ControlStatus, Credential};
use super::tracker::{Applied, Offer, Tracker};
use super::view::ControlView;
use crate::enforce::flows::{FlowEvent, FlowQueue};
use crate::model::{IfName, PublicKey};
use crate::reconcile::ReconcileError;
use crate::wg::WgBackend;

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A session registered for at least this long was healthy: the next one starts the
/// backoff over (a replica that died is replaced at once, but a server that accepts and
/// drops every session still gets an agent's growing backoff).
const HEALTHY_SESSION: Duration = Duration::from_secs(1);
/// The retry after a refusal only an operator can lift (see [`SessionError::needs_operator`]):
/// slow, so a refused node does not hammer the control plane, yet it comes back by itself
/// once the operator acted.
pub(crate) const OPERATOR_RETRY: Duration = Duration::from_secs(300);
const STATS_EVERY: Duration = Duration::from_secs(10);
const REPORT_DRAIN: Duration = Duration::from_secs(2);

/// A view for the daemon to apply; `done` carries the outcome (an error leaves the
/// previous state in place).
pub struct ApplyRequest {
    pub version: u64,
    pub view: ControlView,
    pub done: oneshot::Sender<Result<(), ViewRejected>>,
}

/// Why the daemon did not apply a view. It first puts the previous state back; `restored`
/// says whether that worked. Rendered as text only in the report to the control plane.
#[derive(Debug, thiserror::Error)]
#[error("{cause}; {}", match restored {
    Ok(()) => "the previous state is restored".to_owned(),
    Err(e) => format!("restoring the previous state failed too ({e}), retrying"),
})]
pub struct ViewRejected {
    pub cause: ViewError,
    pub restored: Result<(), ReconcileError>,
}

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// The view does not make a valid desired state with the local config.
    #[error(transparent)]
    Invalid(#[from] crate::desired::DesiredError),
    #[error(transparent)]
    Apply(#[from] ReconcileError),
}

#[derive(Debug, thiserror::Error)]
pub(super) enum SessionError {
    #[error(transparent)]
    Connect(#[from] super::connect::ConnectError),
    #[error("{:?}: {}", .0.code(), .0.message())]
    Rpc(#[from] Status),
    #[error("control.enrollment_key_file is needed to enroll this node (it has no credential yet)")]
    NoEnrollmentKey,
    #[error(
        "the control plane does not accept this node's credential ({0}); the enrollment key is not used again: \
         to enroll anew, remove {1} and give a fresh enrollment key"
    )]
    CredentialRefused(String, std::path::PathBuf),
    #[error("the control plane's challenge: {0}")]
    Challenge(#[from] wirefence_proto::possession::PossessionError),
    #[error("control.enrollment_key_file {path}: {source}")]
    EnrollmentKey { path: std::path::PathBuf, source: std::io::Error },
    #[error("control.enrollment_key_file: {0}")]
    EnrollmentKeyUnsafe(#[from] crate::perms::UnsafePath),
    #[error(transparent)]
    Persist(#[from] super::persist::PersistError),
    #[error("the stream skipped from version {applied} to a delta on {base}; resuming")]
    OutOfOrder { applied: u64, base: u64 },
    #[error("the daemon stopped")]
    DaemonGone,
    #[error("the overlay ranges the control plane announced: {0}")]
    AnnouncedOverlay(wirefence_proto::WireError),
    #[error("the local guard: {0}")]
    Guard(#[from] GuardError),
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
    #[error("the key rotation: {0}")]
    KeySwitch(String),
    #[error("the control plane's update in parts: {0}; resuming")]
    Parts(#[from] super::parts::PartsError),
}

impl SessionError {
    /// Whether retrying soon cannot help: the control plane refused this node for what only
    /// an operator can change (a removed node, an identity it may not change, an enrollment
    /// key refused, input it rejects), or the local setup lacks something or disagrees with
    /// the control plane about TLS.
    fn needs_operator(&self) -> bool {
        match self {
            SessionError::Rpc(s) => {
                matches!(
                    s.code(),
                    tonic::Code::PermissionDenied | tonic::Code::InvalidArgument | tonic::Code::AlreadyExists
                )
            }
            SessionError::Connect(super::connect::ConnectError::Mismatch { .. })
            | SessionError::NoEnrollmentKey
            | SessionError::CredentialRefused(..)
            | SessionError::EnrollmentKey { .. }
            | SessionError::EnrollmentKeyUnsafe(_) => true,
            _ => false,
        }
    }
}

pub struct ControlClient {
    pub config: ControlConfig,
    /// What registrations advertise: `config`'s at start, then each reload's.
    pub advertised: tokio::sync::watch::Receiver<super::Advertised>,
    pub files: ControlFiles,
    pub own: PublicKey,
    /// Answers the enrollment challenge (proof of possession); never leaves the process.
    pub private_key: crate::model::PrivateKey,
    /// The private key file, and the next key beside it during a rotation.
    pub key_file: std::path::PathBuf,
    /// The daemon switches the key (file and kernel) when a rotation asks it to.
    pub key_switch: mpsc::Sender<super::KeySwitch>,
    /// The daemon made a next key (`rotate-key`): rotate to it now.
    pub rotate: std::sync::Arc<tokio::sync::Notify>,
    pub tracker: Tracker,
    pub apply: mpsc::Sender<ApplyRequest>,
    /// Shared with the certificate probe, which runs beside the sessions.
    pub connector: std::sync::Arc<Connector>,
    /// What the metrics show of the connection (written here, read there).
    pub health: std::sync::Arc<super::ControlHealth>,
    /// The tunnel device: its own networks are not the host's networks the guard protects.
    pub tunnel: IfName,
    /// Reads what reports carry besides versions (read only).
    pub telemetry: Telemetry,
}

/// Sources of the periodic reports: the device's peer statistics and the policy programs'
/// flow events and rule counters.
pub struct Telemetry {
    pub peer_stats: Box<dyn Fn() -> Vec<v1::PeerStat> + Send + Sync>,
    /// New allowed flows and denies from the policy programs, sent with the statistics.
    pub flows: std::sync::Arc<FlowQueue>,
    /// What the rule counters counted since the last statistics.
    pub rule_hits: super::hits::RuleHits,
}

impl ControlClient {
    /// Runs until the daemon goes away: sessions separated by exponential backoff with jitter.
    pub async fn run(self) {
        let probe = tokio::spawn(super::health::probe_loop(self.connector.clone(), self.health.clone()));
        self.sessions().await;
        probe.abort();
    }

    async fn sessions(mut self) {
        let mut backoff = BACKOFF_MIN;
        // Known before the first connection (a restart while the control plane is down).
        let node_id = match self.files.credential() {
            Ok(c) => c.filter(|c| c.public_key == self.own).map(|c| c.node_id),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the saved control-plane credential");
                None
            }
        };
        let mut status = ControlStatus { applied_version: self.tracker.version(), node_id, ..Default::default() };
        self.health.set_connection(false, status.applied_version);
        loop {
            let started = tokio::time::Instant::now();
            let result = self.session(&mut status).await;
            let operator = matches!(&result, Err(e) if e.needs_operator());
            let registered = status.connected_to.is_some();
            let message = match result {
                Err(SessionError::DaemonGone) => return,
                Ok(()) => "the control plane closed the stream".to_string(),
                Err(e) => e.to_string(),
            };
            status.connected_to = None;
            status.action_needed = operator.then(|| message.clone());
            status.last_error = Some(message);
            self.save_status(&status);
            if operator {
                let every = OPERATOR_RETRY.as_secs();
                tracing::error!(error = ?status.last_error, retry_secs = every, "the control plane refused this node: operator action needed");
                tokio::time::sleep(jitter(OPERATOR_RETRY)).await;
                continue;
            }
            tracing::warn!(error = ?status.last_error, "control plane session ended");
            // A session that registered and ran a while was healthy: start the backoff over.
            if (registered && started.elapsed() >= HEALTHY_SESSION) || started.elapsed() > BACKOFF_MAX {
                backoff = BACKOFF_MIN;
            }
            tokio::time::sleep(jitter(backoff)).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    pub(super) fn save_status(&self, status: &ControlStatus) {
        self.health.set_connection(status.connected_to.is_some(), status.applied_version);
        if let Err(e) = self.files.set_status(status) {
            tracing::warn!(error = %e, "cannot write the control status file");
        }
    }

    async fn session(&mut self, status: &mut ControlStatus) -> Result<(), SessionError> {
        let (channel, connected) = self.connector.connect().await?;
        let mut client = AgentServiceClient::new(channel);
        let (mut cred, refused_routes) = self.register(&mut client).await?;
        status.registered_key = Some(self.own);
        self.rotate_if_due(&mut client, &mut cred, status).await?;
        record_connection(status, &connected);
        status.node_id = Some(cred.node_id.clone());
        status.last_error = None;
        status.action_needed = None;
        status.refused_routes = refused_routes;
        self.save_status(status);
        tracing::info!(addr = %connected.addr, node = %cred.node_id, version = self.tracker.version(), "connected to the control plane");

        let (report_tx, report_rx) = mpsc::channel::<v1::AgentReport>(64);
        let mut report_client = client.clone();
        let report_req = authed(&cred, tokio_stream::wrappers::ReceiverStream::new(report_rx));
        let report_task = tokio::spawn(async move { report_client.report(report_req).await });
        // Route health rides this session's Report stream; it stops with the session so
        // its sender does not hold the stream open.
        let checks = tokio::spawn(super::checks::run(self.advertised.clone(), report_tx.clone()));
        let result = self.watch(&mut client, &mut cred, &report_tx, status).await;
        checks.abort();
        let _ = checks.await;
        // Closing the queue ends the Report stream once what is queued (often the outcome
        // of the update that ended the session) has gone out; a dead connection gets a moment.
        drop(report_tx);
        if tokio::time::timeout(REPORT_DRAIN, report_task).await.is_err() {
            tracing::debug!("reports not flushed before the session ended");
        }
        result
    }

    /// Enrolls with the key (answering the control plane's challenge with the private key)
    /// when there is no credential for this public key, otherwise re-registers with the
    /// credential (so the control plane learns new endpoints). Once a credential is saved
    /// the enrollment key is never read again. Rotates the credential when asked to.
    /// Returns the credential and the advertised routes the control plane refused, as
    /// "route: reason" (the registration stands with the others).
    pub(super) async fn register(
        &self,
        client: &mut AgentServiceClient<tonic::transport::Channel>,
    ) -> Result<(Credential, Vec<String>), SessionError> {
        let req = self.register_request();
        let saved = self.files.credential()?.filter(|s| s.public_key == self.own);
        let reply = match &saved {
            Some(cred) => match client.register(authed(cred, req.clone())).await {
                Ok(r) => r.into_inner(),
                // Unknown to this control plane (say its database was recreated). Enrolling
                // again is an admin's decision, not something a refusal may trigger.
                Err(e) if e.code() == tonic::Code::Unauthenticated => {
                    return Err(SessionError::CredentialRefused(e.message().to_owned(), self.files.credential_path()));
                }
                Err(e) => return Err(e.into()),
            },
            None => self.enroll(client, req.clone()).await?,
        };
        let rotate = reply.rotate_credential;
        let refused_routes = super::view::refused_reasons(&reply.refused_routes);
        for reason in &refused_routes {
            // The operator's to act on: a grant (`keys create --route`), or the other node.
            tracing::warn!(reason = %wirefence_proto::Escaped(reason), "the control plane refused an advertised route");
        }
        let announced = reply
            .overlay
            .iter()
            .map(ipnet::IpNet::try_from)
            .collect::<Result<Vec<_>, _>>()
            .map_err(SessionError::AnnouncedOverlay)?;
        let pinned = saved.as_ref().map(|s| s.overlay.clone()).unwrap_or_default();
        // Pinned once: a control plane cannot widen the overlay later. Checked first, and
        // only needed without `control.overlay`.
        let (overlay, refused) = match (pinned.is_empty(), &self.config.guard.overlay) {
            (false, _) => {
                if !announced.is_empty() && announced != pinned {
                    tracing::warn!(
                        ?announced,
                        ?pinned,
                        "the control plane announces other overlay ranges; keeping the pinned ones"
                    );
                }
                (pinned, None)
            }
            (true, Some(_)) => (Vec::new(), None),
            (true, None) => match self.surroundings(&[]).and_then(|s| GuardConfig::check_announced(&announced, &s)) {
                Ok(()) => (announced, None),
                Err(e) => (Vec::new(), Some(e)),
            },
        };
        let cred = Credential { node_id: reply.node_id, credential: reply.credential, public_key: self.own, overlay };
        if saved.as_ref() != Some(&cred) {
            self.files.set_credential(&cred)?;
            tracing::info!(node = %cred.node_id, overlay = ?cred.overlay, "registered with the control plane");
        }
        // The credential is kept (no second enrollment), but no view is taken on such ranges.
        if let Some(e) = refused {
            return Err(e.into());
        }
        if rotate {
            return Ok((self.rotate(client, cred, req).await?, refused_routes));
        }
        Ok((cred, refused_routes))
    }

    fn register_request(&self) -> v1::RegisterRequest {
        let advertised = self.advertised.borrow().clone();
        v1::RegisterRequest {
            public_key: self.own.0.to_vec(),
            hostname: self.config.hostname.clone(),
            endpoints: advertised.endpoints.iter().map(|e| (*e).into()).collect(),
            routes: advertised.routes.iter().map(|r| (*r).into()).collect(),
            ..Default::default()
        }
    }

    async fn enroll(
        &self,
        client: &mut AgentServiceClient<tonic::transport::Channel>,
        mut req: v1::RegisterRequest,
    ) -> Result<v1::RegisterResponse, SessionError> {
        let path = self.config.enrollment_key_file.as_ref().ok_or(SessionError::NoEnrollmentKey)?;
        crate::perms::check(path, crate::perms::Private::Secret)?;
        let key = std::fs::read_to_string(path)
            .map_err(|source| SessionError::EnrollmentKey { path: path.clone(), source })?;
        req.enrollment_key = key.trim().to_owned();
        let challenge = client.enroll_challenge(v1::EnrollChallengeRequest {}).await?.into_inner();
        wirefence_proto::possession::answer(&mut req, &self.private_key.as_wg().0, &challenge)?;
        Ok(client.register(Request::new(req)).await?.into_inner())
    }

    /// Gets a new credential, saves it (atomically) and registers with it, which ends the
    /// old one at the control plane. A crash anywhere in between leaves a working one: the
    /// old is valid until the new is used, and the new is saved before it is used.
    async fn rotate(
        &self,
        client: &mut AgentServiceClient<tonic::transport::Channel>,
        old: Credential,
        req: v1::RegisterRequest,
    ) -> Result<Credential, SessionError> {
        let reply = client.rotate_credential(authed(&old, v1::RotateCredentialRequest {})).await?.into_inner();
        let new = Credential { credential: reply.credential, ..old };
        self.files.set_credential(&new)?;
        client.register(authed(&new, req)).await?;
        tracing::info!(node = %new.node_id, "credential rotated");
        Ok(new)
    }

    /// What the guard judges a view against, read now.
    fn surroundings(&self, pinned: &[ipnet::IpNet]) -> Result<Surroundings, GuardError> {
        Ok(Surroundings {
            overlay: self.config.guard.overlay(pinned).to_vec(),
            control_plane: self.connector.addresses(),
            host_networks: guard::host_networks(&self.tunnel)?,
        })
    }

    async fn watch(
        &mut self,
        client: &mut AgentServiceClient<tonic::transport::Channel>,
        cred: &mut Credential,
        report: &mpsc::Sender<v1::AgentReport>,
        status: &mut ControlStatus,
    ) -> Result<(), SessionError> {
        let resume = v1::WatchRequest {
            resume_from: self.tracker.version(),
            incarnation: self.tracker.incarnation().to_owned(),
            accepts_parts: true,
        };
        let req = authed(cred, resume);
        let mut stream = client.watch(req).await?.into_inner();
        let rotate = self.rotate.clone();
        let mut advertised_open = true;
        let mut stats = tokio::time::interval(STATS_EVERY);
        let mut first = true;
        let mut parts = super::parts::Parts::default();
        loop {
            let update = tokio::select! {
                u = stream.next() => match u {
                    None => return Ok(()),
                    Some(u) => match parts.push(u?)? {
                        Some(whole) => whole,
                        None => continue,
                    },
                },
                changed = self.advertised.changed(), if advertised_open => {
                    if changed.is_err() {
                        advertised_open = false; // nothing can change it any more
                        continue;
                    }
                    // A reload changed what this node advertises: registering again on this
                    // connection tells the control plane, whose next view brings the result.
                    let (_, refused) = self.register(client).await?;
                    tracing::info!(refused = refused.len(), "registered again with the reloaded endpoints and routes");
                    status.refused_routes = refused;
                    self.save_status(status);
                    continue;
                }
                _ = rotate.notified() => {
                    self.rotate_if_due(client, cred, status).await?;
                    continue;
                }
                _ = stats.tick() => {
                    // A scheduled rotation comes due while connected.
                    self.rotate_if_due(client, cred, status).await?;
                    let stats = v1::PeerStats { peers: (self.telemetry.peer_stats)() };
                    let _ = report.try_send(v1::AgentReport { body: Some(v1::agent_report::Body::Stats(stats)) });
                    if let Some(probe) = self.health.certificates() {
                        let expiry = v1::agent_report::Body::CertExpiry(probe.report());
                        let _ = report.try_send(v1::AgentReport { body: Some(expiry) });
                        if record_probe(status, &probe) {
                            self.save_status(status);
                        }
                    }
                    if let Some(hits) = self.telemetry.rule_hits.next() {
                        let body = Some(v1::agent_report::Body::RuleHits(hits));
                        if let Err(e) = report.try_send(v1::AgentReport { body }) {
                            if let Some(v1::agent_report::Body::RuleHits(hits)) = e.into_inner().body {
                                self.telemetry.rule_hits.unsent(&hits);
                            }
                        }
                    }
                    // Each event once, in messages well under the control plane's size bound.
                    let events = self.telemetry.flows.drain();
                    for chunk in events.chunks(FLOW_RECORDS_PER_MESSAGE) {
                        let records = chunk.iter().map(flow_record).collect();
                        let flows = v1::agent_report::Body::Flows(v1::FlowRecords { records });
                        let _ = report.try_send(v1::AgentReport { body: Some(flows) });
                    }
                    continue;
                }
            };
            let mut offer = self.tracker.offer_on_stream(&update, std::mem::take(&mut first));
            // The one place a view is judged (and its mesh prefixes narrowed) before it is
            // applied or saved.
            if let Ok(Offer::Apply { version, view } | Offer::Reset { version, view, .. }) = &mut offer {
                if let Err(e) = self.surroundings(&cred.overlay).and_then(|s| self.config.guard.admit(view, &s)) {
                    let reason = format!("refused by the local guard: {e}");
                    tracing::warn!(version, %reason, "control update refused; keeping the previous state");
                    status.last_error = Some(reason.clone());
                    self.save_status(status);
                    let body = v1::agent_report::Body::Failed(v1::ApplyFailed { version: *version, reason });
                    let _ = report.send(v1::AgentReport { body: Some(body) }).await;
                    continue;
                }
            }
            let offer = match offer {
                Ok(Offer::Reset { version, applied, view }) => {
                    tracing::warn!(
                        version,
                        applied,
                        incarnation = %update.incarnation,
                        "the control plane's versions went back or its database was recreated; taking its snapshot"
                    );
                    Ok(Offer::Apply { version, view })
                }
                other => other,
            };
            let body = match offer {
                Ok(Offer::Stale { version, applied }) => {
                    tracing::debug!(version, applied, "ignoring a stale or duplicate update");
                    continue;
                }
                Ok(Offer::OutOfOrder { base, applied, .. }) => return Err(SessionError::OutOfOrder { applied, base }),
                Ok(Offer::Reset { .. }) => unreachable!("turned into Apply above"),
                Ok(Offer::Apply { version, view }) => match self.apply(version, view.clone()).await? {
                    Ok(()) => {
                        let applied = Applied { version, incarnation: update.incarnation.clone(), view: view.clone() };
                        self.files.set_view(&applied)?;
                        self.tracker.reset(applied);
                        status.applied_version = version;
                        status.last_error = None;
                        status.refused_routes = view.refused_routes.iter().map(|(_, reason)| reason.clone()).collect();
                        tracing::info!(
                            version,
                            peers = view.peers.len(),
                            rules = view.policy.rules().len(),
                            "control update applied"
                        );
                        v1::agent_report::Body::Applied(v1::Applied { version })
                    }
                    Err(rejected) => {
                        let reason = rejected.to_string();
                        tracing::warn!(version, %reason, "control update failed to apply; keeping the previous state");
                        status.last_error = Some(reason.clone());
                        v1::agent_report::Body::Failed(v1::ApplyFailed { version, reason })
                    }
                },
                Err(e) => {
                    let reason = e.to_string();
                    tracing::warn!(version = update.version, %reason, "control update rejected; keeping the previous state");
                    status.last_error = Some(reason.clone());
                    v1::agent_report::Body::Failed(v1::ApplyFailed { version: update.version, reason })
                }
            };
            self.save_status(status);
            // Reports are best effort: the next session's Watch tells the control plane
            // the applied version anyway.
            let _ = report.send(v1::AgentReport { body: Some(body) }).await;
        }
    }

    async fn apply(&self, version: u64, view: ControlView) -> Result<Result<(), ViewRejected>, SessionError> {
        let (done, result) = oneshot::channel();
        self.apply.send(ApplyRequest { version, view, done }).await.map_err(|_| SessionError::DaemonGone)?;
        result.await.map_err(|_| SessionError::DaemonGone)
    }
}

/// The device's peers as report statistics; empty when the device cannot be read.
pub fn device_peer_stats(backend: &dyn WgBackend, ifname: &IfName) -> Vec<v1::PeerStat> {
    let Ok(Some(dev)) = backend.read(ifname) else { return Vec::new() };
    dev.peers
        .iter()
        .map(|p| v1::PeerStat {
            public_key: p.config.public_key.0.to_vec(),
            last_handshake_unix: p
                .stats
                .last_handshake_time
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs() as i64),
            rx_bytes: p.stats.rx_bytes,
            tx_bytes: p.stats.tx_bytes,
            endpoint: p.config.endpoint.map(Into::into),
            // Only the control plane names peers, for its admins.
            name: String::new(),
        })
        .collect()
}

fn record_connection(status: &mut ControlStatus, c: &Connected) {
    status.connected_to = Some(c.addr.to_string());
    match c.addr {
        std::net::SocketAddr::V4(_) => status.cert_expiry_ipv4 = c.cert_not_after,
        std::net::SocketAddr::V6(_) => status.cert_expiry_ipv6 = c.cert_not_after,
    }
}

/// `status` shows the probe's expiry for every family it verified (the earliest among that
/// family's addresses), not only the one the session happens to use. True if it changed.
fn record_probe(status: &mut ControlStatus, probe: &super::health::CertProbe) -> bool {
    let mut changed = false;
    for (shown, found) in
        [(&mut status.cert_expiry_ipv4, probe.ipv4.earliest), (&mut status.cert_expiry_ipv6, probe.ipv6.earliest)]
    {
        if found.is_some() && *shown != found {
            *shown = found;
            changed = true;
        }
    }
    changed
}

/// Why `leave` could not tell the control plane.
#[derive(Debug, thiserror::Error)]
pub enum LeaveError {
    #[error(transparent)]
    Connect(#[from] super::connect::ConnectError),
    #[error("the control plane refused: {:?}: {}", .0.code(), .0.message())]
    Rpc(#[from] Status),
}

/// Tells the control plane the node with `cred` leaves the mesh; returns the version
/// without it, or `None` when an admin had removed the node already.
pub async fn leave(connector: &super::connect::Connector, cred: &Credential) -> Result<Option<u64>, LeaveError> {
    let (channel, _) = connector.connect().await?;
    match AgentServiceClient::new(channel).leave(authed(cred, v1::LeaveRequest {})).await {
        Ok(reply) => Ok(Some(reply.into_inner().version)),
        // The control plane's word for a removed node's credential (`Error::NodeRemoved`).
        Err(s) if s.code() == tonic::Code::PermissionDenied && s.message().ends_with("has been removed") => Ok(None),
        Err(s) => Err(s.into()),
    }
}

/// A request carrying the node credential.
pub(super) fn authed<T>(cred: &Credential, body: T) -> Request<T> {
    let mut req = Request::new(body);
    match MetadataValue::try_from(format!("Bearer {}", cred.credential)) {
        Ok(v) => {
            req.metadata_mut().insert("authorization", v);
        }
        // Not ASCII: the server will refuse the call as unauthenticated.
        Err(_) => tracing::warn!(node = %cred.node_id, "the saved credential is not valid metadata"),
    }
    req
}

/// Between half and all of `d` ("equal jitter"), so restarted agents do not reconnect in step.
fn jitter(d: Duration) -> Duration {
    d / 2 + d.mul_f64(rand::random::<f64>() / 2.0)
}

/// Flow records per Report message: about 60 bytes each, far below the control plane's
/// 1 MiB message bound.
const FLOW_RECORDS_PER_MESSAGE: usize = 1000;

/// A flow event as a flow record.
pub fn flow_record(e: &FlowEvent) -> v1::FlowRecord {
    v1::FlowRecord {
        time_unix_ms: e.at_ms,
        src: wirefence_proto::ip_to_bytes(e.src),
        dst: wirefence_proto::ip_to_bytes(e.dst),
        protocol: e.proto.into(),
        src_port: e.sport.into(),
        dst_port: e.dport.into(),
        verdict: if e.allowed { v1::Verdict::Allow } else { v1::Verdict::Deny }.into(),
        direction: if e.ingress { v1::Direction::Ingress } else { v1::Direction::Egress }.into(),
        rule_id: e.rule.clone(),
        packets: e.packets,
        bytes: e.bytes,
        ended: e.ended(),
    }
}
