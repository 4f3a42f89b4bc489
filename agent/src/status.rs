//! `status`: what the kernel has of the agent's objects, read directly (no daemon needed).

use std::time::SystemTime;

use serde::Serialize;
use wirefence_proto::Escaped;

use crate::enforce::inspect::Pins;
use crate::model::{IfName, LinkState, OwnedRoute, PublicKey, RouteKind, Rule};
use crate::reconcile::Reconciler;

#[derive(Debug, Serialize)]
pub struct Status {
    /// The pid of the agent running on this state directory (the holder of its lock);
    /// `None`: no agent runs, so nothing keeps what is shown here converged.
    pub agent_pid: Option<u32>,
    /// When the agent of this state directory last converged and whether a pass failed
    /// since (as it recorded them; `None`: never).
    pub passes: Option<crate::passes::PassRecord>,
    pub interface: IfName,
    pub backend: &'static str,
    pub link: Option<LinkState>,
    pub public_key: Option<PublicKey>,
    /// The private key file: its age, and a rotation in progress.
    pub key: KeyStatus,
    pub listen_port: Option<u16>,
    /// The mark on the tunnel's own (encrypted) packets, set for a default route through
    /// the tunnel: the policy routing rules send everything else to the tunnel's table.
    pub fwmark: Option<u32>,
    pub addresses: Vec<String>,
    pub peers: Vec<PeerStatus>,
    pub routes: Vec<OwnedRoute>,
    pub rules: Vec<Rule>,
    /// `None`: no policy is enforced on the interface.
    pub policy: Option<PolicyStatus>,
    /// An agent is loading the policy programs: the maps not pinned yet.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub policy_loading: Vec<&'static str>,
    /// `None`: TCP MSS is not clamped on the interface.
    pub mss_clamp: Option<MssStatus>,
    /// Forwarding per family and the masquerade rules in the agent's nftables table.
    pub gateway: GatewayStatus,
    /// Control mode: the control-plane connection as the running agent last recorded it.
    pub control: Option<crate::control::ControlStatus>,
    /// Control mode: the enrollment key file, when the node has a credential and the file
    /// is still there (it is never read again, so it can be removed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub removable_enrollment_key: Option<std::path::PathBuf>,
}

/// What the key file says: how old the key is (a rotation writes a new file), and the next
/// key while a rotation is in progress.
#[derive(Clone, Debug, Default, Serialize)]
pub struct KeyStatus {
    pub age_secs: Option<u64>,
    pub rotation_pending: Option<PublicKey>,
}

impl KeyStatus {
    pub fn read(key_file: &std::path::Path) -> KeyStatus {
        KeyStatus {
            age_secs: crate::keys::age(key_file).map(|d| d.as_secs()),
            // Read only (`load_next` would set an unreadable next key aside).
            rotation_pending: crate::keys::load(&crate::keys::next_path(key_file)).ok().map(|k| k.public_key()),
        }
    }
}

impl Status {
    /// Moves the counters of rules that are not in `current` (the policy the agent runs)
    /// out of the rule counters, into `retired_rules`.
    pub fn retire_rules_not_in<'a>(&mut self, current: impl IntoIterator<Item = &'a str>) {
        let Some(p) = &mut self.policy else { return };
        let current: std::collections::BTreeSet<&str> = current.into_iter().collect();
        let (keep, retired) =
            std::mem::take(&mut p.counters.rules).into_iter().partition(|(id, _)| current.contains(id.as_str()));
        p.counters.rules = keep;
        p.retired_rules = retired;
    }
}

/// The enrollment key file if it still exists although the node has a credential.
pub fn removable_enrollment_key(
    files: &crate::control::persist::ControlFiles,
    key_file: Option<&std::path::Path>,
) -> Option<std::path::PathBuf> {
    let key_file = key_file?;
    (files.credential().ok().flatten().is_some() && key_file.exists()).then(|| key_file.to_owned())
}

