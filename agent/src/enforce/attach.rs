//! Attaching the classifiers: tcx links (kernel 6.6+) pinned in bpffs, or clsact + cls_bpf
//! filters (older kernels, as Debian 12's 6.1) at a fixed priority and handle.

use std::path::Path;

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use wirefence_common as common;

use super::EnforceError;
use crate::model::IfName;

/// cls_bpf filter priority and handle the agent owns on clsact kernels.
const NL_PRIORITY: u16 = 0x5746; // "WF"
const NL_HANDLE: u16 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum AttachMode {
    Tcx,
    Clsact,
}

/// tcx from kernel 6.6 on, clsact before. `WIREFENCE_TC_ATTACH=clsact` in the environment
/// takes the clsact path on any kernel (the tests run it so on a tcx kernel too; every
/// agent process touching the device must then have it).
pub fn mode() -> AttachMode {
    if std::env::var_os("WIREFENCE_TC_ATTACH").is_some_and(|v| v == "clsact") {
        return AttachMode::Clsact;
    }
    match aya::util::KernelVersion::current() {
        Ok(v) if v >= aya::util::KernelVersion::new(6, 6, 0) => AttachMode::Tcx,
        _ => AttachMode::Clsact,
    }
}

fn directions() -> [(TcAttachType, &'static str, &'static str); 2] {
    [
        (TcAttachType::Ingress, common::PROG_INGRESS, "link_ingress"),
        (TcAttachType::Egress, common::PROG_EGRESS, "link_egress"),
    ]
}

/// How often a program load that the kernel answered with EAGAIN is tried in all.
const LOAD_TRIES: usize = 5;

/// Loads a classifier, trying again while the kernel answers EAGAIN: the verifier gives up
/// with EAGAIN when a signal is pending for the loading thread (as libbpf does, the load is
/// simply repeated; aya keeps the object after a failed load).
pub fn load(prog: &mut SchedClassifier) -> Result<(), aya::programs::ProgramError> {
    retry_while(
        || prog.load(),
        |e| matches!(e, aya::programs::ProgramError::LoadError { io_error, .. } if interrupted(io_error)),
    )
}

fn interrupted(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::EAGAIN)
}

/// Runs `f` up to [`LOAD_TRIES`] times while its error is one `again` accepts.
fn retry_while<E>(mut f: impl FnMut() -> Result<(), E>, again: impl Fn(&E) -> bool) -> Result<(), E> {
    let mut tries = 1;
    loop {
        match f() {
            Err(e) if again(&e) && tries < LOAD_TRIES => {
                tracing::debug!(tries, "program load interrupted (EAGAIN); trying again");
                tries += 1;
            }
            other => return other,
        }
    }
}

fn prog_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> EnforceError {
    move |e| EnforceError::Program { name, source: Box::new(e) }
}

