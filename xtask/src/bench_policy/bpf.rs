//! bpf(2) pieces the benchmark needs and aya does not give directly: a no-op classifier
//! loaded from raw instructions, `BPF_PROG_TEST_RUN` returning the kernel's own timing, the
//! bench's bpffs, and the classifiers loaded over an enforcer's pinned maps.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use aya::programs::SchedClassifier;
use wirefence_common as common;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a #[repr(C)] bpf_attr prefix the kernel reads (and writes) within
    // its size; trailing fields the kernel knows of but we do not pass are taken as zero.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>() as u32) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

/// `union bpf_attr`, BPF_PROG_LOAD part (through `expected_attach_type`).
#[repr(C)]
#[derive(Default)]
struct LoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// A SCHED_CLS program of two instructions, `r0 = 0 (TC_ACT_OK); exit`: the floor of what
/// any classifier costs under BPF_PROG_TEST_RUN.
pub fn load_noop() -> Result<OwnedFd> {
    // struct bpf_insn { u8 code; u8 dst:4, src:4; s16 off; s32 imm; }
    let insns: [u64; 2] = [
        0xb7, // BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm 0
        0x95, // BPF_JMP | BPF_EXIT
    ];
    let license = b"GPL\0";
    let mut name = [0u8; 16];
    name[..7].copy_from_slice(b"wf_noop");
    let mut attr = LoadAttr {
        prog_type: BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name,
        ..Default::default()
    };
    let fd = sys_bpf(BPF_PROG_LOAD, &mut attr).context("BPF_PROG_LOAD of the no-op classifier")?;
    // SAFETY: a new descriptor the kernel just returned to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `union bpf_attr`, BPF_PROG_TEST_RUN part.
#[repr(C)]
#[derive(Default)]
struct TestAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// One BPF_PROG_TEST_RUN: (return value, kernel-measured mean ns per repetition). The
/// kernel times the repetition loop itself (time while rescheduled excluded) and divides
/// by `repeat`; the skb is built once and reused by every repetition.
pub fn test_run(prog: RawFd, frame: &[u8], repeat: u32) -> Result<(u32, u32)> {
    let mut attr = TestAttr {
        prog_fd: prog as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat,
        ..Default::default()
    };
    sys_bpf(BPF_PROG_TEST_RUN, &mut attr).with_context(|| format!("BPF_PROG_TEST_RUN ({} bytes)", frame.len()))?;
    Ok((attr.retval, attr.duration))
}

/// The bench's bpffs at `root`: mounted unless one is there already, unmounted (and the
/// mount point removed) on drop if this guard mounted it. Pins under it are removed by
/// their owners (`wirefence_agent::enforce::remove`) before.
pub struct Bpffs {
    pub root: PathBuf,
    mounted: bool,
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: zeroed statfs is valid; statfs fills it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out pointer.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

impl Bpffs {
    pub fn mount(root: &Path) -> Result<Bpffs> {
        std::fs::create_dir_all(root).with_context(|| format!("create {}", root.display()))?;
        if is_bpffs(root) {
            return Ok(Bpffs { root: root.to_owned(), mounted: false });
        }
        // Shared, as systemd makes every mount on a host: the agent accepts a bpffs whose
        // mount propagates when it cannot compare it with PID 1's view.
        for args in [&["-t", "bpf", "bpf"][..], &["--make-shared"][..]] {
            let out = std::process::Command::new("mount").args(args).arg(root).output()?;
            if !out.status.success() {
                bail!("mount {args:?} {}: {}", root.display(), String::from_utf8_lossy(&out.stderr).trim());
            }
        }
        Ok(Bpffs { root: root.to_owned(), mounted: true })
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        if self.mounted {
            let _ = std::process::Command::new("umount").arg(&self.root).status();
            let _ = std::fs::remove_dir(&self.root);
        }
    }
}

/// An enforcer's pin directory, removed (programs detached, every pin deleted) on drop.
pub struct Pins {
    pub root: PathBuf,
    pub ifname: wirefence_agent::model::IfName,
}

/// An enforcer of its own (pins named `<tag><pid>`, removed with the returned [`Pins`])
/// with one generated IPv4 rule applied: the bed of the parts that measure one path.
pub fn one_rule(
    root: &Path,
    state_dir: &Path,
    tag: &str,
    l3_offset: u32,
) -> Result<(Pins, wirefence_agent::enforce::Enforcer)> {
    let ifname: wirefence_agent::model::IfName = format!("{tag}{}", std::process::id() % 100_000).parse()?;
    let pins = Pins { root: root.to_owned(), ifname: ifname.clone() };
    let mut enforcer =
        wirefence_agent::enforce::Enforcer::open(root, &ifname, l3_offset, state_dir).context("Enforcer::open")?;
    let policy = super::rules::policy(super::rules::generate(1, false))?;
    let compiled = wirefence_agent::policy::compile(&policy).map_err(|e| anyhow::anyhow!("compile: {e}"))?;
    enforcer.apply(&compiled, 1).context("Enforcer::apply")?;
    Ok((pins, enforcer))
}

impl Drop for Pins {
    fn drop(&mut self) {
        if let Err(e) = wirefence_agent::enforce::remove(&self.root, &self.ifname) {
            eprintln!("bench-policy: warning: removing pins of {}: {e}", self.ifname);
        }
    }
}

/// The object's classifiers loaded over the maps pinned in `dir` (an enforcer's directory):
/// what they see is exactly what the enforcer wrote. Not attached anywhere.
pub struct Shared {
    pub ebpf: aya::Ebpf,
}

/// Whether a [`Shared`] copy has its per-CPU caches (flow cache in front of conntrack,
/// verdict cache in front of the policy lookup).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Caches {
    /// As the agent loads it.
    On,
    /// Flow cache of one slot (the programs' slot index is almost always beyond it), verdict
    /// cache of one (never used): established packets take the conntrack lookups, as the
    /// first packet of a flow on a CPU or after a flip does, and new flows the policy lookup.
    Off,
}

impl Shared {
    pub fn load(dir: &Path, l3_offset: u32, cache: Caches) -> Result<Shared> {
        Shared::load_with(dir, l3_offset, cache, true)
    }

    /// As loaded before the live trace existed: `WF_TRACE_BUILT = 0`, so the verifier
    /// removes the trace's check from the programs.
    pub fn load_traceless(dir: &Path, l3_offset: u32) -> Result<Shared> {
        Shared::load_with(dir, l3_offset, Caches::On, false)
    }

    fn load_with(dir: &Path, l3_offset: u32, cache: Caches, trace: bool) -> Result<Shared> {
        let trace = u32::from(trace);
        let mut loader = aya::EbpfLoader::new();
        loader.override_global(common::GLOBAL_L3_OFFSET, &l3_offset, true);
        loader.override_global(common::trace::GLOBAL_TRACE, &trace, true);
        if cache == Caches::Off {
            loader.map_max_entries(common::FLOW_CACHE, 1);
            loader.map_max_entries(common::VERDICT_CACHE, 1);
        }
        let paths = wirefence_agent::enforce::pin_paths(dir);
        for (name, path) in &paths {
            anyhow::ensure!(path.exists(), "{} is not pinned", path.display());
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(wirefence_agent::bpf::object()).context("load the eBPF object over the pins")?;
        for name in [common::PROG_INGRESS, common::PROG_EGRESS, common::PROG_MSS] {
            let prog: &mut SchedClassifier =
                ebpf.program_mut(name).with_context(|| format!("no program {name}"))?.try_into()?;
            prog.load().with_context(|| format!("load {name}"))?;
        }
        Ok(Shared { ebpf })
    }

    pub fn prog_fd(&self, name: &str) -> Result<RawFd> {
        let prog: &SchedClassifier =
            self.ebpf.program(name).with_context(|| format!("no program {name}"))?.try_into()?;
        Ok(prog.fd()?.as_fd().as_raw_fd())
    }

    /// `STATS[index]` packets, summed over CPUs.
    pub fn stat(&self, index: u32) -> Result<u64> {
        let map = self.ebpf.map(common::STATS).context("no STATS map")?;
        let arr: aya::maps::PerCpuArray<&aya::maps::MapData, common::Counter> = aya::maps::PerCpuArray::try_from(map)?;
        Ok(arr.get(&index, 0)?.iter().map(|c| c.packets).sum())
    }

    /// The conntrack entry of the flow whose first packet had tuple `key`, if any.
    pub fn conntrack(&self, key: &common::FlowKey) -> Result<Option<common::FlowValue>> {
        let map = self.ebpf.map(common::CONNTRACK).context("no CONNTRACK map")?;
        let h: aya::maps::HashMap<&aya::maps::MapData, common::FlowKey, common::FlowValue> =
            aya::maps::HashMap::try_from(map)?;
        let canonical = key.canonical().0;
        match h.get(&canonical, 0) {
            Ok(v) if v.first_packet(&canonical) == *key => Ok(Some(v)),
            Ok(_) => Ok(None),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}
