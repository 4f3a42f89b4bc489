//! The agent-facing service: Register, Watch, Report.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use wirefence_proto::v1::{
    AgentReport, EnrollChallengeReply, EnrollChallengeRequest, LeaveReply, LeaveRequest, RegisterRequest,
    RegisterResponse, ReportReply, RotateCredentialReply, RotateCredentialRequest, RotateKeyReply, RotateKeyRequest,
    WatchRequest,
};

use crate::grpc::agent_service_server::AgentService;
use crate::metrics::WatchStart;
use crate::registry::observed::Connection;
use crate::registry::{detached, Registry};
use crate::state::GlobalState;
use crate::view::{delta, next_view, node_view, View};
use crate::wire::{Body, Delta, Update, PART_PEERS};
use crate::Error;

/// Updates buffered per stream; a slow agent makes its stream wait, and the changes in
/// between are coalesced into one delta. Two: a full mesh comes in parts of 128 peers,
/// and with 8 every slow stream held 8 of them (10,000 nodes peaked at 1.85 GiB, 0.8 with
/// 2); HTTP/2's window keeps the connection busy meanwhile.
const STREAM_BUFFER: usize = 2;

#[derive(Clone)]
pub struct AgentSvc {
    pub registry: Arc<Registry>,
}

fn snapshot(registry: &Registry, state: &GlobalState, view: &View) -> Update {
    stamped(registry, state, Body::Snapshot(view.snapshot()))
}

/// Every update names the database incarnation its version counts in.
fn stamped(registry: &Registry, state: &GlobalState, body: Body) -> Update {
    Update { version: state.version, body: Some(body), incarnation: registry.incarnation_shared(), continued: false }
}

/// What a new stream starts with: a snapshot (fresh, unknown or future version, or a
/// version of another incarnation of the database), nothing (already current) or one delta
/// from a version still in the history.
pub fn first_update(
    registry: &Registry,
    state: &GlobalState,
    node: &str,
    view: &View,
    resume: &WatchRequest,
) -> Option<Update> {
    let resume_from = resume.resume_from;
    // The agent's version counts in another history (restored or recreated database):
    // comparing numbers would skip changes or send a delta on the wrong base.
    if resume.incarnation != registry.incarnation() {
        return Some(snapshot(registry, state, view));
    }
    if resume_from == state.version {
        return None;
    }
    if resume_from == 0 || resume_from > state.version {
        return Some(snapshot(registry, state, view));
    }
    match registry.at_version(resume_from).and_then(|old| node_view(&old, node)) {
        Some(old) => {
            let d = delta(&old, view, resume_from).unwrap_or_else(|| Delta::empty(resume_from, &view.peers.table));
            Some(stamped(registry, state, Body::Delta(d)))
        }
        None => Some(snapshot(registry, state, view)),
    }
}

struct Stream {
    registry: Arc<Registry>,
    node: String,
    states: watch::Receiver<Arc<GlobalState>>,
    view: View,
    sent: u64,
    /// The agent assembles updates sent in parts ([`crate::wire::PART_PEERS`] peers each).
    parts: bool,
    tx: mpsc::Sender<Result<Update, Status>>,
    /// Counts the stream as a connection while it runs.
    _connection: Connection,
}

