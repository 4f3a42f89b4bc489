//! Trust at enrollment: a name is owned, not chosen; a public key is proven; keys are
//! limited; endpoints are checked; credentials rotate. Real control plane, real TCP.

mod common;

use std::time::Duration;

use common::*;
use tonic::Code;
use wirefence_control::enroll::{EnrollLimits, Rate};
use wirefence_proto::v1::{
    ApproveNodeRequest, EnrollChallengeRequest, GetNodeRequest, LeaveRequest, NodeView, ReenrollNodeRequest,
    ReleaseNameRequest, RemoveNodeRequest, RequestCredentialRotationRequest, RevokeEnrollmentKeyRequest,
    RotateCredentialRequest, RotateKeyRequest, SetNodeRequest, SocketAddress, TagList,
};

const SSH_TO_DB1: &str = r#"
[[rules]]
id = "ssh-db1"
from = ["node:laptop"]
to = ["node:db1"]
proto = "tcp"
ports = ["22"]
"#;

/// Whether `view` has a rule naming `node`'s addresses, or `node` as a peer (under any
/// name), or `node` under the peer name `name`.
fn names(view: &NodeView, node: &wirefence_proto::v1::RegisterResponse, name: &str) -> bool {
    let rules = view.policy.as_ref().map(|p| p.rules.as_slice()).unwrap_or_default();
    let peer = |p: &wirefence_proto::v1::Peer| p.allowed_ips.iter().any(|a| node.addresses.contains(a));
    rules.iter().any(|r| r.to.iter().chain(&r.from).any(|p| node.addresses.contains(p)))
        || view.peers.iter().any(|p| peer(p) || (p.name == name && peer(p)))
}

async fn laptop_view(cp: &Cp, laptop: &str) -> NodeView {
    let mut s = watch(cp, laptop, 0).await.unwrap();
    snapshot(&next(&mut s).await.unwrap()).clone()
}

#[tokio::test]
async fn a_hostname_chosen_with_an_unbound_key_never_takes_a_nodes_place() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    let laptop = cp.enroll("laptop", 1, &[]).await;
    cp.apply(SSH_TO_DB1).await.unwrap();
    let mut agent = cp.agent().await;
    let unbound = cp.key(false, 3600, &[]).await;

    // Before db1 exists: a key holder calls itself db1.
    let squatter = agent.register(cp.enroll_req("db1", 6, &unbound).await).await.unwrap().into_inner();
    let v = laptop_view(&cp, &laptop.credential).await;
    assert!(!names(&v, &squatter, "db1"), "a label matched node:db1: {v:?}");
    let mut s = watch(&cp, &squatter.credential, 0).await.unwrap();
    let own = snapshot(&next(&mut s).await.unwrap()).clone();
    assert!(own.policy.unwrap().rules.is_empty() && own.peers.is_empty(), "the squatter got db1's rule");
    let shown = cp.admin.get_node(GetNodeRequest { node: squatter.node_id.clone() }).await.unwrap().into_inner();
    assert!(!shown.name_bound);

    // The real db1 (key bound to the name) owns it despite the label.
    let db1 = cp.enroll("db1", 2, &[]).await;
    let v = laptop_view(&cp, &laptop.credential).await;
    assert!(names(&v, &db1, "db1") && !names(&v, &squatter, "db1"), "{v:?}");
    assert_eq!(peer_names(&v), ["db1"]);

    // After db1's removal its name stays reserved: labels do not match, a bound key for
    // it is refused until an admin releases the name.
    cp.admin.remove_node(RemoveNodeRequest { node: db1.node_id.clone() }).await.unwrap();
    let late = agent.register(cp.enroll_req("db1", 7, &unbound).await).await.unwrap().into_inner();
    let v = laptop_view(&cp, &laptop.credential).await;
    assert!(!names(&v, &late, "db1") && !names(&v, &squatter, "db1"), "{v:?}");
    assert!(v.policy.unwrap().rules.is_empty());
    let again = cp.bound_key("db1", &[]).await;
    let r = agent.register(cp.enroll_req("db1", 8, &again).await).await;
    assert_code(r, Code::AlreadyExists, &format!("belongs to node {} (removed", db1.node_id));
    // Approving a label is refused while the name is reserved too.
    let r = cp.admin.approve_node(ApproveNodeRequest { node: late.node_id.clone() }).await;
    assert_code(r, Code::AlreadyExists, "nodes release");

    // A bound key enrolls only its own name.
    let r = agent.register(cp.enroll_req("laptop2", 8, &again).await).await;
    assert_code(r, Code::PermissionDenied, "bound to enrollment key");

    cp.admin.release_name(ReleaseNameRequest { hostname: "db1".into() }).await.unwrap();
    assert_code(
        cp.admin.release_name(ReleaseNameRequest { hostname: "db1".into() }).await,
        Code::NotFound,
        "no removed node reserves",
    );
    // An admin's approval is what makes a label a name.
    cp.admin.approve_node(ApproveNodeRequest { node: late.node_id.clone() }).await.unwrap();
    let v = laptop_view(&cp, &laptop.credential).await;
    assert!(names(&v, &late, "db1") && !names(&v, &squatter, "db1"), "{v:?}");
    let r = agent.register(cp.enroll_req("db1", 8, &again).await).await;
    assert_code(r, Code::AlreadyExists, &late.node_id);
}

