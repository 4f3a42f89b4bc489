//! The reconciler: the only code that changes the kernel. Observe, plan, apply.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::StreamExt;

use crate::enforce::{self, EnforceError, Enforcer};
use crate::gateway::{forward, nat, GatewayError, ObservedGateway};
use crate::model::{Desired, Family, IfName, Observed};
use crate::netlink::{Netlink, NetlinkError};
use crate::plan::{plan, Op, Phase, Plan};
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
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error("{} of {total} operations failed (the next pass retries them): {}", failures.len(), failures.iter().map(|f| format!("{}: {}", f.op, f.error)).collect::<Vec<_>>().join("; "))]
    Apply { total: usize, failures: Vec<OpFailure> },
}

/// Why one operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Wg(#[from] WgError),
    #[error(transparent)]
    Enforce(#[from] EnforceError),
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error("link {0} does not exist")]
    NoLink(IfName),
    #[error("link {0} did not appear after the device was created")]
    LinkDidNotAppear(IfName),
    #[error("injected fault: {0}")]
    Injected(String),
}

/// An operation that failed. The WireGuard operations of a pass are one transaction and
/// share its error.
#[derive(Debug)]
pub struct OpFailure {
    pub op: Op,
    pub error: Arc<ApplyError>,
}

type OpResult = Result<(), Arc<ApplyError>>;

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

