//! Enrollment, re-registration, input validation, authentication and reports over real
//! TCP against an in-process control plane.

mod common;

use std::time::Duration;

use common::*;
use tonic::Code;
use wirefence_proto::v1::{
    agent_report, AgentReport, Applied, ApplyFailed, GetNodeRequest, IpPrefix, ListNodesRequest, PeerStat, PeerStats,
    RegisterResponse, RemoveNodeRequest, SetNodeRoutesRequest, SocketAddress, WatchRequest,
};

#[tokio::test]
async fn single_use_unknown_missing_and_expired_enrollment_keys() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    let mut agent = cp.agent().await;

    let once = cp.key(true, 0, &["web"]).await;
    let r = agent.register(cp.enroll_req("web1", 1, &once).await).await.unwrap().into_inner();
    assert_eq!(r.addresses, vec![prefix("10.77.0.1/32"), prefix("fd77::1/128")]);
    assert!(r.credential.starts_with(&format!("{}.", r.node_id)));
    assert_code(
        agent.register(cp.enroll_req("web2", 2, &once).await).await,
        Code::PermissionDenied,
        "no uses left (used 1 of 1)",
    );

    let key_id = once.split('.').next().unwrap();
    let forged = format!("{key_id}.{}", "A".repeat(43));
    assert_code(
        agent.register(cp.enroll_req("web2", 2, &forged).await).await,
        Code::Unauthenticated,
        "unknown enrollment key",
    );
    assert_code(agent.register(cp.enroll_req("web2", 2, "garbage").await).await, Code::Unauthenticated, "unknown");
    assert_code(agent.register(register_req("web2", 2, "")).await, Code::Unauthenticated, "enrollment key is required");

    let short = cp.key(false, 1, &[]).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_code(agent.register(cp.enroll_req("web2", 2, &short).await).await, Code::PermissionDenied, "expired");

    // A good multi-use key enrolls several nodes; addresses are allocated in order.
    let multi = cp.key(false, 3600, &[]).await;
    let r2 = agent.register(cp.enroll_req("web2", 2, &multi).await).await.unwrap().into_inner();
    let r3 = agent.register(cp.enroll_req("web3", 3, &multi).await).await.unwrap().into_inner();
    assert_eq!(r2.addresses, vec![prefix("10.77.0.2/32"), prefix("fd77::2/128")]);
    assert_eq!(r3.addresses, vec![prefix("10.77.0.3/32"), prefix("fd77::3/128")]);
    let node = cp.admin.get_node(GetNodeRequest { node: "web1".into() }).await.unwrap().into_inner();
    assert_eq!(node.tags, vec!["web".to_string()]);
}

#[tokio::test]
async fn an_enrolled_public_key_cannot_be_taken_over_with_an_enrollment_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    let mut agent = cp.agent().await;
    let key = cp.route_key(&["10.88.0.0/16"]).await.unwrap();
    let first = agent.register(cp.enroll_req("db1", 1, &key).await).await.unwrap().into_inner();

    // Public keys are not secret: enrolling db1's key again (any hostname) gets no
    // credential, and db1's credential keeps working.
    for host in ["db1", "evil"] {
        assert_code(
            agent.register(cp.enroll_req(host, 1, &key).await).await,
            Code::AlreadyExists,
            "re-register with the node's credential",
        );
    }
    assert!(watch(&cp, &first.credential, 0).await.is_ok());

    // With the credential, no key is needed; endpoints and routes are updated.
    let mut req = register_req("db1", 1, "");
    req.endpoints = vec![SocketAddress::from("[2001:db8::1]:51820".parse::<std::net::SocketAddr>().unwrap())];
    req.routes = vec![prefix("10.88.0.0/24")];
    let r = agent.register(authed(req, &first.credential)).await.unwrap().into_inner();
    assert_eq!((r.node_id.as_str(), r.credential.as_str()), (first.node_id.as_str(), first.credential.as_str()));
    let node = cp.admin.get_node(GetNodeRequest { node: first.node_id.clone() }).await.unwrap().into_inner();
    assert_eq!(node.routes, vec![prefix("10.88.0.0/24")]);
    assert_eq!(node.endpoints[0].ip.len(), 16);
}

