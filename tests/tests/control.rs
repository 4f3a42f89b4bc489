//! End to end with the reference control plane: `wirefence-control serve` (TLS, SQLite) in
//! the lab's switch namespace, agents in control mode on wireguard-go, enrollment, policy
//! pushes changing what crosses the tunnel, node removal, outages and restarts.

use std::net::SocketAddr;
use std::time::Duration;

use wirefence_tests::control::{enrolled, enrolled_with_keys, wg_peers, ControlPlane};
use wirefence_tests::*;

const T: Duration = Duration::from_secs(20);
const SHORT: Duration = Duration::from_millis(700);

fn sock(addr: &str, port: u16) -> SocketAddr {
    format!("{}:{port}", if addr.contains(':') { format!("[{addr}]") } else { addr.to_owned() }).parse().unwrap()
}

/// Pings among all nodes, plus tcp/80 from the `web_from` nodes to h2; the file's tests
/// check h1's access as the operator expects it.
fn policy(web_from: &[&str]) -> String {
    let from: Vec<String> = web_from.iter().map(|h| format!("\"node:{h}\"")).collect();
    let web = match from.is_empty() {
        true => String::new(),
        false => format!(
            "[[rules]]\nid = \"web\"\nfrom = [{}]\nto = [\"node:h2\"]\nproto = \"tcp\"\nports = [\"80\"]\n\n",
            from.join(", ")
        ),
    };
    let expect = if web_from.contains(&"h1") { "allow" } else { "deny" };
    format!(
        "[[rules]]\nid = \"ping\"\nfrom = [\"*\"]\nto = [\"*\"]\nproto = \"icmp\"\n\n\
         [[rules]]\nid = \"ping6\"\nfrom = [\"*\"]\nto = [\"*\"]\nproto = \"icmpv6\"\n\n{web}\
         [[tests]]\nfrom = \"h1\"\nto = \"h2\"\nproto = \"tcp\"\nport = 80\nexpect = \"{expect}\"\n\n\
         [[tests]]\nfrom = \"h1\"\nto = \"h2\"\nproto = \"tcp\"\nport = 81\nexpect = \"deny\"\n"
    )
}

/// No secret of any host (private key, enrollment key, credential) in any log, at debug level.
fn assert_no_secrets_logged(lab: &Lab, cp: &ControlPlane, agents: &[AgentProc], key_files: &[std::path::PathBuf]) {
    let mut secrets: Vec<String> =
        key_files.iter().map(|k| std::fs::read_to_string(k).unwrap().trim().to_owned()).collect();
    for h in &lab.hosts {
        secrets.push(std::fs::read_to_string(h.dir.join("private.key")).unwrap().trim().to_owned());
        let cred: serde_json::Value =
            serde_json::from_slice(&std::fs::read(h.dir.join("state/control/credential.json")).unwrap()).unwrap();
        let cred = cred["credential"].as_str().unwrap().to_owned();
        // The part after the node id is the secret.
        secrets.push(cred.split_once('.').map_or(cred.clone(), |(_, s)| s.to_owned()));
    }
    let logs: Vec<String> = std::iter::once(cp.log()).chain(agents.iter().map(|a| a.log_text())).collect();
    assert!(logs.iter().all(|l| !l.is_empty()), "every log has lines");
    for s in &secrets {
        assert!(s.len() >= 16, "a secret this short is not a secret: {s:?}");
        assert!(logs.iter().all(|l| !l.contains(s.as_str())), "a secret appears in a log");
    }
}

fn tcp_echoes(from: &Host, to: SocketAddr) -> bool {
    connect(&from.ns, to, SHORT).is_some_and(|mut s| echoes(&mut s, SHORT))
}

