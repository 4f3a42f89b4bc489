use std::collections::BTreeSet;
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use wirefence_agent::config::ConfigCache;
use wirefence_agent::control::ControlFiles;
use wirefence_agent::daemon::Agent;
use wirefence_agent::enforce::trace::{TraceSpec, Tracer};
use wirefence_agent::load;
use wirefence_agent::model::IfName;
use wirefence_agent::netlink::Netlink;
use wirefence_agent::ownership::Ownership;
use wirefence_agent::policy::{self, Direction};
use wirefence_agent::reconcile::Reconciler;
use wirefence_agent::state::StateDir;
use wirefence_agent::{keys, status, wg};

/// Where every subcommand reads its config when `--config` is not given.
const DEFAULT_CONFIG: &str = "/etc/wirefence/agent.toml";

/// wirefence node agent: WireGuard mesh data plane, reconciled through netlink.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Bring the machine to the state the config describes and keep it there.
    Run {
        /// Agent config (TOML).
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Converge once and exit (non-zero if anything failed).
        #[arg(long)]
        once: bool,
    },
    /// Remove everything the agent owns: interface, routes, rules, nftables table; forwarding
    /// gets back the values it had before the agent changed it.
    Down {
        /// Agent config (TOML).
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Leave the mesh: tell the control plane (the node is removed from every view), stop a
    /// running agent, do what `down` does and forget the credential and the saved view.
    /// When the control plane cannot be told, nothing changes.
    Leave {
        /// Agent config (TOML).
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Rotate the node's WireGuard key (control mode): the running agent makes a new key
    /// pair, proves it to the control plane, switches the interface, and every peer gets the
    /// new public key; connections through the tunnel survive. Interrupted, it finishes by
    /// itself. Static mode has a manual procedure (README, "Rotating keys").
    RotateKey {
        /// Agent config (TOML).
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// How long to wait for the rotation to finish, in seconds.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
        wait_secs: u64,
    },
    /// Show the interface, peers (handshake age, transfer, endpoint) and owned routes.
    Status {
        /// Agent config (TOML).
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Create a private key file (mode 0600) and print its public key.
    Keygen {
        /// Where to write the key; an existing file is never overwritten.
        #[arg(short, long)]
        out: PathBuf,
    },
    /// Validate a config and print what it would do, without touching the kernel.
    Check {
        /// Agent config (TOML).
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Show the policy's decisions for live packets on the tunnel device, until interrupted:
    /// the path taken (flow-cache, conntrack, icmp-error, fragment, new), the verdict and
    /// the deciding rule. Reads the running agent's pins (as root); one trace at a time.
    /// Costs nothing while no trace runs.
    Trace {
        /// Agent config (TOML).
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Source address or prefix of the packets (10.0.0.1, 10.0.0.0/24, fd00::/64).
        #[arg(long, value_parser = parse_net)]
        src: Option<ipnet::IpNet>,
        /// Destination address or prefix of the packets.
        #[arg(long, value_parser = parse_net)]
        dst: Option<ipnet::IpNet>,
        /// Protocol: tcp, udp, icmp, icmpv6, sctp, udplite, gre, esp or a number 0-255.
        #[arg(long, value_parser = parse_trace_proto)]
        proto: Option<u8>,
        /// Port at either end (TCP, UDP, UDP-Lite and SCTP packets).
        #[arg(long)]
        port: Option<u16>,
        /// Stop after this many packets.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
        /// Print JSON lines instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Access policy tools.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Show what the config's [policy] decides for one packet (exit status 0 for allow and
    /// deny alike; non-zero only for bad input).
    Check {
        /// Agent config (TOML).
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Source address.
        src: IpAddr,
        /// Destination address (same family as the source).
        dst: IpAddr,
        /// Protocol and port: tcp/443, udp/53, icmp/8 or icmp/3:1 (type:code), gre, 47.
        proto: String,
        /// Where the packet is seen: ingress (arriving from the tunnel) or egress (leaving
        /// into it).
        #[arg(long, value_enum, default_value_t = CliDirection::Ingress)]
        direction: CliDirection,
        /// A non-first fragment: no port (only rules without ports can match).
        #[arg(long)]
        fragment: bool,
    },
}

/// An address (a host prefix) or a prefix.
fn parse_net(s: &str) -> Result<ipnet::IpNet, String> {
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{s:?} is neither an address nor a prefix (10.0.0.1, 10.0.0.0/24, fd00::/64)"))
}

fn parse_trace_proto(s: &str) -> Result<u8, String> {
    match policy::model::parse_proto(s)? {
        Some(p) => Ok(p),
        None => Err("leave --proto out to trace every protocol".into()),
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CliDirection {
    Ingress,
    Egress,
}

fn main() -> ExitCode {
    // `generate-docs --out DIR` (packaging): man pages and completions of this CLI.
    if let Some(code) = wirefence_docgen::main_hook(<Cli as clap::CommandFactory>::command) {
        return code;
    }
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("WIREFENCE_LOG").unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none())
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    match rt.block_on(dispatch(cli.cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", wirefence_agent::report::chain(e.chain()));
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Run { config, once } => {
            // The parsed peers are kept: a daemon's reload then costs what changed in the file.
            let mut cache = ConfigCache::default();
            let agent = Agent::start(load::load_cached(&config, &mut cache)?).await?;
            if once {
                drop(cache); // nothing to reload: its memory is not held through the pass
                let n = agent.reconcile_once().await?;
                tracing::info!(operations = n, "converged");
                return Ok(());
            }
            agent.with_config_cache(cache).run(&config).await
        }
        Cmd::Down { config } => down(&load::load_effective(&config)?).await,
        Cmd::Leave { config } => {
            let config = load::load_effective(&config)?;
            let Some(cc) = &config.control else {
                anyhow::bail!(
                    "{}: no [control] section: there is no control plane to leave (`down` removes what the agent made)",
                    config.agent.state_dir.display()
                );
            };
            // The control plane first: when it cannot be told, nothing has changed here.
            let files = ControlFiles::new(&config.agent.state_dir);
            match files.credential()? {
                Some(cred) => {
                    let connector =
                        wirefence_agent::control::connect::Connector::new(cc.endpoints.clone(), &cc.transport)?;
                    let version = wirefence_agent::control::client::leave(&connector, &cred)
                        .await
                        .context("tell the control plane the node leaves (nothing was removed)")?;
                    match version {
                        Some(v) => println!("node {} left the mesh (control-plane version {v})", cred.node_id),
                        None => println!("node {} was removed by the control plane already", cred.node_id),
                    }
                }
                None => println!("the node has no credential: it never joined, nothing to tell the control plane"),
            }
            stop_running_agent(&config.agent.state_dir).await?;
            down(&config).await?;
            files.remove_all()?;
            println!("forgot the credential and the saved view ({})", config.agent.state_dir.join("control").display());
            Ok(())
        }
        Cmd::RotateKey { config, wait_secs } => rotate_key(&load::load_effective(&config)?, wait_secs).await,
        Cmd::Status { config, json } => {
            let config = load::load_effective(&config)?;
            let backend = wg::select(
                config.interface.backend,
                &config.interface.userspace_command,
                config.agent.state_dir.clone(),
                Default::default(),
            )?;
            // The state directory: where the forwarding records are.
            let rec = Reconciler::new(Netlink::connect()?, backend, config.routing.protocol)
                .with_policy_dirs(config.agent.state_dir.clone(), None);
            let names = config.peers.iter().filter_map(|p| Some((p.public_key, p.name.clone()?))).collect();
            let dirs = config.policy.as_ref().map(|p| (p.pin_dir.as_path(), config.agent.state_dir.as_path()));
            let mut st = status::collect(&rec, &config.interface.name, &names, dirs).await?;
            st.agent_pid = wirefence_agent::state::lock_holder(&config.agent.state_dir);
            st.passes = wirefence_agent::passes::load(&config.agent.state_dir);
            st.key = status::KeyStatus::read(&config.interface.private_key_file);
            if let Some(p) = &config.policy {
                st.retire_rules_not_in(p.policy.rule_ids());
            }
            if let Some(cc) = &config.control {
                let files = ControlFiles::new(&config.agent.state_dir);
                st.control = Some(files.status()?.unwrap_or_default());
                st.removable_enrollment_key =
                    status::removable_enrollment_key(&files, cc.enrollment_key_file.as_deref());
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                print!("{st}");
            }
            Ok(())
        }
        Cmd::Trace { config, src, dst, proto, port, count, json } => {
            let config = load::load_effective(&config)?;
            let spec = TraceSpec::new(src, dst, proto, port)?;
            trace(&config, &spec, count, json).await
        }
        Cmd::Keygen { out } => {
            let key = keys::generate(&out)?;
            println!("{}", key.public_key());
            Ok(())
        }
        Cmd::Policy { cmd: PolicyCmd::Check { config, src, dst, proto, direction, fragment } } => {
            let loaded = load::load_effective(&config)?;
            let (proto, port) = policy::check::parse_proto_port(&proto, fragment).map_err(anyhow::Error::msg)?;
            let direction = match direction {
                CliDirection::Ingress => Direction::Ingress,
                CliDirection::Egress => Direction::Egress,
            };
            let verdict = policy::check::check(loaded.policy.as_ref(), direction, src, dst, proto, port)
                .map_err(anyhow::Error::msg)?;
            println!("{verdict}");
            Ok(())
        }
        Cmd::Check { config } => {
            let loaded = load::load_effective(&config)?;
            let key_file = &loaded.interface.private_key_file;
            // Before the first run the key does not exist yet: `run` creates it, `check`
            // never does; the rest is checked with a throwaway key.
            let (key, key_note) = match std::fs::symlink_metadata(key_file) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
                    wirefence_agent::model::PrivateKey::generate(),
                    format!("; private key {} does not exist yet: the first run creates it", key_file.display()),
                ),
                _ => (keys::load(key_file).context("check reads the private key but never creates it")?, String::new()),
            };
            let desired = wirefence_agent::desired::desired_state(&loaded, &key)?;
            println!(
                "{}: ok: interface {}, {} peers, {} routes, {} rules{key_note}",
                config.display(),
                desired.ifname,
                desired.peers.len(),
                desired.routes.len(),
                desired.rules.len()
            );
            Ok(())
        }
    }
}

/// `trace`: prints the traced packets until `count` of them, Ctrl-C or SIGTERM; the
/// tracer disarms on the way out.
async fn trace(
    config: &wirefence_agent::config::Config,
    spec: &TraceSpec,
    count: Option<u64>,
    json: bool,
) -> anyhow::Result<()> {
    let Some(p) = &config.policy else {
        anyhow::bail!(
            "no [policy] section: nothing is enforced on {}, so nothing decides packets",
            config.interface.name
        );
    };
    // Before arming: from then on Ctrl-C and SIGTERM end the loop, so the tracer disarms.
    use tokio::signal::unix::{signal, SignalKind};
    let (mut int, mut term) = (signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?);
    let mut tracer = Tracer::start(&p.pin_dir, &config.interface.name, &config.agent.state_dir, spec)?;
    eprintln!("tracing {} (Ctrl-C to stop)", config.interface.name);
    let mut shown = 0u64;
    let result = loop {
        let batch = tokio::select! {
            batch = tracer.next() => batch,
            _ = int.recv() => break Ok(()),
            _ = term.recv() => break Ok(()),
        };
        let batch = match batch {
            Ok(b) => b,
            Err(e) => break Err(e.into()),
        };
        match print_traced(&batch, json, count.map(|c| c - shown)) {
            Ok(n) => shown += n,
            // A closed pipe (`| head`) ends the trace like Ctrl-C.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break Ok(()),
            Err(e) => break Err(e.into()),
        }
        if count.is_some_and(|c| shown >= c) {
            break Ok(());
        }
    };
    let lost = tracer.lost();
    drop(tracer);
    eprintln!(
        "{shown} packets traced{}",
        if lost > 0 { format!(", {lost} lost (the trace ring was full)") } else { String::new() }
    );
    result
}

/// Prints up to `limit` of `batch` (text or JSON lines); returns how many.
fn print_traced(
    batch: &[wirefence_agent::enforce::trace::Traced],
    json: bool,
    limit: Option<u64>,
) -> std::io::Result<u64> {
    let mut out = std::io::stdout().lock();
    let mut n = 0;
    for t in batch.iter().take(limit.map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX))) {
        if json {
            serde_json::to_writer(&mut out, t)?;
        } else {
            write!(out, "{t}")?;
        }
        writeln!(out)?;
        n += 1;
    }
    out.flush()?;
    Ok(n)
}

/// `rotate-key`: the running agent rotates (SIGUSR1); done when the credential names a new
/// key and no next key waits.
async fn rotate_key(config: &wirefence_agent::config::Config, wait_secs: u64) -> anyhow::Result<()> {
    if config.control.is_none() {
        anyhow::bail!(
            "no [control] section: a static node's key is rotated by hand (README, \"Rotating keys\": \
             a new key file, its public key in every peer's config, then the new file here)"
        );
    }
    let files = ControlFiles::new(&config.agent.state_dir);
    let Some(old) = files.credential()?.map(|c| c.public_key) else {
        anyhow::bail!(
            "the node has not registered with the control plane yet: its first key is the one it enrolls with"
        );
    };
    let Some(pid) = wirefence_agent::state::lock_holder(&config.agent.state_dir) else {
        anyhow::bail!(
            "no agent runs on {}: the running agent rotates the key (start it first)",
            config.agent.state_dir.display()
        );
    };
    signal_agent(pid, libc::SIGUSR1).with_context(|| format!("ask the running agent (pid {pid})"))?;
    println!("asked the running agent (pid {pid}) to rotate the key {old}");
    let key_file = &config.interface.private_key_file;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait_secs);
    while std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        // The control plane took the new key (in a registration with it): the peers have it.
        let taken = files.status().ok().flatten().and_then(|s| s.registered_key);
        if let Some(new) = taken.filter(|k| *k != old && !keys::next_path(key_file).exists()) {
            println!("rotated: the node's key is {new} now; the control plane gives it to every peer");
            return Ok(());
        }
    }
    anyhow::bail!(
        "the rotation has not finished within {wait_secs} s (is the control plane reachable?); the agent goes on \
         trying and finishes it by itself: `status` shows the key and the rotation in progress"
    )
}

