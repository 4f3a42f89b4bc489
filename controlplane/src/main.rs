use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser;
use ipnet::IpNet;
use tracing_subscriber::EnvFilter;
use wirefence_control::cli::{
    CertsCommand, Cli, Command, ExpiresIn, KeysCommand, NodesCommand, PolicyCommand, ServeArgs, TlsMode, VerdictArg,
};
use wirefence_control::limits::Limits;
use wirefence_control::model::now_unix;
use wirefence_control::registry::Overlay;
use wirefence_control::server::{serve, ServeConfig, TlsIdentity};
use wirefence_control::{admin_client, certs, output};
use wirefence_proto::v1::{
    ApplyPolicyRequest, ApproveNodeRequest, CreateEnrollmentKeyRequest, DryRunPolicyRequest, GetNodeRequest,
    GetPolicyRequest, IpPrefix, ListEnrollmentKeysRequest, ListFlowsRequest, ListNodesRequest, ReenrollNodeRequest,
    ReleaseNameRequest, RemoveNodeRequest, RequestCredentialRotationRequest, RevokeEnrollmentKeyRequest,
    RuleUsageRequest, SetNodeRequest, SetNodeRoutesRequest, TagList, Verdict,
};

fn main() -> ExitCode {
    // `generate-docs --out DIR` (packaging): man pages and completions of this CLI.
    if let Some(code) = wirefence_docgen::main_hook(<Cli as clap::CommandFactory>::command) {
        return code;
    }
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")
        .and_then(|rt| rt.block_on(run(cli)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `WIREFENCE_LOG`, else `RUST_LOG`, else `info`.
fn log_filter() -> EnvFilter {
    ["WIREFENCE_LOG", "RUST_LOG"]
        .iter()
        .find_map(|var| std::env::var(var).ok().and_then(|v| EnvFilter::try_new(v).ok()))
        .unwrap_or_else(|| EnvFilter::new("info"))
}

async fn run(cli: Cli) -> Result<()> {
    let socket = cli.admin_socket;
    match cli.command {
        Command::Serve(args) => run_serve(args, socket).await,
        Command::Certs(CertsCommand::Init { dir, sans }) => {
            let files = certs::init(&dir, &sans).with_context(|| format!("certs init in {}", dir.display()))?;
            println!("wrote {}", files.ca_cert.display());
            println!("wrote {} (0600)", files.ca_key.display());
            println!("wrote {}", files.server_cert.display());
            println!("wrote {} (0600)", files.server_key.display());
            Ok(())
        }
        Command::Certs(CertsCommand::Renew { dir, sans }) => {
            let files = certs::renew(&dir, &sans).with_context(|| format!("certs renew in {}", dir.display()))?;
            println!("replaced {} (0600)", files.server_key.display());
            println!("replaced {}", files.server_cert.display());
            Ok(())
        }
        command => {
            let mut admin = admin_client::connect(&socket)
                .await
                .with_context(|| format!("connect to the admin socket {}", socket.display()))?;
            let out = admin_command(&mut admin, command).await?;
            std::io::stdout().write_all(out.as_bytes()).context("write to stdout")?;
            Ok(())
        }
    }
}

async fn run_serve(args: ServeArgs, admin_socket: std::path::PathBuf) -> Result<()> {
    let tls = match args.tls_mode()? {
        TlsMode::Tls { cert, key } => Some(TlsIdentity::from_files(&cert, &key)?),
        TlsMode::Insecure => {
            tracing::warn!("serving agents without TLS (--insecure)");
            None
        }
    };
    let enroll_limits = args.enroll_limits();
    let limits = Limits {
        max_connections_per_source: args.max_connections_per_source,
        flows_per_sec: args.flow_rate,
        flow_burst: args.flow_rate.saturating_mul(20),
        ..Limits::default()
    };
    if args.db.has_password() {
        tracing::warn!(
            "the --db URL holds a password, which every local user can read from this process's command line; \
             put it in PGPASSWORD or a PGPASSFILE (the service's environment file) instead"
        );
    }
    let cfg = ServeConfig {
        db: args.db.clone(),
        listen: args.listen,
        tls,
        tls_poll: std::time::Duration::from_secs(args.tls_reload_interval),
        insecure_remote: args.insecure_allow_remote,
        admin_socket,
        overlay: Overlay {
            v4: IpNet::V4(args.overlay_v4),
            v6: IpNet::V6(args.overlay_v6),
            keepalive: args.persistent_keepalive,
        },
        history: args.history,
        enroll_limits,
        limits,
        metrics_listen: args.metrics_listen,
        route_hold_down: std::time::Duration::from_secs(args.route_hold_down),
        flow_retention: wirefence_control::flows::Retention {
            max_age: std::time::Duration::from_secs(args.flow_retention),
            max_records: args.flow_max_records,
        },
    };
    let handle = serve(cfg).await.with_context(|| format!("start the control plane (database {})", args.db))?;
    for addr in &handle.agent_addrs {
        println!("listening on {addr}");
    }
    if let Some(addr) = handle.metrics_addr {
        println!("metrics on http://{addr}/metrics");
    }
    println!("admin socket {}", handle.admin_socket.display());
    tokio::spawn(reload_on_sighup(handle.tls().cloned()));
    let registry = handle.registry().clone();
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch SIGTERM");
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        registry.begin_shutdown();
    });
    handle.wait().await.context("serve")
}

/// SIGHUP: load the certificate files again now (they are also polled). Handled without
/// TLS too, so a reload (`systemctl reload`) never stops a plaintext lab server.
async fn reload_on_sighup(tls: Option<std::sync::Arc<wirefence_control::server::ServerTls>>) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGHUP");
            return;
        }
    };
    while hup.recv().await.is_some() {
        let Some(tls) = &tls else {
            tracing::info!("SIGHUP: serving without TLS, no certificate to reload");
            continue;
        };
        match tls.reload() {
            Ok(()) => tracing::info!(cert = %tls.describe(), "SIGHUP: TLS certificate reloaded for new connections"),
            Err(e) => tracing::warn!(
                cert = %tls.describe(),
                error = %e,
                "SIGHUP: TLS certificate files do not load; new connections keep the current certificate"
            ),
        }
    }
}