#[tokio::test]
async fn reregistration_cannot_change_hostname_or_public_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    let me = cp.enroll("web1", 1, &[]).await;
    let mut agent = cp.agent().await;

    // A new hostname would inherit `node:<name>` rules; a new key would move the tunnel.
    let r = agent.register(authed(register_req("db1", 1, ""), &me.credential)).await;
    assert_code(r, Code::PermissionDenied, "hostname");
    let r = agent.register(authed(register_req("web1", 9, ""), &me.credential)).await;
    assert_code(r, Code::PermissionDenied, "public_key");
    let node = cp.admin.get_node(GetNodeRequest { node: me.node_id.clone() }).await.unwrap().into_inner();
    assert_eq!((node.hostname.as_str(), node.public_key), ("web1", pubkey(1)));
    // The operator sees the last refusal and its reason.
    assert!(node.last_refusal.contains("public_key") && node.last_refusal_unix > 0, "{}", node.last_refusal);
    // Unchanged identity: accepted. Both replies announce the overlay ranges (agents pin them).
    let again = agent.register(authed(register_req("web1", 1, ""), &me.credential)).await.unwrap().into_inner();
    for reply in [&me, &again] {
        assert_eq!(reply.overlay, vec![prefix("10.77.0.0/16"), prefix("fd77::/64")]);
    }
    let node = cp.admin.get_node(GetNodeRequest { node: "web1".into() }).await.unwrap().into_inner();
    assert_eq!((node.last_refusal.as_str(), node.last_refusal_unix), ("", 0), "a success clears it");
}

#[tokio::test]
async fn removed_nodes_cannot_enroll_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    let gone = cp.enroll("laptop", 1, &[]).await;
    cp.admin.remove_node(RemoveNodeRequest { node: "laptop".into() }).await.unwrap();

    let mut agent = cp.agent().await;
    let fresh = cp.key(true, 0, &[]).await;
    for host in ["laptop", "laptop2"] {
        let r = agent.register(cp.enroll_req(host, 1, &fresh).await).await;
        assert_code(r, Code::PermissionDenied, &format!("node {} was removed", gone.node_id));
    }
    // The refusals did not use the single-use key; a new key pair enrolls fine.
    let r = agent.register(cp.enroll_req("laptop", 2, &fresh).await).await.unwrap().into_inner();
    assert_ne!(r.node_id, gone.node_id);

    // The removed node is kept, and shown when asked for.
    let ids = |nodes: Vec<wirefence_proto::v1::Node>| -> Vec<(String, bool)> {
        nodes.into_iter().map(|n| (n.node_id, n.removed)).collect()
    };
    let live = cp.admin.list_nodes(ListNodesRequest::default()).await.unwrap().into_inner().nodes;
    assert_eq!(ids(live), [(r.node_id.clone(), false)]);
    let all = cp.admin.list_nodes(ListNodesRequest { include_removed: true }).await.unwrap().into_inner().nodes;
    let mut all = ids(all);
    all.sort();
    let mut want = vec![(r.node_id.clone(), false), (gone.node_id.clone(), true)];
    want.sort();
    assert_eq!(all, want);
    let shown = cp.admin.get_node(GetNodeRequest { node: gone.node_id.clone() }).await.unwrap().into_inner();
    assert!(shown.removed && shown.hostname == "laptop", "{shown:?}");
    let shown = cp.admin.get_node(GetNodeRequest { node: "laptop".into() }).await.unwrap().into_inner();
    assert_eq!((shown.node_id, shown.removed), (r.node_id, false), "the live owner of the name first");
}

