//! Stream bookkeeping: what reports and Watch connects cost the database, Watch's
//! resume_from as an acknowledgement, and report streams outliving their node.

mod common;

use std::time::Duration;

use common::*;
use tonic::Code;
use wirefence_proto::v1::{
    agent_report, AgentReport, Applied, ApplyFailed, FlowRecord, FlowRecords, GetNodeRequest, PeerStat, PeerStats,
    RemoveNodeRequest,
};

fn body(b: agent_report::Body) -> AgentReport {
    AgentReport { body: Some(b) }
}

/// Changes committed to the database by anyone else since the last call on `conn`.
async fn data_version(conn: &mut sqlx::SqliteConnection) -> i64 {
    sqlx::query_scalar("PRAGMA data_version").fetch_one(conn).await.unwrap()
}

#[tokio::test]
async fn observations_stay_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    let me = cp.enroll("laptop", 1, &[]).await;
    let url = format!("sqlite://{}", dir.path().join("control.db").display());
    let mut db = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url).await.unwrap();
    let before = data_version(&mut db).await;

    let stats = |rx| {
        body(agent_report::Body::Stats(PeerStats {
            peers: (0..64u8)
                .map(|k| PeerStat { public_key: vec![k; 32], rx_bytes: rx, ..Default::default() })
                .collect(),
        }))
    };
    let flows = body(agent_report::Body::Flows(FlowRecords { records: vec![FlowRecord::default()] }));
    let msgs = vec![stats(1), AgentReport::default(), flows, stats(2)];
    let mut agent = cp.agent().await;
    agent.report(authed(tokio_stream::iter(msgs), &me.credential)).await.unwrap();
    let _watching = watch(&cp, &me.credential, 0).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let n = cp.admin.get_node(GetNodeRequest { node: "laptop".into() }).await.unwrap().into_inner();
    assert_eq!(n.peer_stats.len(), 64);
    assert!(n.peer_stats.iter().all(|s| s.rx_bytes == 2), "the last report wins");
    assert!(n.connected && n.last_seen_unix > 0);
    assert_eq!(data_version(&mut db).await, before, "statistics, contact and connects must not write the database");
}

#[tokio::test]
async fn resume_from_acknowledges_the_version() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    let me = cp.enroll("laptop", 1, &[]).await;
    let v1 = cp.apply("").await.unwrap();
    let v2 = cp.apply("# again").await.unwrap();
    let show = |mut admin: wirefence_control::admin_client::AdminClient| async move {
        let n = admin.get_node(GetNodeRequest { node: "laptop".into() }).await.unwrap().into_inner();
        (n.applied_version, n.last_error)
    };

    // The agent applied v1, its report was lost, it comes back resuming from v1.
    drop(watch(&cp, &me.credential, v1).await.unwrap());
    assert_eq!(show(cp.admin.clone()).await, (v1, String::new()));

    // It failed v2 and resumes from v1 again: the failure stays visible.
    let failed = vec![body(agent_report::Body::Failed(ApplyFailed { version: v2, reason: "no".into() }))];
    cp.agent().await.report(authed(tokio_stream::iter(failed), &me.credential)).await.unwrap();
    drop(watch(&cp, &me.credential, v1).await.unwrap());
    assert_eq!(show(cp.admin.clone()).await, (v1, "no".into()));

    // Resuming from v2 means it runs v2 now; a future version or 0 acknowledges nothing.
    drop(watch(&cp, &me.credential, v2).await.unwrap());
    assert_eq!(show(cp.admin.clone()).await, (v2, String::new()));
    drop(watch(&cp, &me.credential, v2 + 5).await.unwrap());
    drop(watch(&cp, &me.credential, 0).await.unwrap());
    assert_eq!(show(cp.admin.clone()).await, (v2, String::new()));

    // An Applied report still records as before.
    let applied = vec![body(agent_report::Body::Applied(Applied { version: v1 }))];
    cp.agent().await.report(authed(tokio_stream::iter(applied), &me.credential)).await.unwrap();
    assert_eq!(show(cp.admin.clone()).await, (v1, String::new()));
}

#[tokio::test]
async fn removal_ends_an_idle_report_stream() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    let me = cp.enroll("laptop", 1, &[]).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<AgentReport>(1);
    let mut agent = cp.agent().await;
    let report = tokio::spawn(async move {
        agent.report(authed(tokio_stream::wrappers::ReceiverStream::new(rx), &me.credential)).await
    });
    tx.send(AgentReport::default()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    cp.admin.remove_node(RemoveNodeRequest { node: "laptop".into() }).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), report).await.expect("the stream ends").unwrap();
    assert_code(ended, Code::PermissionDenied, "removed");
    drop(tx);
}
