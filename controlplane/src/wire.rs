//! The agent stream's `Update` as the control plane encodes it (the service's generated
//! server code sends this type in place of `wirefence.v1.Update`; build.rs). Peers are
//! not copied into each message: a message refers to positions in a shared
//! [`PeerTable`] and writes their encodings, made once per table, when it is sent. A
//! snapshot of N−1 peers queued on a stream costs a few pointers until then.
//!
//! The bytes are the contract's `Update` exactly (field numbers from wirefence.proto);
//! tests decode them as `v1::Update`.

use std::sync::Arc;

use prost::bytes::{Buf, BufMut, Bytes};
use prost::encoding::{self, encode_key, encode_varint, encoded_len_varint, key_len, DecodeContext, WireType};
use prost::{DecodeError, Message};
use wirefence_proto::v1;

use crate::peers::{PeerTable, Refs};

// Field numbers of wirefence.proto.
const UPDATE_VERSION: u32 = 1;
const UPDATE_SNAPSHOT: u32 = 2;
const UPDATE_DELTA: u32 = 3;
const UPDATE_INCARNATION: u32 = 4;
const UPDATE_CONTINUED: u32 = 5;
/// `NodeView.peers` and `ViewDelta.upsert_peers`.
const PEERS: u32 = 2;
const DELTA_REMOVE_PEERS: u32 = 3;
const VIEW_POLICY: u32 = 3;
const DELTA_POLICY: u32 = 5;

/// A node's whole view: everything but its peers and policy in `view`, the peers by
/// reference, the policy encoded (`v1::Policy`, shared by every node with the same rules).
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub view: v1::NodeView,
    pub peers: Refs,
    pub policy: Bytes,
}

/// Changes on top of `delta.base_version`: everything but the peers and the policy in
/// `delta`, the peers to upsert (positions in the new table) and to remove (in the old
/// one) by reference, and the new policy encoded when it changed.
#[derive(Clone, Debug)]
pub struct Delta {
    pub delta: v1::ViewDelta,
    pub upserts: Refs,
    pub removes: Refs,
    pub policy: Option<Bytes>,
}

impl Snapshot {
    /// The contract's message (its encoding decoded): for tests and inspection.
    pub fn to_wire(&self) -> v1::NodeView {
        let update = Update { body: Some(Body::Snapshot(self.clone())), ..Default::default() };
        match update.to_message().body {
            Some(v1::update::Body::Snapshot(v)) => v,
            other => unreachable!("a snapshot decodes as one, not {other:?}"),
        }
    }
}

impl Delta {
    /// The contract's message (its encoding decoded): for tests and inspection.
    pub fn to_wire(&self) -> v1::ViewDelta {
        let update = Update { body: Some(Body::Delta(self.clone())), ..Default::default() };
        match update.to_message().body {
            Some(v1::update::Body::Delta(d)) => d,
            other => unreachable!("a delta decodes as one, not {other:?}"),
        }
    }

    /// A delta that changes nothing: a resume from a version whose view is the current one.
    pub fn empty(base_version: u64, table: &Arc<PeerTable>) -> Delta {
        let none = Refs::new(table, &Arc::from([]), None);
        Delta {
            delta: v1::ViewDelta { base_version, ..Default::default() },
            upserts: none.clone(),
            removes: none,
            policy: None,
        }
    }
}

#[derive(Clone, Debug)]
pub enum Body {
    Snapshot(Snapshot),
    Delta(Delta),
}

/// Peers (upserted and removed) per message when an update is sent in parts: about
/// 12 KiB, so a stream's encoding buffer stays small however large the mesh.
pub const PART_PEERS: usize = 128;

/// `wirefence.v1.Update`, encode only (decoding one skips every field).
#[derive(Clone, Debug, Default)]
pub struct Update {
    pub version: u64,
    pub body: Option<Body>,
    pub incarnation: Arc<str>,
    /// Another part of this update follows.
    pub continued: bool,
}

/// A length-delimited field's size: key, length, bytes.
fn field_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

fn put_field(tag: u32, bytes: &[u8], buf: &mut impl BufMut) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(bytes.len() as u64, buf);
    buf.put_slice(bytes);
}

fn peers_len(refs: &Refs) -> usize {
    refs.iter().map(|i| field_len(PEERS, refs.table.encoded(i).len())).sum()
}

fn removes_len(refs: &Refs) -> usize {
    refs.recs().map(|n| field_len(DELTA_REMOVE_PEERS, n.public_key.len())).sum()
}

impl Body {
    fn tag(&self) -> u32 {
        match self {
            Body::Snapshot(_) => UPDATE_SNAPSHOT,
            Body::Delta(_) => UPDATE_DELTA,
        }
    }

