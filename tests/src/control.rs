//! The reference control plane in a lab: `wirefence-control serve` in the switch namespace
//! (reachable from every host over IPv4 and IPv6, TLS with a CA made by `certs init`), its
//! admin CLI over the Unix socket, and agent configs in control mode.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::{run, run_ok, wait_until, AgentProc, Host, Lab, TempDir};

pub const CP_V4: &str = "172.31.255.254";
pub const CP_V6: &str = "fdaa::fe";
pub const CP_PORT: u16 = 7443;
/// Replicas behind a balancer listen on 127.0.0.1 from this port on (switch namespace).
pub const REPLICA_PORT: u16 = 7450;

/// Path of `wirefence-control` next to the test binary's target directory.
pub fn control_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("WIREFENCE_CONTROL_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe.parent().and_then(|d| d.parent()).expect("target/<profile> directory").join("wirefence-control");
    assert!(bin.exists(), "{} is missing: build it first (`cargo xtask test` does)", bin.display());
    bin
}

/// Where a lab's control planes serve metrics, in the switch namespace (the first; a
/// replica the next port).
pub const CP_METRICS_PORT: u16 = 9590;

pub struct ControlPlane {
    pub dir: TempDir,
    switch: String,
    child: Option<Child>,
    /// Agent listener addresses.
    listen: Vec<String>,
    /// Holds server.pem and server.key (and ca.pem, ca.key from `certs init`).
    tls: PathBuf,
    metrics: std::net::SocketAddr,
    /// More `serve` arguments (say `--route-hold-down 1s`).
    serve_args: Vec<String>,
    /// Serve without TLS (`--insecure --insecure-allow-remote`); `tls` still holds a CA.
    plaintext: bool,
    /// `--db`: a PostgreSQL URL shared with other replicas; `None`: a SQLite file of its own.
    db: Option<String>,
}

impl ControlPlane {
    /// Gives the lab's bridge the control plane's addresses, makes a CA and server
    /// certificate for them, and starts serving.
    pub fn start(lab: &Lab) -> ControlPlane {
        ControlPlane::start_with(lab, &[])
    }

    /// [`ControlPlane::start`], serving plaintext HTTP/2 (`serve --insecure`).
    pub fn start_plaintext(lab: &Lab) -> ControlPlane {
        ControlPlane::start_as(lab, &[], true)
    }

    /// [`ControlPlane::start`] with more `serve` arguments.
    pub fn start_with(lab: &Lab, serve_args: &[&str]) -> ControlPlane {
        ControlPlane::start_as(lab, serve_args, false)
    }

    fn start_as(lab: &Lab, serve_args: &[&str], plaintext: bool) -> ControlPlane {
        lab.switch.ip(&["addr", "add", &format!("{CP_V4}/24"), "dev", "br0"]);
        lab.switch.ip(&["addr", "add", &format!("{CP_V6}/64"), "dev", "br0", "nodad"]);
        let dir = TempDir::new();
        run_ok(
            Command::new(control_bin())
                .args(["certs", "init", "--dir"])
                .arg(dir.0.join("tls"))
                .args(["--san", CP_V4, "--san", CP_V6]),
        );
        let tls = dir.0.join("tls");
        let mut cp = ControlPlane {
            dir,
            switch: lab.switch.name.clone(),
            child: None,
            listen: vec![format!("{CP_V4}:{CP_PORT}"), format!("[{CP_V6}]:{CP_PORT}")],
            tls,
            metrics: std::net::SocketAddr::from(([127, 0, 0, 1], CP_METRICS_PORT)),
            serve_args: serve_args.iter().map(|a| a.to_string()).collect(),
            plaintext,
            db: None,
        };
        cp.restart();
        cp
    }

