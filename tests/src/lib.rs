//! Harness for the privileged integration tests: network namespaces joined by veth, agents
//! run as real processes driving wireguard-go, and helpers to read kernel state.
//!
//! Every test gets its own namespaces and interface names (pid + counter), so tests run in
//! parallel and never collide; the guards delete everything they created on drop. Tests
//! panic on any failure, and fail loudly (never skip) when not run as root.

pub mod balancer;
pub mod bpf;
pub mod control;
pub mod hostile;
pub mod metrics;
pub mod packet;
pub mod postgres;
pub mod route_group;
pub mod steady;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short unique token for names (interface names have 15 bytes at most).
pub fn unique() -> String {
    format!("{:x}{}", std::process::id() % 0xffff, COUNTER.fetch_add(1, Ordering::SeqCst))
}

/// Fails the test unless it runs as root (privileged tests fail, never skip); `why` names
/// what needs root.
pub fn require_root_for(why: &str) {
    assert!(nix_is_root(), "privileged test: {why}; CI runs it as root");
}

/// What the namespace tests need: root ([`require_root_for`]) and wireguard-go.
pub fn require_root() {
    require_root_for("must run as root (network namespaces, netlink)");
    assert!(
        Command::new("wireguard-go").arg("--version").output().is_ok(),
        "wireguard-go is missing: run scripts/install.sh (Debian package wireguard-go)"
    );
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Path of the agent binary built by `cargo build -p wirefence-agent` (xtask test does it).
pub fn agent_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("WIREFENCE_AGENT_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile> directory");
    let bin = dir.join("wirefence-agent");
    assert!(bin.exists(), "{} is missing: build it first (`cargo xtask test` does)", bin.display());
    bin
}

/// The agent built with `--features next-layout` (another eBPF object, its conntrack map in
/// another layout), for the upgrade tests: `cargo xtask test` and `cargo xtask
/// build-next-agent` build it as `wirefence-agent-next-layout` beside [`agent_bin`].
pub fn agent_next_layout_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("WIREFENCE_AGENT_NEXT_LAYOUT_BIN") {
        return bin.into();
    }
    let bin = agent_bin().with_file_name("wirefence-agent-next-layout");
    assert!(bin.exists(), "{} is missing: build it first (`cargo xtask build-next-agent`)", bin.display());
    bin
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    out
}

pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn ip(args: &[&str]) -> String {
    run_ok(Command::new("ip").args(args))
}

/// Polls `f` until it returns true or `timeout` passes; panics with `what` on timeout.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(250));
    }
}

