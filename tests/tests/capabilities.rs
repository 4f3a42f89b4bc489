//! The agent's capability set: as an unprivileged user holding exactly [`CAPS`] (no others
//! in any set, no way to gain more), it brings up its tunnel, attaches the policy, enforces
//! it and answers `status`; without any one of them it does not converge. So the set is
//! sufficient and minimal.
//!
//! The layout is the unit's: the pin root's parent is root's and only searchable by others
//! (as the unit leaves /sys/fs/bpf: `chmod go+x`), the pin root, state directory, key and
//! config are the agent user's. The userspace backend's wireguard-go needs a writable
//! /run/wireguard: the agent gets a directory of its own there (the unit's RuntimeDirectory).
//! The kernel backend's capability needs are the same (CAP_NET_ADMIN for generic netlink).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use wirefence_tests::*;

/// What the unit grants: keep in step with packaging/agent/wirefence-agent.service
/// (`AmbientCapabilities=`), which the test reads to make sure.
const CAPS: &[&str] = &["net_admin", "bpf", "perfmon"];

/// The packaged unit's user (`User=wirefence`), created here as the package's sysusers
/// file does: a system account with no login.
fn service_user() -> (u32, u32) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if run(Command::new("id").arg("wirefence")).status.success() {
            return;
        }
        run_ok(Command::new("useradd").args([
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            "wirefence",
        ]));
    });
    let id = |flag: &str| run_ok(Command::new("id").args([flag, "wirefence"])).trim().parse::<u32>().unwrap();
    (id("-u"), id("-g"))
}

const T: Duration = Duration::from_secs(20);
const SHORT: Duration = Duration::from_millis(700);

fn sock(addr: &str, port: u16) -> std::net::SocketAddr {
    format!("{}:{port}", if addr.contains(':') { format!("[{addr}]") } else { addr.to_owned() }).parse().unwrap()
}

/// `setpriv` arguments: become the service user with exactly `caps` (bounding, inheritable, ambient:
/// execve then makes them the agent's permitted and effective set) and no new privileges.
fn setpriv(caps: &[&str]) -> Vec<String> {
    let list: String = caps.iter().map(|c| format!(",+{c}")).collect();
    let (uid, gid) = service_user();
    vec![
        "setpriv".into(),
        format!("--reuid={uid}"),
        format!("--regid={gid}"),
        "--clear-groups".into(),
        format!("--inh-caps=-all{list}"),
        format!("--ambient-caps=-all{list}"),
        format!("--bounding-set=-all{list}"),
        "--no-new-privs".into(),
        "--".into(),
    ]
}

fn chown(path: &Path) {
    let (uid, gid) = service_user();
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}

/// The host's files made the agent user's, and a pin root below a root-owned directory
/// others may only search; removed on drop.
struct Unprivileged {
    pins: PathBuf,
}

impl Unprivileged {
    fn new(host: &Host) -> Unprivileged {
        let parent = bpffs_root().join(format!("cap-{}", unique()));
        std::fs::create_dir(&parent).unwrap();
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o711)).unwrap();
        let pins = parent.join("wirefence");
        std::fs::create_dir(&pins).unwrap();
        std::fs::set_permissions(&pins, std::fs::Permissions::from_mode(0o700)).unwrap();
        chown(&pins);
        for p in [host.dir.clone(), host.dir.join("private.key")] {
            chown(&p);
        }
        Unprivileged { pins }
    }
}

impl Drop for Unprivileged {
    fn drop(&mut self) {
        // Pins are plain files on the bpffs: removing them drops the kernel's references.
        let parent = self.pins.parent().unwrap().to_owned();
        let _ = run(Command::new("rm").arg("-rf").arg(&parent));
    }
}

/// The agent daemon in `host`'s namespace as the service user with `caps`, with its own directory on
/// /run/wireguard (`ip netns exec` has already given it a mount namespace of its own).
fn spawn(host: &Host, caps: &[&str]) -> (Child, PathBuf) {
    let log = host.dir.join(format!("agent-{}.log", unique()));
    let f = std::fs::File::create(&log).unwrap();
    // /dev/net/tun is 0666 on Debian (the device checks CAP_NET_ADMIN); this sandbox's is
    // 0600, so the namespace gets a Debian-like node of the same device.
    // /proc as the unit's ProtectProc=invisible shows it: other users' processes, PID 1
    // among them, are not there (the host-bpffs check must not depend on seeing PID 1).
    // The socket directory outlives each agent (the unit's preserved RuntimeDirectory), so
    // a restarted agent finds the wireguard-go its predecessor started.
    let sockets = host.dir.join("run-wireguard");
    if !sockets.exists() {
        std::fs::create_dir(&sockets).unwrap();
        chown(&sockets);
    }
    let script = format!(
        "mkdir -p /run/wireguard && mount --bind {} /run/wireguard \
         && mount -t tmpfs -o mode=0755 wf-devnet /dev/net && mknod -m 0666 /dev/net/tun c 10 200 \
         && mount -t proc -o hidepid=invisible wf-proc /proc && exec \"$@\"",
        sockets.display()
    );
    let mut cmd = host.ns.cmd("sh");
    cmd.args(["-c", &script, "sh"])
        .args(setpriv(caps))
        .arg(agent_bin())
        .args(["run", "--config"])
        .arg(host.config_path());
    cmd.env("WIREFENCE_LOG", "debug").stdout(Stdio::null()).stderr(f);
    (cmd.spawn().expect("spawn the agent under setpriv"), log)
}

