//! Watch: snapshots, deltas only to affected nodes, version ordering, resume, removal and
//! confidentiality, over real TCP against an in-process control plane.

mod common;

use common::*;
use prost::Message;
use tonic::Code;
use wirefence_proto::v1::{GetPolicyRequest, RegisterResponse, RemoveNodeRequest};

struct Mesh {
    cp: Cp,
    laptop: RegisterResponse,
    db1: RegisterResponse,
    web1: RegisterResponse,
    other: RegisterResponse,
}

async fn mesh(dir: &std::path::Path, history: usize) -> Mesh {
    let mut cp = start_with(dir, |c| c.history = history).await;
    let laptop = cp.enroll("laptop", 1, &[]).await;
    let db1 = cp.enroll("db1", 2, &[]).await;
    let web1 = cp.enroll("web1", 3, &["web"]).await;
    let other = cp.enroll("other", 4, &[]).await;
    cp.apply(POLICY).await.unwrap();
    Mesh { cp, laptop, db1, web1, other }
}

#[tokio::test]
async fn snapshots_contain_only_what_policy_allows() {
    let dir = tempfile::tempdir().unwrap();
    let m = mesh(dir.path(), 256).await;
    let version = m.cp.handle.registry().current().version;

    let mut s = watch(&m.cp, &m.laptop.credential, 0).await.unwrap();
    let u = next(&mut s).await.unwrap();
    assert_eq!(u.version, version);
    let v = snapshot(&u);
    assert_eq!(peer_names(v), ["db1", "web1"]);
    assert_eq!(v.addresses, m.laptop.addresses);
    let rules = &v.policy.as_ref().unwrap().rules;
    assert_eq!(rules.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["admin-ssh"]);
    let db1 = v.peers.iter().find(|p| p.name == "db1").unwrap();
    assert_eq!(db1.public_key, pubkey(2));
    assert_eq!(db1.allowed_ips, m.db1.addresses);
    assert_eq!(db1.persistent_keepalive, 25);
    assert!(db1.endpoint.is_some());

    let mut s = watch(&m.cp, &m.db1.credential, 0).await.unwrap();
    assert_eq!(peer_names(snapshot(&next(&mut s).await.unwrap())), ["laptop"]);

    // A node no rule mentions: no peers and a present, empty policy (deny everything).
    let mut s = watch(&m.cp, &m.other.credential, 0).await.unwrap();
    let u = next(&mut s).await.unwrap();
    let v = snapshot(&u);
    assert!(v.peers.is_empty());
    assert_eq!(v.policy.as_ref().map(|p| p.rules.len()), Some(0));
    // Resuming at the current version sends nothing.
    let mut s = watch(&m.cp, &m.other.credential, version).await.unwrap();
    silent(&mut s, 300).await;
}

#[tokio::test]
async fn nodes_never_see_credentials_or_policy_meant_for_others() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = mesh(dir.path(), 256).await;
    let mut streams = Vec::new();
    for r in [&m.laptop, &m.db1, &m.web1, &m.other] {
        streams.push(watch(&m.cp, &r.credential, 0).await.unwrap());
    }
    m.cp.apply(POLICY_PG).await.unwrap();
    let secrets: Vec<&str> =
        [&m.laptop, &m.db1, &m.web1, &m.other].iter().map(|r| r.credential.split_once('.').unwrap().1).collect();
    let mut seen = Vec::new();
    for s in streams.iter_mut() {
        let mut updates = vec![next(s).await.unwrap()];
        if let Ok(Ok(Some(u))) = tokio::time::timeout(std::time::Duration::from_millis(300), s.message()).await {
            updates.push(u);
        }
        seen.push(updates);
    }
    for (i, updates) in seen.iter().enumerate() {
        let bytes: Vec<u8> = updates.iter().flat_map(|u| u.encode_to_vec()).collect();
        for secret in &secrets {
            assert!(!contains(&bytes, secret.as_bytes()), "stream {i} carries a credential");
        }
    }
    // Rule ids as delivered (decoded, so no accidental byte matches): laptop has no
    // business with the "pg" rule; "other" receives no rule at all.
    assert_eq!(rule_ids(&seen[0]), ["admin-ssh"]);
    assert_eq!(rule_ids(&seen[1]), ["admin-ssh", "pg"]);
    assert_eq!(rule_ids(&seen[2]), ["admin-ssh", "pg"]);
    assert!(rule_ids(&seen[3]).is_empty());
}

