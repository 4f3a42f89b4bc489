//! The agent's Prometheus endpoint against known traffic: a lab of two agents on
//! wireguard-go, b enforcing a policy; the test sends datagrams it counted (allowed and
//! denied, IPv4 and IPv6) and compares what b's endpoint exposes with them. Also: `listen =
//! ""` serves nothing, a bad address is a config error with its position, a taken address
//! fails the start.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, SystemTime};

use wirefence_tests::metrics::{find_sample, promtool_check, sample, scrape, try_scrape};
use wirefence_tests::*;

const T: Duration = Duration::from_secs(20);
const PAYLOAD: usize = 100;

fn sock(addr: &str, port: u16) -> SocketAddr {
    format!("{}:{port}", if addr.contains(':') { format!("[{addr}]") } else { addr.to_owned() }).parse().unwrap()
}

fn default_listen() -> SocketAddr {
    "127.0.0.1:9587".parse().unwrap()
}

/// b lets a send UDP to port 5353 (rule `dns`), nothing else.
fn policy(a: &Host, b: &Host) -> String {
    format!(
        "[policy]\npin_dir = \"{}\"\n[[policy.rules]]\nid = \"dns\"\nfrom = [\"{}/32\", \"{}/128\"]\n\
         to = [\"{}/32\", \"{}/128\"]\nproto = \"udp\"\nports = [\"5353\"]\n",
        bpffs_root().display(),
        a.overlay_v4,
        a.overlay_v6,
        b.overlay_v4,
        b.overlay_v6
    )
}

/// A UDP socket bound in `ns`.
fn udp(ns: &Netns, bind: &str) -> UdpSocket {
    let bind: SocketAddr = bind.parse().unwrap();
    let s = in_netns(ns, move || UdpSocket::bind(bind).unwrap());
    s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    s
}

/// Counters of b's scrape the test compares.
fn counted(m: &str, name: &str) -> f64 {
    find_sample(m, name).unwrap_or(0.0)
}

