//! A route group in namespaces, for the HA test and the failover bench: h2 and h3 advertise
//! the same subnet, h2 with the higher priority, both on one LAN (a bridge in the LAN host's
//! namespace; each gateway masquerades into it, so replies go back through whichever one
//! forwarded), each checking a TCP service on the LAN host. h1, a remote site, accepts the
//! subnet; its policy lets it ping the LAN host and reach that service.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::control::{ControlPlane, CP_V4, CP_V6};
use crate::*;

pub const SUBNET: &str = "10.20.2.0/24";
pub const LAN_HOST: &str = "10.20.2.100";
/// The LAN host's echo service: the gateways' health check, and h1's TCP probe.
pub const SERVICE_PORT: u16 = 7;
/// The gateways' check interval.
pub const CHECK_INTERVAL_MS: u32 = 300;

const POLICY: &str = r#"
[[rules]]
id = "site"
from = ["node:h1"]
to = ["10.20.2.0/24", "node:h2", "node:h3"]
proto = "icmp"

[[rules]]
id = "service"
from = ["node:h1"]
to = ["10.20.2.0/24"]
proto = "tcp"
ports = ["7"]
"#;

pub struct GroupLab {
    // Dropped in this order: agents, control plane, LAN, then the lab's namespaces.
    pub agents: [Option<AgentProc>; 3],
    pub cp: ControlPlane,
    pub lan: Netns,
    pub lab: Lab,
}

/// The LAN: a bridge in the LAN host's namespace, the host's address on it, the service.
fn lan() -> Netns {
    let ns = Netns::new("lan");
    ns.add_bridge("brlan");
    ns.ip(&["addr", "add", &format!("{LAN_HOST}/24"), "dev", "brlan"]);
    echo_server(&ns, format!("{LAN_HOST}:{SERVICE_PORT}").parse().unwrap());
    ns
}

/// Joins gateway `gw` to a LAN that is bridge `bridge` in namespace `lan`: `lan0` with
/// `addr`/24 on it, and the gateway masquerading into it, so a LAN host's answers go back
/// through whichever of several gateways forwarded (the LAN has no route of its own).
pub fn join_lan(gw: &Host, lan: &Netns, bridge: &str, addr: &str) {
    let port = format!("lp{}", gw.index);
    gw.ns.ip(&["link", "add", "lan0", "type", "veth", "peer", "name", &port, "netns", &lan.name]);
    lan.ip(&["link", "set", &port, "master", bridge, "up"]);
    gw.ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "lan0"]);
    gw.ns.ip(&["link", "set", "lan0", "up"]);
    gw.ns.nft_load(
        "table ip wft_nat {\n chain post {\n  type nat hook postrouting priority 100;\n  \
         oifname \"lan0\" masquerade\n }\n}\n",
    );
}

/// `h` on the LAN as 10.20.2.<index>, forwarding into it.
fn wire_gateway(h: &Host, lan: &Netns) {
    join_lan(h, lan, "brlan", &format!("10.20.2.{}", h.index));
    run_ok(h.ns.cmd("sysctl").args(["-qw", "net.ipv4.ip_forward=1"]));
}

/// `h` as a gateway of the subnet: wired to the LAN, a check of the LAN host's service.
fn gateway(h: &Host, lan: &Netns, cp: &ControlPlane, priority: u32) {
    wire_gateway(h, lan);
    let advertise = format!(
        "\n[[control.advertise]]\nprefix = \"{SUBNET}\"\npriority = {priority}\n\
         check = \"tcp:{LAN_HOST}:{SERVICE_PORT}\"\ninterval_ms = {CHECK_INTERVAL_MS}\nfail_after = 2\n"
    );
    h.write_control_config_with(cp, &cp.routed_key_file(&format!("h{}", h.index), &[SUBNET]), &advertise);
}

impl Drop for GroupLab {
    fn drop(&mut self) {
        // A failed failover is a story told by the control plane's elections.
        if std::thread::panicking() {
            let log = self.cp.log();

            let story: Vec<&str> = log.lines().filter(|l| !l.contains(" DEBUG ")).collect();
            eprintln!("control plane log (without DEBUG):\n{}", story.join("\n"));
            for h in &self.lab.hosts {
                let wg = run(h.ns.cmd("wg").args(["show", &h.ifname]));
                eprintln!("h{} wg show:\n{}", h.index, String::from_utf8_lossy(&wg.stdout));
            }
        }
    }
}

