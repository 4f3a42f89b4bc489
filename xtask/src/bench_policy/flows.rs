//! Benchmark 2's per-packet measurements: what a filter costs where its per-packet cost
//! shows, next to the single GSO stream (where it does not).
//!
//! - **TCP connections/s**: one client thread connects to the receiver and waits for the
//!   server thread, which accepts and closes with an RST (SO_LINGER 0, so no TIME_WAIT
//!   exhausts ports), one connection after the other for a fixed time. Every connection is a new flow: its SYN takes the filter's
//!   new-flow path (nft: a walk of the chain; eBPF: class + policy lookups, a conntrack
//!   insert); the other 3 packets are established.
//! - **UDP new flows/s**: datagrams from [`UDP_SOCKETS`] sockets on fresh source ports to
//!   every port of [`UDP_PORTS`], each (source port, destination port) pair once, so every
//!   datagram is a new flow (as for DNS or QUIC initials, or a port scan). Counted at the
//!   receiver: datagrams that reached its UDP layer (`InDatagrams + NoPorts` of
//!   `/proc/net/snmp`), i.e. that the filter let through, per second.
//! - **tunnel MTU**: the iperf3 stream with MTU 1420 (WireGuard's) and TSO, GSO and GRO off
//!   on both veths, so the filter sees every 1420-byte packet instead of 64 KiB
//!   super-packets ([`set_tunnel_like`]).

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::net::{output, Netns};

/// The receiver port of the connection-rate test (allowed by the bench's last rule).
pub const CONN_PORT: u16 = 5203;
/// Destination ports of the UDP test (all allowed by the bench's UDP rule).
pub const UDP_PORTS: std::ops::RangeInclusive<u16> = 20000..=29999;
/// Sender sockets per UDP run; each run binds fresh source ports (see [`udp_src_base`]).
pub const UDP_SOCKETS: u16 = 64;

/// First source port of UDP run `run`: runs never reuse a tuple, so a flow left in nft's
/// conntrack (30 s for unreplied UDP) or the eBPF LRU by an earlier run is never counted as
/// new.
fn udp_src_base(run: u32) -> u16 {
    10000 + (run as u16 % 700) * UDP_SOCKETS
}

fn set_linger_zero(fd: i32) {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid socket and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
}

/// Connections per second from `snd` to `addr` (served in `rcv`) over `secs` seconds.
pub fn tcp_conn_rate(snd: &Netns, rcv: &Netns, addr: SocketAddr, secs: f64) -> Result<f64> {
    let listener = rcv.enter(move || TcpListener::bind(addr))?.with_context(|| format!("bind {addr}"))?;
    let stop = AtomicBool::new(false);
    let (stop, listener) = (&stop, &listener);
    std::thread::scope(|s| {
        let server = s.spawn(move || {
            listener.set_nonblocking(false).ok();
            while !stop.load(Ordering::Relaxed) {
                if let Ok((c, _)) = listener.accept() {
                    // Closed at once with an RST: no TIME_WAIT on either side.
                    set_linger_zero(c.as_raw_fd());
                }
            }
        });
        let done = snd.enter(move || -> Result<u64> {
            let deadline = Instant::now() + Duration::from_secs_f64(secs);
            let mut n = 0u64;
            while Instant::now() < deadline {
                // The server's close (an RST) ends the connection: one full accept cycle each.
                // A reset seen already by connect is that same end (the server was quick).
                match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                    Ok(mut c) => {
                        let _ = c.read(&mut [0u8; 1]);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                    Err(e) => return Err(anyhow::Error::from(e).context(format!("connect {addr}"))),
                }
                n += 1;
            }
            Ok(n)
        });
        stop.store(true, Ordering::Relaxed);
        // Wake the server's accept.
        let _ = snd.enter(move || TcpStream::connect_timeout(&addr, Duration::from_secs(1)));
        server.join().map_err(|_| anyhow::anyhow!("server thread panicked"))?;
        Ok(done?? as f64 / secs)
    })
}

/// `InDatagrams + NoPorts` of the namespace the calling thread is in.
fn udp_delivered() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/net/snmp").context("read /proc/thread-self/net/snmp")?;
    let mut lines = text.lines().filter(|l| l.starts_with("Udp: "));
    let (names, values) = (lines.next().context("no Udp header")?, lines.next().context("no Udp values")?);
    let pairs: Vec<(&str, u64)> = names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
        .map(|(n, v)| (n, v.parse().unwrap_or(0)))
        .collect();
    let get = |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| *v).unwrap_or(0);
    Ok(get("InDatagrams") + get("NoPorts"))
}

/// New UDP flows per second let through to `dst` (from `src`), run number `run`.
pub fn udp_new_flow_rate(snd: &Netns, rcv: &Netns, src: &str, dst: &str, run: u32, secs: f64) -> Result<f64> {
    let before = rcv.enter(udp_delivered)??;
    let base = udp_src_base(run);
    let (src, dst) = (src.to_owned(), dst.to_owned());
    let elapsed = snd.enter(move || -> Result<f64> {
        let socks = (0..UDP_SOCKETS)
            .map(|i| UdpSocket::bind((src.as_str(), base + i)).with_context(|| format!("bind {src}:{}", base + i)))
            .collect::<Result<Vec<_>>>()?;
        let payload = [0u8; 32];
        let start = Instant::now();
        let deadline = start + Duration::from_secs_f64(secs);
        'out: for port in UDP_PORTS {
            let to: SocketAddr = format!("{dst}:{port}").parse()?;
            for s in &socks {
                // Errors (ENOBUFS, a queued ICMP error) only mean this datagram did not count.
                let _ = s.send_to(&payload, to);
            }
            if port % 8 == 0 && Instant::now() >= deadline {
                break 'out;
            }
        }
        Ok(start.elapsed().as_secs_f64())
    })??;
    // Datagrams still in a backlog queue arrive within a moment.
    std::thread::sleep(Duration::from_millis(50));
    let after = rcv.enter(udp_delivered)??;
    Ok(after.saturating_sub(before) as f64 / elapsed)
}

/// MTU 1420 and no TSO/GSO/GRO on `dev` in `ns` (`on`), or back to veth's defaults.
pub fn set_tunnel_like(ns: &Netns, dev: &str, on: bool) -> Result<()> {
    let (mtu, state) = if on { ("1420", "off") } else { ("1500", "on") };
    output(ns.command("ip").args(["link", "set", dev, "mtu", mtu]))?;
    output(ns.command("ethtool").args(["-K", dev, "tso", state, "gso", state, "gro", state]))
        .context("ethtool -K (apt-get install ethtool)")?;
    Ok(())
}
