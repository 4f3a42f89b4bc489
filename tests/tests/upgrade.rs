//! Upgrades without a gap: the agent binary is swapped for another build (its eBPF object
//! differs, and its conntrack map has another layout, so a migration runs) and restarted,
//! then swapped back (a downgrade), while a TCP connection streams through the tunnel and a
//! probe loop knocks on a denied port. The stream never stalls a second (its conntrack
//! entry is carried over: the policy allows only a -> b, so b's replies pass only as an
//! established flow), the denied port never answers, `status` answers throughout, and the
//! restart changes nothing in the data plane (no rtnetlink change, the WireGuard peers as
//! they were, no operation applied). Needs root.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wirefence_tests::steady::{applied_ops, wg_state, Monitor};
use wirefence_tests::*;

const T: Duration = Duration::from_secs(20);
const STREAM_PORT: u16 = 7001;
const DENIED_PORT: u16 = 7002;

fn sock(addr: &str, port: u16) -> SocketAddr {
    format!("{addr}:{port}").parse().unwrap()
}

/// The streaming connection: 1 KiB out and back, over and over; the longest time between
/// two completed round trips is the stall.
struct Stream {
    stop: Arc<AtomicBool>,
    worst: Arc<Mutex<Duration>>,
    rounds: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<Result<(), String>>,
}

impl Stream {
    fn start(mut conn: std::net::TcpStream) -> Stream {
        let (stop, rounds) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let worst: Arc<Mutex<Duration>> = Arc::default();
        let (s, w, r) = (stop.clone(), Arc::clone(&worst), rounds.clone());
        let thread = std::thread::spawn(move || {
            conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let chunk = [0x5a_u8; 1024];
            let mut back = [0u8; 1024];
            let mut last = Instant::now();
            while !s.load(Ordering::SeqCst) {
                conn.write_all(&chunk).map_err(|e| format!("write after {} rounds: {e}", r.load(Ordering::SeqCst)))?;
                conn.read_exact(&mut back)
                    .map_err(|e| format!("read after {} rounds: {e}", r.load(Ordering::SeqCst)))?;
                let gap = last.elapsed();
                last = Instant::now();
                let mut worst = w.lock().unwrap();
                *worst = (*worst).max(gap);
                drop(worst);
                r.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(())
        });
        Stream { stop, worst, rounds, thread }
    }

    fn finish(self) -> (Duration, u64) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("stream thread").unwrap_or_else(|e| panic!("the stream broke: {e}"));
        (*self.worst.lock().unwrap(), self.rounds.load(Ordering::SeqCst))
    }
}

/// A loop in its own thread until stopped; returns what `f` reported per round.
struct Loop<T> {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<T>>,
}

impl<T: Send + 'static> Loop<T> {
    fn start(every: Duration, mut f: impl FnMut() -> T + Send + 'static) -> Loop<T> {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut out = Vec::new();
            while !s.load(Ordering::SeqCst) {
                out.push(f());
                std::thread::sleep(every);
            }
            out
        });
        Loop { stop, thread }
    }

    fn finish(self) -> Vec<T> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("loop thread")
    }
}

/// Replaces the installed binary as a package upgrade does (a new file renamed over it).
fn install(from: &Path, installed: &Path) {
    let tmp = installed.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, installed).unwrap();
}

/// The ids of the programs attached to b's tunnel device (both directions), as the kernel
/// lists them: tcx programs, or (`clsact`) the programs of its cls_bpf filters.
fn attached_programs(b: &Host, clsact: bool) -> Vec<u32> {
    if clsact {
        let mut ids = Vec::new();
        for dir in ["ingress", "egress"] {
            let out = run_ok(b.ns.cmd("tc").args(["filter", "show", "dev", &b.ifname, dir]));
            for line in out.lines().filter(|l| l.contains(" bpf ") && l.contains(" handle ")) {
                let id = line.split(" id ").nth(1).and_then(|r| r.split_whitespace().next()?.parse().ok());
                ids.push(id.unwrap_or_else(|| panic!("no program id in: {line}")));
            }
        }
        return ids;
    }
    let ifname = b.ifname.clone();
    in_netns(&b.ns, move || {
        let mut ids = Vec::new();
        for ty in [aya::programs::TcAttachType::Ingress, aya::programs::TcAttachType::Egress] {
            let (_, progs) = aya::programs::SchedClassifier::query_tcx(&ifname, ty).expect("query tcx");
            ids.extend(progs.iter().map(|p| p.id()));
        }
        ids
    })
}