#[derive(Debug, Serialize)]
pub struct PolicyStatus {
    pub epoch: u32,
    pub attached: bool,
    /// Counters of the current policy's rules (`rules`) and of the whole program (`stats`).
    pub counters: crate::enforce::Counters,
    /// Counters of rules the current policy no longer has, while the previous generation
    /// of the programs' maps still holds their slots.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub retired_rules: std::collections::BTreeMap<String, crate::enforce::Count>,
    /// The latest denied packets the running agent saw (newest last).
    pub recent_denies: Vec<crate::enforce::DenyRecord>,
    /// The pins come from another wirefence build (its id, or "not recorded").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub other_build: Option<String>,
}

/// The MSS limits on the tunnel, and which programs clamp.
#[derive(Debug, Serialize)]
pub struct MssStatus {
    pub ipv4: u16,
    pub ipv6: u16,
    /// "policy programs" or "clamp alone".
    pub by: &'static str,
}

impl MssStatus {
    fn of(m: crate::model::MssClamp, by: &'static str) -> Option<MssStatus> {
        (m != crate::model::MssClamp::OFF).then_some(MssStatus { ipv4: m.v4, ipv6: m.v6, by })
    }
}

#[derive(Debug, Default, Serialize)]
pub struct GatewayStatus {
    /// Per family ("ipv4", "ipv6"; a family off in the kernel is left out).
    pub forwarding: std::collections::BTreeMap<&'static str, ForwardingStatus>,
    /// "absent", "present" or "other" (the table holds what the agent does not make; the
    /// running agent replaces it).
    pub nat_table: &'static str,
    pub masquerade: Vec<crate::gateway::Masquerade>,
}

#[derive(Debug, Serialize)]
pub struct ForwardingStatus {
    pub enabled: bool,
    /// The value found before the agent turned forwarding on (`down` writes it back);
    /// `None`: the agent has not changed it.
    pub previous: Option<bool>,
}

impl GatewayStatus {
    fn of(g: crate::gateway::ObservedGateway) -> GatewayStatus {
        use crate::gateway::nat::NatState;
        let forwarding = g
            .forwarding
            .iter()
            .map(|(f, on)| (f.name(), ForwardingStatus { enabled: *on, previous: g.recorded.get(f).copied() }))
            .collect();
        let (nat_table, masquerade) = match g.nat {
            NatState::Absent => ("absent", Vec::new()),
            NatState::Present(rules) => ("present", rules.into_iter().collect()),
            NatState::Other => ("other", Vec::new()),
        };
        GatewayStatus { forwarding, nat_table, masquerade }
    }
}

#[derive(Debug, Serialize)]
pub struct PeerStatus {
    pub public_key: PublicKey,
    pub name: Option<String>,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    /// Seconds since the last handshake; `None` if there was none.
    pub handshake_age_secs: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub persistent_keepalive: Option<u16>,
}

