//! Which updates to apply: versions only go up, a delta applies on top of exactly the
//! version it names, and a duplicate, stale or out-of-order update is ignored (never an
//! error: streams resume and repeat). Versions count within one incarnation of the control
//! plane's database; a snapshot of another incarnation is taken whatever its version.

use wirefence_proto::v1;

use super::view::{ControlView, UpdateError};
use crate::model::PublicKey;

/// What the agent last applied: the view, its version and the incarnation of the control
/// plane's database that version counts in ("" = unknown: an old control plane or view file).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub version: u64,
    pub incarnation: String,
    pub view: ControlView,
}

/// The last applied version and its view.
#[derive(Clone, Debug)]
pub struct Tracker {
    own: PublicKey,
    applied: Option<Applied>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Offer {
    /// Apply this view, then [`Tracker::commit`] it.
    Apply { version: u64, view: ControlView },
    /// At or below the applied version: a duplicate or a stale replay.
    Stale { version: u64, applied: u64 },
    /// A delta for another base than the applied version (or of another incarnation): the
    /// stream lost its place and must be resumed.
    OutOfOrder { version: u64, base: u64, applied: u64 },
    /// The control plane's versions went back, or belong to another incarnation of its
    /// database (see [`Tracker::offer_on_stream`]): apply this view, then [`Tracker::reset`]
    /// to it.
    Reset { version: u64, applied: u64, view: ControlView },
}

impl Tracker {
    pub fn new(own: PublicKey, applied: Option<Applied>) -> Tracker {
        Tracker { own, applied }
    }

    /// The node's key changed (a key rotation): views are checked against the new one.
    pub fn set_own(&mut self, own: PublicKey) {
        self.own = own;
    }

    /// The applied version; 0 before the first.
    pub fn version(&self) -> u64 {
        self.applied.as_ref().map_or(0, |a| a.version)
    }

    /// The incarnation the applied version belongs to; "" before the first.
    pub fn incarnation(&self) -> &str {
        self.applied.as_ref().map_or("", |a| a.incarnation.as_str())
    }

    pub fn view(&self) -> Option<&ControlView> {
        self.applied.as_ref().map(|a| &a.view)
    }

    /// Decides what `u` means against the applied state, validating whatever would be applied.
    pub fn offer(&self, u: &v1::Update) -> Result<Offer, UpdateError> {
        self.offer_on_stream(u, false)
    }

    /// As [`Tracker::offer`]; `first`: `u` opens a stream resumed from the applied version.
    /// A control plane answers such a resume with a snapshot *below* that version only when
    /// its own versions went back (a database restored or recreated): that snapshot is its
    /// whole truth and is taken. Anywhere else an older version is a replay and ignored.
    /// An update naming another incarnation than the applied one (both known) is from
    /// another history: its snapshot is taken whatever its version, its delta cannot apply.
    pub fn offer_on_stream(&self, u: &v1::Update, first: bool) -> Result<Offer, UpdateError> {
        if u.version == 0 {
            return Err(UpdateError::ZeroVersion);
        }
        let applied = self.version();
        let body = u.body.as_ref().ok_or(UpdateError::NoBody)?;
        let foreign =
            self.applied.as_ref().is_some_and(|a| !u.incarnation.is_empty() && u.incarnation != a.incarnation);
        if foreign {
            return Ok(match body {
                v1::update::Body::Snapshot(s) => {
                    Offer::Reset { version: u.version, applied, view: ControlView::from_snapshot(s, &self.own)? }
                }
                v1::update::Body::Delta(d) => Offer::OutOfOrder { version: u.version, base: d.base_version, applied },
            });
        }
        if let (true, v1::update::Body::Snapshot(s)) = (first && u.version < applied, body) {
            let view = ControlView::from_snapshot(s, &self.own)?;
            return Ok(Offer::Reset { version: u.version, applied, view });
        }
        if u.version <= applied {
            return Ok(Offer::Stale { version: u.version, applied });
        }
        let view = match body {
            v1::update::Body::Snapshot(s) => ControlView::from_snapshot(s, &self.own)?,
            v1::update::Body::Delta(d) => match &self.applied {
                Some(a) if a.version == d.base_version => a.view.with_delta(d, &self.own)?,
                _ => return Ok(Offer::OutOfOrder { version: u.version, base: d.base_version, applied }),
            },
        };
        Ok(Offer::Apply { version: u.version, view })
    }

