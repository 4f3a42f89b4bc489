//! The enforcer's pins across agent builds: a restarted agent of the same build adopts them;
//! another build's are taken over in place, maps reused or migrated (conntrack entries of
//! the first layout re-keyed canonically), the build record written last; a layout no
//! migration is known for, or pins no build recorded, are refused with an error naming the
//! map and versions, and nothing is touched. The pin root must be the host's bpffs: one
//! that is no bpffs is refused, never mounted over. Needs root.

use std::path::{Path, PathBuf};

use aya::maps::{HashMap, MapData};
use wirefence_agent::enforce::trace::{TraceSpec, Tracer};
use wirefence_agent::enforce::{self, EnforceError, Enforcer};
use wirefence_agent::model::IfName;
use wirefence_common::trace::TraceFilter;
use wirefence_common::{self as common, FlowKey, FlowValue};

/// A bpffs of this test's own (mounted here, in the host's mount namespace, 0700) with the
/// pin root below it, and a state directory; removed (and unmounted) on drop.
struct Dirs {
    mount: PathBuf,
    root: PathBuf,
    state: PathBuf,
    ifname: IfName,
}

impl Dirs {
    fn new() -> Dirs {
        wirefence_tests::require_root_for("pinning eBPF maps needs root");
        let tag = format!("{}-{}", std::process::id(), std::time::UNIX_EPOCH.elapsed().unwrap().as_nanos() % 1_000_000);
        let mount = PathBuf::from(format!("/run/wirefence-enf-{tag}"));
        wirefence_tests::mount_bpffs(&mount);
        let state = std::env::temp_dir().join(format!("wirefence-enf-{tag}"));
        std::fs::create_dir_all(&state).unwrap();
        let ifname = format!("wfe{:x}", std::process::id() % 0xffff).parse().unwrap();
        Dirs { root: mount.join("pins"), mount, state, ifname }
    }

    fn open(&self) -> Result<Enforcer, EnforceError> {
        Enforcer::open(&self.root, &self.ifname, 0, &self.state)
    }

    fn build_file(&self) -> PathBuf {
        self.state.join(format!("{}.ebpf-build", self.ifname))
    }

    fn pins(&self) -> PathBuf {
        enforce::pin_dir(&self.root, &self.ifname)
    }

    fn conntrack(&self) -> HashMap<MapData, FlowKey, FlowValue> {
        let pin = enforce::pin_path(&self.pins(), common::CONNTRACK);
        HashMap::try_from(wirefence_agent::bpf::from_pin(&pin, common::CONNTRACK).unwrap()).unwrap()
    }

    /// Records the pins as made by build `object` with this build's layouts but conntrack's
    /// at `conntrack_version`.
    fn record_other_build(&self, object: &str, conntrack_version: u32) {
        let mut record = enforce::record::BuildRecord::ours();
        record.object = object.to_owned();
        record.maps.get_mut(common::CONNTRACK).unwrap().version = conntrack_version;
        enforce::record::write(&self.build_file(), &record).unwrap();
    }
}

impl Drop for Dirs {
    fn drop(&mut self) {
        if let Err(e) = enforce::remove(&self.root, &self.ifname) {
            eprintln!("cleanup: removing pins under {}: {e}", self.root.display());
        }
        unmount(&self.mount);
        let _ = std::fs::remove_dir(&self.mount);
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

fn unmount(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid C string; MNT_DETACH so open map fds do not keep it busy.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

/// A flow as its first packet saw it: not the canonical key (the source orders last).
fn first_packet() -> FlowKey {
    let addr = |b: u8| std::array::from_fn(|i| if i == 15 { b } else { 0xfd });
    FlowKey { src: addr(9), dst: addr(1), sport: 40000, dport: 443, proto: 6, direction: 0, _pad: [0; 2] }
}

fn flow_value(flags: u32) -> FlowValue {
    FlowValue { epoch: 7, rule: 3, last_seen_ns: 1234, state: 1, flags, first_seen_ns: 1000, packets: 5, bytes: 700 }
}

/// An entry of the builds before counts (conntrack layouts 1 and 2: epoch and rule, last
/// seen, state and flags; 24 bytes), as `flow_value` has it.
fn uncounted_value(flags: u32) -> [u64; 3] {
    let v = flow_value(flags);
    [u64::from(v.epoch) | u64::from(v.rule) << 32, v.last_seen_ns, u64::from(v.state) | u64::from(flags) << 32]
}

/// `bpf(cmd, attr)` with `attr` a zeroed `union bpf_attr` of which the caller set the first
/// words; the result, or the call's error.
fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> i64 {
    // SAFETY: `attr` is a 128-byte buffer, larger than the fields each command reads.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(attr)) };
    assert!(r >= 0, "bpf({cmd}): {}", std::io::Error::last_os_error());
    r
}

/// Replaces the pinned conntrack map with one in the layout of the builds before counts
/// (24-byte values) holding `entries`, as such a build would have left it.
fn pin_uncounted_conntrack(d: &Dirs, entries: &[(FlowKey, [u64; 3])]) {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_HASH: u64 = 1;
    let pin = enforce::pin_path(&d.pins(), common::CONNTRACK);
    std::fs::remove_file(&pin).unwrap();
    // map_type, key_size | value_size << 32, max_entries (map_flags 0).
    let mut attr = [0u64; 16];
    attr[0] = BPF_MAP_TYPE_HASH | 40 << 32;
    attr[1] = 24 | u64::from(common::MAX_CONNTRACK) << 32;
    let fd = bpf(BPF_MAP_CREATE, &mut attr);
    for (key, value) in entries {
        // map_fd, key, value, flags (BPF_ANY).
        let mut attr = [0u64; 16];
        attr[0] = fd as u64;
        attr[1] = key as *const FlowKey as u64;
        attr[2] = value.as_ptr() as u64;
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr);
    }
    let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes()).unwrap();
    // pathname, bpf_fd.
    let mut attr = [0u64; 16];
    attr[0] = path.as_ptr() as u64;
    attr[1] = fd as u64;
    bpf(BPF_OBJ_PIN, &mut attr);
    // SAFETY: the map's descriptor, no longer used (the pin holds the map).
    unsafe { libc::close(fd as i32) };
}

fn staged_pins(d: &Dirs) -> Vec<String> {
    std::fs::read_dir(d.pins())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains('@'))
        .collect()
}