/// `status --json` as the agent's user with its capabilities, in its mount and network
/// namespaces (where its wireguard-go socket is).
/// `caps: None`: as root, as an operator runs `sudo wirefence-agent status`.
fn status(host: &Host, pid: u32, caps: Option<&[&str]>) -> serde_json::Value {
    let out = run_ok(
        Command::new("nsenter")
            .args(["-t", &pid.to_string(), "--mount", "--net"])
            .args(caps.map(setpriv).unwrap_or_default())
            .arg(agent_bin())
            .args(["status", "--json", "--config"])
            .arg(host.config_path()),
    );
    serde_json::from_str(&out).expect("status --json")
}

fn lab(pins: impl FnOnce(&Host) -> Unprivileged) -> (Lab, Unprivileged) {
    let lab = Lab::new(2);
    let (a, b) = (&lab.hosts[0], &lab.hosts[1]);
    let guard = pins(b);
    a.config().peer(b).write();
    let rules = format!(
        "[policy]\npin_dir = \"{}\"\n[[policy.rules]]\nid = \"web\"\nfrom = [\"{}/32\"]\nto = [\"{}/32\"]\nproto = \"tcp\"\nports = [\"80\"]\n",
        guard.pins.display(),
        a.overlay_v4,
        b.overlay_v4
    );
    b.config().peer(a).extra(&rules).write();
    chown(&b.config_path());
    for port in [80, 81] {
        echo_server(&b.ns, sock("0.0.0.0", port));
    }
    (lab, guard)
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn unit_grants_the_capabilities_this_test_proves() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/agent/wirefence-agent.service");
    let text = std::fs::read_to_string(&unit).unwrap_or_else(|e| panic!("{}: {e}", unit.display()));
    for key in ["AmbientCapabilities=", "CapabilityBoundingSet="] {
        let line = text.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("{key} missing in the unit"));
        let mut granted: Vec<String> =
            line[key.len()..].split_whitespace().map(|c| c.trim_start_matches("CAP_").to_lowercase()).collect();
        granted.sort();
        let mut proven: Vec<String> = CAPS.iter().map(|c| c.to_string()).collect();
        proven.sort();
        assert_eq!(granted, proven, "{key} of {} is not the set this test proves", unit.display());
    }
}

#[test]
fn agent_converges_with_policy_as_its_user_with_only_its_capabilities() {
    let (lab, _pins) = lab(Unprivileged::new);
    let (a, b) = (&lab.hosts[0], &lab.hosts[1]);
    let _pa = a.spawn_agent();
    let (child, log) = spawn(b, CAPS);
    let pid = child.id();
    let _pb = Killed(child);

    wait_log(&log, "converged");
    wait_until("allowed port 80 connects", T, || connect(&a.ns, sock(&b.overlay_v4, 80), SHORT).is_some());
    assert!(connect(&a.ns, sock(&b.overlay_v4, 81), SHORT).is_none(), "denied port 81 connected");

    for caps in [Some(CAPS), None] {
        let st = status(b, pid, caps);
        assert_eq!(st["policy"]["attached"], true, "{st}");
        assert!(st["policy"]["counters"]["rules"]["web"]["packets"].as_u64().unwrap() > 0, "{st}");
        assert!(st["peers"].as_array().is_some_and(|p| p.len() == 1), "{st}");
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("ERROR") && !text.contains("WARN"), "the agent complained:\n{text}");

    // A restart (as after an upgrade) adopts the pinned programs: no second copy.
    drop(_pb);
    let (child, log) = spawn(b, CAPS);
    let _pb = Killed(child);
    wait_log(&log, "converged");
    assert_eq!(tcx_programs(b), 2, "a restarted agent attached a second copy (or none)");
    assert!(connect(&a.ns, sock(&b.overlay_v4, 80), SHORT).is_some(), "allowed port after the restart");
    assert!(connect(&a.ns, sock(&b.overlay_v4, 81), SHORT).is_none(), "denied port 81 connected after the restart");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("ERROR") && !text.contains("WARN"), "the restarted agent complained:\n{text}");
}

/// Waits until the agent's log says `what`; panics with the log otherwise.
fn wait_log(log: &Path, what: &str) {
    let deadline = std::time::Instant::now() + T;
    while !std::fs::read_to_string(log).unwrap().contains(what) {
        assert!(
            std::time::Instant::now() < deadline,
            "no {what:?} in {T:?}:\n{}",
            std::fs::read_to_string(log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Programs attached to the host's tunnel device with tcx, both directions (asked as root).
fn tcx_programs(host: &Host) -> usize {
    let ifname = host.ifname.clone();
    in_netns(&host.ns, move || {
        [aya::programs::TcAttachType::Ingress, aya::programs::TcAttachType::Egress]
            .into_iter()
            .map(|ty| aya::programs::SchedClassifier::query_tcx(&ifname, ty).expect("query tcx").1.len())
            .sum()
    })
}

#[test]
fn each_capability_is_needed() {
    for missing in CAPS {
        let fewer: Vec<&str> = CAPS.iter().copied().filter(|c| c != missing).collect();
        let (lab, _pins) = lab(Unprivileged::new);
        let b = &lab.hosts[1];
        let (child, log) = spawn(b, &fewer);
        let _pb = Killed(child);
        // It either exits with an error or keeps failing; either way it never converges
        // with the policy enforced.
        std::thread::sleep(Duration::from_secs(5));
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(!text.contains("converged"), "the agent converged without {missing}:\n{text}");
        assert!(text.contains("ERROR"), "without {missing} the agent neither converged nor said why:\n{text}");
    }
}
