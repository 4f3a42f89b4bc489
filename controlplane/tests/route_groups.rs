//! Route groups over a real server: two gateways advertise the same prefix (both granted),
//! a third node routes it to the primary only, and the prefix moves between the gateways'
//! peers as their health reports and report streams say.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use wirefence_proto::v1::{agent_report, update, AgentReport, GetNodeRequest, PrefixHealth, RouteHealth, Update};

const NET4: &str = "10.88.1.0/24";
const NET6: &str = "fd88:0:0:1::/64";
const HOLD_DOWN: Duration = Duration::from_millis(1500);

/// Peer name -> allowed-ips, kept up to date from a Watch stream.
#[derive(Default)]
struct Peers(BTreeMap<String, Vec<String>>);

impl Peers {
    fn apply(&mut self, u: &Update) {
        let to_strings = |p: &wirefence_proto::v1::Peer| -> Vec<String> {
            p.allowed_ips.iter().map(|a| ipnet::IpNet::try_from(a).unwrap().to_string()).collect()
        };
        match &u.body {
            Some(update::Body::Snapshot(v)) => {
                self.0 = v.peers.iter().map(|p| (p.name.clone(), to_strings(p))).collect();
            }
            Some(update::Body::Delta(d)) => {
                assert!(d.remove_peers.is_empty(), "a failover removes no peer");
                for p in &d.upsert_peers {
                    self.0.insert(p.name.clone(), to_strings(p));
                }
            }
            None => panic!("empty update"),
        }
    }

    /// The peers whose allowed-ips hold `net`.
    fn routing(&self, net: &str) -> Vec<&str> {
        self.0.iter().filter(|(_, ips)| ips.iter().any(|i| i == net)).map(|(n, _)| n.as_str()).collect()
    }
}

/// An open Report stream of one node: health messages go through `tx`; dropping it ends
/// the stream.
struct Reporter {
    tx: mpsc::Sender<AgentReport>,
}

impl Reporter {
    async fn open(cp: &Cp, credential: &str) -> Reporter {
        let (tx, rx) = mpsc::channel(16);
        let mut agent = cp.agent().await;
        let req = authed(ReceiverStream::new(rx), credential);
        tokio::spawn(async move { agent.report(req).await });
        Reporter { tx }
    }

    async fn health(&self, healthy: bool, priority: u32) {
        let entry = |net: &str| PrefixHealth { prefix: Some(prefix(net)), healthy, priority, interval_ms: 500 };
        let body = agent_report::Body::RouteHealth(RouteHealth { prefixes: vec![entry(NET4), entry(NET6)] });
        self.tx.send(AgentReport { body: Some(body) }).await.unwrap();
    }
}

