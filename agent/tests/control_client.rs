//! The control-plane client over a real gRPC connection, against a server that injects the
//! faults a real stream can show: duplicates, stale replays, an invalid update, a delta
//! for the wrong base. The client must ignore, reject and report, and resume correctly.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wirefence_agent::enforce::flows::{FlowEvent, FlowQueue};

use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};
use wirefence_agent::config::Endpoint;
use wirefence_agent::control::config::{ControlConfig, Transport};
use wirefence_agent::control::connect::Connector;
use wirefence_agent::control::{ApplyRequest, ControlClient, ControlFiles, Tracker};
use wirefence_agent::model::{PrivateKey, PublicKey};
use wirefence_proto::v1;
use wirefence_proto::v1::agent_service_server::{AgentService, AgentServiceServer};

const CREDENTIAL: &str = "n1.s3cret";
/// The fake control plane's challenge key (one for every challenge: only the node's
/// answer is under test here).
const CHALLENGE_SECRET: [u8; 32] = [5; 32];

#[derive(Default)]
struct Seen {
    resumes: Vec<u64>,
    accepts_parts: Vec<bool>,
    reports: Vec<v1::agent_report::Body>,
    enrollment_keys: Vec<String>,
}

struct Faulty {
    /// The updates of each successive Watch call, and whether the server then ends it.
    script: Mutex<Vec<(Vec<v1::Update>, bool)>>,
    seen: Arc<Mutex<Seen>>,
    /// The overlay ranges Register announces.
    overlay: Vec<v1::IpPrefix>,
}

fn authorized<T>(r: &Request<T>) -> Result<(), Status> {
    match r.metadata().get("authorization").and_then(|v| v.to_str().ok()) {
        Some(v) if v == format!("Bearer {CREDENTIAL}") => Ok(()),
        _ => Err(Status::unauthenticated("bad credential")),
    }
}

#[tonic::async_trait]
impl AgentService for Faulty {
    async fn register(&self, r: Request<v1::RegisterRequest>) -> Result<Response<v1::RegisterResponse>, Status> {
        if authorized(&r).is_err() {
            let key = r.get_ref().enrollment_key.clone();
            if key != "enroll-me" {
                return Err(Status::unauthenticated("bad enrollment key"));
            }
            let req = r.get_ref();
            let public_key: [u8; 32] = req.public_key.as_slice().try_into().expect("32-byte key");
            let server = wirefence_proto::possession::StaticSecret::from(CHALLENGE_SECRET);
            wirefence_proto::possession::verify(&server, &public_key, &req.challenge_id, &req.hostname, &req.proof)
                .map_err(|e| Status::unauthenticated(e.to_string()))?;
            self.seen.lock().unwrap().enrollment_keys.push(key);
        }
        Ok(Response::new(v1::RegisterResponse {
            node_id: "n1".into(),
            credential: CREDENTIAL.into(),
            addresses: vec![],
            rotate_credential: false,
            overlay: self.overlay.clone(),
            refused_routes: vec![],
        }))
    }

    async fn enroll_challenge(
        &self,
        _: Request<v1::EnrollChallengeRequest>,
    ) -> Result<Response<v1::EnrollChallengeReply>, Status> {
        Ok(Response::new(v1::EnrollChallengeReply {
            challenge_id: "c1".into(),
            server_public_key: wirefence_proto::possession::public_key(&CHALLENGE_SECRET).to_vec(),
            expires_in_secs: 60,
        }))
    }

    async fn rotate_credential(
        &self,
        _: Request<v1::RotateCredentialRequest>,
    ) -> Result<Response<v1::RotateCredentialReply>, Status> {
        Err(Status::unimplemented("not asked for"))
    }

    async fn rotate_key(&self, _: Request<v1::RotateKeyRequest>) -> Result<Response<v1::RotateKeyReply>, Status> {
        Err(Status::unimplemented("not part of these faults"))
    }

    async fn leave(&self, _: Request<v1::LeaveRequest>) -> Result<Response<v1::LeaveReply>, Status> {
        Err(Status::unimplemented("not part of these faults"))
    }

