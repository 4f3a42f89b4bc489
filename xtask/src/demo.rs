//! `cargo xtask demo`: the main job on one machine. The control plane and three hosts in
//! network namespaces on a virtual switch, an agent on each in control mode (wireguard-go
//! underneath): enrollment, a policy file applied, pings crossing the tunnel, the ACL
//! allowing and denying, a policy push, a node removed, then everything torn down.

use std::process::Command;

use anyhow::{bail, Context};
use wirefence_tests::control::{ControlPlane, CP_PORT, CP_V4, CP_V6};
use wirefence_tests::{wait_until, Host, Lab};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Keep the mesh up until Enter is pressed (inspect it with `ip netns`, `wg show`).
    #[arg(long)]
    keep: bool,
}

fn step(msg: &str) {
    println!("\n==> {msg}");
}

fn show(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A policy: everyone pings everyone; `web_from` may open tcp/80 on node c.
fn policy(web_from: &[&str]) -> String {
    let from: Vec<String> = web_from.iter().map(|h| format!("\"node:{h}\"")).collect();
    format!(
        "[[rules]]\nid = \"ping\"\nfrom = [\"*\"]\nto = [\"*\"]\nproto = \"icmp\"\n\n\
         [[rules]]\nid = \"ping6\"\nfrom = [\"*\"]\nto = [\"*\"]\nproto = \"icmpv6\"\n\n\
         [[rules]]\nid = \"web\"\nfrom = [{}]\nto = [\"node:h3\"]\nproto = \"tcp\"\nports = [\"80\"]\n\n\
         [[tests]]\nfrom = \"h1\"\nto = \"h3\"\nproto = \"tcp\"\nport = 22\nexpect = \"deny\"\n",
        from.join(", ")
    )
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo creates network namespaces and needs root");
    }
    let bins = crate::workspace::Workspace::locate()?.build_bins(false)?;
    std::env::set_var("WIREFENCE_AGENT_BIN", &bins.agent);
    std::env::set_var("WIREFENCE_CONTROL_BIN", &bins.control);
    let secs = std::time::Duration::from_secs;

    step("three hosts in network namespaces, joined by a bridge (the underlay)");
    let lab = Lab::new(3);
    step("the control plane (wirefence-control serve: TLS, SQLite) on the bridge, IPv4 and IPv6");
    let cp = ControlPlane::start(&lab);
    println!("  listening on {CP_V4}:{CP_PORT} and [{CP_V6}]:{CP_PORT}; admin socket {}", cp.admin_socket().display());
    step("an enrollment key per host, bound to its name; each host gets a control-mode agent config (no peers, no rules) and starts");
    let mut agents = Vec::new();
    for h in &lab.hosts {
        h.write_bound_control_config(&cp, &["demo"]);
        agents.push(h.spawn_agent());
    }
    wait_until("three nodes enrolled", secs(20), || {
        serde_json::from_slice::<serde_json::Value>(&cp.admin(&["nodes", "list", "--json"]).stdout)
            .is_ok_and(|v| v.as_array().is_some_and(|a| a.len() == 3))
    });
    step("the operator applies a policy file (its [[tests]] must pass first): ping for all, h1 -> h3:80");
    // The operator's CLI, talking to the admin socket.
    let admin = |args: &[&str]| {
        let mut c = Command::new(&bins.control);
        c.arg("--admin-socket").arg(cp.admin_socket()).args(args);
        c
    };
    let policy_file = cp.dir.0.join("policy.toml");
    std::fs::write(&policy_file, policy(&["h1"]))?;
    print!("{}", std::fs::read_to_string(&policy_file)?);
    show(admin(&["policy", "apply"]).arg(&policy_file))?;
    show(&mut admin(&["nodes", "list"]))?;

    let addr = |h: &Host| cp.node_addresses(&format!("h{}", h.index));
    let (a, b, c) = (&lab.hosts[0], &lab.hosts[1], &lab.hosts[2]);
    step("traffic crosses the tunnel, IPv4 and IPv6, every pair");
    for (from, to) in [(a, b), (a, c), (b, c)] {
        let (v4, v6) = addr(to);
        wait_until(&format!("{} reaches {v4} and {v6}", from.ns.name), secs(20), || {
            from.ns.ping(&v4) && from.ns.ping(&v6)
        });
        println!("  h{} -> h{}: ok ({v4} and {v6})", from.index, to.index);
    }
    let (b4, _) = addr(b);
    show(a.ns.cmd("ping").args(["-c", "3", "-n", &b4]))?;

    let (c4, _) = addr(c);
    for port in [80u16, 22] {
        wirefence_tests::echo_server(&c.ns, format!("[::]:{port}").parse()?);
    }
    let verdicts = || -> anyhow::Result<()> {
        let short = std::time::Duration::from_millis(800);
        for (from, port) in [(a, 80u16), (a, 22), (b, 80)] {
            let sa: std::net::SocketAddr = format!("{c4}:{port}").parse()?;
            let verdict = match wirefence_tests::connect(&from.ns, sa, short) {
                Some(mut s) => match wirefence_tests::echoes(&mut s, short) {
                    true => "connected, reply came back",
                    false => "connected but no reply",
                },
                None => "DENIED",
            };
            println!("  h{} -> h3 {c4}:{port}: {verdict}", from.index);
        }
        Ok(())
    };
    step("the access policy, enforced by eBPF on every tunnel device: h1 may open h3:80, nothing else");
    wait_until("h1 reaches h3:80", secs(20), || {
        wirefence_tests::connect(&a.ns, format!("{c4}:80").parse().unwrap(), std::time::Duration::from_millis(500))
            .is_some()
    });
    verdicts()?;
    step("a policy push: h2 may open h3:80 too (lands on every affected agent within milliseconds)");
    std::fs::write(&policy_file, policy(&["h1", "h2"]))?;
    show(admin(&["policy", "apply"]).arg(&policy_file))?;
    wait_until("h2 reaches h3:80", secs(20), || {
        wirefence_tests::connect(&b.ns, format!("{c4}:80").parse().unwrap(), std::time::Duration::from_millis(500))
            .is_some()
    });
    verdicts()?;
    step("a policy file that fails its own tests is rejected with file:line; nothing changes");
    std::fs::write(&policy_file, policy(&["h1"]).replace("port = 22", "port = 80"))?;
    let out = admin(&["policy", "apply"]).arg(&policy_file).output()?;
    print!("  {}", String::from_utf8_lossy(&out.stderr));

    step("wirefence-agent status on h1 (peers, rule counters, denies at the source, control plane)");
    wait_until("denies recorded", secs(5), || {
        a.status_json()["policy"]["recent_denies"].as_array().is_some_and(|d| !d.is_empty())
    });
    show(a.agent().args(["status", "--config"]).arg(a.config_path()))?;

    step("node h1 removed at the control plane: it leaves every other node's device");
    show(&mut admin(&["nodes", "remove", "h1"]))?;
    wait_until("h1 cut off", secs(10), || !a.ns.ping(&c4));
    println!("  h1 -> h3: cut;  h2 -> h3: {}", if b.ns.ping(&c4) { "still up" } else { "DOWN" });

    if args.keep {
        step("mesh is up; press Enter to tear it down");
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
    }
    step("down: every owned object removed");
    drop(agents);
    for h in &lab.hosts {
        h.down();
        println!("  h{}: {}", h.index, if h.ns.link_exists(&h.ifname) { "LINK STILL THERE" } else { "clean" });
    }
    Ok(())
}