pub async fn collect(
    rec: &Reconciler,
    ifname: &IfName,
    names: &std::collections::BTreeMap<PublicKey, String>,
    policy_dirs: Option<(&std::path::Path, &std::path::Path)>,
) -> anyhow::Result<Status> {
    let observed = rec.observe(ifname).await?;
    let info = match observed.link {
        Some(_) => rec.device_info(ifname).await?,
        None => None,
    };
    let now = SystemTime::now();
    let peers = info
        .iter()
        .flat_map(|d| d.peers.iter())
        .map(|p| {
            let key = PublicKey(p.config.public_key.0);
            PeerStatus {
                public_key: key,
                name: names.get(&key).cloned(),
                endpoint: p.config.endpoint.map(|e| e.to_string()),
                allowed_ips: p.config.allowed_ips.iter().map(|a| format!("{}/{}", a.address, a.cidr)).collect(),
                handshake_age_secs: p
                    .stats
                    .last_handshake_time
                    .filter(|t| *t > SystemTime::UNIX_EPOCH)
                    .map(|t| now.duration_since(t).unwrap_or_default().as_secs()),
                rx_bytes: p.stats.rx_bytes,
                tx_bytes: p.stats.tx_bytes,
                persistent_keepalive: p.config.persistent_keepalive_interval.filter(|k| *k != 0),
            }
        })
        .collect();
    // Read only: the pinned maps by path, nothing loaded or written (a running agent may be
    // filling a generation; the pins may be another build's).
    let (inspected, policy_loading) = match policy_dirs {
        Some((root, state_dir)) => match crate::enforce::inspect::inspect(root, ifname, state_dir)? {
            Pins::Ready(i) => (Some((i, root, state_dir)), Vec::new()),
            Pins::Loading { missing } => (None, missing),
            Pins::Absent => (None, Vec::new()),
        },
        None => (None, Vec::new()),
    };
    let mss_clamp = match &inspected {
        Some((i, _, _)) if observed.clamp.limits.is_none() => MssStatus::of(i.mss, "policy programs"),
        _ => observed.clamp.limits.and_then(|m| MssStatus::of(m, "clamp alone")),
    };
    let policy = match inspected {
        Some((i, root, state_dir)) => Some(PolicyStatus {
            epoch: i.state.epoch,
            attached: observed.link.map_or(Ok(false), |l| crate::enforce::attached_elsewhere(root, ifname, l.index))?,
            counters: i.counters,
            retired_rules: Default::default(),
            recent_denies: crate::enforce::denies::load(state_dir, ifname),
            other_build: i.other_build,
        }),
        None => None,
    };
    Ok(Status {
        agent_pid: None,
        passes: None,
        control: None,
        removable_enrollment_key: None,
        policy,
        policy_loading,
        mss_clamp,
        interface: ifname.clone(),
        backend: rec.backend().name(),
        link: observed.link,
        public_key: info.as_ref().and_then(|d| d.public_key.as_ref()).map(|k| PublicKey(k.0)),
        key: KeyStatus::default(),
        listen_port: info.as_ref().and_then(|d| d.listen_port),
        fwmark: info.as_ref().and_then(|d| d.fwmark).filter(|m| *m != 0),
        addresses: observed.addresses.iter().map(|a| a.to_string()).collect(),
        peers,
        routes: observed.routes.into_iter().collect(),
        rules: observed.rules.into_iter().collect(),
        gateway: GatewayStatus::of(observed.gateway),
    })
}

/// `made 5 min ago`, `12 days old`.
fn key_age(secs: u64) -> String {
    match secs {
        0..172_800 => format!("made {}", ago(secs, 0)),
        d => format!("{} days old", d / 86_400),
    }
}

