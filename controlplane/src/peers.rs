//! Peer lists shared between views, and their differences computed once.
//!
//! A full mesh of N nodes has N views of N−1 peers each. Materializing every view's peers
//! would cost N² per change and memory for all of them at once; instead a state has one
//! [`PeerTable`] (its live nodes as other nodes see them, each encoded for the wire at most
//! once), and a view's peers are a [`PeerList`]: the table, a shared sorted list of
//! positions in it (one per set of nodes with the same rules), and the viewer's own position
//! to skip. A change that keeps the table and the lists keeps every view's peers at no cost
//! per node, and the difference between two lists is computed once for every view moving
//! between them ([`PeerTable::diff`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use prost::bytes::Bytes;
use prost::Message;

use crate::model::NodeRec;
use crate::registry::lock;
use crate::view::peer;

/// Differences kept per table: views move from one or two recent lists at a time.
const DIFFS_KEPT: usize = 8;

/// Nodes as peers, ordered by node id, with their wire encodings made on first use.
#[derive(Debug)]
pub struct PeerTable {
    recs: Vec<Arc<NodeRec>>,
    /// Every peer's persistent keepalive on the wire.
    keepalive: u16,
    encoded: Vec<OnceLock<Bytes>>,
    diffs: Mutex<VecDeque<Cached>>,
}

/// A difference by the identity of its lists. Weak references: a cache must not keep old
/// tables alive (each table would hold its predecessor, and so on back to the first),
/// while still pinning their allocations, so a compared address is never a reused one.
#[derive(Debug)]
struct Cached {
    old_table: Weak<PeerTable>,
    old_members: Weak<[u32]>,
    new_members: Weak<[u32]>,
    diff: Arc<PeerDiff>,
}

/// What changes between two lists: positions in the new table to upsert, in the old one
/// to remove.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PeerDiff {
    pub upserts: Arc<[u32]>,
    pub removes: Arc<[u32]>,
}

impl PeerTable {
    /// `recs` must be ordered by node id.
    pub fn new(recs: Vec<Arc<NodeRec>>, keepalive: u16) -> PeerTable {
        debug_assert!(recs.windows(2).all(|w| w[0].id < w[1].id));
        let encoded = (0..recs.len()).map(|_| OnceLock::new()).collect();
        PeerTable { recs, keepalive, encoded, diffs: Mutex::default() }
    }

    pub fn rec(&self, i: u32) -> &Arc<NodeRec> {
        &self.recs[i as usize]
    }

    /// The wire encoding of `v1::Peer` for position `i` (made once, shared by every message).
    pub fn encoded(&self, i: u32) -> &Bytes {
        self.encoded[i as usize].get_or_init(|| peer(&self.recs[i as usize], self.keepalive).encode_to_vec().into())
    }

    /// The difference from `old` to `new` (a list of this table), computed once for every
    /// view making the same move.
    pub fn diff(self: &Arc<Self>, old: &PeerList, new: &PeerList) -> Arc<PeerDiff> {
        debug_assert!(Arc::ptr_eq(self, &new.table));
        let hit = |c: &Cached| {
            std::ptr::addr_eq(c.old_table.as_ptr(), Arc::as_ptr(&old.table))
                && std::ptr::addr_eq(c.old_members.as_ptr(), Arc::as_ptr(&old.members))
                && std::ptr::addr_eq(c.new_members.as_ptr(), Arc::as_ptr(&new.members))
        };
        if let Some(c) = lock(&self.diffs).iter().find(|c| hit(c)) {
            return c.diff.clone();
        }
        let diff = Arc::new(compute(old, new));
        let mut diffs = lock(&self.diffs);
        if diffs.len() == DIFFS_KEPT {
            diffs.pop_front();
        }
        diffs.push_back(Cached {
            old_table: Arc::downgrade(&old.table),
            old_members: Arc::downgrade(&old.members),
            new_members: Arc::downgrade(&new.members),
            diff: diff.clone(),
        });
        diff
    }
}