/// What one pass did: the operations applied, in plan order.
#[derive(Debug, Default)]
pub struct Applied {
    pub ops: Vec<Op>,
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
        self.observe_with(ifname, self.pin_root(None), None).await
    }

    /// The gateway part of the kernel: forwarding, its records, our nftables table, and
    /// (`host_addresses`: for `own_traffic = "lan"`) the addresses of the other links.
    /// Without masquerade in `desired`, a table that cannot be listed (no `nft`, no
    /// nf_tables in the kernel) is taken as absent: a node that is no gateway never fails
    /// for want of nftables.
    pub async fn observe_gateway(
        &self,
        tunnel: Option<u32>,
        desired: Option<&crate::gateway::DesiredGateway>,
    ) -> Result<ObservedGateway, ReconcileError> {
        let state_dir = self.state_dir.clone();
        let host_addresses = desired.is_some_and(|g| g.lan_source.is_some());
        let nat_required = desired.is_some_and(|g| !g.masquerade.is_empty());
        let mut g = blocking(move || -> Result<ObservedGateway, GatewayError> {
            let mut g = ObservedGateway::default();
            for family in [Family::V4, Family::V6] {
                if let Some(on) = forward::read(family)? {
                    g.forwarding.insert(family, on);
                }
                if let Some(value) = forward::recorded(&state_dir, family)? {
                    g.recorded.insert(family, value);
                }
            }
            g.nat = match nat::observe() {
                Ok(state) => state,
                Err(e) if !nat_required => {
                    tracing::debug!(error = %e, "cannot list table inet wirefence; taken as absent");
                    nat::NatState::Absent
                }
                Err(e) => return Err(e),
            };
            Ok(g)
        })
        .await?;
        if host_addresses {
            g.host_addresses = self.nl.host_addresses(tunnel).await?;
        }
        Ok(g)
    }

    async fn observe_with(
        &self,
        ifname: &IfName,
        pin_root: Option<&Path>,
        gateway: Option<&crate::gateway::DesiredGateway>,
    ) -> Result<Observed, ReconcileError> {
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
        let (rules, unknown_rules) = self.nl.owned_rules(self.protocol).await?;
        let policy = self.observe_policy(ifname, link.map(|l| l.index), pin_root)?;
        let clamp = observe_clamp(ifname, link.map(|l| l.index))?;
        let endpoints_set = self.with_endpoints(ifname, |r| r.endpoints().clone());
        let gateway = self.observe_gateway(link.map(|l| l.index), gateway).await?;
        Ok(Observed { link, addresses, device, routes, rules, unknown_rules, policy, clamp, endpoints_set, gateway })
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
            (Some(index), None) if pinned => enforce::attached_elsewhere(root, ifname, index)?,
            _ => false,
        };
        let mss = guard.as_ref().map(|e| e.mss()).transpose()?;
        Ok(crate::model::PolicyObserved { attached, applied, pinned, mss })
    }

    pub async fn plan(&self, desired: &Desired) -> Result<Plan, ReconcileError> {
        self.adopt_policy(desired).await;
        let observed = self.observe_with(&desired.ifname, self.pin_root(Some(desired)), Some(&desired.gateway)).await?;
        Ok(plan(desired, &observed))
    }

    /// A started agent finding pins: opens them and learns whether they already enforce the
    /// desired policy, so an unchanged policy is not applied again (no epoch bump, no
    /// re-check of every established flow). Another build's pins are taken over here
    /// (`enforce::takeover`); pins it cannot open (a layout it cannot migrate) are left to
    /// the policy operations, which fail with that error while the rest is applied.
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

    /// Deletes the expired conntrack entries of the enforced policy (nothing without an open
    /// enforcer). Not a change of the kernel's configuration: the programs ignore those
    /// entries already.
    pub async fn sweep_conntrack(&self) -> Result<Option<enforce::sweep::SweepStats>, EnforceError> {
        let cell = self.enforcer.clone();
        blocking(move || cell.lock().expect("enforcer lock").as_mut().map(|e| e.sweep_conntrack()).transpose()).await
    }

    /// One pass: observe, plan, apply every operation (continuing past failures, which the
    /// next pass retries). Returns the operations applied.
    pub async fn reconcile(&self, desired: &Desired) -> Result<Applied, ReconcileError> {
        let plan = self.plan(desired).await?;
        self.apply(desired, plan).await
    }

    /// What the kernel holds if it is exactly `previous` (the last state this agent fully
    /// converged to) on the current link. Reads only the link: planning a config change
    /// against it is cheap even with 10,000 peers (`previous` is moved in, not copied). The
    /// caller follows up with a full pass.
    pub async fn assume(&self, previous: Desired) -> Result<Option<Observed>, ReconcileError> {
        let Some(link) = self.nl.tunnel_link(&previous.ifname).await? else { return Ok(None) };
        let policy = self.observe_policy(&previous.ifname, Some(link.index), self.pin_root(Some(&previous)))?;
        let clamp = observe_clamp(&previous.ifname, Some(link.index))?;
        // Read, not assumed: a few small files and our table (and with a LAN source the host's
        // addresses, which the routes' sources were resolved against).
        let gateway = self.observe_gateway(Some(link.index), Some(&previous.gateway)).await?;
        let routes = crate::gateway::source::with_source(
            &previous.routes,
            previous.gateway.lan_source.as_ref(),
            &gateway.host_addresses,
        )
        .into_owned();
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
            routes: routes.into_iter().map(|route| crate::model::OwnedRoute { route, oif: link.index }).collect(),
            addresses: previous.addresses,
            rules: previous.rules,
            unknown_rules: Vec::new(),
            policy,
            clamp,
            // No peer is taken as live: only the configured endpoints are compared.
            endpoints_set: Default::default(),
            gateway,
        }))
    }

    /// Applies a plan, phase by phase: every operation is attempted; failures are collected
    /// and reported (the next pass retries them).
    pub async fn apply(&self, desired: &Desired, plan: Plan) -> Result<Applied, ReconcileError> {
        let ops = plan.ops;
        let total = ops.len();
        let ifname = &desired.ifname;
        let mut index = self.nl.tunnel_link(ifname).await?.map(|l| l.index);
        let in_phase = |phase: Phase| ops.iter().enumerate().filter(move |(_, op)| op.phase() == phase);
        // Each operation's result, by its position in the plan.
        let mut results: Vec<Option<OpResult>> = vec![None; total];

        for (i, op) in in_phase(Phase::Prepare) {
            results[i] = Some(self.prepare(desired, op, &mut index).await.map_err(Arc::new));
        }
        let wg_ops: Vec<(usize, &Op)> = in_phase(Phase::WireGuard).collect();
        let wg = async {
            if wg_ops.is_empty() {
                return Ok(());
            }
            if let Some(fault) = wg_ops.iter().find_map(|(_, op)| self.injected(op)) {
                return Err(fault);
            }
            let update = device_update(desired, wg_ops.iter().map(|(_, op)| *op));
            let (backend, name) = (self.backend.clone(), ifname.clone());
            blocking(move || backend.apply(&name, update)).await.map_err(ApplyError::from)
        };
        let netlink = async {
            let mut done = self.concurrently(desired, index, in_phase(Phase::Remove)).await;
            done.extend(self.concurrently(desired, index, in_phase(Phase::Link)).await);
            done.extend(self.concurrently(desired, index, in_phase(Phase::Add)).await);
            done
        };
        let (wg_result, netlink_results) = tokio::join!(wg, netlink);
        for (i, result) in netlink_results {
            results[i] = Some(result);
        }
        if !wg_ops.is_empty() {
            if wg_result.is_ok() {
                let created = ops.first() == Some(&Op::CreateDevice);
                let written: Vec<&Op> = wg_ops.iter().map(|(_, op)| *op).collect();
                if let Err(e) = self.with_endpoints(ifname, |r| r.record(created, &written)) {
                    // At worst a configured endpoint is written once more after a restart.
                    tracing::warn!(error = %e, "cannot save the endpoint record");
                }
            }
            let result = wg_result.map_err(Arc::new);
            for (i, _) in &wg_ops {
                results[*i] = Some(result.clone());
            }
        }

        let mut applied = Applied::default();
        let mut failures = Vec::new();
        for (op, result) in ops.into_iter().zip(results) {
            match result.expect("every phase ran") {
                Ok(()) => {
                    tracing::debug!(%op, "applied");
                    applied.ops.push(op);
                }
                Err(error) => {
                    tracing::warn!(%op, %error, "operation failed");
                    failures.push(OpFailure { op, error });
                }
            }
        }
        if failures.is_empty() {
            Ok(applied)
        } else {
            Err(ReconcileError::Apply { total, failures })
        }
    }

    /// An operation of [`Phase::Prepare`]: the device, then the policy in force on it.
    async fn prepare(&self, desired: &Desired, op: &Op, index: &mut Option<u32>) -> Result<(), ApplyError> {
        if let Some(fault) = self.injected(op) {
            return Err(fault);
        }
        let ifname = &desired.ifname;
        match op {
            Op::CreateDevice => self.create_device(ifname, index).await,
            Op::ApplyPolicy => {
                let p = desired.policy.as_ref().expect("planned with a policy");
                let (compiled, digest) = (p.compiled.clone(), p.digest);
                let stats = self.with_enforcer(desired, move |e| e.apply(&compiled, digest)).await?;
                tracing::info!(epoch = stats.epoch, map_writes = stats.map_writes, "policy applied");
                // Off the apply's path: the standby generation catches up, so the next change
                // writes only itself (a later apply waits on the lock).
                let cell = self.enforcer.clone();
                tokio::task::spawn_blocking(move || {
                    if let Some(e) = cell.lock().expect("enforcer lock").as_mut() {
                        if let Err(err) = e.sync_standby() {
                            tracing::warn!(%err, "standby policy generation not synced");
                        }
                    }
                });
                Ok(())
            }
            Op::AttachPolicy => {
                let index = index.ok_or_else(|| ApplyError::NoLink(ifname.clone()))?;
                let name = ifname.clone();
                Ok(self.with_enforcer(desired, move |e| e.attach(&name, index).map(|_| ())).await?)
            }
            Op::SetMss(mss) => {
                let mss = *mss;
                Ok(self.with_enforcer(desired, move |e| e.set_mss(mss)).await?)
            }
            Op::AttachClamp(mss) => {
                let (index, name, mss) =
                    (index.ok_or_else(|| ApplyError::NoLink(ifname.clone()))?, ifname.clone(), *mss);
                Ok(blocking(move || enforce::clamp::attach(&name, index, mss)).await?)
            }
            other => unreachable!("{other} is not of the prepare phase"),
        }
    }

    /// Runs independent netlink operations with many requests in flight (results in order).
    async fn concurrently<'a>(
        &self,
        desired: &Desired,
        index: Option<u32>,
        ops: impl Iterator<Item = (usize, &'a Op)>,
    ) -> Vec<(usize, OpResult)> {
        futures::stream::iter(ops.map(|(i, op)| async move {
            let result = match self.injected(op) {
                Some(fault) => Err(fault),
                None => self.apply_one(desired, op, index).await,
            };
            (i, result.map_err(Arc::new))
        }))
        .buffered(IN_FLIGHT)
        .collect()
        .await
    }

    async fn create_device(&self, ifname: &IfName, index: &mut Option<u32>) -> Result<(), ApplyError> {
        let (backend, name) = (self.backend.clone(), ifname.clone());
        blocking(move || backend.ensure_device(&name)).await?;
        *index = self.nl.tunnel_link(ifname).await?.map(|l| l.index);
        index.map(|_| ()).ok_or_else(|| ApplyError::LinkDidNotAppear(ifname.clone()))
    }

    fn injected(&self, op: &Op) -> Option<ApplyError> {
        self.fault.as_ref().and_then(|f| f(op)).map(ApplyError::Injected)
    }

    /// An operation of the netlink phases ([`Phase::Remove`], [`Phase::Link`], [`Phase::Add`]).
    async fn apply_one(&self, desired: &Desired, op: &Op, index: Option<u32>) -> Result<(), ApplyError> {
        let ifname = &desired.ifname;
        let link = || index.ok_or_else(|| ApplyError::NoLink(ifname.clone()));
        let p = self.protocol;
        match op {
            Op::DelRule(rule) => self.nl.del_rule(rule, p).await?,
            Op::DelUnknownRule(rule) => {
                tracing::warn!(%rule, "deleting owned rule of unknown shape");
                self.nl.del_unknown_rule(rule).await?
            }
            Op::DelRoute(route) => self.nl.del_route(route, p).await?,
            Op::DelAddress(a) => self.nl.del_address(link()?, *a).await?,
            Op::SetMtu(m) => self.nl.set_mtu(link()?, *m).await?,
            Op::SetUp => self.nl.set_up(link()?).await?,
            Op::AddAddress(a) => self.nl.add_address(link()?, *a).await?,
            Op::AddRoute(route) => self.nl.add_route(route, link()?, p).await?,
            Op::AddRule(rule) => self.nl.add_rule(rule, p).await?,
            Op::RemovePolicy => self.remove_policy(ifname).await?,
            Op::RemoveClamp => {
                let (index, name) = (link()?, ifname.clone());
                blocking(move || enforce::clamp::remove(&name, index)).await?
            }
            Op::SetForwarding(family) => {
                let (dir, family) = (self.state_dir.clone(), *family);
                blocking(move || forward::enable(&dir, family)).await?
            }
            Op::RestoreForwarding(family) => {
                let (dir, family) = (self.state_dir.clone(), *family);
                blocking(move || forward::restore(&dir, family)).await?
            }
            Op::ApplyNat => {
                let rules = desired.gateway.masquerade.clone();
                blocking(move || nat::apply(&rules)).await?
            }
            Op::RemoveNat => blocking(|| nat::apply(&Default::default())).await?,
            Op::CreateDevice
            | Op::ApplyPolicy
            | Op::SetMss(_)
            | Op::AttachPolicy
            | Op::AttachClamp(_)
            | Op::RemovePeer(_)
            | Op::ConfigureDevice { .. }
            | Op::UpsertPeer(_) => unreachable!("{op} is applied in its own phase ({:?})", op.phase()),
        }
        Ok(())
    }

    /// Removes everything the agent owns (`down`): the policy programs and pins of each
    /// interface under each pin root, the rules and routes of each protocol number (in every
    /// table), the tunnel link of each name, and what the backend left behind.
    pub async fn teardown(
        &self,
        ifnames: &[IfName],
        protocols: &[u8],
        pin_roots: &[PathBuf],
    ) -> Result<(), ReconcileError> {
        self.enforcer.lock().expect("enforcer lock").take();
        for root in pin_roots {
            for ifname in ifnames {
                let (root, name) = (root.clone(), ifname.clone());
                blocking(move || enforce::remove(&root, &name)).await?;
            }
        }
        self.remove_gateway().await?;
        for protocol in protocols {
            self.remove_routes_and_rules(*protocol).await?;
        }
        self.remove_links(ifnames).await
    }

    /// `down`'s part of the gateway: our nftables table goes, and each family's forwarding
    /// gets back the value recorded before the agent first turned it on (none recorded: the
    /// agent never changed it, and leaves it).
    pub async fn remove_gateway(&self) -> Result<(), ReconcileError> {
        let state_dir = self.state_dir.clone();
        blocking(move || -> Result<(), GatewayError> {
            match nat::observe() {
                Ok(nat::NatState::Absent) => {}
                Ok(_) => nat::apply(&Default::default())?,
                // No nft (or no nf_tables): no table of ours can exist.
                Err(GatewayError::NftMissing { .. }) => {}
                Err(e) => return Err(e),
            }
            for family in [Family::V4, Family::V6] {
                forward::restore(&state_dir, family)?;
            }
            Ok(())
        })
        .await?;
        Ok(())
    }

    /// Deletes every route and rule carrying `protocol`.
    pub async fn remove_routes_and_rules(&self, protocol: u8) -> Result<(), ReconcileError> {
        let (rules, unknown) = self.nl.owned_rules(protocol).await?;
        for rule in &rules {
            self.nl.del_rule(rule, protocol).await?;
        }
        for rule in &unknown {
            self.nl.del_unknown_rule(rule).await?;
        }
        for route in self.nl.owned_routes(protocol).await? {
            self.nl.del_route(&route, protocol).await?;
        }
        Ok(())
    }

    /// Detaches the policy programs and removes every pin of the interface.
    pub async fn remove_policy(&self, ifname: &IfName) -> Result<(), EnforceError> {
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

/// The MSS clamp alone on the device, if there is a device.
fn observe_clamp(ifname: &IfName, index: Option<u32>) -> Result<crate::model::ClampObserved, EnforceError> {
    match index {
        Some(index) => enforce::clamp::observe(ifname, index),
        None => Ok(Default::default()),
    }
}
