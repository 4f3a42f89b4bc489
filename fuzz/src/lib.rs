//! The update decoder/validator fuzz target's logic and seed corpus.
//!
//! Input format: a sequence of chunks, each a protobuf varint length and then that many bytes
//! (prost's length-delimited form; a short last chunk takes what is left). Each chunk that
//! decodes as a `wirefence.v1.Update` is offered to one `Tracker`, and an `Offer::Apply` is
//! committed, as the agent's client does.

use prost::Message;
use wirefence_agent::control::{ControlView, Offer, Tracker};
use wirefence_agent::model::PublicKey;
use wirefence_proto::v1::{self, update::Body};

/// This node's public key in every run (seed `own-key-rejected` names it as a peer).
pub const OWN: PublicKey = PublicKey([0xee; 32]);

/// The updates in `data` (chunks that are not a valid `Update` are skipped).
pub fn updates(mut data: &[u8]) -> impl Iterator<Item = v1::Update> + '_ {
    std::iter::from_fn(move || loop {
        if data.is_empty() {
            return None;
        }
        let len = prost::encoding::decode_varint(&mut data).ok()?;
        let (chunk, rest) = data.split_at(usize::try_from(len).unwrap_or(usize::MAX).min(data.len()));
        data = rest;
        if let Ok(u) = v1::Update::decode(chunk) {
            return Some(u);
        }
    })
}

/// Offers every update in `data` to a fresh tracker and checks, after each one:
/// - an applied update strictly raises the version, to the update's own;
/// - an applied view roundtrips through its wire form (`to_snapshot`, encoded, decoded,
///   `from_snapshot`) to itself, and the same update offered again is stale;
/// - a stale, out-of-order or rejected update leaves the version and the view unchanged.
///
/// Returns the version applied in the end.
pub fn check_updates(data: &[u8]) -> u64 {
    let mut tracker = Tracker::new(OWN, None);
    for u in updates(data) {
        step(&mut tracker, &u);
    }
    tracker.version()
}

fn step(t: &mut Tracker, u: &v1::Update) {
    let (version, view) = (t.version(), t.view().cloned());
    match t.offer(u) {
        Ok(Offer::Apply { version: v, view: next }) => {
            assert!(v > version && v == u.version, "applied version {v} for update {} at {version}", u.version);
            let wire = v1::NodeView::decode(next.to_snapshot().encode_to_vec().as_slice()).expect("own encoding");
            assert_eq!(ControlView::from_snapshot(&wire, &OWN), Ok(next.clone()), "view does not roundtrip");
            t.commit(u, next.clone());
            assert_eq!((t.version(), t.view()), (v, Some(&next)), "commit did not store the view");
            assert_eq!(t.offer(u), Ok(Offer::Stale { version: v, applied: v }), "replay is not stale");
            return;
        }
        Ok(Offer::Stale { version: v, applied }) => {
            assert!(v == u.version && v <= applied && applied == version, "bad stale {v}/{applied} at {version}");
        }
        Ok(Offer::OutOfOrder { version: v, base, applied }) => {
            let Some(Body::Delta(d)) = &u.body else { panic!("a snapshot was out of order") };
            assert!(v == u.version && v > version && applied == version && base == d.base_version);
            assert!(base != applied || view.is_none(), "delta on its base {base} was out of order");
        }
        // Only a stream's first update may reset (`offer_on_stream`), or an update of another
        // incarnation, which these never are: `offer` never does here.
        Ok(Offer::Reset { version: v, .. }) => panic!("offer() reset to version {v}"),
        Err(e) => {
            let _ = e.to_string();
        }
    }
    assert_eq!((t.version(), t.view()), (version, view.as_ref()), "a not applied update changed the state");
}

fn prefix(addr: &[u8], prefix_len: u32) -> v1::IpPrefix {
    v1::IpPrefix { addr: addr.to_vec(), prefix_len }
}

