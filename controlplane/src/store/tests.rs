use std::fs;
use std::os::unix::fs::PermissionsExt;

use super::*;

fn node(id: &str) -> NodeRec {
    NodeRec {
        id: id.into(),
        hostname: format!("h-{id}"),
        bound: true,
        public_key: [7; 32],
        addresses: vec!["10.77.0.1/32".parse().unwrap(), "fd77::1/128".parse().unwrap()],
        endpoints: vec!["192.0.2.1:51820".parse().unwrap(), "[2001:db8::1]:51820".parse().unwrap()],
        routes: vec!["10.88.0.0/24".parse().unwrap()],
        tags: vec!["web".into()],
        refused_routes: vec![],
    }
}

fn sqlite(path: &Path) -> DbLocation {
    DbLocation::Sqlite(path.to_path_buf())
}

#[tokio::test]
async fn roundtrip_versions_and_permissions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/control.db");
    {
        let s = Store::open(&sqlite(&path)).await.unwrap();
        assert_eq!(s.version().await.unwrap(), 1);
        let mut tx = s.begin().await.unwrap();
        insert_node(&mut tx, &node("n1"), &[1; 32], &["10.88.0.0/16".parse().unwrap()]).await.unwrap();
        assert_eq!(s.commit(tx, Some(&Change::Node(node("n1")))).await.unwrap(), 2);
        let mut tx = s.begin().await.unwrap();
        set_policy(&mut tx, "p.toml", "# empty").await.unwrap();
        let policy = Change::Policy { file_name: "p.toml".into(), source: "# empty".into() };
        assert_eq!(s.commit(tx, Some(&policy)).await.unwrap(), 3);
        let log = s.changes_after(1, 10).await.unwrap();
        assert_eq!(log.iter().map(|(v, _)| *v).collect::<Vec<_>>(), [2, 3], "one log entry per version");
        assert_eq!(Change::decode(3, &log[1].1).unwrap(), policy);
        assert_eq!(s.changes_after(3, 10).await.unwrap(), []);
        s.record_applied("n1", 3).await.unwrap();
        // A change dropped before its commit leaves nothing, not even its version.
        let mut tx = s.begin().await.unwrap();
        mark_removed(&mut tx, "n1").await.unwrap();
        drop(tx);
        assert_eq!(s.version().await.unwrap(), 3);
    }
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let s = Store::open(&sqlite(&path)).await.unwrap();
    let sync: i64 = sqlx::query_scalar("PRAGMA synchronous").fetch_one(&s.pool).await.unwrap();
    assert_eq!(sync, 2, "synchronous=FULL");
    let journal: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&s.pool).await.unwrap();
    assert_eq!(journal, "wal");
    assert_eq!(s.version().await.unwrap(), 3);
    let rows = s.nodes().await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].rec, node("n1"));
    assert!(!rows[0].removed);
    assert_eq!(rows[0].applied_version, 3);
    assert_eq!(s.policy().await.unwrap(), Some(("p.toml".into(), "# empty".into(), 3)));
    let (credentials, seen) = credential_rows(&s.pool, -1).await.unwrap();
    assert_eq!(credentials.get("n1"), Some(&Entry { hash: vec![1; 32], pending: None, removed: false }));
    assert_eq!(credentials.get("n2"), None);
    // A reload after `seen` reads only what changed since, and the index follows it.
    assert!(credential_rows(&s.pool, seen).await.unwrap().0.is_empty());
    let rotated = crate::auth::Token::generate("n1".into());
    let mut tx = s.begin().await.unwrap();
    set_pending_credential(&mut tx, "n1", &rotated.hash()).await.unwrap();
    s.commit(tx, None).await.unwrap();
    let (changed, after) = credential_rows(&s.pool, seen).await.unwrap();
    assert_eq!(changed.keys().collect::<Vec<_>>(), ["n1"]);
    assert!(after > seen);
    assert!(s.credentials().is_pending(&rotated), "the commit's reload took it in");
    assert_eq!(s.standing("n1").await.unwrap().granted_routes, vec!["10.88.0.0/16".parse::<IpNet>().unwrap()]);
    assert_eq!(s.removed_with_key(&[7; 32]).await.unwrap(), None);
    assert_eq!(s.standing("n1").await.unwrap().claimed_hostname, "h-n1", "what it enrolled with");
}