#[test]
fn agent_metrics_match_the_traffic_sent() {
    require_root();
    let lab = Lab::new(2);
    let (a, b) = (&lab.hosts[0], &lab.hosts[1]);
    // a: metrics off. b: the default address, resync every second (passes to count), its
    // peer a named.
    a.config().peer(b).extra("[metrics]\nlisten = \"\"\n").write();
    let text = b.config().peer(a).resync_secs(1).extra(&policy(a, b)).render();
    let key_line = format!("public_key = \"{}\"", a.public_key);
    b.write_config(&text.replace(&key_line, &format!("name = \"alice\"\n{key_line}")));
    // One dual-stack socket on b receives both families; bound before b's tunnel exists,
    // so every datagram the policy lets in reaches it.
    let rx = udp(&b.ns, "[::]:5353");
    let tx = [udp(&a.ns, "0.0.0.0:0"), udp(&a.ns, "[::]:0")];
    let (_pa, _pb) = (a.spawn_agent(), b.spawn_agent());
    let dst = [&b.overlay_v4, &b.overlay_v6];
    let mut buf = [0u8; 2048];
    let mut received = 0u64;
    // The tunnel and policy are up once a datagram of each family arrives.
    for (f, v6) in [(0, false), (1, true)] {
        wait_until(&format!("a datagram reaches {}:5353", dst[f]), T, || {
            // Unreachable until a's agent routed the overlay.
            let _ = tx[f].send_to(&[0u8; PAYLOAD], sock(dst[f], 5353));
            let mut arrived = false;
            while let Ok((_, from)) = rx.recv_from(&mut buf) {
                received += 1;
                let from_v6 = matches!(from, SocketAddr::V6(s) if s.ip().to_ipv4_mapped().is_none());
                arrived |= from_v6 == v6;
            }
            arrived
        });
    }
    // Late probe copies drain before the baseline.
    while rx.recv(&mut buf).is_ok() {
        received += 1;
    }
    let before = scrape(&b.ns, default_listen());
    promtool_check(&before);
    assert!(try_scrape(&a.ns, default_listen()).is_none(), "a has listen = \"\" and serves nothing");

    // Known traffic: per family, `allowed` datagrams to 5353 and `denied` to 5354.
    let (allowed, denied) = ([20u64, 13], [7u64, 5]);
    for f in 0..2 {
        for _ in 0..denied[f] {
            tx[f].send_to(&[0u8; PAYLOAD], sock(dst[f], 5354)).unwrap();
        }
        for _ in 0..allowed[f] {
            tx[f].send_to(&[0u8; PAYLOAD], sock(dst[f], 5353)).unwrap();
        }
    }
    for i in 0..allowed[0] + allowed[1] {
        rx.recv(&mut buf).unwrap_or_else(|e| panic!("allowed datagram {i} lost: {e}"));
        received += 1;
    }
    // IP header + UDP header + payload, as the classifier sees the packet on the tunnel.
    let size = |f: usize| (if f == 0 { 20 } else { 40 } + 8 + PAYLOAD) as f64;
    let delta = |m: &str, name: &str| counted(m, name) - counted(&before, name);
    let dns_packets = "wirefence_agent_rule_packets_total{rule=\"dns\"}";
    let denied_packets = "wirefence_agent_dropped_packets_total{reason=\"denied\"}";
    let want_denied = (denied[0] + denied[1]) as f64;
    wait_until("the denied datagrams are counted", T, || {
        delta(&scrape(&b.ns, default_listen()), denied_packets) >= want_denied
    });
    let after = scrape(&b.ns, default_listen());
    promtool_check(&after);

    assert_eq!(delta(&after, dns_packets), (allowed[0] + allowed[1]) as f64, "rule dns packets");
    assert_eq!(
        delta(&after, "wirefence_agent_rule_bytes_total{rule=\"dns\"}"),
        allowed[0] as f64 * size(0) + allowed[1] as f64 * size(1),
        "rule dns bytes"
    );
    assert_eq!(counted(&after, dns_packets), received as f64, "since start: every datagram b received");
    assert_eq!(delta(&after, denied_packets), want_denied, "denied packets");
    assert_eq!(
        delta(&after, "wirefence_agent_dropped_bytes_total{reason=\"denied\"}"),
        denied[0] as f64 * size(0) + denied[1] as f64 * size(1),
        "denied bytes"
    );
    for reason in ["malformed", "uninitialized", "not_ip"] {
        assert_eq!(
            sample(&after, &format!("wirefence_agent_dropped_packets_total{{reason=\"{reason}\"}}")),
            0.0,
            "{reason}"
        );
    }
    assert_eq!(sample(&after, "wirefence_agent_events_lost_total"), 0.0);
    assert_eq!(sample(&after, "wirefence_agent_flow_events_dropped_total"), 0.0);
    // One UDP flow per family (the denied ones make no entry).
    assert_eq!(sample(&after, "wirefence_agent_conntrack_entries"), 2.0);
    assert_eq!(sample(&after, "wirefence_agent_scrape_source_failed{source=\"policy\"}"), 0.0);

    // The peer, by its configured name: traffic both ways (handshakes, keepalives, data).
    let peer = format!("peer=\"alice\",public_key=\"{}\"", a.public_key);
    let received = sample(&after, &format!("wirefence_agent_peer_received_bytes_total{{{peer}}}"));
    assert!(received >= (allowed[0] + allowed[1]) as f64 * PAYLOAD as f64, "received {received}");
    assert!(sample(&after, &format!("wirefence_agent_peer_sent_bytes_total{{{peer}}}")) > 0.0);
    let handshake = sample(&after, &format!("wirefence_agent_peer_last_handshake_timestamp_seconds{{{peer}}}"));
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(handshake > now - 120.0 && handshake <= now + 1.0, "last handshake {handshake}, now {now}");

    // Reconcile passes (one a second): the histogram counts each, and all went well.
    let passes = |m: &str| sample(m, "wirefence_agent_reconcile_duration_seconds_count");
    let ok = |m: &str| sample(m, "wirefence_agent_reconcile_passes_total{result=\"ok\"}");
    assert!(passes(&after) >= 1.0 && passes(&after) == ok(&after), "{after}");
    let start = passes(&after);
    wait_until("two more reconcile passes", T, || passes(&scrape(&b.ns, default_listen())) >= start + 2.0);
    let later = scrape(&b.ns, default_listen());
    assert_eq!(find_sample(&later, "wirefence_agent_reconcile_passes_total{result=\"failed\"}"), None, "{later}");
    assert!(later.contains("wirefence_agent_build_info{version=\""), "{later}");
}

#[test]
fn a_bad_or_taken_metrics_address_stops_the_agent_with_a_clear_error() {
    require_root();
    let lab = Lab::new(1);
    let h = &lab.hosts[0];
    h.config().extra("[metrics]\nlisten = \"localhost:9587\"\n").write();
    let out = run(h.agent().args(["check", "--config"]).arg(h.config_path()));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "check accepted a bad metrics.listen");
    let at = format!("{}:", h.config_path().display());
    assert!(err.contains(&at) && err.contains("metrics.listen: \"localhost:9587\" is not ip:port"), "{err}");
    let run_once = h.run_once();
    assert!(!run_once.status.success());
    assert!(String::from_utf8_lossy(&run_once.stderr).contains("metrics.listen"), "run refuses it too");

    // A taken address: the daemon does not start (and says which address).
    let _taken = in_netns(&h.ns, || std::net::TcpListener::bind("127.0.0.1:9587").unwrap());
    h.config().write();
    let mut agent = h.spawn_agent();
    wait_until("the agent exits", T, || !agent.running());
    let log = agent.log_text();
    assert!(log.contains("metrics.listen 127.0.0.1:9587") && log.contains("in use"), "{log}");
}

/// Expiry (Unix seconds) of the first certificate in a PEM file.
fn not_after(pem: &std::path::Path) -> i64 {
    let text = std::fs::read(pem).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&text).expect("a PEM certificate");
    pem.parse_x509().expect("an X.509 certificate").validity().not_after.timestamp()
}

