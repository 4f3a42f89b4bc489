//! An in-process control plane on 127.0.0.1:0 and a Unix admin socket in a temp dir,
//! plus helpers acting as agents through the generated clients.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Status, Streaming};
use wirefence_control::admin_client::{self, AdminClient};
use wirefence_control::enroll::{EnrollLimits, Rate};
use wirefence_control::server::{serve, ServeConfig, ServerHandle};
use wirefence_proto::v1::agent_service_client::AgentServiceClient;
use wirefence_proto::v1::{
    update, ApplyPolicyRequest, CreateEnrollmentKeyRequest, EnrollChallengeRequest, IpPrefix, NodeView,
    RegisterRequest, RegisterResponse, SocketAddress, Update, ViewDelta, WatchRequest,
};

pub type Agent = AgentServiceClient<Channel>;

pub struct Cp {
    pub handle: ServerHandle,
    pub admin: AdminClient,
    pub dir: PathBuf,
}

impl Cp {
    pub fn addr(&self) -> std::net::SocketAddr {
        self.handle.agent_addrs[0]
    }

    pub async fn agent(&self) -> Agent {
        agent_at(self.addr()).await
    }

    /// An unbound key: single-use or reusable; `expires_in_secs` 0 = never expires.
    pub async fn key(&mut self, single_use: bool, expires_in_secs: u64, tags: &[&str]) -> String {
        let req = CreateEnrollmentKeyRequest {
            reusable: !single_use,
            expires_in_secs: (expires_in_secs != 0).then_some(expires_in_secs),
            never_expires: expires_in_secs == 0,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            ..Default::default()
        };
        self.admin.create_enrollment_key(req).await.expect("create key").into_inner().key
    }

    /// A single-use key bound to `hostname` (the enrolled node owns the name).
    pub async fn bound_key(&mut self, hostname: &str, tags: &[&str]) -> String {
        let req = CreateEnrollmentKeyRequest {
            hostname: hostname.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            ..Default::default()
        };
        self.admin.create_enrollment_key(req).await.expect("create key").into_inner().key
    }

    /// A reusable key granting `routes` (CIDRs).
    pub async fn route_key(&mut self, routes: &[&str]) -> Result<String, Status> {
        let req = CreateEnrollmentKeyRequest {
            routes: routes.iter().map(|r| prefix(r)).collect(),
            reusable: true,
            never_expires: true,
            ..Default::default()
        };
        Ok(self.admin.create_enrollment_key(req).await?.into_inner().key)
    }

    /// `register_req` with a fresh challenge answered with private key `[n; 32]`.
    pub async fn enroll_req(&self, hostname: &str, n: u8, key: &str) -> RegisterRequest {
        self.prove(register_req(hostname, n, key), n).await
    }

    /// `req` with a fresh challenge answered with private key `[n; 32]`.
    pub async fn prove(&self, req: RegisterRequest, n: u8) -> RegisterRequest {
        prove(&mut self.agent().await, req, &[n; 32]).await
    }

    /// Applies a policy; returns its version.
    pub async fn apply(&mut self, source: &str) -> Result<u64, Status> {
        let req = ApplyPolicyRequest { file_name: "policy.toml".into(), source: source.into() };
        Ok(self.admin.apply_policy(req).await?.into_inner().version)
    }

    /// Enrolls `hostname` (owning the name) with private key `[n; 32]` using a fresh key
    /// bound to it, with `tags`.
    pub async fn enroll(&mut self, hostname: &str, n: u8, tags: &[&str]) -> RegisterResponse {
        let key = self.bound_key(hostname, tags).await;
        let req = self.enroll_req(hostname, n, &key).await;
        self.agent().await.register(req).await.expect("register").into_inner()
    }
}

pub async fn start_with(dir: &Path, f: impl FnOnce(&mut ServeConfig)) -> Cp {
    let mut cfg = ServeConfig::new(dir.join("control.db"), dir.join("admin.sock"));
    f(&mut cfg);
    let handle = serve(cfg).await.expect("start the control plane");
    let admin = admin_client::connect(&handle.admin_socket).await.expect("connect to the admin socket");
    Cp { handle, admin, dir: dir.to_owned() }
}

/// Enrollment rate limits out of the way (tests of the limits set their own).
pub async fn start(dir: &Path) -> Cp {
    start_with(dir, relaxed).await
}

/// Enrollment rate limits out of the way.
pub fn relaxed(c: &mut ServeConfig) {
    let rate = Rate { burst: 100_000, every: Duration::from_millis(1) };
    c.enroll_limits = EnrollLimits { per_source: rate, per_key: rate };
}

/// A control plane in `dir` (its admin socket) on the PostgreSQL database at `url`.
pub async fn start_on(dir: &Path, url: &str) -> Cp {
    start_with(dir, |c| {
        relaxed(c);
        c.db = url.parse().expect("a postgres URL");
        c.metrics_listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    })
    .await
}

/// `n` enrollments with `key` at once, spread over `cps` in turn: node i (key pair
/// `[i; 32]`) named `{name}{i}`.
pub async fn race(cps: &[Cp], key: &str, n: u8, name: &str) -> Vec<Result<RegisterResponse, Status>> {
    let mut racers = Vec::new();
    for i in 1..=n {
        let cp = &cps[usize::from(i) % cps.len()];
        let req = cp.enroll_req(&format!("{name}{i}"), i, key).await;
        let addr = cp.addr();
        racers.push(tokio::spawn(async move { agent_at(addr).await.register(req).await.map(|r| r.into_inner()) }));
    }
    futures::future::join_all(racers).await.into_iter().map(|r| r.expect("a racer panicked")).collect()
}