/// Healthy reports with these priorities every 250 ms, until dropped.
async fn heartbeats(reporters: &[(&Reporter, u32)]) {
    loop {
        for (r, priority) in reporters {
            r.health(true, *priority).await;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Applies updates until `want` routes both prefixes; returns how long that took.
async fn until_routed(s: &mut tonic::Streaming<Update>, peers: &mut Peers, want: &str) -> Duration {
    let start = std::time::Instant::now();
    while peers.routing(NET4) != [want] || peers.routing(NET6) != [want] {
        peers.apply(&next(s).await.unwrap());
    }
    start.elapsed()
}

/// Waits (5 s at most) until `cp`'s election counts `node` as a checked, healthy member of
/// every group.
async fn seen_checked(cp: &Cp, node: &str) {
    let seen = || {
        let groups = cp.handle.registry().route_groups();
        !groups.is_empty() && groups.iter().all(|g| g.members.iter().any(|m| m.node == node && m.checked && m.healthy))
    };
    let start = std::time::Instant::now();
    while !seen() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{node} not seen checked: {:?}",
            cp.handle.registry().route_groups()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_prefix_goes_to_the_primary_only_and_moves_on_failure() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start_with(dir.path(), |c| c.route_hold_down = HOLD_DOWN).await;
    cp.apply("[[rules]]\nid = \"all\"\nfrom = [\"*\"]\nto = [\"*\"]\n").await.unwrap();
    let key = cp.route_key(&["10.88.0.0/16", "fd88::/48"]).await.unwrap();
    let mut agent = cp.agent().await;
    let mut gw = Vec::new();
    for (name, n) in [("gw1", 1), ("gw2", 2)] {
        let mut r = register_req(name, n, &key);
        r.routes = vec![prefix(NET4), prefix(NET6)];
        let r = agent.register(cp.prove(r, n).await).await.unwrap().into_inner();
        assert!(r.refused_routes.is_empty(), "{name}: the same prefix is a group, not taken: {:?}", r.refused_routes);
        gw.push(r);
    }
    // Ids are random: gw[0] is the one with the lower id (the first choice without reports).
    gw.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    // A different overlapping prefix is still refused.
    let mut r = register_req("gw3", 3, &key);
    r.routes = vec![prefix("10.88.1.0/25")];
    let r = agent.register(cp.prove(r, 3).await).await.unwrap().into_inner();
    assert_eq!(r.refused_routes.len(), 1);

    let remote = cp.enroll("remote", 9, &[]).await;
    let mut s = watch(&cp, &remote.credential, 0).await.unwrap();
    let mut peers = Peers::default();
    peers.apply(&next(&mut s).await.unwrap());
    let (id1, id2) = (gw[0].node_id.clone(), gw[1].node_id.clone());
    // Before any report stream: the preferred member (lowest id) has it, alone.
    assert_eq!(peers.routing(NET4), [id1.as_str()]);
    assert_eq!(peers.routing(NET6), [id1.as_str()]);

    // A member does not route its own prefix to the other member.
    let mut own = watch(&cp, &gw[1].credential, 0).await.unwrap();
    let mut gw2_peers = Peers::default();
    gw2_peers.apply(&next(&mut own).await.unwrap());
    assert!(gw2_peers.routing(NET4).is_empty(), "{:?}", gw2_peers.0);

    let r1 = Reporter::open(&cp, &gw[0].credential).await;
    let r2 = Reporter::open(&cp, &gw[1].credential).await;
    r1.health(true, 200).await;
    r2.health(true, 100).await;
    silent(&mut s, 300).await;

    // gw1's check fails: the prefix moves to gw2 in one update.
    r1.health(false, 200).await;
    let u = next(&mut s).await.unwrap();
    assert_eq!(delta(&u).upsert_peers.len(), 2, "one delta moves the prefix between two peers");
    peers.apply(&u);
    assert_eq!(peers.routing(NET4), [id2.as_str()]);
    assert_eq!(peers.routing(NET6), [id2.as_str()]);

    // gw1 recovers with a higher priority: it takes over only after the hold-down.
    let back = std::time::Instant::now();
    r1.health(true, 200).await;
    let both = [(&r1, 200), (&r2, 100)];
    tokio::select! {
        took = until_routed(&mut s, &mut peers, &id1) => {
            assert!(back.elapsed() >= HOLD_DOWN, "took over after {took:?}, before the hold-down");
        }
        _ = heartbeats(&both) => unreachable!(),
    }

    // gw1's report stream ends (its agent died): gw2 at once.
    let dropped = std::time::Instant::now();
    drop(r1);
    until_routed(&mut s, &mut peers, &id2).await;
    assert!(dropped.elapsed() < Duration::from_secs(1), "{:?}", dropped.elapsed());

    // gw2 goes silent (its namespace is gone, its stream not yet): after three intervals.
    let silent_since = std::time::Instant::now();
    let r1 = Reporter::open(&cp, &gw[0].credential).await;
    let alone = [(&r1, 100)];
    tokio::select! {
        _ = until_routed(&mut s, &mut peers, &id1) => {
            let t = silent_since.elapsed();
            assert!(t >= Duration::from_millis(800) && t < Duration::from_secs(3), "{t:?}");
        }
        _ = heartbeats(&alone) => unreachable!(),
    }

    let groups = cp.handle.registry().route_groups();
    assert_eq!(groups.len(), 2);
    assert_eq!(groups[0].primary.as_deref(), Some(id1.as_str()));
    // `nodes show` names the groups, their primary and each member's health.
    let node = cp.admin.get_node(GetNodeRequest { node: id2.clone() }).await.unwrap().into_inner();
    assert_eq!(node.route_groups.len(), 2);
    let g = &node.route_groups[0];
    assert_eq!((g.primary.as_str(), g.members.len()), (id1.as_str(), 2));
    assert!(g.members.iter().all(|m| m.checked));
    let text = wirefence_control::output::node_text(&node, 0);
    assert!(text.contains(&format!("route group:     {NET4} primary {id1}: *{id1} (priority 100, healthy)")), "{text}");
    // Only now: a member whose report stream has ended is no longer "checked".
    drop(r2);
}

/// Two replicas of one PostgreSQL database, the members' report streams on different ones:
/// one elector decides from what both observe, and every replica publishes the same
/// primaries at every version.
#[tokio::test]
async fn members_streaming_to_two_replicas_make_one_group() {
    let dir = tempfile::tempdir().unwrap();
    let pg = wirefence_tests::postgres::Postgres::start(&dir.path().join("pg"));
    let url = pg.create_database("control");
    let mut cps = Vec::new();
    for i in 0..2 {
        let own = dir.path().join(format!("r{i}"));
        std::fs::create_dir(&own).unwrap();
        cps.push(
            start_with(&own, |c| {
                relaxed(c);
                c.db = url.parse().unwrap();
                c.route_hold_down = HOLD_DOWN;
            })
            .await,
        );
    }
    cps[0].apply("[[rules]]\nid = \"all\"\nfrom = [\"*\"]\nto = [\"*\"]\n").await.unwrap();
    let key = cps[0].route_key(&["10.88.0.0/16", "fd88::/48"]).await.unwrap();
    let mut gw = Vec::new();
    for (name, n) in [("gw1", 1), ("gw2", 2)] {
        let mut r = register_req(name, n, &key);
        r.routes = vec![prefix(NET4), prefix(NET6)];
        let cp = &cps[usize::from(n - 1)];
        gw.push(cp.agent().await.register(cp.prove(r, n).await).await.unwrap().into_inner());
    }
    gw.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    let (first, better) = (gw[0].node_id.clone(), gw[1].node_id.clone());
    let remote = cps[0].enroll("remote", 9, &[]).await;
    let mut s = watch(&cps[1], &remote.credential, 0).await.unwrap();
    let mut peers = Peers::default();
    peers.apply(&next(&mut s).await.unwrap());
    assert_eq!(peers.routing(NET4), [first.as_str()], "no report yet: the lowest id");

    // The primary's checks are seen by every replica before the preferred member (priority
    // 200) appears, streaming to the other replica; else the election could rightly move
    // the prefix at once, the primary having no stream yet.
    let r_first = Reporter::open(&cps[0], &gw[0].credential).await;
    let first_alone = [(&r_first, 100)];
    tokio::select! {
        _ = async { for cp in &cps { seen_checked(cp, &first).await } } => {}
        _ = heartbeats(&first_alone) => unreachable!(),
    }
    let r_better = Reporter::open(&cps[1], &gw[1].credential).await;
    let both = [(&r_first, 100), (&r_better, 200)];
    let started = std::time::Instant::now();
    tokio::select! {
        _ = until_routed(&mut s, &mut peers, &better) => {
            let t = started.elapsed();
            assert!(t >= HOLD_DOWN && t < HOLD_DOWN + Duration::from_secs(2), "took over after {t:?}");
        }
        _ = heartbeats(&both) => unreachable!(),
    }
    // Stable: nothing moves while both stay healthy.
    tokio::select! {
        _ = silent(&mut s, 1500) => {}
        _ = heartbeats(&both) => unreachable!(),
    }

    // Its stream ends on its replica: the member on the other replica at once.
    let dropped = std::time::Instant::now();
    drop(r_better);
    let alone = [(&r_first, 100)];
    tokio::select! {
        _ = until_routed(&mut s, &mut peers, &first) => {
            assert!(dropped.elapsed() < Duration::from_secs(1), "{:?}", dropped.elapsed());
        }
        _ = heartbeats(&alone) => unreachable!(),
    }

    // One history: every replica has the same primaries at every version.
    let last = cps[0].handle.registry().current().version.max(cps[1].handle.registry().current().version);
    for cp in &cps {
        let mut states = cp.handle.registry().subscribe();
        tokio::time::timeout(Duration::from_secs(5), states.wait_for(|s| s.version >= last)).await.unwrap().unwrap();
    }
    let mut moves = 0;
    for v in 2..=last {
        let at = |cp: &Cp| cp.handle.registry().at_version(v).expect("in the history").primaries().clone();
        let (a, b) = (at(&cps[0]), at(&cps[1]));
        assert_eq!(a, b, "version {v}");
        let before = cps[0].handle.registry().at_version(v - 1).map(|p| p.primaries().clone()).unwrap_or_default();
        // The group's forming (gw2 enrolls) gives it its first primary; then it moves.
        moves += usize::from(!before.is_empty() && before != a);
    }
    assert_eq!(moves, 2, "to the better member and back, nothing else");
}