/// Every rule id in a stream's snapshots and deltas, sorted, without duplicates.
fn rule_ids(updates: &[wirefence_proto::v1::Update]) -> Vec<String> {
    use wirefence_proto::v1::update::Body;
    let mut ids: Vec<String> = updates
        .iter()
        .filter_map(|u| match &u.body {
            Some(Body::Snapshot(v)) => v.policy.as_ref(),
            Some(Body::Delta(d)) => d.policy.as_ref(),
            None => None,
        })
        .flat_map(|p| p.rules.iter().map(|r| r.id.clone()))
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn policy_changes_reach_only_affected_nodes_with_ordered_versions() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = mesh(dir.path(), 256).await;
    let mut laptop = watch(&m.cp, &m.laptop.credential, 0).await.unwrap();
    let mut db1 = watch(&m.cp, &m.db1.credential, 0).await.unwrap();
    let mut web1 = watch(&m.cp, &m.web1.credential, 0).await.unwrap();
    let mut other = watch(&m.cp, &m.other.credential, 0).await.unwrap();
    let v0 = next(&mut laptop).await.unwrap().version;
    for s in [&mut db1, &mut web1, &mut other] {
        assert_eq!(next(s).await.unwrap().version, v0);
    }

    let v1 = m.cp.apply(POLICY_PG).await.unwrap();
    assert!(v1 > v0);
    let u = next(&mut db1).await.unwrap();
    let d = delta(&u);
    assert_eq!((u.version, d.base_version), (v1, v0));
    assert_eq!(d.upsert_peers.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["web1"]);
    assert_eq!(d.policy.as_ref().unwrap().rules.len(), 2);
    assert!(d.addresses.is_none() && d.remove_peers.is_empty());
    let u = next(&mut web1).await.unwrap();
    assert_eq!((u.version, delta(&u).base_version), (v1, v0));
    silent(&mut laptop, 300).await;
    silent(&mut other, 50).await;

    // A rejected policy changes nothing anywhere.
    let bad = format!("{POLICY}\n[[tests]]\nfrom = \"laptop\"\nto = \"web1\"\nport = 22\nexpect = \"deny\"\n");
    let err = m.cp.apply(&bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("policy.toml:19:1: tests[1] (laptop -> web1 tcp/22"), "{}", err.message());
    assert!(err.message().contains("expected deny, got allow (allowed by rule \"admin-ssh\")"), "{}", err.message());
    let err = m.cp.apply("[[rules]]\nid = \"x\"\nfrom = [\"group:nope\"]\nto = [\"*\"]\n").await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, "policy.toml:3:9: rules[0].from[0]: unknown group \"nope\"")
    );
    let p = m.cp.admin.get_policy(GetPolicyRequest {}).await.unwrap().into_inner();
    assert_eq!((p.version, p.source.as_str()), (v1, POLICY_PG));
    for s in [&mut laptop, &mut db1, &mut web1, &mut other] {
        silent(s, 100).await;
    }

    // Back to POLICY: db1 and web1 again, base = the last version sent on their stream.
    let v2 = m.cp.apply(POLICY).await.unwrap();
    assert!(v2 > v1);
    let u = next(&mut db1).await.unwrap();
    let d = delta(&u);
    assert_eq!((u.version, d.base_version), (v2, v1));
    assert_eq!(d.remove_peers, vec![pubkey(3)]);
    // The laptop stream skipped v1 (no change for it): its next delta builds on v0.
    let v3 = m.cp.apply(&POLICY.replace("[\"22\"]", "[\"22\", \"2222\"]")).await.unwrap();
    let u = next(&mut laptop).await.unwrap();
    assert_eq!((u.version, delta(&u).base_version), (v3, v0));
    assert_eq!(delta(&u).policy.as_ref().unwrap().rules[0].ports.len(), 2);
    let u = next(&mut db1).await.unwrap();
    assert_eq!((u.version, delta(&u).base_version), (v3, v2));
}

