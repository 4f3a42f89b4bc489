//! A node's routes: what it advertises, what its grant lets it have, and what another node
//! already routes. A route outside the grant or taken is refused with its reason, never the
//! node; an admin widens or narrows the grant (`nodes routes`), and what the node advertises
//! inside the new grant comes into effect without it registering again.

use std::sync::Arc;

use ipnet::IpNet;
use wirefence_proto::v1::{self, IpPrefix};

use super::admin::find;
use super::register::check_route;
use super::Registry;
use crate::model::{NodeRec, RefusedRoute};
use crate::store;
use crate::Error;

/// Nodes that may route one prefix together (a route group, see [`crate::election`]).
pub const MAX_GROUP_MEMBERS: usize = 8;

/// Splits advertised routes into those the node gets (inside its granted routes, and
/// either overlapping no route of another live node than `me` or exactly the prefix of
/// such routes: a route group, of which one member at a time gets the traffic) and those
/// refused. A *different* overlapping prefix is refused: two nodes routing parts of one
/// subnet would split its traffic. A refused route never refuses the registration: a
/// gateway whose grant changed keeps its control plane and the rest of its routes.
pub(super) fn split_routes(
    routes: &[IpNet],
    granted: &[IpNet],
    nodes: &[Arc<NodeRec>],
    me: &str,
) -> (Vec<IpNet>, Vec<RefusedRoute>) {
    let mut taken = Vec::new();
    let mut refused = Vec::new();
    for route in routes {
        if !granted.iter().any(|g| g.contains(route)) {
            refused.push(RefusedRoute::NotGranted { route: *route, granted: granted.to_vec() });
            continue;
        }
        let others = || nodes.iter().filter(|n| n.id != me);
        let overlapping = others().find_map(|n| {
            n.routes.iter().find(|t| *t != route && (t.contains(route) || route.contains(*t))).map(|t| (n, *t))
        });
        let mut members = others().filter(|n| n.routes.contains(route));
        let full = members.clone().nth(MAX_GROUP_MEMBERS - 1).is_some();
        match overlapping.or_else(|| if full { members.next().map(|n| (n, *route)) } else { None }) {
            Some((n, theirs)) => refused.push(RefusedRoute::Taken { route: *route, theirs, node: n.id.clone() }),
            None => taken.push(*route),
        }
    }
    (taken, refused)
}

/// The prefixes of a SetNodeRoutes field, each error naming `field[i]`.
pub fn wire_prefixes(field: &str, list: &[IpPrefix]) -> Result<Vec<IpNet>, Error> {
    list.iter().enumerate().map(|(i, p)| IpNet::try_from(p).map_err(Error::wire(format!("{field}[{i}]")))).collect()
}

impl Registry {
    /// Records what a node's registration advertised, for a later change of its grant, and
    /// logs each refusal once at info: the operator acts on it (a grant, or the other
    /// node's route). The refusals themselves go into the node's record (and view).
    pub(super) fn advertised(&self, id: &str, requested: &[IpNet], refused: &[RefusedRoute]) {
        self.log_refused(id, refused);
        self.observed.update(id, |o| o.requested_routes = Some(requested.to_vec()));
    }

    pub(super) fn log_refused(&self, id: &str, refused: &[RefusedRoute]) {
        for r in refused {
            tracing::info!(node = %id, reason = %r, "advertised route refused; the node keeps its other routes");
        }
    }

    /// Adds `grant` to and takes `revoke` out of node `sel`'s granted routes, then gives it
    /// what it advertised (at its last registration since start; else the routes it has)
    /// within the new grant, in one version.
    pub async fn set_node_routes(
        &self,
        sel: &str,
        grant: &[IpNet],
        revoke: &[IpNet],
    ) -> Result<(u64, v1::Node), Error> {
        for (index, route) in grant.iter().enumerate() {
            check_route(index, *route, &self.overlay)?;
        }
        let store = self.store().await;
        let row = find(store.nodes().await?, sel)?;
        let id = row.rec.id.clone();
        let mut granted = row.granted_routes;
        for r in revoke {
            let Some(at) = granted.iter().position(|g| g == r) else {
                return Err(Error::NotGranted { route: *r, node: id, granted });
            };
            granted.remove(at);
        }
        for g in grant {
            if !granted.contains(g) {
                granted.push(*g);
            }
        }
        granted.sort();
        let state = self.current();
        let old = state.node(&id).ok_or_else(|| Error::NodeRemoved(id.clone()))?.clone();
        let requested = self.observed.get(&id).requested_routes.unwrap_or_else(|| old.routes.clone());
        let (routes, refused) = split_routes(&requested, &granted, &state.nodes, &id);
        let new = NodeRec { routes, refused_routes: refused, ..(*old).clone() };
        let mut tx = store.begin().await?;
        store::set_granted_routes(&mut tx, &id, &granted).await?;
        store::update_node(&mut tx, &new).await?;
        let version = store.commit(tx, Some(&crate::change::Change::Node(new.clone()))).await?;
        tracing::info!(node = %id, version, granted = ?granted, routes = ?new.routes, "node's granted routes changed");
        self.published(version).await;
        drop(store);
        Ok((version, self.get_node(&id).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(id: &str, n: u8, routes: &[&str]) -> Arc<NodeRec> {
        let mut r = (*crate::policy::tests::node(id, id, n, &[])).clone();
        r.routes = routes.iter().map(|r| r.parse().unwrap()).collect();
        Arc::new(r)
    }

    #[test]
    fn the_same_prefix_joins_a_group_and_an_overlapping_one_is_taken() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let grant = [net("10.88.0.0/16"), net("fd88::/48")];
        let nodes = vec![router("a", 1, &["10.88.1.0/24", "fd88:0:0:1::/64"])];
        let asked = [net("10.88.1.0/24"), net("fd88:0:0:1::/64"), net("10.88.2.0/25")];
        let (got, refused) = split_routes(&asked, &grant, &nodes, "b");
        assert_eq!(got, asked, "both families join the group");
        assert!(refused.is_empty());
        let (got, refused) = split_routes(&[net("10.88.1.0/25"), net("10.88.0.0/23")], &grant, &nodes, "b");
        assert!(got.is_empty());
        assert_eq!(refused.len(), 2);
        // A group is bounded: a ninth member is refused.
        let full: Vec<_> =
            (0..MAX_GROUP_MEMBERS as u8).map(|i| router(&format!("n{i}"), i + 1, &["10.88.1.0/24"])).collect();
        let (got, refused) = split_routes(&[net("10.88.1.0/24")], &grant, &full, "x");
        assert!(got.is_empty());
        assert!(matches!(&refused[0], RefusedRoute::Taken { node, .. } if node == "n0"));
        // Outside its own grant it is refused whatever the others have.
        let (_, refused) = split_routes(&[net("10.88.1.0/24")], &[net("10.99.0.0/16")], &nodes, "b");
        assert!(matches!(refused[0], RefusedRoute::NotGranted { .. }));
    }
}
