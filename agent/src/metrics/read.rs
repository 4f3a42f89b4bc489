//! What a scrape reads now: the policy's pinned maps, the WireGuard device, the
//! control-plane client's state. Read only; a source that cannot be read leaves its series
//! out and says so in `scrape_source_failed`.

use std::time::SystemTime;

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use wirefence_common::{self as common, FlowKey, FlowValue};

use super::Target;
use crate::control::ControlHealth;
use crate::enforce;
use crate::model::PublicKey;
use crate::wg::WgBackend;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct SourceLabel {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabel {
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowLabel {
    flow: &'static str,
}

/// `peer`: the configured name, else the key; `public_key` keeps two peers of one name apart.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    peer: String,
    public_key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FamilyLabel {
    family: &'static str,
}

/// The programs' statistics that are drops, by the reason in the metric's label.
const DROPS: [(&str, &str); 4] =
    [("denied", "denied"), ("malformed", "malformed"), ("uninitialized", "uninitialized"), ("not_ip", "not_ip")];

fn failed(errors: &Family<SourceLabel, Gauge>, source: &'static str, error: &dyn std::fmt::Display) {
    tracing::warn!(source, %error, "metrics: cannot read a source");
    errors.get_or_create(&SourceLabel { source }).set(1);
}

fn counters<L: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug + Send + Sync + 'static>(
    reg: &mut Registry,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (L, u64)>,
) {
    let family = Family::<L, Counter>::default();
    for (labels, v) in values {
        family.get_or_create(&labels).inc_by(v);
    }
    reg.register(name, help, family);
}

/// Per-rule counters, drops by reason, allowed packets, lost events and conntrack entries,
/// from the pinned maps; nothing without a policy.
pub(super) fn policy(reg: &mut Registry, target: &Target, errors: &Family<SourceLabel, Gauge>) {
    let Some((root, state_dir)) = &target.policy else { return };
    errors.get_or_create(&SourceLabel { source: "policy" }).set(0);
    let inspection = match enforce::inspect::inspect(root, &target.ifname, state_dir) {
        Ok(enforce::inspect::Pins::Ready(i)) => i,
        // Not pinned yet (before the first pass, or while the maps are created): nothing
        // is enforced, nothing counted.
        Ok(enforce::inspect::Pins::Absent | enforce::inspect::Pins::Loading { .. }) => return,
        Err(e) => return failed(errors, "policy", &e),
    };
    let c = &inspection.counters;
    let rules = || c.rules.iter().map(|(id, n)| (RuleLabel { rule: id.clone() }, *n));
    counters(reg, "rule_packets", "Packets the rule decided (both directions)", rules().map(|(l, n)| (l, n.packets)));
    counters(reg, "rule_bytes", "Bytes of the packets the rule decided", rules().map(|(l, n)| (l, n.bytes)));
    let stat = |name: &str| c.stats.get(name).copied().unwrap_or_default();
    let drops = || DROPS.iter().map(|(label, stat_name)| (ReasonLabel { reason: label }, stat(stat_name)));
    counters(
        reg,
        "dropped_packets",
        "Packets the policy programs dropped, by reason",
        drops().map(|(l, n)| (l, n.packets)),
    );
    counters(reg, "dropped_bytes", "Bytes of the dropped packets, by reason", drops().map(|(l, n)| (l, n.bytes)));
    let allowed = || {
        [("new", "allowed_new"), ("established", "allowed_established")]
            .map(|(flow, name)| (FlowLabel { flow }, stat(name)))
    };
    counters(
        reg,
        "allowed_packets",
        "Packets the policy let through, by flow state",
        allowed().map(|(l, n)| (l, n.packets)),
    );
    single(
        reg,
        "events_lost",
        "Deny and new-flow events not queued (rate limit or full ring buffer)",
        stat("events_lost").packets,
    );
    single(
        reg,
        "untracked_packets",
        "Allowed packets of flows conntrack had no room for",
        stat("ct_untracked").packets,
    );
    match conntrack_entries(&enforce::pin_dir(root, &target.ifname)) {
        Ok(n) => {
            let g = Gauge::<i64>::default();
            g.set(n as i64);
            reg.register("conntrack_entries", "Entries in the conntrack table (expired ones until swept)", g);
            let cap = Gauge::<i64>::default();
            cap.set(i64::from(common::MAX_CONNTRACK));
            reg.register("conntrack_capacity", "Entries the conntrack table holds at most", cap);
        }
        Err(e) => failed(errors, "conntrack", &e),
    }
}

/// What the agent's queue to the control plane dropped (over [`FLOW_QUEUE`] waiting: the
/// control plane away or slow).
///
/// [`FLOW_QUEUE`]: crate::enforce::flows::FLOW_QUEUE
pub(super) fn flow_queue(reg: &mut Registry, flows: &crate::enforce::flows::FlowQueue) {
    single(
        reg,
        "flow_events_dropped",
        "Flow events (new flows, denies, flow ends) dropped because the queue to the control plane was full",
        flows.dropped(),
    );
}

fn single(reg: &mut Registry, name: &str, help: &str, v: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(v);
    reg.register(name, help, c);
}

/// Counts the pinned conntrack map's entries: one key walk, bounded by the table's size
/// (`MAX_CONNTRACK`, a few tens of ms when full) and one scrape at a time.
fn conntrack_entries(dir: &std::path::Path) -> Result<usize, aya::maps::MapError> {
    let data = MapData::from_pin(crate::enforce::pin_path(dir, common::CONNTRACK))?;
    let map: BpfHashMap<MapData, FlowKey, FlowValue> = BpfHashMap::try_from(Map::from_map_data(data)?)?;
    // A key deleted under the walk (a sweep, a program) makes the kernel restart it from the
    // first key: the count may then be high for one scrape, and the cap keeps it finite.
    Ok(map.keys().filter(Result::is_ok).take(common::MAX_CONNTRACK as usize).count())
}

/// The device's peers: last handshake, bytes received and sent.
pub(super) fn peers(reg: &mut Registry, backend: &dyn WgBackend, target: &Target, errors: &Family<SourceLabel, Gauge>) {
    errors.get_or_create(&SourceLabel { source: "peers" }).set(0);
    let dev = match backend.read(&target.ifname) {
        Ok(Some(dev)) => dev,
        Ok(None) => return,
        Err(e) => return failed(errors, "peers", &e),
    };
    let (handshake, rx, tx) = (
        Family::<PeerLabel, Gauge>::default(),
        Family::<PeerLabel, Counter>::default(),
        Family::<PeerLabel, Counter>::default(),
    );
    for p in &dev.peers {
        let key = PublicKey(p.config.public_key.0);
        let label = PeerLabel {
            peer: target.peer_names.get(&key).cloned().unwrap_or_else(|| key.to_string()),
            public_key: key.to_string(),
        };
        let last = p.stats.last_handshake_time.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok());
        handshake.get_or_create(&label).set(last.map_or(0, |d| d.as_secs() as i64));
        rx.get_or_create(&label).inc_by(p.stats.rx_bytes);
        tx.get_or_create(&label).inc_by(p.stats.tx_bytes);
    }
    reg.register(
        "peer_last_handshake_timestamp_seconds",
        "Unix time of the peer's last completed handshake (0: none yet)",
        handshake,
    );
    reg.register("peer_received_bytes", "Bytes received from the peer", rx);
    reg.register("peer_sent_bytes", "Bytes sent to the peer", tx);
}