#[tokio::test]
async fn resume_from_history_gets_a_delta_and_from_an_unknown_version_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = mesh(dir.path(), 4).await;
    let v0 = m.cp.handle.registry().current().version;
    let v1 = m.cp.apply(POLICY_PG).await.unwrap();

    // db1 applied v0 and comes back: one delta v0 -> v1.
    let mut s = watch(&m.cp, &m.db1.credential, v0).await.unwrap();
    let u = next(&mut s).await.unwrap();
    let d = delta(&u);
    assert_eq!((u.version, d.base_version), (v1, v0));
    assert_eq!(d.upsert_peers.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["web1"]);
    assert!(d.policy.is_some());
    // ... then deltas on top of v1.
    let v2 = m.cp.apply(POLICY).await.unwrap();
    let u = next(&mut s).await.unwrap();
    assert_eq!((u.version, delta(&u).base_version), (v2, v1));

    // laptop resuming from v0: nothing changed for it, an empty delta moves it to now.
    let mut s = watch(&m.cp, &m.laptop.credential, v0).await.unwrap();
    let u = next(&mut s).await.unwrap();
    let d = delta(&u);
    assert_eq!((u.version, d.base_version), (v2, v0));
    assert!(d.upsert_peers.is_empty() && d.remove_peers.is_empty() && d.policy.is_none());

    // Push v0 out of the 4-state history: a snapshot again.
    for i in 0..4 {
        m.cp.apply(&POLICY.replace("admin-ssh", &format!("admin-ssh-{i}"))).await.unwrap();
    }
    let now = m.cp.handle.registry().current().version;
    let mut s = watch(&m.cp, &m.db1.credential, v0).await.unwrap();
    let u = next(&mut s).await.unwrap();
    assert_eq!(u.version, now);
    assert_eq!(peer_names(snapshot(&u)), ["laptop"]);
    // A version from the future (another database?) also gets a snapshot.
    let mut s = watch(&m.cp, &m.db1.credential, now + 100).await.unwrap();
    assert_eq!(snapshot(&next(&mut s).await.unwrap()).peers.len(), 1);
}

#[tokio::test]
async fn removal_ends_the_stream_and_leaves_every_view() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = mesh(dir.path(), 256).await;
    let mut laptop = watch(&m.cp, &m.laptop.credential, 0).await.unwrap();
    let mut db1 = watch(&m.cp, &m.db1.credential, 0).await.unwrap();
    let mut other = watch(&m.cp, &m.other.credential, 0).await.unwrap();
    let v0 = next(&mut laptop).await.unwrap().version;
    next(&mut db1).await.unwrap();
    next(&mut other).await.unwrap();

    let v1 =
        m.cp.admin.remove_node(RemoveNodeRequest { node: m.db1.node_id.clone() }).await.unwrap().into_inner().version;
    assert!(v1 > v0);
    let status = next(&mut db1).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let u = next(&mut laptop).await.unwrap();
    let d = delta(&u);
    assert_eq!((u.version, d.base_version), (v1, v0));
    assert_eq!(d.remove_peers, vec![pubkey(2)]);
    // The rule no longer lists db1's addresses.
    let to = &d.policy.as_ref().unwrap().rules[0].to;
    assert!(!to.iter().any(|p| m.db1.addresses.contains(p)));
    silent(&mut other, 200).await;
    assert_code(watch(&m.cp, &m.db1.credential, 0).await, Code::PermissionDenied, "removed");
    assert_code(m.cp.admin.remove_node(RemoveNodeRequest { node: "db1".into() }).await, Code::NotFound, "db1");

    // A node enrolling later reaches the others that policy lets it.
    let web2 = m.cp.enroll("web2", 5, &["web"]).await;
    let u = next(&mut laptop).await.unwrap();
    assert_eq!(delta(&u).base_version, v1);
    assert_eq!(delta(&u).upsert_peers[0].name, "web2");
    assert_eq!(web2.addresses[0].addr, vec![10, 77, 0, 5], "addresses of removed nodes are not reused");
}

#[tokio::test]
async fn one_change_reaches_hundreds_of_watchers() {
    const N: usize = 300;
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    cp.apply(
        "[[rules]]\nid = \"probe\"\nfrom = [\"10.99.0.0/24\"]\nto = [\"tag:sim\"]\nproto = \"tcp\"\nports = [\"1\"]\n",
    )
    .await
    .unwrap();
    let key = cp.key(false, 0, &["sim"]).await;
    // A few HTTP/2 connections, many streams each (cheaper here than one per agent), within
    // the listener's streams per connection.
    let mut channels = Vec::new();
    let per_connection = wirefence_control::limits::MAX_STREAMS_PER_CONNECTION as usize;
    for _ in 0..N.div_ceil(per_connection) {
        channels.push(cp.agent().await);
    }
    let mut streams = Vec::with_capacity(N);
    for i in 0..N {
        let n = channels.len();
        let agent = &mut channels[i % n];
        let mut private = [7u8; 32];
        private[1..9].copy_from_slice(&(i as u64).to_le_bytes());
        let mut req = register_req(&format!("sim{i}"), 7, &key);
        req.public_key = wirefence_proto::possession::public_key(&private).to_vec();
        let req = prove(agent, req, &private).await;
        let r = agent.register(req).await.unwrap().into_inner();
        let watch = authed(wirefence_proto::v1::WatchRequest { resume_from: 0, ..Default::default() }, &r.credential);
        let mut s = agent.watch(watch).await.unwrap().into_inner();
        let u = next(&mut s).await.unwrap();
        assert_eq!(snapshot(&u).policy.as_ref().unwrap().rules.len(), 1);
        streams.push(s);
    }
    let started = std::time::Instant::now();
    let version = cp
        .apply("[[rules]]\nid = \"probe\"\nfrom = [\"10.99.0.0/24\"]\nto = [\"tag:sim\"]\nproto = \"tcp\"\nports = [\"2\"]\n")
        .await
        .unwrap();
    let waits = streams.into_iter().map(|mut s| {
        tokio::spawn(async move {
            let u = next(&mut s).await.unwrap();
            (u.version, delta(&u).policy.as_ref().unwrap().rules[0].ports[0].first)
        })
    });
    for w in waits.collect::<Vec<_>>() {
        assert_eq!(w.await.unwrap(), (version, 2));
    }
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(5), "fan-out to {N} watchers took {took:?}");
}

