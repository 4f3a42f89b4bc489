//! The agent listener under abuse, against a real in-process control plane: connection
//! caps per source, the handshake timeout, HTTP/2 stream limits, message sizes, Watch
//! streams per node, authentication that never waits for the store, coalesced
//! re-registrations, report rates, the flow-record rate, and plaintext only on loopback.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;
use wirefence_control::limits::Limits;
use wirefence_control::server::{serve, ServeConfig, TlsIdentity};
use wirefence_proto::v1::{
    agent_report, AgentReport, Direction, FlowRecord, FlowRecords, ListFlowsRequest, RegisterResponse, SocketAddress,
    Verdict, WatchRequest,
};

async fn start_limited(dir: &std::path::Path, f: impl FnOnce(&mut Limits)) -> Cp {
    start_with(dir, |cfg| f(&mut cfg.limits)).await
}

/// Whether the server closes `s` within `within` (EOF or reset), without sending anything.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(within, s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(n)) => panic!("the server sent {n} bytes to a client that said nothing"),
        Err(_) => false,
    }
}

#[tokio::test]
async fn connections_beyond_the_cap_of_a_source_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start_limited(dir.path(), |l| l.max_connections_per_source = 3).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(cp.addr()).await.unwrap());
    }
    let mut extra = TcpStream::connect(cp.addr()).await.unwrap();
    assert!(closed_within(&mut extra, Duration::from_secs(2)).await, "the 4th connection of one source stays open");
    for s in &mut held {
        assert!(!closed_within(s, Duration::from_millis(100)).await, "a connection within the cap was closed");
    }
    // A closed connection gives its slot back.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut again = TcpStream::connect(cp.addr()).await.unwrap();
    assert!(!closed_within(&mut again, Duration::from_millis(300)).await, "a freed slot was not reusable");
    // Other sources are not affected by the full one.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut s = socket.connect(cp.addr()).await.unwrap();
    assert!(!closed_within(&mut s, Duration::from_millis(300)).await, "another source was refused");
}

#[tokio::test]
async fn a_silent_or_half_open_tls_client_is_dropped_after_the_handshake_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let files = wirefence_control::certs::init(&pki, &["localhost".into()]).unwrap();
    let tls = TlsIdentity::from_files(&files.server_cert, &files.server_key).unwrap();
    let cp = start_with(dir.path(), |cfg| {
        cfg.tls = Some(tls);
        cfg.limits.handshake_timeout = Duration::from_millis(500);
    })
    .await;
    let t0 = Instant::now();
    let mut silent = TcpStream::connect(cp.addr()).await.unwrap();
    // The first bytes of a TLS record header, then nothing.
    let mut half = TcpStream::connect(cp.addr()).await.unwrap();
    half.write_all(&[0x16, 0x03, 0x01, 0x02]).await.unwrap();
    assert!(!closed_within(&mut silent, Duration::from_millis(300)).await, "closed before the timeout");
    assert!(closed_within(&mut silent, Duration::from_secs(3)).await, "a silent client was kept");
    assert!(closed_within(&mut half, Duration::from_secs(1)).await, "a half-open handshake was kept");
    assert!(t0.elapsed() < Duration::from_secs(3));

    // A real TLS client is served.
    let ca = tonic::transport::Certificate::from_pem(std::fs::read(&files.ca_cert).unwrap());
    let channel = tonic::transport::Endpoint::from_shared(format!("https://localhost:{}", cp.addr().port()))
        .unwrap()
        .tls_config(tonic::transport::ClientTlsConfig::new().ca_certificate(ca).domain_name("localhost"))
        .unwrap()
        .connect()
        .await
        .expect("TLS connect");
    let mut agent = wirefence_proto::v1::agent_service_client::AgentServiceClient::new(channel);
    let r = agent.watch(authed(WatchRequest { resume_from: 0, ..Default::default() }, "nx.bad")).await;
    assert_code(r, Code::Unauthenticated, "credential");
}