#[test]
fn enrollment_mesh_policy_pushes_and_node_removal() {
    let (lab, cp, agents, key_files) = enrolled_with_keys(3);
    let (h1, h2, h3) = (&lab.hosts[0], &lab.hosts[1], &lab.hosts[2]);
    for port in [80, 81] {
        echo_server(&h2.ns, sock("::", port));
    }
    let applied = cp.apply_policy(&policy(&["h1"]));
    assert!(applied.status.success(), "policy apply: {}", String::from_utf8_lossy(&applied.stderr));
    let (h2_v4, h2_v6) = cp.node_addresses("h2");

    wait_until("h1 pings h2 over IPv4 and IPv6 in the tunnel", T, || h1.ns.ping(&h2_v4) && h1.ns.ping(&h2_v6));
    wait_until("h3 pings h2", T, || h3.ns.ping(&h2_v4));
    wait_until("h1 reaches h2:80", T, || tcp_echoes(h1, sock(&h2_v4, 80)));
    assert!(tcp_echoes(h1, sock(&h2_v6, 80)), "h1 reaches h2:80 over IPv6");
    assert!(!tcp_echoes(h1, sock(&h2_v4, 81)), "h1 -> h2:81 is not allowed");
    assert!(!tcp_echoes(h3, sock(&h2_v4, 80)), "h3 -> h2:80 is not allowed yet");

    // Every agent reports the version it applied; the control plane sees the same.
    let version = |h: &Host| h.control_status()["applied_version"].as_u64().unwrap_or(0);
    wait_until("agents report their applied version", T, || {
        let v: serde_json::Value = serde_json::from_str(&cp.admin_ok(&["nodes", "show", "h2", "--json"])).unwrap();
        v["applied_version"].as_u64() == Some(version(h2)) && version(h2) > 0
    });

    // A policy push opens h3 -> h2:80.
    assert!(cp.apply_policy(&policy(&["h1", "h3"])).status.success());
    wait_until("h3 reaches h2:80 after the push", T, || tcp_echoes(h3, sock(&h2_v4, 80)));

    // A rejected policy file names the line and changes nothing anywhere.
    let bad = cp
        .apply_policy(&format!("[[rules]]\nid = \"x\"\nfrom = [\"group:nope\"]\nto = [\"*\"]\n\n{}", policy(&["h1"])));
    assert!(!bad.status.success(), "a policy with an unknown group must be rejected");
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("policy.toml:") && err.contains("nope"), "{err}");
    std::thread::sleep(SHORT);
    assert!(tcp_echoes(h3, sock(&h2_v4, 80)), "the running policy stays after a rejected file");

    // Removing h3 takes it out of every other node's device and cuts it off.
    let h3_key = h3.public_key.clone();
    assert!(wg_peers(h2).contains(&h3_key));
    cp.admin_ok(&["nodes", "remove", "h3"]);
    wait_until("h3 is gone from h1 and h2", T, || !wg_peers(h1).contains(&h3_key) && !wg_peers(h2).contains(&h3_key));
    assert!(!h3.ns.ping(&h2_v4), "a removed node is cut off");
    wait_until("the removed agent is refused", T, || agents[2].log_text().contains("PermissionDenied"));
    // It says an operator must act and retries slowly, not every few seconds.
    wait_until("status says operator action needed", T, || {
        h3.control_status()["action_needed"].as_str().is_some_and(|s| s.contains("removed"))
    });
    let text = run_ok(h3.agent().args(["status", "--config"]).arg(h3.config_path()));
    assert!(text.contains("  operator action needed: PermissionDenied: "), "{text}");
    // Every attempt logs one of these.
    let attempts = || {
        let log = agents[2].log_text();
        log.matches("operator action needed").count() + log.matches("control plane session ended").count()
    };
    let before = attempts();
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(attempts(), before, "a refused node retried within 5 s");
    assert!(h1.ns.ping(&h2_v4), "the others keep talking");
    assert_no_secrets_logged(&lab, &cp, &agents, &key_files);
    // The removed node can still leave: the rest is done here.
    let out = run(h3.agent().args(["leave", "--config"]).arg(h3.config_path()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("removed by the control plane already"), "{stdout}");
    assert!(!h3.ns.link_exists(&h3.ifname) && !h3.dir.join("state/control").exists());
}