#[tokio::test]
async fn old_databases_gain_the_new_columns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.db");
    {
        // As the first release left it, before versioned migrations.
        let pool = open_sqlite(&path).await.unwrap();
        sqlx::raw_sql(
            "CREATE TABLE nodes (id TEXT PRIMARY KEY, hostname TEXT NOT NULL, public_key BLOB NOT NULL, \
             addresses TEXT NOT NULL, endpoints TEXT NOT NULL, routes TEXT NOT NULL, tags TEXT NOT NULL, \
             credential_hash BLOB NOT NULL, removed INTEGER NOT NULL DEFAULT 0, \
             applied_version INTEGER NOT NULL DEFAULT 0, last_error TEXT NOT NULL DEFAULT '', \
             last_seen INTEGER NOT NULL DEFAULT 0);
             INSERT INTO nodes (id, hostname, public_key, addresses, endpoints, routes, tags, credential_hash) \
             VALUES ('n1', 'h', zeroblob(32), '[]', '[]', '[\"10.88.0.0/24\"]', '[]', x'00');
             CREATE TABLE enrollment_keys (id TEXT PRIMARY KEY, hash BLOB NOT NULL, \
             single_use INTEGER NOT NULL, used INTEGER NOT NULL DEFAULT 0, expires INTEGER NOT NULL, \
             tags TEXT NOT NULL);
             INSERT INTO enrollment_keys (id, hash, single_use, expires, tags) VALUES ('k1', x'00', 0, 0, '[]');
             CREATE TABLE counter (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL);
             INSERT INTO counter (id, version) VALUES (1, 41);",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
    }
    let s = Store::open(&sqlite(&path)).await.unwrap();
    assert_eq!(s.version().await.unwrap(), 41, "the version goes on");
    assert_eq!(s.standing("n1").await.unwrap().granted_routes, vec!["10.88.0.0/24".parse::<IpNet>().unwrap()]);
    let k1 = s.key("k1").await.unwrap().unwrap();
    assert!(k1.routes.is_empty());
    assert_eq!((k1.max_uses, k1.uses, k1.revoked, k1.hostname), (0, 0, false, None));
    // Live nodes of old databases keep their names, and register with them.
    assert!(s.nodes().await.unwrap()[0].rec.bound);
    assert_eq!(s.standing("n1").await.unwrap().claimed_hostname, "h");
    let incarnation = s.incarnation().await.unwrap();
    assert_eq!(incarnation.len(), 32);
    drop(s);
    let again = Store::open(&sqlite(&path)).await.unwrap();
    assert_eq!(again.incarnation().await.unwrap(), incarnation, "kept across opens");
    assert_eq!(again.version().await.unwrap(), 41);
}

#[tokio::test]
async fn a_recreated_database_is_a_new_incarnation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.db");
    let first = Store::open(&sqlite(&path)).await.unwrap().incarnation().await.unwrap();
    assert_eq!(Store::open(&sqlite(&path)).await.unwrap().incarnation().await.unwrap(), first);
    for f in ["control.db", "control.db-wal", "control.db-shm"] {
        let _ = fs::remove_file(dir.path().join(f));
    }
    let second = Store::open(&sqlite(&path)).await.unwrap();
    assert_eq!(second.version().await.unwrap(), 1);
    assert_ne!(second.incarnation().await.unwrap(), first);
}

#[tokio::test]
async fn one_elector_at_a_time_and_a_lapsed_one_cannot_commit() {
    let dir = tempfile::tempdir().unwrap();
    let pg = wirefence_tests::postgres::Postgres::start(&dir.path().join("pg"));
    let s = Store::open(&pg.create_database("control").parse().unwrap()).await.unwrap();
    assert!(s.lease("a", 300).await.unwrap());
    assert!(!s.lease("b", 300).await.unwrap(), "a's lease runs");
    assert!(s.lease("a", 300).await.unwrap(), "the holder renews");
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert!(s.lease("b", 60_000).await.unwrap(), "a's lease lapsed");
    let mut tx = s.begin().await.unwrap();
    assert!(!s.holds_lease(&mut tx, "a").await.unwrap(), "a lapsed elector is fenced off");
    assert!(s.holds_lease(&mut tx, "b").await.unwrap());
    // The primaries an election commits are what a reload finds.
    let primaries: std::collections::BTreeMap<IpNet, String> = [("10.88.0.0/24".parse().unwrap(), "n1".into())].into();
    s.commit(tx, Some(&Change::Primaries(primaries.clone()))).await.unwrap();
    assert_eq!(s.primaries().await.unwrap(), primaries);
    // A server shutting down hands the lease over at once.
    s.release_lease("b").await.unwrap();
    assert!(s.lease("a", 300).await.unwrap());
}

