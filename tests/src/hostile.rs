//! A hostile control plane: a real `wirefence.v1` gRPC server (tonic, plaintext) in the
//! lab's switch namespace that enrolls any agent and streams whatever updates the test
//! hands it, recording the agent's reports. It exists to show what the agent refuses.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};
use wirefence_proto::v1;
use wirefence_proto::v1::agent_service_server::{AgentService, AgentServiceServer};

use crate::control::{CP_PORT, CP_V4};
use crate::{in_netns, wait_until, Host, Lab};

pub use v1::agent_report::Body as Report;

struct Service {
    register: v1::RegisterResponse,
    updates: watch::Receiver<Vec<v1::Update>>,
    reports: Arc<Mutex<Vec<Report>>>,
}

#[tonic::async_trait]
impl AgentService for Service {
    async fn register(&self, _: Request<v1::RegisterRequest>) -> Result<Response<v1::RegisterResponse>, Status> {
        Ok(Response::new(self.register.clone()))
    }

    /// A challenge the agent can answer (the hostile server does not check the answer).
    async fn enroll_challenge(
        &self,
        _: Request<v1::EnrollChallengeRequest>,
    ) -> Result<Response<v1::EnrollChallengeReply>, Status> {
        Ok(Response::new(v1::EnrollChallengeReply {
            challenge_id: "hostile".into(),
            server_public_key: wirefence_proto::possession::public_key(&[7; 32]).to_vec(),
            expires_in_secs: 60,
        }))
    }

    async fn rotate_credential(
        &self,
        _: Request<v1::RotateCredentialRequest>,
    ) -> Result<Response<v1::RotateCredentialReply>, Status> {
        Err(Status::unimplemented("the hostile control plane never asks for a rotation"))
    }

    async fn rotate_key(&self, _: Request<v1::RotateKeyRequest>) -> Result<Response<v1::RotateKeyReply>, Status> {
        Err(Status::unimplemented("the hostile control plane never takes a new key"))
    }

    async fn leave(&self, _: Request<v1::LeaveRequest>) -> Result<Response<v1::LeaveReply>, Status> {
        Err(Status::unimplemented("the hostile control plane keeps every node"))
    }

    type WatchStream = ReceiverStream<Result<v1::Update, Status>>;

    /// Every pushed update above `resume_from`, in push order, then each new one.
    async fn watch(&self, r: Request<v1::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let mut sent = r.get_ref().resume_from;
        let mut updates = self.updates.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let pending: Vec<v1::Update> =
                    updates.borrow_and_update().iter().filter(|u| u.version > sent).cloned().collect();
                for u in pending {
                    sent = u.version;
                    if tx.send(Ok(u)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    changed = updates.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn report(&self, r: Request<Streaming<v1::AgentReport>>) -> Result<Response<v1::ReportReply>, Status> {
        let mut s = r.into_inner();
        while let Some(m) = s.message().await? {
            if let Some(b) = m.body {
                self.reports.lock().unwrap().push(b);
            }
        }
        Ok(Response::new(v1::ReportReply {}))
    }
}

pub struct HostileControlPlane {
    updates: watch::Sender<Vec<v1::Update>>,
    reports: Arc<Mutex<Vec<Report>>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HostileControlPlane {
    /// Serves on the control plane's lab address (`CP_V4:CP_PORT` on the switch's bridge),
    /// answering every Register with `register`.
    pub fn start(lab: &Lab, register: v1::RegisterResponse) -> HostileControlPlane {
        lab.switch.ip(&["addr", "add", &format!("{CP_V4}/24"), "dev", "br0"]);
        let addr: SocketAddr = format!("{CP_V4}:{CP_PORT}").parse().unwrap();
        let listener =
            in_netns(&lab.switch, move || std::net::TcpListener::bind(addr).expect("bind the hostile server"));
        listener.set_nonblocking(true).unwrap();
        let (updates, rx) = watch::channel(Vec::new());
        let reports = Arc::new(Mutex::new(Vec::new()));
        let service = Service { register, updates: rx, reports: reports.clone() };
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                tonic::transport::Server::builder()
                    .add_service(AgentServiceServer::new(service))
                    .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                        let _ = stopped.await;
                    })
                    .await
                    .expect("hostile server");
            });
        });
        HostileControlPlane { updates, reports, stop: Some(stop), thread: Some(thread) }
    }

    /// Streams `u` to the agent (and to any later Watch resuming below its version).
    pub fn push(&self, u: v1::Update) {
        self.updates.send_modify(|list| list.push(u));
    }

    /// Forgets what was pushed: a later Watch gets nothing until the next push.
    pub fn forget(&self) {
        self.updates.send_modify(Vec::clear);
    }

    pub fn reports(&self) -> Vec<Report> {
        self.reports.lock().unwrap().clone()
    }

    /// The agent's outcome for `version`: `Ok` if it reported it applied, `Err(reason)`
    /// if it reported it failed. Panics after `timeout` without either.
    pub fn outcome(&self, version: u64, timeout: Duration) -> Result<(), String> {
        let mut found = None;
        wait_until(&format!("the agent's report on version {version}"), timeout, || {
            found = self.reports().into_iter().find_map(|r| match r {
                Report::Applied(a) if a.version == version => Some(Ok(())),
                Report::Failed(f) if f.version == version => Some(Err(f.reason)),
                _ => None,
            });
            found.is_some()
        });
        found.unwrap()
    }
}

impl Drop for HostileControlPlane {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Host {
    /// A control-mode config pointing at the hostile server (plaintext), with `guard` lines
    /// added to `[control]`.
    pub fn write_hostile_config(&self, guard: &str) {
        let enroll = self.dir.join("enroll.key");
        std::fs::write(&enroll, "hostile-enrollment\n").unwrap();
        // The agent refuses a key file others may read.
        std::fs::set_permissions(&enroll, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let text = format!(
            "[interface]\nname = \"{ifname}\"\nbackend = \"userspace\"\nprivate_key_file = \"{key}\"\nlisten_port = 51820\n\n\
             [agent]\nstate_dir = \"{state}\"\n\n[policy]\npin_dir = \"{pins}\"\n\n\
             [control]\nendpoints = [\"{CP_V4}:{CP_PORT}\"]\ninsecure = true\nenrollment_key_file = \"{enroll}\"\n\
             hostname = \"h{i}\"\nadvertise_endpoints = [\"{u4}:51820\"]\n{guard}\n",
            ifname = self.ifname,
            key = self.dir.join("private.key").display(),
            state = self.dir.join("state").display(),
            pins = crate::bpffs_root().display(),
            enroll = enroll.display(),
            i = self.index,
            u4 = self.underlay_v4,
        );
        self.write_config(&text);
    }

    /// The saved last known good view (`view.pb`), as bytes; empty if there is none.
    pub fn saved_view_bytes(&self) -> Vec<u8> {
        std::fs::read(self.dir.join("state/control/view.pb")).unwrap_or_default()
    }
}