#[tokio::test]
async fn routes_outside_the_grant_are_refused_never_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    let mut agent = cp.agent().await;
    let with_routes = |host: &str, n: u8, key: &str, routes: &[&str]| {
        let mut r = register_req(host, n, key);
        r.routes = routes.iter().map(|r| prefix(r)).collect();
        r
    };

    let reasons = |r: &RegisterResponse| -> Vec<String> { r.refused_routes.iter().map(|r| r.reason.clone()).collect() };

    // A key without routes grants none: the node enrolls, without the route, and is told.
    let plain = cp.key(false, 0, &[]).await;
    let r = agent.register(cp.prove(with_routes("a0", 4, &plain, &["10.88.1.0/24"]), 4).await).await.unwrap();
    let r = r.into_inner();
    assert_eq!(reasons(&r), ["10.88.1.0/24 is not within the routes granted to this node (none; keys create --route)"]);
    let node = cp.admin.get_node(GetNodeRequest { node: r.node_id.clone() }).await.unwrap().into_inner();
    assert!(node.routes.is_empty());
    assert_eq!(node.refused_routes.len(), 1, "nodes show names the refusal");

    // Part of a request outside the grant: the rest is taken.
    let key = cp.route_key(&["10.88.0.0/16", "fd88::/48"]).await.unwrap();
    let a = agent
        .register(cp.prove(with_routes("a", 1, &key, &["10.88.1.0/24", "10.89.0.0/24", "fd88:0:0:1::/64"]), 1).await)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reasons(&a).len(), 1);
    assert!(reasons(&a)[0]
        .starts_with("10.89.0.0/24 is not within the routes granted to this node (10.88.0.0/16, fd88::/48"));
    let node = cp.admin.get_node(GetNodeRequest { node: "a".into() }).await.unwrap().into_inner();
    assert_eq!(node.routes, vec![prefix("10.88.1.0/24"), prefix("fd88:0:0:1::/64")]);

    // Another node may not route (part of) the same subnet; it enrolls with the rest.
    let b = agent
        .register(cp.prove(with_routes("b", 2, &key, &["10.88.1.128/25", "10.88.2.0/24"]), 2).await)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reasons(&b), [format!("10.88.1.128/25 overlaps route 10.88.1.0/24 of node {}", a.node_id)]);
    let node = cp.admin.get_node(GetNodeRequest { node: "b".into() }).await.unwrap().into_inner();
    assert_eq!(node.routes, vec![prefix("10.88.2.0/24")]);

    // Re-registration is held to the node's grant and to the other nodes' routes too, and
    // keeps the node registered: a gateway whose routes changed never loses its control plane.
    let r = agent.register(authed(with_routes("a", 1, "", &["10.90.0.0/24"]), &a.credential)).await.unwrap();
    assert!(reasons(&r.into_inner())[0].contains("10.90.0.0/24 is not within the routes granted"));
    // (A part of b's route: the very same prefix would make a route group.)
    let r = agent.register(authed(with_routes("a", 1, "", &["10.88.2.0/25"]), &a.credential)).await.unwrap();
    assert!(reasons(&r.into_inner())[0].contains(&b.node_id));
    let r = agent.register(authed(with_routes("a", 1, "", &["10.88.3.0/24"]), &a.credential)).await.unwrap();
    assert!(r.into_inner().refused_routes.is_empty());
    // Two changes within the re-registration interval: the second comes into effect at its end.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let node = loop {
        let node = cp.admin.get_node(GetNodeRequest { node: "a".into() }).await.unwrap().into_inner();
        if node.routes == vec![prefix("10.88.3.0/24")] || std::time::Instant::now() > deadline {
            break node;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(node.routes, vec![prefix("10.88.3.0/24")]);
    assert!(node.refused_routes.is_empty(), "a clean registration clears the refusals");

    // Grants and routes broader than /8 (IPv4) or /16 (IPv6), or touching the overlay, are refused.
    for (bad, msg) in [
        ("0.0.0.0/0", "broader than /8"),
        ("10.0.0.0/7", "broader than /8"),
        ("2000::/3", "broader than /16"),
        ("10.77.0.0/24", "overlaps the overlay"),
        ("10.88.0.1/16", "routes[0]"),
    ] {
        assert_code(cp.route_key(&[bad]).await, Code::InvalidArgument, msg);
    }
    let r = agent.register(cp.prove(with_routes("c", 3, &key, &["0.0.0.0/1"]), 3).await).await;
    assert_code(r, Code::InvalidArgument, "routes[0]: 0.0.0.0/1 is broader than /8");
}

#[tokio::test]
async fn bad_registration_input_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    let mut agent = cp.agent().await;
    let key = cp.key(false, 0, &[]).await;
    let base = || register_req("n1", 1, &key);

    let mut r = base();
    r.public_key = vec![1; 31];
    assert_code(agent.register(r).await, Code::InvalidArgument, "public_key");
    let mut r = base();
    r.public_key = vec![0; 32];
    assert_code(agent.register(r).await, Code::InvalidArgument, "public_key");
    let mut r = base();
    r.hostname = "not a host".into();
    assert_code(agent.register(r).await, Code::InvalidArgument, "hostname");
    let mut r = base();
    r.hostname = String::new();
    assert_code(agent.register(r).await, Code::InvalidArgument, "hostname");
    let mut r = base();
    r.endpoints.push(SocketAddress { ip: vec![10, 0, 0, 1], port: 0 });
    assert_code(agent.register(r).await, Code::InvalidArgument, "endpoints[1]");
    let mut r = base();
    r.endpoints = vec![SocketAddress { ip: vec![1, 2, 3], port: 1 }];
    assert_code(agent.register(r).await, Code::InvalidArgument, "endpoints[0]");
    let mut r = base();
    r.routes = vec![IpPrefix { addr: vec![10, 88, 0, 1], prefix_len: 24 }];
    assert_code(agent.register(r).await, Code::InvalidArgument, "routes[0]");
    let mut r = base();
    r.routes = vec![prefix("10.0.0.0/8")];
    assert_code(agent.register(r).await, Code::InvalidArgument, "overlaps the overlay");
    // Nothing was enrolled by the rejected calls.
    assert_eq!(cp.admin.list_nodes(ListNodesRequest::default()).await.unwrap().into_inner().nodes.len(), 0);
}