#[tokio::test]
async fn a_restarted_sqlite_server_takes_the_lease_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&sqlite(&dir.path().join("control.db"))).await.unwrap();
    assert!(s.lease("before", 60_000).await.unwrap());
    // One server per SQLite file (flock): the lease of the one before it is no obstacle.
    assert!(s.lease("after", 60_000).await.unwrap());
    let mut tx = s.begin().await.unwrap();
    assert!(!s.holds_lease(&mut tx, "before").await.unwrap());
}

#[tokio::test]
async fn observations_of_silent_servers_expire() {
    use crate::election::{Observation, Tunnel};
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&sqlite(&dir.path().join("control.db"))).await.unwrap();
    let seen = |stream, tunnel| Observation { stream, healthy: stream, checked: true, priority: 150, tunnel };
    let net: IpNet = "10.88.0.0/24".parse().unwrap();
    let a: crate::election::Observed = [((net, "n1".to_string()), seen(true, Tunnel::Unknown))].into();
    let b: crate::election::Observed = [((net, "n1".to_string()), seen(false, Tunnel::Dead))].into();
    s.share_observations("a", &a).await.unwrap();
    s.share_observations("b", &b).await.unwrap();
    let mut all = s.observations().await.unwrap();
    all.sort_by_key(|o| o.values().next().unwrap().stream);
    assert_eq!(all, [b.clone(), a.clone()], "each server's word as shared");
    // Sharing again replaces a server's rows.
    s.share_observations("a", &Default::default()).await.unwrap();
    assert_eq!(s.observations().await.unwrap(), [b]);
    // A server that stopped sharing (killed) is not heard after the freshness window.
    sqlx::query("UPDATE observers SET shared_ms = shared_ms - $1")
        .bind(routes::OBSERVATIONS_FRESH_MS + 1)
        .execute(&s.pool)
        .await
        .unwrap();
    assert!(s.observations().await.unwrap().is_empty());
}

fn flow(at_ms: i64, src: &str, dst: &str, direction: crate::flows::Direction, rule: &str) -> crate::flows::Flow {
    crate::flows::Flow {
        at_ms,
        direction,
        verdict: if rule.is_empty() { crate::flows::Verdict::Deny } else { crate::flows::Verdict::Allow },
        protocol: 6,
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        src_port: 40000,
        dst_port: 443,
        rule_id: rule.into(),
        packets: 3,
        bytes: 180,
        ended: false,
    }
}