    /// Records an applied [`Offer::Apply`] of `u` (the incarnation stays `u`'s).
    pub fn commit(&mut self, u: &v1::Update, view: ControlView) {
        debug_assert!(u.version > self.version());
        self.reset(Applied { version: u.version, incarnation: u.incarnation.clone(), view });
    }

    /// Takes what was applied, also a lower version or another incarnation after
    /// [`Offer::Reset`].
    pub fn reset(&mut self, applied: Applied) {
        self.applied = Some(applied);
    }

    pub fn applied(&self) -> Option<&Applied> {
        self.applied.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PrivateKey;
    use v1::update::Body;

    fn prefix(s: &str) -> v1::IpPrefix {
        s.parse::<ipnet::IpNet>().unwrap().into()
    }

    fn peer(k: &PublicKey, ip: &str) -> v1::Peer {
        v1::Peer { public_key: k.0.to_vec(), name: "p".into(), allowed_ips: vec![prefix(ip)], ..Default::default() }
    }

    fn snapshot(version: u64, peers: Vec<v1::Peer>) -> v1::Update {
        let view = v1::NodeView {
            addresses: vec![prefix("10.77.0.1/32")],
            peers,
            policy: Some(v1::Policy {
                rules: vec![v1::Rule {
                    id: "web".into(),
                    from: vec![prefix("10.77.0.0/24")],
                    to: vec![prefix("10.77.0.1/32")],
                    protocol: Some(6),
                    ports: vec![v1::PortRange { first: 80, last: 80 }],
                }],
            }),
            mesh_prefixes: vec![prefix("10.77.0.0/24")],
            refused_routes: vec![],
        };
        v1::Update { version, body: Some(Body::Snapshot(view)), incarnation: String::new(), continued: false }
    }

    fn delta(version: u64, base: u64, d: v1::ViewDelta) -> v1::Update {
        v1::Update {
            version,
            body: Some(Body::Delta(v1::ViewDelta { base_version: base, ..d })),
            incarnation: String::new(),
            continued: false,
        }
    }

    fn apply(t: &mut Tracker, u: &v1::Update) -> Offer {
        let o = t.offer(u).unwrap();
        if let Offer::Apply { view, .. } = &o {
            t.commit(u, view.clone());
        }
        o
    }

    #[test]
    fn versions_only_go_up_and_deltas_need_their_base() {
        let own = PrivateKey::generate().public_key();
        let (a, b) = (PrivateKey::generate().public_key(), PrivateKey::generate().public_key());
        let mut t = Tracker::new(own, None);
        let delta_first =
            delta(3, 2, v1::ViewDelta { upsert_peers: vec![peer(&b, "10.77.0.3/32")], ..Default::default() });
        assert_eq!(t.offer(&delta_first).unwrap(), Offer::OutOfOrder { version: 3, base: 2, applied: 0 });

        assert!(matches!(apply(&mut t, &snapshot(2, vec![peer(&a, "10.77.0.2/32")])), Offer::Apply { version: 2, .. }));
        assert!(matches!(apply(&mut t, &delta_first), Offer::Apply { version: 3, .. }));
        assert_eq!(t.view().unwrap().peers.len(), 2);
        // A duplicate and an old snapshot are ignored, the state stays.
        assert_eq!(apply(&mut t, &delta_first), Offer::Stale { version: 3, applied: 3 });
        assert_eq!(apply(&mut t, &snapshot(1, vec![])), Offer::Stale { version: 1, applied: 3 });
        // A delta that skips a version is out of order.
        let gap = delta(6, 5, v1::ViewDelta { remove_peers: vec![a.0.to_vec()], ..Default::default() });
        assert_eq!(apply(&mut t, &gap), Offer::OutOfOrder { version: 6, base: 5, applied: 3 });
        assert_eq!(t.version(), 3);
        let remove = delta(4, 3, v1::ViewDelta { remove_peers: vec![a.0.to_vec()], ..Default::default() });
        assert!(matches!(apply(&mut t, &remove), Offer::Apply { version: 4, .. }));
        assert_eq!(t.view().unwrap().peers.keys().collect::<Vec<_>>(), vec![&b]);
    }

    #[test]
    fn a_lower_snapshot_opening_a_stream_is_a_reset_anywhere_else_a_replay() {
        let own = PrivateKey::generate().public_key();
        let mut t = Tracker::new(own, None);
        apply(&mut t, &snapshot(9, vec![]));
        assert_eq!(t.offer_on_stream(&snapshot(9, vec![]), true).unwrap(), Offer::Stale { version: 9, applied: 9 });
        assert_eq!(t.offer_on_stream(&snapshot(3, vec![]), false).unwrap(), Offer::Stale { version: 3, applied: 9 });
        let lower_delta = delta(4, 3, v1::ViewDelta::default());
        assert_eq!(t.offer_on_stream(&lower_delta, true).unwrap(), Offer::Stale { version: 4, applied: 9 });
        match t.offer_on_stream(&snapshot(3, vec![]), true).unwrap() {
            Offer::Reset { version: 3, applied: 9, view } => {
                t.reset(Applied { version: 3, incarnation: String::new(), view })
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(t.version(), 3);
        assert!(matches!(apply(&mut t, &delta(4, 3, v1::ViewDelta::default())), Offer::Apply { version: 4, .. }));
    }

    fn of(incarnation: &str, u: v1::Update) -> v1::Update {
        v1::Update { incarnation: incarnation.into(), ..u }
    }

    #[test]
    fn another_incarnation_is_a_reset_at_any_version_and_its_deltas_do_not_apply() {
        let own = PrivateKey::generate().public_key();
        let a = PrivateKey::generate().public_key();
        let mut t = Tracker::new(own, None);
        apply(&mut t, &of("x", snapshot(5, vec![])));
        assert_eq!(t.incarnation(), "x");
        // Same incarnation: the usual rules.
        assert_eq!(t.offer(&of("x", snapshot(5, vec![]))).unwrap(), Offer::Stale { version: 5, applied: 5 });
        // A recreated database at the same, a higher and a lower version: its snapshot wins.
        for v in [5, 6, 2] {
            match t.offer(&of("y", snapshot(v, vec![peer(&a, "10.77.0.2/32")]))).unwrap() {
                Offer::Reset { version, applied: 5, view } => assert_eq!((version, view.peers.len()), (v, 1)),
                other => panic!("version {v}: {other:?}"),
            }
        }
        // Its delta, even on our version number, is not on our base.
        let d = of("y", delta(6, 5, v1::ViewDelta::default()));
        assert_eq!(t.offer(&d).unwrap(), Offer::OutOfOrder { version: 6, base: 5, applied: 5 });
        // An update without an incarnation (an older control plane) follows the version rules.
        assert_eq!(t.offer(&snapshot(5, vec![])).unwrap(), Offer::Stale { version: 5, applied: 5 });
        let Offer::Reset { version, view, .. } = t.offer(&of("y", snapshot(5, vec![]))).unwrap() else { panic!() };
        t.reset(Applied { version, incarnation: "y".into(), view });
        assert_eq!((t.version(), t.incarnation()), (5, "y"));
    }

    #[test]
    fn absent_policy_in_a_delta_keeps_it_and_empty_replaces_it() {
        let own = PrivateKey::generate().public_key();
        let mut t = Tracker::new(own, None);
        apply(&mut t, &snapshot(1, vec![]));
        apply(&mut t, &delta(2, 1, v1::ViewDelta::default()));
        assert_eq!(t.view().unwrap().policy.rules().len(), 1);
        apply(&mut t, &delta(3, 2, v1::ViewDelta { policy: Some(v1::Policy::default()), ..Default::default() }));
        assert!(t.view().unwrap().policy.rules().is_empty());
        apply(
            &mut t,
            &delta(4, 3, v1::ViewDelta { addresses: Some(v1::AddressList::default()), ..Default::default() }),
        );
        assert!(t.view().unwrap().addresses.is_empty());
    }

    #[test]
    fn invalid_updates_are_errors_and_change_nothing() {
        let own = PrivateKey::generate().public_key();
        let a = PrivateKey::generate().public_key();
        let mut t = Tracker::new(own, None);
        apply(&mut t, &snapshot(1, vec![peer(&a, "10.77.0.2/32")]));
        let before = t.view().cloned();
        let bad = |d: v1::ViewDelta| t.offer(&delta(2, 1, d)).unwrap_err().to_string();
        let mut p = peer(&PrivateKey::generate().public_key(), "10.77.0.0/24");
        assert!(bad(v1::ViewDelta { upsert_peers: vec![p.clone()], ..Default::default() }).contains("overlaps"));
        p.allowed_ips = vec![v1::IpPrefix { addr: vec![10, 0, 0, 1], prefix_len: 8 }];
        assert!(bad(v1::ViewDelta { upsert_peers: vec![p.clone()], ..Default::default() }).contains("host bits"));
        p.public_key = vec![1; 31];
        assert!(bad(v1::ViewDelta { upsert_peers: vec![p], ..Default::default() }).contains("32 bytes"));
        assert!(bad(v1::ViewDelta { upsert_peers: vec![peer(&own, "10.9.9.9/32")], ..Default::default() })
            .contains("own public key"));
        let unknown = PrivateKey::generate().public_key();
        assert!(
            bad(v1::ViewDelta { remove_peers: vec![unknown.0.to_vec()], ..Default::default() }).contains("not a peer")
        );
        let rule = |protocol, first, last| v1::Policy {
            rules: vec![v1::Rule {
                id: "r".into(),
                from: vec![prefix("10.0.0.0/8")],
                to: vec![prefix("10.0.0.0/8")],
                protocol,
                ports: vec![v1::PortRange { first, last }],
            }],
        };
        assert!(
            bad(v1::ViewDelta { policy: Some(rule(Some(256), 1, 2)), ..Default::default() }).contains("protocol 256")
        );
        assert!(bad(v1::ViewDelta { policy: Some(rule(Some(6), 9, 2)), ..Default::default() }).contains("9-2"));
        assert!(bad(v1::ViewDelta { policy: Some(rule(Some(1), 1, 2)), ..Default::default() }).contains("no ports"));
        let no_policy =
            v1::Update { version: 5, body: Some(Body::Snapshot(v1::NodeView::default())), ..Default::default() };
        assert_eq!(t.offer(&no_policy).unwrap_err(), UpdateError::MissingPolicy);
        assert_eq!(t.offer(&v1::Update { version: 5, ..Default::default() }).unwrap_err(), UpdateError::NoBody);
        assert_eq!(t.view().cloned(), before);
    }

    #[test]
    fn snapshot_roundtrips_through_the_wire_form() {
        let own = PrivateKey::generate().public_key();
        let a = PrivateKey::generate().public_key();
        let mut t = Tracker::new(own, None);
        apply(&mut t, &snapshot(1, vec![peer(&a, "10.77.0.2/32")]));
        let view = t.view().unwrap().clone();
        assert_eq!(ControlView::from_snapshot(&view.to_snapshot(), &own).unwrap(), view);
    }
}
