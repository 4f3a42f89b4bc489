//! `[agent] flow_log`: every flow event the policy programs report (new allowed flows and
//! denies) and every allowed flow's end (with `packets` and `bytes`, which only an end's
//! line has) as one JSON line in a local file, without a control plane. The file is the
//! agent's (mode 0600, a regular file of its own, never through a link); past [`ROTATE_AT`] it becomes `<path>.1`
//! (replacing the previous one) and a new file starts, so it holds at most twice that.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::flows::FlowEvent;

/// Size at which the file is rotated.
pub const ROTATE_AT: u64 = 64 << 20;

/// One line of the log.
#[derive(Serialize)]
struct Line<'a> {
    time_unix_ms: i64,
    direction: &'static str,
    verdict: &'static str,
    /// The deciding rule; empty for a deny.
    rule: &'a str,
    src: String,
    dst: String,
    proto: u8,
    sport: u16,
    dport: u16,
    /// A flow's end: what it carried, both directions (absent in other lines).
    #[serde(skip_serializing_if = "Option::is_none")]
    packets: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes: Option<u64>,
}

pub struct FlowLog {
    path: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
    size: u64,
    rotate_at: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("flow log {}: {source}", path.display())]
pub struct FlowLogError {
    path: PathBuf,
    source: std::io::Error,
}

/// Opens the log for appending: a regular file of this user's with no other name (never
/// through a symlink, a hard link, or into a FIFO or device), mode 0600 whatever it had.
fn open(path: &Path) -> Result<std::fs::File, FlowLogError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let err = |source| FlowLogError { path: path.to_owned(), source };
    let refused = |what: &str| err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, what.to_owned()));
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        // Non-blocking: opening a FIFO must not stall the events task.
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    if !meta.file_type().is_file() {
        return Err(refused("not a regular file"));
    }
    if meta.nlink() != 1 {
        return Err(refused("the file has other names (hard links)"));
    }
    // SAFETY: geteuid has no preconditions.
    if meta.uid() != unsafe { libc::geteuid() } {
        return Err(refused("owned by another user"));
    }
    file.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(file)
}

impl FlowLog {
    /// Opens (or creates) the log at `path`, appending.
    pub fn open(path: &Path) -> Result<FlowLog, FlowLogError> {
        FlowLog::open_rotating_at(path, ROTATE_AT)
    }

    fn open_rotating_at(path: &Path, rotate_at: u64) -> Result<FlowLog, FlowLogError> {
        let file = open(path)?;
        let size = file.metadata().map_err(|source| FlowLogError { path: path.to_owned(), source })?.len();
        Ok(FlowLog { path: path.to_owned(), out: std::io::BufWriter::new(file), size, rotate_at })
    }

    /// Appends `e` (buffered: [`FlowLog::flush`] writes it out).
    pub fn write(&mut self, e: &FlowEvent) -> Result<(), FlowLogError> {
        let err = |source| FlowLogError { path: self.path.clone(), source };
        if self.size >= self.rotate_at {
            self.out.flush().map_err(err)?;
            let old = PathBuf::from(format!("{}.1", self.path.display()));
            std::fs::rename(&self.path, &old).map_err(err)?;
            self.out = std::io::BufWriter::new(open(&self.path)?);
            self.size = 0;
        }
        let line = Line {
            time_unix_ms: e.at_ms,
            direction: if e.ingress { "in" } else { "out" },
            verdict: if e.allowed { "allow" } else { "deny" },
            rule: &e.rule,
            src: e.src.to_string(),
            dst: e.dst.to_string(),
            proto: e.proto,
            sport: e.sport,
            dport: e.dport,
            packets: e.ended().then_some(e.packets),
            bytes: e.ended().then_some(e.bytes),
        };
        let mut bytes = serde_json::to_vec(&line).map_err(|e| err(e.into()))?;
        bytes.push(b'\n');
        self.out.write_all(&bytes).map_err(err)?;
        self.size += bytes.len() as u64;
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), FlowLogError> {
        self.out.flush().map_err(|source| FlowLogError { path: self.path.clone(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

    fn event(dport: u16) -> FlowEvent {
        FlowEvent {
            at_ms: 1_700_000_000_000,
            allowed: dport == 443,
            rule: if dport == 443 { "web".into() } else { String::new() },
            ingress: false,
            src: "10.77.0.1".parse().unwrap(),
            dst: "fd77::2".parse().unwrap(),
            proto: 6,
            sport: 40000,
            dport,
            packets: 0,
            bytes: 0,
        }
    }

    #[test]
    fn writes_json_lines_private_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flows.jsonl");
        // Two lines are some 290 bytes.
        let mut log = FlowLog::open_rotating_at(&path, 250).unwrap();
        log.write(&event(443)).unwrap();
        log.write(&event(22)).unwrap();
        log.flush().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["verdict"], "allow");
        assert_eq!(lines[0]["rule"], "web");
        assert_eq!(lines[0]["dst"], "fd77::2");
        assert_eq!(lines[1]["verdict"], "deny");
        assert_eq!(lines[1]["dport"], 22);
        assert!(lines[0].get("packets").is_none(), "only an end's line has counts");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);

        // Over the size: the next line starts a new file, the old one is `.1`.
        log.write(&event(80)).unwrap();
        log.flush().unwrap();
        let rotated = std::fs::read_to_string(dir.path().join("flows.jsonl.1")).unwrap();
        assert_eq!(rotated, text);
        assert!(std::fs::read_to_string(&path).unwrap().contains("\"dport\":80}"));
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn a_flows_end_has_its_counts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flows.jsonl");
        let mut log = FlowLog::open(&path).unwrap();
        log.write(&FlowEvent { packets: 12, bytes: 3400, ..event(443) }).unwrap();
        log.flush().unwrap();
        let line: serde_json::Value = serde_json::from_str(std::fs::read_to_string(&path).unwrap().trim()).unwrap();
        assert_eq!((line["packets"].as_u64(), line["bytes"].as_u64()), (Some(12), Some(3400)));
    }

    #[test]
    fn an_existing_file_becomes_private_and_others_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flows.jsonl");
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        FlowLog::open(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);

        // A second name for the file (which another user could read it by), and a FIFO
        // (which would block the writer).
        let linked = dir.path().join("linked.jsonl");
        std::fs::hard_link(&path, &linked).unwrap();
        assert!(FlowLog::open(&linked).err().unwrap().to_string().contains("hard links"));
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Refused at once: without a reader, a non-blocking open for writing fails (ENXIO);
        // with one, the file type is checked.
        let e = FlowLog::open(&fifo).err().expect("a FIFO is refused").to_string();
        assert!(e.contains("fifo"), "{e}");
        let reader = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&fifo).unwrap();
        let e = FlowLog::open(&fifo).err().expect("a FIFO with a reader is refused").to_string();
        assert!(e.contains("not a regular file"), "{e}");
        drop(reader);
    }

    #[test]
    fn never_writes_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("shadow");
        std::fs::write(&target, "").unwrap();
        let path = dir.path().join("flows.jsonl");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let e = FlowLog::open(&path).err().expect("a symlink is refused");
        assert!(e.to_string().contains("flows.jsonl"), "{e}");
    }
}