/// Flow records on one engine: filters, pairing of the two ends, refused counts, pruning.
async fn flows_on(s: &Store) {
    use crate::flows::{Direction::*, Verdict, PAIR_WINDOW_MS};
    let t = 1_000_000_000;
    s.insert_flows(&[
        // One flow from both ends, and its reply direction must not pair with it.
        ("a".into(), flow(t, "10.77.0.1", "10.77.0.2", Egress, "web")),
        ("b".into(), flow(t + 900, "10.77.0.1", "10.77.0.2", Ingress, "web")),
        // From one end only.
        ("a".into(), flow(t + 1_000, "10.77.0.1", "10.77.0.3", Egress, "web")),
        // The same tuple from the other end, but too long after: no pair.
        ("a".into(), flow(t + 2_000, "10.77.0.1", "10.77.0.4", Egress, "web")),
        ("c".into(), flow(t + 2_000 + PAIR_WINDOW_MS + 1, "10.77.0.1", "10.77.0.4", Ingress, "web")),
        // A deny, IPv6.
        ("b".into(), flow(t + 3_000, "fd77::3", "fd77::2", Ingress, "")),
    ])
    .await
    .unwrap();
    let q = |f: &dyn Fn(&mut FlowQuery)| {
        let mut q = FlowQuery { limit: 100, ..Default::default() };
        f(&mut q);
        q
    };
    let all = s.flows(&q(&|_| {})).await.unwrap();
    assert_eq!(all.len(), 6);
    assert!(all.windows(2).all(|w| w[0].flow.at_ms <= w[1].flow.at_ms), "oldest first");
    let paired: Vec<bool> = all.iter().map(|f| f.paired).collect();
    assert_eq!(paired, [true, true, false, false, false, false]);
    assert_eq!(all[4].flow, flow(t + 3_000, "fd77::3", "fd77::2", Ingress, ""), "read back as written");
    let ids = |v: Vec<StoredFlow>| v.into_iter().map(|f| (f.node, f.flow.at_ms - t)).collect::<Vec<_>>();
    assert_eq!(
        ids(s.flows(&q(&|q| q.node = Some("b".into()))).await.unwrap()),
        [("b".into(), 900), ("b".into(), 3_000)]
    );
    assert_eq!(ids(s.flows(&q(&|q| q.verdict = Some(Verdict::Deny))).await.unwrap()), [("b".into(), 3_000)]);
    assert_eq!(s.flows(&q(&|q| q.rule_id = Some("web".into()))).await.unwrap().len(), 5);
    assert_eq!(s.flows(&q(&|q| q.rule_id = Some("ssh".into()))).await.unwrap().len(), 0);
    assert_eq!(s.flows(&q(&|q| q.since_ms = t + 1_000)).await.unwrap().len(), 4);
    assert_eq!(s.flows(&q(&|q| q.unpaired = true)).await.unwrap().len(), 4);
    assert_eq!(
        ids(s.flows(&q(&|q| q.limit = 2)).await.unwrap()),
        [("b".into(), 3_000), ("c".into(), 2_000 + PAIR_WINDOW_MS + 1)],
        "the newest"
    );

    // Distinct flows for a dry run: both ends' records of one flow are one, the most
    // recently seen first.
    let kinds = s.flow_kinds(t, 100).await.unwrap();
    let got: Vec<_> = kinds.iter().map(|k| (k.dst.to_string(), k.connections, k.records, k.last_ms - t)).collect();
    let want = [
        ("10.77.0.4".to_string(), 1, 2, 2_000 + PAIR_WINDOW_MS + 1),
        ("fd77::2".into(), 1, 1, 3_000),
        ("10.77.0.3".into(), 1, 1, 1_000),
        ("10.77.0.2".into(), 1, 2, 900),
    ];
    assert_eq!(got, want);
    assert_eq!(s.flow_kinds(t + 1_000, 2).await.unwrap(), kinds[..2]);

    s.add_refused("a", &Refused { over_rate: 5, invalid: 1 }).await.unwrap();
    s.add_refused("a", &Refused { over_rate: 2, invalid: 0 }).await.unwrap();
    assert_eq!(s.refused().await.unwrap(), [("a".to_string(), Refused { over_rate: 7, invalid: 1 })]);

    // By age, then by count (the oldest go first).
    assert_eq!(s.prune_flows(t + 1, 100).await.unwrap(), 1);
    assert_eq!(s.prune_flows(0, 2).await.unwrap(), 3);
    assert_eq!(
        ids(s.flows(&q(&|_| {})).await.unwrap()),
        [("b".into(), 3_000), ("c".into(), 2_000 + PAIR_WINDOW_MS + 1)]
    );

    // A batch of several statements' worth, each record read back.
    let many: Vec<(String, crate::flows::Flow)> = (0..1_201)
        .map(|i| {
            (
                "d".to_string(),
                crate::flows::Flow { src_port: i, ..flow(t + 10_000, "10.77.0.5", "10.77.0.6", Egress, "web") },
            )
        })
        .collect();
    s.insert_flows(&many).await.unwrap();
    let mut ports: Vec<u16> = s
        .flows(&q(&|q| {
            q.node = Some("d".into());
            q.limit = 5_000
        }))
        .await
        .unwrap()
        .iter()
        .map(|f| f.flow.src_port)
        .collect();
    ports.sort_unstable();
    assert_eq!(ports, (0..1_201).collect::<Vec<u16>>());

    // A flow's end goes on its start's record (the same node's, the nearest in time, not
    // ended yet), whether in a later batch or the same; without a start it is a record.
    let start = |at, port| crate::flows::Flow {
        src_port: port,
        packets: 0,
        bytes: 0,
        ..flow(at, "10.77.0.7", "10.77.0.8", Egress, "web")
    };
    let end = |at, port, packets| crate::flows::Flow { packets, bytes: packets * 100, ended: true, ..start(at, port) };
    let t2 = t + 20_000;
    s.insert_flows(&[("e".into(), start(t2, 1)), ("e".into(), start(t2 + 60_000, 1)), ("f".into(), start(t2, 1))])
        .await
        .unwrap();
    s.insert_flows(&[
        ("e".into(), end(t2 - 3, 1, 7)),
        ("e".into(), start(t2, 2)),
        ("e".into(), end(t2 + 1, 2, 4)),
        ("e".into(), end(t2, 3, 9)),
    ])
    .await
    .unwrap();
    let got = |node: &str| {
        let node = node.to_string();
        async move {
            let q = FlowQuery { node: Some(node), limit: 100, ..Default::default() };
            s.flows(&q)
                .await
                .unwrap()
                .into_iter()
                .map(|f| (f.flow.at_ms - t2, f.flow.src_port, f.flow.packets, f.flow.bytes, f.flow.ended))
                .collect::<Vec<_>>()
        }
    };
    let mut e = got("e").await;
    e.sort();
    assert_eq!(
        e,
        [(0, 1, 7, 700, true), (0, 2, 4, 400, true), (0, 3, 9, 900, true), (60_000, 1, 0, 0, false)],
        "each end on the nearest start of its own node's flow; one without a start kept"
    );
    assert_eq!(got("f").await, [(0, 1, 0, 0, false)], "another node's record of the tuple is not touched");
}

