//! `wirefence-agent trace`: the live verdict trace (see `wirefence_common::trace`). The
//! tracer opens the interface's pinned `TRACE`, `TRACE_ARMED` and `TRACE_EVENTS`, writes its
//! filter, sets the switch, reads the records and disarms when it ends. It writes nothing
//! else: the policy, conntrack and counters are the reconciler's. One tracer at a time per
//! interface; one that died without disarming is disarmed by the running agent's sweep
//! ([`disarm_orphan`]) or replaced by the next tracer.

use std::path::{Path, PathBuf};
use std::time::Instant;

use aya::maps::{Array, Map, MapData, RingBuf};
use ipnet::IpNet;
use serde::Serialize;
use tokio::io::unix::AsyncFd;
use wirefence_common::trace::{path, TraceFilter, TraceRecord, MATCH_PORT, MATCH_PROTO, TRACE_PASS};
use wirefence_common::{self as common};
use wirefence_proto::iana;

use super::denies::{packet_record, DenyRecord, PacketText};
use super::flows::RuleNames;
use crate::bpf::ObjectMapError;
use crate::model::IfName;

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("--src {src} and --dst {dst} are of different address families: no packet matches both")]
    Families { src: IpNet, dst: IpNet },
    #[error("--port: protocol {proto} has no ports (ports are TCP's, UDP's, UDP-Lite's and SCTP's)")]
    NoPorts { proto: u8 },
    #[error(
        "nothing to trace on {ifname}: {path} is not pinned (is the agent running with a [policy] on this \
         interface? an agent of a build before tracing existed pins no trace maps: restart it with this build)"
    )]
    NotLoaded { ifname: IfName, path: PathBuf },
    #[error("{path}: {source} (the pins are root's: run trace as root)")]
    Access { path: PathBuf, source: std::io::Error },
    #[error("a trace of {ifname} runs already (pid {pid}); one tracer at a time")]
    Busy { ifname: IfName, pid: u32 },
    #[error(transparent)]
    Map(#[from] ObjectMapError),
    #[error("trace ring buffer of {ifname}: {source}")]
    Ring { ifname: IfName, source: std::io::Error },
}

/// Which packets to trace; every field left out matches all.
#[derive(Clone, Debug, Default)]
pub struct TraceSpec {
    src: Option<IpNet>,
    dst: Option<IpNet>,
    proto: Option<u8>,
    port: Option<u16>,
}

impl TraceSpec {
    /// Source and destination prefixes of one family; a port only with a protocol that has
    /// ports (or none: then it matches the ported protocols' packets).
    pub fn new(
        src: Option<IpNet>,
        dst: Option<IpNet>,
        proto: Option<u8>,
        port: Option<u16>,
    ) -> Result<TraceSpec, TraceError> {
        if let (Some(s), Some(d)) = (src, dst) {
            if s.addr().is_ipv4() != d.addr().is_ipv4() {
                return Err(TraceError::Families { src: s, dst: d });
            }
        }
        if let (Some(p), Some(_)) = (proto, port) {
            if !iana::has_ports(p) {
                return Err(TraceError::NoPorts { proto: p });
            }
        }
        Ok(TraceSpec { src: src.map(|n| n.trunc()), dst: dst.map(|n| n.trunc()), proto, port })
    }

    /// The filter as the programs read it, armed for tracer `pid`.
    pub fn filter(&self, pid: u32) -> TraceFilter {
        let (src, src_mask) = prefix_words(self.src);
        let (dst, dst_mask) = prefix_words(self.dst);
        TraceFilter {
            tracer: pid,
            _pad: 0,
            src,
            src_mask,
            dst,
            dst_mask,
            proto: self.proto.map_or(0, |p| u32::from(p) | MATCH_PROTO),
            port: self.port.map_or(0, |p| u32::from(p) | MATCH_PORT),
            lost: 0,
        }
    }
}

