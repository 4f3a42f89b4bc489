//! Flow records end to end: two agents in control mode (wireguard-go, the policy programs
//! loaded into the running kernel) and `wirefence-control serve`. One TCP connection is
//! reported by both ends, with its rule, and the control plane pairs the two records; a
//! connection the policy denies is reported by the end that dropped it; one an end did not
//! report is one-sided. A dry run of a
//! policy without the rule lists the flows it allowed and changes nothing on any node.

use std::net::SocketAddr;
use std::time::Duration;

use wirefence_tests::control::{enrolled, ControlPlane};
use wirefence_tests::*;

const T: Duration = Duration::from_secs(40);

fn sock(addr: &str, port: u16) -> SocketAddr {
    format!("{addr}:{port}").parse().unwrap()
}

const POLICY: &str =
    "[[rules]]\nid = \"web\"\nfrom = [\"node:h1\"]\nto = [\"node:h2\"]\nproto = \"tcp\"\nports = [\"80\"]\n";

/// Agents in control mode on every host of `lab`, each with the `[agent]` lines `agent`
/// gives it, once both are enrolled.
fn enrolled_with(lab: &Lab, cp: &ControlPlane, agent: impl Fn(&Host) -> String) -> Vec<AgentProc> {
    let agents = lab
        .hosts
        .iter()
        .map(|h| {
            h.write_bound_control_config(cp, &["server"]);
            let text = std::fs::read_to_string(h.config_path()).unwrap();
            assert!(text.contains("[agent]\n"), "no [agent] section to add to: {text}");
            h.write_config(&text.replacen("[agent]\n", &format!("[agent]\n{}", agent(h)), 1));
            h.spawn_agent()
        })
        .collect();
    wait_until("both enrolled", T, || cp.admin(&["nodes", "show", "h2"]).status.success());
    agents
}

/// Starts an echo server on h2:80, applies `policy` (`web` at least) and waits until h1's
/// connections to it pass; h2's IPv4 overlay address.
fn web_in_force(cp: &ControlPlane, h1: &Host, h2: &Host, policy: &str) -> String {
    echo_server(&h2.ns, sock("0.0.0.0", 80));
    let applied = cp.apply_policy(policy);
    assert!(applied.status.success(), "{}", String::from_utf8_lossy(&applied.stderr));
    let (h2_v4, _) = cp.node_addresses("h2");
    wait_until("h1 reaches h2:80", T, || {
        connect(&h1.ns, sock(&h2_v4, 80), Duration::from_millis(700))
            .is_some_and(|mut s| echoes(&mut s, Duration::from_millis(700)))
    });
    h2_v4
}

