//! An L4 load balancer in front of control-plane replicas: HAProxy (Debian's `haproxy`) in
//! TCP mode in the switch namespace, on the lab's control-plane addresses. TLS passes
//! through: the replicas terminate it with the certificate the agents expect there.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::control::{ControlPlane, CP_PORT, CP_V4, CP_V6};
use crate::{wait_until, Lab, TempDir};

pub struct Balancer {
    child: Child,
    dir: TempDir,
}

/// The configuration the control plane's README shows, with the lab's addresses. Agents
/// keep their streams open with HTTP/2 pings every 10 s, far inside the timeouts; a
/// replica that stops answering its check is out within a second.
pub fn config(backends: &[String]) -> String {
    // maxconn: a lab's few agents (the README sizes it for a fleet).
    let mut text = format!(
        "global\n    maxconn 4000\n\n\
         defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 5m\n    timeout server 5m\n    \
         retries 2\n    option redispatch\n\n\
         frontend agents\n    bind {CP_V4}:{CP_PORT}\n    bind [{CP_V6}]:{CP_PORT}\n    default_backend replicas\n\n\
         backend replicas\n    balance leastconn\n    default-server inter 300ms fall 2 rise 2\n"
    );
    for (i, b) in backends.iter().enumerate() {
        text.push_str(&format!("    server r{i} {b} check\n"));
    }
    text
}

impl Balancer {
    /// Starts HAProxy in front of `replicas`; returns once it takes connections.
    pub fn start(lab: &Lab, replicas: &[ControlPlane]) -> Balancer {
        let dir = TempDir::new();
        let backends: Vec<String> = replicas.iter().flat_map(|r| r.listen().to_vec()).collect();
        let cfg = dir.0.join("haproxy.cfg");
        std::fs::write(&cfg, config(&backends)).unwrap();
        let log = std::fs::File::create(dir.0.join("haproxy.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.switch.name, "haproxy", "-db", "-f"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn haproxy (Debian's haproxy: scripts/install.sh installs it)");
        let lb = Balancer { child, dir };
        let addr: std::net::SocketAddr = format!("{CP_V4}:{CP_PORT}").parse().unwrap();
        wait_until("HAProxy listening", Duration::from_secs(10), || {
            crate::connect(&lab.switch, addr, Duration::from_millis(200)).is_some()
        });
        lb
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.0.join("haproxy.log")
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