/// Both programs are on the device through the links pinned in `dir` (tcx): each pinned
/// link's id is among the device's, as the kernel lists them. A pinned link whose device is
/// gone is defunct and not among them; a tcx link nobody pins or holds is detached by the
/// kernel, so no copy of ours can be on the device without its pin.
pub fn attached_tcx(dir: &Path, ifname: &IfName, index: u32) -> Result<bool, EnforceError> {
    for (ty, _, link_file) in directions() {
        if !pinned_link_on_device(&dir.join(link_file), ifname, index, ty)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether a link is pinned at `path` and is among the device's tcx links in direction `ty`.
fn pinned_link_on_device(path: &Path, ifname: &IfName, index: u32, ty: TcAttachType) -> Result<bool, EnforceError> {
    let Some(id) = pinned_link_id(path) else { return Ok(false) };
    let on_device = crate::sys::tcx_link_ids(index, ty == TcAttachType::Ingress)
        .map_err(|source| EnforceError::Query { ifname: ifname.clone(), source })?;
    Ok(on_device.contains(&id))
}

/// The id of the link pinned at `path`, if one is.
fn pinned_link_id(path: &Path) -> Option<u32> {
    let link: FdLink = PinnedLink::from_pin(path).ok()?.into();
    link.info().ok().map(|info| info.id())
}

/// Both filters are on the device (clsact: asked of the kernel, as with tcx, so a restarted
/// agent or `status` sees them, and a pass notices one deleted by hand).
pub fn attached_clsact(ifname: &IfName, index: u32) -> Result<bool, EnforceError> {
    for (ty, _, _) in directions() {
        let present = clsact_filter_present(index, ty)
            .map_err(|source| EnforceError::Query { ifname: ifname.clone(), source })?;
        if !present {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether the agent's cls_bpf filter (priority [`NL_PRIORITY`], handle [`NL_HANDLE`]) is on
/// the clsact hook `ty` of device `index`.
fn clsact_filter_present(index: u32, ty: TcAttachType) -> std::io::Result<bool> {
    Ok(bpf_filters(index, ty)?.contains(&(NL_PRIORITY, u32::from(NL_HANDLE))))
}

/// The cls_bpf filters (priority, handle) on the clsact hook `ty` of device `index`: one
/// filter dump over a blocking netlink socket.
pub(super) fn bpf_filters(index: u32, ty: TcAttachType) -> std::io::Result<Vec<(u16, u32)>> {
    use rtnetlink::packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST};
    use rtnetlink::packet_route::tc::{TcAttribute, TcHandle as NlHandle, TcMessage};
    use rtnetlink::packet_route::RouteNetlinkMessage;
    use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut msg = TcMessage::with_index(index as i32);
    // The clsact hooks: ffff:fff2 (ingress) and ffff:fff3 (egress).
    let minor = match ty {
        TcAttachType::Egress => NlHandle::MIN_EGRESS,
        _ => NlHandle::MIN_INGRESS,
    };
    msg.header.parent = NlHandle { major: 0xffff, minor };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut req = NetlinkMessage::new(header, NetlinkPayload::from(RouteNetlinkMessage::GetTrafficFilter(msg)));
    req.finalize();
    let mut buf = vec![0; req.buffer_len()];
    req.serialize(&mut buf);
    socket.send(&buf, 0)?;

    let mut found = Vec::new();
    loop {
        let (data, _) = socket.recv_from_full()?;
        let mut offset = 0;
        while offset < data.len() {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                .map_err(|e| std::io::Error::other(format!("filter dump: {e}")))?;
            let len = msg.header.length as usize;
            if len == 0 {
                return Err(std::io::Error::other("filter dump: empty netlink message"));
            }
            offset += (len + 3) & !3;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(found),
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewTrafficFilter(m)) => {
                    // Handle 0 names no filter.
                    let bpf = m.attributes.iter().any(|a| matches!(a, TcAttribute::Kind(k) if k == "bpf"));
                    let handle = u32::from(m.header.handle);
                    if bpf && handle != 0 {
                        found.push(((m.header.info >> 16) as u16, handle));
                    }
                }
                _ => {}
            }
        }
    }
}

pub fn attach(ebpf: &mut aya::Ebpf, dir: &Path, ifname: &IfName, index: u32) -> Result<AttachMode, EnforceError> {
    let mode = mode();
    if mode == AttachMode::Clsact {
        match aya::programs::tc::qdisc_add_clsact(ifname.as_str()) {
            Ok(()) => {}
            Err(e) if tc_exists(&e) => {} // the qdisc is there already (ours or not: it is shared)
            Err(e) => return Err(EnforceError::Qdisc { ifname: ifname.clone(), source: Box::new(e) }),
        }
    }
    for (ty, name, link_file) in directions() {
        let prog: &mut SchedClassifier =
            ebpf.program_mut(name).ok_or(EnforceError::MissingProgram { name })?.try_into().map_err(prog_err(name))?;
        if prog.fd().is_err() {
            load(prog).map_err(prog_err(name))?;
        }
        match mode {
            AttachMode::Tcx => {
                let path = dir.join(link_file);
                if pinned_link_on_device(&path, ifname, index, ty)? {
                    continue; // a previous agent's link is there: adopt, never a second copy
                }
                // A pinned link left from a device that is gone is defunct: drop its pin.
                if let Ok(old) = PinnedLink::from_pin(&path) {
                    let _ = old.unpin();
                }
                let _ = std::fs::remove_file(&path);
                let id = prog
                    .attach_with_options(ifname.as_str(), ty, TcAttachOptions::TcxOrder(LinkOrder::first()))
                    .map_err(prog_err(name))?;
                let link: SchedClassifierLink = prog.take_link(id).map_err(prog_err(name))?;
                let fd: FdLink = link.try_into().map_err(|e| EnforceError::Link { name, source: Box::new(e) })?;
                fd.pin(&path).map_err(|e| EnforceError::Pin {
                    path: path.clone(),
                    source: std::io::Error::other(e.to_string()),
                })?;
            }
            AttachMode::Clsact => {
                let opts =
                    NlOptions { priority: NL_PRIORITY, handle: TcHandle::new(0, NL_HANDLE), ..Default::default() };
                match prog.attach_with_options(ifname.as_str(), ty, TcAttachOptions::Netlink(opts)) {
                    Ok(id) => {
                        // The filter lives in the kernel; forget the handle without detaching.
                        let link = prog.take_link(id).map_err(prog_err(name))?;
                        std::mem::forget(link);
                    }
                    Err(e) if is_exists(&e) => {} // our filter is already there
                    Err(e) => return Err(prog_err(name)(e)),
                }
            }
        }
    }
    Ok(mode)
}

/// Puts this object's programs in place of the agent's programs attached to the device
/// (another build's, taken over), atomically: tcx: the pinned link is updated to the new
/// program (`BPF_LINK_UPDATE`); clsact: our cls_bpf filter is changed in place (a netlink
/// change of the existing priority and handle, which cls_bpf carries out by swapping the
/// filter in its list under RCU). Either way a packet meets the old program or the new one,
/// never none, and the agent's attachment stays the one `attached` and `remove` know (one
/// pinned link; one filter at its priority and handle). Where nothing is attached, nothing
/// is done: the reconciler's attach comes later. Returns how many programs were replaced.
pub fn replace(ebpf: &mut aya::Ebpf, dir: &Path, ifname: &IfName) -> Result<usize, EnforceError> {
    let mode = mode();
    let mut replaced = 0;
    for (ty, name, link_file) in directions() {
        let prog: &mut SchedClassifier =
            ebpf.program_mut(name).ok_or(EnforceError::MissingProgram { name })?.try_into().map_err(prog_err(name))?;
        if prog.fd().is_err() {
            load(prog).map_err(prog_err(name))?;
        }
        let link: SchedClassifierLink = match mode {
            AttachMode::Tcx => {
                let path = dir.join(link_file);
                let pinned = match PinnedLink::from_pin(&path) {
                    Ok(p) => p,
                    Err(aya::programs::links::LinkError::SyscallError(e))
                        if e.io_error.kind() == std::io::ErrorKind::NotFound =>
                    {
                        continue
                    }
                    Err(e) => return Err(EnforceError::Link { name, source: Box::new(e) }),
                };
                FdLink::from(pinned).try_into().map_err(|e| EnforceError::Link { name, source: Box::new(e) })?
            }
            AttachMode::Clsact => {
                let Ok(index) = nix::net::if_::if_nametoindex(ifname.as_str()) else { continue };
                let present = clsact_filter_present(index, ty)
                    .map_err(|source| EnforceError::Query { ifname: ifname.clone(), source })?;
                if !present {
                    continue;
                }
                SchedClassifierLink::attached(ifname.as_str(), ty, NL_PRIORITY, TcHandle::new(0, NL_HANDLE), None)
                    .map_err(|source| EnforceError::Query { ifname: ifname.clone(), source })?
            }
        };
        match prog.attach_to_link(link) {
            Ok(id) => {
                let link = prog.take_link(id).map_err(prog_err(name))?;
                match mode {
                    // The pin holds the link: closing our descriptor detaches nothing.
                    AttachMode::Tcx => {
                        drop(FdLink::try_from(link).map_err(|e| EnforceError::Link { name, source: Box::new(e) })?)
                    }
                    // The filter lives in the kernel: forget the handle without detaching.
                    AttachMode::Clsact => std::mem::forget(link),
                }
                replaced += 1;
            }
            // A tcx link whose device is gone (ENOLINK): drop its pin; attaching comes later.
            Err(aya::programs::ProgramError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOLINK) => {
                let _ = std::fs::remove_file(dir.join(link_file));
            }
            Err(e) => return Err(prog_err(name)(e)),
        }
    }
    Ok(replaced)
}

/// EEXIST, told by the errno: the kernel's extended ack text varies ("Exclusivity flag on,
/// cannot modify" for a qdisc on 6.1, "Filter already exists" for a filter).
pub(super) fn tc_exists(e: &aya::programs::TcError) -> bool {
    match e {
        aya::programs::TcError::AlreadyAttached => true,
        aya::programs::TcError::NetlinkError(e) => e.raw_os_error() == Some(libc::EEXIST),
        _ => false,
    }
}

pub(super) fn is_exists(e: &aya::programs::ProgramError) -> bool {
    match e {
        aya::programs::ProgramError::TcError(e) => tc_exists(e),
        aya::programs::ProgramError::NetlinkError(e) => e.raw_os_error() == Some(libc::EEXIST),
        _ => false,
    }
}

/// Detaches (tcx: unpins the links; clsact: deletes our filters) and removes every pin.
pub fn remove(dir: &Path, ifname: &IfName) -> Result<(), EnforceError> {
    if mode() == AttachMode::Clsact {
        for (ty, _, _) in directions() {
            // Filters vanish with the device anyway; removing them matters only if it stays.
            let link =
                SchedClassifierLink::attached(ifname.as_str(), ty, NL_PRIORITY, TcHandle::new(0, NL_HANDLE), None);
            if let Ok(link) = link {
                drop(link);
            }
        }
    }
    if !dir.exists() {
        return Ok(());
    }
    for (_, _, link_file) in directions() {
        if let Ok(link) = PinnedLink::from_pin(dir.join(link_file)) {
            let _ = link.unpin(); // dropping the fd detaches the tcx link
        }
    }
    let entries = std::fs::read_dir(dir).map_err(|source| EnforceError::Pin { path: dir.to_owned(), source })?;
    for entry in entries.flatten() {
        let path = entry.path();
        std::fs::remove_file(&path).map_err(|source| EnforceError::Pin { path: path.clone(), source })?;
    }
    std::fs::remove_dir(dir).map_err(|source| EnforceError::Pin { path: dir.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_error(errno: i32) -> std::io::Error {
        std::io::Error::from_raw_os_error(errno)
    }

    #[test]
    fn an_interrupted_load_is_tried_again_and_other_errors_are_not() {
        let mut calls = 0;
        retry_while(
            || {
                calls += 1;
                if calls < 3 {
                    Err(load_error(libc::EAGAIN))
                } else {
                    Ok(())
                }
            },
            interrupted,
        )
        .expect("the third try loads");
        assert_eq!(calls, 3);

        let mut calls = 0;
        retry_while(
            || {
                calls += 1;
                Err(load_error(libc::EAGAIN))
            },
            interrupted,
        )
        .unwrap_err();
        assert_eq!(calls, LOAD_TRIES, "gives up after {LOAD_TRIES} tries");

        let mut calls = 0;
        retry_while(
            || {
                calls += 1;
                Err(load_error(libc::EACCES))
            },
            interrupted,
        )
        .unwrap_err();
        assert_eq!(calls, 1, "a verifier refusal is final");
    }
}