#[test]
fn one_connection_is_reported_by_both_ends_and_pairs() {
    let (lab, cp, _agents) = enrolled(2);
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    echo_server(&h2.ns, sock("0.0.0.0", 81));
    // One connection: wait until the policy lets it through, then make exactly one more
    // from a port of our own choosing, the one whose records are checked.
    let h2_v4 = web_in_force(&cp, h1, h2, POLICY);
    let (h1_v4, _) = cp.node_addresses("h1");
    let mut s = connect(&h1.ns, sock(&h2_v4, 80), Duration::from_secs(2)).expect("h1 -> h2:80");
    assert!(echoes(&mut s, Duration::from_secs(2)));
    let sport = s.local_addr().unwrap().port();
    assert!(connect(&h1.ns, sock(&h2_v4, 81), Duration::from_millis(700)).is_none(), "h1 -> h2:81 is denied");

    // Agents report on their 10 s statistics tick.
    let flows = || -> Vec<serde_json::Value> {
        let j: serde_json::Value = serde_json::from_str(&cp.admin_ok(&["flows", "--json"])).unwrap();
        j["flows"].as_array().unwrap().clone()
    };
    let of = |all: &[serde_json::Value], host: &str, port: u64| -> Vec<serde_json::Value> {
        all.iter().filter(|f| f["hostname"] == host && f["dst_port"] == port).cloned().collect()
    };
    wait_until("both ends reported the connection", T, || {
        let all = flows();
        of(&all, "h1", 80).iter().any(|f| f["src_port"] == sport)
            && of(&all, "h2", 80).iter().any(|f| f["src_port"] == sport)
    });
    let all = flows();
    let one = |host: &str| of(&all, host, 80).into_iter().find(|f| f["src_port"] == sport).unwrap();
    let (out, inn) = (one("h1"), one("h2"));
    for (f, direction, peer) in [(&out, "out", "h2"), (&inn, "in", "h1")] {
        assert_eq!(f["src"], h1_v4.as_str(), "{f}");
        assert_eq!(f["dst"], h2_v4.as_str(), "{f}");
        assert_eq!(f["direction"], direction, "{f}");
        assert_eq!(f["verdict"], "allow", "{f}");
        assert_eq!(f["rule_id"], "web", "the deciding rule, named: {f}");
        assert_eq!(f["pairing"], "paired", "{f}");
        assert_eq!(f["peer_hostname"], peer, "{f}");
    }
    // h1 dropped the connection to :81 on its way out (no rule allows it): its record says
    // so, and nothing is expected of h2.
    wait_until("h1 reported the denied connection", T, || {
        of(&flows(), "h1", 81).iter().any(|f| f["verdict"] == "deny" && f["pairing"] == "none-expected")
    });
    assert!(of(&flows(), "h2", 81).is_empty(), "h2 never saw it");
    // The text form names both ends.
    let table = cp.admin_ok(&["flows", "--node", "h2", "--verdict", "allow"]);
    assert!(table.contains(&format!("{h1_v4}:{sport}")) && table.contains("h1 paired"), "{table}");

    // A dry run of a file without `web`: the connections web allowed would be denied, the
    // denied one stays as it was; and nothing changes on any node.
    let applied_versions = || -> Vec<u64> {
        let j: serde_json::Value = serde_json::from_str(&cp.admin_ok(&["nodes", "list", "--json"])).unwrap();
        j.as_array().unwrap().iter().map(|n| n["applied_version"].as_u64().unwrap()).collect()
    };
    let before = applied_versions();
    let candidate = cp.dir.0.join("candidate.toml");
    std::fs::write(&candidate, POLICY.replace("id = \"web\"", "id = \"ssh\"").replace("\"80\"", "\"22\"")).unwrap();
    let dry = cp.admin_ok(&["policy", "apply", "--dry-run", "--json", candidate.to_str().unwrap()]);
    let j: serde_json::Value = serde_json::from_str(&dry).unwrap();
    let changes = j["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{j:#}");
    assert_eq!((changes[0]["old_rule"].as_str(), changes[0]["new_verdict"].as_str()), (Some("web"), Some("deny")));
    let flows = changes[0]["flows"].as_array().unwrap();
    assert_eq!(flows.len(), 1, "{j:#}");
    assert_eq!((flows[0]["dst"].as_str(), flows[0]["dst_port"].as_u64()), (Some(h2_v4.as_str()), Some(80)));
    assert!(flows[0]["connections"].as_u64().unwrap() >= 2, "the waits' connections and ours: {j:#}");
    let shown = cp.admin_ok(&["policy", "show"]);
    assert!(shown.contains("id = \"web\""), "the applied policy stays: {shown}");
    assert_eq!(applied_versions(), before);
    let mut s = connect(&h1.ns, sock(&h2_v4, 80), Duration::from_secs(2)).expect("h1 -> h2:80 after the dry run");
    assert!(echoes(&mut s, Duration::from_secs(2)));
}

/// A flow one end did not report (its agent stopped: the kernel still passes and counts
/// the packets, the events wait in the ring buffer) is one-sided; once that end reports,
/// it pairs (pairing is read, not stored).
#[test]
fn a_flow_one_end_did_not_report_is_one_sided_until_it_does() {
    let (lab, cp, agents) = enrolled(2);
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    let h2_v4 = web_in_force(&cp, h1, h2, POLICY);
    let h2_agent = i32::try_from(agents[1].pid()).unwrap();
    // SAFETY: kill has no memory preconditions; the pid is our own child's.
    assert_eq!(unsafe { libc::kill(h2_agent, libc::SIGSTOP) }, 0);
    let mut s = connect(&h1.ns, sock(&h2_v4, 80), Duration::from_secs(2)).expect("h1 -> h2:80");
    assert!(echoes(&mut s, Duration::from_secs(2)));
    let sport = s.local_addr().unwrap().port();
    let ours = |args: &[&str]| -> Vec<serde_json::Value> {
        let j: serde_json::Value = serde_json::from_str(&cp.admin_ok(args)).unwrap();
        j["flows"].as_array().unwrap().iter().filter(|f| f["src_port"] == sport).cloned().collect()
    };
    wait_until("h1 reported the connection", T, || !ours(&["flows", "--json", "--node", "h1"]).is_empty());
    let one_sided = ours(&["flows", "--json", "--one-sided"]);
    assert_eq!(one_sided.len(), 1, "{one_sided:?}");
    assert_eq!((one_sided[0]["hostname"].as_str(), one_sided[0]["peer_hostname"].as_str()), (Some("h1"), Some("h2")));

    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(h2_agent, libc::SIGCONT) }, 0);
    wait_until("h2 reported it too", T, || {
        let all = ours(&["flows", "--json"]);
        all.len() == 2 && all.iter().all(|f| f["pairing"] == "paired")
    });
    assert!(ours(&["flows", "--json", "--one-sided"]).is_empty());
}

