use super::*;
use crate::model::*;
use proptest::prelude::*;
use std::collections::BTreeMap;

fn keys() -> Vec<PrivateKey> {
    (0..6).map(|_| PrivateKey::generate()).collect()
}

fn arb_net() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (0u8..4, 0u8..=32).prop_map(|(a, l)| IpNet::V4(ipnet::Ipv4Net::new([10, a, 0, 0].into(), l).unwrap().trunc())),
        (0u16..4, 0u8..=128).prop_map(|(a, l)| IpNet::V6(
            ipnet::Ipv6Net::new([0xfd00, a, 0, 0, 0, 0, 0, 0].into(), l).unwrap().trunc()
        )),
    ]
}

fn arb_peer() -> impl Strategy<Value = PeerSpec> {
    (
        proptest::option::of((1u8..4, 1u16..4).prop_map(|(h, p)| SocketAddr::from(([192, 0, 2, h], 51820 + p)))),
        proptest::collection::btree_set(arb_net(), 0..4),
        proptest::option::of(1u16..30),
    )
        .prop_map(|(endpoint, allowed_ips, persistent_keepalive)| PeerSpec {
            endpoint,
            allowed_ips,
            persistent_keepalive,
        })
}

fn arb_rule() -> impl Strategy<Value = Rule> {
    (any::<bool>(), 5180u32..5183, any::<bool>()).prop_map(|(v6, priority, sup)| Rule {
        family: if v6 { Family::V6 } else { Family::V4 },
        priority,
        action: if sup {
            RuleAction::MainSuppressDefault
        } else {
            RuleAction::NotFwmarkLookup { fwmark: 51820, table: 51820 }
        },
    })
}

fn arb_routes() -> impl Strategy<Value = BTreeSet<Route>> {
    proptest::collection::btree_set(
        (arb_net(), prop_oneof![Just(254u32), Just(51820u32)], any::<bool>()).prop_map(|(dst, table, unreachable)| {
            Route { dst, table, kind: if unreachable { RouteKind::Unreachable } else { RouteKind::Tunnel }, src: None }
        }),
        0..5,
    )
}

prop_compose! {
    fn arb_desired(k: Vec<PrivateKey>)(
        which in 0usize..3,
        mtu in proptest::option::of(prop_oneof![Just(1420u32), Just(1380u32)]),
        listen_port in proptest::option::of(51820u16..51823),
        fwmark in proptest::option::of(1u32..3),
        addresses in proptest::collection::btree_set(arb_net(), 0..3),
        peers in proptest::collection::vec((0usize..6, arb_peer()), 0..5),
        routes in arb_routes(),
        rules in proptest::collection::btree_set(arb_rule(), 0..3),
        mss in prop_oneof![Just(MssSetting::Auto), Just(MssSetting::Off), Just(MssSetting::Fixed(1300))],
        gateway in arb_desired_gateway(),
    ) -> Desired {
        Desired {
            ifname: "wf0".parse().unwrap(),
            mtu,
            mss,
            device: DeviceSpec { private_key: k[which].clone(), listen_port, fwmark },
            addresses,
            peers: peers.into_iter().map(|(i, p)| (k[i].public_key(), p)).collect::<BTreeMap<_, _>>(),
            routes,
            rules,
            policy: None,
            gateway,
        }
    }
}

fn arb_families() -> impl Strategy<Value = BTreeSet<Family>> {
    proptest::collection::btree_set(prop_oneof![Just(Family::V4), Just(Family::V6)], 0..=2)
}

fn arb_masquerade() -> impl Strategy<Value = BTreeSet<crate::gateway::Masquerade>> {
    proptest::collection::btree_set(
        (arb_net(), prop_oneof![Just("wf0"), Just("wf1")])
            .prop_map(|(src, oif)| crate::gateway::Masquerade { src, oif: oif.parse().unwrap() }),
        0..3,
    )
}

fn arb_desired_gateway() -> impl Strategy<Value = crate::gateway::DesiredGateway> {
    (arb_families(), arb_masquerade(), any::<bool>()).prop_map(|(forward, masquerade, lan)| {
        crate::gateway::DesiredGateway {
            forward,
            masquerade,
            lan_source: lan.then(|| crate::gateway::LanSource {
                site: ["10.3.0.0/16".parse().unwrap(), "fd00:3::/32".parse().unwrap()].into(),
                overlay: ["10.0.0.0/16".parse().unwrap()].into(),
            }),
        }
    })
}

