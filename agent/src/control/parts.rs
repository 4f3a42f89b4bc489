//! Updates the control plane sends in parts (wirefence.proto, `Update.continued`): put
//! back together before anything judges or applies them, so a view is only ever taken
//! whole. A control plane is not trusted to keep to the contract: a part that does not
//! continue the update it belongs to, or an update larger than [`MAX_PEERS`], ends the
//! stream (the agent resumes from the version it applied; nothing of the parts is kept).

use wirefence_proto::v1::{self, update::Body};

/// Peers (upserted and removed) one assembled update may carry.
pub const MAX_PEERS: usize = 1 << 17;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PartsError {
    #[error("a part of update {first} came with version {got}")]
    Version { first: u64, got: u64 },
    #[error("a part of update {version} came with another incarnation")]
    Incarnation { version: u64 },
    #[error("a further part of update {version} carries more than peers")]
    NotPeers { version: u64 },
    #[error("a further part of snapshot {version} removes peers")]
    RemoveInSnapshot { version: u64 },
    #[error("update {version} in parts has more than {MAX_PEERS} peers")]
    TooLarge { version: u64 },
}

/// The parts of the update being received.
#[derive(Debug, Default)]
pub struct Parts {
    pending: Option<v1::Update>,
    peers: usize,
}

fn peer_count(u: &v1::Update) -> usize {
    match &u.body {
        Some(Body::Snapshot(s)) => s.peers.len(),
        Some(Body::Delta(d)) => d.upsert_peers.len() + d.remove_peers.len(),
        None => 0,
    }
}

impl Parts {
    /// Takes the next message of the stream; returns the whole update once its last part
    /// arrived (an update not sent in parts at once).
    pub fn push(&mut self, u: v1::Update) -> Result<Option<v1::Update>, PartsError> {
        let count = peer_count(&u);
        let continued = u.continued;
        let mut whole = match self.pending.take() {
            None => {
                self.peers = 0;
                u
            }
            Some(mut first) => {
                append(&mut first, u)?;
                first
            }
        };
        self.peers += count;
        if self.peers > MAX_PEERS {
            return Err(PartsError::TooLarge { version: whole.version });
        }
        if continued {
            self.pending = Some(whole);
            return Ok(None);
        }
        whole.continued = false;
        Ok(Some(whole))
    }
}

/// Adds a further part's peers to the first part.
fn append(first: &mut v1::Update, part: v1::Update) -> Result<(), PartsError> {
    let version = first.version;
    if part.version != version {
        return Err(PartsError::Version { first: version, got: part.version });
    }
    if part.incarnation != first.incarnation {
        return Err(PartsError::Incarnation { version });
    }
    let Some(Body::Delta(more)) = part.body else { return Err(PartsError::NotPeers { version }) };
    let v1::ViewDelta { base_version, upsert_peers, remove_peers, addresses, policy, mesh_prefixes, refused_routes } =
        more;
    if base_version != 0
        || addresses.is_some()
        || policy.is_some()
        || mesh_prefixes.is_some()
        || refused_routes.is_some()
    {
        return Err(PartsError::NotPeers { version });
    }
    match &mut first.body {
        Some(Body::Snapshot(s)) => {
            if !remove_peers.is_empty() {
                return Err(PartsError::RemoveInSnapshot { version });
            }
            s.peers.extend(upsert_peers);
        }
        Some(Body::Delta(d)) => {
            d.upsert_peers.extend(upsert_peers);
            d.remove_peers.extend(remove_peers);
        }
        None => return Err(PartsError::NotPeers { version }),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> v1::Peer {
        v1::Peer { public_key: vec![n; 32], ..Default::default() }
    }

    fn more(version: u64, peers: &[u8], removes: &[u8], continued: bool) -> v1::Update {
        let d = v1::ViewDelta {
            upsert_peers: peers.iter().map(|n| peer(*n)).collect(),
            remove_peers: removes.iter().map(|n| vec![*n; 32]).collect(),
            ..Default::default()
        };
        v1::Update { version, body: Some(Body::Delta(d)), incarnation: "i".into(), continued }
    }

    fn snapshot(version: u64, peers: &[u8], continued: bool) -> v1::Update {
        let view = v1::NodeView { peers: peers.iter().map(|n| peer(*n)).collect(), ..Default::default() };
        v1::Update { version, body: Some(Body::Snapshot(view)), incarnation: "i".into(), continued }
    }

    #[test]
    fn a_whole_update_passes_through() {
        let mut p = Parts::default();
        assert_eq!(p.push(snapshot(3, &[1], false)), Ok(Some(snapshot(3, &[1], false))));
    }

    #[test]
    fn parts_are_put_together_in_order() {
        let mut p = Parts::default();
        assert_eq!(p.push(snapshot(4, &[1, 2], true)), Ok(None));
        assert_eq!(p.push(more(4, &[3], &[], true)), Ok(None));
        assert_eq!(p.push(more(4, &[4], &[], false)), Ok(Some(snapshot(4, &[1, 2, 3, 4], false))));

        let mut first = more(5, &[1], &[], true);
        let Some(Body::Delta(d)) = &mut first.body else { unreachable!() };
        d.base_version = 4;
        d.policy = Some(v1::Policy::default());
        assert_eq!(p.push(first.clone()), Ok(None));
        let Some(whole) = p.push(more(5, &[2], &[9, 8], false)).unwrap() else { panic!("complete") };
        let Some(Body::Delta(d)) = whole.body else { panic!("a delta") };
        assert_eq!((d.base_version, d.policy.is_some()), (4, true));
        assert_eq!(d.upsert_peers, vec![peer(1), peer(2)]);
        assert_eq!(d.remove_peers, vec![vec![9; 32], vec![8; 32]]);
    }

    #[test]
    fn a_part_that_does_not_continue_its_update_is_refused() {
        let cases = [
            (more(7, &[2], &[], false), PartsError::Version { first: 6, got: 7 }),
            (
                v1::Update { incarnation: "j".into(), ..more(6, &[2], &[], false) },
                PartsError::Incarnation { version: 6 },
            ),
            (snapshot(6, &[2], false), PartsError::NotPeers { version: 6 }),
            (more(6, &[], &[3], false), PartsError::RemoveInSnapshot { version: 6 }),
        ];
        for (part, error) in cases {
            let mut p = Parts::default();
            assert_eq!(p.push(snapshot(6, &[1], true)), Ok(None));
            assert_eq!(p.push(part), Err(error));
        }
        let mut p = Parts::default();
        let mut policy = more(6, &[2], &[], false);
        let Some(Body::Delta(d)) = &mut policy.body else { unreachable!() };
        d.policy = Some(v1::Policy::default());
        assert_eq!(p.push(snapshot(6, &[1], true)), Ok(None));
        assert_eq!(p.push(policy), Err(PartsError::NotPeers { version: 6 }));
    }

    #[test]
    fn an_endless_update_is_refused() {
        let mut p = Parts::default();
        let peers: Vec<u8> = vec![1; 1000];
        assert_eq!(p.push(snapshot(2, &peers, true)), Ok(None));
        let mut sent = 1000;
        let err = loop {
            match p.push(more(2, &peers, &[], true)) {
                Ok(None) => sent += 1000,
                Ok(Some(_)) => panic!("never complete"),
                Err(e) => break e,
            }
        };
        assert_eq!(err, PartsError::TooLarge { version: 2 });
        assert!(sent <= MAX_PEERS, "refused once past the limit");
    }
}