#[tokio::test]
async fn enrolling_a_public_key_needs_its_private_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    let mut agent = cp.agent().await;
    let key = cp.key(true, 3600, &[]).await;

    // Node 5's public key, answered with another private key: refused.
    let forged = prove(&mut agent, register_req("victim", 5, &key), &[6; 32]).await;
    assert_code(agent.register(forged.clone()).await, Code::Unauthenticated, "proof");
    // The challenge was used by that attempt (no replay), and one is required.
    assert_code(agent.register(forged).await, Code::Unauthenticated, "unknown, used or expired challenge");
    assert_code(agent.register(register_req("victim", 5, &key)).await, Code::InvalidArgument, "challenge");
    // A proof for another hostname does not carry over.
    let mut moved = cp.enroll_req("victim", 5, &key).await;
    moved.hostname = "other".into();
    assert_code(agent.register(moved).await, Code::Unauthenticated, "proof");
    // A low-order point has no private key at all.
    let mut low = cp.enroll_req("victim", 5, &key).await;
    low.public_key = vec![0; 32];
    low.public_key[0] = 1;
    assert_code(agent.register(low).await, Code::Unauthenticated, "low-order");

    // The real node still enrolls, with the single-use key the refusals did not use.
    let r = agent.register(cp.enroll_req("victim", 5, &key).await).await.unwrap().into_inner();
    let node = cp.admin.get_node(GetNodeRequest { node: r.node_id }).await.unwrap().into_inner();
    assert_eq!(node.public_key, pubkey(5));
}

#[tokio::test]
async fn enrollment_is_rate_limited_per_source_and_per_key() {
    let dir = tempfile::tempdir().unwrap();
    let slow = Rate { burst: 2, every: Duration::from_secs(3600) };
    let fast = Rate { burst: 1000, every: Duration::from_millis(1) };
    let mut cp = start_with(dir.path(), |c| c.enroll_limits = EnrollLimits { per_source: fast, per_key: slow }).await;
    let mut agent = cp.agent().await;
    let key = cp.key(false, 3600, &[]).await;
    for n in 1..=2 {
        agent.register(cp.enroll_req(&format!("n{n}"), n, &key).await).await.unwrap();
    }
    let r = agent.register(cp.enroll_req("n3", 3, &key).await).await;
    assert_code(r, Code::ResourceExhausted, "too many enrollments with enrollment key");
    // Another key is not held back by this one.
    let other = cp.key(false, 3600, &[]).await;
    agent.register(cp.enroll_req("n3", 3, &other).await).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let cp = start_with(dir.path(), |c| c.enroll_limits = EnrollLimits { per_source: slow, per_key: fast }).await;
    let mut agent = cp.agent().await;
    for _ in 0..2 {
        agent.enroll_challenge(wirefence_proto::v1::EnrollChallengeRequest {}).await.unwrap();
    }
    let r = agent.enroll_challenge(wirefence_proto::v1::EnrollChallengeRequest {}).await;
    assert_code(r, Code::ResourceExhausted, "too many enrollment attempts from this address");
}