impl Stream {
    async fn run(mut self, first: Option<Update>) {
        let mut shutdown = self.registry.shutdown_signal();
        if let Some(u) = first {
            let version = u.version;
            if !self.send(u).await {
                return;
            }
            self.registry.sent(&self.node, version);
        }
        loop {
            tokio::select! {
                _ = self.tx.closed() => break,
                _ = crate::registry::stopped(&mut shutdown) => {
                    let _ = self.tx.send(Err(Error::ShuttingDown.into())).await;
                    break;
                }
                changed = self.states.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let state = self.states.borrow_and_update().clone();
                    if !self.next(&state).await {
                        break;
                    }
                }
            }
        }
        tracing::debug!(node = %self.node, "watch stream ended");
    }

    /// Queues `u`, in parts when the agent takes them; false = stream over.
    async fn send(&self, u: Update) -> bool {
        let max = if self.parts { PART_PEERS } else { usize::MAX };
        for p in u.into_parts(max) {
            if self.tx.send(Ok(p)).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Sends the delta for `state`, if this node's view changed; false = stream over.
    async fn next(&mut self, state: &GlobalState) -> bool {
        let Some(new) = next_view(state, &self.node, &self.view) else {
            tracing::info!(node = %self.node, "ending the stream of a removed node");
            let _ = self.tx.send(Err(Error::NodeRemoved(self.node.clone()).into())).await;
            return false;
        };
        if let Some(d) = delta(&self.view, &new, self.sent) {
            let update = stamped(&self.registry, state, Body::Delta(d));
            if !self.send(update).await {
                return false;
            }
            self.registry.metrics.pushed(state.created.elapsed());
            self.registry.sent(&self.node, state.version);
            self.sent = state.version;
        }
        self.view = new;
        true
    }
}

impl AgentSvc {
    /// Bounds a unary part of a call by the request timeout (the blocking work itself
    /// finishes in the background; its caller stops waiting).
    async fn in_time<T>(&self, what: &'static str, work: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
        tokio::time::timeout(self.registry.limits().request_timeout, work)
            .await
            .map_err(|_| Error::RequestTimeout(what))?
    }
}

#[tonic::async_trait]
impl AgentService for AgentSvc {
    async fn enroll_challenge(
        &self,
        request: Request<EnrollChallengeRequest>,
    ) -> Result<Response<EnrollChallengeReply>, Status> {
        let c = self.registry.challenge(request.remote_addr().map(|a| a.ip()))?;
        Ok(Response::new(EnrollChallengeReply {
            challenge_id: c.id,
            server_public_key: c.server_public_key.to_vec(),
            expires_in_secs: crate::enroll::challenge::TTL.as_secs() as u32,
        }))
    }

    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<RegisterResponse>, Status> {
        let registry = self.registry.clone();
        let (meta, _, req) = request.into_parts();
        let enrollment = !req.enrollment_key.is_empty();
        let work = detached(async move { registry.register(&meta, &req).await });
        let result = self.in_time("Register", work).await.map_err(Status::from);
        if enrollment {
            self.registry.metrics.enrollment(result.as_ref().map(|_| ()).map_err(|s| s.code()));
        }
        Ok(Response::new(result?))
    }

    async fn rotate_credential(
        &self,
        request: Request<RotateCredentialRequest>,
    ) -> Result<Response<RotateCredentialReply>, Status> {
        let registry = self.registry.clone();
        let meta = request.into_parts().0;
        let credential = detached(async move { registry.rotate_credential(&meta).await }).await?;
        Ok(Response::new(RotateCredentialReply { credential }))
    }

    async fn rotate_key(&self, request: Request<RotateKeyRequest>) -> Result<Response<RotateKeyReply>, Status> {
        let registry = self.registry.clone();
        let (meta, _, req) = request.into_parts();
        detached(async move { registry.rotate_key(&meta, &req).await }).await?;
        Ok(Response::new(RotateKeyReply {}))
    }

    async fn leave(&self, request: Request<LeaveRequest>) -> Result<Response<LeaveReply>, Status> {
        let registry = self.registry.clone();
        let meta = request.into_parts().0;
        let version = detached(async move { registry.leave(&meta).await }).await?;
        Ok(Response::new(LeaveReply { version }))
    }

    type WatchStream = ReceiverStream<Result<Update, Status>>;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let registry = self.registry.clone();
        let resume = request.get_ref().clone();
        let (resume_from, incarnation) = (resume.resume_from, resume.incarnation.clone());
        let meta = request.into_parts().0;
        // Authentication reads memory (and on a miss, the database's latest): a bad
        // credential is refused before any task or stream.
        let node = registry.authenticate(&meta).await?;
        let id = node.clone();
        // A version of another incarnation says nothing about what the node runs here.
        let ours = incarnation == registry.incarnation();
        let work = detached(async move { registry.connect(&id, if ours { resume_from } else { 0 }).await });
        let connection = self.in_time("Watch", work).await?;
        let mut states = self.registry.subscribe();
        let state = states.borrow_and_update().clone();
        let view = node_view(&state, &node).ok_or_else(|| Error::NodeRemoved(node.clone()))?;
        let first = first_update(&self.registry, &state, &node, &view, &resume);
        let start = match first.as_ref().and_then(|u| u.body.as_ref()) {
            None => WatchStart::Current,
            Some(Body::Delta(_)) => WatchStart::Delta,
            Some(_) => WatchStart::Snapshot,
        };
        self.registry.metrics.watch_started(start);
        tracing::debug!(node = %node, resume_from, version = state.version, ?start, "watch");
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let stream = Stream {
            registry: self.registry.clone(),
            node,
            states,
            view,
            sent: state.version,
            parts: resume.accepts_parts,
            tx,
            _connection: connection,
        };
        tokio::spawn(stream.run(first));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn report(&self, request: Request<Streaming<AgentReport>>) -> Result<Response<ReportReply>, Status> {
        let node = self.registry.authenticate(request.metadata()).await?;
        let mut reports = request.into_inner();
        // Once this stream ends (however it ends), the node counts as failed in its route groups.
        let _stream = self.registry.report_stream(&node);
        let mut shutdown = self.registry.shutdown_signal();
        // Removal ends an idle report stream too, not only at its next message.
        let mut states = self.registry.subscribe();
        loop {
            tokio::select! {
                msg = reports.message() => match msg? {
                    Some(r) => {
                        self.registry.admit_report(&node)?;
                        if let Some(d) = self.registry.report(&node, r)? {
                            let (registry, node) = (self.registry.clone(), node.clone());
                            detached(async move { registry.record(&node, &d).await }).await?;
                        }
                    }
                    None => break,
                },
                _ = states.changed() => {
                    if !self.registry.is_live(&node) {
                        return Err(Error::NodeRemoved(node).into());
                    }
                }
                _ = crate::registry::stopped(&mut shutdown) => return Err(Error::ShuttingDown.into()),
            }
        }
        Ok(Response::new(ReportReply {}))
    }
}