#[tokio::test]
async fn flow_records_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&sqlite(&dir.path().join("control.db"))).await.unwrap();
    flows_on(&s).await;
    usage_on(&s).await;
}

/// Rule hits: added up per rule and minute (two servers' increments into one row), summed
/// over a window of minutes, pruned by age.
async fn usage_on(s: &Store) {
    use super::Hits;
    let hits = |v: &[(&str, u64)]| -> std::collections::BTreeMap<String, Hits> {
        v.iter().map(|(id, n)| (id.to_string(), Hits { packets: *n, bytes: n * 10 })).collect()
    };
    let read = |since| async move {
        s.rule_usage(since).await.unwrap().into_iter().collect::<std::collections::BTreeMap<_, _>>()
    };
    s.add_rule_usage(60_000, &hits(&[("web", 3), ("ssh", 1)])).await.unwrap();
    s.add_rule_usage(60_000, &hits(&[("web", 4)])).await.unwrap();
    s.add_rule_usage(120_000, &hits(&[("web", 5)])).await.unwrap();
    assert_eq!(read(0).await, hits(&[("web", 12), ("ssh", 1)]));
    assert_eq!(read(120_000).await, hits(&[("web", 5)]));
    assert_eq!(s.prune_rule_usage(120_000).await.unwrap(), 2);
    assert_eq!(read(0).await, hits(&[("web", 5)]));
    // Sums beyond an i64 are clamped, not an error.
    let huge = |minute| async move {
        let h = [("big".to_string(), Hits { packets: 1 << 62, bytes: 1 << 62 })].into_iter().collect();
        s.add_rule_usage(minute, &h).await.unwrap();
    };
    huge(180_000).await;
    huge(240_000).await;
    let big = read(0).await["big"];
    assert!(big.packets >= 9_200_000_000_000_000_000 && big.bytes >= 9_200_000_000_000_000_000, "{big:?}");
}

#[tokio::test]
async fn flow_records_on_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let pg = wirefence_tests::postgres::Postgres::start(&dir.path().join("pg"));
    let s = Store::open(&pg.create_database("control").parse().unwrap()).await.unwrap();
    flows_on(&s).await;
    usage_on(&s).await;
}