#[tokio::test]
async fn keys_revoked_or_used_up_are_refused_with_a_status_that_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    let mut agent = cp.agent().await;
    let req = wirefence_proto::v1::CreateEnrollmentKeyRequest { max_uses: 2, ..Default::default() };
    let two = cp.admin.create_enrollment_key(req).await.unwrap().into_inner();
    for n in 1..=2 {
        agent.register(cp.enroll_req(&format!("n{n}"), n, &two.key).await).await.unwrap();
    }
    let r = agent.register(cp.enroll_req("n3", 3, &two.key).await).await;
    assert_code(r, Code::PermissionDenied, "no uses left (used 2 of 2)");

    let multi = cp.key(false, 3600, &[]).await;
    let id = multi.split_once('.').unwrap().0.to_owned();
    cp.admin.revoke_enrollment_key(RevokeEnrollmentKeyRequest { key_id: id.clone() }).await.unwrap();
    let r = agent.register(cp.enroll_req("n3", 3, &multi).await).await;
    assert_code(r, Code::PermissionDenied, &format!("enrollment key {id} was revoked"));
    let zero = wirefence_proto::v1::CreateEnrollmentKeyRequest { expires_in_secs: Some(0), ..Default::default() };
    assert_code(cp.admin.create_enrollment_key(zero).await, Code::InvalidArgument, "expire at once");
}

/// A non-loopback address of this host (the control plane listens on the wildcard).
fn local_unicast() -> std::net::IpAddr {
    nix::ifaddrs::getifaddrs()
        .unwrap()
        .filter_map(|i| i.address?.as_sockaddr_in().map(|a| std::net::IpAddr::V4(a.ip())))
        .find(|ip| !ip.is_loopback())
        .expect("this test needs a non-loopback IPv4 address on the host")
}

#[tokio::test]
async fn advertised_endpoints_must_be_unicast_outside_the_overlay_and_not_the_control_plane() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start_with(dir.path(), |c| {
        let rate = Rate { burst: 1000, every: Duration::from_millis(1) };
        c.enroll_limits = EnrollLimits { per_source: rate, per_key: rate };
        c.listen = vec![std::net::SocketAddr::from(([0, 0, 0, 0], 0))];
        // Plaintext on the wildcard address: this test needs the "every local address" case.
        c.insecure_remote = true;
    })
    .await;
    let mut agent = wirefence_proto::v1::agent_service_client::AgentServiceClient::connect(format!(
        "http://127.0.0.1:{}",
        cp.addr().port()
    ))
    .await
    .unwrap();
    let key = cp.key(false, 3600, &[]).await;
    let own = local_unicast();
    for (ep, why) in [
        ("127.0.0.1:51820".to_string(), "loopback"),
        ("0.0.0.0:51820".to_string(), "unspecified"),
        ("224.0.0.9:51820".to_string(), "multicast"),
        ("10.77.3.4:51820".to_string(), "inside the overlay"),
        ("[fd77::9]:51820".to_string(), "inside the overlay"),
        (format!("{own}:51820"), "the control plane's own address"),
    ] {
        let mut req = register_req("n1", 1, &key);
        req.endpoints = vec![SocketAddress::from(ep.parse::<std::net::SocketAddr>().unwrap())];
        let req = prove(&mut agent, req, &[1; 32]).await;
        let e = agent.register(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().starts_with(&format!("endpoints[0]: {ep}: ")) && e.message().contains(why), "{e:?}");
    }
    // Re-registration is held to the same rules.
    let req = prove(&mut agent, register_req("n1", 1, &key), &[1; 32]).await;
    let ok = agent.register(req).await.unwrap();
    let mut req = register_req("n1", 1, "");
    req.endpoints = vec![SocketAddress::from(std::net::SocketAddr::new(own, 51820))];
    let r = agent.register(authed(req, &ok.into_inner().credential)).await;
    assert_code(r, Code::InvalidArgument, "control plane's own address");
}