fn arb_observed_gateway() -> impl Strategy<Value = crate::gateway::ObservedGateway> {
    (
        proptest::collection::btree_map(prop_oneof![Just(Family::V4), Just(Family::V6)], any::<bool>(), 0..=2),
        proptest::collection::btree_map(prop_oneof![Just(Family::V4), Just(Family::V6)], any::<bool>(), 0..=2),
        prop_oneof![Just(NatState::Absent), Just(NatState::Other), arb_masquerade().prop_map(NatState::Present)],
        proptest::collection::btree_set(
            prop_oneof![Just("10.3.1.1/24"), Just("192.0.2.1/24"), Just("fd00:3::1/64")]
                .prop_map(|a| a.parse::<IpNet>().unwrap()),
            0..3,
        ),
    )
        .prop_map(|(forwarding, recorded, nat, host_addresses)| crate::gateway::ObservedGateway {
            forwarding,
            recorded,
            nat,
            host_addresses,
        })
}

prop_compose! {
    fn arb_observed(k: Vec<PrivateKey>)(
        link in proptest::option::of((1u32..4, prop_oneof![Just(1420u32), Just(1500u32)], any::<bool>())),
        has_device in any::<bool>(),
        key in proptest::option::of(0usize..3),
        listen_port in proptest::option::of(51820u16..51823),
        fwmark in proptest::option::of(1u32..3),
        addresses in proptest::collection::btree_set(arb_net(), 0..3),
        peers in proptest::collection::vec((0usize..6, arb_peer()), 0..5),
        routes in proptest::collection::btree_set((arb_routes(), 1u32..5), 0..3),
        rules in proptest::collection::btree_set(arb_rule(), 0..3),
        live in proptest::collection::btree_set(0usize..6, 0..4),
        unknown in proptest::collection::vec(0u32..4, 0..2),
        endpoints_set in proptest::collection::vec((0usize..6, 1u8..4, 1u16..4), 0..4),
        clamp in proptest::option::of((proptest::option::of(1300u16..1302), 1379u16..1382)),
        gateway in arb_observed_gateway(),
    ) -> Observed {
        let link = link.map(|(index, mtu, up)| LinkState { index, mtu, up });
        Observed {
            link,
            addresses: if link.is_some() { addresses } else { BTreeSet::new() },
            device: (has_device && link.is_some()).then(|| DeviceState {
                public_key: key.map(|i| k[i].public_key()),
                listen_port,
                fwmark,
                peers: peers.into_iter().map(|(i, p)| (k[i].public_key(), p)).collect(),
                live: live.into_iter().map(|i| k[i].public_key()).collect(),
            }),
            routes: routes
                .into_iter()
                .flat_map(|(rs, oif)| rs.into_iter().map(move |route| OwnedRoute {
                    route,
                    // The kernel reports an unreachable route with no link.
                    oif: if route.kind == RouteKind::Unreachable { 0 } else { oif },
                }))
                .collect(),
            rules,
            unknown_rules: unknown.into_iter().map(unknown_rule).collect(),
            policy: Default::default(),
            // A clamp on the device: one with these limits on both hooks, or a mix.
            clamp: match clamp {
                Some((v4, v6)) if link.is_some() => ClampObserved {
                    limits: v4.map(|v4| MssClamp { v4, v6 }),
                    present: true,
                },
                _ => ClampObserved::default(),
            },
            endpoints_set: endpoints_set
                .into_iter()
                .map(|(i, h, p)| (k[i].public_key(), SocketAddr::from(([192, 0, 2, h], 51820 + p))))
                .collect(),
            gateway,
        }
    }
}

/// An owned rule of a shape the agent never makes (a blackhole) at `priority`.
fn unknown_rule(priority: u32) -> UnknownRule {
    use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
    let mut msg = RuleMessage::default();
    msg.header.action = RuleAction::Blackhole;
    msg.attributes.push(RuleAttribute::Priority(priority));
    UnknownRule(msg)
}