    /// The policy's field number and encoding, when the message has one.
    fn policy(&self) -> Option<(u32, &Bytes)> {
        match self {
            Body::Snapshot(s) => Some((VIEW_POLICY, &s.policy)),
            Body::Delta(d) => d.policy.as_ref().map(|p| (DELTA_POLICY, p)),
        }
    }

    /// The length of the nested message.
    fn len(&self) -> usize {
        let policy = self.policy().map_or(0, |(tag, p)| field_len(tag, p.len()));
        policy
            + match self {
                Body::Snapshot(s) => s.view.encoded_len() + peers_len(&s.peers),
                Body::Delta(d) => d.delta.encoded_len() + peers_len(&d.upserts) + removes_len(&d.removes),
            }
    }

    fn encode(&self, buf: &mut impl BufMut) {
        // Set there too, the policy would be sent twice, and a receiver merges the two.
        debug_assert!(match self {
            Body::Snapshot(s) => s.view.policy.is_none(),
            Body::Delta(d) => d.delta.policy.is_none(),
        });
        encode_key(self.tag(), WireType::LengthDelimited, buf);
        encode_varint(self.len() as u64, buf);
        let (peers, removes) = match self {
            Body::Snapshot(s) => {
                s.view.encode_raw(buf);
                (&s.peers, None)
            }
            Body::Delta(d) => {
                d.delta.encode_raw(buf);
                (&d.upserts, Some(&d.removes))
            }
        };
        if let Some((tag, p)) = self.policy() {
            put_field(tag, p, buf);
        }
        for i in peers.iter() {
            put_field(PEERS, peers.table.encoded(i), buf);
        }
        for n in removes.into_iter().flat_map(Refs::recs) {
            put_field(DELTA_REMOVE_PEERS, &n.public_key, buf);
        }
    }
}

struct PartIter {
    /// The update when it is one message.
    single: Option<Update>,
    version: u64,
    incarnation: Arc<str>,
    /// The body, until the first part carries it.
    first: Option<Body>,
    upserts: Option<Refs>,
    removes: Option<Refs>,
    /// Entries (upserts, then removes) already in a part.
    cursor: usize,
    max: usize,
    parts: usize,
    made: usize,
}

impl Iterator for PartIter {
    type Item = Update;

    fn next(&mut self) -> Option<Update> {
        if let Some(u) = self.single.take() {
            return Some(u);
        }
        let (Some(ups), true) = (&self.upserts, self.made < self.parts) else { return None };
        self.made += 1;
        let ups_len = ups.len();
        let up = ups.slice(self.cursor, self.max.min(ups_len.saturating_sub(self.cursor)));
        let rm_from = (self.cursor + up.len()).saturating_sub(ups_len);
        let rm = self.removes.as_ref().map_or_else(|| Arc::from([]), |r| r.slice(rm_from, self.max - up.len()));
        self.cursor += up.len() + rm.len();
        let up = Refs::new(&ups.table, &up, None);
        let rm = Refs::new(self.removes.as_ref().map_or(&ups.table, |r| &r.table), &rm, None);
        let body = match self.first.take() {
            Some(Body::Snapshot(s)) => Body::Snapshot(Snapshot { peers: up, ..s }),
            Some(Body::Delta(d)) => Body::Delta(Delta { upserts: up, removes: rm, ..d }),
            None => Body::Delta(Delta { delta: v1::ViewDelta::default(), upserts: up, removes: rm, policy: None }),
        };
        let continued = self.made < self.parts;
        Some(Update { version: self.version, body: Some(body), incarnation: self.incarnation.clone(), continued })
    }
}

impl Message for Update {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if self.version != 0 {
            encoding::uint64::encode(UPDATE_VERSION, &self.version, buf);
        }
        if let Some(b) = &self.body {
            b.encode(buf);
        }
        if !self.incarnation.is_empty() {
            put_field(UPDATE_INCARNATION, self.incarnation.as_bytes(), buf);
        }
        if self.continued {
            encoding::bool::encode(UPDATE_CONTINUED, &true, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        let version = if self.version != 0 { encoding::uint64::encoded_len(UPDATE_VERSION, &self.version) } else { 0 };
        let body = self.body.as_ref().map_or(0, |b| field_len(b.tag(), b.len()));
        let incarnation =
            if self.incarnation.is_empty() { 0 } else { field_len(UPDATE_INCARNATION, self.incarnation.len()) };
        let continued = if self.continued { encoding::bool::encoded_len(UPDATE_CONTINUED, &true) } else { 0 };
        version + body + incarnation + continued
    }

    fn clear(&mut self) {
        *self = Update::default();
    }
}

impl Update {
    /// This update as messages of at most `max` peers each (upserts first, then removes):
    /// the first carries the body, the others more peers in a delta body; all but the last
    /// are `continued` (wirefence.proto). Made one at a time as they are taken: a stream
    /// waiting to send a large update holds a cursor, not its parts.
    pub fn into_parts(self, max: usize) -> impl Iterator<Item = Update> {
        let max = max.max(1);
        let (upserts, removes) = match &self.body {
            None => (None, None),
            Some(Body::Snapshot(s)) => (Some(s.peers.clone()), None),
            Some(Body::Delta(d)) => (Some(d.upserts.clone()), Some(d.removes.clone())),
        };
        let total = upserts.as_ref().map_or(0, Refs::len) + removes.as_ref().map_or(0, Refs::len);
        let (version, incarnation) = (self.version, self.incarnation.clone());
        let (single, first, parts) = match total <= max {
            true => (Some(self), None, 0),
            false => (None, self.body, total.div_ceil(max)),
        };
        PartIter { single, version, incarnation, first, upserts, removes, cursor: 0, max, parts, made: 0 }
    }