#[tokio::test]
async fn credentials_rotate_without_reenrollment_and_the_old_one_ends() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    let me = cp.enroll("laptop", 1, &[]).await;
    let mut agent = cp.agent().await;
    let rereg = |cred: &str| authed(register_req("laptop", 1, ""), cred);

    assert!(!agent.register(rereg(&me.credential)).await.unwrap().into_inner().rotate_credential);
    cp.admin.request_credential_rotation(RequestCredentialRotationRequest { node: "laptop".into() }).await.unwrap();
    assert!(agent.register(rereg(&me.credential)).await.unwrap().into_inner().rotate_credential);

    assert_code(agent.rotate_credential(RotateCredentialRequest {}).await, Code::Unauthenticated, "missing credential");
    let new = agent.rotate_credential(authed(RotateCredentialRequest {}, &me.credential)).await.unwrap();
    let new = new.into_inner().credential;
    assert_ne!(new, me.credential);
    assert!(new.starts_with(&format!("{}.", me.node_id)));
    // Until the new one is used both work (a crash before the agent saved it loses nothing).
    assert!(watch(&cp, &me.credential, 0).await.is_ok());
    assert!(watch(&cp, &new, 0).await.is_ok());
    let r = agent.register(rereg(&new)).await.unwrap().into_inner();
    assert_eq!(
        (r.node_id.as_str(), r.credential.as_str(), r.rotate_credential),
        (me.node_id.as_str(), new.as_str(), false)
    );
    assert_code(watch(&cp, &me.credential, 0).await, Code::Unauthenticated, "invalid credential");
    assert_code(agent.register(rereg(&me.credential)).await, Code::Unauthenticated, "invalid credential");
    assert!(watch(&cp, &new, 0).await.is_ok());
}