/// A prefix as the programs compare it: address and mask in the key's layout (IPv4 mapped
/// into IPv6, so the family is part of the mask), as native-endian words.
fn prefix_words(net: Option<IpNet>) -> ([u64; 2], [u64; 2]) {
    let Some(net) = net else { return ([0; 2], [0; 2]) };
    let (addr, len) = match net {
        IpNet::V4(n) => (n.network().to_ipv6_mapped().octets(), 96 + n.prefix_len()),
        IpNet::V6(n) => (n.network().octets(), n.prefix_len()),
    };
    let mask = u128::MAX.checked_shl(u32::from(128 - len)).unwrap_or(0).to_be_bytes();
    let words = |b: [u8; 16]| {
        [
            u64::from_ne_bytes(b[..8].try_into().expect("8 bytes")),
            u64::from_ne_bytes(b[8..].try_into().expect("8 bytes")),
        ]
    };
    (words(addr), words(mask))
}

/// One traced packet.
#[derive(Clone, Debug, Serialize)]
pub struct Traced {
    #[serde(flatten)]
    pub packet: DenyRecord,
    /// Milliseconds since the trace started.
    pub elapsed_ms: u64,
    /// `flow-cache`, `conntrack`, `icmp-error`, `fragment` or `new`.
    pub path: &'static str,
    pub allowed: bool,
    /// The deciding rule's id; `None` for a drop no rule made.
    pub rule: Option<String>,
    /// TCP flags as tcpdump prints them (`S`, `S.`, `.`, `F.`, `R` ...); empty otherwise.
    pub tcp_flags: String,
}

impl std::fmt::Display for Traced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "+{:.3}s {}", self.elapsed_ms as f64 / 1000.0, PacketText(&self.packet))?;
        if !self.tcp_flags.is_empty() {
            write!(f, " [{}]", self.tcp_flags)?;
        }
        let verdict = if self.allowed { "allow" } else { "deny" };
        match &self.rule {
            Some(rule) => write!(f, " {}: {verdict} (rule {rule})", self.path),
            None => write!(f, " {}: {verdict} (no rule allows it)", self.path),
        }
    }
}

fn path_name(p: u8) -> &'static str {
    match p {
        path::FLOW_CACHE => "flow-cache",
        path::CONNTRACK => "conntrack",
        path::ICMP_ERROR => "icmp-error",
        path::FRAGMENT => "fragment",
        _ => "new",
    }
}

/// TCP flags in tcpdump's letters: S, F, R, P, U, then `.` for ACK.
fn tcp_flags(proto: u8, flags: u8) -> String {
    if proto != iana::PROTO_TCP {
        return String::new();
    }
    let mut s: String = [(0x02, 'S'), (0x01, 'F'), (0x04, 'R'), (0x08, 'P'), (0x20, 'U')]
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, c)| *c)
        .collect();
    if flags & 0x10 != 0 {
        s.push('.');
    }
    s
}

/// A running trace of one interface; disarmed when dropped.
pub struct Tracer {
    ifname: IfName,
    filter: Array<MapData, TraceFilter>,
    switch: Array<MapData, u32>,
    ring: AsyncFd<RingBuf<MapData>>,
    rules: RuleNames,
    pid: u32,
    started: Instant,
}

fn pinned(dir: &Path, name: &'static str, ifname: &IfName) -> Result<Map, TraceError> {
    let path = super::pin_path(dir, name);
    match std::fs::symlink_metadata(&path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(TraceError::NotLoaded { ifname: ifname.clone(), path })
        }
        // The pin directory is root's alone (mode 0700).
        Err(source) => return Err(TraceError::Access { path, source }),
    }
    Ok(crate::bpf::from_pin(&path, name)?)
}

