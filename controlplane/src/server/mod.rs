//! Serving: the agent service (plus health and reflection) on every TCP listen address,
//! with TLS unless explicitly insecure, and the admin service on a 0600 Unix socket.
//!
//! [`serve`] binds everything before returning, so a caller (the CLI, a test, a
//! benchmark) can connect as soon as it has the [`ServerHandle`].

pub mod admin;
pub mod agent;
pub mod listener;
pub mod lock;
pub mod tls;

use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::grpc::admin_service_server::AdminServiceServer;
use crate::grpc::agent_service_server::AgentServiceServer;
use nix::sys::stat::{umask, Mode};
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinSet;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;

use crate::limits::Limits;
use crate::registry::{Overlay, Registry, DEFAULT_HISTORY};
use crate::store::DbLocation;
use crate::Error;

pub use admin::AdminSvc;
pub use agent::AgentSvc;
pub use tls::{ServerTls, TlsIdentity};

#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// A SQLite file or a PostgreSQL URL.
    pub db: DbLocation,
    /// Agent listen addresses (port 0 = any free port).
    pub listen: Vec<SocketAddr>,
    /// `None` = plaintext (the CLI requires `--insecure` for that), on loopback addresses
    /// only unless `insecure_remote`.
    pub tls: Option<TlsIdentity>,
    /// How often the certificate files are checked for a change (reloaded when changed).
    pub tls_poll: Duration,
    /// Allow plaintext on non-loopback addresses (`--insecure-allow-remote`).
    pub insecure_remote: bool,
    pub admin_socket: PathBuf,
    pub overlay: Overlay,
    /// Global states kept for resuming streams.
    pub history: usize,
    /// Enrollment rate limits per source address and per key.
    pub enroll_limits: crate::enroll::EnrollLimits,
    /// What one client may cost (connections, handshakes, streams, messages, rates).
    pub limits: Limits,
    /// Where to serve Prometheus metrics (`GET /metrics`); `None`: nowhere.
    pub metrics_listen: Option<SocketAddr>,
    /// How long a recovered route group member of higher priority must stay healthy
    /// before it takes the prefix back from the current primary (`--route-hold-down`).
    pub route_hold_down: Duration,
    /// How long and how many flow records are kept (`--flow-retention`, `--flow-max-records`).
    pub flow_retention: crate::flows::Retention,
}

impl ServeConfig {
    /// Defaults for everything but the paths; listens on 127.0.0.1:0, plaintext.
    pub fn new(db: impl Into<DbLocation>, admin_socket: impl Into<PathBuf>) -> ServeConfig {
        ServeConfig {
            db: db.into(),
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
            tls: None,
            tls_poll: DEFAULT_TLS_POLL,
            insecure_remote: false,
            admin_socket: admin_socket.into(),
            overlay: Overlay::default(),
            history: DEFAULT_HISTORY,
            enroll_limits: crate::enroll::EnrollLimits::default(),
            limits: Limits::default(),
            metrics_listen: None,
            route_hold_down: crate::election::DEFAULT_HOLD_DOWN,
            flow_retention: crate::flows::Retention::default(),
        }
    }
}

/// A running control plane.
pub struct ServerHandle {
    /// The bound agent addresses, in `listen` order (real ports when 0 was asked).
    pub agent_addrs: Vec<SocketAddr>,
    /// The bound metrics address, if any.
    pub metrics_addr: Option<SocketAddr>,
    pub admin_socket: PathBuf,
    registry: Arc<Registry>,
    tls: Option<Arc<ServerTls>>,
    tasks: JoinSet<Result<(), tonic::transport::Error>>,
    /// SQLite: held until the handle is dropped (after shutdown), so no second server
    /// opens the file meanwhile.
    _db_lock: Option<lock::DbLock>,
}

/// How often `serve` checks the certificate files by default.
pub const DEFAULT_TLS_POLL: Duration = Duration::from_secs(5);

/// How long in-flight calls get to finish once shutdown begins.
const DRAIN: Duration = Duration::from_secs(5);

impl ServerHandle {
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The agent listener's certificate (`None`: plaintext).
    pub fn tls(&self) -> Option<&Arc<ServerTls>> {
        self.tls.as_ref()
    }

    /// Ends every stream (`Unavailable`), stops the listeners and removes the admin socket.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        self.registry.begin_shutdown();
        let mut first_err = None;
        let drained = tokio::time::timeout(DRAIN, async {
            while let Some(r) = self.tasks.join_next().await {
                if let Ok(Err(e)) = r {
                    first_err.get_or_insert(Error::Transport(e));
                }
            }
        })
        .await;
        if drained.is_err() {
            self.tasks.abort_all();
        }
        let _ = std::fs::remove_file(&self.admin_socket);
        first_err.map_or(Ok(()), Err)
    }

    /// Runs until a listener fails or [`Registry::begin_shutdown`] is called, then shuts
    /// down.
    pub async fn wait(mut self) -> Result<(), Error> {
        let mut signal = self.registry.shutdown_signal();
        let failed = tokio::select! {
            Some(r) = self.tasks.join_next() => match r {
                Ok(Err(e)) => Some(Error::Transport(e)),
                _ => None,
            },
            _ = crate::registry::stopped(&mut signal) => None,
        };
        let shut = self.shutdown().await;
        match failed {
            Some(e) => Err(e),
            None => shut,
        }
    }
}