/// `[agent] flow_log`: the agent writes each flow event as a JSON line, with the deciding
/// rule, into a file only root reads.
#[test]
fn a_flow_log_holds_each_event_as_a_json_line() {
    use std::os::unix::fs::PermissionsExt;
    let lab = Lab::new(2);
    let cp = ControlPlane::start(&lab);
    let log = lab.hosts[0].dir.join("flows.jsonl");
    let agents = enrolled_with(&lab, &cp, |h| match h.index {
        1 => format!("flow_log = \"{}\"\n", log.display()),
        _ => String::new(),
    });
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    let h2_v4 = web_in_force(&cp, h1, h2, POLICY);
    assert!(connect(&h1.ns, sock(&h2_v4, 81), Duration::from_millis(700)).is_none(), "h1 -> h2:81 is denied");
    let lines = || -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
    };
    let to = |l: &serde_json::Value, port: u64, verdict: &str| {
        l["dport"] == port && l["verdict"] == verdict && l["dst"] == h2_v4.as_str()
    };
    wait_until("the allowed and the denied connection logged", T, || {
        let all = lines();
        all.iter().any(|l| to(l, 80, "allow")) && all.iter().any(|l| to(l, 81, "deny"))
    });
    let all = lines();
    let allowed = all.iter().find(|l| to(l, 80, "allow")).unwrap();
    assert_eq!((allowed["rule"].as_str(), allowed["direction"].as_str()), (Some("web"), Some("out")), "{allowed}");
    assert_eq!(std::fs::metadata(&log).unwrap().permissions().mode() & 0o777, 0o600);
    drop(agents);
}

/// A flow's end: a connection that carried a known amount and was reset (its entry lives
/// 10 s after the RST) is swept by both agents (resyncing every 2 s here, so they sweep
/// soon after), and each end's record of it gets what it carried, both directions; h1's
/// flow log has the end's line with the same counts.
#[test]
fn an_ended_flow_has_its_packets_and_bytes_on_both_ends_records() {
    use std::io::{Read, Write};
    const PAYLOAD: usize = 3000;
    let lab = Lab::new(2);
    let cp = ControlPlane::start(&lab);
    let log = lab.hosts[0].dir.join("flows.jsonl");
    let agents = enrolled_with(&lab, &cp, |h| match h.index {
        1 => format!("resync_interval_secs = 2\nflow_log = \"{}\"\n", log.display()),
        _ => "resync_interval_secs = 2\n".into(),
    });
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    let h2_v4 = web_in_force(&cp, h1, h2, POLICY);
    let mut s = connect(&h1.ns, sock(&h2_v4, 80), Duration::from_secs(2)).expect("h1 -> h2:80");
    let sport = s.local_addr().unwrap().port();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let sent: Vec<u8> = (0..PAYLOAD).map(|i| i as u8).collect();
    s.write_all(&sent).unwrap();
    let mut back = vec![0u8; PAYLOAD];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, sent);
    // A reset, not a FIN: the entry then lives 10 s, not 120.
    socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
    drop(s);

    let ended = || -> Vec<serde_json::Value> {
        let j: serde_json::Value = serde_json::from_str(&cp.admin_ok(&["flows", "--json"])).unwrap();
        let all = j["flows"].as_array().unwrap().clone();
        all.into_iter().filter(|f| f["src_port"] == sport && f["dst_port"] == 80 && f["ended"] == true).collect()
    };
    wait_until("both ends reported the flow's end", Duration::from_secs(60), || ended().len() == 2);
    let records = ended();
    for f in &records {
        let (packets, bytes) = (f["packets"].as_u64().unwrap(), f["bytes"].as_u64().unwrap());
        // The payload both ways with its TCP/IP headers, the handshake and the reset: at
        // least 2 x 3000 bytes in 8 packets, and no more than a few dozen packets' headers.
        assert!((8..40).contains(&packets), "{f}");
        assert!(bytes >= 2 * PAYLOAD as u64 && bytes < 2 * PAYLOAD as u64 + 60 * packets, "{f}");
        assert_eq!((f["rule_id"].as_str(), f["pairing"].as_str()), (Some("web"), Some("paired")), "{f}");
    }
    // One record per end: the end went on the start's record.
    let of = |host: &str| -> usize {
        let j: serde_json::Value = serde_json::from_str(&cp.admin_ok(&["flows", "--json", "--node", host])).unwrap();
        j["flows"].as_array().unwrap().iter().filter(|f| f["src_port"] == sport && f["dst_port"] == 80).count()
    };
    assert_eq!((of("h1"), of("h2")), (1, 1));
    let table = cp.admin_ok(&["flows", "--node", "h1", "--verdict", "allow"]);
    let h1_counts = records.iter().find(|f| f["hostname"] == "h1").unwrap();
    let row = table.lines().find(|l| l.contains(&format!(":{sport}"))).unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains(&h1_counts["bytes"].to_string()), "the table shows the bytes: {row}");

    let logged: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|l: &serde_json::Value| l["sport"] == sport && l.get("packets").is_some())
        .collect();
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert_eq!((&logged[0]["packets"], &logged[0]["bytes"]), (&h1_counts["packets"], &h1_counts["bytes"]));
    drop(agents);
}