#[test]
fn outages_and_restarts_keep_the_data_plane_and_resync() {
    let (lab, mut cp, mut agents) = enrolled(2);
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    echo_server(&h2.ns, sock("::", 80));
    assert!(cp.apply_policy(&policy(&[])).status.success());
    let (h2_v4, _) = cp.node_addresses("h2");
    wait_until("h1 pings h2", T, || h1.ns.ping(&h2_v4));
    assert!(!tcp_echoes(h1, sock(&h2_v4, 80)), "web is not allowed yet");

    // Control plane down: the data plane is untouched.
    cp.kill();
    std::thread::sleep(Duration::from_secs(1));
    assert!(h1.ns.ping(&h2_v4), "traffic flows while the control plane is down");

    // h2's agent dies and its interface is removed; restarted while the control plane is
    // still down, it comes up from its saved view: the tunnel and the policy are back.
    agents.pop().unwrap().kill9();
    h2.down();
    assert!(!h2.ns.link_exists(&h2.ifname));
    agents.push(h2.spawn_agent());
    wait_until("h2 is back from its saved view", T, || h1.ns.ping(&h2_v4));
    assert!(!tcp_echoes(h1, sock(&h2_v4, 80)), "the saved policy is enforced, not an open device");

    // The control plane comes back on the same database: agents resync and a new policy lands.
    cp.restart();
    assert!(cp.apply_policy(&policy(&["h1"])).status.success());
    wait_until("h1 reaches h2:80 after the control plane's restart", T, || tcp_echoes(h1, sock(&h2_v4, 80)));
    // The server certificate's expiry, per address family: h1 reaches the control plane over
    // IPv4, h2 over IPv6; `certs init` issues it for a year.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    for (h, family) in [(h1, "ipv4"), (h2, "ipv6")] {
        let st = h.control_status();
        let expiry = st[format!("cert_expiry_{family}")].as_i64().unwrap_or(0);
        assert!((now + 360 * 86_400..now + 366 * 86_400).contains(&expiry), "h{}: {st}", h.index);
        let connected = st["connected_to"].as_str().unwrap_or_default();
        assert_eq!(connected.starts_with('['), family == "ipv6", "h{}: {st}", h.index);
    }
}

/// One pinging rule per id.
fn rules(ids: &[&str]) -> String {
    ids.iter()
        .map(|id| format!("[[rules]]\nid = \"{id}\"\nfrom = [\"*\"]\nto = [\"*\"]\nproto = \"icmp\"\n\n"))
        .collect()
}

/// The rule ids the agent counts for, from `status --json` (those of the enforced policy,
/// plus for a while those of the one before); none while the agent is still pinning its maps
/// (`status` fails then).
fn enforced_rules(h: &Host) -> Vec<String> {
    let out = run(h.agent().args(["status", "--json", "--config"]).arg(h.config_path()));
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    st["policy"]["counters"]["rules"].as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default()
}

#[test]
fn a_recreated_database_is_taken_whole_even_when_its_versions_meet_the_agents() {
    let (lab, mut cp, mut agents, key_files) = enrolled_with_keys(1);
    let h1 = &lab.hosts[0];
    // Enrollment was version 2; two policies make it 4.
    assert!(cp.apply_policy(&rules(&["old-a"])).status.success());
    assert!(cp.apply_policy(&rules(&["old-b"])).status.success());
    wait_until("h1 applies version 4 (old-b)", T, || {
        enforced_rules(h1).contains(&"old-b".into()) && h1.control_status()["applied_version"] == 4
    });

    // The database is recreated while the agent is down. The new one reaches version 3 with
    // its own policies; the agent's enrollment into it makes 4, the version the agent holds.
    agents.pop().unwrap().kill9();
    cp.kill();
    for f in ["control.db", "control.db-wal", "control.db-shm"] {
        let _ = std::fs::remove_file(cp.dir.0.join(f));
    }
    cp.restart();
    assert!(cp.apply_policy(&rules(&["new-a"])).status.success());
    assert!(cp.apply_policy(&rules(&["new-b"])).status.success());
    // The old credential is unknown now. Enrolling anew is the operator's decision: remove
    // the credential and hand the agent a key of the new database (bound to its name).
    std::fs::remove_file(h1.dir.join("state/control/credential.json")).unwrap();
    std::fs::copy(cp.bound_key_file(&h1.control_hostname(), &["server"]), &key_files[0]).unwrap();
    agents.push(h1.spawn_agent());
    wait_until("h1 takes the new database's policy", T, || enforced_rules(h1).contains(&"new-b".into()));
    assert_eq!(h1.control_status()["applied_version"], 4, "the versions met, as the test intends");
}