fn status(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", e.message()).context(format!("control plane refused ({:?})", e.code()))
}

/// `secs` before `now` (Unix seconds), in Unix ms: the start of a `--since` window.
fn ago_ms(now: i64, secs: u64) -> i64 {
    now.saturating_sub(i64::try_from(secs).unwrap_or(i64::MAX)).saturating_mul(1000)
}

/// A policy file the control plane refused (its message names file:line), else [`status`].
fn rejected(e: tonic::Status, outcome: &str) -> anyhow::Error {
    if e.code() == tonic::Code::InvalidArgument {
        anyhow::anyhow!("{}", e.message()).context(format!("policy rejected; {outcome}"))
    } else {
        status(e)
    }
}

async fn admin_command(admin: &mut admin_client::AdminClient, command: Command) -> Result<String> {
    let now = now_unix();
    Ok(match command {
        Command::Policy(PolicyCommand::Apply { file, dry_run: true, since, json }) => {
            let source = std::fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?;
            let file_name = file.display().to_string();
            let since_unix_ms = ago_ms(now, since);
            let request = DryRunPolicyRequest { file_name: file_name.clone(), source, since_unix_ms };
            let r = admin.dry_run_policy(request).await.map_err(|e| rejected(e, "nothing applied"))?.into_inner();
            if json {
                format!("{:#}\n", output::dry_run_json(&r))
            } else {
                output::dry_run_text(&r, &file_name)
            }
        }
        Command::Policy(PolicyCommand::Apply { file, .. }) => {
            let source = std::fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?;
            let file_name = file.display().to_string();
            let r = admin
                .apply_policy(ApplyPolicyRequest { file_name, source })
                .await
                .map_err(|e| rejected(e, "the running policy is unchanged"))?;
            let r = r.into_inner();
            let mut out =
                format!("applied at version {}: {} rules, {} tests passed\n", r.version, r.rules, r.tests_passed);
            if !r.unmatched_selectors.is_empty() {
                out += &format!(
                    "note: no node matches {} yet (they apply once such a node enrolls)\n",
                    r.unmatched_selectors.join(", ")
                );
            }
            out
        }
        Command::Policy(PolicyCommand::Show { json, usage: true, since }) => {
            let since_unix_ms = ago_ms(now, since);
            let r = admin.get_rule_usage(RuleUsageRequest { since_unix_ms }).await.map_err(status)?.into_inner();
            if json {
                format!("{:#}\n", output::usage_json(&r))
            } else {
                output::usage_text(&r)
            }
        }
        Command::Policy(PolicyCommand::Show { json, .. }) => {
            let p = admin.get_policy(GetPolicyRequest {}).await.map_err(status)?.into_inner();
            if json {
                format!("{:#}\n", output::policy_json(&p))
            } else if p.version == 0 {
                "no policy applied (every node denies everything)\n".into()
            } else {
                format!("# {} (applied at version {})\n{}", p.file_name, p.version, p.source)
            }
        }
        Command::Nodes(NodesCommand::List { json, all }) => {
            let request = ListNodesRequest { include_removed: all };
            let nodes = admin.list_nodes(request).await.map_err(status)?.into_inner().nodes;
            if json {
                format!("{:#}\n", serde_json::Value::Array(nodes.iter().map(output::node_json).collect()))
            } else {
                output::nodes_table(&nodes, now)
            }
        }
        Command::Flows(f) => {
            let request = ListFlowsRequest {
                node: f.node.unwrap_or_default(),
                since_unix_ms: f.since.map_or(0, |s| ago_ms(now, s)),
                verdict: match f.verdict {
                    None => Verdict::Unspecified,
                    Some(VerdictArg::Allow) => Verdict::Allow,
                    Some(VerdictArg::Deny) => Verdict::Deny,
                }
                .into(),
                rule_id: f.rule.unwrap_or_default(),
                one_sided: f.one_sided,
                limit: f.limit,
            };
            let reply = admin.list_flows(request).await.map_err(status)?.into_inner();
            if f.json {
                format!("{:#}\n", output::flows_json(&reply))
            } else {
                output::flows_table(&reply)
            }
        }
        Command::Nodes(NodesCommand::Show { node, json }) => {
            let n = admin.get_node(GetNodeRequest { node }).await.map_err(status)?.into_inner();
            if json {
                format!("{:#}\n", output::node_json(&n))
            } else {
                output::node_text(&n, now)
            }
        }
        Command::Nodes(NodesCommand::Remove { node }) => {
            let r = admin.remove_node(RemoveNodeRequest { node: node.clone() }).await.map_err(status)?.into_inner();
            format!("removed {node} (version {})\n", r.version)
        }
        Command::Nodes(NodesCommand::Approve { node }) => {
            let r = admin.approve_node(ApproveNodeRequest { node: node.clone() }).await.map_err(status)?.into_inner();
            format!("{node} owns its hostname now (version {})\n", r.version)
        }
        Command::Nodes(NodesCommand::Release { hostname }) => {
            admin.release_name(ReleaseNameRequest { hostname: hostname.clone() }).await.map_err(status)?;
            format!("released the name {hostname}\n")
        }
        Command::Nodes(NodesCommand::RotateCredential { node }) => {
            let req = RequestCredentialRotationRequest { node: node.clone() };
            admin.request_credential_rotation(req).await.map_err(status)?;
            format!("{node} rotates its credential at its next registration\n")
        }
        Command::Nodes(NodesCommand::Reenroll { node, expires_in }) => {
            let req = ReenrollNodeRequest { node, expires_in_secs: expires_in };
            let k = admin.reenroll_node(req).await.map_err(status)?.into_inner();
            eprintln!(
                "re-enrollment key {} for node {} (shown once), expires unix {}: give it to the node as its \
                 control.enrollment_key_file, with its state directory and key gone",
                k.key_id, k.node_id, k.expires_unix
            );
            format!("{}\n", k.key)
        }
        Command::Nodes(NodesCommand::Set { node, tags, no_tags, hostname }) => {
            let tags = (no_tags || !tags.is_empty()).then_some(TagList { tags });
            if tags.is_none() && hostname.is_none() {
                anyhow::bail!("nodes set {node}: nothing to change (give --tag, --no-tags or --hostname)");
            }
            let r = admin.set_node(SetNodeRequest { node, tags, hostname }).await.map_err(status)?.into_inner();
            let n = r.node.context("the control plane answered without the node")?;
            format!("version {}\n{}", r.version, output::node_text(&n, now))
        }
        Command::Nodes(NodesCommand::Routes { node, grant, revoke }) => {
            if grant.is_empty() && revoke.is_empty() {
                anyhow::bail!("nodes routes {node}: nothing to change (give --grant or --revoke)");
            }
            let req = SetNodeRoutesRequest {
                node,
                grant: grant.iter().map(|p| IpPrefix::from(*p)).collect(),
                revoke: revoke.iter().map(|p| IpPrefix::from(*p)).collect(),
            };
            let r = admin.set_node_routes(req).await.map_err(status)?.into_inner();
            let n = r.node.context("the control plane answered without the node")?;
            format!("version {}\n{}", r.version, output::node_text(&n, now))
        }
        Command::Keys(KeysCommand::List { json }) => {
            let keys =
                admin.list_enrollment_keys(ListEnrollmentKeysRequest {}).await.map_err(status)?.into_inner().keys;
            if json {
                format!("{:#}\n", serde_json::Value::Array(keys.iter().map(output::key_json).collect()))
            } else {
                output::keys_table(&keys, now)
            }
        }
        Command::Keys(KeysCommand::Revoke { key_id }) => {
            admin.revoke_enrollment_key(RevokeEnrollmentKeyRequest { key_id: key_id.clone() }).await.map_err(status)?;
            format!("revoked {key_id}\n")
        }
        Command::Keys(KeysCommand::Create {
            single_use: _,
            reusable,
            max_uses,
            expires_in,
            hostname,
            tags,
            routes,
            json,
        }) => {
            let routes = routes.into_iter().map(IpPrefix::from).collect();
            let req = CreateEnrollmentKeyRequest {
                expires_in_secs: match expires_in {
                    Some(ExpiresIn::Secs(s)) => Some(s),
                    _ => None,
                },
                never_expires: expires_in == Some(ExpiresIn::Never),
                reusable,
                max_uses: max_uses.unwrap_or(0),
                hostname: hostname.unwrap_or_default(),
                tags,
                routes,
            };
            let k = admin.create_enrollment_key(req).await.map_err(status)?.into_inner();
            if json {
                let v = serde_json::json!({ "key_id": k.key_id, "key": k.key, "expires_unix": k.expires_unix });
                return Ok(format!("{v:#}\n"));
            }
            let expires = if k.expires_unix == 0 { "never".to_string() } else { format!("unix {}", k.expires_unix) };
            eprintln!("enrollment key {} (shown once), expires {expires}", k.key_id);
            format!("{}\n", k.key)
        }
        Command::Serve(_) | Command::Certs(_) => bail!("not an admin command"),
    })
}
