//! The control plane on a real PostgreSQL (a cluster of its own per test, on a Unix
//! socket): state and versions across restarts, a single-use key raced, and what an outage
//! of the database does to admins and to agents' streams. Replicas: tests/replicas.rs.

mod common;

use std::time::Duration;

use common::*;
use tonic::Code;
use wirefence_control::server::{serve, ServeConfig};
use wirefence_control::store::DbLocation;
use wirefence_proto::v1::{GetPolicyRequest, ListNodesRequest};
use wirefence_tests::postgres::Postgres;

/// A PostgreSQL cluster in `dir` with one database, and a control plane on it.
async fn on_postgres(dir: &std::path::Path) -> (Postgres, String, Cp) {
    let pg = Postgres::start(&dir.join("pg"));
    let url = pg.create_database("control");
    let cp = start_on(dir, &url).await;
    (pg, url, cp)
}

#[tokio::test]
async fn nodes_policy_and_versions_survive_a_restart_on_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let (_pg, url, mut cp) = on_postgres(dir.path()).await;
    let laptop = cp.enroll("laptop", 1, &["dev"]).await;
    cp.enroll("db1", 2, &["db"]).await;
    let policy =
        "[[rules]]\nid = \"pg\"\nfrom = [\"tag:dev\"]\nto = [\"tag:db\"]\nproto = \"tcp\"\nports = [\"5432\"]\n";
    let version = cp.apply(policy).await.unwrap();
    let incarnation = cp.handle.registry().incarnation().to_owned();
    let first = next(&mut watch(&cp, &laptop.credential, 0).await.unwrap()).await.unwrap();
    assert_eq!(first.version, version);
    assert_eq!(peer_names(snapshot(&first)), vec!["db1"]);
    cp.handle.shutdown().await.unwrap();

    let mut cp = start_on(dir.path(), &url).await;
    assert_eq!(cp.handle.registry().current().version, version, "the version goes on from the database");
    assert_eq!(cp.handle.registry().incarnation(), incarnation, "the same history");
    let nodes = cp.admin.list_nodes(ListNodesRequest::default()).await.unwrap().into_inner().nodes;
    let mut names: Vec<_> = nodes.iter().map(|n| n.hostname.clone()).collect();
    names.sort();
    assert_eq!(names, ["db1", "laptop"]);
    let shown = cp.admin.get_policy(GetPolicyRequest::default()).await.unwrap().into_inner();
    assert_eq!(shown.source, policy);
    // The agent's credential is the database's, not the process's.
    let again = next(&mut watch(&cp, &laptop.credential, 0).await.unwrap()).await.unwrap();
    assert_eq!(peer_names(snapshot(&again)), vec!["db1"]);
    assert_eq!(cp.apply("").await.unwrap(), version + 1, "versions stay gap-free");
}

#[tokio::test]
async fn a_single_use_key_raced_enrolls_exactly_one_node() {
    let dir = tempfile::tempdir().unwrap();
    let (_pg, _url, mut cp) = on_postgres(dir.path()).await;
    let key = cp.key(true, 0, &[]).await;
    let cps = [cp];
    let mut won = 0;
    for r in race(&cps, &key, 8, "racer").await {
        match r {
            Ok(_) => won += 1,
            Err(s) => assert_eq!(s.code(), Code::PermissionDenied, "{s:?}"),
        }
    }
    assert_eq!(won, 1, "a single-use key enrolls one node");
    let [mut cp] = cps;
    let nodes = cp.admin.list_nodes(ListNodesRequest::default()).await.unwrap().into_inner().nodes;
    assert_eq!(nodes.len(), 1);
}

#[tokio::test]
async fn while_postgres_is_down_admin_changes_fail_clearly_and_streams_stay_then_it_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let (pg, _url, mut cp) = on_postgres(dir.path()).await;
    let laptop = cp.enroll("laptop", 1, &["dev"]).await;
    cp.enroll("db1", 2, &["db"]).await;
    let v1 = cp.apply("").await.unwrap();
    let mut stream = watch(&cp, &laptop.credential, 0).await.unwrap();
    assert_eq!(next(&mut stream).await.unwrap().version, v1);

    pg.stop();
    let err = cp.apply("# while down").await.expect_err("no change without the database");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("database unavailable"), "{}", err.message());
    assert_eq!(cp.handle.registry().current().version, v1, "nothing half-applied");
    // The connected agent keeps its stream, and is sent nothing.
    silent(&mut stream, 500).await;
    // An agent that comes back meanwhile (its replica died, it restarted) registers from
    // the state in memory and resumes where it is, without the database.
    let mut agent = cp.agent().await;
    let again = agent.register(authed(register_req("laptop", 1, ""), &laptop.credential)).await;
    let again = again.expect("a known node registers while the database is down").into_inner();
    assert_eq!((again.node_id.as_str(), again.addresses.len()), (laptop.node_id.as_str(), laptop.addresses.len()));
    let mut resumed = watch(&cp, &laptop.credential, v1).await.expect("it resumes its stream");
    silent(&mut resumed, 300).await;
    // One that would change something (another key) is told to come back later.
    let changed = agent.register(authed(register_req("laptop", 7, ""), &laptop.credential)).await;
    assert_code(changed, Code::Unavailable, "database unavailable");

    pg.restart();
    let policy =
        "[[rules]]\nid = \"ssh\"\nfrom = [\"tag:dev\"]\nto = [\"tag:db\"]\nproto = \"tcp\"\nports = [\"22\"]\n";
    let v2 = cp.apply(policy).await.expect("changes work again once the database is back");
    assert_eq!(v2, v1 + 1, "the failed change took no version");
    let update = tokio::time::timeout(Duration::from_secs(5), next(&mut stream)).await.unwrap().unwrap();
    assert_eq!(update.version, v2, "the same stream carries the change");
    let update = tokio::time::timeout(Duration::from_secs(5), next(&mut resumed)).await.unwrap().unwrap();
    assert_eq!(update.version, v2, "and so does the one resumed during the outage");
}

#[tokio::test]
async fn an_unreachable_database_at_start_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("postgres://wirefence:sekrit@localhost/control?host={}", dir.path().display());
    let db: DbLocation = url.parse().unwrap();
    assert!(!db.to_string().contains("sekrit"), "a password is never shown: {db}");
    let err = serve(ServeConfig::new(db, dir.path().join("a.sock"))).await.err().expect("no database, no server");
    assert!(err.to_string().contains("database unavailable"), "{err}");
    assert!(!err.to_string().contains("sekrit"), "{err}");
}
