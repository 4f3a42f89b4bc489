//! `run`: loads the config, adopts what the kernel has, then keeps it converged. Any change
//! of the config file (or SIGHUP), of the kernel's links/addresses/routes/rules, or the death
//! of a userspace daemon triggers a pass; a periodic pass backs them up.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::sync::Notify;

use crate::config::ConfigCache;
use crate::control::{self, ApplyRequest, ControlConfig, ControlFiles, ControlView, ViewRejected};
use crate::hot_loop::HotLoopGuard;
use crate::keys;
use crate::load::{self, Loaded};
use crate::metrics::{self, Metrics};
use crate::model::{Desired, PrivateKey};
use crate::netlink::Netlink;
use crate::ownership::{Claim, Ownership};
use crate::reconcile::{Applied, ReconcileError, Reconciler};
use crate::state::StateDir;
use crate::supervisor::Supervisor;
use crate::wg;

/// The least time between two conntrack sweeps (each walks the whole table).
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

pub struct Agent {
    pub loaded: Loaded,
    /// The state directory's ownership record (and its lock).
    ownership: Ownership,
    pub reconciler: Reconciler,
    pub wake: Arc<Notify>,
    /// Control mode: views to apply, from the control-plane client.
    control: Option<Control>,
    /// The peers of the config file as last read, for fast reloads.
    config_cache: ConfigCache,
    /// Served by `run` at `[metrics] listen`; fed here, read at each scrape.
    metrics: Arc<Metrics>,
    /// SIGUSR1 (`rotate-key`), handled from before the state directory's lock is taken:
    /// `rotate-key` signals the lock holder, whose default action would be to die.
    usr1: tokio::signal::unix::Signal,
    /// Flow events from the policy programs for the control-plane client (without one,
    /// they fill up to its bound and are dropped).
    flows: Arc<crate::enforce::flows::FlowQueue>,
}

struct Control {
    updates: mpsc::Receiver<ApplyRequest>,
    /// The view the current desired state was built from.
    view: Option<ControlView>,
    /// What the client advertises; a reload that changes it makes the client register again.
    advertised: tokio::sync::watch::Sender<control::Advertised>,
    /// A key rotation's switch to the next key, which only the daemon makes.
    key_switches: mpsc::Receiver<control::KeySwitch>,
    /// SIGUSR1 (`rotate-key`) wakes the client to rotate to the next key.
    rotate: Arc<Notify>,
}

impl Agent {
    /// Opens the state directory (taking its lock), picks the backend and removes links a
    /// previous run owned under another name or backend, and routes and rules of another
    /// protocol number.
    pub async fn start(loaded: Loaded) -> anyhow::Result<Agent> {
        let usr1 = signal(SignalKind::user_defined1())?;
        let c = &loaded.config;
        let wake = Arc::new(Notify::new());
        let backend =
            wg::select(c.interface.backend, &c.interface.userspace_command, c.agent.state_dir.clone(), wake.clone())?;
        let nl = Netlink::connect()?;
        let mut ownership = Ownership::open(StateDir::open(&c.agent.state_dir)?)?;
        let pin_root = c.policy.as_ref().map(|p| p.pin_dir.clone()).or(ownership.record().pin_root.clone());
        let reconciler = Reconciler::new(nl, backend.clone(), c.routing.protocol)
            .with_policy_dirs(c.agent.state_dir.clone(), pin_root.clone());
        let claim = Claim {
            ifname: loaded.desired.ifname.clone(),
            backend: backend.kind(),
            protocol: c.routing.protocol,
            pin_root,
        };
        let (rec, protocol) = (&reconciler, claim.protocol);
        ownership
            .adopt(&claim, |left| async move {
                if let Some(old) = left.protocol {
                    tracing::info!(
                        old,
                        new = protocol,
                        "route protocol changed; removing routes and rules of the old one"
                    );
                    rec.remove_routes_and_rules(old).await?;
                }
                // A link of another backend needs that backend's cleanup; deleting it is the same.
                rec.remove_links(&left.links).await?;
                Ok::<_, anyhow::Error>(())
            })
            .await?;
        let health = c.control.as_ref().map(|_| Arc::new(control::ControlHealth::default()));
        let flows = Arc::new(crate::enforce::flows::FlowQueue::default());
        let metrics = Arc::new(Metrics::new(backend.clone(), health.clone(), metrics_target(&loaded), flows.clone()));
        let control = match (&c.control, health) {
            (Some(cc), Some(health)) => Some(start_client(cc, &loaded, backend, health, flows.clone())?),
            _ => None,
        };
        Ok(Agent {
            loaded,
            ownership,
            reconciler,
            wake,
            control,
            config_cache: ConfigCache::default(),
            metrics,
            usr1,
            flows,
        })
    }

