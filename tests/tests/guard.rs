//! The agent against a hostile control plane (a real `wirefence.v1` server that pushes
//! whatever the test says): views that would capture the host's traffic, cut it off its LAN
//! or its control channel, or put tunnel addresses and endpoints where they do harm are
//! refused whole, reported as ApplyFailed with the reason; the routes in the kernel and the
//! saved view stay as they were. With the exit-node opt-in a default route is accepted, and
//! a saved view that a tightened config forbids is not used at the next start.

use std::time::Duration;

use wirefence_agent::model::{PrivateKey, PublicKey};
use wirefence_proto::v1;
use wirefence_tests::hostile::HostileControlPlane;
use wirefence_tests::*;

const T: Duration = Duration::from_secs(20);
/// The one database incarnation the hostile control plane claims.
const HOSTILE_INCARNATION: &str = "hostile";
const PEER_ENDPOINT: &str = "172.31.255.200:51820";
/// Site routes the operator accepts beyond the overlay (wide on purpose: the host's LAN,
/// its second network and the control plane's address lie inside, and must still be refused).
const ACCEPT: &str = "accept_routes = [\"10.99.0.0/16\", \"172.16.0.0/12\", \"192.168.0.0/16\"]";

fn prefix(s: &str) -> v1::IpPrefix {
    s.parse::<ipnet::IpNet>().unwrap().into()
}

fn peer(k: &PublicKey, endpoint: &str, allowed: &[&str]) -> v1::Peer {
    let endpoint: std::net::SocketAddr = endpoint.parse().unwrap();
    v1::Peer {
        public_key: k.0.to_vec(),
        name: "p".into(),
        endpoint: Some(endpoint.into()),
        allowed_ips: allowed.iter().map(|a| prefix(a)).collect(),
        persistent_keepalive: 0,
    }
}

fn snapshot(version: u64, addresses: &[&str], peers: Vec<v1::Peer>) -> v1::Update {
    with_mesh(version, addresses, peers, &[])
}

fn with_mesh(version: u64, addresses: &[&str], peers: Vec<v1::Peer>, mesh: &[&str]) -> v1::Update {
    let view = v1::NodeView {
        addresses: addresses.iter().map(|a| prefix(a)).collect(),
        peers,
        policy: Some(v1::Policy::default()),
        mesh_prefixes: mesh.iter().map(|m| prefix(m)).collect(),
        refused_routes: vec![],
    };
    v1::Update {
        version,
        body: Some(v1::update::Body::Snapshot(view)),
        incarnation: HOSTILE_INCARNATION.into(),
        continued: false,
    }
}

fn applied_version(h: &Host) -> u64 {
    h.control_status()["applied_version"].as_u64().unwrap_or(0)
}

/// One host with a second network (lan0, 192.168.77.0/24) beside the one its control plane
/// is on, in control mode against a hostile control plane; and its agent.
fn hostile_lab() -> (Lab, HostileControlPlane, AgentProc) {
    let lab = Lab::new(1);
    let h = &lab.hosts[0];
    h.ns.ip(&["link", "add", "lan0", "type", "veth", "peer", "name", "lan0p"]);
    h.ns.ip(&["addr", "add", "192.168.77.1/24", "dev", "lan0"]);
    h.ns.ip(&["link", "set", "lan0", "up"]);
    let cp = HostileControlPlane::start(
        &lab,
        v1::RegisterResponse {
            node_id: "h1".into(),
            credential: "h1.hostile-credential".into(),
            addresses: vec![prefix("10.77.0.1/32")],
            overlay: vec![prefix("10.77.0.0/24"), prefix("fd77::/64")],
            rotate_credential: false,
            refused_routes: vec![],
        },
    );
    h.write_hostile_config(ACCEPT);
    let agent = h.spawn_agent();
    (lab, cp, agent)
}

