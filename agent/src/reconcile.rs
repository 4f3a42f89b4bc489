//! The reconciler: the only code that changes the kernel. Observe, plan, apply.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::StreamExt;

use crate::enforce::{self, EnforceError, Enforcer};
use crate::model::{Desired, IfName, Observed};
use crate::netlink::{Netlink, NetlinkError};
use crate::plan::{plan, Op, Plan};
use crate::state::EndpointRecord;
use crate::wg::{device_state, device_update, DeviceInfo, WgBackend, WgError};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Wg(#[from] WgError),
    #[error(transparent)]
    Enforce(#[from] EnforceError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error("{} of {total} operations failed (the next pass retries them): {}", failures.len(), failures.iter().map(|f| format!("{}: {}", f.op, f.error)).collect::<Vec<_>>().join("; "))]
    Apply { total: usize, failures: Vec<OpFailure> },
}

#[derive(Debug)]
pub struct OpFailure {
    pub op: String,
    pub error: String,
}

/// Netlink requests kept in flight at once by one apply.
const IN_FLIGHT: usize = 256;

/// Decides whether an operation fails instead of running (tests wrap the real path with it).
pub type FaultHook = Arc<dyn Fn(&Op) -> Option<String> + Send + Sync>;

pub struct Reconciler {
    nl: Netlink,
    backend: Arc<dyn WgBackend>,
    protocol: u8,
    fault: Option<FaultHook>,
    /// The policy programs and maps, opened on first use.
    enforcer: Arc<Mutex<Option<Enforcer>>>,
    /// Where pins may exist when the config has no policy (a previous run's pin root).
    known_pin_root: Option<PathBuf>,
    /// Where the enforcer keeps its rule-slot table, and the endpoint record lives.
    state_dir: PathBuf,
    /// The endpoints written to the device's peers, loaded on first use.
    endpoints: Mutex<Option<EndpointRecord>>,
}

/// What one pass did.
#[derive(Debug, Default)]
pub struct Applied {
    pub ops: Vec<String>,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking backend call panicked")
}

impl Reconciler {
    pub fn new(nl: Netlink, backend: Arc<dyn WgBackend>, protocol: u8) -> Self {
        Reconciler {
            nl,
            backend,
            protocol,
            fault: None,
            enforcer: Default::default(),
            known_pin_root: None,
            state_dir: std::env::temp_dir(),
            endpoints: Mutex::new(None),
        }
    }

    /// Where the enforcer keeps its state, and a pin root a previous run may have used.
    pub fn with_policy_dirs(mut self, state_dir: PathBuf, known_pin_root: Option<PathBuf>) -> Self {
        self.state_dir = state_dir;
        self.known_pin_root = known_pin_root;
        self
    }

    pub fn with_fault(mut self, hook: FaultHook) -> Self {
        self.fault = Some(hook);
        self
    }

    pub fn backend(&self) -> &dyn WgBackend {
        &*self.backend
    }

    pub fn netlink(&self) -> &Netlink {
        &self.nl
    }

    /// The device with its statistics, if there is one.
    pub async fn device_info(&self, ifname: &IfName) -> Result<Option<DeviceInfo>, WgError> {
        let (backend, name) = (self.backend.clone(), ifname.clone());
        blocking(move || backend.read(&name)).await
    }

    /// Pin root to look at: the desired policy's, or the one a previous run used.
    fn pin_root<'a>(&'a self, desired: Option<&'a Desired>) -> Option<&'a Path> {
        desired.and_then(|d| d.policy.as_ref()).map(|p| p.pin_root.as_path()).or(self.known_pin_root.as_deref())
    }

    pub async fn observe(&self, ifname: &IfName) -> Result<Observed, ReconcileError> {
        self.observe_with(ifname, self.pin_root(None)).await
    }

    async fn observe_with(&self, ifname: &IfName, pin_root: Option<&Path>) -> Result<Observed, ReconcileError> {
        let link = self.nl.tunnel_link(ifname).await?;
        let addresses = match link {
            Some(l) => self.nl.addresses(l.index).await?,
            None => Default::default(),
        };
        let device = match link {
            Some(_) => self.device_info(ifname).await?.as_ref().map(device_state),
            None => None,
        };
        let routes = self.nl.owned_routes(self.protocol).await?;
        let (rules, _) = self.nl.owned_rules(self.protocol).await?;
        let policy = self.observe_policy(ifname, link.map(|l| l.index), pin_root)?;
        let endpoints_set = self.with_endpoints(ifname, |r| r.endpoints().clone());
        Ok(Observed { link, addresses, device, routes, rules, policy, endpoints_set })
    }

    /// Runs `f` on the endpoint record of `ifname` (loading it on first use).
    fn with_endpoints<T>(&self, ifname: &IfName, f: impl FnOnce(&mut EndpointRecord) -> T) -> T {
        let mut guard = self.endpoints.lock().expect("endpoint record lock");
        if guard.as_ref().is_none_or(|r| r.ifname != *ifname) {
            *guard = Some(EndpointRecord::load(&self.state_dir, ifname));
        }
        f(guard.as_mut().expect("just loaded"))
    }

    fn observe_policy(
        &self,
        ifname: &IfName,
        index: Option<u32>,
        pin_root: Option<&Path>,
    ) -> Result<crate::model::PolicyObserved, ReconcileError> {
        let Some(root) = pin_root else { return Ok(Default::default()) };
        let pinned = enforce::pin_dir(root, ifname).exists();
        let guard = self.enforcer.lock().expect("enforcer lock");
        let applied = guard.as_ref().and_then(|e| e.applied());
        let attached = match (index, guard.as_ref()) {
            (Some(index), Some(e)) => e.attached(ifname, index)?,
            (Some(index), None) if pinned => enforce::attached_elsewhere(ifname, index)?,
            _ => false,
        };
        Ok(crate::model::PolicyObserved { attached, applied, pinned })
    }

    pub async fn plan(&self, desired: &Desired) -> Result<Plan, ReconcileError> {
        self.adopt_policy(desired).await;
        Ok(plan(desired, &self.observe_with(&desired.ifname, self.pin_root(Some(desired))).await?))
    }

    /// A started agent finding pins: opens them and learns whether they already enforce the
    /// desired policy, so an unchanged policy is not applied again (no epoch bump, no
    /// re-check of every established flow). Pins it cannot open (another build's) are left
    /// to the policy operations, which fail with that error while the rest is applied.
    async fn adopt_policy(&self, desired: &Desired) {
        let Some(p) = &desired.policy else { return };
        if !enforce::pin_dir(&p.pin_root, &desired.ifname).exists() {
            return;
        }
        if self.enforcer.lock().expect("enforcer lock").as_ref().is_some_and(|e| e.applied().is_some()) {
            return;
        }
        let (compiled, digest) = (p.compiled.clone(), p.digest);
        match self.with_enforcer(desired, move |e| e.holds(&compiled, digest)).await {
            Ok(held) => tracing::debug!(held, "opened the pinned policy maps (held: they enforce the desired policy)"),
            Err(error) => tracing::debug!(%error, "cannot adopt the pinned policy maps"),
        }
    }

    /// Runs `f` on the enforcer of the desired policy's interface (opening it, adopting
    /// pins, on first use). Only for a desired state with a policy.
    async fn with_enforcer<T: Send + 'static>(
        &self,
        desired: &Desired,
        f: impl FnOnce(&mut Enforcer) -> Result<T, EnforceError> + Send + 'static,
    ) -> Result<T, EnforceError> {
        let policy = desired.policy.as_ref().expect("the enforcer serves a desired policy");
        let (cell, root, ifname, state_dir) =
            (self.enforcer.clone(), policy.pin_root.clone(), desired.ifname.clone(), self.state_dir.clone());
        blocking(move || {
            let mut guard = cell.lock().expect("enforcer lock");
            if guard.is_none() {
                *guard = Some(Enforcer::open(&root, &ifname, 0, &state_dir)?);
            }
            f(guard.as_mut().expect("just opened"))
        })
        .await
    }

    /// One pass: observe, plan, apply every operation (continuing past failures, which the
    /// next pass retries). Returns the operations applied.
    pub async fn reconcile(&self, desired: &Desired) -> Result<Applied, ReconcileError> {
        // Rules with our protocol number that the agent never makes (owned rules are read
        // back normalized, so its own never land here): removed, and counted as changes so
        // that one coming back every pass shows as a hot loop.
        let mut removed = Vec::new();
        for odd in self.nl.owned_rules(self.protocol).await?.1 {
            tracing::warn!(?odd, "deleting owned rule of unknown shape");
            self.nl.del_rule_message(odd.clone(), "of unknown shape").await?;
            removed.push(format!("delete owned rule of unknown shape {:?}", odd.header));
        }
        let plan = self.plan(desired).await?;
        let mut applied = self.apply(desired, &plan).await?;
        applied.ops.extend(removed);
        Ok(applied)
    }

    /// What the kernel holds if it is exactly `previous` (the last state this agent fully
    /// converged to) on the current link. Reads only the link: planning a config change
    /// against it is cheap even with 10,000 peers (`previous` is moved in, not copied). The
    /// caller follows up with a full pass.
    pub async fn assume(&self, previous: Desired) -> Result<Option<Observed>, ReconcileError> {
        let Some(link) = self.nl.tunnel_link(&previous.ifname).await? else { return Ok(None) };
        let policy = self.observe_policy(&previous.ifname, Some(link.index), self.pin_root(Some(&previous)))?;
        Ok(Some(Observed {
            link: Some(link),
            device: Some(crate::model::DeviceState {
                public_key: Some(previous.device.private_key.public_key()),
                listen_port: previous.device.listen_port,
                fwmark: previous.device.fwmark,
                peers: previous.peers,
                live: Default::default(),
            }),
            // In order, so the set is built without a search per route.
            routes: previous
                .routes
                .into_iter()
                .map(|route| crate::model::OwnedRoute { route, oif: link.index })
                .collect(),
            addresses: previous.addresses,
            rules: previous.rules,
            policy,
            // No peer is taken as live: only the configured endpoints are compared.
            endpoints_set: Default::default(),
        }))
    }

    /// Applies a plan: every operation is attempted; failures are collected and reported
    /// (the next pass retries them).
    pub async fn apply(&self, desired: &Desired, plan: &Plan) -> Result<Applied, ReconcileError> {
        let total = plan.ops.len();
        let mut applied = Applied::default();
        let mut failures = Vec::new();
        let ifname = &desired.ifname;
        let mut index = self.nl.tunnel_link(ifname).await?.map(|l| l.index);

        let phase = |op: &Op| match op {
            Op::CreateDevice | Op::ApplyPolicy | Op::AttachPolicy => 0,
            Op::DelRule(_) | Op::DelRoute(_) | Op::DelAddress(_) | Op::RemovePolicy => 1,
            Op::SetMtu(_) | Op::SetUp => 2,
            Op::RemovePeer(_) | Op::ConfigureDevice { .. } | Op::UpsertPeer(_) => 3,
            Op::AddAddress(_) | Op::AddRoute(_) | Op::AddRule(_) => 4,
        };
        let of = |n: u8| plan.ops.iter().filter(move |op| phase(op) == n).collect::<Vec<_>>();

        // Sequential: the device must exist (and its index be known) before anything else,
        // and the policy be in force on it before a peer is configured.
        for op in of(0) {
            let result = match (self.injected(op), op) {
                (Some(fault), _) => Err(fault),
                (None, Op::CreateDevice) => self.create_device(ifname, &mut index).await,
                (None, Op::ApplyPolicy) => {
                    let p = desired.policy.as_ref().expect("planned with a policy");
                    let (compiled, digest) = (p.compiled.clone(), p.digest);
                    let applied = self
                        .with_enforcer(desired, move |e| e.apply(&compiled, digest))
                        .await
                        .map_err(|e| e.to_string());
                    if applied.is_ok() {
                        // Off the apply's path: the standby generation catches up, so the next
                        // change writes only itself (a later apply waits on the lock).
                        let cell = self.enforcer.clone();
                        tokio::task::spawn_blocking(move || {
                            if let Some(e) = cell.lock().expect("enforcer lock").as_mut() {
                                if let Err(err) = e.sync_standby() {
                                    tracing::warn!(%err, "standby policy generation not synced");
                                }
                            }
                        });
                    }
                    applied.map(|stats| {
                        tracing::info!(epoch = stats.epoch, map_writes = stats.map_writes, "policy applied");
                    })
                }
                (None, _) => {
                    let name = ifname.clone();
                    match index {
                        Some(index) => self
                            .with_enforcer(desired, move |e| e.attach(&name, index).map(|_| ()))
                            .await
                            .map_err(|e| e.to_string()),
                        None => Err(format!("link {ifname} does not exist")),
                    }
                }
            };
            record(&mut applied, &mut failures, &[op], result);
        }
        // The WireGuard transaction runs alongside the netlink work: removals, link settings
        // and additions do not depend on the peers (routes need the link up, not the peers).
        let wg_ops = of(3);
        let wg = async {
            if wg_ops.is_empty() {
                return Ok(());
            }
            if let Some(fault) = wg_ops.iter().find_map(|op| self.injected(op)) {
                return Err(fault);
            }
            let update = device_update(desired, &wg_ops);
            let (backend, name) = (self.backend.clone(), ifname.clone());
            blocking(move || backend.apply(&name, update)).await.map_err(|e| e.to_string())
        };
        // Removals first (nothing stale shadows an addition), then link settings, then
        // additions; each batch in flight together.
        let netlink = async {
            let mut before = self.concurrently(desired, index, of(1)).await;
            before.extend(self.concurrently(desired, index, of(2)).await);
            (before, self.concurrently(desired, index, of(4)).await)
        };
        let (wg_result, (before, additions)) = tokio::join!(wg, netlink);
        for (op, result) in before {
            record(&mut applied, &mut failures, &[op], result);
        }
        if !wg_ops.is_empty() {
            if wg_result.is_ok() {
                let created = plan.ops.first() == Some(&Op::CreateDevice);
                if let Err(e) = self.with_endpoints(ifname, |r| r.record(created, &wg_ops)) {
                    // At worst a configured endpoint is written once more after a restart.
                    tracing::warn!(error = %e, "cannot save the endpoint record");
                }
            }
            record(&mut applied, &mut failures, &wg_ops, wg_result);
        }
        for (op, result) in additions {
            record(&mut applied, &mut failures, &[op], result);
        }
        if failures.is_empty() {
            Ok(applied)
        } else {
            Err(ReconcileError::Apply { total, failures })
        }
    }

    /// Runs independent netlink operations with many requests in flight (results in order).
    async fn concurrently<'a>(
        &self,
        desired: &Desired,
        index: Option<u32>,
        ops: Vec<&'a Op>,
    ) -> Vec<(&'a Op, Result<(), String>)> {
        futures::stream::iter(ops.into_iter().map(|op| async move {
            let result = match self.injected(op) {
                Some(fault) => Err(fault),
                None => self.apply_one(desired, op, index).await,
            };
            (op, result)
        }))
        .buffered(IN_FLIGHT)
        .collect()
        .await
    }

    async fn create_device(&self, ifname: &IfName, index: &mut Option<u32>) -> Result<(), String> {
        let (backend, name) = (self.backend.clone(), ifname.clone());
        blocking(move || backend.ensure_device(&name)).await.map_err(|e| e.to_string())?;
        *index = self.nl.tunnel_link(ifname).await.map_err(|e| e.to_string())?.map(|l| l.index);
        index.map(|_| ()).ok_or_else(|| format!("link {ifname} did not appear"))
    }

    fn injected(&self, op: &Op) -> Option<String> {
        self.fault.as_ref().and_then(|f| f(op)).map(|m| format!("injected fault: {m}"))
    }

    async fn apply_one(&self, desired: &Desired, op: &Op, index: Option<u32>) -> Result<(), String> {
        let ifname = &desired.ifname;
        let link = || index.ok_or_else(|| format!("link {ifname} does not exist"));
        let p = self.protocol;
        match op {
            Op::DelRule(rule) => self.nl.del_rule(rule, p).await,
            Op::DelRoute(route) => self.nl.del_route(route, p).await,
            Op::DelAddress(a) => self.nl.del_address(link()?, *a).await,
            Op::SetMtu(m) => self.nl.set_mtu(link()?, *m).await,
            Op::SetUp => self.nl.set_up(link()?).await,
            Op::AddAddress(a) => self.nl.add_address(link()?, *a).await,
            Op::AddRoute(route) => self.nl.add_route(route, link()?, p).await,
            Op::AddRule(rule) => self.nl.add_rule(rule, p).await,
            Op::RemovePolicy => return self.remove_policy(ifname).await.map_err(|e| e.to_string()),
            Op::CreateDevice
            | Op::ApplyPolicy
            | Op::AttachPolicy
            | Op::RemovePeer(_)
            | Op::ConfigureDevice { .. }
            | Op::UpsertPeer(_) => {
                unreachable!("applied on their own")
            }
        }
        .map_err(|e| e.to_string())
    }

    /// Removes everything the agent owns: its rules and routes (by protocol number, in every
    /// table) and the tunnel link of each name given; then what the backend left behind.
    pub async fn teardown(&self, ifnames: &[IfName]) -> Result<(), ReconcileError> {
        for ifname in ifnames {
            self.remove_policy(ifname).await?;
        }
        self.remove_routes_and_rules().await?;
        self.remove_links(ifnames).await
    }

    /// Deletes every route and rule carrying the agent's protocol number.
    pub async fn remove_routes_and_rules(&self) -> Result<(), ReconcileError> {
        let (rules, odd) = self.nl.owned_rules(self.protocol).await?;
        for rule in &rules {
            self.nl.del_rule(rule, self.protocol).await?;
        }
        for msg in odd {
            self.nl.del_rule_message(msg, "of unknown shape").await?;
        }
        for route in self.nl.owned_routes(self.protocol).await? {
            self.nl.del_route(&route, self.protocol).await?;
        }
        Ok(())
    }

    /// Detaches the policy programs and removes every pin of the interface.
    pub async fn remove_policy(&self, ifname: &IfName) -> Result<(), ReconcileError> {
        self.enforcer.lock().expect("enforcer lock").take();
        if let Some(root) = self.known_pin_root.clone() {
            let name = ifname.clone();
            blocking(move || enforce::remove(&root, &name)).await?;
        }
        Ok(())
    }

    /// Deletes tunnel links the agent owns (a renamed interface's old link, or all at `down`).
    pub async fn remove_links(&self, ifnames: &[IfName]) -> Result<(), ReconcileError> {
        for ifname in ifnames {
            if let Some(link) = self.nl.tunnel_link(ifname).await? {
                tracing::info!(%ifname, "deleting owned link");
                self.nl.delete_link(link.index).await?;
            }
            let (backend, name) = (self.backend.clone(), ifname.clone());
            blocking(move || backend.cleanup(&name)).await?;
            EndpointRecord::remove(&self.state_dir, ifname)?;
        }
        Ok(())
    }
}

fn record(applied: &mut Applied, failures: &mut Vec<OpFailure>, ops: &[&Op], result: Result<(), String>) {
    match result {
        Ok(()) => {
            for op in ops {
                tracing::debug!(%op, "applied");
                applied.ops.push(op.to_string());
            }
        }
        Err(error) => {
            for op in ops {
                tracing::warn!(%op, %error, "operation failed");
                failures.push(OpFailure { op: op.to_string(), error: error.clone() });
            }
        }
    }
}
