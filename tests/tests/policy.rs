//! The access policy over the real tunnel: agents with a [policy] section, wireguard-go,
//! TCP through the overlay; the classifiers run on the tunnel devices.

use std::net::SocketAddr;
use std::time::Duration;

use wirefence_tests::*;

const T: Duration = Duration::from_secs(15);
const SHORT: Duration = Duration::from_millis(700);

fn sock(addr: &str, port: u16) -> SocketAddr {
    format!("{}:{port}", if addr.contains(':') { format!("[{addr}]") } else { addr.to_owned() }).parse().unwrap()
}

/// `[policy]` with these rules, pinned under the test bpffs (`<root>/<ifname>/`).
fn policy(_host: &Host, rules: &str) -> String {
    format!("[policy]\npin_dir = \"{}\"\n{rules}", bpffs_root().display())
}

fn web_rules(a: &Host, b: &Host, ports: &[&str]) -> String {
    let ports: Vec<String> = ports.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        "[[policy.rules]]\nid = \"web\"\nfrom = [\"{}/32\", \"{}/128\"]\nto = [\"{}/32\", \"{}/128\"]\nproto = \"tcp\"\nports = [{}]\n",
        a.overlay_v4,
        a.overlay_v6,
        b.overlay_v4,
        b.overlay_v6,
        ports.join(", ")
    )
}

/// Programs named `name` on the device, as the kernel lists them (tcx).
fn tcx_programs(host: &Host, name: &'static str) -> usize {
    let ifname = host.ifname.clone();
    in_netns(&host.ns, move || {
        let mut n = 0;
        for ty in [aya::programs::TcAttachType::Ingress, aya::programs::TcAttachType::Egress] {
            let (_, progs) = aya::programs::SchedClassifier::query_tcx(&ifname, ty).expect("query tcx");
            n += progs.iter().filter(|p| p.name_as_str() == Some(name)).count();
        }
        n
    })
}

/// Two hosts; b enforces "a may reach b on tcp `ports`"; echo servers on b's 80, 81, 8080.
fn lab_with_policy(ports: &[&str]) -> Lab {
    let lab = Lab::new(2);
    let (a, b) = (&lab.hosts[0], &lab.hosts[1]);
    a.config().peer(b).write();
    b.config().peer(a).extra(&policy(b, &web_rules(a, b, ports))).write();
    // Dual-stack wildcard sockets: the overlay addresses appear only once the agent runs.
    for port in [80, 81, 8080] {
        echo_server(&b.ns, sock("::", port));
    }
    lab
}

#[test]
fn allowed_port_connects_denied_port_does_not_and_replies_pass() {
    let lab = lab_with_policy(&["80"]);
    let (a, b) = (&lab.hosts[0], &lab.hosts[1]);
    let _pa = a.spawn_agent();
    let _pb = b.spawn_agent();
    for addr in [&b.overlay_v4, &b.overlay_v6] {
        wait_until(&format!("{addr}:80 connects"), T, || connect(&a.ns, sock(addr, 80), SHORT).is_some());
        let mut s = connect(&a.ns, sock(addr, 80), SHORT).unwrap();
        assert!(echoes(&mut s, SHORT), "reply traffic of an allowed flow did not pass");
        assert!(connect(&a.ns, sock(addr, 81), SHORT).is_none(), "denied port {addr}:81 connected");
    }
    // Not allowed: the other direction (b -> a is no rule's business, and a has no policy,
    // but b's egress filter denies b's new flows).
    assert!(!b.ns.ping(&a.overlay_v4), "b's new flow to a passed b's egress filter");
    assert!(!b.ns.ping(&a.overlay_v6), "b's new flow to a passed b's egress filter");

    let st = b.status_json();
    let web = &st["policy"]["counters"]["rules"]["web"];
    assert!(web["packets"].as_u64().unwrap() > 0, "{st}");
    assert!(st["policy"]["counters"]["stats"]["denied"]["packets"].as_u64().unwrap() > 0, "{st}");
    wait_until("the denied connection in status", T, || {
        b.status_json()["policy"]["recent_denies"].as_array().is_some_and(|d| d.iter().any(|r| r["dport"] == 81))
    });
    // As text: an IPv6 address before a port in brackets, ICMP by its type (the echo's
    // identifier, which the flow keeps as a port, is not shown as one).
    let v6_port = format!("-> [{}]:81 tcp", b.overlay_v6);
    let pings = [format!("-> {} icmp echo-request", a.overlay_v4), format!("-> {} icmpv6 echo-request", a.overlay_v6)];
    wait_until("the denies as status shows them", T, || {
        let text = run_ok(b.agent().args(["status", "--config"]).arg(b.config_path()));
        text.contains(&v6_port) && pings.iter().all(|p| text.contains(p.as_str()))
    });
    // The program sent the type and code it judged an echo request by (8 << 8, 128 << 8).
    let denies = b.status_json()["policy"]["recent_denies"].clone();
    let judged =
        |proto: u8, port: u16| denies.as_array().unwrap().iter().any(|r| r["proto"] == proto && r["port"] == port);
    assert!(judged(1, 8 << 8) && judged(58, 128 << 8) && judged(6, 81), "{denies}");
    // The router solicitations and MLD reports the kernel sends on the tunnel's link-local
    // address are dropped, but are no denies to show.
    let link_local = |r: &serde_json::Value| r["src"].as_str().is_some_and(|s| s.starts_with("fe80") || s == "::");
    assert!(!denies.as_array().unwrap().iter().any(link_local), "{denies}");
    let out = run_ok(b.agent().args(["policy", "check", "--config"]).arg(b.config_path()).args([
        &a.overlay_v4,
        &b.overlay_v4,
        "tcp/80",
    ]));
    assert!(out.contains("allow") && out.contains("web"), "{out}");
}