#[test]
fn another_builds_pins_with_the_same_layouts_are_taken_over_and_kept() {
    let d = Dirs::new();
    drop(d.open().expect("first open pins the maps"));
    drop(d.open().expect("the same build adopts its pins"));
    let (canon, _) = first_packet().canonical();
    let mut ct: HashMap<MapData, FlowKey, FlowValue> = d.conntrack();
    ct.insert(canon, flow_value(0), 0).unwrap();

    d.record_other_build("0123456789abcdef", common::layout::of(common::CONNTRACK).unwrap().version);
    drop(d.open().expect("another build's pins in the same layouts are taken over"));
    assert_eq!(d.conntrack().get(&canon, 0).unwrap(), flow_value(0), "the conntrack map was not reused");
    let record = enforce::record::read(&d.build_file()).unwrap().unwrap();
    assert_eq!(record, enforce::record::BuildRecord::ours(), "this build is recorded last");
    assert!(staged_pins(&d).is_empty());
}

/// The upgrade from the last build without counts (conntrack layout 2): the flows are
/// carried over, counted from then on.
#[test]
fn flows_of_a_build_without_counts_are_carried_over_and_counted_from_then_on() {
    let d = Dirs::new();
    drop(d.open().expect("first open pins the maps"));
    let (canon, _) = first_packet().canonical();
    pin_uncounted_conntrack(&d, &[(canon, uncounted_value(0))]);
    d.record_other_build("0123456789abcdef", common::layout::CONNTRACK_V2);
    drop(d.open().expect("a build without counts is taken over"));
    let want = FlowValue { first_seen_ns: 1234, packets: 0, bytes: 0, ..flow_value(0) };
    assert_eq!(d.conntrack().get(&canon, 0).unwrap(), want);
    assert!(staged_pins(&d).is_empty());
}

#[test]
fn a_legacy_record_migrates_conntrack_to_canonical_keys() {
    let d = Dirs::new();
    drop(d.open().expect("first open pins the maps"));
    let key = first_packet();
    pin_uncounted_conntrack(&d, &[(key, uncounted_value(common::FLOW_QUOTA_COUNTED))]);
    // What builds before layout records wrote: the object's digest alone.
    std::fs::write(d.build_file(), "0123456789abcdef\n").unwrap();
    drop(d.open().expect("a legacy record is taken over"));
    let ct = d.conntrack();
    let (canon, swapped) = key.canonical();
    assert!(swapped, "the test's key must not be canonical already");
    // Counted from the migration on, first seen when last seen.
    let want = FlowValue { first_seen_ns: 1234, packets: 0, bytes: 0, ..flow_value(0) };
    assert_eq!(
        ct.get(&canon, 0).unwrap(),
        FlowValue { flags: common::FLOW_QUOTA_COUNTED | common::FLOW_SWAPPED, ..want }
    );
    assert!(ct.get(&key, 0).is_err(), "the first-packet key was carried over as it was");
    assert!(staged_pins(&d).is_empty(), "the moved pin is unlinked once this build is recorded");
    assert_eq!(enforce::record::read(&d.build_file()).unwrap().unwrap(), enforce::record::BuildRecord::ours());
}