    /// `n` replicas on the PostgreSQL database at `url`, sharing one certificate (made for
    /// the lab's control-plane addresses, where a [`crate::balancer::Balancer`] takes
    /// agents), each listening on 127.0.0.1:7450+i of the switch namespace, metrics on
    /// 9590+i.
    pub fn replicas(lab: &Lab, url: &str, n: u16) -> Vec<ControlPlane> {
        let listen = |i: u16| vec![format!("127.0.0.1:{}", REPLICA_PORT + i)];
        let first = ControlPlane::start_on(lab, url, 0, None, listen(0));
        let tls = first.tls.clone();
        let mut all = vec![first];
        for i in 1..n {
            all.push(ControlPlane::start_on(lab, url, i, Some(tls.clone()), listen(i)));
        }
        all
    }

    /// Replica `i` on `url` (metrics on 9590+i), taking agents at `listen`; with `tls:
    /// None` it adds the lab's control-plane addresses to the switch and makes the CA
    /// and certificate for them.
    pub fn start_on(lab: &Lab, url: &str, i: u16, tls: Option<PathBuf>, listen: Vec<String>) -> ControlPlane {
        let dir = TempDir::new();
        let tls = tls.unwrap_or_else(|| {
            lab.switch.ip(&["addr", "add", &format!("{CP_V4}/24"), "dev", "br0"]);
            lab.switch.ip(&["addr", "add", &format!("{CP_V6}/64"), "dev", "br0", "nodad"]);
            run_ok(
                Command::new(control_bin())
                    .args(["certs", "init", "--dir"])
                    .arg(dir.0.join("tls"))
                    .args(["--san", CP_V4, "--san", CP_V6]),
            );
            dir.0.join("tls")
        });
        let mut cp = ControlPlane {
            dir,
            switch: lab.switch.name.clone(),
            child: None,
            listen,
            tls,
            metrics: std::net::SocketAddr::from(([127, 0, 0, 1], CP_METRICS_PORT + i)),
            serve_args: Vec::new(),
            plaintext: false,
            db: Some(url.to_owned()),
        };
        cp.restart();
        cp
    }

    /// Where this server takes agents.
    pub fn listen(&self) -> &[String] {
        &self.listen
    }

    /// Serves agents only at `listen` from the next restart on.
    pub fn set_listen(&mut self, listen: &[String]) {
        self.listen = listen.to_vec();
    }

    /// Another `serve` in the switch namespace with a database of its own, at `listen`,
    /// with the certificate and key in `tls` (say a replica whose certificate was not
    /// renewed); its metrics on the next port.
    pub fn replica(&self, listen: &str, tls: PathBuf) -> ControlPlane {
        let mut cp = ControlPlane {
            dir: TempDir::new(),
            switch: self.switch.clone(),
            child: None,
            listen: vec![listen.to_owned()],
            tls,
            metrics: std::net::SocketAddr::from(([127, 0, 0, 1], self.metrics.port() + 1)),
            serve_args: self.serve_args.clone(),
            plaintext: self.plaintext,
            db: None,
        };
        cp.restart();
        cp
    }

    /// Where `--metrics-listen` serves, in the switch namespace.
    pub fn metrics_addr(&self) -> std::net::SocketAddr {
        self.metrics
    }

    /// The directory with ca.pem, ca.key, server.pem, server.key.
    pub fn tls_dir(&self) -> &std::path::Path {
        &self.tls
    }