fn bind_tcp(addr: SocketAddr) -> Result<TcpListener, Error> {
    use socket2::{Domain, Protocol, Socket, Type};
    let bind_err = |source| Error::Bind { addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(bind_err)?;
    if addr.is_ipv6() {
        // IPv4 and IPv6 are listed separately; [::] must not also take the IPv4 port.
        socket.set_only_v6(true).map_err(bind_err)?;
    }
    socket.set_reuse_address(true).map_err(bind_err)?;
    socket.set_nonblocking(true).map_err(bind_err)?;
    socket.bind(&addr.into()).map_err(bind_err)?;
    socket.listen(1024).map_err(bind_err)?;
    TcpListener::from_std(socket.into()).map_err(bind_err)
}

/// `path` must be owned by us (or root) and have none of the `forbidden` mode bits: others
/// able to write a database directory could swap the database; to read a key, steal it.
fn check_private(path: &Path, forbidden: u32) -> Result<(), Error> {
    let meta = std::fs::metadata(path).map_err(Error::io("inspect", path))?;
    let refuse = |why: String| Err(Error::NotPrivate { path: path.to_owned(), why });
    let mode = meta.permissions().mode() & 0o7777;
    if mode & forbidden != 0 {
        return refuse(format!("mode {mode:04o} opens it to group or others (chmod go-rwx it)"));
    }
    let uid = meta.uid();
    if uid != 0 && uid != nix::unistd::geteuid().as_raw() {
        return refuse(format!("owned by uid {uid}"));
    }
    Ok(())
}

/// The admin socket's directory must be writable by its owner only (and owned by us or
/// root): whoever else can write it could swap the socket for their own.
fn check_admin_dir(dir: &Path) -> Result<(), Error> {
    let meta = std::fs::metadata(dir).map_err(Error::io("inspect directory", dir))?;
    let refuse = |why: String| Err(Error::AdminSocketDir { path: dir.to_owned(), why });
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return refuse(format!("writable by group or others (mode {mode:04o})"));
    }
    let uid = meta.uid();
    if uid != 0 && uid != nix::unistd::geteuid().as_raw() {
        return refuse(format!("owned by uid {uid}"));
    }
    Ok(())
}

/// Binds the admin socket 0600 without a window: bind under a temporary name with umask
/// 0o177, so the socket is created 0600, then rename over the final path.
fn bind_admin(path: &Path) -> Result<UnixListener, Error> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(Error::AdminSocketInUse(path.to_owned()));
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(Error::io("create directory", dir))?;
    }
    check_admin_dir(dir)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    // bind(2) takes the mode from the umask; a chmod afterwards would leave a window in
    // which anyone could connect. The umask is process-wide, but while it is set other
    // threads can only create files with fewer permissions, never more.
    let old = umask(Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(&tmp);
    umask(old);
    let listener = bound.map_err(Error::io("bind admin socket", &tmp))?;
    std::fs::rename(&tmp, path).map_err(Error::io("rename admin socket to", path))?;
    Ok(listener)
}

/// Plaintext is for labs on one machine: refused on a non-loopback address unless the
/// operator said so explicitly.
fn check_insecure(cfg: &ServeConfig) -> Result<(), Error> {
    if cfg.tls.is_some() {
        return Ok(());
    }
    match cfg.listen.iter().find(|a| !a.ip().is_loopback()) {
        Some(addr) if !cfg.insecure_remote => Err(Error::InsecureRemote(*addr)),
        Some(addr) => {
            tracing::warn!(
                "SERVING AGENTS WITHOUT TLS ON {addr} (--insecure-allow-remote): credentials and \
                 views cross the network in the clear"
            );
            Ok(())
        }
        None => Ok(()),
    }
}

/// The reflection service's contents (the admin service is only on the Unix socket, so it
/// is not advertised on the agent listeners).
fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(wirefence_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(<AgentServiceServer<AgentSvc> as tonic::server::NamedService>::NAME)
        .with_service_name("grpc.health.v1.Health")
        .with_service_name("grpc.reflection.v1.ServerReflection")
        .with_service_name("grpc.reflection.v1alpha.ServerReflection")
}