/// Mesh prefixes become unreachable routes: a control plane could use them to cut the host
/// off its LAN, its control channel or its peers. Those are left out; the rest is applied.
#[test]
fn hostile_mesh_prefixes_cannot_cut_the_host_off() {
    let (lab, cp, _agent) = hostile_lab();
    let h = &lab.hosts[0];
    let k = PrivateKey::generate().public_key();
    let own = ["10.77.0.1/32", "fd77::1/128"];
    let good = ["10.77.0.2/32", "fd77::2/128"];
    let mesh = [
        "10.77.0.0/24",      // the overlay
        "fd77::/64",         // the overlay
        "10.99.0.0/16",      // a site route inside accept_routes
        "172.16.0.0/12",     // covers the control plane and the host's own network
        "192.168.77.0/25",   // inside the host's LAN
        "172.31.255.200/32", // the peer's endpoint
        "10.50.0.0/16",      // a site this host does not accept
    ];
    cp.push(with_mesh(1, &own, vec![peer(&k, PEER_ENDPOINT, &good)], &mesh));
    assert_eq!(cp.outcome(1, T), Ok(()), "the view is applied, its harmful mesh prefixes left out");
    let unreachable =
        || -> Vec<String> { h.ns.owned_routes(PROTO).into_iter().filter(|r| r.ends_with(" unreachable")).collect() };
    wait_until("the unreachable routes are in the kernel", T, || unreachable().len() == 3);
    assert_eq!(
        unreachable(),
        ["10.77.0.0/24 main unreachable", "10.99.0.0/16 main unreachable", "fd77::/64 main unreachable"]
    );
    // The control channel still works: the next view arrives and is applied.
    cp.push(with_mesh(2, &own, vec![peer(&k, PEER_ENDPOINT, &good)], &mesh[..2]));
    assert_eq!(cp.outcome(2, T), Ok(()));
    wait_until("a withdrawn mesh prefix loses its route", T, || unreachable().len() == 2);

    // A prefix that takes in every address is refused whole.
    cp.push(with_mesh(3, &own, vec![peer(&k, PEER_ENDPOINT, &good)], &["0.0.0.0/0"]));
    let reason = cp.outcome(3, T).expect_err("a default mesh prefix is refused");
    assert!(reason.contains("mesh_prefixes: 0.0.0.0/0 takes in every address"), "{reason}");
    assert_eq!(unreachable().len(), 2, "the previous routes stay");
}