#[tokio::test]
async fn unauthenticated_tampered_and_removed_nodes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    let me = cp.enroll("laptop", 1, &[]).await;
    let mut agent = cp.agent().await;

    assert_code(
        agent.watch(WatchRequest { resume_from: 0, ..Default::default() }).await,
        Code::Unauthenticated,
        "missing credential",
    );
    assert_code(watch(&cp, "not-a-credential", 0).await, Code::Unauthenticated, "malformed");
    let mut bad = tonic::Request::new(WatchRequest { resume_from: 0, ..Default::default() });
    bad.metadata_mut().insert("authorization", format!("Basic {}", me.credential).parse().unwrap());
    assert_code(agent.watch(bad).await, Code::Unauthenticated, "malformed");

    // Flip one character of the secret.
    let mut t = me.credential.clone().into_bytes();
    let i = t.len() - 3;
    t[i] = if t[i] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(t).unwrap();
    assert_code(watch(&cp, &tampered, 0).await, Code::Unauthenticated, "invalid credential");
    let reports = tokio_stream::iter(vec![AgentReport::default()]);
    assert_code(agent.report(authed(reports, &tampered)).await, Code::Unauthenticated, "invalid credential");
    // Another node's id with this node's secret.
    let other = cp.enroll("db1", 2, &[]).await;
    let swapped = format!("{}.{}", other.node_id, me.credential.split_once('.').unwrap().1);
    assert_code(watch(&cp, &swapped, 0).await, Code::Unauthenticated, "invalid credential");

    assert!(watch(&cp, &me.credential, 0).await.is_ok());
    cp.admin.remove_node(RemoveNodeRequest { node: "laptop".into() }).await.unwrap();
    assert_code(watch(&cp, &me.credential, 0).await, Code::PermissionDenied, "removed");
    let reports = tokio_stream::iter(vec![AgentReport::default()]);
    assert_code(agent.report(authed(reports, &me.credential)).await, Code::PermissionDenied, "removed");
    let rereg = agent.register(authed(register_req("laptop", 1, ""), &me.credential)).await;
    assert_code(rereg, Code::PermissionDenied, "removed");
    // Kept and shown as removed; a name nobody had is not found.
    let shown = cp.admin.get_node(GetNodeRequest { node: "laptop".into() }).await.unwrap().into_inner();
    assert!(shown.removed && !shown.connected, "{shown:?}");
    assert_code(cp.admin.get_node(GetNodeRequest { node: "nobody".into() }).await, Code::NotFound, "nobody");
}

#[tokio::test]
async fn reports_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    let me = cp.enroll("laptop", 1, &[]).await;
    cp.enroll("db", 2, &[]).await;
    let peer_key = vec![9u8; 32];
    let body = |b| AgentReport { body: Some(b) };
    let stat = |public_key: Vec<u8>| PeerStat {
        public_key,
        last_handshake_unix: 1_700_000_000,
        rx_bytes: 10,
        tx_bytes: 20,
        endpoint: Some(SocketAddress::from("192.0.2.9:51820".parse::<std::net::SocketAddr>().unwrap())),
        // An agent does not name peers for the admins.
        name: "forged".into(),
    };
    let msgs = vec![
        body(agent_report::Body::Applied(Applied { version: 7 })),
        body(agent_report::Body::Stats(PeerStats { peers: vec![stat(peer_key.clone()), stat(pubkey(2))] })),
        body(agent_report::Body::Failed(ApplyFailed { version: 8, reason: "netlink said no".into() })),
    ];
    let mut agent = cp.agent().await;
    agent.report(authed(tokio_stream::iter(msgs), &me.credential)).await.unwrap();
    let n = cp.admin.get_node(GetNodeRequest { node: me.node_id.clone() }).await.unwrap().into_inner();
    assert_eq!(n.applied_version, 7);
    assert_eq!(n.last_error, "netlink said no");
    assert!(n.last_seen_unix > 0);
    let mut stats: Vec<(&str, Vec<u8>, u64)> =
        n.peer_stats.iter().map(|s| (s.name.as_str(), s.public_key.clone(), s.rx_bytes)).collect();
    stats.sort();
    // Peers by the name the control plane knows (none for an unknown key).
    assert_eq!(stats, [("", peer_key, 10), ("db", pubkey(2), 10)]);
    assert!(!n.connected);

    // A success clears the error; a watching node shows as connected.
    let ok = vec![body(agent_report::Body::Applied(Applied { version: 9 }))];
    agent.report(authed(tokio_stream::iter(ok), &me.credential)).await.unwrap();
    let _stream = watch(&cp, &me.credential, 0).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let n = cp.admin.get_node(GetNodeRequest { node: "laptop".into() }).await.unwrap().into_inner();
    assert_eq!((n.applied_version, n.last_error.as_str(), n.connected), (9, "", true));
}

