//! Replicas: several control planes on one PostgreSQL database (a cluster of its own per
//! test). Each serves its own agents and admin socket; a change made through any of them
//! reaches every agent, in one gap-free version order.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tonic::Code;
use wirefence_control::state::GlobalState;
use wirefence_proto::v1::{GetPolicyRequest, RemoveNodeRequest, RotateCredentialRequest};
use wirefence_tests::postgres::Postgres;

/// `n` replicas on one fresh database, each with its own directory under `dir`.
async fn replicas(dir: &Path, n: usize) -> (Postgres, Vec<Cp>) {
    let pg = Postgres::start(&dir.join("pg"));
    let url = pg.create_database("control");
    let mut cps = Vec::new();
    for i in 0..n {
        let own = dir.join(format!("r{i}"));
        std::fs::create_dir(&own).unwrap();
        cps.push(start_on(&own, &url).await);
    }
    (pg, cps)
}

fn policy(port: u16) -> String {
    format!("[[rules]]\nid = \"r\"\nfrom = [\"tag:dev\"]\nto = [\"tag:db\"]\nproto = \"tcp\"\nports = [\"{port}\"]\n")
}

/// Waits until the replica publishes `version`.
async fn reaches(cp: &Cp, version: u64) -> Arc<GlobalState> {
    let mut states = cp.handle.registry().subscribe();
    let state = tokio::time::timeout(Duration::from_secs(5), states.wait_for(|s| s.version >= version))
        .await
        .unwrap_or_else(|_| panic!("version {version} not published within 5 s"))
        .unwrap()
        .clone();
    state
}

#[tokio::test]
async fn a_policy_applied_on_one_replica_reaches_agents_watching_another() {
    let dir = tempfile::tempdir().unwrap();
    let (_pg, mut cps) = replicas(dir.path(), 2).await;
    let laptop = cps[0].enroll("laptop", 1, &["dev"]).await;
    cps[0].enroll("db1", 2, &["db"]).await;
    let enrolled = cps[0].handle.registry().current().version;
    reaches(&cps[1], enrolled).await;
    // The node enrolled on A authenticates on B.
    let mut stream = watch(&cps[1], &laptop.credential, 0).await.unwrap();
    assert_eq!(next(&mut stream).await.unwrap().version, enrolled);

    let t0 = Instant::now();
    let version = cps[0].apply(&policy(5432)).await.unwrap();
    let update = next(&mut stream).await.unwrap();
    let took = t0.elapsed();
    assert_eq!(update.version, version);
    assert!(took < Duration::from_millis(900), "a notification, not the poll, carries it: {took:?}");
    let shown = cps[1].admin.get_policy(GetPolicyRequest {}).await.unwrap().into_inner();
    assert_eq!(shown.source, policy(5432), "B shows what A applied");
}