/// A gateway advertising a route its grant does not cover keeps its control plane and its
/// granted routes, before and after a restart; both sides say what was refused and why; an
/// admin's grant brings the route into effect, and a revoke takes it away, with no restart.
#[test]
fn a_route_outside_the_grant_is_refused_not_the_gateway() {
    let lab = Lab::new(2);
    let cp = ControlPlane::start(&lab);
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    assert!(cp
        .apply_policy(
            "[[rules]]\nid = \"lan\"\nfrom = [\"node:h2\"]\nto = [\"10.20.2.0/24\", \"10.30.0.0/24\"]\nproto = \"icmp\"\n"
        )
        .status
        .success());
    let key = cp.routed_key_file("h1", &["10.20.2.0/24"]);
    h1.write_control_config(&cp, &key);
    let text = std::fs::read_to_string(h1.config_path()).unwrap();
    h1.write_config(&format!("{text}advertise_routes = [\"10.20.2.0/24\", \"10.30.0.0/24\"]\n"));
    h2.write_bound_control_config(&cp, &[]);
    std::fs::write(
        h2.config_path(),
        format!("{}accept_routes = [\"10.0.0.0/8\"]\n", std::fs::read_to_string(h2.config_path()).unwrap()),
    )
    .unwrap();
    let _a2 = h2.spawn_agent();
    let a1 = h1.spawn_agent();

    let granted =
        || h2.ns.owned_routes(PROTO).iter().any(|r| r.starts_with("10.20.2.0/24 ") && !r.ends_with("unreachable"));
    wait_until("h2 routes h1's granted subnet to it", T, granted);
    assert!(
        !h2.ns.owned_routes(PROTO).iter().any(|r| r.starts_with("10.30.0.0/24 ") && !r.ends_with("unreachable")),
        "h2 routes the refused subnet: {:?}",
        h2.ns.owned_routes(PROTO)
    );
    let refused = |h: &Host| h.control_status()["refused_routes"].clone();
    wait_until("h1's status names the refused route", T, || refused(h1).to_string().contains("10.30.0.0/24"));
    assert!(refused(h1)[0].as_str().unwrap().contains("is not within the routes granted to this node (10.20.2.0/24"));
    let text = run_ok(h1.agent().args(["status", "--config"]).arg(h1.config_path()));
    assert!(text.contains("route refused by the control plane: 10.30.0.0/24"), "{text}");
    let show = cp.admin_ok(&["nodes", "show", "h1"]);
    assert!(show.contains("routes:          10.20.2.0/24") && show.contains("refused route:   10.30.0.0/24"), "{show}");

    // A restart registers again with the same routes: still connected, same outcome (the
    // log holds both runs).
    a1.kill9();
    let a1 = h1.spawn_agent();
    wait_until("h1 registers again after its restart", T, || {
        a1.log_text().matches("connected to the control plane").count() >= 2
    });
    assert!(h1.control_status()["connected_to"].is_string(), "{}", h1.control_status());
    assert!(granted(), "the granted route survived the restart");

    // The operator grants the subnet: it comes into effect without h1 registering or
    // restarting, and h1's status stops naming it (its view says so).
    let pid = a1.pid();
    let out = cp.admin_ok(&["nodes", "routes", "h1", "--grant", "10.30.0.0/16"]);
    assert!(out.contains("routes:          10.20.2.0/24, 10.30.0.0/24"), "{out}");
    wait_until("h2 routes the newly granted subnet to h1", T, || {
        h2.ns.owned_routes(PROTO).iter().any(|r| r.starts_with("10.30.0.0/24 ") && !r.ends_with("unreachable"))
    });
    wait_until("h1's status no longer names a refused route", T, || {
        refused(h1).as_array().is_some_and(|a| a.is_empty())
    });
    // Revoked: the subnet goes from h2's routes, and h1's status names it again.
    cp.admin_ok(&["nodes", "routes", "h1", "--revoke", "10.30.0.0/16"]);
    wait_until("h2 stops routing the revoked subnet", T, || {
        !h2.ns.owned_routes(PROTO).iter().any(|r| r.starts_with("10.30.0.0/24 ") && !r.ends_with("unreachable"))
    });
    wait_until("h1's status names the refused route again", T, || refused(h1).to_string().contains("10.30.0.0/24"));
    assert_eq!(a1.pid(), pid, "the agent kept running");
    let e = cp.admin(&["nodes", "routes", "h1", "--revoke", "10.30.0.0/16"]);
    assert!(!e.status.success() && String::from_utf8_lossy(&e.stderr).contains("is not granted to node"));

    // The operator stops advertising the refused subnet: a reload, no restart, and both
    // sides stop naming it.
    let text = std::fs::read_to_string(h1.config_path()).unwrap();
    h1.write_config(
        &text.replace(
            "advertise_routes = [\"10.20.2.0/24\", \"10.30.0.0/24\"]",
            "advertise_routes = [\"10.20.2.0/24\"]",
        ),
    );
    wait_until("h1's reload clears the refusal", T, || refused(h1).as_array().is_some_and(|a| a.is_empty()));
    assert!(!cp.admin_ok(&["nodes", "show", "h1"]).contains("refused route"));
    assert_eq!(a1.pid(), pid, "a reload, not a restart");
    assert!(a1.log_text().contains("registered again with the reloaded endpoints and routes"));
    assert!(granted());
}