    /// The message as the contract's type (tests, and callers that want to look inside).
    pub fn to_message(&self) -> v1::Update {
        v1::Update::decode(self.encode_to_vec().as_slice()).expect("an encoded Update decodes")
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use wirefence_agent::control::parts::Parts;

    use super::*;
    use crate::policy::tests::node;
    use crate::registry::Overlay;
    use crate::state::GlobalState;
    use crate::view::{delta, node_view};

    const MESH: &str = "[[rules]]\nid = \"mesh\"\nfrom = [\"*\"]\nto = [\"*\"]\n";

    fn mesh(ids: impl Iterator<Item = u32>) -> GlobalState {
        let nodes = ids
            .map(|i| {
                let mut rec = (*node(&format!("n{i:04}"), &format!("h{i}"), (i % 250) as u8, &[])).clone();
                // Distinct keys (node() derives the key from one byte).
                rec.public_key[..4].copy_from_slice(&(i + 1).to_be_bytes());
                Arc::new(rec)
            })
            .collect();
        GlobalState::new(1, nodes, Arc::new(crate::policy::parse("p", MESH).unwrap()), Overlay::default())
    }

    /// Sends `u` in parts of `max` and puts them back together as the agent does.
    fn through_parts(u: Update, max: usize) -> (usize, v1::Update) {
        let whole = u.to_message();
        let mut assembler = Parts::default();
        let mut parts = 0;
        let mut out = None;
        for p in u.into_parts(max) {
            parts += 1;
            let msg = v1::Update::decode(p.encode_to_vec().as_slice()).unwrap();
            assert_eq!(msg.encoded_len(), p.encoded_len(), "lengths agree");
            assert!(out.is_none(), "nothing after the last part");
            out = assembler.push(msg).unwrap();
        }
        let out = out.expect("the last part completes it");
        assert_eq!(out, whole);
        (parts, out)
    }

    #[test]
    fn a_snapshot_in_parts_is_the_whole_snapshot() {
        let s = mesh(0..300);
        let view = node_view(&s, "n0150").unwrap();
        let u = Update {
            version: 1,
            body: Some(Body::Snapshot(view.snapshot())),
            incarnation: "i".into(),
            continued: false,
        };
        let (parts, whole) = through_parts(u.clone(), 128);
        assert_eq!(parts, 3, "299 peers (the node skips itself)");
        let Some(v1::update::Body::Snapshot(snap)) = whole.body else { panic!("a snapshot") };
        assert_eq!(snap.peers.len(), 299);
        assert!(snap.peers.iter().all(|p| p.name != "h150"));
        // Small enough: one message, as is.
        assert_eq!(through_parts(u, 1000).0, 1);
    }

    #[test]
    fn a_delta_in_parts_carries_every_upsert_and_removal() {
        let before = mesh(0..300);
        let after = before.with_nodes(2, mesh((100..300).chain(1000..1050)).nodes.to_vec());
        let (old, new) = (node_view(&before, "n0150").unwrap(), node_view(&after, "n0150").unwrap());
        let d = delta(&old, &new, 1).unwrap();
        let u = Update { version: 2, body: Some(Body::Delta(d)), incarnation: "i".into(), continued: false };
        for max in [1, 7, 64, 128, 10_000] {
            let (parts, whole) = through_parts(u.clone(), max);
            assert_eq!(parts, 150usize.div_ceil(max), "100 removed, 50 added");
            let Some(v1::update::Body::Delta(d)) = whole.body else { panic!("a delta") };
            assert_eq!((d.upsert_peers.len(), d.remove_peers.len(), d.base_version), (50, 100, 1));
        }
    }
}
