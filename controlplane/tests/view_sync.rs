//! Whether `nodes list`/`nodes show` say a node runs its current view: versions count every
//! change of the mesh, a node is sent only the changes of its own view, so its applied
//! version alone says nothing. Over real TCP against an in-process control plane.

mod common;

use std::time::Duration;

use common::*;
use wirefence_proto::v1::{agent_report, AgentReport, Applied, GetNodeRequest, Node, ViewSync};

async fn node(cp: &Cp, name: &str) -> Node {
    cp.admin.clone().get_node(GetNodeRequest { node: name.into() }).await.unwrap().into_inner()
}

fn sync(n: &Node) -> (ViewSync, u32) {
    (ViewSync::try_from(n.sync).unwrap(), n.updates_behind)
}

/// `node`'s sync once it settles (reports and stream bookkeeping land asynchronously).
async fn until_sync(cp: &Cp, name: &str, want: (ViewSync, u32)) -> Node {
    for _ in 0..50 {
        let n = node(cp, name).await;
        if sync(&n) == want {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let n = node(cp, name).await;
    panic!("{name}: wanted {want:?}, have {:?} (applied {})", sync(&n), n.applied_version);
}

async fn applied(cp: &Cp, credential: &str, version: u64) {
    let report = AgentReport { body: Some(agent_report::Body::Applied(Applied { version })) };
    cp.agent().await.report(authed(tokio_stream::iter(vec![report]), credential)).await.unwrap();
}

const LAPTOP_TO_DB: &str = r#"
[[rules]]
id = "ssh"
from = ["node:laptop"]
to = ["node:db"]
proto = "tcp"
ports = ["22"]
"#;

const LAPTOP_TO_DB_WEB: &str = r#"
[[rules]]
id = "ssh"
from = ["node:laptop"]
to = ["node:db"]
proto = "tcp"
ports = ["22", "80"]
"#;

#[tokio::test]
async fn a_node_is_in_sync_when_it_applied_every_change_of_its_own_view() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    let laptop = cp.enroll("laptop", 1, &[]).await;
    assert_eq!(sync(&node(&cp, "laptop").await).0, ViewSync::Unknown, "nothing applied yet");

    let mut stream = watch(&cp, &laptop.credential, 0).await.unwrap();
    let first = next(&mut stream).await.unwrap().version;
    until_sync(&cp, "laptop", (ViewSync::Unknown, 0)).await;
    applied(&cp, &laptop.credential, first).await;
    until_sync(&cp, "laptop", (ViewSync::InSync, 0)).await;

    // Another node enrolls: the mesh's version moves, laptop's view does not (no rule
    // between them), so it is still in sync at its older version.
    cp.enroll("db", 2, &[]).await;
    silent(&mut stream, 200).await;
    let n = until_sync(&cp, "laptop", (ViewSync::InSync, 0)).await;
    assert_eq!(n.applied_version, first);

    // Two changes of its view it has not applied: behind by 2, then in sync again.
    cp.apply(LAPTOP_TO_DB).await.unwrap();
    next(&mut stream).await.unwrap();
    let latest = cp.apply(LAPTOP_TO_DB_WEB).await.unwrap();
    assert_eq!(next(&mut stream).await.unwrap().version, latest);
    until_sync(&cp, "laptop", (ViewSync::Behind, 2)).await;
    applied(&cp, &laptop.credential, latest).await;
    until_sync(&cp, "laptop", (ViewSync::InSync, 0)).await;

    // Disconnected: judged by its last applied view against the current one.
    drop(stream);
    tokio::time::sleep(Duration::from_millis(100)).await;
    cp.enroll("web", 3, &[]).await;
    until_sync(&cp, "laptop", (ViewSync::InSync, 0)).await;
    cp.apply(LAPTOP_TO_DB).await.unwrap();
    until_sync(&cp, "laptop", (ViewSync::Behind, 0)).await;
}