/// Whether two records give the same wire peer.
fn same_peer(a: &NodeRec, b: &NodeRec) -> bool {
    a.public_key == b.public_key
        && a.hostname == b.hostname
        && a.bound == b.bound
        && a.endpoints.first() == b.endpoints.first()
        && a.addresses == b.addresses
        && a.routes == b.routes
}

/// Merges the two lists by node id (both are ordered by it).
fn compute(old: &PeerList, new: &PeerList) -> PeerDiff {
    let keepalive_changed = old.table.keepalive != new.table.keepalive;
    let (mut upserts, mut removes) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    let (om, nm) = (&old.members, &new.members);
    while i < om.len() || j < nm.len() {
        let o = om.get(i).map(|&x| (x, old.table.rec(x)));
        let n = nm.get(j).map(|&x| (x, new.table.rec(x)));
        match (o, n) {
            (Some((oi, o)), Some((ni, n))) if o.id == n.id => {
                if o.public_key != n.public_key {
                    removes.push(oi);
                    upserts.push(ni);
                } else if keepalive_changed || !(Arc::ptr_eq(o, n) || same_peer(o, n)) {
                    upserts.push(ni);
                }
                (i, j) = (i + 1, j + 1);
            }
            (Some((oi, o)), Some((_, n))) if o.id < n.id => {
                removes.push(oi);
                i += 1;
            }
            (Some((oi, _)), None) => {
                removes.push(oi);
                i += 1;
            }
            (_, Some((ni, _))) => {
                upserts.push(ni);
                j += 1;
            }
            (None, None) => unreachable!("the loop runs while one list has entries"),
        }
    }
    PeerDiff { upserts: upserts.into(), removes: removes.into() }
}

/// A view's peers: `members` of `table` but `me`.
#[derive(Clone, Debug)]
pub struct PeerList {
    pub table: Arc<PeerTable>,
    /// Sorted positions in `table`.
    pub members: Arc<[u32]>,
    /// The viewer's own position, never one of its peers.
    pub me: Option<u32>,
}

impl PeerList {
    pub fn iter(&self) -> impl Iterator<Item = &Arc<NodeRec>> + '_ {
        self.members.iter().filter(|&&i| Some(i) != self.me).map(|&i| self.table.rec(i))
    }

    pub fn len(&self) -> usize {
        Refs::all(self).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The same peers as `other` by the same table: known without looking at a record
    /// (at most the positions are compared).
    pub fn shares(&self, other: &PeerList) -> bool {
        Arc::ptr_eq(&self.table, &other.table)
            && self.me == other.me
            && (Arc::ptr_eq(&self.members, &other.members) || self.members == other.members)
    }
}

/// Positions in a table, but one: peers a message carries without copying them.
#[derive(Clone, Debug)]
pub struct Refs {
    pub table: Arc<PeerTable>,
    pub positions: Arc<[u32]>,
    pub skip: Option<u32>,
}

impl Refs {
    pub fn new(table: &Arc<PeerTable>, positions: &Arc<[u32]>, skip: Option<u32>) -> Refs {
        Refs { table: table.clone(), positions: positions.clone(), skip }
    }

    /// Every peer of a list.
    pub fn all(list: &PeerList) -> Refs {
        Refs::new(&list.table, &list.members, list.me)
    }

    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.positions.iter().copied().filter(|&i| Some(i) != self.skip)
    }

    pub fn is_empty(&self) -> bool {
        self.iter().next().is_none()
    }

    pub fn len(&self) -> usize {
        self.positions.len() - usize::from(self.skipped_at().is_some())
    }

    fn skipped_at(&self) -> Option<usize> {
        self.skip.and_then(|s| self.positions.binary_search(&s).ok())
    }

    /// Up to `n` of the positions from the `from`-th on (counting only those not skipped),
    /// without walking the ones before.
    pub fn slice(&self, from: usize, n: usize) -> Arc<[u32]> {
        let start = (from + usize::from(self.skipped_at().is_some_and(|s| s <= from))).min(self.positions.len());
        self.positions[start..].iter().copied().filter(|&p| Some(p) != self.skip).take(n).collect()
    }

    pub fn recs(&self) -> impl Iterator<Item = &Arc<NodeRec>> + '_ {
        self.iter().map(|i| self.table.rec(i))
    }
}