#[test]
fn maps_an_interrupted_takeover_moved_aside_are_moved_back_by_their_build() {
    let d = Dirs::new();
    drop(d.open().expect("first open pins the maps"));
    let (canon, _) = first_packet().canonical();
    d.conntrack().insert(canon, flow_value(0), 0).unwrap();
    // Another build moved our conntrack aside and pinned its own (another shape) in its
    // place, then stopped before recording itself.
    let ours = common::layout::of(common::CONNTRACK).unwrap().version;
    let pins = d.pins();
    std::fs::rename(pins.join(common::CONNTRACK), pins.join(format!("{}@v{ours}", common::CONNTRACK))).unwrap();
    let other = MapData::from_pin(pins.join(common::STATS)).unwrap();
    other.pin(pins.join(common::CONNTRACK)).unwrap();
    drop(other);
    drop(d.open().expect("this build moves its maps back"));
    assert_eq!(d.conntrack().get(&canon, 0).unwrap(), flow_value(0), "our conntrack map is not back");
    assert!(staged_pins(&d).is_empty());
}

#[test]
fn an_unknown_layout_or_unrecorded_pins_are_refused_and_left_alone() {
    let d = Dirs::new();
    drop(d.open().expect("first open pins the maps"));
    let (canon, _) = first_packet().canonical();
    d.conntrack().insert(canon, flow_value(0), 0).unwrap();
    d.record_other_build("0123456789abcdef", 99);
    let before = std::fs::read(d.build_file()).unwrap();
    match d.open() {
        Err(e @ EnforceError::UnknownLayout { .. }) => {
            let msg = e.to_string();
            let ours = common::layout::of(common::CONNTRACK).unwrap().version;
            for want in ["WF_CONNTRACK", "0123456789abcdef", "version 99", &format!("version {ours}")] {
                assert!(msg.contains(want), "{want:?} missing from: {msg}");
            }
        }
        Err(e) => panic!("an unknown layout: {e}"),
        Ok(_) => panic!("an unknown layout was taken over"),
    }
    assert_eq!(d.conntrack().get(&canon, 0).unwrap(), flow_value(0), "the refused pins were touched");
    assert_eq!(std::fs::read(d.build_file()).unwrap(), before, "the record was rewritten");
    assert!(staged_pins(&d).is_empty(), "a pin was moved before the refusal");

    std::fs::remove_file(d.build_file()).unwrap();
    match d.open() {
        Err(e @ EnforceError::NotRecorded { .. }) => assert!(e.to_string().contains("wirefence-agent down"), "{e}"),
        Err(e) => panic!("unrecorded pins: {e}"),
        Ok(_) => panic!("unrecorded pins were adopted"),
    }
    // `down` removes the pins: the next open starts afresh and records this build.
    enforce::remove(&d.root, &d.ifname).unwrap();
    drop(d.open().expect("open after down"));
    assert_eq!(enforce::record::read(&d.build_file()).unwrap().unwrap(), enforce::record::BuildRecord::ours());
}