/// Sends `signal` to the agent `pid` (the holder of its state directory's lock).
fn signal_agent(pid: u32, signal: libc::c_int) -> anyhow::Result<()> {
    let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
    // SAFETY: kill(2) with a pid the kernel's lock table names as the agent's.
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// Stops the agent running on `state_dir` (SIGTERM to the holder of its lock) and waits
/// until it let go of the lock.
async fn stop_running_agent(state_dir: &std::path::Path) -> anyhow::Result<()> {
    let Some(pid) = wirefence_agent::state::lock_holder(state_dir) else { return Ok(()) };
    signal_agent(pid, libc::SIGTERM).with_context(|| format!("stop the running agent (pid {pid})"))?;
    println!("stopping the running agent (pid {pid})");
    for _ in 0..100 {
        if wirefence_agent::state::lock_holder(state_dir).is_none() {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    anyhow::bail!("the running agent (pid {pid}) did not stop within 10 s; run `leave` again once it has")
}

/// `down`: everything the agent owns goes; forwarding gets back what it had.
async fn down(config: &wirefence_agent::config::Config) -> anyhow::Result<()> {
    let mut ownership = Ownership::open(StateDir::open(&config.agent.state_dir)?)?;
    let backend = wg::for_cleanup(ownership.record().backend, config);
    let rec = Reconciler::new(Netlink::connect()?, backend, config.routing.protocol)
        .with_policy_dirs(config.agent.state_dir.clone(), None);
    let rec = &rec;
    ownership
        .release(&config.interface.name, |owned| async move {
            let protocols: BTreeSet<u8> =
                [Some(config.routing.protocol), owned.protocol].into_iter().flatten().collect();
            let pin_roots: BTreeSet<PathBuf> =
                [config.policy.as_ref().map(|p| p.pin_dir.clone()), owned.pin_root].into_iter().flatten().collect();
            let ifnames: Vec<IfName> = owned.interfaces.into_iter().collect();
            let protocols: Vec<u8> = protocols.into_iter().collect();
            let pin_roots: Vec<PathBuf> = pin_roots.into_iter().collect();
            rec.teardown(&ifnames, &protocols, &pin_roots).await
        })
        .await?;
    println!(
        "removed interface {}, its policy programs and maps, every route and rule wirefence owned, \
         its nftables table, and restored the forwarding it changed",
        config.interface.name
    );
    Ok(())
}