    type WatchStream = ReceiverStream<Result<v1::Update, Status>>;

    async fn watch(&self, r: Request<v1::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        authorized(&r)?;
        {
            let mut seen = self.seen.lock().unwrap();
            seen.resumes.push(r.get_ref().resume_from);
            seen.accepts_parts.push(r.get_ref().accepts_parts);
        }
        let (updates, close) = {
            let mut script = self.script.lock().unwrap();
            if script.is_empty() {
                (Vec::new(), false)
            } else {
                script.remove(0)
            }
        };
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            for u in updates {
                if tx.send(Ok(u)).await.is_err() {
                    return;
                }
            }
            if !close {
                // Keep the stream open like a live control plane.
                tx.closed().await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn report(&self, r: Request<Streaming<v1::AgentReport>>) -> Result<Response<v1::ReportReply>, Status> {
        authorized(&r)?;
        let mut s = r.into_inner();
        while let Some(m) = s.message().await? {
            if let Some(b) = m.body {
                self.seen.lock().unwrap().reports.push(b);
            }
        }
        Ok(Response::new(v1::ReportReply {}))
    }
}

fn prefix(s: &str) -> v1::IpPrefix {
    s.parse::<ipnet::IpNet>().unwrap().into()
}

fn peer(k: &PublicKey, ip: &str) -> v1::Peer {
    v1::Peer { public_key: k.0.to_vec(), name: "p".into(), allowed_ips: vec![prefix(ip)], ..Default::default() }
}

fn snapshot(version: u64, peers: Vec<v1::Peer>) -> v1::Update {
    let view = v1::NodeView {
        addresses: vec![prefix("10.77.0.1/32")],
        peers,
        policy: Some(v1::Policy::default()),
        mesh_prefixes: vec![],
        refused_routes: vec![],
    };
    v1::Update { version, body: Some(v1::update::Body::Snapshot(view)), ..Default::default() }
}

fn delta(version: u64, base: u64, d: v1::ViewDelta) -> v1::Update {
    v1::Update {
        version,
        body: Some(v1::update::Body::Delta(v1::ViewDelta { base_version: base, ..d })),
        ..Default::default()
    }
}

/// A deny event as the enforcer's reader queues it.
fn deny() -> std::sync::Arc<FlowQueue> {
    let q = FlowQueue::default();
    q.push(FlowEvent {
        at_ms: 1_700_000_000_000,
        allowed: false,
        rule: String::new(),
        ingress: true,
        src: "10.77.0.9".parse().unwrap(),
        dst: "10.77.0.1".parse().unwrap(),
        proto: 6,
        sport: 40000,
        dport: 22,
        packets: 0,
        bytes: 0,
    });
    std::sync::Arc::new(q)
}

/// The client as the daemon builds it, over plaintext, with no peer statistics.
fn plaintext_client(
    key: &PrivateKey,
    files: &ControlFiles,
    endpoints: Vec<Endpoint>,
    enrollment_key_file: Option<std::path::PathBuf>,
    apply: mpsc::Sender<ApplyRequest>,
    flows: std::sync::Arc<FlowQueue>,
) -> ControlClient {
    let config = ControlConfig {
        endpoints: endpoints.clone(),
        transport: Transport::Insecure,
        enrollment_key_file,
        hostname: "n1".into(),
        advertise_endpoints: vec![],
        advertise_routes: vec![],
        route_checks: vec![],
        guard: Default::default(),
        rotate_key_every: None,
    };
    let own = key.public_key();
    ControlClient {
        // No reloads here: the sender goes at once.
        advertised: tokio::sync::watch::channel(config.advertised()).1,
        config,
        files: files.clone(),
        own,
        private_key: key.clone(),
        // No key file and no next key beside it: no rotation here (tests/tests/key_rotation.rs).
        key_file: std::env::temp_dir().join(format!("wf-client-no-key-{}", std::process::id())),
        key_switch: mpsc::channel(1).0,
        rotate: Default::default(),
        tracker: Tracker::new(own, None),
        apply,
        connector: std::sync::Arc::new(Connector::new(endpoints, &Transport::Insecure).unwrap()),
        health: Default::default(),
        tunnel: "wf-client0".parse().unwrap(),
        telemetry: wirefence_agent::control::client::Telemetry {
            peer_stats: Box::new(Vec::new),
            flows,
            rule_hits: wirefence_agent::control::hits::RuleHits::new(Box::new(|| None)),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignores_duplicates_and_stale_rejects_invalid_and_resumes_after_a_gap() {
    let key = PrivateKey::generate();
    let own = key.public_key();
    let (a, b) = (PrivateKey::generate().public_key(), PrivateKey::generate().public_key());
    let upsert = |p| v1::ViewDelta { upsert_peers: vec![p], ..Default::default() };
    let c = PrivateKey::generate().public_key();
    let script = vec![
        (
            vec![
                snapshot(5, vec![peer(&a, "10.77.0.2/32")]),
                snapshot(5, vec![peer(&a, "10.77.0.2/32")]),   // duplicate
                delta(6, 5, upsert(peer(&b, "10.77.0.3/32"))), // applies
                delta(4, 3, upsert(peer(&b, "10.77.0.9/32"))), // stale
                delta(7, 6, upsert(peer(&PrivateKey::generate().public_key(), "10.77.0.0/24"))), // invalid: overlaps
                delta(8, 7, v1::ViewDelta { remove_peers: vec![a.0.to_vec()], ..Default::default() }), // wrong base
            ],
            false,
        ),
        // Resumed from 6; then the control plane goes away.
        (vec![delta(8, 6, v1::ViewDelta { remove_peers: vec![a.0.to_vec()], ..Default::default() })], true),
        // Back with its versions reset (a recreated database): its snapshot at 2 is the truth.
        (vec![snapshot(2, vec![peer(&c, "10.77.0.4/32")]), snapshot(1, vec![])], false),
    ];
    let seen = Arc::new(Mutex::new(Seen::default()));
    let server = Faulty { script: Mutex::new(script), seen: seen.clone(), overlay: vec![prefix("10.77.0.0/24")] };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServiceServer::new(server))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    let dir = client_dir("wf-client-");
    let files = ControlFiles::new(&dir);
    // An unreachable endpoint first: the client must go on to the next one.
    let endpoints = vec![Endpoint::Addr("127.0.0.1:1".parse().unwrap()), Endpoint::Addr(addr)];
    let (tx, mut rx) = mpsc::channel::<ApplyRequest>(1);
    let client = plaintext_client(&key, &files, endpoints, Some(dir.join("enroll.key")), tx, deny());
    let task = tokio::spawn(client.run());

    let mut applied = Vec::new();
    while applied.len() < 4 {
        let req = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.expect("an update").unwrap();
        applied.push(req.version);
        req.done.send(Ok(())).unwrap();
    }
    assert_eq!(applied, vec![5, 6, 8, 2], "the replayed snapshot 1 after the reset is ignored");
    // Reports are asynchronous: wait for the last one.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let done = seen
            .lock()
            .unwrap()
            .reports
            .iter()
            .any(|r| matches!(r, v1::agent_report::Body::Applied(v1::Applied { version: 2 })));
        if done || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();

    let seen = seen.lock().unwrap();
    assert_eq!(seen.resumes, vec![0, 6, 8], "resumes from the applied version after the gap and the outage");
    assert_eq!(seen.enrollment_keys.len(), 1, "enrolls once, then uses its credential");
    let outcomes: Vec<String> = seen
        .reports
        .iter()
        .filter_map(|r| match r {
            v1::agent_report::Body::Applied(a) => Some(format!("applied {}", a.version)),
            v1::agent_report::Body::Failed(f) => Some(format!("failed {}: {}", f.version, f.reason)),
            _ => None,
        })
        .collect();
    assert_eq!(outcomes.len(), 5, "{outcomes:?}");
    assert_eq!(outcomes[..2], ["applied 5".to_string(), "applied 6".to_string()]);
    assert!(outcomes[2].starts_with("failed 7") && outcomes[2].contains("overlaps"), "{outcomes:?}");
    assert_eq!(outcomes[3..], ["applied 8".to_string(), "applied 2".to_string()]);
    // The deny event went out as one flow record, not again in later sessions.
    let flows: Vec<&v1::FlowRecord> = seen
        .reports
        .iter()
        .filter_map(|r| match r {
            v1::agent_report::Body::Flows(f) => Some(&f.records),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(flows.len(), 1, "{flows:?}");
    let f = flows[0];
    assert_eq!((f.src.as_slice(), f.dst_port, f.protocol), (&[10u8, 77, 0, 9][..], 22, 6));
    assert_eq!(
        (f.verdict(), f.direction(), f.time_unix_ms),
        (v1::Verdict::Deny, v1::Direction::Ingress, 1_700_000_000_000)
    );

    let saved = files.view(&own).unwrap().expect("persisted view");
    assert_eq!(saved.version, 2);
    assert_eq!(saved.view.peers.keys().copied().collect::<Vec<_>>(), vec![c]);
    let cred = files.credential().unwrap().expect("persisted credential");
    assert_eq!(cred.node_id, "n1");
    assert_eq!(cred.overlay, vec!["10.77.0.0/24".parse::<ipnet::IpNet>().unwrap()], "the announced overlay is pinned");
    let status = files.status().unwrap().expect("status");
    assert_eq!(status.applied_version, 2);
    assert_eq!(status.connected_to.as_deref(), Some(addr.to_string().as_str()));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Restarted while no control plane answers: `status` still names the node the saved
/// credential belongs to, beside the connection error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_status_names_the_node_of_the_saved_credential() {
    let key = PrivateKey::generate();
    let own = key.public_key();
    let dir = std::env::temp_dir().join(format!("wf-client-offline-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let files = ControlFiles::new(&dir);
    files
        .set_credential(&wirefence_agent::control::persist::Credential {
            node_id: "n7".into(),
            credential: "n7.secret".into(),
            public_key: own,
            overlay: vec![],
        })
        .unwrap();
    let endpoints = vec![Endpoint::Addr("127.0.0.1:1".parse().unwrap())];
    let (tx, _rx) = mpsc::channel::<ApplyRequest>(1);
    let task = tokio::spawn(plaintext_client(&key, &files, endpoints, None, tx, Default::default()).run());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = files.status().unwrap().filter(|s| s.last_error.is_some()) {
            break s;
        }
        assert!(tokio::time::Instant::now() < deadline, "no status with the connection error within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    task.abort();
    assert_eq!(status.node_id.as_deref(), Some("n7"), "{status:?}");
    assert_eq!(status.connected_to, None);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Serves `server` on a loopback port; returns its address.
async fn serve(server: Faulty) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServiceServer::new(server))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

/// The pinned overlay holds against a control plane that later announces a wider one: a
/// view with an address outside the pinned ranges is refused by the guard and not saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_overlay_is_not_widened_by_a_later_announcement() {
    let key = PrivateKey::generate();
    let own = key.public_key();
    let dir = std::env::temp_dir().join(format!("wf-client-pinned-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let files = ControlFiles::new(&dir);
    let pinned: ipnet::IpNet = "10.77.0.0/24".parse().unwrap();
    files
        .set_credential(&wirefence_agent::control::persist::Credential {
            node_id: "n1".into(),
            credential: CREDENTIAL.into(),
            public_key: own,
            overlay: vec![pinned],
        })
        .unwrap();
    let mut wide = snapshot(2, vec![]);
    if let Some(v1::update::Body::Snapshot(v)) = &mut wide.body {
        v.addresses = vec![prefix("10.78.0.1/32")];
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let script = vec![(vec![snapshot(1, vec![]), wide], false)];
    let addr =
        serve(Faulty { script: Mutex::new(script), seen: seen.clone(), overlay: vec![prefix("10.0.0.0/8")] }).await;
    let (tx, mut rx) = mpsc::channel::<ApplyRequest>(1);
    let task =
        tokio::spawn(plaintext_client(&key, &files, vec![Endpoint::Addr(addr)], None, tx, Default::default()).run());
    let req = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.expect("an update").unwrap();
    assert_eq!(req.version, 1);
    req.done.send(Ok(())).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let reason = loop {
        let failed = seen.lock().unwrap().reports.iter().find_map(|r| match r {
            v1::agent_report::Body::Failed(f) if f.version == 2 => Some(f.reason.clone()),
            _ => None,
        });
        if let Some(r) = failed {
            break r;
        }
        assert!(tokio::time::Instant::now() < deadline, "no report on version 2");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(rx.try_recv().is_err(), "the refused view never reaches the daemon");
    task.abort();
    assert!(reason.contains("10.78.0.1/32 is outside the overlay ranges [10.77.0.0/24]"), "{reason}");
    assert_eq!(files.view(&own).unwrap().unwrap().version, 1, "only the accepted view is saved");
    assert_eq!(files.credential().unwrap().unwrap().overlay, vec![pinned], "the pin stays");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An enrollment that announces an overlay taking in every address keeps the credential
/// (no second enrollment) but pins nothing and takes no view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_announced_catch_all_overlay_is_not_pinned() {
    let key = PrivateKey::generate();
    let dir = client_dir("wf-client-catchall-");
    let files = ControlFiles::new(&dir);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let script = vec![(vec![snapshot(1, vec![])], false)];
    let addr =
        serve(Faulty { script: Mutex::new(script), seen: seen.clone(), overlay: vec![prefix("0.0.0.0/0")] }).await;
    let (tx, mut rx) = mpsc::channel::<ApplyRequest>(1);
    let client = plaintext_client(
        &key,
        &files,
        vec![Endpoint::Addr(addr)],
        Some(dir.join("enroll.key")),
        tx,
        Default::default(),
    );
    let task = tokio::spawn(client.run());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = files.status().unwrap().filter(|s| s.last_error.is_some()) {
            break s;
        }
        assert!(tokio::time::Instant::now() < deadline, "no status with the error within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(rx.try_recv().is_err(), "no view is taken");
    task.abort();
    let e = status.last_error.unwrap();
    assert!(e.contains("overlay range 0.0.0.0/0 announced by the control plane: it takes in every address"), "{e}");
    let cred = files.credential().unwrap().expect("the credential is kept");
    assert!(cred.overlay.is_empty(), "{:?}", cred.overlay);
    assert_eq!(seen.lock().unwrap().enrollment_keys.len(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Happy Eyeballs: an endpoint that accepts TCP and then says nothing (a hung replica) costs
/// the next endpoint one attempt delay, not the 5 s it takes to give up on it; an endpoint
/// that refuses costs nothing at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_endpoint_does_not_hold_up_the_next_one() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = silent.accept().await {
            conns.push(c); // held open, never answered
        }
    });
    let refused = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap(); // closed at once
    let seen = Arc::new(Mutex::new(Seen::default()));
    let live = serve(Faulty { script: Mutex::new(vec![]), seen, overlay: vec![] }).await;
    let endpoints = vec![Endpoint::Addr(refused), Endpoint::Addr(silent_addr), Endpoint::Addr(live)];
    let connector = Connector::new(endpoints, &Transport::Insecure).unwrap();
    let started = std::time::Instant::now();
    let (_, connected) = connector.connect().await.expect("the live endpoint answers");
    let took = started.elapsed();
    assert_eq!(connected.addr, live);
    // One by one this took the silent endpoint's 5 s HTTP/2 answer timeout first.
    assert!(took < Duration::from_secs(3), "connecting took {took:?}");
    held.abort();
}

/// A fresh state directory `<name><pid>` holding the enrollment key "enroll-me" (0600:
/// the agent refuses a key file others can read).
fn client_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("{name}{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("enroll.key"), "enroll-me\n").unwrap();
    std::fs::set_permissions(dir.join("enroll.key"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    dir
}

/// `u` as the control plane sends it in parts of `max` peers (wirefence.proto).
fn in_parts(u: v1::Update, max: usize) -> Vec<v1::Update> {
    let head = v1::Update { body: None, ..u.clone() };
    let (mut first, peers) = match u.body {
        Some(v1::update::Body::Snapshot(mut s)) => {
            let peers = std::mem::take(&mut s.peers);
            (v1::Update { body: Some(v1::update::Body::Snapshot(s)), ..head.clone() }, peers)
        }
        Some(v1::update::Body::Delta(mut d)) => {
            let peers = std::mem::take(&mut d.upsert_peers);
            (v1::Update { body: Some(v1::update::Body::Delta(d)), ..head.clone() }, peers)
        }
        None => return vec![head],
    };
    let mut chunks = peers.chunks(max);
    match (&mut first.body, chunks.next()) {
        (Some(v1::update::Body::Snapshot(s)), Some(c)) => s.peers = c.to_vec(),
        (Some(v1::update::Body::Delta(d)), Some(c)) => d.upsert_peers = c.to_vec(),
        _ => {}
    }
    let mut out = vec![first];
    for c in chunks {
        let more = v1::ViewDelta { upsert_peers: c.to_vec(), ..Default::default() };
        out.push(v1::Update { body: Some(v1::update::Body::Delta(more)), ..head.clone() });
    }
    let last = out.len() - 1;
    for (i, p) in out.iter_mut().enumerate() {
        p.continued = i < last;
    }
    out
}

/// A view sent in parts is applied once and whole; a part that does not continue its
/// update ends the session with nothing of it applied, and the client resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_in_parts_is_applied_whole_and_a_broken_one_not_at_all() {
    let key = PrivateKey::generate();
    let peers: Vec<(PublicKey, v1::Peer)> = (0..300u32)
        .map(|i| {
            let k = PrivateKey::generate().public_key();
            let p = peer(&k, &format!("10.77.{}.{}/32", 1 + i / 200, 1 + i % 200));
            (k, p)
        })
        .collect();
    let all: Vec<v1::Peer> = peers.iter().map(|(_, p)| p.clone()).collect();
    let mut broken = in_parts(delta(6, 5, v1::ViewDelta { upsert_peers: all[..20].to_vec(), ..Default::default() }), 8);
    broken[1].version = 7; // a part of another update
    let mut script_1 = in_parts(snapshot(5, all.clone()), 128);
    assert_eq!(script_1.len(), 3);
    script_1.extend(broken);
    let removal = v1::ViewDelta { remove_peers: vec![peers[0].0 .0.to_vec()], ..Default::default() };
    let script = vec![(script_1, false), (vec![delta(6, 5, removal)], false)];
    let seen = Arc::new(Mutex::new(Seen::default()));
    let server = Faulty { script: Mutex::new(script), seen: seen.clone(), overlay: vec![prefix("10.77.0.0/16")] };
    let addr = serve(server).await;
    let dir = client_dir("wf-client-parts-");
    let files = ControlFiles::new(&dir);
    let (tx, mut rx) = mpsc::channel::<ApplyRequest>(1);
    let client = plaintext_client(
        &key,
        &files,
        vec![Endpoint::Addr(addr)],
        Some(dir.join("enroll.key")),
        tx,
        Default::default(),
    );
    let task = tokio::spawn(client.run());

    let mut applied = Vec::new();
    while applied.len() < 2 {
        let req = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.expect("an update").unwrap();
        applied.push((req.version, req.view.peers.len()));
        req.done.send(Ok(())).unwrap();
    }
    task.abort();
    let _ = task.await;
    assert_eq!(applied, vec![(5, 300), (6, 299)], "the parts whole, nothing of the broken update");
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.resumes, vec![0, 5], "the broken update ended the session; resumed from 5");
        assert!(seen.accepts_parts.iter().all(|a| *a), "the client says it takes parts");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