/// The control-plane client: connected or not, the version applied, and the certificate
/// probe's findings per address family.
pub(super) fn control(reg: &mut Registry, health: &ControlHealth) {
    let gauge = |v: i64| {
        let g = Gauge::<i64>::default();
        g.set(v);
        g
    };
    reg.register(
        "control_connected",
        "1 while a session with the control plane is up",
        gauge(health.connected().into()),
    );
    reg.register(
        "control_applied_version",
        "The control-plane version whose view the agent applied (0: none)",
        gauge(health.applied_version() as i64),
    );
    let Some(probe) = health.certificates() else { return };
    let (expiry, verified, addresses) = (
        Family::<FamilyLabel, Gauge>::default(),
        Family::<FamilyLabel, Gauge>::default(),
        Family::<FamilyLabel, Gauge>::default(),
    );
    for (family, p) in [("ipv4", probe.ipv4), ("ipv6", probe.ipv6)] {
        if p.addresses == 0 {
            continue;
        }
        let label = FamilyLabel { family };
        addresses.get_or_create(&label).set(p.addresses as i64);
        verified.get_or_create(&label).set(p.verified as i64);
        if let Some(t) = p.earliest {
            expiry.get_or_create(&label).set(t);
        }
    }
    reg.register(
        "control_certificate_expiry_timestamp_seconds",
        "Earliest expiry (Unix time) of the control plane's certificates, per address family, \
         from a verified TLS handshake with every address the endpoints resolve to",
        expiry,
    );
    reg.register(
        "control_certificate_probe_addresses",
        "Control-plane addresses the last certificate probe tried, per family",
        addresses,
    );
    reg.register(
        "control_certificate_probe_verified",
        "Of those, the addresses whose certificate verified (fewer: some address serves one the CA does not sign)",
        verified,
    );
}
