use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use wirefence_agent::config::Config;
use wirefence_agent::daemon::{self, Agent};
use wirefence_agent::netlink::Netlink;
use wirefence_agent::reconcile::Reconciler;
use wirefence_agent::state::StateDir;
use wirefence_agent::{keys, status, wg};

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
        #[arg(short, long)]
        config: PathBuf,
        /// Converge once and exit (non-zero if anything failed).
        #[arg(long)]
        once: bool,
    },
    /// Remove everything the agent owns: interface, routes, rules.
    Down {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Show the interface, peers (handshake age, transfer, endpoint) and owned routes.
    Status {
        #[arg(short, long)]
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
        #[arg(short, long)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
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
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Run { config, once } => {
            let agent = Agent::start(daemon::load(&config)?).await?;
            if once {
                let n = agent.reconcile_once().await?;
                tracing::info!(operations = n, "converged");
                return Ok(());
            }
            agent.run(&config).await
        }
        Cmd::Down { config } => {
            let config = Config::load(&config)?;
            let state = StateDir::open(&config.agent.state_dir)?;
            let mut owned = state.owned()?;
            owned.interfaces.insert(config.interface.name.to_string());
            let backend = wg::for_cleanup(owned.backend.as_deref(), &config);
            let nl = Netlink::connect()?;
            let protocols: std::collections::BTreeSet<u8> =
                [Some(config.routing.protocol), owned.protocol].into_iter().flatten().collect();
            for p in protocols {
                Reconciler::new(nl.clone(), backend.clone(), p).teardown(&owned.ifnames()).await?;
            }
            owned.interfaces.clear();
            state.set_owned(&owned)?;
            println!("removed interface {} and every route and rule wirefence owned", config.interface.name);
            Ok(())
        }
        Cmd::Status { config, json } => {
            let config = Config::load(&config)?;
            let backend = wg::select(
                config.interface.backend,
                &config.interface.userspace_command,
                config.agent.state_dir.clone(),
                Default::default(),
            )?;
            let rec = Reconciler::new(Netlink::connect()?, backend, config.routing.protocol);
            let names = config.peers.iter().filter_map(|p| Some((p.public_key, p.name.clone()?))).collect();
            let st = status::collect(&rec, &config.interface.name, &names).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                print!("{st}");
            }
            Ok(())
        }
        Cmd::Keygen { out } => {
            let key = keys::generate(&out)?;
            println!("{}", key.public_key());
            Ok(())
        }
        Cmd::Check { config } => {
            let loaded = Config::load(&config)?;
            let key = keys::load(&loaded.interface.private_key_file)
                .context("check reads the private key but never creates it")?;
            let desired = wirefence_agent::desired::desired_state(&loaded, &key)?;
            println!(
                "{}: ok: interface {}, {} peers, {} routes, {} rules",
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
