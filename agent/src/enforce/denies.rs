//! Deny and new-flow events from the programs' ring buffer: the running agent keeps the
//! latest denies in `<state_dir>/<ifname>.denies.json` (for `status`) and logs new flows.

use std::collections::VecDeque;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use aya::maps::{Map, MapData, RingBuf};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use wirefence_common as common;

use crate::model::IfName;

const KEEP: usize = 32;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DenyRecord {
    /// Seconds since the Unix epoch, when the agent read the event.
    pub at: u64,
    pub direction: String,
    pub src: String,
    pub dst: String,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub len: u32,
}

impl fmt::Display for DenyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
        write!(
            f,
            "{}s ago {} {}:{} -> {}:{} proto {} ({} bytes)",
            now.saturating_sub(self.at),
            self.direction,
            self.src,
            self.sport,
            self.dst,
            self.dport,
            self.proto,
            self.len
        )
    }
}

fn file(state_dir: &Path, ifname: &IfName) -> PathBuf {
    state_dir.join(format!("{ifname}.denies.json"))
}

/// The saved denies (empty when there are none or the file is unreadable).
pub fn load(state_dir: &Path, ifname: &IfName) -> Vec<DenyRecord> {
    std::fs::read(file(state_dir, ifname)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

fn addr(bytes: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None if bytes[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff] => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        None => IpAddr::V6(v6),
    }
}

fn record(e: &common::Event) -> DenyRecord {
    DenyRecord {
        at: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs(),
        direction: if e.flow.direction == common::DIR_INGRESS { "in" } else { "out" }.into(),
        src: addr(e.flow.src).to_string(),
        dst: addr(e.flow.dst).to_string(),
        proto: e.flow.proto,
        sport: e.flow.sport,
        dport: e.flow.dport,
        len: e.len,
    }
}

/// Reads the pinned ring buffer of `pin_dir` until the task is dropped.
pub async fn follow(pin_dir: PathBuf, state_dir: PathBuf, ifname: IfName) -> anyhow::Result<()> {
    let data = MapData::from_pin(pin_dir.join(common::EVENTS))?;
    let ring = RingBuf::try_from(Map::RingBuf(data))?;
    // SAFETY: the ring buffer owns its descriptor and outlives the registration (it moves
    // into the AsyncFd and is dropped with it).
    let mut fd = unsafe { AsyncFd::register(ring) }.map_err(|e| anyhow::anyhow!("register ring buffer: {e}"))?;
    let mut recent: VecDeque<DenyRecord> = load(&state_dir, &ifname).into();
    let mut last_write = Instant::now() - Duration::from_secs(1);
    let mut dirty = false;
    loop {
        // Wake for events, or at least once a second to write what was held back.
        let ready = tokio::time::timeout(Duration::from_secs(1), fd.readable_mut()).await;
        if let Ok(guard) = ready {
            let mut guard = guard?;
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                if item.len() < std::mem::size_of::<common::Event>() {
                    continue;
                }
                // SAFETY: the program writes whole `Event`s; read_unaligned copes with alignment.
                let e: common::Event = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const common::Event) };
                let r = record(&e);
                match e.kind {
                    common::EVENT_DENY => {
                        tracing::debug!(deny = %r, "denied");
                        recent.push_back(r);
                        if recent.len() > KEEP {
                            recent.pop_front();
                        }
                        dirty = true;
                    }
                    _ => tracing::debug!(flow = %r, rule = e.rule, "new flow"),
                }
            }
            guard.clear_ready();
        }
        if dirty && last_write.elapsed() >= Duration::from_secs(1) {
            let path = file(&state_dir, &ifname);
            crate::durable::write_atomic(&path, &serde_json::to_vec(&recent)?, 0o600)?;
            last_write = Instant::now();
            dirty = false;
        }
    }
}
