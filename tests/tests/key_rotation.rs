//! A node's identity on a new key pair, with the reference control plane and wireguard-go:
//! key rotation (`wirefence-agent rotate-key`), which connections survive and which ends
//! with one key on every side however it is interrupted (control plane down, agent killed);
//! and re-enrollment of a node that lost its key and state (`nodes reenroll`).

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use wirefence_tests::control::{enrolled, wg_peers, ControlPlane};
use wirefence_tests::*;

const T: Duration = Duration::from_secs(30);

const POLICY: &str = "[[rules]]\nid = \"ping\"\nfrom = [\"*\"]\nto = [\"*\"]\nproto = \"icmp\"\n\n\
    [[rules]]\nid = \"web\"\nfrom = [\"node:h1\"]\nto = [\"node:h2\"]\nproto = \"tcp\"\nports = [\"80\"]\n";

fn rotate_key(h: &Host, wait_secs: u64) -> std::process::Command {
    let mut c = h.agent();
    c.args(["rotate-key", "--wait-secs", &wait_secs.to_string(), "--config"]).arg(h.config_path());
    c
}

/// The tunnel's public key as the kernel (here wireguard-go) has it.
fn device_key(h: &Host) -> String {
    run_ok(h.ns.cmd("wg").args(["show", &h.ifname, "public-key"])).trim().to_owned()
}

/// The public key the control plane has for `node`.
fn cp_key(cp: &ControlPlane, node: &str) -> String {
    let shown = cp.admin_ok(&["nodes", "show", node]);
    let line = shown.lines().find_map(|l| l.strip_prefix("public key:")).expect("a public key line");
    line.trim().to_owned()
}

/// The public key of the host's private key file.
fn file_key(h: &Host) -> String {
    use std::io::Write;
    let private = std::fs::read(h.dir.join("private.key")).unwrap();
    let mut wg = std::process::Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("wg pubkey");
    wg.stdin.take().unwrap().write_all(&private).unwrap();
    String::from_utf8(wg.wait_with_output().unwrap().stdout).unwrap().trim().to_owned()
}

/// h2 has one key everywhere: its key file, its device, the control plane, h1's peer list;
/// no next key waits; and h1 reaches it.
fn one_key_everywhere(cp: &ControlPlane, h1: &Host, h2: &Host, h2_v4: &str) -> Option<String> {
    let key = device_key(h2);
    let consistent = file_key(h2) == key
        && cp_key(cp, "h2") == key
        && wg_peers(h1) == vec![key.clone()]
        && !h2.dir.join("private.key.next").exists()
        && h1.ns.ping(h2_v4);
    consistent.then_some(key)
}