/// A server certificate for both control-plane addresses from the lab's CA, expiring in
/// `days`, written as server.pem and server.key into a new directory.
fn mint_server_cert(ca_dir: &std::path::Path, days: i64) -> TempDir {
    use wirefence_tests::control::{CP_V4, CP_V6};
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca.key")).unwrap()).unwrap();
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(ca_dir.join("ca.pem")).unwrap(), ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![CP_V4.to_owned(), CP_V6.to_owned()]).unwrap();
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
    let cert = params.signed_by(&key, &issuer).unwrap();
    let dir = TempDir::new();
    std::fs::write(dir.0.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.0.join("server.key"), key.serialize_pem()).unwrap();
    std::fs::set_permissions(dir.0.join("server.key"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    dir
}

/// The outage this guards against: the expiry probe looked at one address family while the
/// other served another certificate. Here IPv6 is the control plane (a one-year
/// certificate) and IPv4 a replica still serving a certificate that expires in 20 days,
/// from the same CA. The agent reports each family's expiry, and so does the control plane
/// (the earliest any agent reports).
#[test]
fn control_mode_metrics_and_certificate_expiry_per_address_family() {
    use wirefence_tests::control::{ControlPlane, CP_PORT, CP_V4, CP_V6};
    require_root();
    let lab = Lab::new(1);
    let h = &lab.hosts[0];
    let mut cp = ControlPlane::start(&lab);
    let (v4, v6) = (format!("{CP_V4}:{CP_PORT}"), format!("[{CP_V6}]:{CP_PORT}"));
    cp.set_listen(std::slice::from_ref(&v6));
    cp.restart();
    let stale = mint_server_cert(cp.tls_dir(), 20);
    let _replica = cp.replica(&v4, stale.0.clone());
    let (v4_expiry, v6_expiry) = (not_after(&stale.0.join("server.pem")), not_after(&cp.tls_dir().join("server.pem")));
    assert!(v6_expiry - v4_expiry > 300 * 86_400, "the two certificates differ: {v4_expiry} {v6_expiry}");

    // The control plane first (the replica has another database), then the replica.
    h.write_bound_control_config(&cp, &["server"]);
    let text = std::fs::read_to_string(h.config_path()).unwrap();
    let endpoints = text.lines().find(|l| l.starts_with("endpoints = ")).unwrap().to_owned();
    h.write_config(&text.replace(&endpoints, &format!("endpoints = [\"{v6}\", \"{v4}\"]")));
    assert!(cp
        .apply_policy("[[rules]]\nid = \"ping\"\nfrom = [\"*\"]\nto = [\"*\"]\nproto = \"icmp\"\n")
        .status
        .success());
    let _agent = h.spawn_agent();

    let expiry =
        |family: &str| format!("wirefence_agent_control_certificate_expiry_timestamp_seconds{{family=\"{family}\"}}");
    wait_until("the agent applied the control plane's view", T, || {
        try_scrape(&h.ns, default_listen())
            .is_some_and(|m| find_sample(&m, "wirefence_agent_control_applied_version").is_some_and(|v| v > 0.0))
    });
    wait_until("the certificate probe", T, || find_sample(&scrape(&h.ns, default_listen()), &expiry("ipv6")).is_some());
    let m = scrape(&h.ns, default_listen());
    promtool_check(&m);
    assert_eq!(sample(&m, &expiry("ipv4")), v4_expiry as f64, "IPv4 serves the replica's certificate");
    assert_eq!(sample(&m, &expiry("ipv6")), v6_expiry as f64, "IPv6 serves the control plane's");
    for family in ["ipv4", "ipv6"] {
        let probed = |what: &str| {
            sample(&m, &format!("wirefence_agent_control_certificate_probe_{what}{{family=\"{family}\"}}"))
        };
        assert_eq!((probed("addresses"), probed("verified")), (1.0, 1.0), "{family}");
    }
    assert_eq!(sample(&m, "wirefence_agent_control_connected"), 1.0);
    let applied = h.control_status()["applied_version"].as_u64().unwrap();
    assert_eq!(sample(&m, "wirefence_agent_control_applied_version"), applied as f64);

    // The control plane learns both from the agent's reports (with its statistics, every 10 s).
    let reported = |family: &str| {
        format!("wirefence_control_agent_reported_certificate_expiry_timestamp_seconds{{family=\"{family}\"}}")
    };
    wait_until("the control plane's earliest reported expiry", T, || {
        find_sample(&scrape(&lab.switch, cp.metrics_addr()), &reported("ipv4")).is_some()
    });
    let c = scrape(&lab.switch, cp.metrics_addr());
    promtool_check(&c);
    assert_eq!(sample(&c, &reported("ipv4")), v4_expiry as f64);
    assert_eq!(sample(&c, &reported("ipv6")), v6_expiry as f64);
    assert_eq!(sample(&c, "wirefence_control_certificate_expiry_timestamp_seconds"), v6_expiry as f64);

    // `status` shows both families' certificates, not only the one its session uses.
    wait_until("status shows the probe's expiry per family", T, || {
        let st = h.control_status();
        st["cert_expiry_ipv4"].as_i64() == Some(v4_expiry) && st["cert_expiry_ipv6"].as_i64() == Some(v6_expiry)
    });
}
