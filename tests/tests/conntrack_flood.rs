//! One peer cannot push another peer's flows out of conntrack: through real WireGuard
//! tunnels (wireguard-go) and the classifiers on the tunnel device, peer `a` sends 200,000
//! distinct allowed UDP tuples (two packets each) to `b` while peer `c` holds a TCP connection to `b`; the
//! connection still carries data both ways afterwards, including data `b` sends first
//! (which only an intact conntrack entry lets out: `b` may not open flows to `c`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use wirefence_tests::*;

const T: Duration = Duration::from_secs(15);
const SHORT: Duration = Duration::from_millis(700);
const FLOOD_TUPLES: usize = 200_000;
/// Source sockets × destination ports = distinct tuples.
const SOURCES: usize = 200;
const PORTS: u16 = 1000;

fn rules(a: &Host, b: &Host, c: &Host) -> String {
    format!(
        "[policy]\npin_dir = \"{}\"\n\
         [[policy.rules]]\nid = \"flood\"\nfrom = [\"{}/32\"]\nto = [\"{}/32\"]\nproto = \"udp\"\nports = [\"9000-9999\"]\n\
         [[policy.rules]]\nid = \"web\"\nfrom = [\"{}/32\"]\nto = [\"{}/32\"]\nproto = \"tcp\"\nports = [\"80\"]\n",
        bpffs_root().display(),
        a.overlay_v4,
        b.overlay_v4,
        c.overlay_v4,
        b.overlay_v4
    )
}

fn stat(host: &Host, name: &str) -> u64 {
    host.status_json()["policy"]["counters"]["stats"][name]["packets"].as_u64().unwrap_or(0)
}

fn exchange(from: &mut TcpStream, to: &mut TcpStream, what: &str) -> bool {
    to.set_read_timeout(Some(SHORT)).unwrap();
    if from.write_all(what.as_bytes()).is_err() {
        return false;
    }
    let mut buf = vec![0u8; what.len()];
    to.read_exact(&mut buf).is_ok() && buf == what.as_bytes()
}

#[test]
fn a_flood_of_new_flows_leaves_another_peers_connection_working() {
    let started = Instant::now();
    let lab = Lab::new(3);
    let (a, b, c) = (&lab.hosts[0], &lab.hosts[1], &lab.hosts[2]);
    a.config().peer(b).write();
    c.config().peer(b).write();
    b.config().peer(a).peer(c).extra(&rules(a, b, c)).write();
    let _pa = a.spawn_agent();
    let _pb = b.spawn_agent();
    let _pc = c.spawn_agent();

    let listener = in_netns(&b.ns, || TcpListener::bind("0.0.0.0:80").expect("listen on b:80"));
    let web: SocketAddr = format!("{}:80", b.overlay_v4).parse().unwrap();
    wait_until("c connects to b:80", T, || connect(&c.ns, web, SHORT).is_some());
    // The probe connections above are accepted and dropped; the last one is ours.
    let mut client = connect(&c.ns, web, SHORT).expect("c connects to b:80");
    listener.set_nonblocking(false).unwrap();
    let mut server = loop {
        let (s, peer) = listener.accept().unwrap();
        if peer == client.local_addr().unwrap() {
            break s;
        }
    };
    assert!(exchange(&mut client, &mut server, "hello from c\n"), "c -> b before the flood");
    assert!(exchange(&mut server, &mut client, "hello from b\n"), "b -> c before the flood");

    // The flood: 200 sockets of a, each to 1,000 destination ports of b.
    let target = b.overlay_v4.clone();
    let sent = in_netns(&a.ns, move || {
        let sockets: Vec<UdpSocket> = (0..SOURCES).map(|_| UdpSocket::bind("0.0.0.0:0").unwrap()).collect();
        let mut sent = 0;
        for port in 0..PORTS {
            let dst: SocketAddr = format!("{target}:{}", 9000 + port).parse().unwrap();
            for s in &sockets {
                // Twice: a second packet makes an LRU treat the entry as in use, as a live
                // connection's. A full queue (ENOBUFS) is retried.
                for _ in 0..2 {
                    while s.send_to(b"flood", dst).is_err() {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
                sent += 1;
                // Paced, so the userspace tunnel carries the tuples rather than dropping them.
                if sent % 40 == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        sent
    });
    assert_eq!(sent, FLOOD_TUPLES);
    eprintln!("a sent {sent} tuples; {:?} so far", started.elapsed());
    // The flood reached b's classifier: tuples were tracked up to a's quota, then passed
    // untracked.
    wait_until("the flood is counted on b", T, || stat(b, "allowed_new") >= 100_000);
    let (new, untracked) = (stat(b, "allowed_new"), stat(b, "ct_untracked"));
    eprintln!("b: {new} new flows allowed, {untracked} of them untracked (over quota); {:?} so far", started.elapsed());
    assert!(untracked > 0, "a's flood was never limited: {new} allowed, all tracked");

    // b speaks first: only c's conntrack entry lets this out (no rule allows b -> c).
    assert!(exchange(&mut server, &mut client, "b after the flood\n"), "b -> c after the flood");
    assert!(exchange(&mut client, &mut server, "c after the flood\n"), "c -> b after the flood");
    // A new connection from c still gets an entry (c has its own quota).
    let mut again = connect(&c.ns, web, SHORT).expect("c connects again after the flood");
    let (mut accepted, _) = listener.accept().unwrap();
    assert!(exchange(&mut accepted, &mut again, "b first again\n"), "b -> c on a new connection");
    eprintln!("done in {:?}", started.elapsed());
}