impl Tracer {
    /// Arms the trace of `ifname` with `spec`: the filter first, then the switch. Refused
    /// while another live tracer holds it.
    pub fn start(pin_root: &Path, ifname: &IfName, state_dir: &Path, spec: &TraceSpec) -> Result<Tracer, TraceError> {
        let dir = super::pin_dir(pin_root, ifname);
        let mut filter: Array<MapData, TraceFilter> =
            Array::try_from(pinned(&dir, common::TRACE, ifname)?).map_err(ObjectMapError::on(common::TRACE))?;
        let mut switch: Array<MapData, u32> = Array::try_from(pinned(&dir, common::TRACE_ARMED, ifname)?)
            .map_err(ObjectMapError::on(common::TRACE_ARMED))?;
        let current = filter.get(&0, 0).map_err(ObjectMapError::on(common::TRACE))?;
        let pid = std::process::id();
        if current.tracer != 0 && current.tracer != pid && alive(current.tracer) {
            return Err(TraceError::Busy { ifname: ifname.clone(), pid: current.tracer });
        }
        let mut ring = RingBuf::try_from(pinned(&dir, common::TRACE_EVENTS, ifname)?)
            .map_err(ObjectMapError::on(common::TRACE_EVENTS))?;
        // What an earlier tracer left unread is not this trace's.
        while ring.next().is_some() {}
        filter.set(0, spec.filter(pid), 0).map_err(ObjectMapError::on(common::TRACE))?;
        switch.set(0, 1, 0).map_err(ObjectMapError::on(common::TRACE_ARMED))?;
        // SAFETY: the ring buffer owns its descriptor and moves into the AsyncFd with it.
        let ring = unsafe { AsyncFd::register(ring) }
            .map_err(|e| TraceError::Ring { ifname: ifname.clone(), source: e.into() })?;
        Ok(Tracer {
            ifname: ifname.clone(),
            filter,
            switch,
            ring,
            rules: RuleNames::new(super::slots_file(state_dir, ifname)),
            pid,
            started: Instant::now(),
        })
    }

    /// The next traced packets (at least one), waiting for them. Every second without any,
    /// the switch is set again should an agent (re)loading the programs have cleared it.
    pub async fn next(&mut self) -> Result<Vec<Traced>, TraceError> {
        loop {
            let ready = tokio::time::timeout(std::time::Duration::from_secs(1), self.ring.readable_mut()).await;
            let Ok(ready) = ready else {
                self.rearm();
                continue;
            };
            let mut guard = ready.map_err(|source| TraceError::Ring { ifname: self.ifname.clone(), source })?;
            let mut records = Vec::new();
            while let Some(item) = guard.get_inner_mut().next() {
                if item.len() >= std::mem::size_of::<TraceRecord>() {
                    // SAFETY: the programs write whole records; read_unaligned copes with alignment.
                    records.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const TraceRecord) });
                }
            }
            guard.clear_ready();
            if !records.is_empty() {
                return Ok(records.iter().map(|r| self.describe(r)).collect());
            }
        }
    }

    fn describe(&mut self, r: &TraceRecord) -> Traced {
        Traced {
            packet: packet_record(&r.flow, r.len, r.port),
            elapsed_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            path: path_name(r.path),
            allowed: r.verdict == TRACE_PASS,
            rule: (r.rule != common::NO_RULE).then(|| self.rules.name(r.rule)).map(|n| {
                if n.is_empty() {
                    format!("slot {}", r.rule)
                } else {
                    n
                }
            }),
            tcp_flags: tcp_flags(r.flow.proto, r.tcp_flags),
        }
    }

    fn rearm(&mut self) {
        let ours = self.filter.get(&0, 0).is_ok_and(|f| f.tracer == self.pid);
        if ours && self.switch.get(&0, 0).is_ok_and(|on| on == 0) {
            if let Err(e) = self.switch.set(0, 1, 0) {
                tracing::warn!(ifname = %self.ifname, error = %e, "trace not armed again");
            }
        }
    }

    /// Records the programs could not send so far (the ring buffer was full).
    pub fn lost(&self) -> u64 {
        self.filter.get(&0, 0).map(|f| f.lost).unwrap_or(0)
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        // Only our own: a later tracer may have replaced a filter it found orphaned.
        if self.filter.get(&0, 0).is_ok_and(|f| f.tracer == self.pid) {
            let off = self.switch.set(0, 0, 0).and_then(|()| self.filter.set(0, TraceFilter::default(), 0));
            if let Err(e) = off {
                tracing::error!(ifname = %self.ifname, error = %e, "trace not disarmed");
            }
        }
    }
}