/// A network namespace, deleted (with everything in it) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Netns {
        let name = format!("wft-{prefix}-{}", unique());
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        // No duplicate address detection on links made or moved here: its late "address
        // ready" events would be kernel noise to the steady-state tests (nothing collides).
        run_ok(ns.cmd("sysctl").args(["-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"]));
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    pub fn ip(&self, args: &[&str]) -> String {
        run_ok(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A bridge `name`, up, with a MAC of its own. Unset, a bridge takes its lowest port's
    /// MAC, so a port leaving (a host crashing) can change it; with an address on the
    /// bridge, every neighbour's entry for that address would be stale until it expires
    /// (seconds of lost traffic nothing in the test caused).
    pub fn add_bridge(&self, name: &str) {
        self.ip(&["link", "add", name, "address", "02:77:00:00:00:fe", "type", "bridge"]);
        self.ip(&["link", "set", name, "up"]);
    }

    /// Loads an nftables ruleset (`nft -f`) into the namespace.
    pub fn nft_load(&self, rules: &str) {
        let path = std::env::temp_dir().join(format!("wft-{}.nft", unique()));
        std::fs::write(&path, rules).unwrap();
        let out = run(self.cmd("nft").arg("-f").arg(&path));
        std::fs::remove_file(&path).ok();
        assert!(out.status.success(), "nft -f: {}\n{rules}", String::from_utf8_lossy(&out.stderr));
    }

    /// The packets each `counter` of table `inet <table>` counted, in rule order.
    pub fn nft_counters(&self, table: &str) -> Vec<u64> {
        let out = run_ok(self.cmd("nft").args(["list", "table", "inet", table]));
        out.split("counter packets ").skip(1).filter_map(|s| s.split_whitespace().next()?.parse().ok()).collect()
    }

    pub fn ping(&self, addr: &str) -> bool {
        run(self.cmd("ping").args(["-c", "1", "-W", "1", "-n", "-q", addr])).status.success()
    }

    /// Routes carrying the agent's protocol number, as `dst table dev` strings (`unreachable`
    /// for the device of an unreachable route), sorted.
    pub fn owned_routes(&self, protocol: u8) -> Vec<String> {
        let mut out = Vec::new();
        for fam in ["-4", "-6"] {
            let json = self.ip(&["-json", fam, "route", "show", "table", "all", "proto", &protocol.to_string()]);
            for r in serde_json::from_str::<Vec<serde_json::Value>>(&json).expect("ip -json route") {
                let dst = r["dst"].as_str().unwrap_or("?").to_owned();
                let dst = if dst.contains('/') || dst == "default" {
                    dst
                } else if dst.contains(':') {
                    format!("{dst}/128")
                } else {
                    format!("{dst}/32")
                };
                let table = r["table"].as_str().unwrap_or("main").to_owned();
                let target = match r["type"].as_str() {
                    Some("unreachable") => "unreachable",
                    _ => r["dev"].as_str().unwrap_or("?"),
                };
                out.push(format!("{dst} {table} {target}"));
            }
        }
        out.sort();
        out
    }

    /// Rules carrying the agent's protocol number (as `ip rule` prints them).
    pub fn owned_rules(&self, protocol: u8) -> Vec<String> {
        let mut out = Vec::new();
        for fam in ["-4", "-6"] {
            // `ip rule show proto N` does not filter on this iproute2; match the text instead.
            let tag = format!(" proto {protocol}");
            for line in self.ip(&[fam, "rule", "show"]).lines().filter(|l| l.trim_end().ends_with(&tag)) {
                out.push(format!("{fam} {}", line.trim()));
            }
        }
        out
    }

    pub fn link_exists(&self, ifname: &str) -> bool {
        run(Command::new("ip").args(["-n", &self.name, "link", "show", "dev", ifname])).status.success()
    }

    /// Addresses on a link (global scope), sorted.
    pub fn addresses(&self, ifname: &str) -> Vec<String> {
        let json = self.ip(&["-json", "addr", "show", "dev", ifname, "scope", "global"]);
        let v: Vec<serde_json::Value> = serde_json::from_str(&json).expect("ip -json addr");
        let mut out: Vec<String> = v
            .iter()
            .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
            .filter_map(|a| Some(format!("{}/{}", a["local"].as_str()?, a["prefixlen"])))
            .collect();
        out.sort();
        out
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Everything still running inside (wireguard-go daemons outlive their agents on
        // purpose) goes with the namespace; a daemon left behind would keep its inotify
        // instance and sockets.
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                // SAFETY: kill(2) on a pid that lives in our test namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// One host of a lab: a namespace with an underlay address on a shared bridge, a key, a
/// tunnel interface name, a config file and a state directory of its own.
pub struct Host {
    pub ns: Netns,
    /// Its veth's other end, on the switch's bridge.
    pub switch_port: String,
    pub index: u8,
    pub ifname: String,
    pub dir: PathBuf,
    pub public_key: String,
    pub underlay_v4: String,
    pub underlay_v6: String,
    pub overlay_v4: String,
    pub overlay_v6: String,
}

/// Hosts joined by veth to a bridge in a "switch" namespace.
pub struct Lab {
    pub hosts: Vec<Host>,
    pub switch: Netns,
    _dir: TempDir,
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Pins of policy programs (tests put them under the test bpffs, one dir per link).
        for h in &self.hosts {
            let dir = Path::new("/run/wirefence-test-bpf").join(&h.ifname);
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for e in entries.flatten() {
                    let _ = std::fs::remove_file(e.path());
                }
                let _ = std::fs::remove_dir(&dir);
            }
        }
    }
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let p = std::env::temp_dir().join(format!("wirefence-test-{}", unique()));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub const PROTO: u8 = 87;

/// A bpffs outside /sys (which `ip netns exec` remounts), so pins made by agents inside
/// namespaces outlive them as they would under /sys/fs/bpf on a host. Mounted once.
pub fn bpffs_root() -> PathBuf {
    static ONCE: std::sync::Once = std::sync::Once::new();
    let root = PathBuf::from("/run/wirefence-test-bpf");
    ONCE.call_once(|| {
        std::fs::create_dir_all(&root).expect("create bpffs mount point");
        let mounted = run(Command::new("stat").args(["-f", "-c", "%T"]).arg(&root));
        if String::from_utf8_lossy(&mounted.stdout).trim() != "bpf_fs" {
            run_ok(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&root));
        }
        make_shared(&root);
    });
    root
}

/// Mounts a bpffs of a test's own at `path` (created if missing), in the host's mount
/// namespace as the agent requires, closed to others (`mode=0700`); the test unmounts it.
pub fn mount_bpffs(path: &Path) {
    std::fs::create_dir_all(path).expect("create bpffs mount point");
    run_ok(Command::new("mount").args(["-t", "bpf", "-o", "mode=0700", "bpf"]).arg(path));
    make_shared(path);
}

/// Marks a mount shared, as systemd makes every mount of a host: where the agent cannot
/// compare its bpffs with PID 1's view (no ptrace access to PID 1, as in some CI sandboxes),
/// it accepts one whose mount propagates, and `ip netns exec` then sees it as `master:`.
fn make_shared(path: &Path) {
    run_ok(Command::new("mount").arg("--make-shared").arg(path));
}

/// Runs `f` on a thread inside the namespace (sockets it creates belong to the namespace
/// and may be used from any thread afterwards).
pub fn in_netns<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    use std::os::fd::AsRawFd;
    let path = format!("/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("netns file");
        // SAFETY: setns on a valid namespace descriptor affects only this thread.
        assert_eq!(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns {path}");
        f()
    })
    .join()
    .expect("netns thread panicked")
}

/// A TCP echo server in a namespace, serving until the process ends.
pub fn echo_server(ns: &Netns, addr: std::net::SocketAddr) {
    let listener =
        in_netns(ns, move || std::net::TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}")));
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut conn = conn;
                let mut buf = [0u8; 1024];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// Connects from a namespace; `None` if no connection within the timeout.
pub fn connect(ns: &Netns, addr: std::net::SocketAddr, timeout: Duration) -> Option<std::net::TcpStream> {
    in_netns(ns, move || std::net::TcpStream::connect_timeout(&addr, timeout).ok())
}

/// Sends a line and expects it back within the timeout.
pub fn echoes(stream: &mut std::net::TcpStream, timeout: Duration) -> bool {
    use std::io::{Read, Write};
    stream.set_read_timeout(Some(timeout)).unwrap();
    if stream.write_all(b"ping\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 5];
    stream.read_exact(&mut buf).is_ok() && &buf == b"ping\n"
}

impl Lab {
    pub fn new(n: u8) -> Lab {
        require_root();
        let dir = TempDir::new();
        let switch = Netns::new("sw");
        switch.add_bridge("br0");
        let mut hosts = Vec::new();
        for i in 1..=n {
            let (ns, switch_port) = plug(&switch, i);
            let hdir = dir.0.join(format!("h{i}"));
            std::fs::create_dir_all(&hdir).unwrap();
            let public_key = run_ok(Command::new(agent_bin()).args(["keygen", "--out"]).arg(hdir.join("private.key")))
                .trim()
                .to_owned();
            hosts.push(Host {
                ns,
                switch_port,
                index: i,
                ifname: format!("wf{}", unique()),
                dir: hdir,
                public_key,
                underlay_v4: underlay_v4(i),
                underlay_v6: underlay_v6(i),
                overlay_v4: format!("10.77.0.{i}"),
                overlay_v6: format!("fd77::{i}"),
            });
        }
        Lab { hosts, switch, _dir: dir }
    }

    /// Host `i` (1-based) as if its machine died and booted again: its port on the switch
    /// goes first (nothing it sends afterwards, a FIN included, leaves), then its namespace
    /// with every process and link in it; a new namespace is plugged in with the same
    /// underlay addresses. Its key, config and state directory are kept; nothing is started.
    pub fn reboot_host(&mut self, i: usize) {
        let h = &mut self.hosts[i - 1];
        self.switch.ip(&["link", "del", &h.switch_port]);
        let (ns, switch_port) = plug(&self.switch, h.index);
        // The old namespace is killed and deleted as it drops.
        h.ns = ns;
        h.switch_port = switch_port;
    }
}

fn underlay_v4(i: u8) -> String {
    format!("172.31.255.{i}")
}

fn underlay_v6(i: u8) -> String {
    format!("fdaa::{i}")
}

/// A new namespace for host `i`, its `eth0` on the switch's bridge with the host's underlay
/// addresses; returns it and the switch side's port name.
fn plug(switch: &Netns, i: u8) -> (Netns, String) {
    let ns = Netns::new(&format!("h{i}"));
    let tag = unique();
    let (a, b) = (format!("va{tag}"), format!("vb{tag}"));
    ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
    ip(&["link", "set", &a, "netns", &switch.name]);
    ip(&["link", "set", &b, "netns", &ns.name]);
    switch.ip(&["link", "set", &a, "master", "br0", "up"]);
    ns.ip(&["link", "set", &b, "name", "eth0"]);
    ns.ip(&["addr", "add", &format!("{}/24", underlay_v4(i)), "dev", "eth0"]);
    ns.ip(&["addr", "add", &format!("{}/64", underlay_v6(i)), "dev", "eth0", "nodad"]);
    ns.ip(&["link", "set", "eth0", "up"]);
    (ns, a)
}

/// A LAN behind gateway `gw`: a namespace of its own joined to `gw` by a veth (`lan0` on the
/// gateway with `gw_addr`/24, `eth0` in the LAN with `host_addr`/24, both 1500 bytes), its
/// default route through the gateway. The gateway forwards only if the test turns it on.
pub fn lan_behind(gw: &Host, gw_addr: &str, host_addr: &str) -> Netns {
    let lan = Netns::new("lan");
    let tag = unique();
    let (a, b) = (format!("la{tag}"), format!("lb{tag}"));
    ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
    ip(&["link", "set", &a, "netns", &gw.ns.name]);
    ip(&["link", "set", &b, "netns", &lan.name]);
    gw.ns.ip(&["link", "set", &a, "name", "lan0"]);
    gw.ns.ip(&["addr", "add", &format!("{gw_addr}/24"), "dev", "lan0"]);
    gw.ns.ip(&["link", "set", "lan0", "mtu", "1500", "up"]);
    lan.ip(&["link", "set", &b, "name", "eth0"]);
    lan.ip(&["addr", "add", &format!("{host_addr}/24"), "dev", "eth0"]);
    lan.ip(&["link", "set", "eth0", "mtu", "1500", "up"]);
    lan.ip(&["route", "add", "default", "via", gw_addr]);
    lan
}

/// Config builder for one host.
pub struct ConfigBuilder<'a> {
    host: &'a Host,
    peers: Vec<String>,
    extra: String,
    ifname: Option<String>,
    addresses: Option<Vec<String>>,
    resync_secs: u64,
}

impl Host {
    pub fn config(&self) -> ConfigBuilder<'_> {
        ConfigBuilder {
            host: self,
            peers: Vec::new(),
            extra: String::new(),
            ifname: None,
            addresses: None,
            resync_secs: 30,
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("agent.toml")
    }

    /// Writes the config by rename, as editors and config managers do.
    pub fn write_config(&self, text: &str) {
        let tmp = self.dir.join("agent.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.config_path()).unwrap();
    }

    pub fn agent(&self) -> Command {
        self.agent_at(&agent_bin())
    }

    /// The agent binary at `bin`, run in the host's namespace.
    pub fn agent_at(&self, bin: &Path) -> Command {
        let mut c = self.ns.cmd(bin.to_str().unwrap());
        c.env("WIREFENCE_LOG", "debug");
        c
    }

    /// `run --once`; returns the output (the caller checks the status).
    pub fn run_once(&self) -> Output {
        run(self.agent().args(["run", "--once", "--config"]).arg(self.config_path()))
    }

    pub fn run_once_ok(&self) -> String {
        let out = self.run_once();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "agent run --once failed: {err}");
        err
    }

    pub fn down(&self) {
        run_ok(self.agent().args(["down", "--config"]).arg(self.config_path()));
    }

    pub fn status_json(&self) -> serde_json::Value {
        let out = run_ok(self.agent().args(["status", "--json", "--config"]).arg(self.config_path()));
        serde_json::from_str(&out).expect("status --json")
    }

    /// Starts the daemon; it is killed (SIGKILL) when the handle drops.
    pub fn spawn_agent(&self) -> AgentProc {
        self.spawn_agent_at(&agent_bin())
    }

    /// Starts the daemon from the binary at `bin` (its log appended to the same file).
    pub fn spawn_agent_at(&self, bin: &Path) -> AgentProc {
        let log = self.dir.join("agent.log");
        let f = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = self
            .agent_at(bin)
            .args(["run", "--config"])
            .arg(self.config_path())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("spawn agent");
        AgentProc { child: Some(child), log }
    }

    pub fn socket_path(&self) -> PathBuf {
        Path::new("/var/run/wireguard").join(format!("{}.sock", self.ifname))
    }
}

impl ConfigBuilder<'_> {
    pub fn peer(mut self, other: &Host) -> Self {
        self = self.peer_with(other, &[&format!("{}/32", other.overlay_v4), &format!("{}/128", other.overlay_v6)]);
        self
    }

    pub fn peer_with(self, other: &Host, allowed_ips: &[&str]) -> Self {
        let endpoint = format!("{}:51820", other.underlay_v4);
        self.peer_at(other, &endpoint, allowed_ips)
    }

    /// A peer reached at `endpoint` (`ip:port`, `[ip6]:port`).
    pub fn peer_at(mut self, other: &Host, endpoint: &str, allowed_ips: &[&str]) -> Self {
        let ips: Vec<String> = allowed_ips.iter().map(|a| format!("\"{a}\"")).collect();
        self.peers.push(format!(
            "[[peers]]\npublic_key = \"{}\"\nendpoint = \"{endpoint}\"\nallowed_ips = [{}]\n",
            other.public_key,
            ips.join(", ")
        ));
        self
    }

    /// The periodic full pass, in seconds (30 unless set).
    pub fn resync_secs(mut self, secs: u64) -> Self {
        self.resync_secs = secs;
        self
    }

    pub fn extra(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }

    pub fn ifname(mut self, name: &str) -> Self {
        self.ifname = Some(name.to_owned());
        self
    }

    pub fn addresses(mut self, addrs: &[&str]) -> Self {
        self.addresses = Some(addrs.iter().map(|s| s.to_string()).collect());
        self
    }

    pub fn render(&self) -> String {
        let h = self.host;
        let addrs = self
            .addresses
            .clone()
            .unwrap_or_else(|| vec![format!("{}/24", h.overlay_v4), format!("{}/64", h.overlay_v6)]);
        let addrs: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
        format!(
            "[interface]\nname = \"{}\"\nbackend = \"userspace\"\nprivate_key_file = \"{}\"\nlisten_port = 51820\naddresses = [{}]\n\n[agent]\nstate_dir = \"{}\"\nresync_interval_secs = {}\n\n{}\n{}",
            self.ifname.as_deref().unwrap_or(&h.ifname),
            h.dir.join("private.key").display(),
            addrs.join(", "),
            h.dir.join("state").display(),
            self.resync_secs,
            self.extra,
            self.peers.join("\n"),
        )
    }

    pub fn write(self) {
        self.host.write_config(&self.render());
    }
}

pub struct AgentProc {
    child: Option<Child>,
    pub log: PathBuf,
}

impl AgentProc {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Whether the process has not exited yet.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL: no clean-up code of the agent runs.
    pub fn kill9(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Seconds-resolution handshake time of a peer, via the UAPI (`wg show` equivalent).
pub fn latest_handshake(host: &Host, peer: &Host) -> Option<u64> {
    let out = run(host.ns.cmd("wg").args(["show", &host.ifname, "latest-handshakes"]));
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next()? == peer.public_key).then(|| it.next()?.parse().ok())?
    })
}