/// Every message of one update, up to the one that does not continue.
async fn whole_update(s: &mut tonic::Streaming<wirefence_proto::v1::Update>) -> Vec<wirefence_proto::v1::Update> {
    let mut parts = vec![next(s).await.unwrap()];
    while parts.last().unwrap().continued {
        parts.push(next(s).await.unwrap());
    }
    parts
}

#[tokio::test]
async fn large_updates_come_in_parts_to_agents_that_take_them_and_whole_to_others() {
    use wirefence_agent::control::parts::Parts;
    use wirefence_control::wire::PART_PEERS;
    use wirefence_proto::v1::WatchRequest;

    let peers = PART_PEERS + 11;
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    cp.apply("[[rules]]\nid = \"mesh\"\nfrom = [\"*\"]\nto = [\"*\"]\nproto = \"tcp\"\nports = [\"443\"]\n")
        .await
        .unwrap();
    let key = cp.key(false, 0, &[]).await;
    let mut agent = cp.agent().await;
    let mut credentials = Vec::new();
    for n in 1..=u8::try_from(peers + 1).unwrap() {
        let req = cp.enroll_req(&format!("n{n}"), n, &key).await;
        credentials.push(agent.register(req).await.unwrap().into_inner().credential);
    }
    let watch = |accepts_parts| WatchRequest { accepts_parts, ..Default::default() };
    let mut parted = agent.watch(authed(watch(true), &credentials[0])).await.unwrap().into_inner();
    let mut whole = agent.watch(authed(watch(false), &credentials[1])).await.unwrap().into_inner();

    // The snapshot: the first part holds the body and PART_PEERS peers; the rest continue it.
    let parts = whole_update(&mut parted).await;
    assert_eq!(parts.len(), 2);
    assert_eq!(snapshot(&parts[0]).peers.len(), PART_PEERS);
    assert!(snapshot(&parts[0]).policy.is_some());
    let more = delta(&parts[1]);
    assert_eq!((more.upsert_peers.len(), more.base_version, more.policy.is_none()), (11, 0, true));
    assert!(parts.iter().all(|p| p.version == parts[0].version && p.incarnation == parts[0].incarnation));
    let mut assembler = Parts::default();
    let assembled = parts.into_iter().map(|p| assembler.push(p).unwrap()).last().flatten().unwrap();
    let one = whole_update(&mut whole).await;
    assert_eq!(one.len(), 1, "an agent that does not take parts gets one message");
    assert_eq!(snapshot(&one[0]).peers.len(), peers);
    let names = peer_names(snapshot(&assembled));
    assert_eq!(names.len(), peers);
    assert!(!names.contains(&"n1".to_string()), "never itself");
    assert!(names.windows(2).all(|w| w[0] != w[1]), "each peer once");

    // Every peer goes: the removals come in parts too, after the policy.
    let version = cp.apply("[[rules]]\nid = \"none\"\nfrom = [\"10.99.0.0/24\"]\nto = [\"*\"]\n").await.unwrap();
    let parts = whole_update(&mut parted).await;
    assert_eq!(parts.len(), 2);
    assert!(parts.iter().all(|p| p.version == version));
    assert!(delta(&parts[0]).policy.is_some());
    assert_eq!((delta(&parts[0]).remove_peers.len(), delta(&parts[1]).remove_peers.len()), (PART_PEERS, 11));
    let one = whole_update(&mut whole).await;
    assert_eq!((one.len(), delta(&one[0]).remove_peers.len()), (1, peers));
}