    /// The server's process id (`ip netns exec` execs it in place).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.dir.0.join("admin.sock")
    }

    pub fn ca_file(&self) -> PathBuf {
        self.tls.join("ca.pem")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("control.log")).unwrap_or_default()
    }

    /// (Re)starts the server on the same database; returns once the admin socket answers.
    pub fn restart(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(self.admin_socket());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.0.join("control.log")).unwrap();
        let tls = &self.tls;
        let transport: Vec<std::ffi::OsString> = if self.plaintext {
            vec!["--insecure".into(), "--insecure-allow-remote".into()]
        } else {
            vec!["--tls-cert".into(), tls.join("server.pem").into(), "--tls-key".into(), tls.join("server.key").into()]
        };
        let listen: Vec<&str> = self.listen.iter().flat_map(|l| ["--listen", l.as_str()]).collect();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.switch])
            .arg(control_bin())
            .arg("--admin-socket")
            .arg(self.admin_socket())
            .arg("serve")
            .arg("--db")
            .arg(self.db.clone().map_or_else(|| self.dir.0.join("control.db").into_os_string(), Into::into))
            .args(listen)
            .arg("--metrics-listen")
            .arg(self.metrics.to_string())
            .args(&transport)
            .args(["--overlay-v4", "10.77.0.0/24", "--overlay-v6", "fd77::/64"])
            .args(&self.serve_args)
            .env("WIREFENCE_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn wirefence-control");
        self.child = Some(child);
        wait_until("the control plane's admin socket", Duration::from_secs(15), || {
            self.admin(&["nodes", "list"]).status.success()
        });
    }

    /// Stops the server (SIGKILL: nothing of it runs on the way out).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn admin(&self, args: &[&str]) -> Output {
        run(Command::new(control_bin()).arg("--admin-socket").arg(self.admin_socket()).args(args))
    }

    pub fn admin_ok(&self, args: &[&str]) -> String {
        let out = self.admin(args);
        assert!(out.status.success(), "wirefence-control {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A reusable enrollment key (nodes enrolled with it own no name), written to a file.
    pub fn enrollment_key_file(&self, tags: &[&str]) -> PathBuf {
        self.key_file(&["--reusable"], tags)
    }

    /// A single-use key bound to `hostname` (the node enrolled with it owns the name, so
    /// `node:<hostname>` selectors match it), written to a file.
    pub fn bound_key_file(&self, hostname: &str, tags: &[&str]) -> PathBuf {
        self.key_file(&["--hostname", hostname], tags)
    }

    /// A single-use key bound to `hostname` that grants the node `routes` (site subnets it
    /// may advertise).
    pub fn routed_key_file(&self, hostname: &str, routes: &[&str]) -> PathBuf {
        let mut options = vec!["--hostname", hostname];
        for r in routes {
            options.extend(["--route", r]);
        }
        self.key_file(&options, &[])
    }

    /// A re-enrollment key for `node` (`nodes reenroll`), written to a file.
    pub fn reenroll_key_file(&self, node: &str) -> PathBuf {
        self.write_key(self.admin_ok(&["nodes", "reenroll", node]).trim())
    }

    fn key_file(&self, options: &[&str], tags: &[&str]) -> PathBuf {
        let mut args = vec!["keys", "create", "--json"];
        args.extend_from_slice(options);
        for t in tags {
            args.extend(["--tag", t]);
        }
        let out: serde_json::Value = serde_json::from_str(&self.admin_ok(&args)).expect("keys create --json");
        self.write_key(out["key"].as_str().expect("key in keys create --json"))
    }

    fn write_key(&self, key: &str) -> PathBuf {
        let path = self.dir.0.join(format!("enroll-{}.key", crate::unique()));
        std::fs::write(&path, key).unwrap();
        // Secret: the agent refuses a key file others can read.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        path
    }

    /// Applies a policy file; the output (the caller checks the status).
    pub fn apply_policy(&self, text: &str) -> Output {
        let path = self.dir.0.join("policy.toml");
        std::fs::write(&path, text).unwrap();
        self.admin(&["policy", "apply", path.to_str().unwrap()])
    }

    /// Overlay addresses (IPv4, IPv6) the control plane gave a node, by host name.
    pub fn node_addresses(&self, hostname: &str) -> (String, String) {
        let n: serde_json::Value =
            serde_json::from_str(&self.admin_ok(&["nodes", "show", hostname, "--json"])).expect("nodes show --json");
        let addrs: Vec<String> =
            n["addresses"].as_array().expect("addresses").iter().map(|a| a.as_str().unwrap().to_owned()).collect();
        let host = |v6: bool| {
            addrs
                .iter()
                .find(|a| a.contains(':') == v6)
                .map(|a| a.split('/').next().unwrap().to_owned())
                .unwrap_or_else(|| panic!("{hostname} has no {} address: {addrs:?}", if v6 { "IPv6" } else { "IPv4" }))
        };
        (host(false), host(true))
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Host {
    /// The hostname [`Host::write_control_config`] gives the agent.
    pub fn control_hostname(&self) -> String {
        format!("h{}", self.index)
    }

    /// [`Host::write_control_config`] with a fresh key bound to this host's name; returns
    /// the key file.
    pub fn write_bound_control_config(&self, cp: &ControlPlane, tags: &[&str]) -> PathBuf {
        let key = cp.bound_key_file(&self.control_hostname(), tags);
        self.write_control_config(cp, &key);
        key
    }

    /// An agent config in control mode: no peers, no rules, no addresses of its own. Both
    /// control-plane addresses are listed; odd hosts try IPv4 first, even hosts IPv6.
    pub fn write_control_config(&self, cp: &ControlPlane, enrollment_key: &std::path::Path) {
        let (v4, v6) = (format!("\"{CP_V4}:{CP_PORT}\""), format!("\"[{CP_V6}]:{CP_PORT}\""));
        let endpoints = if self.index % 2 == 1 { format!("{v4}, {v6}") } else { format!("{v6}, {v4}") };
        let text = format!(
            "[interface]\nname = \"{ifname}\"\nbackend = \"userspace\"\nprivate_key_file = \"{key}\"\nlisten_port = 51820\n\n\
             [agent]\nstate_dir = \"{state}\"\n\n[policy]\npin_dir = \"{pins}\"\n\n\
             [control]\nendpoints = [{endpoints}]\nca_file = \"{ca}\"\n\
             enrollment_key_file = \"{enroll}\"\nhostname = \"h{i}\"\nadvertise_endpoints = [\"{u4}:51820\"]\n",
            ifname = self.ifname,
            key = self.dir.join("private.key").display(),
            state = self.dir.join("state").display(),
            pins = crate::bpffs_root().display(),
            ca = cp.ca_file().display(),
            enroll = enrollment_key.display(),
            i = self.index,
            u4 = self.underlay_v4,
        );
        self.write_config(&text);
    }

    /// [`Host::write_control_config`] with `extra` lines appended (to its `[control]`
    /// section, the last one, unless they open another).
    pub fn write_control_config_with(&self, cp: &ControlPlane, enrollment_key: &std::path::Path, extra: &str) {
        self.write_control_config(cp, enrollment_key);
        let text = std::fs::read_to_string(self.config_path()).unwrap();
        self.write_config(&format!("{text}{extra}\n"));
    }

    /// The control-plane status the running agent records (`status --json`'s `control`).
    pub fn control_status(&self) -> serde_json::Value {
        self.status_json()["control"].clone()
    }
}

/// A lab of `n` hosts enrolled with a running control plane, agents started.
pub fn enrolled(n: u8) -> (Lab, ControlPlane, Vec<AgentProc>) {
    let (lab, cp, agents, _) = enrolled_with_keys(n);
    (lab, cp, agents)
}

/// As [`enrolled`], with the enrollment key files (one per host, bound to its name).
pub fn enrolled_with_keys(n: u8) -> (Lab, ControlPlane, Vec<AgentProc>, Vec<PathBuf>) {
    let lab = Lab::new(n);
    let cp = ControlPlane::start(&lab);
    let mut agents = Vec::new();
    let mut keys = Vec::new();
    for h in &lab.hosts {
        keys.push(h.write_bound_control_config(&cp, &["server"]));
        agents.push(h.spawn_agent());
    }
    wait_until("every node enrolled", Duration::from_secs(20), || {
        let out = cp.admin(&["nodes", "list", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v.as_array().is_some_and(|a| a.len() == n as usize)
    });
    (lab, cp, agents, keys)
}

/// `wg show <if> peers` in the host's namespace.
pub fn wg_peers(host: &Host) -> Vec<String> {
    let out = run(host.ns.cmd("wg").args(["show", &host.ifname, "peers"]));
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}