/// `12 s ago`, `5 min ago`, `3 h ago`.
fn ago(now: u64, then: u64) -> String {
    match now.saturating_sub(then) {
        d @ 0..120 => format!("{d} s ago"),
        d @ 120..7200 => format!("{} min ago", d / 60),
        d => format!("{} h ago", d / 3600),
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
        let converged = match &self.passes {
            Some(p) if p.converged_unix > 0 => format!("last converged {}", ago(now, p.converged_unix)),
            _ => "never converged".to_owned(),
        };
        match self.agent_pid {
            Some(pid) => writeln!(f, "agent: running (pid {pid}), {converged}")?,
            None => writeln!(f, "agent: not running (nothing keeps this state converged), {converged}")?,
        }
        if let Some((at, why)) = self.passes.as_ref().and_then(|p| p.failed.as_ref()) {
            writeln!(f, "  last pass failed {}: {}", ago(now, *at), Escaped(why))?;
        }
        match &self.link {
            None => return writeln!(f, "interface {}: absent ({} backend)", self.interface, self.backend),
            Some(l) => writeln!(
                f,
                "interface {}: {} mtu {} index {} ({} backend)",
                self.interface,
                if l.up { "up" } else { "down" },
                l.mtu,
                l.index,
                self.backend
            )?,
        }
        if let Some(k) = &self.public_key {
            match self.key.age_secs {
                Some(age) => writeln!(f, "  public key: {k} (key {})", key_age(age))?,
                None => writeln!(f, "  public key: {k}")?,
            }
        }
        if let Some(next) = &self.key.rotation_pending {
            writeln!(f, "  key rotation in progress: next key {next}")?;
        }
        if let Some(p) = self.listen_port {
            writeln!(f, "  listening port: {p}")?;
        }
        if let Some(m) = self.fwmark {
            writeln!(f, "  fwmark: {m:#x} (its own packets; the rules below send the rest to the tunnel's table)")?;
        }
        writeln!(f, "  addresses: {}", self.addresses.join(", "))?;
        for p in &self.peers {
            // Names are free text (a config file, later a control plane): shown escaped.
            match &p.name {
                Some(name) => writeln!(f, "\npeer {} ({})", p.public_key, Escaped(name))?,
                None => writeln!(f, "\npeer {}", p.public_key)?,
            }
            writeln!(f, "  endpoint: {}", p.endpoint.as_deref().unwrap_or("(none)"))?;
            writeln!(f, "  allowed ips: {}", p.allowed_ips.join(", "))?;
            match p.handshake_age_secs {
                Some(s) => writeln!(f, "  latest handshake: {s} s ago")?,
                None => writeln!(f, "  latest handshake: never")?,
            }
            writeln!(f, "  transfer: {} received, {} sent", bytes(p.rx_bytes), bytes(p.tx_bytes))?;
            if let Some(k) = p.persistent_keepalive {
                writeln!(f, "  persistent keepalive: every {k} s")?;
            }
        }
        writeln!(f, "\nowned routes:")?;
        let ours = self.link.map(|l| l.index);
        for r in &self.routes {
            match (r.route.kind, ours == Some(r.oif)) {
                // A mesh prefix: refused while no peer carries it, never sent out in clear.
                (RouteKind::Unreachable, _) => writeln!(f, "  unreachable {} table {}", r.route.dst, r.route.table)?,
                (RouteKind::Tunnel, true) => {
                    write!(f, "  {} dev {} table {}", r.route.dst, self.interface, r.route.table)?;
                    match r.route.src {
                        Some(src) => writeln!(f, " src {src}")?,
                        None => writeln!(f)?,
                    }
                }
                (RouteKind::Tunnel, false) => {
                    writeln!(f, "  {} ifindex {} table {} (stale)", r.route.dst, r.oif, r.route.table)?
                }
            }
        }
        if !self.rules.is_empty() {
            writeln!(f, "owned rules:")?;
            for r in &self.rules {
                writeln!(f, "  {r}")?;
            }
        }
        match &self.mss_clamp {
            Some(m) => writeln!(f, "MSS clamp: {} (IPv4), {} (IPv6), by the {}", m.ipv4, m.ipv6, m.by)?,
            None => writeln!(f, "MSS clamp: off")?,
        }
        let g = &self.gateway;
        let forwarding: Vec<String> = g
            .forwarding
            .iter()
            .map(|(family, s)| match s.previous {
                Some(p) => format!(
                    "{family} {} (down restores {})",
                    if s.enabled { "on" } else { "off" },
                    if p { "on" } else { "off" }
                ),
                None => format!("{family} {}", if s.enabled { "on" } else { "off" }),
            })
            .collect();
        writeln!(f, "\ngateway: forwarding {}", forwarding.join(", "))?;
        match g.nat_table {
            "absent" => writeln!(f, "  masquerade: none")?,
            "present" => {
                for m in &g.masquerade {
                    writeln!(f, "  masquerade {} out of {} (table inet wirefence)", m.src, m.oif)?;
                }
            }
            _ => writeln!(f, "  table inet wirefence holds rules wirefence does not make (the agent replaces them)")?,
        }
        if !self.policy_loading.is_empty() {
            writeln!(
                f,
                "\npolicy: being loaded by the agent (maps not pinned yet: {})",
                self.policy_loading.join(", ")
            )?;
        }
        if let Some(p) = &self.policy {
            writeln!(
                f,
                "\npolicy: epoch {}, programs {}",
                p.epoch,
                if p.attached { "attached" } else { "NOT attached" }
            )?;
            if let Some(build) = &p.other_build {
                writeln!(
                    f,
                    "  pinned by another wirefence build ({build}; this one: {}): this build's agent takes them \
                     over when it starts (programs replaced in place, maps kept or migrated)",
                    crate::bpf::object_id()
                )?;
            }
            for (id, c) in &p.counters.rules {
                writeln!(f, "  rule {id}: {} packets, {}", c.packets, bytes(c.bytes))?;
            }
            if !p.retired_rules.is_empty() {
                writeln!(f, "  rules of the previous policy:")?;
                for (id, c) in &p.retired_rules {
                    writeln!(f, "    rule {id}: {} packets, {}", c.packets, bytes(c.bytes))?;
                }
            }
            let stats: Vec<String> = p.counters.stats.iter().map(|(k, c)| format!("{k} {}", c.packets)).collect();
            writeln!(f, "  packets: {}", stats.join(", "))?;
            if !p.recent_denies.is_empty() {
                writeln!(f, "  recent denies:")?;
                for d in &p.recent_denies {
                    writeln!(f, "    {d}")?;
                }
            }
        }
        if let Some(c) = &self.control {
            // What the agent recorded is only current while it runs.
            match (self.agent_pid, c.connected_to.as_deref()) {
                (Some(_), Some(to)) => writeln!(f, "\ncontrol plane: {to}")?,
                (Some(_), None) => writeln!(f, "\ncontrol plane: not connected")?,
                (None, Some(to)) => {
                    writeln!(f, "\ncontrol plane: not connected (the agent is not running; it was connected to {to})")?
                }
                (None, None) => writeln!(f, "\ncontrol plane: not connected (the agent is not running)")?,
            }
            writeln!(f, "  node: {}", Escaped(c.node_id.as_deref().unwrap_or("(not registered)")))?;
            writeln!(f, "  applied version: {}", c.applied_version)?;
            let now =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
            for (family, t) in [("IPv4", c.cert_expiry_ipv4), ("IPv6", c.cert_expiry_ipv6)] {
                if let Some(t) = t {
                    writeln!(f, "  certificate over {family} expires in {} days (unix {t})", (t - now) / 86_400)?;
                }
            }
            match (&c.action_needed, &c.last_error) {
                // May quote what the control plane answered.
                (Some(why), _) => writeln!(
                    f,
                    "  operator action needed: {} (retried every {} minutes)",
                    Escaped(why),
                    crate::control::client::OPERATOR_RETRY.as_secs() / 60
                )?,
                (None, Some(e)) => writeln!(f, "  last error: {}", Escaped(e))?,
                (None, None) => {}
            }
            for r in &c.refused_routes {
                writeln!(f, "  route refused by the control plane: {}", Escaped(r))?;
            }
            if let Some(k) = &self.removable_enrollment_key {
                writeln!(f, "  enrollment key {} is no longer needed and can be removed", k.display())?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Route;

    #[test]
    fn status_text_escapes_what_others_wrote_and_names_route_kinds() {
        let peer = |name: &str| PeerStatus {
            public_key: PublicKey([7; 32]),
            name: Some(name.into()),
            endpoint: None,
            allowed_ips: vec![],
            handshake_age_secs: None,
            rx_bytes: 0,
            tx_bytes: 0,
            persistent_keepalive: None,
        };
        let st = Status {
            agent_pid: Some(4242),
            passes: None,
            interface: "wf0".parse().unwrap(),
            backend: "userspace",
            link: Some(LinkState { index: 3, mtu: 1420, up: true }),
            public_key: Some(PublicKey([9; 32])),
            key: KeyStatus { age_secs: Some(3 * 86_400 + 5), rotation_pending: Some(PublicKey([8; 32])) },
            listen_port: None,
            fwmark: None,
            addresses: vec![],
            peers: vec![peer("gw\x1b[2J\x1b[H"), peer("db\n  endpoint: 203.0.113.9:51820"), peer("ab\u{202e}cd")],
            routes: vec![
                OwnedRoute {
                    route: Route {
                        dst: "10.20.0.0/16".parse().unwrap(),
                        table: 254,
                        kind: RouteKind::Unreachable,
                        src: None,
                    },
                    oif: 0,
                },
                OwnedRoute {
                    route: Route {
                        dst: "10.20.2.0/24".parse().unwrap(),
                        table: 254,
                        kind: RouteKind::Tunnel,
                        src: Some("192.168.10.1".parse().unwrap()),
                    },
                    oif: 3,
                },
            ],
            rules: vec![],
            policy: None,
            policy_loading: Vec::new(),
            mss_clamp: None,
            gateway: GatewayStatus {
                forwarding: [("ipv4", ForwardingStatus { enabled: true, previous: Some(false) })].into(),
                nat_table: "present",
                masquerade: vec![crate::gateway::Masquerade {
                    src: "192.168.10.0/24".parse().unwrap(),
                    oif: "wf0".parse().unwrap(),
                }],
            },
            control: Some(crate::control::ControlStatus {
                last_error: Some("refused: \x1b]0;pwned\x07".into()),
                refused_routes: vec!["10.30.0.0/24 is not within the routes granted\x1b[2J".into()],
                ..Default::default()
            }),
            removable_enrollment_key: None,
        };
        let text = st.to_string();
        assert!(!text.chars().any(|c| c.is_control() && c != '\n' || c == '\u{202e}'), "{text:?}");
        assert!(text.contains(r"(gw\u{1b}[2J\u{1b}[H)"), "{text}");
        assert!(text.contains(r"(db\n  endpoint: 203.0.113.9:51820)"), "{text}");
        assert!(
            text.contains(r"(ab\u{202e}cd)") && text.contains(r"last error: refused: \u{1b}]0;pwned\u{7}"),
            "{text}"
        );
        assert!(text.contains("  unreachable 10.20.0.0/16 table 254\n"), "{text}");
        assert!(text.contains(&format!("  public key: {} (key 3 days old)\n", PublicKey([9; 32]))), "{text}");
        assert!(text.contains(&format!("  key rotation in progress: next key {}\n", PublicKey([8; 32]))), "{text}");
        assert!(
            text.contains("  10.20.2.0/24 dev wf0 table 254 src 192.168.10.1\n") && !text.contains("stale"),
            "{text}"
        );
        assert!(text.contains("gateway: forwarding ipv4 on (down restores off)\n"), "{text}");
        assert!(text.contains("  masquerade 192.168.10.0/24 out of wf0 (table inet wirefence)\n"), "{text}");
        assert!(
            text.contains(
                r"route refused by the control plane: 10.30.0.0/24 is not within the routes granted\u{1b}[2J"
            ),
            "{text}"
        );
        // The forged line is not a line of its own.
        assert_eq!(text.lines().filter(|l| l.trim_start().starts_with("endpoint:")).count(), 3, "{text}");
    }

    #[test]
    fn a_stopped_agent_is_not_shown_as_connected() {
        let mut st = Status {
            agent_pid: None,
            passes: None,
            interface: "wf0".parse().unwrap(),
            backend: "kernel",
            link: Some(LinkState { index: 3, mtu: 1420, up: true }),
            public_key: None,
            key: Default::default(),
            listen_port: None,
            fwmark: None,
            addresses: vec![],
            peers: vec![],
            routes: vec![],
            rules: vec![],
            policy: None,
            policy_loading: Vec::new(),
            mss_clamp: None,
            gateway: GatewayStatus::default(),
            control: Some(crate::control::ControlStatus {
                connected_to: Some("https://cp.example:7443".into()),
                ..Default::default()
            }),
            removable_enrollment_key: None,
        };
        let text = st.to_string();
        assert!(text.starts_with("agent: not running"), "{text}");
        assert!(
            text.contains(
                "control plane: not connected (the agent is not running; it was connected to https://cp.example:7443)"
            ),
            "{text}"
        );
        assert!(text.starts_with("agent: not running (nothing keeps this state converged), never converged\n"));
        st.agent_pid = Some(77);
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        st.passes = Some(crate::passes::PassRecord {
            converged_unix: now - 30,
            failed: Some((now - 5, "netlink: \x1b[2J".into())),
        });
        let text = st.to_string();
        assert!(text.starts_with("agent: running (pid 77), last converged 30 s ago\n"), "{text}");
        assert!(text.contains("\n  last pass failed 5 s ago: netlink: \\u{1b}[2J\n"), "{text}");
        assert!(text.contains("\ncontrol plane: https://cp.example:7443\n"), "{text}");
        // An agent creating its maps: said so, not an error and not "no policy".
        st.policy_loading = vec!["WF_RULE_COUNTERS", "WF_STATS"];
        let text = st.to_string();
        assert!(
            text.contains("\npolicy: being loaded by the agent (maps not pinned yet: WF_RULE_COUNTERS, WF_STATS)\n"),
            "{text}"
        );
    }
}
