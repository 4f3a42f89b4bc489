//! A model of the kernel, applying operations to an `Observed`, for planner tests.
use super::*;
use crate::model::{ClampObserved, DeviceState, LinkState};

pub fn apply(desired: &Desired, obs: &mut Observed, plan: &Plan, next_index: u32) {
    for op in &plan.ops {
        match op {
            Op::CreateDevice => {
                // A new link loses every route and address of an old one.
                obs.link = Some(LinkState { index: next_index, mtu: 1420, up: false });
                obs.addresses.clear();
                obs.device = Some(DeviceState::default());
                obs.policy.attached = false;
                obs.clamp = ClampObserved::default();
                obs.endpoints_set.clear();
            }
            Op::ApplyPolicy => {
                obs.policy.applied = desired.policy.as_ref().map(|p| p.digest);
                obs.policy.pinned = true;
            }
            Op::AttachPolicy => {
                obs.policy.attached = true;
                obs.policy.pinned = true;
            }
            Op::RemovePolicy => obs.policy = Default::default(),
            Op::SetMss(m) => obs.policy.mss = Some(*m),
            Op::AttachClamp(m) => obs.clamp = ClampObserved { limits: Some(*m), present: true },
            Op::RemoveClamp => obs.clamp = ClampObserved::default(),
            Op::DelRule(r) => assert!(obs.rules.remove(r), "deleted a missing rule"),
            Op::DelUnknownRule(r) => {
                let before = obs.unknown_rules.len();
                obs.unknown_rules.retain(|u| u != r);
                assert!(obs.unknown_rules.len() < before, "deleted a missing unknown rule");
            }
            Op::DelRoute(r) => assert!(obs.routes.remove(r), "deleted a missing route"),
            Op::DelAddress(a) => assert!(obs.addresses.remove(a), "deleted a missing address"),
            Op::RemovePeer(k) => {
                let d = obs.device.as_mut().unwrap();
                assert!(d.peers.remove(k).is_some(), "removed a missing peer");
                d.live.remove(k);
                obs.endpoints_set.remove(k);
            }
            Op::ConfigureDevice { private_key, listen_port, fwmark } => {
                let d = obs.device.as_mut().unwrap();
                if *private_key {
                    d.public_key = Some(desired.device.private_key.public_key());
                }
                if let Some(p) = listen_port {
                    d.listen_port = Some(*p);
                }
                if let Some(m) = fwmark {
                    d.fwmark = Some(*m).filter(|m| *m != 0);
                }
            }
            Op::UpsertPeer(u) => {
                let d = obs.device.as_mut().unwrap();
                let p = d.peers.entry(u.key).or_default();
                if let Some(e) = u.endpoint {
                    p.endpoint = Some(e);
                    obs.endpoints_set.insert(u.key, e);
                }
                if let Some(a) = &u.allowed_ips {
                    p.allowed_ips = a.clone();
                }
                if let Some(k) = u.persistent_keepalive {
                    p.persistent_keepalive = Some(k).filter(|k| *k != 0);
                }
            }
            Op::SetMtu(m) => obs.link.as_mut().unwrap().mtu = *m,
            Op::SetUp => obs.link.as_mut().unwrap().up = true,
            Op::AddAddress(a) => assert!(obs.addresses.insert(*a), "added an existing address"),
            Op::AddRoute(r) => {
                let oif = match r.kind {
                    RouteKind::Tunnel => obs.link.unwrap().index,
                    RouteKind::Unreachable => 0,
                };
                assert!(obs.routes.insert(OwnedRoute { route: *r, oif }), "added an existing route")
            }
            Op::AddRule(r) => assert!(obs.rules.insert(*r), "added an existing rule"),
            Op::SetForwarding(f) => {
                let g = &mut obs.gateway;
                let found = g.forwarding.get(f).copied().unwrap_or(false);
                g.recorded.entry(*f).or_insert(found);
                g.forwarding.insert(*f, true);
            }
            Op::RestoreForwarding(f) => {
                let g = &mut obs.gateway;
                let value = g.recorded.remove(f).expect("restored without a record");
                g.forwarding.insert(*f, value);
            }
            Op::ApplyNat => obs.gateway.nat = NatState::Present(desired.gateway.masquerade.clone()),
            Op::RemoveNat => obs.gateway.nat = NatState::Absent,
        }
    }
}