/// A client of the agent service at `addr`.
pub async fn agent_at(addr: std::net::SocketAddr) -> Agent {
    AgentServiceClient::connect(format!("http://{addr}")).await.expect("connect to the agent service")
}

/// The public key of private key `[n; 32]`.
pub fn pubkey(n: u8) -> Vec<u8> {
    wirefence_proto::possession::public_key(&[n; 32]).to_vec()
}

/// Answers a fresh challenge for `req` with `private_key`.
pub async fn prove(agent: &mut Agent, mut req: RegisterRequest, private_key: &[u8; 32]) -> RegisterRequest {
    let c = agent.enroll_challenge(EnrollChallengeRequest {}).await.expect("challenge").into_inner();
    wirefence_proto::possession::answer(&mut req, private_key, &c).expect("answer the challenge");
    req
}

pub fn prefix(s: &str) -> IpPrefix {
    IpPrefix::from(s.parse::<ipnet::IpNet>().expect("a CIDR"))
}

/// A Register request for the key pair of private key `[n; 32]` (without a challenge
/// answer: enough for re-registration; enrollment needs [`prove`]).
pub fn register_req(hostname: &str, n: u8, key: &str) -> RegisterRequest {
    RegisterRequest {
        public_key: pubkey(n),
        hostname: hostname.into(),
        endpoints: vec![SocketAddress::from(std::net::SocketAddr::from(([192, 0, 2, n], 51820)))],
        enrollment_key: key.into(),
        ..Default::default()
    }
}

/// `msg` with `authorization: Bearer <credential>`.
pub fn authed<T>(msg: T, credential: &str) -> Request<T> {
    let mut r = Request::new(msg);
    let v: MetadataValue<_> = format!("Bearer {credential}").parse().expect("ascii credential");
    r.metadata_mut().insert("authorization", v);
    r
}

/// A Watch resuming from `resume_from` of this control plane's database incarnation.
pub async fn watch(cp: &Cp, credential: &str, resume_from: u64) -> Result<Streaming<Update>, Status> {
    watch_of(cp, credential, resume_from, cp.handle.registry().incarnation()).await
}

/// A Watch resuming from `resume_from` of `incarnation`.
pub async fn watch_of(
    cp: &Cp,
    credential: &str,
    resume_from: u64,
    incarnation: &str,
) -> Result<Streaming<Update>, Status> {
    let mut agent = cp.agent().await;
    let req = WatchRequest { resume_from, incarnation: incarnation.to_owned(), ..Default::default() };
    Ok(agent.watch(authed(req, credential)).await?.into_inner())
}

/// The next message of a stream (5 s at most).
pub async fn next(s: &mut Streaming<Update>) -> Result<Update, Status> {
    match tokio::time::timeout(Duration::from_secs(5), s.message()).await {
        Ok(Ok(Some(u))) => Ok(u),
        Ok(Ok(None)) => panic!("stream ended without a status"),
        Ok(Err(status)) => Err(status),
        Err(_) => panic!("no update within 5 s"),
    }
}

/// Asserts nothing arrives on the stream for `ms` milliseconds.
pub async fn silent(s: &mut Streaming<Update>, ms: u64) {
    if let Ok(m) = tokio::time::timeout(Duration::from_millis(ms), s.message()).await {
        panic!("expected no update, got {m:?}");
    }
}

pub fn snapshot(u: &Update) -> &NodeView {
    match &u.body {
        Some(update::Body::Snapshot(v)) => v,
        other => panic!("expected a snapshot, got {other:?}"),
    }
}

pub fn delta(u: &Update) -> &ViewDelta {
    match &u.body {
        Some(update::Body::Delta(d)) => d,
        other => panic!("expected a delta, got {other:?}"),
    }
}

pub fn peer_names(v: &NodeView) -> Vec<String> {
    let mut n: Vec<String> = v.peers.iter().map(|p| p.name.clone()).collect();
    n.sort();
    n
}

pub fn assert_code<T: std::fmt::Debug>(r: Result<T, Status>, code: Code, contains: &str) {
    match r {
        Ok(v) => panic!("expected {code:?}, got {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "{s:?}");
            assert!(s.message().contains(contains), "{:?} does not contain {contains:?}", s.message());
        }
    }
}

pub const POLICY: &str = r#"
[groups]
web = ["tag:web", "node:db1"]
admins = ["node:laptop"]

[[rules]]
id = "admin-ssh"
from = ["group:admins"]
to = ["group:web"]
proto = "tcp"
ports = ["22"]

[[tests]]
from = "laptop"
to = "db1"
port = 22
expect = "allow"
"#;

/// POLICY plus web -> db1 on 5432 (concerns db1 and web1, not laptop's view).
pub const POLICY_PG: &str = r#"
[groups]
web = ["tag:web", "node:db1"]
admins = ["node:laptop"]

[[rules]]
id = "admin-ssh"
from = ["group:admins"]
to = ["group:web"]
proto = "tcp"
ports = ["22"]

[[rules]]
id = "pg"
from = ["tag:web"]
to = ["node:db1"]
proto = "tcp"
ports = ["5432"]
"#;

/// `GET /metrics` from `addr` (HTTP/1.0, so the server closes when done): the body.
pub async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect to the metrics listener");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: metrics\r\n\r\n").await.unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    wirefence_tests::metrics::metrics_body(&raw)
}

// Not every test binary uses both (each compiles this module).
#[allow(unused_imports)]
pub use wirefence_tests::metrics::{promtool_check, sample};

/// Runs the `wirefence-control` binary against the admin socket `socket`.
pub async fn cli(socket: &Path, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_wirefence-control"))
        .arg("--admin-socket")
        .arg(socket)
        .args(args)
        .output()
        .await
        .expect("run wirefence-control")
}