#[tokio::test]
async fn concurrent_changes_on_three_replicas_make_one_gap_free_history_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let (_pg, mut cps) = replicas(dir.path(), 3).await;
    let laptop = cps[0].enroll("laptop", 1, &["dev"]).await;
    cps[1].enroll("db1", 2, &["db"]).await;
    let start = cps[1].handle.registry().current().version;
    let mut streams = Vec::new();
    for cp in &cps {
        streams.push(watch(cp, &laptop.credential, 0).await.unwrap());
    }

    // Policies and enrollments at once, through every replica.
    let per_replica = 6u16;
    let mut work = Vec::new();
    for (r, cp) in cps.iter().enumerate() {
        let mut admin = cp.admin.clone();
        let addr = cp.addr();
        work.push(tokio::spawn(async move {
            for i in 0..per_replica {
                let port = 1000 + r as u16 * 100 + i;
                let req = wirefence_proto::v1::ApplyPolicyRequest { file_name: "p.toml".into(), source: policy(port) };
                admin.apply_policy(req).await.expect("apply");
            }
            let _ = addr;
        }));
    }
    for (r, cp) in cps.iter_mut().enumerate() {
        let n = 10 + r as u8;
        cp.enroll(&format!("extra{r}"), n, &["db"]).await;
    }
    for w in work {
        w.await.unwrap();
    }
    let last = start + 3 * u64::from(per_replica) + 3;

    // Every replica published every version, and the same state under each.
    let finals: Vec<_> = futures::future::join_all(cps.iter().map(|cp| reaches(cp, last))).await;
    for f in &finals {
        assert_eq!(f.version, last, "no version beyond the changes made");
    }
    for v in start + 1..=last {
        let states: Vec<_> = cps.iter().map(|cp| cp.handle.registry().at_version(v)).collect();
        let first = states[0].as_ref().unwrap_or_else(|| panic!("replica 0 never published {v}"));
        for (r, s) in states.iter().enumerate() {
            let s = s.as_ref().unwrap_or_else(|| panic!("replica {r} never published {v}"));
            assert_eq!(s.nodes, first.nodes, "version {v}: replica {r} has other nodes");
            assert_eq!(s.policy, first.policy, "version {v}: replica {r} has another policy");
        }
    }
    // Agents on every replica see versions only go up, ending at the last.
    for (r, stream) in streams.iter_mut().enumerate() {
        let mut seen = next(stream).await.unwrap().version;
        while seen < last {
            let v = next(stream).await.unwrap().version;
            assert!(v > seen, "replica {r}: version {v} after {seen}");
            seen = v;
        }
        assert_eq!(seen, last);
    }
}

#[tokio::test]
async fn a_node_removed_on_one_replica_loses_its_stream_on_another_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let (_pg, mut cps) = replicas(dir.path(), 2).await;
    let laptop = cps[0].enroll("laptop", 1, &[]).await;
    reaches(&cps[1], cps[0].handle.registry().current().version).await;
    let mut stream = watch(&cps[1], &laptop.credential, 0).await.unwrap();
    next(&mut stream).await.unwrap();

    let t0 = Instant::now();
    cps[0].admin.remove_node(RemoveNodeRequest { node: "laptop".into() }).await.unwrap();
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(2), stream.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Err(status)) => break status,
            Ok(Ok(None)) => panic!("stream ended without a status"),
            Err(_) => panic!("the stream on B outlived the removal on A by 2 s"),
        }
    };
    assert!(t0.elapsed() < Duration::from_secs(1), "ended after {:?}", t0.elapsed());
    assert_eq!(ended.code(), Code::PermissionDenied, "{ended:?}");
    // And B refuses the credential from now on.
    assert_code(watch(&cps[1], &laptop.credential, 0).await, Code::PermissionDenied, "removed");
}

#[tokio::test]
async fn a_single_use_key_raced_on_two_replicas_enrolls_exactly_one_node() {
    let dir = tempfile::tempdir().unwrap();
    let (_pg, mut cps) = replicas(dir.path(), 2).await;
    let key = cps[0].key(true, 0, &[]).await;
    let mut won = 0;
    for r in race(&cps, &key, 8, "racer").await {
        match r {
            Ok(_) => won += 1,
            Err(s) => assert_eq!(s.code(), Code::PermissionDenied, "{s:?}"),
        }
    }
    assert_eq!(won, 1, "one node across both replicas");
}

#[tokio::test]
async fn a_credential_rotated_through_one_replica_is_accepted_by_another_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (_pg, mut cps) = replicas(dir.path(), 2).await;
    let laptop = cps[0].enroll("laptop", 1, &[]).await;
    reaches(&cps[1], cps[0].handle.registry().current().version).await;
    let mut agent = cps[0].agent().await;
    let new = agent.rotate_credential(authed(RotateCredentialRequest {}, &laptop.credential)).await.unwrap();
    let new = new.into_inner().credential;
    // No version comes with a rotation: B learns it from the notification alone.
    let t0 = Instant::now();
    loop {
        match watch(&cps[1], &new, 0).await {
            Ok(_) => break,
            Err(s) if s.code() == Code::Unauthenticated && t0.elapsed() < Duration::from_secs(1) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(s) => panic!("B refused the rotated credential for {:?}: {s:?}", t0.elapsed()),
        }
    }
}