/// `status --json` of the installed binary.
fn status(b: &Host, installed: &Path) -> serde_json::Value {
    let out = run_ok(b.agent_at(installed).args(["status", "--json", "--config"]).arg(b.config_path()));
    serde_json::from_str(&out).expect("status --json")
}

/// The conntrack layout version the build record of b's pins names.
fn recorded_conntrack_version(b: &Host) -> u64 {
    let file = b.dir.join(format!("state/{}.ebpf-build", b.ifname));
    let record: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    record["maps"]["WF_CONNTRACK"]["version"].as_u64().unwrap_or_else(|| panic!("record {record}"))
}

/// Stops b's agent, installs `next` and starts it: the data plane must not change, nothing
/// may be applied, and the new build must have taken over (conntrack in layout `version`).
/// `launcher` is what runs the agent (the binary, or a script running it), `installed` the
/// binary file replaced.
fn swap(
    b: &Host,
    agent: AgentProc,
    (launcher, installed): (&Path, &Path),
    next: &Path,
    version: u64,
    clsact: bool,
) -> AgentProc {
    let monitor = Monitor::start(&b.ns);
    let wg_before = wg_state(b);
    let programs_before = attached_programs(b, clsact);
    assert_eq!(programs_before.len(), 2, "one program per direction before the swap");
    let epoch_before = status(b, launcher)["policy"]["epoch"].clone();
    agent.kill9();
    let offset = std::fs::read_to_string(b.dir.join("agent.log")).unwrap_or_default().len();
    install(next, installed);
    let agent = b.spawn_agent_at(launcher);
    wait_until("the new build converges", T, || {
        agent.log_text().get(offset..).is_some_and(|l| l.contains("converged"))
    });
    // A periodic pass after convergence must be quiet too.
    std::thread::sleep(Duration::from_millis(1500));
    let changes = monitor.stop();
    let log = agent.log_text();
    let since = log.get(offset..).unwrap_or_default();
    assert!(changes.is_empty(), "the upgrade changed the data plane:\n{}\nlog:\n{since}", changes.join("\n"));
    let ops = applied_ops(&log, offset);
    assert!(ops.is_empty(), "the restarted agent applied operations:\n{}", ops.join("\n"));
    assert_eq!(wg_state(b), wg_before, "the upgrade changed the WireGuard peers");
    assert!(since.contains("took over the pins of another build"), "no takeover logged:\n{since}");
    let programs = attached_programs(b, clsact);
    assert_eq!(programs.len(), 2, "one program per direction after the swap: {programs:?}");
    assert!(
        programs.iter().all(|p| !programs_before.contains(p)),
        "the previous build's programs are still attached: {programs_before:?} -> {programs:?}"
    );
    assert!(!since.contains("policy applied"), "the unchanged policy was applied again:\n{since}");
    assert_eq!(recorded_conntrack_version(b), version, "build record after the takeover");
    let st = status(b, launcher);
    assert!(st["policy"].get("other_build").is_none(), "status after the takeover: {st}");
    assert_eq!(st["policy"]["epoch"], epoch_before, "the live policy was not kept: {st}");
    assert_eq!(st["policy"]["attached"], true, "{st}");
    let pins: Vec<String> = std::fs::read_dir(bpffs_root().join(&b.ifname))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!pins.iter().any(|p| p.contains('@')), "moved pins left after the takeover: {pins:?}");
    agent
}

#[test]
fn an_upgrade_and_a_downgrade_keep_connections_policy_and_data_plane() {
    upgrade_and_downgrade(false);
}

/// The same on the clsact path (the kernels before 6.6 have only that), forced on this
/// kernel: the cls_bpf filter is changed in place.
#[test]
fn an_upgrade_and_a_downgrade_on_the_clsact_path() {
    upgrade_and_downgrade(true);
}

/// One upgrade test at a time: the stall they measure is their own, not the other's load.
static SERIAL: Mutex<()> = Mutex::new(());

