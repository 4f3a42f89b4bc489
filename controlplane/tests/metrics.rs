//! `serve --metrics-listen`: what the control plane exposes matches what happened, and the
//! exposition passes `promtool check metrics`.

mod common;

use std::time::Duration;

use common::*;
use wirefence_proto::v1::{RemoveNodeRequest, WatchRequest};

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

    let req = WatchRequest { resume_from: 0, incarnation: cp.handle.registry().incarnation().to_owned() };
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