/// Opens the store and starts serving; returns once every listener is bound.
pub async fn serve(cfg: ServeConfig) -> Result<ServerHandle, Error> {
    check_insecure(&cfg)?;
    if let Some(file) = cfg.db.file() {
        let db_dir = file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if db_dir.exists() {
            check_private(db_dir, 0o022)?;
        }
    }
    let db_lock = cfg.db.file().map(lock::DbLock::acquire).transpose()?;
    let tls = cfg.tls.as_ref().map(ServerTls::new).transpose()?.map(Arc::new);
    let limits = cfg.limits;
    let registry = Arc::new(
        Registry::open_with(&cfg.db, cfg.overlay, cfg.history, limits)
            .await?
            .with_enroll_limits(cfg.enroll_limits)
            .with_hold_down(cfg.route_hold_down)
            .with_flow_retention(cfg.flow_retention),
    );
    let agent =
        AgentServiceServer::new(AgentSvc { registry: registry.clone() }).max_decoding_message_size(limits.max_message);
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<AgentServiceServer<AgentSvc>>().await;
    // Reflection describes what this listener serves, in both versions of the protocol
    // (older grpcurl releases ask v1alpha only).
    let reflection = reflection_builder().build_v1()?;
    let reflection_v1alpha = reflection_builder().build_v1alpha()?;

    let mut tasks = JoinSet::new();
    let coalescer = registry.clone();
    tasks.spawn(async move {
        coalescer.run_coalescer().await;
        Ok(())
    });
    let election = registry.clone();
    tasks.spawn(async move {
        election.run_election().await;
        Ok(())
    });
    let flows = registry.clone();
    tasks.spawn(async move {
        flows.run_flow_writer().await;
        Ok(())
    });
    let follower = registry.clone();
    tasks.spawn(async move {
        follower.run_follower().await;
        Ok(())
    });
    let mut agent_addrs = Vec::new();
    for addr in &cfg.listen {
        let listener = bind_tcp(*addr)?;
        let local = listener.local_addr().map_err(|source| Error::Bind { addr: *addr, source })?;
        // No server-wide `timeout`: Report is a long-lived client stream; the handlers time
        // their unary parts themselves (limits.request_timeout).
        let router = Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .max_concurrent_streams(limits.max_streams_per_connection)
            .http2_max_pending_accept_reset_streams(Some(limits.max_pending_reset_streams))
            .http2_max_local_error_reset_streams(Some(limits.max_local_error_resets))
            .http2_max_header_list_size(limits.max_header_list)
            .add_service(health.clone())
            .add_service(reflection.clone())
            .add_service(reflection_v1alpha.clone())
            .add_service(agent.clone());
        let incoming = listener::incoming(listener, tls.clone(), &limits);
        let mut signal = registry.shutdown_signal();
        tasks.spawn(async move {
            router
                .serve_with_incoming_shutdown(incoming, async move {
                    crate::registry::stopped(&mut signal).await;
                })
                .await
        });
        tracing::info!(tls = tls.is_some(), "listening on {local}");
        agent_addrs.push(local);
    }

    // No node may advertise the control plane's own address as its endpoint.
    registry.gate.set_listen(&agent_addrs);
    let admin_listener = bind_admin(&cfg.admin_socket)?;
    let admin = AdminServiceServer::new(AdminSvc { registry: registry.clone() });
    let mut signal = registry.shutdown_signal();
    tasks.spawn(async move {
        Server::builder()
            .add_service(admin)
            .serve_with_incoming_shutdown(UnixListenerStream::new(admin_listener), async move {
                crate::registry::stopped(&mut signal).await;
            })
            .await
    });
    let mut metrics_addr = None;
    if let Some(addr) = cfg.metrics_listen {
        let listener = crate::metrics::bind(addr).await?;
        let local = listener.local_addr().map_err(|source| Error::Bind { addr, source })?;
        let (registry, tls, mut signal) = (registry.clone(), tls.clone(), registry.shutdown_signal());
        let stopped = async move { crate::registry::stopped(&mut signal).await };
        tasks.spawn(async move {
            if let Err(e) = crate::metrics::serve(listener, registry, tls, stopped).await {
                tracing::error!(error = %e, "metrics listener failed");
            }
            Ok(())
        });
        tracing::info!("metrics on http://{local}/metrics");
        metrics_addr = Some(local);
    }
    if let Some(tls) = &tls {
        let (tls, mut signal) = (tls.clone(), registry.shutdown_signal());
        let stopped = async move { crate::registry::stopped(&mut signal).await };
        tasks.spawn(async move {
            tls::watch(tls, cfg.tls_poll, stopped).await;
            Ok(())
        });
    }
    tracing::info!(socket = %cfg.admin_socket.display(), version = registry.current().version, "admin socket ready");
    Ok(ServerHandle {
        agent_addrs,
        metrics_addr,
        admin_socket: cfg.admin_socket,
        registry,
        tls,
        tasks,
        _db_lock: db_lock,
    })
}