    /// Keeps the parsed peers of the config `loaded` came from (see [`load_cached`]).
    pub fn with_config_cache(mut self, cache: ConfigCache) -> Self {
        self.config_cache = cache;
        self
    }

    pub async fn reconcile_once(&self) -> anyhow::Result<usize> {
        Ok(self.pass().await?.ops.len())
    }

    /// One full reconcile pass of the desired state, timed and counted for the metrics.
    async fn pass(&self) -> Result<Applied, ReconcileError> {
        let started = std::time::Instant::now();
        let result = self.reconciler.reconcile(&self.loaded.desired).await;
        self.metrics.pass(started.elapsed(), &result);
        result
    }

    /// The desired state changed: the metrics read the new interface, pins and peer names.
    fn loaded_changed(&self) {
        self.metrics.set_target(metrics_target(&self.loaded));
    }

    /// Applies a new config: rejected whole (the running state stays) when it does not load
    /// or changes a setting that needs a restart. Returns what it replaced.
    async fn reload(&mut self, path: &Path) -> anyhow::Result<Loaded> {
        let file = self.config_cache.load(path)?;
        let key = load::private_key(&file)?;
        let new = load::build(file, &key, self.control.as_ref().and_then(|c| c.view.as_ref()))?;
        load::check_reload(&self.loaded.config, &new.config)?;
        if let (Some(c), Some(cc)) = (&self.control, &new.config.control) {
            let advertised = cc.advertised();
            c.advertised.send_if_modified(|a| std::mem::replace(a, advertised.clone()) != advertised);
        }
        let previous = self.switch_interface(new).await;
        self.loaded_changed();
        previous
    }

    /// Makes `new` the desired state, first removing the link of a renamed interface;
    /// returns the state it replaced.
    async fn switch_interface(&mut self, new: Loaded) -> anyhow::Result<Loaded> {
        let old_name = self.loaded.desired.ifname.clone();
        if new.desired.ifname != old_name {
            let remove_old = self.reconciler.remove_links(std::slice::from_ref(&old_name));
            self.ownership
                .rename::<_, anyhow::Error>(&old_name, &new.desired.ifname, async { Ok(remove_old.await?) })
                .await?;
        }
        Ok(std::mem::replace(&mut self.loaded, new))
    }