impl GroupLab {
    /// The lab, its control plane started with `serve_args` (say a short
    /// `--route-hold-down`), all three agents running, h2 primary and the LAN reachable.
    pub fn start(serve_args: &[&str]) -> GroupLab {
        let lab = Lab::new(3);
        let cp = ControlPlane::start_with(&lab, serve_args);
        assert!(cp.apply_policy(POLICY).status.success());
        let lan = lan();
        let (h1, h2, h3) = (&lab.hosts[0], &lab.hosts[1], &lab.hosts[2]);
        gateway(h2, &lan, &cp, 200);
        gateway(h3, &lan, &cp, 100);
        h1.ns.ip(&["route", "add", "default", "via", CP_V4]);
        h1.ns.ip(&["-6", "route", "add", "default", "via", CP_V6]);
        h1.write_control_config_with(&cp, &cp.bound_key_file("h1", &[]), "accept_routes = [\"10.20.0.0/16\"]");
        let agents = [Some(h1.spawn_agent()), Some(h2.spawn_agent()), Some(h3.spawn_agent())];
        let g = GroupLab { agents, cp, lan, lab };
        // h2 may be primary for a moment before any member is healthy (the first pick), and
        // lose it to h3 if h3 connects first: only a healthy primary stays.
        wait_until("h2 is primary with both members healthy", Duration::from_secs(30), || {
            // Not found until h2 has enrolled.
            let shown = String::from_utf8_lossy(&g.cp.admin(&["nodes", "show", "h2"]).stdout).into_owned();
            shown.contains("primary h2 ") && shown.matches(", healthy)").count() == 2
        });
        // h1 may still be applying earlier versions (its WireGuard routed the subnet to h2
        // when h2 alone advertised it, then to h3): it must run its current view, and route
        // the subnet to h2 for a while, not only at one look.
        let mut since: Option<Instant> = None;
        wait_until("h1 in sync, routing the subnet to h2 for 1 s", Duration::from_secs(30), || {
            let shown: serde_json::Value =
                serde_json::from_str(&g.cp.admin_ok(&["nodes", "show", "h1", "--json"])).unwrap_or_default();
            match shown["sync"] == "in_sync" && g.routed_to(2) {
                true => since.get_or_insert_with(Instant::now).elapsed() >= Duration::from_secs(1),
                false => {
                    since = None;
                    false
                }
            }
        });
        g.until_reachable(Duration::from_secs(30));
        g
    }

    pub fn host(&self, i: usize) -> &Host {
        &self.lab.hosts[i - 1]
    }

    /// Whether h1's WireGuard routes the subnet to host `i`'s peer.
    pub fn routed_to(&self, i: usize) -> bool {
        let h1 = self.host(1);
        let out = run(h1.ns.cmd("wg").args(["show", &h1.ifname, "allowed-ips"]));
        let key = &self.host(i).public_key;
        String::from_utf8_lossy(&out.stdout).lines().any(|l| l.starts_with(key.as_str()) && l.contains(SUBNET))
    }

    /// One TCP exchange from h1 with the LAN host's service, within `timeout`.
    pub fn probe(&self, timeout: Duration) -> bool {
        let addr: SocketAddr = format!("{LAN_HOST}:{SERVICE_PORT}").parse().unwrap();
        connect(&self.host(1).ns, addr, timeout).is_some_and(|mut s| echoes(&mut s, timeout))
    }

    /// Probes every 100 ms until an exchange succeeds; how long that took (panics after
    /// `limit`).
    pub fn until_reachable(&self, limit: Duration) -> Duration {
        let start = Instant::now();
        while !self.probe(Duration::from_millis(100)) {
            assert!(start.elapsed() < limit, "{LAN_HOST}:{SERVICE_PORT} unreachable from h1 for {limit:?}");
        }
        start.elapsed()
    }

    /// Drops (or stops dropping) every UDP datagram host `i` sends or receives on its
    /// underlay: its tunnels die while its TCP connection to the control plane lives.
    pub fn block_tunnels(&self, i: usize, blocked: bool) {
        let ns = &self.host(i).ns;
        if blocked {
            ns.nft_load(
                "table inet wft_block {\n chain in {\n  type filter hook input priority 0;\n  \
                 iifname \"eth0\" meta l4proto udp drop\n }\n chain out {\n  \
                 type filter hook output priority 0;\n  oifname \"eth0\" meta l4proto udp drop\n }\n}\n",
            );
        } else {
            run_ok(ns.cmd("nft").args(["delete", "table", "inet", "wft_block"]));
        }
    }

    /// Gateway `i`'s machine dies without a word ([`Lab::reboot_host`]: its namespace goes
    /// with its agent, its tunnel and its LAN port) and boots to a bare namespace.
    pub fn crash(&mut self, i: usize) {
        // Its LAN port explicitly: a deleted namespace's links go only as the kernel gets
        // to it, and a rebooted gateway joins the LAN under the same port name.
        self.lan.ip(&["link", "del", &format!("lp{}", self.host(i).index)]);
        self.lab.reboot_host(i);
        // Killed with the namespace already; this only reaps it.
        drop(self.agents[i - 1].take());
    }

    /// Gateway `i` after [`GroupLab::crash`]: back on the LAN and its agent started on its
    /// kept state directory (the same node, no enrollment).
    pub fn boot(&mut self, i: usize) {
        wire_gateway(self.host(i), &self.lan);
        self.agents[i - 1] = Some(self.host(i).spawn_agent());
    }

    /// Just after h2 recovered (`what`): h3 keeps the subnet through most of the hold-down
    /// (10 s), then h2 takes it back and the LAN host answers.
    pub fn h2_back_after_the_hold_down(&self, what: &str) {
        let up = Instant::now();
        while up.elapsed() < Duration::from_secs(8) {
            assert!(self.routed_to(3), "h2 took the subnet back {:?} after it {what}", up.elapsed());
            std::thread::sleep(Duration::from_millis(200));
        }
        wait_until("h2 takes the subnet back after the hold-down", Duration::from_secs(30), || self.routed_to(2));
        self.until_reachable(Duration::from_secs(30));
    }

    /// Host `i`'s link to the LAN, down or up.
    pub fn lan_link(&self, i: usize, up: bool) {
        self.host(i).ns.ip(&["link", "set", "lan0", if up { "up" } else { "down" }]);
    }
}