#[tokio::test]
async fn an_admin_edits_tags_and_hostname_in_one_version_without_reenrollment() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    let laptop = cp.enroll("laptop", 1, &[]).await;
    let web1 = cp.enroll("web1", 2, &["web"]).await;
    cp.apply(
        "[[rules]]\nid = \"to-db\"\nfrom = [\"node:laptop\"]\nto = [\"tag:db\"]\n\n\
         [[rules]]\nid = \"to-db9\"\nfrom = [\"node:laptop\"]\nto = [\"node:db9\"]\nproto = \"icmp\"\n",
    )
    .await
    .unwrap();
    let mut stream = watch(&cp, &laptop.credential, 0).await.unwrap();
    let first = next(&mut stream).await.unwrap();
    assert!(snapshot(&first).peers.is_empty(), "web1 is no db yet");

    // Tags: one version, and laptop's view gets web1 as a peer at once.
    let set = |node: &str, tags: Option<&[&str]>, hostname: Option<&str>| SetNodeRequest {
        node: node.into(),
        tags: tags.map(|t| TagList { tags: t.iter().map(|s| s.to_string()).collect() }),
        hostname: hostname.map(str::to_owned),
    };
    let r = cp.admin.set_node(set("web1", Some(&["db", "web"]), None)).await.unwrap().into_inner();
    assert_eq!(r.version, first.version + 1);
    assert_eq!(r.node.unwrap().tags, ["db", "web"]);
    let u = next(&mut stream).await.unwrap();
    assert_eq!((u.version, delta(&u).upsert_peers.len()), (r.version, 1));
    assert_eq!(delta(&u).upsert_peers[0].name, "web1");

    // Hostname: owned by the node from now on; node:db9 matches it, in one version.
    let r = cp.admin.set_node(set("web1", None, Some("db9"))).await.unwrap().into_inner();
    let n = r.node.unwrap();
    assert_eq!((n.hostname.as_str(), n.name_bound, n.node_id.as_str()), ("db9", true, web1.node_id.as_str()));
    let u = next(&mut stream).await.unwrap();
    assert_eq!(u.version, r.version);
    assert_eq!(delta(&u).upsert_peers[0].name, "db9");
    assert!(delta(&u).policy.as_ref().unwrap().rules.iter().any(|r| r.id == "to-db9"));

    // Its agent keeps registering with the name it enrolled with; another name is refused.
    let mut agent = cp.agent().await;
    agent.register(authed(register_req("web1", 2, ""), &web1.credential)).await.unwrap();
    assert_code(
        agent.register(authed(register_req("db10", 2, ""), &web1.credential)).await,
        Code::PermissionDenied,
        "hostname",
    );
    assert_eq!(cp.admin.get_node(GetNodeRequest { node: "db9".into() }).await.unwrap().into_inner().hostname, "db9");

    // Refused: a name another node owns, a bad tag, a bad name; nothing changes.
    assert_code(cp.admin.set_node(set("db9", None, Some("laptop"))).await, Code::AlreadyExists, "laptop");
    assert_code(cp.admin.set_node(set("db9", Some(&["no spaces"]), None)).await, Code::InvalidArgument, "no spaces");
    assert_code(cp.admin.set_node(set("db9", None, Some("-bad-"))).await, Code::InvalidArgument, "-bad-");
    silent(&mut stream, 200).await;
    // Untagging: laptop's view loses it from `tag:db` (it stays a peer through `node:db9`).
    let r = cp.admin.set_node(set("db9", Some(&[]), None)).await.unwrap().into_inner();
    assert!(r.node.unwrap().tags.is_empty());
    let u = next(&mut stream).await.unwrap();
    assert_eq!(u.version, r.version);
}

#[tokio::test]
async fn a_node_leaves_only_itself_and_only_with_its_credential() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    let a = cp.enroll("a1", 1, &[]).await;
    let b = cp.enroll("b1", 2, &[]).await;
    let mut agent = cp.agent().await;
    // No credential, a forged one naming b, a's with its secret altered: refused, nobody leaves.
    assert_code(agent.leave(LeaveRequest {}).await, Code::Unauthenticated, "");
    let forged = format!("{}.{}", b.node_id, a.credential.split_once('.').unwrap().1);
    assert_code(agent.leave(authed(LeaveRequest {}, &forged)).await, Code::Unauthenticated, "");
    let tampered = format!("{}x", a.credential);
    assert_code(agent.leave(authed(LeaveRequest {}, &tampered)).await, Code::Unauthenticated, "");
    let live = |n: wirefence_proto::v1::Node| !n.removed;
    for id in [&a.node_id, &b.node_id] {
        assert!(live(cp.admin.get_node(GetNodeRequest { node: id.clone() }).await.unwrap().into_inner()));
    }
    // a's own credential: a leaves, b stays; a second Leave is refused as removed.
    agent.leave(authed(LeaveRequest {}, &a.credential)).await.unwrap();
    assert!(!live(cp.admin.get_node(GetNodeRequest { node: a.node_id.clone() }).await.unwrap().into_inner()));
    assert!(live(cp.admin.get_node(GetNodeRequest { node: b.node_id.clone() }).await.unwrap().into_inner()));
    assert_code(agent.leave(authed(LeaveRequest {}, &a.credential)).await, Code::PermissionDenied, "has been removed");
}

/// A RotateKey request for node `node_id` announcing the key of private key `[n; 32]`.
async fn announce(agent: &mut Agent, node_id: &str, n: u8) -> RotateKeyRequest {
    let c = agent.enroll_challenge(EnrollChallengeRequest {}).await.expect("challenge").into_inner();
    wirefence_proto::possession::rotation(&[n; 32], node_id, &c).expect("answer the challenge")
}

