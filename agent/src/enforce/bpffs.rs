//! The bpffs the pins live in must be the host's. Pins outlive the agent only as long as
//! their file system: a bpffs mounted inside a private mount namespace (systemd's
//! `PrivateMounts`/`ProtectSystem` without the host's `/sys/fs/bpf` bound in, `ip netns
//! exec`, which remounts `/sys`) vanishes with that namespace, and the next agent would load
//! a second copy of the programs while the orphaned ones keep enforcing an old policy. So
//! the agent never mounts a bpffs itself, and refuses one that is not the host's.
//!
//! "The host's" is decided by the superblock: the pin root's file system, as this process
//! sees it, must be the very one PID 1 (the host's init, or a container's) sees at the same
//! path, i.e. `stat` through `/proc/1/root` gives the same device. A bpffs superblock has
//! an anonymous device number of its own, unique in the kernel, so a bpffs mounted in our
//! namespace never matches, whatever the paths; one bound in from the host always does.
//! Reading `/proc/1/root` needs ptrace access to PID 1 (root has it; an agent run with
//! only its capabilities may not, and under the unit's `ProtectProc=invisible` PID 1 is not
//! even listed): then the mount's propagation decides instead, from
//! `/proc/self/mountinfo`: a mount peered with (`shared:`) or receiving from (`master:`)
//! another namespace's is the host's bound in; a private one is ours alone.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::EnforceError;

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

pub(super) fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Makes sure `root` lies on the host's bpffs ([module docs](self)) and exists: created
/// 0700 if missing; an existing one must be the agent's and either closed to other writers
/// or sticky (a bpffs root is 1777 unless mounted with a mode), so nobody else can unlink or
/// replace the pin directories.
pub fn check_host_bpffs(root: &Path) -> Result<(), EnforceError> {
    let mut existing = root.to_path_buf();
    while !existing.exists() {
        if !existing.pop() {
            break;
        }
    }
    if !is_bpffs(&existing) {
        return Err(EnforceError::NoBpffs { path: root.to_owned() });
    }
    if let Err(why) = host_sees_the_same(&existing) {
        return Err(EnforceError::NotHostBpffs { path: root.to_owned(), why });
    }
    pin_root(root)
}

/// Whether PID 1 sees the same file system at `path` ([module docs](self)); `Err` says why
/// not.
fn host_sees_the_same(path: &Path) -> Result<(), String> {
    let ours = std::fs::metadata(path).map_err(|e| format!("stat {}: {e}", path.display()))?.dev();
    let seen_by_init = Path::new("/proc/1/root").join(path.strip_prefix("/").unwrap_or(path));
    match std::fs::metadata(&seen_by_init) {
        Ok(m) if m.dev() == ours => Ok(()),
        Ok(_) => Err(format!(
            "PID 1 sees another file system at {} (this one is mounted in the agent's own mount namespace)",
            path.display()
        )),
        // PID 1 is there to look at, but has nothing at this path.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && std::fs::metadata("/proc/1/root").is_ok() => {
            Err(format!("{} does not exist in PID 1's mount namespace", path.display()))
        }
        // No ptrace access to PID 1, or PID 1 hidden (systemd's ProtectProc=invisible).
        Err(e) if matches!(e.kind(), std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::NotFound) => {
            let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
                .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
            match mount_of(&mountinfo, path) {
                Some(m) if m.propagated => Ok(()),
                Some(m) => Err(format!(
                    "its mount at {} is private to the agent's mount namespace (no shared: or master: \
                     propagation in /proc/self/mountinfo)",
                    m.point.display()
                )),
                None => Err(format!("no mount of {} in /proc/self/mountinfo", path.display())),
            }
        }
        Err(e) => Err(format!("cannot compare with PID 1's view ({}): {e}", seen_by_init.display())),
    }
}

/// The mount holding a path, from a mountinfo line.
#[derive(Debug, PartialEq, Eq)]
struct Mount {
    point: PathBuf,
    /// It propagates to or from another mount namespace (`shared:N` or `master:N`).
    propagated: bool,
}

/// The mount `path` (absolute, symlinks resolved) lies on: the last-listed mount whose
/// mount point is the longest prefix of it (a later mount over the same point hides the
/// earlier ones). Mount points are octal-escaped in mountinfo (`\040` for a space).
fn mount_of(mountinfo: &str, path: &Path) -> Option<Mount> {
    let mut best: Option<Mount> = None;
    for line in mountinfo.lines() {
        // id parent major:minor root mount-point options [optional fields...] - fstype source super-options
        let mut fields = line.split(' ');
        let Some(point) = fields.nth(4) else { continue };
        let point = PathBuf::from(unescape(point));
        let optional: Vec<&str> = fields.skip(1).take_while(|f| *f != "-").collect();
        if !path.starts_with(&point) {
            continue;
        }
        if best.as_ref().is_some_and(|b| b.point.components().count() > point.components().count()) {
            continue;
        }
        let propagated = optional.iter().any(|f| f.starts_with("shared:") || f.starts_with("master:"));
        best = Some(Mount { point, propagated });
    }
    best
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn pin_root(root: &Path) -> Result<(), EnforceError> {
    if root.exists() {
        return Ok(crate::perms::check(root, crate::perms::Private::StickyDir)?);
    }
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .map_err(|e| EnforceError::Bpffs { path: root.to_owned(), reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
30 22 0:26 / /sys rw,nosuid shared:7 - sysfs sysfs rw
41 30 0:35 / /sys/fs/bpf rw,nosuid shared:15 - bpf bpf rw,mode=700
50 22 0:40 / /run rw,nosuid shared:20 - tmpfs tmpfs rw
60 50 0:45 / /run/wf\\040pins rw,relatime - bpf bpf rw
61 50 0:46 / /run/slave rw,relatime master:15 - bpf bpf rw
62 41 0:47 / /sys/fs/bpf rw,relatime - bpf bpf rw
";

    fn mount(path: &str) -> Option<(String, bool)> {
        mount_of(MOUNTINFO, Path::new(path)).map(|m| (m.point.display().to_string(), m.propagated))
    }

    #[test]
    fn the_deepest_latest_mount_decides_and_says_whether_it_propagates() {
        assert_eq!(mount("/run/slave/wirefence"), Some(("/run/slave".into(), true)));
        assert_eq!(mount("/run/wf pins/wg0"), Some(("/run/wf pins".into(), false)), "octal escapes");
        assert_eq!(mount("/run/other"), Some(("/run".into(), true)));
        // A private bpffs mounted over the host's /sys/fs/bpf hides it.
        assert_eq!(mount("/sys/fs/bpf/wirefence"), Some(("/sys/fs/bpf".into(), false)));
        // A prefix of the name is not a parent directory.
        assert_eq!(mount("/run/slavery"), Some(("/run".into(), true)));
    }
}
