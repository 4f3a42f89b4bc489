//! Watching a converged node: every rtnetlink change in a namespace (`ip monitor`), the
//! WireGuard side of a device (`wg show dump`), and frames on an underlay link (AF_PACKET),
//! for a fixed window. The steady-state tests assert that the agent writes nothing.

use std::io::Read;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{in_netns, run_ok, Host, Netns};

/// `ip monitor link address route rule` in a namespace, from start to [`Monitor::stop`].
pub struct Monitor {
    child: Child,
}

impl Monitor {
    pub fn start(ns: &Netns) -> Monitor {
        let mut child = Command::new("ip")
            .args(["-n", &ns.name, "-timestamp", "monitor", "link", "address", "route", "rule"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ip monitor");
        // `ip monitor` subscribes before its first read; give it that moment.
        std::thread::sleep(Duration::from_millis(200));
        assert!(child.try_wait().unwrap().is_none(), "ip monitor exited at once");
        Monitor { child }
    }

    /// Every change seen since the start, one line each (timestamps included).
    pub fn stop(mut self) -> Vec<String> {
        let _ = self.child.kill();
        let mut out = String::new();
        self.child.stdout.take().expect("piped").read_to_string(&mut out).unwrap();
        let _ = self.child.wait();
        out.lines().filter(|l| !l.trim().is_empty()).map(str::to_owned).collect()
    }
}

/// The WireGuard side of a device, per peer: public key, endpoint, allowed-ips, latest
/// handshake and keepalive (`wg show <if> dump`, transfer counters left out: traffic moves them).
pub fn wg_state(host: &Host) -> Vec<String> {
    let out = run_ok(host.ns.cmd("wg").args(["show", &host.ifname, "dump"]));
    out.lines()
        .skip(1) // the device's own line: private key, port, fwmark
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 8, "wg dump peer line: {l}");
            format!("{} endpoint={} allowed={} handshake={} keepalive={}", f[0], f[2], f[3], f[4], f[7])
        })
        .collect()
}

/// Operations the agent logged as applied (at debug level) in `log` after byte `from`.
pub fn applied_ops(log: &str, from: usize) -> Vec<String> {
    log.get(from..).unwrap_or_default().lines().filter(|l| l.contains("applied")).map(str::to_owned).collect()
}

/// What crossed an underlay link during a capture.
#[derive(Debug, Default)]
pub struct Capture {
    /// IP packets whose destination was one of the watched addresses (in clear).
    pub leaked: Vec<String>,
    /// UDP packets to or from the WireGuard port (the tunnel's encrypted traffic).
    pub wireguard: usize,
}

/// Captures every frame leaving or entering `ifname` in `ns` for `window`, looking for IP
/// packets to `watched` in clear and counting WireGuard's UDP (port `wg_port`).
pub fn capture(ns: &Netns, ifname: &str, window: Duration, watched: Vec<IpAddr>, wg_port: u16) -> Capture {
    let ifname = ifname.to_owned();
    let sock = in_netns(ns, move || {
        // SAFETY: plain socket(2); the descriptor is owned right away.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, (libc::ETH_P_ALL as u16).to_be() as i32) };
        assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(ifname.clone()).unwrap();
        // SAFETY: name is a valid C string.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(index != 0, "no link {ifname}");
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = index as i32;
        // SAFETY: sll is a valid sockaddr_ll of the size given.
        let rc = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind AF_PACKET to {ifname}: {}", std::io::Error::last_os_error());
        let tv = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
        // SAFETY: setsockopt with a timeval of the right size.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        sock
    });
    let mut out = Capture::default();
    let deadline = Instant::now() + window;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        // SAFETY: buf is writable for its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
        if n <= 0 {
            continue;
        }
        let frame = &buf[..n as usize];
        if frame.len() < 14 {
            continue;
        }
        let ip = &frame[14..];
        let (dst, proto, l4) = match u16::from_be_bytes([frame[12], frame[13]]) {
            0x0800 if ip.len() >= 20 => {
                let ihl = ((ip[0] & 0x0f) as usize) * 4;
                (IpAddr::from([ip[16], ip[17], ip[18], ip[19]]), ip[9], ip.get(ihl..).unwrap_or_default())
            }
            0x86dd if ip.len() >= 40 => {
                let mut d = [0u8; 16];
                d.copy_from_slice(&ip[24..40]);
                (IpAddr::from(d), ip[6], &ip[40..])
            }
            _ => continue,
        };
        if watched.contains(&dst) {
            out.leaked.push(format!("protocol {proto} to {dst}"));
        }
        if proto == libc::IPPROTO_UDP as u8 && l4.len() >= 4 {
            let (sport, dport) = (u16::from_be_bytes([l4[0], l4[1]]), u16::from_be_bytes([l4[2], l4[3]]));
            if sport == wg_port || dport == wg_port {
                out.wireguard += 1;
            }
        }
    }
    out
}
