//! The MSS clamp alone, for a tunnel device without a policy (with one, the policy programs
//! clamp, from `CT_CONFIG`): `wf_mss` as a cls_bpf filter on both clsact hooks, on every
//! kernel. A filter lives in the kernel with no pin and no process, so nothing needs a
//! bpffs; its limits are its handle (IPv4 MSS in the high half, IPv6 in the low), so the
//! device itself says what is clamped, and a change is a new filter before the old one goes
//! (both clamp meanwhile). The program hands every packet on (`TC_ACT_UNSPEC`), so it never
//! decides anything for the filters and tcx programs around it.

use aya::programs::tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::{SchedClassifier, TcAttachType};
use wirefence_common as common;

use super::attach::{bpf_filters, is_exists, tc_exists};
use super::{map_err, EnforceError};
use crate::bpf::typed_mut;
use crate::model::{ClampObserved, IfName, MssClamp};

/// cls_bpf priority of the clamp: after the policy's filter (which clamps itself), distinct
/// from it.
const PRIORITY: u16 = 0x5747;

const HOOKS: [TcAttachType; 2] = [TcAttachType::Ingress, TcAttachType::Egress];

/// Maps the clamp does not use, loaded with one entry instead of their real size (the
/// object declares every map; only `CT_CONFIG` matters here).
const UNUSED_MAPS: [&str; 12] = [
    common::SRC_V4,
    common::DST_V4,
    common::SRC_V6,
    common::DST_V6,
    common::POLICY,
    common::CONNTRACK,
    common::RULE_COUNTERS,
    common::STATS,
    common::EVENT_BUDGET,
    common::CT_QUOTA,
    common::FLOW_CACHE,
    common::VERDICT_CACHE,
];

fn handle(m: MssClamp) -> TcHandle {
    TcHandle::new(m.v4, m.v6)
}

fn limits(handle: u32) -> MssClamp {
    MssClamp { v4: (handle >> 16) as u16, v6: handle as u16 }
}

fn query_err(ifname: &IfName) -> impl FnOnce(std::io::Error) -> EnforceError + '_ {
    move |source| EnforceError::Query { ifname: ifname.clone(), source }
}

/// The clamp as found on device `index`.
pub fn observe(ifname: &IfName, index: u32) -> Result<ClampObserved, EnforceError> {
    let mut per_hook = Vec::new();
    for ty in HOOKS {
        let ours: Vec<u32> = bpf_filters(index, ty)
            .map_err(query_err(ifname))?
            .into_iter()
            .filter(|f| f.0 == PRIORITY)
            .map(|f| f.1)
            .collect();
        per_hook.push(ours);
    }
    let present = per_hook.iter().any(|h| !h.is_empty());
    let limits = match (&per_hook[0][..], &per_hook[1][..]) {
        ([a], [b]) if a == b => Some(limits(*a)),
        _ => None,
    };
    Ok(ClampObserved { limits, present })
}

/// Puts the clamp with `m` on both hooks of the device (a clsact qdisc is added if there is
/// none), then takes off any clamp with other limits.
pub fn attach(ifname: &IfName, index: u32, m: MssClamp) -> Result<(), EnforceError> {
    let name = common::PROG_MSS;
    let prog_err = |e| EnforceError::Program { name, source: Box::new(e) };
    let mut loader = aya::EbpfLoader::new();
    // WireGuard is an L3 device: the IP header is at 0.
    loader.override_global(common::GLOBAL_L3_OFFSET, &0u32, true);
    for map in UNUSED_MAPS {
        loader.map_max_entries(map, 1);
    }
    let mut ebpf = loader
        .load(crate::bpf::object())
        .map_err(|e| EnforceError::Load { ifname: ifname.clone(), source: Box::new(e) })?;
    let config = common::CtConfig { mss_clamp: m, ..Default::default() };
    typed_mut::<aya::maps::Array<_, common::CtConfig>>(&mut ebpf, common::CT_CONFIG)?
        .set(0, config, 0)
        .map_err(map_err(common::CT_CONFIG))?;
    let prog: &mut SchedClassifier =
        ebpf.program_mut(name).ok_or(EnforceError::MissingProgram { name })?.try_into().map_err(prog_err)?;
    super::attach::load(prog).map_err(prog_err)?;
    match aya::programs::tc::qdisc_add_clsact(ifname.as_str()) {
        Ok(()) => {}
        Err(e) if tc_exists(&e) => {} // shared with the policy's filters and anyone else's
        Err(e) => return Err(EnforceError::Qdisc { ifname: ifname.clone(), source: Box::new(e) }),
    }
    for ty in HOOKS {
        let opts = NlOptions { priority: PRIORITY, handle: handle(m), ..Default::default() };
        match prog.attach_with_options(ifname.as_str(), ty, TcAttachOptions::Netlink(opts)) {
            // The filter lives in the kernel; forget the handle without detaching.
            Ok(id) => std::mem::forget(prog.take_link(id).map_err(prog_err)?),
            Err(e) if is_exists(&e) => {} // this very clamp is there already
            Err(e) => return Err(prog_err(e)),
        }
    }
    remove_except(ifname, index, Some(m))
}

/// Takes every clamp filter off the device.
pub fn remove(ifname: &IfName, index: u32) -> Result<(), EnforceError> {
    remove_except(ifname, index, None)
}

fn remove_except(ifname: &IfName, index: u32, keep: Option<MssClamp>) -> Result<(), EnforceError> {
    let keep = keep.map(|m| u32::from(handle(m)));
    for ty in HOOKS {
        for (prio, h) in bpf_filters(index, ty).map_err(query_err(ifname))? {
            if prio != PRIORITY || Some(h) == keep {
                continue;
            }
            // Dropping the link deletes the filter.
            let link = SchedClassifierLink::attached(ifname.as_str(), ty, PRIORITY, TcHandle::from(h), None)
                .map_err(query_err(ifname))?;
            drop(link);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_round_trip_through_the_handle() {
        for m in [MssClamp { v4: 1380, v6: 1360 }, MssClamp { v4: 1200, v6: 0 }, MssClamp { v4: 0, v6: 65475 }] {
            assert_eq!(limits(u32::from(handle(m))), m);
        }
    }
}