#[tokio::test]
async fn an_admin_grant_brings_a_refused_route_into_effect_and_a_revoke_takes_it_away() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    let mut agent = cp.agent().await;
    let key = cp.route_key(&["10.88.0.0/16"]).await.unwrap();
    let mut req = register_req("a", 1, &key);
    req.routes = vec![prefix("10.88.1.0/24"), prefix("10.99.0.0/24")];
    let a = agent.register(cp.prove(req, 1).await).await.unwrap().into_inner();
    assert_eq!(a.refused_routes.len(), 1);
    let set = |grant: &[&str], revoke: &[&str]| SetNodeRoutesRequest {
        node: "a".into(),
        grant: grant.iter().map(|p| prefix(p)).collect(),
        revoke: revoke.iter().map(|p| prefix(p)).collect(),
    };
    let before = cp.admin.get_node(GetNodeRequest { node: "a".into() }).await.unwrap().into_inner();
    assert_eq!(before.granted_routes, vec![prefix("10.88.0.0/16")]);

    // Granted: what the node advertised comes into effect, without it registering again.
    let r = cp.admin.set_node_routes(set(&["10.99.0.0/16"], &[])).await.unwrap().into_inner();
    let node = r.node.unwrap();
    assert_eq!(node.routes, vec![prefix("10.88.1.0/24"), prefix("10.99.0.0/24")]);
    assert_eq!(node.granted_routes, vec![prefix("10.88.0.0/16"), prefix("10.99.0.0/16")]);
    assert!(node.refused_routes.is_empty());
    assert!(r.version > 0);

    // Revoked: the route it covered goes, and is named refused.
    let node = cp.admin.set_node_routes(set(&[], &["10.88.0.0/16"])).await.unwrap().into_inner().node.unwrap();
    assert_eq!(node.routes, vec![prefix("10.99.0.0/24")]);
    assert_eq!(node.refused_routes.len(), 1);
    assert!(node.refused_routes[0].reason.starts_with("10.88.1.0/24 is not within the routes granted"));
    // The grant is kept with the node: a re-registration is held to it.
    let mut again = register_req("a", 1, "");
    again.routes = vec![prefix("10.88.1.0/24"), prefix("10.99.0.0/24")];
    let r = agent.register(authed(again, &a.credential)).await.unwrap().into_inner();
    assert_eq!(r.refused_routes.len(), 1, "10.88.1.0/24 stays refused");

    // Bad requests name the problem and change nothing.
    let e = cp.admin.set_node_routes(set(&[], &["10.1.0.0/16"])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("revoke: 10.1.0.0/16 is not granted to node"), "{}", e.message());
    assert_code(cp.admin.set_node_routes(set(&["10.0.0.0/7"], &[])).await, Code::InvalidArgument, "broader than /8");
    assert_code(cp.admin.set_node_routes(set(&["10.77.0.0/24"], &[])).await, Code::InvalidArgument, "overlay");
    let e =
        cp.admin.set_node_routes(SetNodeRoutesRequest { node: "nobody".into(), ..set(&["10.5.0.0/16"], &[]) }).await;
    assert_eq!(e.unwrap_err().code(), Code::NotFound);
    let after = cp.admin.get_node(GetNodeRequest { node: "a".into() }).await.unwrap().into_inner();
    assert_eq!(after.granted_routes, vec![prefix("10.99.0.0/16")]);
}