fn converges(desired: &Desired, observed: &Observed) {
    let first = plan(desired, observed);
    assert_eq!(first, reference_plan(desired, observed), "the ordered walks changed the plan");
    assert!(first.ops.is_sorted_by_key(Op::phase), "not in phase order: {:?}", first.ops);
    let mut after = observed.clone();
    sim::apply(desired, &mut after, &first, 9);
    let second = plan(desired, &after);
    assert!(second.is_empty(), "second plan not empty: {:?}\nfirst: {:?}", second.ops, first.ops);
    // And what converged is what was desired.
    let link = after.link.unwrap();
    assert!(link.up);
    if let Some(m) = desired.mtu {
        assert_eq!(link.mtu, m);
    }
    assert_eq!(after.addresses, desired.addresses);
    assert_eq!(after.rules, desired.rules);
    assert!(after.unknown_rules.is_empty());
    let routes: BTreeSet<Route> = after
        .routes
        .iter()
        .inspect(|r| match r.route.kind {
            RouteKind::Tunnel => assert_eq!(r.oif, link.index),
            RouteKind::Unreachable => assert_eq!(r.oif, 0),
        })
        .map(|r| r.route)
        .collect();
    let sourced = crate::gateway::source::with_source(
        &desired.routes,
        desired.gateway.lan_source.as_ref(),
        &after.gateway.host_addresses,
    );
    assert_eq!(&routes, sourced.as_ref());
    // Forwarding on where desired; elsewhere as found before the agent changed it.
    for family in [Family::V4, Family::V6] {
        if desired.gateway.forward.contains(&family) {
            assert_eq!(after.gateway.forwarding.get(&family), Some(&true));
        } else {
            assert!(!after.gateway.recorded.contains_key(&family));
        }
    }
    let nat = if desired.gateway.masquerade.is_empty() {
        crate::gateway::nat::NatState::Absent
    } else {
        crate::gateway::nat::NatState::Present(desired.gateway.masquerade.clone())
    };
    assert_eq!(after.gateway.nat, nat);
    let dev = after.device.unwrap();
    assert_eq!(dev.public_key, Some(desired.device.private_key.public_key()));
    assert_eq!(dev.peers.keys().collect::<Vec<_>>(), desired.peers.keys().collect::<Vec<_>>());
    for (k, want) in &desired.peers {
        let have = &dev.peers[k];
        assert_eq!(have.allowed_ips, want.allowed_ips);
        assert_eq!(have.persistent_keepalive, want.persistent_keepalive);
        if let Some(e) = want.endpoint {
            // The configured endpoint, or one a live peer roamed to from it.
            let roamed = dev.live.contains(k) && after.endpoints_set.get(k) == Some(&e);
            assert!(have.endpoint == Some(e) || roamed, "{k}: {:?}, want {e}", have.endpoint);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn any_pair_converges_in_one_apply(
        (desired, observed) in Just(keys()).prop_flat_map(|k| (arb_desired(k.clone()), arb_observed(k)))
    ) {
        converges(&desired, &observed);
    }
}

fn sample() -> (Desired, Observed) {
    let k = keys();
    let peer = PeerSpec {
        endpoint: Some("192.0.2.2:51820".parse().unwrap()),
        allowed_ips: ["10.77.0.2/32".parse().unwrap()].into(),
        persistent_keepalive: Some(25),
    };
    let desired = Desired {
        ifname: "wf0".parse().unwrap(),
        mtu: None,
        device: DeviceSpec { private_key: k[0].clone(), listen_port: Some(51820), fwmark: None },
        addresses: ["10.77.0.1/24".parse().unwrap()].into(),
        peers: [(k[1].public_key(), peer)].into(),
        routes: [Route { dst: "10.77.0.2/32".parse().unwrap(), table: MAIN_TABLE, kind: RouteKind::Tunnel, src: None }]
            .into(),
        rules: BTreeSet::new(),
        policy: None,
        mss: MssSetting::Off,
        gateway: Default::default(),
    };
    let mut observed = Observed::default();
    sim::apply(&desired, &mut observed, &plan(&desired, &Observed::default()), 7);
    (desired, observed)
}

#[test]
fn gateway_ops_only_where_the_kernel_differs() {
    use crate::gateway::{Masquerade, ObservedGateway};
    let (mut desired, mut observed) = sample();
    observed.gateway.forwarding = [(Family::V4, false), (Family::V6, true)].into();
    desired.gateway.forward = [Family::V4, Family::V6].into();
    let m = Masquerade { src: "192.168.10.0/24".parse().unwrap(), oif: "wf0".parse().unwrap() };
    desired.gateway.masquerade = [m.clone()].into();
    // IPv6 forwarding is on already (the operator's): nothing to do there, nothing recorded.
    assert_eq!(plan(&desired, &observed).ops, [Op::SetForwarding(Family::V4), Op::ApplyNat]);
    let first = plan(&desired, &observed);
    sim::apply(&desired, &mut observed, &first, 7);
    assert_eq!(observed.gateway.recorded, [(Family::V4, false)].into());
    assert!(plan(&desired, &observed).is_empty());

    // Forwarding no longer asked for: the recorded value goes back; the table goes.
    desired.gateway = Default::default();
    assert_eq!(plan(&desired, &observed).ops, [Op::RestoreForwarding(Family::V4), Op::RemoveNat]);
    // A table holding something else is replaced (or removed).
    observed.gateway = ObservedGateway { nat: NatState::Other, ..Default::default() };
    assert_eq!(plan(&desired, &observed).ops, [Op::RemoveNat]);
    desired.gateway.masquerade = [m].into();
    assert_eq!(plan(&desired, &observed).ops, [Op::ApplyNat]);
}

#[test]
fn a_lan_source_moves_remote_routes_and_only_them() {
    let (mut desired, mut observed) = sample();
    let remote = Route { dst: "10.20.2.0/24".parse().unwrap(), table: MAIN_TABLE, kind: RouteKind::Tunnel, src: None };
    desired.routes.insert(remote);
    let first = plan(&desired, &observed);
    sim::apply(&desired, &mut observed, &first, 7);
    desired.gateway.lan_source = Some(crate::gateway::LanSource {
        site: ["192.168.10.0/24".parse().unwrap()].into(),
        overlay: ["10.77.0.0/24".parse().unwrap()].into(),
    });
    // No LAN address on the host yet: the routes stay.
    assert!(plan(&desired, &observed).is_empty());
    observed.gateway.host_addresses = ["192.168.10.1/24".parse().unwrap()].into();
    let sourced = Route { src: Some("192.168.10.1".parse().unwrap()), ..remote };
    let p = plan(&desired, &observed);
    assert_eq!(p.ops, [Op::DelRoute(OwnedRoute { route: remote, oif: 7 }), Op::AddRoute(sourced)]);
    sim::apply(&desired, &mut observed, &p, 7);
    assert!(plan(&desired, &observed).is_empty());
}

fn with_policy(desired: &mut Desired, digest: u64) {
    let policy = crate::policy::Policy::new(Vec::new()).unwrap();
    desired.policy = Some(DesiredPolicy {
        pin_root: "/sys/fs/bpf/wirefence".into(),
        compiled: std::sync::Arc::new(crate::policy::compile(&policy).unwrap()),
        digest,
    });
}

#[test]
fn mss_is_clamped_by_the_policy_programs_or_by_the_clamp_alone() {
    let (mut desired, observed) = sample();
    let auto = MssClamp { v4: 1380, v6: 1360 };
    // No policy: the clamp alone, with what the link's MTU allows.
    desired.mss = MssSetting::Auto;
    let p = plan(&desired, &observed);
    assert_eq!(p.ops, vec![Op::AttachClamp(auto)]);
    let mut after = observed.clone();
    sim::apply(&desired, &mut after, &p, 9);
    // A configured MTU changes the limits: a new clamp in place of the old.
    desired.mtu = Some(1280);
    let limits = MssClamp { v4: 1240, v6: 1220 };
    assert_eq!(plan(&desired, &after).ops, vec![Op::AttachClamp(limits), Op::SetMtu(1280)]);
    desired.mtu = None;
    // A policy: its programs clamp (limits in its maps before they are attached), and
    // the clamp alone goes, after them.
    with_policy(&mut desired, 7);
    let p = plan(&desired, &after);
    assert_eq!(p.ops, vec![Op::ApplyPolicy, Op::SetMss(auto), Op::AttachPolicy, Op::RemoveClamp]);
    sim::apply(&desired, &mut after, &p, 9);
    desired.mss = MssSetting::Fixed(1200);
    assert_eq!(plan(&desired, &after).ops, vec![Op::SetMss(MssClamp { v4: 1200, v6: 1200 })]);
    // Off with a policy: zero limits in its maps.
    desired.mss = MssSetting::Off;
    assert_eq!(plan(&desired, &after).ops, vec![Op::SetMss(MssClamp::OFF)]);
    // Off without one: nothing attached, a clamp found is taken off.
    desired.policy = None;
    let observed_clamp = Observed { clamp: ClampObserved { limits: None, present: true }, ..observed };
    assert_eq!(plan(&desired, &observed_clamp).ops, vec![Op::RemoveClamp]);
}

#[test]
fn policy_is_filled_then_attached_before_any_peer_on_a_new_device() {
    let (mut desired, _) = sample();
    with_policy(&mut desired, 7);
    let p = plan(&desired, &Observed::default());
    assert_eq!(&p.ops[..3], &[Op::CreateDevice, Op::ApplyPolicy, Op::AttachPolicy]);
    let mut after = Observed::default();
    sim::apply(&desired, &mut after, &p, 3);
    assert!(plan(&desired, &after).is_empty());
    // A new policy: only the apply.
    with_policy(&mut desired, 8);
    assert_eq!(plan(&desired, &after).ops, vec![Op::ApplyPolicy]);
    // Policy dropped from the config: removed.
    desired.policy = None;
    assert_eq!(plan(&desired, &after).ops, vec![Op::RemovePolicy]);
}

#[test]
fn unchanged_peer_is_not_touched_when_another_changes() {
    let (mut desired, observed) = sample();
    let newcomer = PrivateKey::generate().public_key();
    desired
        .peers
        .insert(newcomer, PeerSpec { allowed_ips: ["10.77.0.3/32".parse().unwrap()].into(), ..Default::default() });
    let p = plan(&desired, &observed);
    assert_eq!(p.ops.len(), 1, "{:?}", p.ops);
    assert!(matches!(&p.ops[0], Op::UpsertPeer(u) if u.key == newcomer));
}

#[test]
fn roamed_endpoint_without_configured_one_is_left_alone() {
    let (mut desired, mut observed) = sample();
    let key = *desired.peers.keys().next().unwrap();
    desired.peers.get_mut(&key).unwrap().endpoint = None;
    observed.device.as_mut().unwrap().peers.get_mut(&key).unwrap().endpoint =
        Some("198.51.100.9:4000".parse().unwrap());
    assert!(plan(&desired, &observed).is_empty());
}

#[test]
fn live_peer_that_roamed_from_the_endpoint_set_stays_where_it_is() {
    let (desired, mut observed) = sample();
    let key = *desired.peers.keys().next().unwrap();
    let configured = desired.peers[&key].endpoint.unwrap();
    assert_eq!(observed.endpoints_set.get(&key), Some(&configured), "the sample wrote the endpoint");
    let roamed: SocketAddr = "[2001:db8::9]:51820".parse().unwrap();
    let device = observed.device.as_mut().unwrap();
    device.peers.get_mut(&key).unwrap().endpoint = Some(roamed);
    device.live.insert(key);
    assert!(plan(&desired, &observed).is_empty(), "a live roamed peer is left where it is");

    // Without a current session the roamed address is not proven: back to the configured one.
    let mut stale = observed.clone();
    stale.device.as_mut().unwrap().live.clear();
    let set = |p: &Plan| matches!(&p.ops[..], [Op::UpsertPeer(u)] if u.endpoint == Some(configured));
    assert!(set(&plan(&desired, &stale)), "{:?}", plan(&desired, &stale).ops);
    // A configured endpoint this agent never wrote (changed since, or no record): written.
    let mut unrecorded = observed.clone();
    unrecorded.endpoints_set.clear();
    assert!(set(&plan(&desired, &unrecorded)), "{:?}", plan(&desired, &unrecorded).ops);
    let mut changed = observed.clone();
    changed.endpoints_set.insert(key, "192.0.2.99:51820".parse().unwrap());
    assert!(set(&plan(&desired, &changed)), "{:?}", plan(&desired, &changed).ops);
}

#[test]
fn foreign_link_routes_with_our_protocol_are_removed_but_ours_kept() {
    let (desired, mut observed) = sample();
    let stale = OwnedRoute {
        route: Route { dst: "10.99.0.0/24".parse().unwrap(), table: MAIN_TABLE, kind: RouteKind::Tunnel, src: None },
        oif: 3,
    };
    observed.routes.insert(stale);
    assert_eq!(plan(&desired, &observed).ops, vec![Op::DelRoute(stale)]);
}

#[test]
fn unreachable_routes_stay_when_their_peer_goes_and_outlive_the_link() {
    let (mut desired, _) = sample();
    let net: IpNet = "10.77.0.0/24".parse().unwrap();
    let fallback = Route { dst: net, table: MAIN_TABLE, kind: RouteKind::Unreachable, src: None };
    desired.routes.insert(fallback);
    let mut observed = Observed::default();
    sim::apply(&desired, &mut observed, &plan(&desired, &Observed::default()), 7);
    assert!(observed.routes.contains(&OwnedRoute { route: fallback, oif: 0 }));

    // The peer goes: its tunnel route is deleted, the unreachable one is not touched.
    let mut gone = desired.clone();
    gone.peers.clear();
    gone.routes.retain(|r| r.kind == RouteKind::Unreachable);
    let p = plan(&gone, &observed);
    assert!(p.ops.iter().all(|op| !matches!(op, Op::DelRoute(r) if r.route == fallback)), "{:?}", p.ops);
    assert!(p.ops.iter().any(|op| matches!(op, Op::DelRoute(r) if r.route.kind == RouteKind::Tunnel)));

    // The link is gone (recreated): the unreachable route, on no link, is kept.
    let mut no_link = observed.clone();
    no_link.link = None;
    no_link.device = None;
    no_link.routes.retain(|r| r.route.kind == RouteKind::Unreachable);
    let p = plan(&desired, &no_link);
    assert!(
        p.ops
            .iter()
            .all(|op| !matches!(op, Op::DelRoute(_) | Op::AddRoute(Route { kind: RouteKind::Unreachable, .. }))),
        "{:?}",
        p.ops
    );
}

#[test]
fn changed_allowed_ips_replace_only_that_field() {
    let (mut desired, observed) = sample();
    let key = *desired.peers.keys().next().unwrap();
    let new: BTreeSet<IpNet> = ["10.77.0.2/32".parse().unwrap(), "fd77::2/128".parse().unwrap()].into();
    desired.peers.get_mut(&key).unwrap().allowed_ips = new.clone();
    desired.routes.insert(Route {
        dst: "fd77::2/128".parse().unwrap(),
        table: MAIN_TABLE,
        kind: RouteKind::Tunnel,
        src: None,
    });
    let p = plan(&desired, &observed);
    assert_eq!(
        p.ops,
        vec![
            Op::UpsertPeer(PeerUpdate { key, endpoint: None, allowed_ips: Some(new), persistent_keepalive: None }),
            Op::AddRoute(Route {
                dst: "fd77::2/128".parse().unwrap(),
                table: MAIN_TABLE,
                kind: RouteKind::Tunnel,
                src: None
            }),
        ]
    );
}

/// The planner as it was before its ordered walks: the reference the faster one must match.
pub fn reference_plan(desired: &Desired, observed: &Observed) -> Plan {
    let mut ops = Vec::new();
    let link = observed.link.filter(|_| observed.device.is_some());
    if link.is_none() {
        ops.push(Op::CreateDevice);
    }
    plan_ebpf(desired, observed, link, &mut ops);

    for rule in observed.rules.difference(&desired.rules) {
        ops.push(Op::DelRule(*rule));
    }
    for rule in &observed.unknown_rules {
        ops.push(Op::DelUnknownRule(rule.clone()));
    }
    let desired_routes = crate::gateway::source::with_source(
        &desired.routes,
        desired.gateway.lan_source.as_ref(),
        &observed.gateway.host_addresses,
    );
    let mut kept_routes = BTreeSet::new();
    for owned in &observed.routes {
        let ours = match owned.route.kind {
            RouteKind::Tunnel => link.is_some_and(|l| l.index == owned.oif),
            RouteKind::Unreachable => true,
        };
        if ours && desired_routes.contains(&owned.route) && kept_routes.insert(owned.route) {
            continue;
        }
        ops.push(Op::DelRoute(*owned));
    }
    let observed_addresses = if link.is_some() { observed.addresses.clone() } else { BTreeSet::new() };
    for addr in observed_addresses.difference(&desired.addresses) {
        ops.push(Op::DelAddress(*addr));
    }
    if let Some(mtu) = desired.mtu {
        if link.map(|l| l.mtu) != Some(mtu) {
            ops.push(Op::SetMtu(mtu));
        }
    }
    if !link.is_some_and(|l| l.up) {
        ops.push(Op::SetUp);
    }

    let empty = Default::default();
    let device = observed.device.as_ref().filter(|_| link.is_some());
    let observed_peers = device.map_or(&empty, |d| &d.peers);
    for key in observed_peers.keys() {
        if !desired.peers.contains_key(key) {
            ops.push(Op::RemovePeer(*key));
        }
    }
    let want = &desired.device;
    let private_key = device.and_then(|d| d.public_key) != Some(want.private_key.public_key());
    let listen_port = want.listen_port.filter(|p| device.and_then(|d| d.listen_port) != Some(*p));
    let fwmark = Some(want.fwmark.unwrap_or(0)).filter(|m| device.and_then(|d| d.fwmark).unwrap_or(0) != *m);
    if private_key || listen_port.is_some() || fwmark.is_some() {
        ops.push(Op::ConfigureDevice { private_key, listen_port, fwmark });
    }
    for (key, spec) in &desired.peers {
        let update = match observed_peers.get(key) {
            None => PeerUpdate {
                key: *key,
                endpoint: spec.endpoint,
                allowed_ips: Some(spec.allowed_ips.clone()),
                persistent_keepalive: Some(spec.persistent_keepalive.unwrap_or(0)),
            },
            Some(have) => PeerUpdate {
                key: *key,
                endpoint: spec.endpoint.filter(|e| {
                    let live = device.is_some_and(|d| d.live.contains(key));
                    have.endpoint != Some(*e) && !(live && observed.endpoints_set.get(key) == Some(e))
                }),
                allowed_ips: Some(spec.allowed_ips.clone()).filter(|a| *a != have.allowed_ips),
                persistent_keepalive: Some(spec.persistent_keepalive.unwrap_or(0))
                    .filter(|k| have.persistent_keepalive.unwrap_or(0) != *k),
            },
        };
        let changed =
            update.endpoint.is_some() || update.allowed_ips.is_some() || update.persistent_keepalive.is_some();
        if changed {
            ops.push(Op::UpsertPeer(update));
        }
    }

    for addr in desired.addresses.difference(&observed_addresses) {
        ops.push(Op::AddAddress(*addr));
    }
    for route in desired_routes.difference(&kept_routes) {
        ops.push(Op::AddRoute(*route));
    }
    for rule in desired.rules.difference(&observed.rules) {
        ops.push(Op::AddRule(*rule));
    }
    // Gateway: forwarding per family, then the table, each where the kernel differs.
    for family in [Family::V4, Family::V6] {
        let on = observed.gateway.forwarding.get(&family) == Some(&true);
        match (desired.gateway.forward.contains(&family), observed.gateway.recorded.contains_key(&family)) {
            (true, _) if !on => ops.push(Op::SetForwarding(family)),
            (false, true) => ops.push(Op::RestoreForwarding(family)),
            _ => {}
        }
    }
    let nat_matches = match &observed.gateway.nat {
        NatState::Absent => desired.gateway.masquerade.is_empty(),
        NatState::Present(rules) => *rules == desired.gateway.masquerade && !rules.is_empty(),
        NatState::Other => false,
    };
    if !nat_matches {
        ops.push(if desired.gateway.masquerade.is_empty() { Op::RemoveNat } else { Op::ApplyNat });
    }
    ops.sort_by_key(Op::phase);
    Plan { ops }
}