/// The longest run of lost replies of `ping -i 0.01` output, in ms (10 ms per request).
fn longest_gap_ms(ping_output: &str) -> u64 {
    let seqs: Vec<u64> = ping_output
        .lines()
        .filter_map(|l| l.split("icmp_seq=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(seqs.len() > 100, "too few replies: {ping_output}");
    seqs.windows(2).map(|w| w[1].saturating_sub(w[0]) * 10).max().unwrap_or(0)
}

#[test]
fn a_key_rotates_under_a_live_tcp_stream_and_a_10ms_ping() {
    let (lab, cp, agents) = enrolled(2);
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    assert!(cp.apply_policy(POLICY).status.success());
    let (h2_v4, _) = cp.node_addresses("h2");
    let web: SocketAddr = format!("{h2_v4}:80").parse().unwrap();
    wait_until("h1 pings h2", T, || h1.ns.ping(&h2_v4));
    echo_server(&h2.ns, web);
    wait_until("h1 reaches h2:80", T, || connect(&h1.ns, web, Duration::from_secs(1)).is_some());
    let mut stream = connect(&h1.ns, web, Duration::from_secs(2)).expect("a TCP stream h1 -> h2:80");
    assert!(echoes(&mut stream, Duration::from_secs(2)));
    let old = device_key(h2);
    assert_eq!(old, h2.public_key);

    let ping = h1
        .ns
        .cmd("ping")
        .args(["-n", "-D", "-i", "0.01", "-w", "8", &h2_v4])
        .stdout(Stdio::piped())
        .spawn()
        .expect("ping");
    std::thread::sleep(Duration::from_millis(1500));
    let out = run(&mut rotate_key(h2, 5));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let ping = ping.wait_with_output().expect("ping output");
    let ping = String::from_utf8_lossy(&ping.stdout);
    let gap = longest_gap_ms(&ping);
    eprintln!("key rotation: longest ping gap {gap} ms");
    if gap >= 1000 {
        // What each side did when: the ping's timestamps against the agents' logs.
        eprintln!("{ping}\n== h1\n{}\n== h2\n{}", agents[0].log_text(), agents[1].log_text());
    }
    assert!(gap < 1000, "the rotation interrupted a 10 ms ping for {gap} ms");

    let new = device_key(h2);
    assert_ne!(new, old);
    assert!(stdout.contains(&format!("the node's key is {new} now")), "{stdout}");
    assert_eq!(one_key_everywhere(&cp, h1, h2, &h2_v4).as_deref(), Some(new.as_str()));
    assert!(echoes(&mut stream, Duration::from_secs(2)), "the TCP stream did not survive the rotation");
    let status = run_ok(h2.agent().args(["status", "--config"]).arg(h2.config_path()));
    assert!(status.contains(&format!("public key: {new} (key made ")), "{status}");
}

#[test]
fn an_interrupted_rotation_converges_to_one_key_on_every_side() {
    let (lab, mut cp, mut agents) = enrolled(2);
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    assert!(cp.apply_policy(POLICY).status.success());
    let (h2_v4, _) = cp.node_addresses("h2");
    wait_until("h1 pings h2", T, || h1.ns.ping(&h2_v4));

    // The control plane is down: the rotation waits, the old key keeps working.
    cp.kill();
    let out = run(&mut rotate_key(h2, 3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("has not finished"), "{stderr}");
    let status = run_ok(h2.agent().args(["status", "--config"]).arg(h2.config_path()));
    assert!(status.contains("key rotation in progress: next key "), "{status}");
    assert!(h1.ns.ping(&h2_v4), "the old key stopped working before the control plane took the new one");
    assert_eq!(device_key(h2), h2.public_key);
    cp.restart();
    wait_until("the rotation finishes once the control plane is back", T, || {
        one_key_everywhere(&cp, h1, h2, &h2_v4).is_some_and(|k| k != h2.public_key)
    });

    // The agent killed at points along a rotation: from the moment its next key exists
    // (`rotate-key` asked for it), then started again.
    let next = h2.dir.join("private.key.next");
    for delay_ms in [0, 5, 10, 20, 40] {
        let mut asked = rotate_key(h2, 10).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let started = std::time::Instant::now();
        while !next.exists() && started.elapsed() < T {
            std::thread::sleep(Duration::from_micros(200));
        }
        assert!(next.exists(), "rotate-key made no next key");
        std::thread::sleep(Duration::from_millis(delay_ms));
        agents.remove(1).kill9();
        let _ = asked.kill();
        let _ = asked.wait();
        agents.push(h2.spawn_agent());
        // It holds the lock (so it handles the signal, as `rotate-key` assumes).
        let pid = agents[1].pid();
        let holds = || h2.status_json()["agent_pid"] == pid;
        let deadline = std::time::Instant::now() + T;
        while !holds() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let running = agents[1].running();
        assert!(
            holds(),
            "the restarted agent (running: {running}) does not hold its lock; the log:\n{}",
            agents[1].log_text()
        );
        wait_until(&format!("one key everywhere after a kill {delay_ms} ms into a rotation"), T, || {
            one_key_everywhere(&cp, h1, h2, &h2_v4).is_some()
        });
    }
}

#[test]
fn a_node_that_lost_its_state_reenrolls_at_its_address_with_an_admins_key() {
    let (lab, cp, mut agents) = enrolled(2);
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    assert!(cp.apply_policy(POLICY).status.success());
    let (h2_v4, h2_v6) = cp.node_addresses("h2");
    wait_until("h1 pings h2", T, || h1.ns.ping(&h2_v4));

    // h2 loses everything: the agent, the tunnel, the private key and the state directory.
    agents.remove(1).kill9();
    run_ok(h2.agent().args(["down", "--config"]).arg(h2.config_path()));
    std::fs::remove_file(h2.dir.join("private.key")).unwrap();
    std::fs::remove_dir_all(h2.dir.join("state")).unwrap();
    // Its used enrollment key enrolls nobody again; the admin's re-enrollment key does.
    let key = cp.reenroll_key_file("h2");
    h2.write_control_config(&cp, &key);
    agents.push(h2.spawn_agent());
    wait_until("h1 pings h2 at its old address", T, || h1.ns.ping(&h2_v4));

    let new = device_key(h2);
    assert_ne!(new, h2.public_key);
    assert_eq!(cp.node_addresses("h2"), (h2_v4, h2_v6));
    assert_eq!(cp_key(&cp, "h2"), new);
    assert_eq!(wg_peers(h1), vec![new]);
    let nodes: serde_json::Value = serde_json::from_str(&cp.admin_ok(&["nodes", "list", "--all", "--json"])).unwrap();
    assert_eq!(nodes.as_array().map(Vec::len), Some(2), "a second node appeared: {nodes:#}");
}