#[tokio::test]
async fn a_connection_gets_a_bounded_number_of_concurrent_streams() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start_limited(dir.path(), |l| l.max_streams_per_connection = 2).await;
    let a = cp.enroll("a", 1, &[]).await;
    let mut agent = cp.agent().await;
    let mut s1 = agent
        .watch(authed(WatchRequest { resume_from: 0, ..Default::default() }, &a.credential))
        .await
        .unwrap()
        .into_inner();
    let mut s2 = agent
        .watch(authed(WatchRequest { resume_from: 0, ..Default::default() }, &a.credential))
        .await
        .unwrap()
        .into_inner();
    next(&mut s1).await.unwrap();
    next(&mut s2).await.unwrap();
    let mut third = agent.clone();
    let req = authed(WatchRequest { resume_from: 0, ..Default::default() }, &a.credential);
    let mut pending = Box::pin(async move { third.watch(req).await });
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut pending).await.is_err(),
        "a third concurrent stream was opened on one connection"
    );
    drop(s1);
    let opened = tokio::time::timeout(Duration::from_secs(5), pending).await.expect("the freed stream is reused");
    opened.unwrap();
}

#[tokio::test]
async fn messages_above_the_size_bound_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    let a = cp.enroll("a", 1, &[]).await;
    let mut agent = cp.agent().await;
    // 2 MiB: below tonic's own 4 MiB default, above the listener's 1 MiB.
    let big = FlowRecord { rule_id: "x".repeat(2 << 20), ..Default::default() };
    let report = AgentReport { body: Some(agent_report::Body::Flows(FlowRecords { records: vec![big] })) };
    let r = agent.report(authed(tokio_stream::iter(vec![report]), &a.credential)).await;
    let status = r.expect_err("a 2 MiB message was accepted");
    assert!(matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted), "{status:?}");
    cp.handle.registry().flush_flows().await.unwrap();
    let stored = cp.admin.list_flows(ListFlowsRequest::default()).await.unwrap().into_inner();
    assert!(stored.flows.is_empty() && stored.refused.is_empty(), "{stored:?}");
}

#[tokio::test]
async fn a_node_gets_a_bounded_number_of_watch_streams() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start_limited(dir.path(), |l| l.max_watches_per_node = 2).await;
    let a = cp.enroll("a", 1, &[]).await;
    let b = cp.enroll("b", 2, &[]).await;
    let s1 = watch(&cp, &a.credential, 0).await.unwrap();
    let _s2 = watch(&cp, &a.credential, 0).await.unwrap();
    assert_code(watch(&cp, &a.credential, 0).await, Code::ResourceExhausted, "2 open Watch streams");
    let _b = watch(&cp, &b.credential, 0).await.expect("another node is not limited by a's streams");
    drop(s1);
    let t0 = Instant::now();
    loop {
        match watch(&cp, &a.credential, 0).await {
            Ok(_) => break,
            Err(s) if s.code() == Code::ResourceExhausted && t0.elapsed() < Duration::from_secs(5) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(s) => panic!("a closed stream did not free its place: {s:?}"),
        }
    }
}