fn peer(k: u8, name: &str, endpoint: Option<([u8; 4], u32)>, ips: Vec<v1::IpPrefix>, keepalive: u32) -> v1::Peer {
    v1::Peer {
        public_key: vec![k; 32],
        name: name.into(),
        endpoint: endpoint.map(|(ip, port)| v1::SocketAddress { ip: ip.to_vec(), port }),
        allowed_ips: ips,
        persistent_keepalive: keepalive,
    }
}

fn rule(id: &str, from: v1::IpPrefix, to: v1::IpPrefix, protocol: Option<u32>, ports: &[(u32, u32)]) -> v1::Rule {
    let ports = ports.iter().map(|&(first, last)| v1::PortRange { first, last }).collect();
    v1::Rule { id: id.into(), from: vec![from], to: vec![to], protocol, ports }
}

fn snapshot(version: u64) -> v1::Update {
    let v6 = |last: u8, len| prefix(&[0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, last], len);
    let view = v1::NodeView {
        addresses: vec![prefix(&[10, 77, 0, 1], 32), v6(1, 128)],
        peers: vec![
            peer(1, "a", Some(([192, 0, 2, 1], 51820)), vec![prefix(&[10, 77, 0, 2], 32), v6(2, 128)], 25),
            peer(2, "b", None, vec![prefix(&[10, 77, 0, 3], 32), prefix(&[10, 88, 0, 0], 16)], 0),
        ],
        policy: Some(v1::Policy {
            rules: vec![
                rule("web", prefix(&[10, 77, 0, 0], 24), prefix(&[10, 77, 0, 1], 32), Some(6), &[(80, 80), (443, 443)]),
                rule("ping", prefix(&[10, 0, 0, 0], 8), prefix(&[10, 77, 0, 1], 32), Some(1), &[]),
                rule("v6-any", v6(0, 64), v6(1, 128), None, &[]),
            ],
        }),
        mesh_prefixes: vec![prefix(&[10, 77, 0, 0], 16), v6(0, 64), prefix(&[10, 88, 0, 0], 16)],
        refused_routes: vec![v1::RefusedRoute {
            route: Some(prefix(&[10, 99, 0, 0], 24)),
            reason: "10.99.0.0/24 is not within the routes granted to this node (none)".into(),
        }],
    };
    v1::Update { version, body: Some(Body::Snapshot(view)), ..Default::default() }
}

fn delta(version: u64, base_version: u64, d: v1::ViewDelta) -> v1::Update {
    v1::Update { version, body: Some(Body::Delta(v1::ViewDelta { base_version, ..d })), ..Default::default() }
}

fn encode(updates: &[v1::Update]) -> Vec<u8> {
    let mut out = Vec::new();
    for u in updates {
        u.encode_length_delimited(&mut out).expect("Vec grows");
    }
    out
}

/// The seed corpus (name, input, version applied in the end): a snapshot; a snapshot, a
/// delta, a replay and a delta out of order; a snapshot and a delta rejected for naming this
/// node's own key.
pub fn seeds() -> Vec<(&'static str, Vec<u8>, u64)> {
    let change = v1::ViewDelta {
        upsert_peers: vec![peer(3, "c", Some(([198, 51, 100, 7], 4500)), vec![prefix(&[10, 77, 0, 4], 32)], 0)],
        remove_peers: vec![vec![2; 32]],
        addresses: Some(v1::AddressList { prefixes: vec![prefix(&[10, 77, 0, 1], 32)] }),
        policy: Some(v1::Policy {
            rules: vec![rule("udp", prefix(&[10, 77, 0, 0], 24), prefix(&[0, 0, 0, 0], 0), Some(17), &[(53, 53)])],
        }),
        ..Default::default()
    };
    let own = v1::ViewDelta { upsert_peers: vec![peer(0xee, "me", None, vec![], 0)], ..Default::default() };
    vec![
        ("seed-snapshot", encode(&[snapshot(1)]), 1),
        ("seed-delta", encode(&[snapshot(1), delta(2, 1, change.clone()), snapshot(1), delta(9, 7, change)]), 2),
        ("seed-own-key-rejected", encode(&[snapshot(3), delta(4, 3, own)]), 3),
    ]
}