#[test]
fn leave_stops_the_agent_tells_the_control_plane_and_forgets_the_node() {
    let (lab, cp, mut agents) = enrolled(2);
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    assert!(cp.apply_policy(&policy(&[])).status.success());
    let (h2_v4, _) = cp.node_addresses("h2");
    wait_until("h1 pings h2", T, || h1.ns.ping(&h2_v4));
    let leave = || run(h2.agent().args(["leave", "--config"]).arg(h2.config_path()));

    // With the agent running: it is stopped first, then the rest.
    let out = leave();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("stopping the running agent") && stdout.contains("left the mesh"), "{stdout}");
    assert!(!agents[1].running(), "the agent still runs after leave");
    assert!(!h2.ns.link_exists(&h2.ifname), "the tunnel is still there");
    assert!(!h2.dir.join("state/control").exists(), "the credential and the view are still there");
    // The control plane removed it: out of h1's view, kept as removed.
    wait_until("h2 is gone from h1's device", T, || !wg_peers(h1).contains(&h2.public_key));
    assert!(cp.admin_ok(&["nodes", "show", "h2"]).contains("removed:         yes"));

    // Again: nothing left to tell or remove, and it says so.
    let out = leave();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("never joined"));
}

#[test]
fn an_admins_tag_and_hostname_edits_change_what_crosses_without_the_node_enrolling_again() {
    let (lab, cp, mut agents) = enrolled(2);
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    for port in [80, 81] {
        echo_server(&h2.ns, sock("::", port));
    }
    let rules = "[[rules]]\nid = \"ping\"\nfrom = [\"*\"]\nto = [\"*\"]\nproto = \"icmp\"\n\n\
                 [[rules]]\nid = \"web\"\nfrom = [\"tag:web\"]\nto = [\"node:h2\"]\nproto = \"tcp\"\nports = [\"80\"]\n\n\
                 [[rules]]\nid = \"admin\"\nfrom = [\"node:ops1\"]\nto = [\"node:h2\"]\nproto = \"tcp\"\nports = [\"81\"]\n";
    assert!(cp.apply_policy(rules).status.success());
    let (h2_v4, _) = cp.node_addresses("h2");
    wait_until("h1 pings h2", T, || h1.ns.ping(&h2_v4));
    assert!(!tcp_echoes(h1, sock(&h2_v4, 80)) && !tcp_echoes(h1, sock(&h2_v4, 81)), "h1 has neither tag nor name yet");
    let pid = agents[0].pid();

    cp.admin_ok(&["nodes", "set", "h1", "--tag", "web"]);
    wait_until("h1 reaches h2:80 with the tag web", T, || tcp_echoes(h1, sock(&h2_v4, 80)));
    assert!(!tcp_echoes(h1, sock(&h2_v4, 81)));
    cp.admin_ok(&["nodes", "set", "h1", "--hostname", "ops1"]);
    wait_until("h1 reaches h2:81 as ops1", T, || tcp_echoes(h1, sock(&h2_v4, 81)));
    cp.admin_ok(&["nodes", "set", "ops1", "--no-tags"]);
    wait_until("h1 loses h2:80 with the tag", T, || !tcp_echoes(h1, sock(&h2_v4, 80)));
    assert!(tcp_echoes(h1, sock(&h2_v4, 81)), "the name stays when the tags go");

    // The same agent process and node throughout; it keeps registering with its own name.
    assert!(agents[0].running() && agents[0].pid() == pid);
    let shown = cp.admin_ok(&["nodes", "show", "ops1"]);
    assert!(shown.contains(&format!("public key:      {}", h1.public_key)), "{shown}");
    assert_eq!(h1.control_status()["action_needed"], serde_json::Value::Null);
}