async fn wait_for(f: impl Fn() -> bool, what: &str) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(5), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn bad_credentials_are_refused_without_waiting_for_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    let a = cp.enroll("a", 1, &[]).await;
    let (id, _) = a.credential.split_once('.').unwrap();
    let tampered = format!("{id}.{}", "A".repeat(43));
    let unknown = format!("nffffffffffffffff.{}", "A".repeat(43));

    // Hold the store lock, as a long write would, from another task.
    let registry = cp.handle.registry().clone();
    let (locked_tx, locked_rx) = tokio::sync::oneshot::channel();
    let holder = tokio::spawn(async move {
        let _guard = registry.hold_store_lock().await;
        locked_tx.send(()).unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
    });
    locked_rx.await.unwrap();
    let t0 = Instant::now();
    for (cred, code) in [
        (unknown.as_str(), Code::Unauthenticated),
        (tampered.as_str(), Code::Unauthenticated),
        ("not a credential", Code::Unauthenticated),
    ] {
        let r = tokio::time::timeout(Duration::from_secs(1), watch(&cp, cred, 0)).await;
        assert_code(r.expect("a bad Watch credential waited for the store lock"), code, "credential");
        let mut agent = cp.agent().await;
        let req = authed(tokio_stream::iter(Vec::<AgentReport>::new()), cred);
        let r = tokio::time::timeout(Duration::from_secs(1), agent.report(req)).await;
        assert_code(r.expect("a bad Report credential waited for the store lock"), code, "credential");
    }
    assert!(t0.elapsed() < Duration::from_secs(2));
    holder.await.unwrap();
    // The index follows committed writes: a removed node's credential stops working.
    let _ = watch(&cp, &a.credential, 0).await.expect("the real credential works");
    let req = wirefence_proto::v1::RemoveNodeRequest { node: "a".into() };
    cp.admin.remove_node(req).await.unwrap();
    assert_code(watch(&cp, &a.credential, 0).await, Code::PermissionDenied, "removed");
}

#[tokio::test]
async fn a_flapping_node_bumps_the_version_at_most_once_per_interval() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start_limited(dir.path(), |l| l.reregister_interval = Duration::from_millis(800)).await;
    let a = cp.enroll("a", 1, &[]).await;
    let registry = cp.handle.registry().clone();
    let v0 = registry.current().version;
    let mut agent = cp.agent().await;
    let endpoint = |port: u16| SocketAddress::from(std::net::SocketAddr::from(([192, 0, 2, 1], port)));
    for port in 1000..1030 {
        let mut req = register_req("a", 1, "");
        req.endpoints = vec![endpoint(port)];
        agent.register(authed(req, &a.credential)).await.expect("a flapping re-registration is accepted");
    }
    assert_eq!(registry.current().version, v0 + 1, "only the first change is applied at once");
    let id = a.node_id.clone();
    let latest = "192.0.2.1:1029".parse().unwrap();
    let t0 = Instant::now();
    wait_for(|| registry.current().node(&id).is_some_and(|n| n.endpoints == vec![latest]), "the latest change").await;
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert_eq!(registry.current().version, v0 + 2, "the parked changes cost one version");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(registry.current().version, v0 + 2, "nothing else is applied afterwards");
}

/// `n` records of flows from the node `reg` enrolled to another overlay address.
fn flows(reg: &RegisterResponse, n: usize, port: u32) -> AgentReport {
    let src = reg.addresses.iter().find_map(|p| match p.addr.len() {
        4 => Some(p.addr.clone()),
        _ => None,
    });
    let record = FlowRecord {
        time_unix_ms: i64::try_from(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis(),
        )
        .unwrap(),
        src: src.expect("an IPv4 overlay address"),
        dst: vec![10, 77, 255, 1],
        protocol: 6,
        src_port: 40000,
        dst_port: port,
        verdict: Verdict::Allow.into(),
        direction: Direction::Egress.into(),
        rule_id: "web".into(),
        ..Default::default()
    };
    AgentReport { body: Some(agent_report::Body::Flows(FlowRecords { records: vec![record; n] })) }
}