#[test]
fn a_hostile_control_plane_cannot_take_the_host() {
    let (lab, cp, mut agent) = hostile_lab();
    let h = &lab.hosts[0];

    let k = PrivateKey::generate().public_key();
    let own = ["10.77.0.1/32", "fd77::1/128"];
    let good = ["10.77.0.2/32", "fd77::2/128"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> { good.iter().chain(extra).copied().collect() };
    cp.push(snapshot(1, &own, vec![peer(&k, PEER_ENDPOINT, &good)]));
    assert_eq!(cp.outcome(1, T), Ok(()), "the legitimate view is applied");
    wait_until("the peer's routes are in the kernel", T, || h.ns.owned_routes(PROTO).len() == 2);
    let routes = h.ns.owned_routes(PROTO);
    let saved = h.saved_view_bytes();
    assert!(!saved.is_empty(), "the applied view is saved");

    let hostile: Vec<(v1::Update, &str)> = vec![
        (snapshot(2, &own, vec![peer(&k, PEER_ENDPOINT, &with(&["0.0.0.0/0"]))]), "0.0.0.0/0 is a default route"),
        (
            snapshot(3, &own, vec![peer(&k, PEER_ENDPOINT, &with(&["192.168.0.0/16"]))]),
            "192.168.0.0/16 covers 192.168.77.0/24, a network of this host's interface lan0",
        ),
        (
            snapshot(4, &own, vec![peer(&k, PEER_ENDPOINT, &with(&["172.31.255.254/32"]))]),
            "172.31.255.254/32 covers the control plane's address 172.31.255.254",
        ),
        (
            snapshot(5, &["10.0.0.0/8"], vec![peer(&k, PEER_ENDPOINT, &good)]),
            "addresses: 10.0.0.0/8 is outside the overlay ranges",
        ),
        (snapshot(6, &own, vec![peer(&k, "127.0.0.1:51820", &good)]), "a loopback address is not an endpoint"),
        (
            snapshot(7, &own, vec![peer(&k, "10.77.0.9:51820", &good)]),
            "an endpoint inside the overlay would carry the tunnel through itself",
        ),
        (
            snapshot(8, &own, vec![peer(&k, PEER_ENDPOINT, &with(&["172.31.255.200/32"]))]),
            "covers the endpoint 172.31.255.200:51820",
        ),
        (
            snapshot(9, &own, vec![peer(&k, PEER_ENDPOINT, &with(&["10.88.0.0/24"]))]),
            "10.88.0.0/24 is neither inside the overlay",
        ),
        // The same rules hold for a delta.
        (
            v1::Update {
                version: 10,
                incarnation: HOSTILE_INCARNATION.into(),
                continued: false,
                body: Some(v1::update::Body::Delta(v1::ViewDelta {
                    base_version: 1,
                    upsert_peers: vec![peer(
                        &PrivateKey::generate().public_key(),
                        "172.31.255.201:51820",
                        &["10.77.0.3/32", "192.168.77.0/24"],
                    )],
                    ..Default::default()
                })),
            },
            "192.168.77.0/24 covers 192.168.77.0/24, a network of this host's interface lan0",
        ),
    ];
    for (update, want) in hostile {
        let version = update.version;
        cp.push(update);
        let reason = cp.outcome(version, T).expect_err("a hostile view is refused");
        assert!(reason.starts_with("refused by the local guard: ") && reason.contains(want), "v{version}: {reason}");
        assert_eq!(h.ns.owned_routes(PROTO), routes, "v{version}: the previous routes stay");
        assert_eq!(h.saved_view_bytes(), saved, "v{version}: nothing is saved as last known good");
        assert_eq!(applied_version(h), 1, "v{version}");
    }

    // A site route inside accept_routes is taken.
    cp.push(snapshot(11, &own, vec![peer(&k, PEER_ENDPOINT, &with(&["10.99.1.0/24"]))]));
    assert_eq!(cp.outcome(11, T), Ok(()));
    wait_until("the accepted site route is in the kernel", T, || {
        h.ns.owned_routes(PROTO).iter().any(|r| r.starts_with("10.99.1.0/24 "))
    });
    assert_ne!(h.saved_view_bytes(), saved, "an applied view is saved");

    // Exit node: with the opt-in the default routes are accepted.
    agent.kill9();
    h.write_hostile_config(&format!("{ACCEPT}\naccept_default_route = true"));
    agent = h.spawn_agent();
    cp.push(snapshot(12, &own, vec![peer(&k, PEER_ENDPOINT, &with(&["0.0.0.0/0", "::/0"]))]));
    assert_eq!(cp.outcome(12, T), Ok(()), "the opted-in default route is applied");
    wait_until("the default routes are in the kernel", T, || {
        h.ns.owned_routes(PROTO).iter().filter(|r| r.starts_with("default ")).count() == 2
    });
    let exit_saved = h.saved_view_bytes();

    // The opt-in withdrawn: the saved view breaks the guard and is not used at the next
    // start (the control plane sends nothing more here).
    agent.kill9();
    cp.forget();
    h.write_hostile_config(ACCEPT);
    let agent = h.spawn_agent();
    wait_until("the agent refuses its saved view", T, || agent.log_text().contains("breaks the local guard"));
    assert!(agent.log_text().contains("is a default route"), "{}", agent.log_text());
    wait_until("the saved view's routes are gone", T, || h.ns.owned_routes(PROTO).is_empty());
    assert_eq!(h.saved_view_bytes(), exit_saved, "the refused file is kept as it was");
}
