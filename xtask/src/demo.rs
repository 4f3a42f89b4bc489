//! `cargo xtask demo`: the main job on one machine. Three hosts in network namespaces on a
//! virtual switch, an agent on each (wireguard-go underneath), a full mesh; shows pings and
//! an iperf3 run crossing the tunnel and each agent's status, then tears it all down.

use std::process::Command;

use anyhow::{bail, Context};
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

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo creates network namespaces and needs root");
    }
    let agent = crate::workspace::Workspace::locate()?.build_agent(false)?;
    std::env::set_var("WIREFENCE_AGENT_BIN", agent);

    step("three hosts in network namespaces, joined by a bridge (the underlay)");
    let lab = Lab::new(3);
    for h in &lab.hosts {
        println!(
            "  {}  underlay {}  overlay {} / {}  tunnel {}",
            h.ns.name, h.underlay_v4, h.overlay_v4, h.overlay_v6, h.ifname
        );
    }
    step("each host gets an agent config listing the other two as peers; agents start");
    let (a, b, c) = (&lab.hosts[0], &lab.hosts[1], &lab.hosts[2]);
    // c enforces an access policy (eBPF on its tunnel device): a may reach c's web port,
    // everyone may ping c, nothing else gets in.
    let acl = format!(
        "[policy]\npin_dir = \"{}\"\n\
         [[policy.rules]]\nid = \"a-to-web\"\nfrom = [\"{}/32\", \"{}/128\"]\nto = [\"self\"]\nproto = \"tcp\"\nports = [\"80\"]\n\
         [[policy.rules]]\nid = \"ping\"\nfrom = [\"10.77.0.0/24\"]\nto = [\"self\"]\nproto = \"icmp\"\n\
         [[policy.rules]]\nid = \"ping6\"\nfrom = [\"fd77::/64\"]\nto = [\"self\"]\nproto = \"icmpv6\"\n",
        wirefence_tests::bpffs_root().display(),
        a.overlay_v4,
        a.overlay_v6,
    );
    let mut agents = Vec::new();
    for h in &lab.hosts {
        let mut cfg = h.config();
        for other in lab.hosts.iter().filter(|o| o.index != h.index) {
            cfg = cfg.peer(other);
        }
        if h.index == c.index {
            cfg = cfg.extra(&acl);
        }
        cfg.write();
        agents.push(h.spawn_agent());
    }
    let reach = |from: &Host, to: &str| {
        wait_until(&format!("{} reaches {to}", from.ns.name), std::time::Duration::from_secs(20), || from.ns.ping(to))
    };
    step("traffic crosses the tunnel, IPv4 and IPv6, every pair");
    for (from, to) in [(a, b), (a, c), (b, c)] {
        reach(from, &to.overlay_v4);
        reach(from, &to.overlay_v6);
        println!("  {} -> {}: ok ({} and {})", from.ns.name, to.ns.name, to.overlay_v4, to.overlay_v6);
    }
    show(a.ns.cmd("ping").args(["-c", "3", "-n", &b.overlay_v4]))?;

    step("iperf3 through the tunnel (wireguard-go in userspace)");
    let mut server =
        b.ns.cmd("iperf3").args(["-s", "-1", "-B", &b.overlay_v4]).stdout(std::process::Stdio::null()).spawn()?;
    wait_until("iperf3 server listening", std::time::Duration::from_secs(10), || {
        b.ns.cmd("ss").args(["-Hltn", "sport = :5201"]).output().is_ok_and(|o| !o.stdout.is_empty())
    });
    let iperf = show(a.ns.cmd("iperf3").args(["-c", &b.overlay_v4, "-t", "3", "-f", "m"]));
    let _ = server.kill();
    let _ = server.wait();
    iperf?;

    step(&format!(
        "the access policy on {} (eBPF on its tunnel device): a may open tcp/80, nobody else anything but ping",
        c.ns.name
    ));
    for port in [80u16, 22] {
        wirefence_tests::echo_server(&c.ns, format!("[::]:{port}").parse()?);
    }
    let short = std::time::Duration::from_millis(800);
    for (from, port) in [(a, 80u16), (a, 22), (b, 80)] {
        let addr: std::net::SocketAddr = format!("{}:{port}", c.overlay_v4).parse()?;
        let verdict = match wirefence_tests::connect(&from.ns, addr, short) {
            Some(mut s) => match wirefence_tests::echoes(&mut s, short) {
                true => "connected, reply came back",
                false => "connected but no reply",
            },
            None => "DENIED",
        };
        println!("  {} -> {}:{port}: {verdict}", from.ns.name, c.overlay_v4);
    }
    println!("  wirefence-agent policy check {} {} tcp/80 (on {}):", b.overlay_v4, c.overlay_v4, c.ns.name);
    show(c.agent().args(["policy", "check", "--config"]).arg(c.config_path()).args([
        &b.overlay_v4,
        &c.overlay_v4,
        "tcp/80",
    ]))?;

    step(&format!("wirefence-agent status on {} (rule counters, recent denies)", c.ns.name));
    wait_until("denies recorded", std::time::Duration::from_secs(5), || {
        c.status_json()["policy"]["recent_denies"].as_array().is_some_and(|d| !d.is_empty())
    });
    show(c.agent().args(["status", "--config"]).arg(c.config_path()))?;

    step("a peer removed from one config: that pair is cut, the rest stays up");
    a.config().peer(b).write();
    wait_until("c unreachable from a", std::time::Duration::from_secs(10), || !a.ns.ping(&c.overlay_v4));
    println!(
        "  {} -> {}: cut;  {} -> {}: {}",
        a.ns.name,
        c.ns.name,
        a.ns.name,
        b.ns.name,
        if a.ns.ping(&b.overlay_v4) { "still up" } else { "DOWN" }
    );

    if args.keep {
        step("mesh is up; press Enter to tear it down");
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
    }
    step("down: every owned object removed");
    drop(agents);
    for h in &lab.hosts {
        h.down();
        println!("  {}: {}", h.ns.name, if h.ns.link_exists(&h.ifname) { "LINK STILL THERE" } else { "clean" });
    }
    Ok(())
}