    /// The daemon loop. Returns on SIGTERM or SIGINT, leaving the kernel state in place.
    pub async fn run(mut self, config_path: &Path) -> anyhow::Result<()> {
        // Bound before anything else: a taken address fails the start, not a scrape later.
        let _metrics = match self.loaded.config.metrics.listen {
            None => None,
            Some(addr) => {
                let listener = metrics::bind(addr).await?;
                tracing::info!(addr = %listener.local_addr()?, "serving metrics at /metrics");
                Some(AbortOnDrop(tokio::spawn(metrics::serve(listener, self.metrics.clone()))))
            }
        };
        let mut hup = signal(SignalKind::hangup())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let kernel_changed = Arc::new(Notify::new());
        watch_netlink(kernel_changed.clone())?;
        let config_changed = Arc::new(Notify::new());
        watch_file(config_path, config_changed.clone())?;

        let resync = Duration::from_secs(self.loaded.config.agent.resync_interval_secs);
        let mut denies: Option<tokio::task::JoinHandle<()>> = None;
        let mut backoff = Duration::from_millis(250);
        let mut next = Duration::ZERO;
        let mut hot_loop = HotLoopGuard::default();
        let mut not_before = tokio::time::Instant::now();
        let mut swept_at: Option<tokio::time::Instant> = None;
        // The last full pass converged without a failure: a config change may be planned
        // against the previous desired state instead of a fresh observation.
        let mut converged = false;
        // READY=1 to systemd after the first converged pass (the unit is Type=notify).
        let mut supervisor = Supervisor::default();
        let mut passes = crate::passes::PassLog::new(&self.loaded.config.agent.state_dir);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(next) => {}
                _ = kernel_changed.notified() => {
                    // Coalesce a burst of events (our own changes cause them too).
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                _ = self.wake.notified() => {}
                _ = hup.recv() => {
                    supervisor.reloading();
                    self.reload_logged(config_path, converged).await;
                    supervisor.reloaded();
                }
                // inotify reports a finished write (close) or a rename over the file: no wait.
                _ = config_changed.notified() => {
                    supervisor.reloading();
                    self.reload_logged(config_path, converged).await;
                    supervisor.reloaded();
                }
                Some(req) = from_client(&mut self.control) => match req {
                    FromClient::View(req) => {
                        let result = self.apply_view(req.view, converged).await;
                        let _ = req.done.send(result);
                    }
                    FromClient::Key(req) => {
                        let result = self.switch_key(req.key, converged).await;
                        let _ = req.done.send(result);
                    }
                },
                _ = self.usr1.recv() => match &self.control {
                    // The next key is made at once: a rotation is in progress from here on
                    // (`status` shows it), and finishes whenever the control plane answers.
                    Some(c) => match keys::next_or_generate(&self.loaded.config.interface.private_key_file) {
                        Ok(next) => {
                            tracing::info!(next = %next.public_key(), "key rotation asked for");
                            c.rotate.notify_one();
                        }
                        Err(e) => tracing::error!(error = %e, "key rotation asked for, but the next key cannot be made"),
                    },
                    None => tracing::warn!("SIGUSR1 asks for a key rotation, which needs control mode; ignored"),
                },
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
            // Held apart while looping: the events that arrive meanwhile make one pass.
            tokio::select! {
                _ = tokio::time::sleep_until(not_before) => {}
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
            match self.pass().await {
                Ok(applied) => {
                    not_before = tokio::time::Instant::now() + hot_loop.after_pass(&applied.ops);
                    // The first pass always says so: it tells a supervisor the agent is ready.
                    if !applied.ops.is_empty() || !converged {
                        tracing::info!(operations = applied.ops.len(), "converged");
                    }
                    converged = true;
                    supervisor.converged();
                    passes.converged();
                    self.follow_events(&mut denies);
                    // A good pass also sweeps expired conntrack entries: at most once per
                    // SWEEP_INTERVAL, as a sweep walks the whole table and event-driven passes
                    // can come in bursts.
                    if swept_at.is_none_or(|t| t.elapsed() >= SWEEP_INTERVAL) {
                        swept_at = Some(tokio::time::Instant::now());
                        match self.reconciler.sweep_conntrack().await {
                            Ok(Some(s)) if s.expired > 0 => {
                                tracing::debug!(expired = s.expired, live = s.live, "conntrack swept");
                                self.flows.ended(s.ended);
                            }
                            Ok(_) => {}
                            Err(error) => tracing::warn!(%error, "conntrack sweep failed"),
                        }
                    }
                    backoff = Duration::from_millis(250);
                    next = resync;
                }
                Err(e) => {
                    converged = false;
                    passes.failed(&e.to_string());
                    tracing::error!(error = %e, retry_in = ?backoff, "reconcile failed");
                    next = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
        supervisor.stopping();
        tracing::info!("stopping; the tunnel, routes and rules stay as they are (`down` removes them)");
        Ok(())
    }

    /// Keeps one task reading the policy programs' events while a policy is enforced.
    fn follow_events(&self, task: &mut Option<tokio::task::JoinHandle<()>>) {
        let Some(policy) = &self.loaded.desired.policy else {
            if let Some(t) = task.take() {
                t.abort();
            }
            return;
        };
        if task.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let ifname = self.loaded.desired.ifname.clone();
        let dir = crate::enforce::pin_dir(&policy.pin_root, &ifname);
        let state_dir = self.loaded.config.agent.state_dir.clone();
        let flows = self.flows.clone();
        let flow_log = self.loaded.config.agent.flow_log.clone();
        *task = Some(tokio::spawn(async move {
            if let Err(e) = crate::enforce::denies::follow(dir, state_dir, ifname, flows, flow_log).await {
                tracing::warn!(error = format!("{e:#}"), "policy event reader stopped");
            }
        }));
    }

    /// Reloads the config; when the previous state was fully converged, applies the change
    /// at once by planning against that state (the full pass that follows checks it).
    async fn reload_logged(&mut self, path: &Path, converged: bool) {
        let started = std::time::Instant::now();
        let ms = |from: std::time::Instant| from.elapsed().as_secs_f64() * 1e3;
        let previous = match self.reload(path).await {
            Ok(previous) => previous,
            Err(e) => {
                tracing::error!(path = %path.display(), error = format!("{e:#}"), "config rejected; keeping the running state");
                return;
            }
        };
        let load_ms = ms(started);
        tracing::info!(path = %path.display(), "config reloaded");
        if !converged || previous.desired.ifname != self.loaded.desired.ifname {
            return;
        }
        let Loaded { config: old_config, desired: previous, .. } = previous;
        match self.apply_change(previous).await {
            Ok(Some(change)) => tracing::info!(
                operations = change.operations,
                elapsed_ms = ms(started),
                load_ms,
                plan_ms = change.plan_ms,
                apply_ms = ms(started) - load_ms - change.plan_ms,
                "config change applied"
            ),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "config change partly applied; the full pass follows"),
        }
        // Freed once the change is in force: 10,000 peers take a while to drop.
        drop(old_config);
    }

    /// Applies the change from `previous` to the current desired state at once, planned
    /// against `previous` (moved in, not copied) when the kernel still matches it; `None`
    /// when it does not (the full pass that follows does the work).
    async fn apply_change(&self, previous: Desired) -> Result<Option<Change>, ReconcileError> {
        let planning = std::time::Instant::now();
        let desired = &self.loaded.desired;
        let Some(assumed) = self.reconciler.assume(previous).await? else { return Ok(None) };
        let plan = crate::plan::plan(desired, &assumed);
        let plan_ms = planning.elapsed().as_secs_f64() * 1e3;
        let applied = self.reconciler.apply(desired, plan).await;
        self.metrics.pass(planning.elapsed(), &applied);
        let operations = applied?.ops.len();
        Ok(Some(Change { operations, plan_ms }))
    }

    /// A key rotation's switch: the next key becomes the key file's, then the interface's.
    /// An error only when the file is unchanged; once it holds the new key, a failing pass
    /// is retried by the loop like any other.
    async fn switch_key(&mut self, key: PrivateKey, converged: bool) -> Result<(), String> {
        let file = self.loaded.file.clone().expect("rotations happen only in control mode, which keeps the file");
        keys::promote(&file.interface.private_key_file, &key).map_err(|e| e.to_string())?;
        let view = self.control.as_ref().and_then(|c| c.view.as_ref());
        let new = match load::build(file, &key, view) {
            Ok(new) => new,
            Err(e) => {
                tracing::error!(error = %e, "the desired state with the new key does not build; the next start uses the key");
                return Ok(());
            }
        };
        let previous = std::mem::replace(&mut self.loaded, new);
        self.loaded_changed();
        let applied = match converged {
            true => self.apply_change(previous.desired).await.map(|c| c.is_some()),
            false => Ok(false),
        };
        let applied = match applied {
            Ok(true) => Ok(()),
            _ => self.pass().await.map(|_| ()),
        };
        match applied {
            Ok(()) => tracing::info!(public_key = %key.public_key(), "the interface uses the new key"),
            Err(e) => tracing::warn!(error = %e, "the interface is not on the new key yet; the passes retry"),
        }
        Ok(())
    }

    /// Applies a view from the control plane. Invalid (it does not build a desired state)
    /// or failing to apply: the previous desired state is restored, so the full pass that
    /// follows converges back to it, and the error goes back to the control plane.
    async fn apply_view(&mut self, view: ControlView, converged: bool) -> Result<(), ViewRejected> {
        let started = std::time::Instant::now();
        let key = self.loaded.desired.device.private_key.clone();
        let file = self.loaded.file.clone().expect("views come only in control mode, which keeps the file");
        let new = match load::build(file, &key, Some(&view)) {
            Ok(new) => new,
            // Nothing changed: the previous state is in force.
            Err(e) => return Err(ViewRejected { cause: e.into(), restored: Ok(()) }),
        };
        let previous = std::mem::replace(&mut self.loaded, new);
        self.loaded_changed();
        let result = if converged { self.apply_change(previous.desired.clone()).await } else { Ok(None) };
        let result = match result {
            Ok(Some(change)) => Ok(change.operations),
            Ok(None) => self.pass().await.map(|a| a.ops.len()),
            Err(e) => Err(e),
        };
        match result {
            Ok(operations) => {
                if let Some(c) = &mut self.control {
                    c.view = Some(view);
                }
                tracing::debug!(operations, elapsed_ms = started.elapsed().as_secs_f64() * 1e3, "control view applied");
                Ok(())
            }
            Err(e) => {
                // Put the previous state back before answering, so the report says whether
                // the node is whole again (the loop's passes keep retrying if not).
                self.loaded = previous;
                self.loaded_changed();
                let restored = self.pass().await.map(|_| ());
                Err(ViewRejected { cause: e.into(), restored })
            }
        }
    }
}

/// Wakes `notify` on any link, address, route or rule change in this network namespace.
fn watch_netlink(notify: Arc<Notify>) -> anyhow::Result<()> {
    use rtnetlink::MulticastGroup as G;
    let (conn, _handle, mut messages) = rtnetlink::new_multicast_connection(&[
        G::Link,
        G::Ipv4Ifaddr,
        G::Ipv6Ifaddr,
        G::Ipv4Route,
        G::Ipv6Route,
        G::Ipv4Rule,
        G::Ipv6Rule,
    ])
    .context("netlink monitor socket")?;
    tokio::spawn(conn);
    tokio::spawn(async move {
        while messages.next().await.is_some() {
            notify.notify_one();
        }
    });
    Ok(())
}

/// Wakes `notify` when the config file is written or replaced (editors rename over it).
fn watch_file(path: &Path, notify: Arc<Notify>) -> anyhow::Result<()> {
    use inotify::{Inotify, WatchMask};
    let abs = std::path::absolute(path).with_context(|| format!("{}", path.display()))?;
    let dir = abs.parent().context("config path has no directory")?.to_owned();
    let name = abs.file_name().context("config path has no file name")?.to_owned();
    let inotify = Inotify::init().context("inotify")?;
    inotify
        .watches()
        .add(&dir, WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO | WatchMask::CREATE)
        .with_context(|| format!("watch {}", dir.display()))?;
    let mut events = inotify.into_event_stream([0u8; 4096]).context("inotify stream")?;
    tokio::spawn(async move {
        while let Some(Ok(ev)) = events.next().await {
            if ev.name.as_deref() == Some(name.as_os_str()) {
                notify.notify_one();
            }
        }
    });
    Ok(())
}

/// What a change applied at once did.
struct Change {
    operations: usize,
    plan_ms: f64,
}

/// What the control-plane client asks the daemon to do.
enum FromClient {
    View(ApplyRequest),
    Key(control::KeySwitch),
}

/// The client's next request; pending forever without control mode.
async fn from_client(control: &mut Option<Control>) -> Option<FromClient> {
    match control {
        Some(c) => tokio::select! {
            v = c.updates.recv() => v.map(FromClient::View),
            k = c.key_switches.recv() => k.map(FromClient::Key),
        },
        None => std::future::pending().await,
    }
}

/// What the metrics read for this desired state.
fn metrics_target(loaded: &Loaded) -> metrics::Target {
    metrics::Target {
        ifname: loaded.desired.ifname.clone(),
        policy: loaded.desired.policy.as_ref().map(|p| (p.pin_root.clone(), loaded.config.agent.state_dir.clone())),
        peer_names: loaded.config.peers.iter().filter_map(|p| Some((p.public_key, p.name.clone()?))).collect(),
    }
}

/// Aborts a task when dropped (the metrics server ends with the daemon loop).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts the control-plane client on the view the desired state was built from.
fn start_client(
    cc: &ControlConfig,
    loaded: &Loaded,
    backend: Arc<dyn crate::wg::WgBackend>,
    health: Arc<control::ControlHealth>,
    flows: Arc<crate::enforce::flows::FlowQueue>,
) -> anyhow::Result<Control> {
    let own = loaded.desired.device.private_key.public_key();
    let files = ControlFiles::new(&loaded.config.agent.state_dir);
    files.check_private().context("control-plane state")?;
    if let Some(key) = &cc.enrollment_key_file {
        crate::perms::check_if_exists(key, crate::perms::Private::Secret).context("control.enrollment_key_file")?;
    }
    let saved = load::saved_view(&files, &own, cc, &loaded.desired.ifname);
    let view = saved.as_ref().map(|a| a.view.clone());
    let (tx, updates) = mpsc::channel(1);
    let (key_switch, key_switches) = mpsc::channel(1);
    let rotate = Arc::new(Notify::new());
    let (advertised, advertised_rx) = tokio::sync::watch::channel(cc.advertised());
    let client = control::ControlClient {
        config: cc.clone(),
        advertised: advertised_rx,
        files,
        own,
        private_key: loaded.desired.device.private_key.clone(),
        key_file: loaded.config.interface.private_key_file.clone(),
        key_switch,
        rotate: rotate.clone(),
        tracker: control::Tracker::new(own, saved),
        apply: tx,
        connector: Arc::new(control::connect::Connector::new(cc.endpoints.clone(), &cc.transport)?),
        health: health.clone(),
        tunnel: loaded.desired.ifname.clone(),
        telemetry: {
            let ifname = loaded.desired.ifname.clone();
            let pins = loaded.desired.policy.as_ref().map(|p| p.pin_root.clone());
            let (state_dir, counted) = (loaded.config.agent.state_dir.clone(), ifname.clone());
            let read_counters = move || match crate::enforce::inspect::inspect(pins.as_ref()?, &counted, &state_dir) {
                Ok(crate::enforce::inspect::Pins::Ready(i)) => Some(i.counters.rules),
                _ => None,
            };
            control::client::Telemetry {
                peer_stats: Box::new(move || control::client::device_peer_stats(backend.as_ref(), &ifname)),
                flows,
                rule_hits: control::hits::RuleHits::new(Box::new(read_counters)),
            }
        },
    };
    tokio::spawn(client.run());
    Ok(Control { updates, view, advertised, key_switches, rotate })
}
