//! IP forwarding: the sysctls under `/proc/sys/net` (per network namespace, writable with
//! CAP_NET_ADMIN), and the record of the values found before the agent first changed them,
//! `<state_dir>/forwarding.<family>.prev` (one file per family, so the two families are
//! written independently). A restart keeps forwarding on and the record as it is; `down`
//! writes the recorded values back and removes the records.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::GatewayError;
use crate::model::Family;

/// The sysctl the agent writes for `family` (the systemd unit's `ReadWritePaths=` names
/// exactly these two).
pub fn sysctl_path(family: Family) -> &'static Path {
    Path::new(match family {
        Family::V4 => "/proc/sys/net/ipv4/ip_forward",
        Family::V6 => "/proc/sys/net/ipv6/conf/all/forwarding",
    })
}

fn record_path(state_dir: &Path, family: Family) -> PathBuf {
    state_dir.join(format!("forwarding.{}.prev", family.name()))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> GatewayError + '_ {
    move |source| GatewayError::Io { path: path.to_owned(), source }
}

fn parse(path: &Path, text: &str) -> Result<bool, GatewayError> {
    match text.trim() {
        "0" => Ok(false),
        "1" => Ok(true),
        other => Err(GatewayError::BadValue { path: path.to_owned(), found: other.to_owned() }),
    }
}

/// The current value; `None` where the family is off in the kernel (no such sysctl).
pub fn read(family: Family) -> Result<Option<bool>, GatewayError> {
    let path = sysctl_path(family);
    match std::fs::read_to_string(path) {
        Ok(text) => parse(path, &text).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

/// The value recorded before the agent first changed it, if it did.
pub fn recorded(state_dir: &Path, family: Family) -> Result<Option<bool>, GatewayError> {
    let path = record_path(state_dir, family);
    match std::fs::read_to_string(&path) {
        Ok(text) => parse(&path, &text).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(&path)(e)),
    }
}

fn write_sysctl(family: Family, on: bool) -> Result<(), GatewayError> {
    let path = sysctl_path(family);
    let mut f = std::fs::OpenOptions::new().write(true).open(path).map_err(io(path))?;
    f.write_all(if on { b"1\n" } else { b"0\n" }).map_err(io(path))
}

/// Turns forwarding on, first recording (durably) the value found, unless a record exists:
/// the first value found is the one to give back.
pub fn enable(state_dir: &Path, family: Family) -> Result<(), GatewayError> {
    if recorded(state_dir, family)?.is_none() {
        let found = read(family)?.unwrap_or(false);
        let path = record_path(state_dir, family);
        crate::durable::write_atomic(&path, if found { b"1\n" } else { b"0\n" }, 0o600).map_err(io(&path))?;
    }
    write_sysctl(family, true)
}

/// Writes the recorded value back and removes the record (nothing without a record).
pub fn restore(state_dir: &Path, family: Family) -> Result<(), GatewayError> {
    let Some(value) = recorded(state_dir, family)? else { return Ok(()) };
    write_sysctl(family, value)?;
    let path = record_path(state_dir, family);
    std::fs::remove_file(&path).map_err(io(&path))?;
    crate::durable::sync_dir(state_dir).map_err(io(state_dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_per_family_and_strict() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(recorded(dir.path(), Family::V4).unwrap(), None);
        crate::durable::write_atomic(&record_path(dir.path(), Family::V6), b"1\n", 0o600).unwrap();
        assert_eq!(recorded(dir.path(), Family::V6).unwrap(), Some(true));
        assert_eq!(recorded(dir.path(), Family::V4).unwrap(), None);
        crate::durable::write_atomic(&record_path(dir.path(), Family::V4), b"2\n", 0o600).unwrap();
        let e = recorded(dir.path(), Family::V4).unwrap_err().to_string();
        assert!(e.contains("forwarding.ipv4.prev") && e.contains("not 0 or 1"), "{e}");
    }
}