/// `policy show --usage`: the nodes' rule counters summed. Five echo requests from h1 to h2
/// under `ping` are counted four times each (h1 out, h2 in, the reply out of h2 and into
/// h1); `ssh` matched nothing.
#[test]
fn rule_usage_counts_the_packets_sent_and_names_unused_rules() {
    let (lab, cp, _agents) = enrolled(2);
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    let ping = "[[rules]]\nid = \"ping\"\nfrom = [\"node:h1\"]\nto = [\"node:h2\"]\nproto = \"icmp\"\n";
    let ssh = "[[rules]]\nid = \"ssh\"\nfrom = [\"node:h1\"]\nto = [\"node:h2\"]\nproto = \"tcp\"\nports = [\"22\"]\n";
    // In force once a connection passes (under `web`: no packet under `ping` before ours).
    let h2_v4 = web_in_force(&cp, h1, h2, &format!("{POLICY}{ping}{ssh}"));
    let out = run(h1.ns.cmd("ping").args(["-c", "5", "-i", "0.2", "-W", "2", "-n", "-q", &h2_v4]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));

    let usage = || -> serde_json::Value {
        serde_json::from_str(&cp.admin_ok(&["policy", "show", "--usage", "--since", "10m", "--json"])).unwrap()
    };
    let packets = |u: &serde_json::Value, id: &str| -> u64 {
        let rules = u["rules"].as_array().unwrap();
        rules.iter().find(|r| r["rule_id"] == id).unwrap()["packets"].as_u64().unwrap()
    };
    // Agents report on their 10 s statistics tick, both of them.
    wait_until("both nodes' counts of the pings", T, || packets(&usage(), "ping") >= 20);
    std::thread::sleep(Duration::from_secs(11));
    let u = usage();
    assert_eq!(packets(&u, "ping"), 20, "{u:#}");
    assert!(packets(&u, "web") > 0, "{u:#}");
    assert_eq!(u["unused"], serde_json::json!(["ssh"]), "{u:#}");
    let text = cp.admin_ok(&["policy", "show", "--usage"]);
    assert!(text.contains("1 rule matched nothing: ssh"), "{text}");
}

/// A running `trace` on h1: what it printed (JSON lines) once stopped with SIGTERM.
struct Trace {
    child: std::process::Child,
    stdout: std::thread::JoinHandle<Vec<serde_json::Value>>,
}

impl Trace {
    /// Starts `trace --json ARGS` on `host` and waits until it says it traces.
    fn start(host: &Host, args: &[&str]) -> Trace {
        use std::io::BufRead;
        let mut child = host
            .agent()
            .args(["trace", "--json", "--config"])
            .arg(host.config_path())
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn trace");
        let out = child.stdout.take().unwrap();
        let stdout = std::thread::spawn(move || {
            std::io::BufReader::new(out)
                .lines()
                .map(|l| serde_json::from_str(&l.unwrap()).expect("a JSON line"))
                .collect()
        });
        let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        err.read_line(&mut line).unwrap();
        assert!(line.starts_with("tracing "), "trace did not start: {line}");
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
        Trace { child, stdout }
    }