fn peer_keys(view: &NodeView) -> Vec<Vec<u8>> {
    view.peers.iter().map(|p| p.public_key.clone()).collect()
}

#[tokio::test]
async fn a_key_rotates_when_the_node_registers_with_the_key_it_announced() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    let db = cp.enroll("db1", 1, &[]).await;
    let laptop = cp.enroll("laptop", 2, &[]).await;
    cp.apply(SSH_TO_DB1).await.unwrap();
    let mut agent = cp.agent().await;
    assert_eq!(peer_keys(&laptop_view(&cp, &laptop.credential).await), vec![pubkey(1)]);

    // Announced: pending, no view changes.
    let req = announce(&mut agent, &db.node_id, 3).await;
    agent.rotate_key(authed(req, &db.credential)).await.unwrap();
    let mut laptop_watch = watch(&cp, &laptop.credential, 0).await.unwrap();
    let before = next(&mut laptop_watch).await.unwrap();
    assert_eq!(peer_keys(snapshot(&before)), vec![pubkey(1)]);
    // Still the old key until the node uses the new one; then the new one, in one version.
    agent.register(authed(register_req("db1", 1, ""), &db.credential)).await.unwrap();
    silent(&mut laptop_watch, 300).await;
    agent.register(authed(register_req("db1", 3, ""), &db.credential)).await.unwrap();
    let rotated = next(&mut laptop_watch).await.unwrap();
    assert_eq!(rotated.version, before.version + 1);
    assert_eq!(peer_keys(&laptop_view(&cp, &laptop.credential).await), vec![pubkey(3)]);
    // Done: the old key is no key of this node any more, the new one stays.
    assert_code(
        agent.register(authed(register_req("db1", 1, ""), &db.credential)).await,
        Code::PermissionDenied,
        "neither this node's key nor the key it announced",
    );
    agent.register(authed(register_req("db1", 3, ""), &db.credential)).await.unwrap();
    // Announcing again (an agent interrupted after its announcement) is harmless.
    for _ in 0..2 {
        let req = announce(&mut agent, &db.node_id, 4).await;
        agent.rotate_key(authed(req, &db.credential)).await.unwrap();
    }
    agent.register(authed(register_req("db1", 4, ""), &db.credential)).await.unwrap();
    assert_eq!(peer_keys(&laptop_view(&cp, &laptop.credential).await), vec![pubkey(4)]);
}

#[tokio::test]
async fn a_node_cannot_rotate_to_a_key_it_does_not_hold_or_another_nodes_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    let db = cp.enroll("db1", 1, &[]).await;
    let laptop = cp.enroll("laptop", 2, &[]).await;
    let gone = cp.enroll("gone", 5, &[]).await;
    cp.admin.remove_node(RemoveNodeRequest { node: "gone".into() }).await.unwrap();
    cp.apply(SSH_TO_DB1).await.unwrap();
    let mut agent = cp.agent().await;

    // Without a credential, or with another node's proof, or a proof for another key.
    let req = announce(&mut agent, &db.node_id, 3).await;
    assert_code(agent.rotate_key(req).await, Code::Unauthenticated, "missing credential");
    let req = announce(&mut agent, &laptop.node_id, 3).await;
    assert_code(agent.rotate_key(authed(req, &db.credential)).await, Code::Unauthenticated, "proof");
    let mut req = announce(&mut agent, &db.node_id, 3).await;
    req.new_public_key = pubkey(6);
    assert_code(agent.rotate_key(authed(req, &db.credential)).await, Code::Unauthenticated, "proof");
    // A challenge answers once.
    let req = announce(&mut agent, &db.node_id, 3).await;
    agent.rotate_key(authed(req.clone(), &db.credential)).await.unwrap();
    assert_code(agent.rotate_key(authed(req, &db.credential)).await, Code::Unauthenticated, "challenge");
    // Keys other nodes have, announced or had (held here: the test knows their private keys).
    let req = announce(&mut agent, &db.node_id, 2).await;
    assert_code(agent.rotate_key(authed(req, &db.credential)).await, Code::AlreadyExists, "");
    let req = announce(&mut agent, &laptop.node_id, 3).await;
    assert_code(agent.rotate_key(authed(req, &laptop.credential)).await, Code::AlreadyExists, "");
    let req = announce(&mut agent, &db.node_id, 5).await;
    assert_code(agent.rotate_key(authed(req, &db.credential)).await, Code::PermissionDenied, &gone.node_id);
    let req = announce(&mut agent, &db.node_id, 1).await;
    assert_code(agent.rotate_key(authed(req, &db.credential)).await, Code::InvalidArgument, "already");
    // A key nobody announced is refused at registration; the node keeps its key.
    assert_code(
        agent.register(authed(register_req("db1", 7, ""), &db.credential)).await,
        Code::PermissionDenied,
        "rotate-key",
    );
    assert_eq!(peer_keys(&laptop_view(&cp, &laptop.credential).await), vec![pubkey(1)]);
}