#[tokio::test]
async fn one_node_cannot_push_out_the_others_flow_records() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start_limited(dir.path(), |l| {
        l.flows_per_sec = 10;
        l.flow_burst = 100;
    })
    .await;
    let quiet = cp.enroll("quiet", 1, &[]).await;
    let loud = cp.enroll("loud", 2, &[]).await;
    let mut agent = cp.agent().await;
    agent.report(authed(tokio_stream::iter(vec![flows(&quiet, 5, 22)]), &quiet.credential)).await.unwrap();
    let flood: Vec<_> = (0..50).map(|_| flows(&loud, 100, 443)).collect();
    agent.report(authed(tokio_stream::iter(flood), &loud.credential)).await.unwrap();
    cp.handle.registry().flush_flows().await.unwrap();
    let req = ListFlowsRequest { limit: 100_000, ..Default::default() };
    let stored = cp.admin.list_flows(req).await.unwrap().into_inner();
    let of = |id: &str| stored.flows.iter().filter(|f| f.node_id == id).count();
    assert_eq!(of(&quiet.node_id), 5, "the flood pushed out another node's records");
    // The burst and what refilled while the flood arrived (well under a second's worth).
    let kept = of(&loud.node_id);
    assert!((100..=120).contains(&kept), "{kept} of the flood stored");
    let refused: Vec<_> =
        stored.refused.iter().map(|r| (r.node_id.as_str(), r.over_rate + kept as u64, r.invalid)).collect();
    assert_eq!(refused, [(loud.node_id.as_str(), 5_000, 0)], "what was not stored is counted");
}

#[tokio::test]
async fn a_report_flood_ends_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start_limited(dir.path(), |l| {
        l.reports_per_sec = 5;
        l.report_burst = 10;
    })
    .await;
    let a = cp.enroll("a", 1, &[]).await;
    let mut agent = cp.agent().await;
    let fine: Vec<_> = (0..10).map(|_| flows(&a, 1, 22)).collect();
    agent.report(authed(tokio_stream::iter(fine), &a.credential)).await.expect("within the burst");
    let flood: Vec<_> = (0..50).map(|_| flows(&a, 1, 22)).collect();
    let r = agent.report(authed(tokio_stream::iter(flood), &a.credential)).await;
    assert_code(r, Code::ResourceExhausted, "report messages a second");
    tokio::time::sleep(Duration::from_millis(500)).await;
    agent.report(authed(tokio_stream::iter(vec![flows(&a, 1, 22)]), &a.credential)).await.expect("refilled");
}

#[tokio::test]
async fn plaintext_is_refused_on_a_non_loopback_address_without_the_second_flag() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ServeConfig::new(dir.path().join("control.db"), dir.path().join("admin.sock"));
    cfg.listen = vec!["127.0.0.1:0".parse().unwrap(), "0.0.0.0:0".parse().unwrap()];
    let err = serve(cfg.clone()).await.err().expect("plaintext on 0.0.0.0 was served");
    assert!(matches!(err, wirefence_control::Error::InsecureRemote(a) if a.ip().is_unspecified()), "{err}");
    assert!(err.to_string().contains("--insecure-allow-remote"), "{err}");
    assert!(!cfg.admin_socket.exists(), "nothing is started when refused");
    cfg.insecure_remote = true;
    let handle = serve(cfg).await.expect("allowed with the second flag");
    handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_rapid_reset_client_loses_its_connection() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(dir.path()).await;
    let tcp = TcpStream::connect(cp.addr()).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
    let conn = tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    // Open streams and cancel them at once (CVE-2023-44487), far beyond the limit.
    let mut refused = None;
    for _ in 0..2000 {
        let req = http::Request::post(format!("http://{}/wirefence.v1.AgentService/Watch", cp.addr()))
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        match client.send_request(req, false) {
            Ok((_, mut stream)) => stream.send_reset(h2::Reason::CANCEL),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
        if let Err(e) = client.clone().ready().await {
            refused = Some(e);
            break;
        }
        client = client.ready().await.unwrap();
    }
    let err = match refused {
        Some(e) => e,
        None => tokio::time::timeout(Duration::from_secs(5), conn)
            .await
            .expect("the connection was kept")
            .unwrap()
            .expect_err("the connection ended without an error"),
    };
    // A GOAWAY, or the connection closed under the client's writes right after it.
    assert!(err.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) || err.is_io(), "{err:?}");
}