#[test]
fn a_pin_root_on_no_bpffs_is_refused_and_nothing_is_mounted() {
    wirefence_tests::require_root_for("the agent's bpffs check");
    let dir = std::env::temp_dir().join(format!("wirefence-nobpf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ifname: IfName = "wfnobpf".parse().unwrap();
    let root = dir.join("pins");
    match Enforcer::open(&root, &ifname, 0, &dir) {
        Err(e @ EnforceError::NoBpffs { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(root.to_str().unwrap()) && msg.contains("does not mount"), "{msg}");
        }
        Err(e) => panic!("a pin root on no bpffs: {e}"),
        Ok(_) => panic!("a pin root on no bpffs was used"),
    }
    let out = wirefence_tests::run_ok(std::process::Command::new("stat").args(["-f", "-c", "%T"]).arg(&dir));
    assert_ne!(out.trim(), "bpf_fs", "the agent mounted a bpffs");
    assert!(!root.exists(), "the pin root was created off bpffs");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn mode(p: &Path) -> u32 {
    std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(p).unwrap()) & 0o7777
}

#[test]
fn the_pin_root_and_pin_directories_the_agent_creates_are_0700() {
    let d = Dirs::new();
    drop(d.open().expect("open pins the maps"));
    assert_eq!(mode(&d.root), 0o700, "pin root {}", d.root.display());
    assert_eq!(mode(&enforce::pin_dir(&d.root, &d.ifname)), 0o700);
}

#[test]
fn pin_directories_others_own_or_can_write_are_refused_and_nothing_is_loaded_from_them() {
    use std::os::unix::fs::PermissionsExt;
    let d = Dirs::new();
    drop(d.open().expect("first open pins the maps"));
    let pins = enforce::pin_dir(&d.root, &d.ifname);
    let refused = |why: &str| match d.open() {
        Err(e @ EnforceError::UnsafePins(_)) => {
            let msg = e.to_string();
            assert!(msg.contains(pins.to_str().unwrap()) && msg.contains(why), "{msg}");
        }
        Err(e) => panic!("{why}: another error: {e}"),
        Ok(_) => panic!("{why}: the pins were loaded"),
    };
    // Another user's directory (as if a local user had made it, pins and all, first).
    std::os::unix::fs::chown(&pins, Some(65534), None).unwrap();
    refused("owned by uid 65534");
    std::os::unix::fs::chown(&pins, Some(0), None).unwrap();
    // Ours, but anyone could plant or unlink pins in it.
    std::fs::set_permissions(&pins, std::fs::Permissions::from_mode(0o777)).unwrap();
    refused("0777");
    // Closed again: adopted as before.
    std::fs::set_permissions(&pins, std::fs::Permissions::from_mode(0o700)).unwrap();
    drop(d.open().expect("a private pin directory is adopted"));
}

/// The pinned array `name` of `d`'s interface.
fn pinned<V: aya::Pod>(d: &Dirs, name: &str) -> aya::maps::Array<MapData, V> {
    let data = MapData::from_pin(enforce::pin_path(&d.pins(), name)).unwrap();
    aya::maps::Array::try_from(aya::maps::Map::from_map_data(data).unwrap()).unwrap()
}

/// Pins of a build before the live trace (its record names no trace maps) are taken over
/// with the flows kept, and the trace maps created; a trace pin such a build left beside
/// its own (an earlier downgrade) is not adopted but started afresh, disarmed.
#[test]
fn pins_of_a_build_without_the_trace_maps_are_taken_over_and_get_them() {
    let d = Dirs::new();
    drop(d.open().expect("first open pins the maps"));
    let (canon, _) = first_packet().canonical();
    d.conntrack().insert(canon, flow_value(0), 0).unwrap();
    let older = |keep_trace_pin: bool| {
        let mut record = enforce::record::BuildRecord::ours();
        record.object = "00000000000000aa".to_owned();
        for name in [common::TRACE, common::TRACE_EVENTS, common::TRACE_ARMED] {
            record.maps.remove(name);
            if !keep_trace_pin || name == common::TRACE_EVENTS {
                let _ = std::fs::remove_file(enforce::pin_path(&d.pins(), name));
            }
        }
        enforce::record::write(&d.build_file(), &record).unwrap();
    };
    older(false);
    drop(d.open().expect("an older build's pins are taken over"));
    assert_eq!(d.conntrack().get(&canon, 0).unwrap(), flow_value(0), "the flows were kept");
    for name in [common::TRACE, common::TRACE_EVENTS, common::TRACE_ARMED] {
        assert!(enforce::pin_path(&d.pins(), name).exists(), "{name} is pinned");
    }
    assert_eq!(enforce::record::read(&d.build_file()).unwrap().unwrap(), enforce::record::BuildRecord::ours());

    // An armed trace under the names, unknown to the record: replaced by fresh maps.
    pinned(&d, common::TRACE).set(0, TraceFilter { tracer: 1, ..Default::default() }, 0).unwrap();
    pinned(&d, common::TRACE_ARMED).set(0, 1u32, 0).unwrap();
    older(true);
    drop(d.open().expect("taken over again"));
    assert_eq!(pinned::<TraceFilter>(&d, common::TRACE).get(&0, 0).unwrap(), TraceFilter::default());
    assert_eq!(pinned::<u32>(&d, common::TRACE_ARMED).get(&0, 0).unwrap(), 0, "the stale switch was not adopted");
}

/// An agent (re)loading the programs clears the trace's switch (a data section starts
/// zeroed); a running tracer sets it again within a second, and clears it when it ends.
#[test]
fn a_trace_survives_the_agent_loading_its_programs_again() {
    let d = Dirs::new();
    drop(d.open().expect("first open pins the maps"));
    let switch = || pinned::<u32>(&d, common::TRACE_ARMED).get(&0, 0).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _in_rt = rt.enter();
    let spec = TraceSpec::default();
    let mut tracer = Tracer::start(&d.root, &d.ifname, &d.state, &spec).expect("trace starts");
    assert_eq!(switch(), 1, "armed");
    drop(d.open().expect("the agent loads the programs again"));
    assert_eq!(switch(), 0, "loading cleared the switch");
    let waited = rt.block_on(tokio::time::timeout(std::time::Duration::from_millis(1500), tracer.next()));
    assert!(waited.is_err(), "no packet crossed");
    assert_eq!(switch(), 1, "the tracer armed it again");
    drop(tracer);
    assert_eq!(switch(), 0, "disarmed when the tracer ends");
    assert_eq!(pinned::<TraceFilter>(&d, common::TRACE).get(&0, 0).unwrap(), TraceFilter::default());
}
