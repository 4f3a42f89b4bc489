//! `serve --metrics-listen`: what the control plane exposes matches what happened, and the
//! exposition passes `promtool check metrics`.

mod common;

use std::time::Duration;

use common::*;
use wirefence_proto::v1::{agent_report, AgentReport, CertificateExpiry, RemoveNodeRequest, WatchRequest};

#[tokio::test]
async fn metrics_count_nodes_streams_enrollments_and_pushes() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start_with(dir.path(), |c| c.metrics_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let addr = cp.handle.metrics_addr.expect("a bound metrics address");
    let m = scrape(addr).await;
    promtool_check(&m);
    assert_eq!(sample(&m, "wirefence_control_nodes{state=\"connected\"}"), 0.0);
    assert_eq!(sample(&m, "wirefence_control_certificate_expiry_timestamp_seconds"), 0.0, "plaintext");

    let laptop = cp.enroll("laptop", 1, &[]).await;
    cp.enroll("db1", 2, &[]).await;
    cp.enroll("old", 3, &[]).await;
    // Refused enrollments: a key that does not exist, then a used key.
    let mut agent = cp.agent().await;
    let bogus = "k1234.notakey";
    assert!(agent.register(cp.enroll_req("x", 9, bogus).await).await.is_err());
    let key = cp.key(true, 3600, &[]).await;
    agent.register(cp.enroll_req("once", 4, &key).await).await.unwrap();
    assert!(agent.register(cp.enroll_req("twice", 5, &key).await).await.is_err());
    cp.admin.remove_node(RemoveNodeRequest { node: "old".into() }).await.unwrap();

    let req = WatchRequest {
        resume_from: 0,
        incarnation: cp.handle.registry().incarnation().to_owned(),
        ..Default::default()
    };
    let mut first = agent.watch(authed(req.clone(), &laptop.credential)).await.unwrap().into_inner();
    let mut second = agent.watch(authed(req, &laptop.credential)).await.unwrap().into_inner();
    next(&mut first).await.unwrap();
    next(&mut second).await.unwrap();
    let version = cp.apply(POLICY).await.unwrap();
    next(&mut first).await.unwrap();
    next(&mut second).await.unwrap();

    let m = scrape(addr).await;
    promtool_check(&m);
    assert_eq!(sample(&m, "wirefence_control_nodes{state=\"connected\"}"), 1.0, "laptop");
    assert_eq!(sample(&m, "wirefence_control_nodes{state=\"disconnected\"}"), 2.0, "db1, once");
    assert_eq!(sample(&m, "wirefence_control_nodes{state=\"removed\"}"), 1.0, "old");
    assert_eq!(sample(&m, "wirefence_control_connected_agents"), 1.0);
    assert_eq!(sample(&m, "wirefence_control_open_streams"), 2.0);
    assert_eq!(sample(&m, "wirefence_control_policy_version"), version as f64);
    assert_eq!(sample(&m, "wirefence_control_state_version"), cp.handle.registry().current().version as f64);
    assert_eq!(sample(&m, "wirefence_control_enrollments_total{outcome=\"enrolled\"}"), 4.0);
    assert_eq!(sample(&m, "wirefence_control_enrollments_total{outcome=\"refused\"}"), 1.0, "the used key");
    assert_eq!(sample(&m, "wirefence_control_enrollments_total{outcome=\"unauthenticated\"}"), 1.0, "the bogus key");
    assert_eq!(sample(&m, "wirefence_control_push_seconds_count"), 2.0, "the policy's delta on both streams");

    // Streams that end are no longer counted.
    drop((first, second));
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let m = scrape(addr).await;
        if sample(&m, "wirefence_control_open_streams") == 0.0 {
            assert_eq!(sample(&m, "wirefence_control_nodes{state=\"connected\"}"), 0.0);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "closed streams still counted after 3 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn expiry(ipv4: i64, ipv6: i64) -> AgentReport {
    AgentReport {
        body: Some(agent_report::Body::CertExpiry(CertificateExpiry {
            ipv4_not_after_unix: ipv4,
            ipv6_not_after_unix: ipv6,
        })),
    }
}

/// The earliest certificate expiry any live agent reports, per family; reports are
/// untrusted: values that are no certificate time are dropped, a removed node's go with it.
#[tokio::test]
async fn earliest_reported_certificate_expiry_per_family() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start_with(dir.path(), |c| c.metrics_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let addr = cp.handle.metrics_addr.expect("a bound metrics address");
    let v4 = "wirefence_control_agent_reported_certificate_expiry_timestamp_seconds{family=\"ipv4\"}";
    let v6 = "wirefence_control_agent_reported_certificate_expiry_timestamp_seconds{family=\"ipv6\"}";
    let m = scrape(addr).await;
    assert!(!m.contains(v4) && !m.contains(v6), "nothing reported yet:\n{m}");

    let a = cp.enroll("a", 1, &[]).await;
    let b = cp.enroll("b", 2, &[]).await;
    let mut agent = cp.agent().await;
    let report = |cred: &str, msgs: Vec<AgentReport>| authed(tokio_stream::iter(msgs), cred);
    // a: both families; b: an earlier IPv4 expiry, IPv6 unknown.
    agent.report(report(&a.credential, vec![expiry(2_000_000_000, 2_100_000_000)])).await.unwrap();
    agent.report(report(&b.credential, vec![expiry(1_900_000_000, 0)])).await.unwrap();
    let m = scrape(addr).await;
    promtool_check(&m);
    assert_eq!(sample(&m, v4), 1_900_000_000.0, "b's IPv4 expiry is the earliest");
    assert_eq!(sample(&m, v6), 2_100_000_000.0, "only a knows IPv6");

    // Nonsense from b (negative, before 2000, past X.509's last second) is dropped, and the
    // report replaces b's earlier one: a's values remain.
    agent.report(report(&b.credential, vec![expiry(-5, 253_402_300_800)])).await.unwrap();
    let m = scrape(addr).await;
    assert_eq!(sample(&m, v4), 2_000_000_000.0);
    assert_eq!(sample(&m, v6), 2_100_000_000.0);
    agent.report(report(&b.credential, vec![expiry(1_800_000_000, 1_800_000_001)])).await.unwrap();
    assert_eq!(sample(&scrape(addr).await, v6), 1_800_000_001.0);

    // A removed node's reports no longer count.
    cp.admin.remove_node(RemoveNodeRequest { node: "b".into() }).await.unwrap();
    let m = scrape(addr).await;
    promtool_check(&m);
    assert_eq!(sample(&m, v4), 2_000_000_000.0);
    assert_eq!(sample(&m, v6), 2_100_000_000.0);
}
