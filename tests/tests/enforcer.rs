//! The enforcer's pins across agent builds: a restarted agent of the same build adopts them;
//! pins another build left are refused with an error naming the way out (`down`), never
//! adopted (that build's programs read maps by its own names and layouts). Needs root.

use std::path::{Path, PathBuf};

use wirefence_agent::enforce::{self, EnforceError, Enforcer};
use wirefence_agent::model::IfName;

/// A bpffs root and state directory of this test's own, removed (and unmounted) on drop.
struct Dirs {
    root: PathBuf,
    state: PathBuf,
    ifname: IfName,
}

impl Dirs {
    fn new() -> Dirs {
        wirefence_tests::require_root_for("pinning eBPF maps needs root");
        let tag = format!("{}-{}", std::process::id(), std::time::UNIX_EPOCH.elapsed().unwrap().as_nanos() % 1_000_000);
        let root = PathBuf::from(format!("/run/wirefence-enf-{tag}"));
        let state = std::env::temp_dir().join(format!("wirefence-enf-{tag}"));
        std::fs::create_dir_all(&state).unwrap();
        let ifname = format!("wfe{:x}", std::process::id() % 0xffff).parse().unwrap();
        Dirs { root, state, ifname }
    }

    fn open(&self) -> Result<Enforcer, EnforceError> {
        Enforcer::open(&self.root, &self.ifname, 0, &self.state)
    }

    fn build_file(&self) -> PathBuf {
        self.state.join(format!("{}.ebpf-build", self.ifname))
    }
}

impl Drop for Dirs {
    fn drop(&mut self) {
        if let Err(e) = enforce::remove(&self.root, &self.ifname) {
            eprintln!("cleanup: removing pins under {}: {e}", self.root.display());
        }
        unmount(&self.root);
        let _ = std::fs::remove_dir(&self.root);
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

fn unmount(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid C string; MNT_DETACH so open map fds do not keep it busy.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

#[test]
fn pins_of_another_build_are_refused_not_adopted() {
    let d = Dirs::new();
    drop(d.open().expect("first open pins the maps"));
    drop(d.open().expect("the same build adopts its pins"));

    std::fs::write(d.build_file(), "0123456789abcdef").unwrap();
    match d.open() {
        Err(e @ EnforceError::OtherBuild { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("0123456789abcdef") && msg.contains("wirefence-agent down"), "{msg}");
        }
        Err(e) => panic!("another build's pins: {e}"),
        Ok(_) => panic!("another build's pins were adopted"),
    }
    // Pins from before builds were recorded: refused too.
    std::fs::remove_file(d.build_file()).unwrap();
    match d.open() {
        Err(EnforceError::OtherBuild { found, .. }) => assert_eq!(found, "not recorded"),
        Err(e) => panic!("unrecorded pins: {e}"),
        Ok(_) => panic!("unrecorded pins were adopted"),
    }
    // `down` removes the pins: the next open starts afresh and records this build.
    enforce::remove(&d.root, &d.ifname).unwrap();
    drop(d.open().expect("open after down"));
    assert_eq!(std::fs::read_to_string(d.build_file()).unwrap(), wirefence_agent::bpf::object_id());
}

fn mode(p: &Path) -> u32 {
    std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(p).unwrap()) & 0o7777
}

#[test]
fn a_bpffs_the_agent_mounts_and_its_pin_directories_are_0700() {
    let d = Dirs::new();
    drop(d.open().expect("open pins the maps"));
    // The kernel adds the sticky bit to a bpffs root whatever the mode option.
    assert_eq!(mode(&d.root) & 0o777, 0o700, "bpffs root {}", d.root.display());
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