#[tokio::test]
async fn a_node_that_lost_its_state_reenrolls_keeping_its_identity_with_an_admins_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    let db = cp.enroll("db1", 1, &["db"]).await;
    let laptop = cp.enroll("laptop", 2, &[]).await;
    cp.apply(SSH_TO_DB1).await.unwrap();
    let mut agent = cp.agent().await;
    let reenroll = |node: &str| ReenrollNodeRequest { node: node.into(), expires_in_secs: None };

    let key = cp.admin.reenroll_node(reenroll("db1")).await.unwrap().into_inner();
    assert_eq!(key.node_id, db.node_id);
    // Only under the node's hostname, only with a key pair nobody has.
    let req = cp.enroll_req("web1", 3, &key.key).await;
    assert_code(agent.register(req).await, Code::PermissionDenied, "db1");
    let req = cp.enroll_req("db1", 2, &key.key).await;
    assert_code(agent.register(req).await, Code::AlreadyExists, "");
    // A proof made with another private key than the one of the public key is refused.
    let mut req = cp.enroll_req("db1", 3, &key.key).await;
    req.public_key = pubkey(4);
    assert_code(agent.register(req).await, Code::Unauthenticated, "proof");

    let req = cp.enroll_req("db1", 3, &key.key).await;
    let again = agent.register(req).await.unwrap().into_inner();
    assert_eq!((again.node_id.as_str(), &again.addresses), (db.node_id.as_str(), &db.addresses));
    assert_ne!(again.credential, db.credential);
    // The old credential is over; the new one works; peers know the new key; the policy
    // still names the node (same addresses, same place).
    assert_code(watch(&cp, &db.credential, 0).await, Code::Unauthenticated, "invalid credential");
    assert!(watch(&cp, &again.credential, 0).await.is_ok());
    let view = laptop_view(&cp, &laptop.credential).await;
    assert_eq!(peer_keys(&view), vec![pubkey(3)]);
    assert!(names(&view, &db, "db1"));
    let shown = cp.admin.get_node(GetNodeRequest { node: "db1".into() }).await.unwrap().into_inner();
    assert_eq!((shown.tags, shown.public_key), (vec!["db".to_string()], pubkey(3)));
    // Single use.
    let req = cp.enroll_req("db1", 5, &key.key).await;
    assert_code(agent.register(req).await, Code::PermissionDenied, "no uses left");
    // Only for a live node.
    cp.admin.remove_node(RemoveNodeRequest { node: "laptop".into() }).await.unwrap();
    assert_code(cp.admin.reenroll_node(reenroll("laptop")).await, Code::PermissionDenied, "removed");
    assert_code(cp.admin.reenroll_node(reenroll("nobody")).await, Code::NotFound, "");
}