/// Whether process `pid` exists (a tracer in another PID namespace counts as gone only if
/// this one has no such pid).
fn alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: signal 0 checks for the process without sending anything.
    let found = unsafe { libc::kill(pid, 0) } == 0;
    found || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Disarms a trace whose tracer is gone (killed before it could disarm), so the programs
/// stop matching and sending for nobody. Returns whether it did.
pub fn disarm_orphan(ebpf: &mut aya::Ebpf) -> Result<bool, ObjectMapError> {
    let f = crate::bpf::typed::<Array<&MapData, TraceFilter>>(ebpf, common::TRACE)?
        .get(&0, 0)
        .map_err(ObjectMapError::on(common::TRACE))?;
    if f.tracer == 0 || alive(f.tracer) {
        return Ok(false);
    }
    crate::bpf::typed_mut::<Array<&mut MapData, u32>>(ebpf, common::TRACE_ARMED)?
        .set(0, 0, 0)
        .map_err(ObjectMapError::on(common::TRACE_ARMED))?;
    crate::bpf::typed_mut::<Array<&mut MapData, TraceFilter>>(ebpf, common::TRACE)?
        .set(0, TraceFilter::default(), 0)
        .map_err(ObjectMapError::on(common::TRACE))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn prefixes_become_mapped_words_and_masks() {
        let (a, m) = prefix_words(Some(net("10.1.2.0/24")));
        let bytes = |w: [u64; 2]| [w[0].to_ne_bytes(), w[1].to_ne_bytes()].concat();
        assert_eq!(bytes(a), [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 2, 0]);
        assert_eq!(
            bytes(m),
            [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]
        );
        assert_eq!(prefix_words(None), ([0; 2], [0; 2]));
        let (_, m) = prefix_words(Some(net("::/0")));
        assert_eq!(m, [0; 2]);
        // Host bits are dropped: the programs compare masked addresses with the prefix.
        let spec = TraceSpec::new(Some(net("10.1.2.3/24")), None, None, None).unwrap();
        assert_eq!(spec.filter(1).src, a);
    }

    #[test]
    fn a_spec_that_matches_nothing_is_refused() {
        assert!(matches!(
            TraceSpec::new(Some(net("10.0.0.1/32")), Some(net("fd00::1/128")), None, None),
            Err(TraceError::Families { .. })
        ));
        assert!(matches!(TraceSpec::new(None, None, Some(1), Some(8)), Err(TraceError::NoPorts { proto: 1 })));
        let f = TraceSpec::new(None, None, Some(6), Some(443)).unwrap().filter(7);
        assert_eq!((f.tracer, f.proto, f.port), (7, 6 | MATCH_PROTO, 443 | MATCH_PORT));
    }

    #[test]
    fn tcp_flags_read_as_tcpdump_writes_them() {
        assert_eq!(tcp_flags(6, 0x02), "S");
        assert_eq!(tcp_flags(6, 0x12), "S.");
        assert_eq!(tcp_flags(6, 0x11), "F.");
        assert_eq!(tcp_flags(6, 0x18), "P.");
        assert_eq!(tcp_flags(17, 0x02), "");
    }

    #[test]
    fn a_dead_tracer_is_told_from_a_live_one() {
        assert!(alive(std::process::id()));
        // Beyond pid_max (at most 2^22): no such process.
        assert!(!alive(1 << 23));
    }
}