    fn stop(mut self) -> Vec<serde_json::Value> {
        // SAFETY: kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) }, 0);
        let status = self.child.wait().unwrap();
        assert!(status.success(), "trace exited with {status}");
        self.stdout.join().unwrap()
    }
}

/// `wirefence-agent trace` on h1 while h1 connects to h2: the SYN to :80 passes as a new
/// flow under `web`, later packets of it as established, and the SYNs to :81 are dropped
/// with no rule; h2's answers are not shown (the filter names h2 as destination). One
/// tracer at a time; one killed before it could disarm leaves the way free.
#[test]
fn trace_shows_the_deciding_rule_of_an_allowed_and_a_denied_packet() {
    let (lab, cp, _agents) = enrolled(2);
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    let h2_v4 = web_in_force(&cp, h1, h2, POLICY);

    // A tracer killed -9 leaves its filter armed: the next one takes over all the same.
    let orphan = Trace::start(h1, &["--dst", &h2_v4]);
    let mut child = orphan.child;
    child.kill().unwrap();
    child.wait().unwrap();

    let trace = Trace::start(h1, &["--dst", &h2_v4, "--proto", "tcp"]);
    let busy = run(h1.agent().args(["trace", "--config"]).arg(h1.config_path()));
    let text = String::from_utf8_lossy(&busy.stderr);
    assert!(!busy.status.success() && text.contains("runs already"), "a second tracer: {text}");

    let mut s = connect(&h1.ns, sock(&h2_v4, 80), Duration::from_secs(2)).expect("h1 -> h2:80");
    assert!(echoes(&mut s, Duration::from_secs(2)));
    let sport = s.local_addr().unwrap().port();
    drop(s);
    assert!(connect(&h1.ns, sock(&h2_v4, 81), Duration::from_millis(700)).is_none(), "h1 -> h2:81 is denied");
    let lines = trace.stop();

    let of = |port: u64| -> Vec<&serde_json::Value> { lines.iter().filter(|l| l["dport"] == port).collect() };
    let web: Vec<_> = of(80).into_iter().filter(|l| l["sport"] == sport).collect();
    let syn = web.first().unwrap_or_else(|| panic!("no packet of the connection traced: {lines:#?}"));
    assert_eq!(
        (&syn["path"], &syn["allowed"], &syn["rule"], &syn["tcp_flags"], &syn["direction"]),
        (&"new".into(), &true.into(), &"web".into(), &"S".into(), &"out".into()),
        "{syn}"
    );
    assert!(
        web[1..].iter().all(|l| l["allowed"] == true
            && l["rule"] == "web"
            && ["conntrack", "flow-cache"].contains(&l["path"].as_str().unwrap())),
        "the rest of the connection passes as established under web: {web:#?}"
    );
    assert!(web.len() >= 3, "SYN, ACK, data at least: {web:#?}");
    let denied = of(81);
    assert!(!denied.is_empty(), "the SYNs to :81: {lines:#?}");
    for l in &denied {
        assert_eq!(
            (&l["path"], &l["allowed"], &l["rule"]),
            (&"new".into(), &false.into(), &serde_json::Value::Null),
            "{l}"
        );
    }
    assert!(
        lines.iter().all(|l| l["dst"] == h2_v4.as_str() && l["proto"] == 6),
        "only the filter's packets: {lines:#?}"
    );

    // Stopped, it disarmed: a new trace starts at once. With --count it ends by itself.
    let mut counted = Trace::start(h1, &["--dst", &h2_v4, "--count", "1"]);
    let mut s = connect(&h1.ns, sock(&h2_v4, 80), Duration::from_secs(2)).expect("h1 -> h2:80");
    assert!(echoes(&mut s, Duration::from_secs(2)));
    wait_until("trace --count 1 ends by itself", T, || counted.child.try_wait().unwrap().is_some());
    assert!(counted.child.wait().unwrap().success());
    assert_eq!(counted.stdout.join().unwrap().len(), 1);

    // What matches nothing, or is no filter, is refused before anything is armed.
    for (args, says) in [
        (&["--src", "10.0.0.1", "--dst", "fd00::1"][..], "different address families"),
        (&["--proto", "icmp", "--port", "8"], "has no ports"),
        (&["--proto", "any"], "leave --proto out"),
        (&["--src", "10.0.0.300"], "neither an address nor a prefix"),
    ] {
        let out = run(h1.agent().args(["trace", "--config"]).arg(h1.config_path()).args(args));
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && text.contains(says), "trace {args:?}: {text}");
    }
    Trace::start(h1, &[]).stop();
}
