//! The raw system calls the agent makes itself (where no crate it uses offers them), in one
//! place: each says what the kernel reads or writes, and those whose arguments the kernel
//! trusts for sizes are `unsafe fn` with the contract spelled out.

use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// Elements per `BPF_MAP_UPDATE_BATCH` call.
const BATCH: usize = 8192;

/// `union bpf_attr`, the part of the BPF_MAP_*_BATCH commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Writes `keys[i] -> values[i * per_key .. (i + 1) * per_key]` (flags 0, as
/// `insert(.., 0)`) into the map `fd` with `BPF_MAP_UPDATE_BATCH`: one bpf(2) call per
/// [`BATCH`] elements instead of one per element; the kernel still updates them one by one.
/// Returns how many elements were written: all of them, or those before the first failure
/// (an error, or a kernel without batch operations for the map type).
///
/// # Safety
/// The kernel reads each key and value with the map's own sizes: `K` and `V` must be exactly
/// the map's key and value types (as a typed aya map handle checks), and `per_key` must be
/// 1, or the number of possible CPUs for a per-CPU map whose value size is a multiple of 8.
pub unsafe fn map_update_batch<K: aya::Pod, V: aya::Pod>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
    per_key: usize,
) -> usize {
    assert_eq!(keys.len() * per_key, values.len());
    let mut done = 0;
    for (k, v) in keys.chunks(BATCH).zip(values.chunks(BATCH * per_key)) {
        let mut attr = BatchAttr {
            keys: k.as_ptr() as u64,
            values: v.as_ptr() as u64,
            count: k.len() as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: `attr` is a valid bpf_attr prefix; the kernel reads `count` keys and values
        // of the map's sizes (= size_of K, V) from the two slices, and writes `attr.count`.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>() as u32,
            )
        };
        if r < 0 {
            // `count` now holds the elements written before the failure.
            return done + (attr.count as usize).min(k.len());
        }
        done += k.len();
    }
    done
}

const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

/// `union bpf_attr`, the part of the BPF_PROG_QUERY command.
#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_ifindex: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    count: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// The ids of the tcx links on device `ifindex` in one direction (`BPF_PROG_QUERY`), in
/// the device's order. Asking by id needs only CAP_NET_ADMIN; aya's query opens every
/// program by id to name it, which needs CAP_SYS_ADMIN, a capability the agent does not
/// hold.
pub fn tcx_link_ids(ifindex: u32, ingress: bool) -> std::io::Result<Vec<u32>> {
    let mut capacity = 16usize;
    loop {
        let mut progs = vec![0u32; capacity];
        let mut links = vec![0u32; capacity];
        let mut attr = QueryAttr {
            target_ifindex: ifindex,
            attach_type: if ingress { BPF_TCX_INGRESS } else { BPF_TCX_EGRESS },
            prog_ids: progs.as_mut_ptr() as u64,
            link_ids: links.as_mut_ptr() as u64,
            count: capacity as u32,
            ..Default::default()
        };
        // SAFETY: `attr` is a valid bpf_attr prefix for BPF_PROG_QUERY; the kernel writes at
        // most `count` ids into each of the two buffers (both that long) and sets `count`.
        let r = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_PROG_QUERY, &mut attr as *mut QueryAttr, size_of::<QueryAttr>() as u32)
        };
        let n = attr.count as usize;
        if r < 0 {
            let err = std::io::Error::last_os_error();
            // ENOSPC: more attachments than room; `count` says how many there are.
            if err.raw_os_error() == Some(libc::ENOSPC) && n > capacity {
                capacity = n;
                continue;
            }
            return Err(err);
        }
        links.truncate(n);
        return Ok(links);
    }
}

const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;

/// `membarrier(MEMBARRIER_CMD_GLOBAL)`: returns once every CPU has passed a point where it
/// ran no RCU read-side section begun before the call (`synchronize_rcu`). False when the
/// kernel refuses it (nohz_full).
pub fn membarrier_global() -> bool {
    // SAFETY: membarrier takes no pointers.
    unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) == 0 }
}

/// A descriptor for process `pid` that becomes readable when it exits.
pub fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall, no pointers.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a non-negative return is a new file descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Takes an exclusive `flock` on `file` without waiting; false if another holds it.
pub fn try_lock_exclusive(file: &std::fs::File) -> bool {
    // SAFETY: flock on a descriptor the `File` keeps open for the call.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}