#[test]
fn policy_change_keeps_allowed_established_flows_and_cuts_the_rest() {
    let lab = lab_with_policy(&["80", "8080"]);
    let (a, b) = (&lab.hosts[0], &lab.hosts[1]);
    let _pa = a.spawn_agent();
    let _pb = b.spawn_agent();
    wait_until("port 80 connects", T, || connect(&a.ns, sock(&b.overlay_v4, 80), SHORT).is_some());
    let mut kept = connect(&a.ns, sock(&b.overlay_v4, 80), SHORT).unwrap();
    let mut cut = connect(&a.ns, sock(&b.overlay_v4, 8080), SHORT).expect("8080 allowed at first");
    assert!(echoes(&mut kept, SHORT) && echoes(&mut cut, SHORT));

    let epoch = b.status_json()["policy"]["epoch"].as_u64().unwrap();
    // The new rule has another id: "web" is no rule of the policy any more.
    let rules = web_rules(a, b, &["80"]).replace("id = \"web\"", "id = \"web-80\"");
    b.config().peer(a).extra(&policy(b, &rules)).write();
    wait_until("new policy live", T, || b.status_json()["policy"]["epoch"].as_u64().unwrap() > epoch);
    assert!(echoes(&mut kept, SHORT), "an established flow the new policy still allows was dropped");
    assert!(!echoes(&mut cut, SHORT), "an established flow the new policy forbids still passes");
    assert!(connect(&a.ns, sock(&b.overlay_v4, 8080), SHORT).is_none());
    // Only the current rules' counters are the rule counters; the old one is apart.
    let st = b.status_json();
    let rules: Vec<&String> = st["policy"]["counters"]["rules"].as_object().unwrap().keys().collect();
    assert_eq!(rules, ["web-80"], "{st}");
    assert!(st["policy"]["retired_rules"]["web"]["packets"].as_u64().unwrap() > 0, "{st}");
    let text = run_ok(b.agent().args(["status", "--config"]).arg(b.config_path()));
    assert!(text.contains("  rules of the previous policy:\n    rule web: "), "{text}");
}

#[test]
fn enforcement_survives_kill9_and_restart_attaches_no_second_copy() {
    let lab = lab_with_policy(&["80"]);
    let (a, b) = (&lab.hosts[0], &lab.hosts[1]);
    let _pa = a.spawn_agent();
    let pb = b.spawn_agent();
    wait_until("port 80 connects", T, || connect(&a.ns, sock(&b.overlay_v4, 80), SHORT).is_some());
    assert_eq!(tcx_programs(b, "wf_ingress") + tcx_programs(b, "wf_egress"), 2);
    pb.kill9();

    assert!(connect(&a.ns, sock(&b.overlay_v4, 81), SHORT).is_none(), "denied after the agent died");
    assert!(connect(&a.ns, sock(&b.overlay_v4, 80), SHORT).is_some(), "allowed flow broke when the agent died");

    let pb = b.spawn_agent();
    wait_until("restarted agent converged", T, || pb.log_text().contains("converged"));
    assert_eq!(tcx_programs(b, "wf_ingress"), 1, "second copy attached on ingress");
    assert_eq!(tcx_programs(b, "wf_egress"), 1, "second copy attached on egress");
    assert!(connect(&a.ns, sock(&b.overlay_v4, 81), SHORT).is_none());
    assert!(connect(&a.ns, sock(&b.overlay_v4, 80), SHORT).is_some());

    // down removes programs, pins and maps.
    drop(pb);
    b.down();
    let dir = bpffs_root().join(&b.ifname);
    let left: Vec<_> =
        std::fs::read_dir(&dir).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(!dir.exists(), "pins left behind by down in {}: {left:?}", dir.display());
}