#[tokio::test]
async fn a_node_enrolled_on_one_replica_is_served_by_another_before_its_follower_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_pg, mut cps) = replicas(dir.path(), 2).await;
    // B's follower is stuck (a notification lost, the poll not yet due): the agent's first
    // session after enrolling through A lands on B.
    let b = cps[1].handle.registry().clone();
    let held = b.hold_following().await;
    let laptop = cps[0].enroll("laptop", 1, &[]).await;
    let enrolled = cps[0].handle.registry().current().version;
    assert!(b.current().version < enrolled);
    let release = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(held);
    };
    let (watched, ()) = tokio::join!(watch(&cps[1], &laptop.credential, 0), release);
    let mut stream = watched.expect("B reads the database before refusing a credential it does not know");
    assert_eq!(next(&mut stream).await.unwrap().version, enrolled, "and serves the state with the node in it");
}

#[tokio::test]
async fn unknown_credentials_in_a_flood_share_one_database_refresh() {
    let dir = tempfile::tempdir().unwrap();
    let (_pg, cps) = replicas(dir.path(), 2).await;
    let t0 = Instant::now();
    // Fewer than the 64 connections one source may open.
    let forged: Vec<String> = (0..48).map(|i| format!("n{i:012}.{}", "A".repeat(43))).collect();
    let answers = futures::future::join_all(forged.iter().map(|c| watch(&cps[1], c, 0))).await;
    for a in answers {
        assert_eq!(a.err().map(|s| s.code()), Some(Code::Unauthenticated));
    }
    // One refresh for the lot (two if some arrive while the first runs), not one each.
    let refreshes = cps[1].handle.registry().miss_refreshes();
    assert!((1..=2).contains(&refreshes), "{refreshes} refreshes for 48 misses");
    // And none waits long for it.
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
}

#[tokio::test]
async fn enrollments_racing_on_two_replicas_get_distinct_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let (_pg, mut cps) = replicas(dir.path(), 2).await;
    let key = cps[0].key(false, 0, &[]).await;
    let mut addresses = std::collections::BTreeSet::new();
    for r in race(&cps, &key, 12, "node").await {
        let reply = r.expect("every enrollment succeeds, on either replica");
        for a in reply.addresses {
            assert!(addresses.insert(format!("{a:?}")), "address {a:?} given out twice");
        }
    }
    assert_eq!(addresses.len(), 24, "one IPv4 and one IPv6 address per node");
    let last = cps[0].handle.registry().current().version.max(cps[1].handle.registry().current().version);
    assert_eq!(reaches(&cps[0], last).await.nodes.len(), 12);
    assert_eq!(reaches(&cps[1], last).await.nodes.len(), 12);
}

#[tokio::test]
async fn an_agent_failing_over_resumes_on_another_replica_with_a_delta() {
    let dir = tempfile::tempdir().unwrap();
    let (_pg, mut cps) = replicas(dir.path(), 2).await;
    let laptop = cps[0].enroll("laptop", 1, &["dev"]).await;
    cps[0].enroll("db1", 2, &["db"]).await;
    let v1 = cps[0].apply(&policy(5432)).await.unwrap();
    let mut on_a = watch(&cps[0], &laptop.credential, 0).await.unwrap();
    assert_eq!(next(&mut on_a).await.unwrap().version, v1);

    // A goes away; a change is made on B meanwhile; the agent resumes there from v1.
    let a = cps.remove(0);
    a.handle.shutdown().await.unwrap();
    let v2 = cps[0].apply(&policy(22)).await.unwrap();
    let mut on_b = watch(&cps[0], &laptop.credential, v1).await.unwrap();
    let first = next(&mut on_b).await.unwrap();
    assert_eq!(first.version, v2);
    assert_eq!(delta(&first).base_version, v1, "a delta from the applied version");
    let text = scrape(cps[0].handle.metrics_addr.expect("metrics served")).await;
    assert!(text.contains("wirefence_control_watch_starts_total{first=\"delta\"} 1"), "{text}");
}
