//! The agent under a service manager (the Debian unit is `Type=notify`): READY=1 comes only
//! once the first pass has converged, a reload is framed by RELOADING=1 (with its monotonic
//! timestamp, as systemd 253+ requires) and READY=1, and SIGTERM sends STOPPING=1. The
//! service manager's end is a real unix datagram socket named by `$NOTIFY_SOCKET`.

use std::os::unix::net::UnixDatagram;
use std::process::Stdio;
use std::time::Duration;

use wirefence_tests::*;

/// The next notification, or `None` after `timeout`.
fn recv(sock: &UnixDatagram, timeout: Duration) -> Option<String> {
    sock.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 4096];
    match sock.recv(&mut buf) {
        Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => None,
        Err(e) => panic!("notify socket: {e}"),
    }
}

/// `ip netns exec` execs the agent: the child's pid is the agent's.
fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill has no memory preconditions; the pid is our own unreaped child.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}): {}", std::io::Error::last_os_error());
}

#[test]
fn ready_after_first_convergence_reloading_around_sighup_stopping_on_term() {
    let lab = Lab::new(1);
    let a = &lab.hosts[0];
    a.config().write();
    // A foreign link of the tunnel's name: the agent refuses to touch it, so no pass can
    // converge and the agent must not claim to be ready.
    a.ns.ip(&["link", "add", &a.ifname, "type", "bridge"]);
    let socket_path = a.dir.join("notify.sock");
    let sock = UnixDatagram::bind(&socket_path).unwrap();
    let log = a.dir.join("agent.log");
    let mut child = a
        .agent()
        .args(["run", "--config"])
        .arg(a.config_path())
        .env("NOTIFY_SOCKET", &socket_path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    wait_until("the agent to fail its first pass", Duration::from_secs(20), || log_text().contains("reconcile failed"));
    let early = recv(&sock, Duration::from_secs(2));
    assert_eq!(early, None, "notified before converging:\n{}", log_text());

    // The obstacle goes: the link event triggers a pass that converges.
    a.ns.ip(&["link", "del", &a.ifname]);
    let ready = recv(&sock, Duration::from_secs(30)).unwrap_or_else(|| panic!("no READY=1:\n{}", log_text()));
    assert_eq!(ready, "READY=1\nSTATUS=converged\n");
    assert!(log_text().contains("converged"), "READY=1 before the agent logged convergence:\n{}", log_text());
    let want = format!("{}/24", a.overlay_v4);
    assert!(
        a.ns.addresses(&a.ifname).contains(&want),
        "READY=1 but the tunnel lacks {want}: {:?}",
        a.ns.addresses(&a.ifname)
    );

    // systemctl reload = SIGHUP.
    signal(child.id(), libc::SIGHUP);
    let reloading = recv(&sock, Duration::from_secs(10)).expect("no RELOADING=1 after SIGHUP");
    let mut lines = reloading.lines();
    assert_eq!(lines.next(), Some("RELOADING=1"), "{reloading:?}");
    let usec: u64 = lines
        .next()
        .and_then(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC: {reloading:?}"));
    assert!(usec > 0);
    assert_eq!(recv(&sock, Duration::from_secs(10)).as_deref(), Some("READY=1\nSTATUS=converged\n"));

    signal(child.id(), libc::SIGTERM);
    assert_eq!(recv(&sock, Duration::from_secs(10)).as_deref(), Some("STOPPING=1\n"));
    assert!(child.wait().unwrap().success(), "{}", log_text());
    // Stopping leaves the data plane in place.
    assert!(a.ns.link_exists(&a.ifname), "the tunnel went away with the daemon");
    a.down();
}