#[test]
fn icmp_packet_too_big_of_an_allowed_flow_passes() {
    // a -tunnel- b -veth (mtu 1280)- c: b forwards a's pings to c and must tell a the
    // path MTU; the error crosses b's egress and a's ingress filters.
    let lab = Lab::new(2);
    let (a, b) = (&lab.hosts[0], &lab.hosts[1]);
    let c = Netns::new("c");
    let tag = unique();
    let (bc, cb) = (format!("bc{tag}"), format!("cb{tag}"));
    ip(&["link", "add", &bc, "mtu", "1280", "type", "veth", "peer", "name", &cb, "mtu", "1280"]);
    ip(&["link", "set", &bc, "netns", &b.ns.name]);
    ip(&["link", "set", &cb, "netns", &c.name]);
    b.ns.ip(&["addr", "add", "10.99.0.1/24", "dev", &bc]);
    b.ns.ip(&["link", "set", &bc, "up"]);
    c.ip(&["addr", "add", "10.99.0.2/24", "dev", &cb]);
    c.ip(&["link", "set", &cb, "up"]);
    c.ip(&["route", "add", "default", "via", "10.99.0.1"]);
    run_ok(b.ns.cmd("sysctl").args(["-qw", "net.ipv4.ip_forward=1"]));

    let icmp = |from: &str| {
        format!(
            "[[policy.rules]]\nid = \"ping-c\"\nfrom = [\"{from}/32\"]\nto = [\"10.99.0.0/24\"]\nproto = \"icmp\"\n"
        )
    };
    a.config()
        .peer_with(b, &[&format!("{}/32", b.overlay_v4), "10.99.0.0/24"])
        .extra(&policy(a, &icmp(&a.overlay_v4)))
        .write();
    b.config().peer(a).extra(&policy(b, &icmp(&a.overlay_v4))).write();
    let _pa = a.spawn_agent();
    let _pb = b.spawn_agent();
    wait_until("a pings c through b", T, || a.ns.ping("10.99.0.2"));

    // A 1400-byte ping with DF set does not fit c's link: b answers "fragmentation needed".
    let _ = run(a.ns.cmd("ping").args(["-c", "1", "-W", "1", "-M", "do", "-s", "1300", "10.99.0.2"]));
    let route = a.ns.ip(&["route", "get", "10.99.0.2"]);
    assert!(route.contains("mtu 1280"), "a did not learn the path MTU (the ICMP error was dropped): {route}");
    let st = a.status_json();
    assert!(st["policy"]["counters"]["stats"]["allowed_established"]["packets"].as_u64().unwrap() > 0, "{st}");
}

/// What `status` must never change: the generation word, the prefix lengths of both
/// generations, the pin directory's entries, and every state file (content and mtime).
fn untouched_by_status(host: &Host) -> (String, String, Vec<String>, Vec<String>) {
    use aya::maps::{Array, MapData};
    use wirefence_common as common;
    let dir = bpffs_root().join(&host.ifname);
    let pinned = |name| wirefence_agent::bpf::from_pin(&wirefence_agent::enforce::pin_path(&dir, name), name).unwrap();
    let state: Array<MapData, common::PolicyState> = Array::try_from(pinned(common::STATE)).unwrap();
    let lens: Array<MapData, common::ClassLens> = Array::try_from(pinned(common::CLASS_LENS)).unwrap();
    let lens: Vec<_> = (0..common::CLASS_LENS_ENTRIES).map(|i| lens.get(&i, 0).unwrap().bits).collect();
    let mut pins: Vec<String> =
        std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    pins.sort();
    let mut files = Vec::new();
    for e in std::fs::read_dir(host.dir.join("state")).unwrap().flatten() {
        let meta = e.metadata().unwrap();
        let content = if meta.is_file() { std::fs::read(e.path()).unwrap() } else { Vec::new() };
        files.push(format!("{:?} {:?} {content:?}", e.file_name(), meta.modified().unwrap()));
    }
    files.sort();
    (format!("{:?}", state.get(&0, 0).unwrap()), format!("{lens:?}"), pins, files)
}

#[test]
fn status_reads_the_pins_without_writing_and_across_builds() {
    let lab = lab_with_policy(&["80"]);
    let (a, b) = (&lab.hosts[0], &lab.hosts[1]);
    a.run_once_ok();
    b.run_once_ok();
    wait_until("port 80 connects", T, || connect(&a.ns, sock(&b.overlay_v4, 80), SHORT).is_some());
    let before = untouched_by_status(b);
    let st = b.status_json();
    assert!(st["policy"]["counters"]["rules"]["web"]["packets"].as_u64().unwrap() > 0, "{st}");
    assert!(st["policy"].get("other_build").is_none(), "this build's pins reported as another's: {st}");
    assert_eq!(untouched_by_status(b), before, "status changed the pinned maps or the state directory");

    // Pins recorded as another build's: status still reads them, and says so.
    std::fs::write(b.dir.join(format!("state/{}.ebpf-build", b.ifname)), "0123456789abcdef\n").unwrap();
    let before = untouched_by_status(b);
    let st = b.status_json();
    assert_eq!(st["policy"]["other_build"], "0123456789abcdef", "{st}");
    assert!(st["policy"]["epoch"].is_u64() && st["policy"]["attached"] == true, "{st}");
    assert!(st["policy"]["counters"]["rules"]["web"]["packets"].as_u64().unwrap() > 0, "{st}");
    let text = run_ok(b.agent().args(["status", "--config"]).arg(b.config_path()));
    assert!(text.contains("pinned by another wirefence build (0123456789abcdef"), "{text}");
    assert_eq!(untouched_by_status(b), before, "status changed the pinned maps or the state directory");
}
