//! The reconciler: the only code that changes the kernel. Observe, plan, apply.

use std::sync::Arc;

use crate::model::{Desired, IfName, Observed};
use crate::netlink::{Netlink, NetlinkError};
use crate::plan::{plan, Op, Plan};
use crate::wg::{device_state, device_update, DeviceInfo, WgBackend, WgError};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Wg(#[from] WgError),
    #[error("{} of {total} operations failed (the next pass retries them): {}", failures.len(), failures.iter().map(|f| format!("{}: {}", f.op, f.error)).collect::<Vec<_>>().join("; "))]
    Apply { total: usize, failures: Vec<OpFailure> },
}

#[derive(Debug)]
pub struct OpFailure {
    pub op: String,
    pub error: String,
}

/// Decides whether an operation fails instead of running (tests wrap the real path with it).
pub type FaultHook = Arc<dyn Fn(&Op) -> Option<String> + Send + Sync>;

pub struct Reconciler {
    nl: Netlink,
    backend: Arc<dyn WgBackend>,
    protocol: u8,
    fault: Option<FaultHook>,
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
        Reconciler { nl, backend, protocol, fault: None }
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

    pub async fn observe(&self, ifname: &IfName) -> Result<Observed, ReconcileError> {
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
        Ok(Observed { link, addresses, device, routes, rules })
    }

    pub async fn plan(&self, desired: &Desired) -> Result<Plan, ReconcileError> {
        Ok(plan(desired, &self.observe(&desired.ifname).await?))
    }

    /// One pass: observe, plan, apply every operation (continuing past failures, which the
    /// next pass retries). Returns the operations applied.
    pub async fn reconcile(&self, desired: &Desired) -> Result<Applied, ReconcileError> {
        for odd in self.nl.owned_rules(self.protocol).await?.1 {
            tracing::info!(?odd, "deleting owned rule of unknown shape");
            self.nl.del_rule_message(odd, "of unknown shape").await?;
        }
        let plan = self.plan(desired).await?;
        let total = plan.ops.len();
        let mut applied = Applied::default();
        let mut failures = Vec::new();
        let ifname = &desired.ifname;
        let mut index = self.nl.tunnel_link(ifname).await?.map(|l| l.index);
        let mut ops = plan.ops.iter().peekable();
        while let Some(op) = ops.next() {
            if op.is_wireguard() {
                let mut group = vec![op];
                while let Some(next) = ops.next_if(|o| o.is_wireguard()) {
                    group.push(next);
                }
                let result = match group.iter().find_map(|op| self.injected(op)) {
                    Some(fault) => Err(fault),
                    None => {
                        let update = device_update(desired, &group);
                        let (backend, name) = (self.backend.clone(), ifname.clone());
                        blocking(move || backend.apply(&name, update)).await.map_err(|e| e.to_string())
                    }
                };
                record(&mut applied, &mut failures, &group, result);
                continue;
            }
            let result = match self.injected(op) {
                Some(fault) => Err(fault),
                None => self.apply_one(desired, op, &mut index).await,
            };
            record(&mut applied, &mut failures, &[op], result);
        }
        if failures.is_empty() {
            Ok(applied)
        } else {
            Err(ReconcileError::Apply { total, failures })
        }
    }

    fn injected(&self, op: &Op) -> Option<String> {
        self.fault.as_ref().and_then(|f| f(op)).map(|m| format!("injected fault: {m}"))
    }

    async fn apply_one(&self, desired: &Desired, op: &Op, index: &mut Option<u32>) -> Result<(), String> {
        let ifname = &desired.ifname;
        let link = |index: &Option<u32>| index.ok_or_else(|| format!("link {ifname} does not exist"));
        let p = self.protocol;
        let r: Result<(), String> = match op {
            Op::CreateDevice => {
                let (backend, name) = (self.backend.clone(), ifname.clone());
                blocking(move || backend.ensure_device(&name)).await.map_err(|e| e.to_string())?;
                *index = self.nl.tunnel_link(ifname).await.map_err(|e| e.to_string())?.map(|l| l.index);
                link(index).map(|_| ())
            }
            Op::DelRule(rule) => self.nl.del_rule(rule, p).await.map_err(|e| e.to_string()),
            Op::DelRoute(route) => self.nl.del_route(route, p).await.map_err(|e| e.to_string()),
            Op::DelAddress(a) => self.nl.del_address(link(index)?, *a).await.map_err(|e| e.to_string()),
            Op::SetMtu(m) => self.nl.set_mtu(link(index)?, *m).await.map_err(|e| e.to_string()),
            Op::SetUp => self.nl.set_up(link(index)?).await.map_err(|e| e.to_string()),
            Op::AddAddress(a) => self.nl.add_address(link(index)?, *a).await.map_err(|e| e.to_string()),
            Op::AddRoute(route) => self.nl.add_route(route, link(index)?, p).await.map_err(|e| e.to_string()),
            Op::AddRule(rule) => self.nl.add_rule(rule, p).await.map_err(|e| e.to_string()),
            Op::RemovePeer(_) | Op::ConfigureDevice { .. } | Op::UpsertPeer(_) => {
                unreachable!("WireGuard operations are applied as one group")
            }
        };
        r
    }

    /// Removes everything the agent owns: its rules and routes (by protocol number, in every
    /// table) and the tunnel link of each name given; then what the backend left behind.
    pub async fn teardown(&self, ifnames: &[IfName]) -> Result<(), ReconcileError> {
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

    /// Deletes tunnel links the agent owns (a renamed interface's old link, or all at `down`).
    pub async fn remove_links(&self, ifnames: &[IfName]) -> Result<(), ReconcileError> {
        for ifname in ifnames {
            if let Some(link) = self.nl.tunnel_link(ifname).await? {
                tracing::info!(%ifname, "deleting owned link");
                self.nl.delete_link(link.index).await?;
            }
            let (backend, name) = (self.backend.clone(), ifname.clone());
            blocking(move || backend.cleanup(&name)).await?;
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