fn upgrade_and_downgrade(clsact: bool) {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let first = agent_bin();
    let second = agent_next_layout_bin();
    let lab = Lab::new(2);
    let (a, b) = (&lab.hosts[0], &lab.hosts[1]);
    // What b runs: the agent itself, or (clsact) a script running it with the clsact path
    // forced; either way the file swapped is the agent binary.
    let (launcher, installed): (PathBuf, PathBuf) = if clsact {
        let bin = b.dir.join("wirefence-agent.bin");
        let script = b.dir.join("wirefence-agent");
        std::fs::write(&script, format!("#!/bin/sh\nWIREFENCE_TC_ATTACH=clsact exec {} \"$@\"\n", bin.display()))
            .unwrap();
        run_ok(std::process::Command::new("chmod").arg("755").arg(&script));
        (script, bin)
    } else {
        (b.dir.join("wirefence-agent"), b.dir.join("wirefence-agent"))
    };
    install(&first, &installed);
    a.config().peer(b).write();
    let rules = format!(
        "[policy]\npin_dir = \"{}\"\n[[policy.rules]]\nid = \"stream\"\nfrom = [\"{}/32\"]\nto = [\"{}/32\"]\nproto = \"tcp\"\nports = [\"{STREAM_PORT}\"]\n",
        bpffs_root().display(),
        a.overlay_v4,
        b.overlay_v4
    );
    b.config().peer(a).extra(&rules).resync_secs(1).write();
    for port in [STREAM_PORT, DENIED_PORT] {
        echo_server(&b.ns, sock("0.0.0.0", port));
    }
    let _pa = a.spawn_agent();
    let pb = b.spawn_agent_at(&launcher);
    let (allowed, denied) = (sock(&b.overlay_v4, STREAM_PORT), sock(&b.overlay_v4, DENIED_PORT));
    wait_until("the allowed port connects", T, || connect(&a.ns, allowed, Duration::from_millis(500)).is_some());
    assert!(connect(&a.ns, denied, Duration::from_millis(500)).is_none(), "the denied port answered before");
    wait_until("b converged", T, || pb.log_text().contains("converged"));

    let stream = Stream::start(connect(&a.ns, allowed, Duration::from_secs(2)).expect("stream connects"));
    // A second handle on a's namespace for the probe thread, never dropped (the lab's
    // deletes the namespace).
    let a_ns = std::mem::ManuallyDrop::new(Netns { name: a.ns.name.clone() });
    let probes =
        Loop::start(Duration::from_millis(50), move || connect(&a_ns, denied, Duration::from_millis(300)).is_some());
    let (status_bin, config) = (launcher.clone(), b.config_path());
    let b_ns = b.ns.name.clone();
    let statuses = Loop::start(Duration::from_millis(100), move || {
        let out = run(std::process::Command::new("ip")
            .args(["netns", "exec", &b_ns])
            .arg(&status_bin)
            .args(["status", "--json", "--config"])
            .arg(&config));
        let ok = out.status.success()
            && serde_json::from_slice::<serde_json::Value>(&out.stdout).is_ok_and(|v| v["policy"]["epoch"].is_u64());
        (!ok).then(|| String::from_utf8_lossy(&out.stderr).into_owned())
    });
    std::thread::sleep(Duration::from_secs(1));

    let pb = swap(b, pb, (&launcher, &installed), &second, 5, clsact);
    std::thread::sleep(Duration::from_secs(1));
    let pb = swap(b, pb, (&launcher, &installed), &first, 4, clsact);
    std::thread::sleep(Duration::from_secs(1));

    let (stall, rounds) = stream.finish();
    let answered = probes.finish();
    let failed: Vec<String> = statuses.finish().into_iter().flatten().collect();
    eprintln!(
        "upgrade and downgrade ({}): longest stall of the stream {stall:?} over {rounds} round trips; {} probes of the denied port",
        if clsact { "clsact" } else { "tcx" },
        answered.len()
    );
    assert!(stall < Duration::from_secs(1), "the stream stalled {stall:?} across the upgrade");
    assert!(rounds > 100, "the stream hardly ran: {rounds} round trips");
    assert!(!answered.is_empty() && !answered.iter().any(|ok| *ok), "the denied port answered during the upgrade");
    assert!(failed.is_empty(), "status failed during the upgrade:\n{}", failed.join("\n"));
    drop(pb);
}
