//! Taking over the pins another build of the agent left (an upgrade or a downgrade), in
//! place and without a moment unenforced:
//!
//! 1. [`plan`]: from the previous build's record, each pinned map is reused (same layout),
//!    migrated (another layout with a known migration, [`super::migrate`]) or started
//!    afresh (transient, or new in this build); any other layout is an error naming the
//!    map and both versions, and nothing is touched.
//! 2. [`stage`]: the pins of maps to migrate move aside (`<map>@v<version>`); the old
//!    programs keep using those maps meanwhile, since they hold them, not their names.
//! 3. The object is loaded with every map pinned by name: kept pins are reused (the live
//!    policy, counters, quotas), moved ones are created anew in this build's layout.
//! 4. [`migrate`] copies the moved maps' entries over; the programs on the device are
//!    replaced atomically (`attach::replace`); [`migrate`] runs again for the flows the old
//!    programs recorded in between.
//! 5. The build record is written, then [`finish`] unlinks the moved pins.
//!
//! A crash anywhere before 5 leaves the previous build recorded, so the next start runs
//! the takeover again: a moved pin already there is the source again (the map under the
//! name is then this build's), and entries already copied are kept. Should the previous
//! build start instead, it finds its own maps moved aside in its own layout: it moves them
//! back and puts its programs on the device again.

use std::path::{Path, PathBuf};

use wirefence_common::layout::{self, MapLayout};
use wirefence_common::{self as common};

use super::record::{BuildRecord, Layout};
use super::{map_err, migrate, pin_path as pin, EnforceError};
use crate::model::IfName;

/// What taking over an interface's pins involves.
#[derive(Debug, Default)]
pub struct Takeover {
    /// The build that made the pins, when it is another one: its programs get replaced.
    pub previous: Option<String>,
    /// Maps to migrate, with the layout version their pins hold.
    migrate: Vec<(&'static str, u32)>,
    /// Maps whose pins are dropped before loading, so this build starts them afresh.
    fresh: Vec<&'static str>,
    /// This build's maps another build's interrupted takeover moved aside: moved back.
    restore: Vec<&'static str>,
}

/// The pin a map to migrate is moved to.
fn staged_path(dir: &Path, name: &str, version: u32) -> PathBuf {
    dir.join(format!("{}@v{version}", common::pin_name(name)))
}

/// Decides what to do with the pins in `dir`, recorded by `previous` (`file` names the
/// record for errors). No pins: nothing to take over.
pub fn plan(
    dir: &Path,
    previous: Option<&BuildRecord>,
    file: &Path,
    ifname: &IfName,
) -> Result<Takeover, EnforceError> {
    let pinned =
        std::fs::read_dir(dir).map_err(|source| EnforceError::Pin { path: dir.to_owned(), source })?.next().is_some();
    if !pinned {
        return Ok(Takeover::default());
    }
    let Some(previous) = previous else {
        return Err(EnforceError::NotRecorded { ifname: ifname.clone(), file: file.to_owned() });
    };
    let mut t = Takeover::default();
    if previous.object == crate::bpf::object_id() {
        t.restore =
            layout::LAYOUTS.iter().filter(|l| staged_path(dir, l.name, l.version).exists()).map(|l| l.name).collect();
    }
    for l in &layout::LAYOUTS {
        let ours = Layout::from(l);
        match previous.maps.get(l.name) {
            None => t.fresh.push(l.name),
            Some(old) if *old == ours && t.restore.contains(&l.name) => {}
            Some(old) if *old == ours => check_pinned(dir, l)?,
            Some(_) if layout::transient(l.name) => t.fresh.push(l.name),
            Some(old) if old.version != ours.version && migrate::supported(l.name, old.version, ours.version) => {
                t.migrate.push((l.name, old.version))
            }
            Some(old) => {
                return Err(EnforceError::UnknownLayout {
                    ifname: ifname.clone(),
                    map: l.name,
                    build: previous.object.clone(),
                    found: describe(old),
                    ours: describe(&ours),
                })
            }
        }
    }
    if previous.object != crate::bpf::object_id() {
        t.previous = Some(previous.object.clone());
    } else if !t.restore.is_empty() {
        // That build's programs may be on the device already: ours go back on.
        t.previous = Some(format!("{} (an interrupted takeover by another build)", previous.object));
    }
    Ok(t)
}

fn describe(l: &Layout) -> String {
    format!("version {} (key {} bytes, value {} bytes)", l.version, l.key_size, l.value_size)
}

/// A pin to reuse must hold what the record says (the kernel knows its sizes): a map of
/// another shape under the name is never handed to this build's programs.
fn check_pinned(dir: &Path, l: &MapLayout) -> Result<(), EnforceError> {
    let path = pin(dir, l.name);
    if !path.exists() {
        return Ok(());
    }
    let info = aya::maps::MapInfo::from_pin(&path).map_err(map_err(l.name))?;
    if (info.key_size(), info.value_size()) != (l.key_size, l.value_size) {
        return Err(EnforceError::PinnedShape {
            path,
            found: (info.key_size(), info.value_size()),
            ours: (l.key_size, l.value_size),
        });
    }
    Ok(())
}

/// Moves the pins of maps to migrate aside and drops those of maps to start afresh.
pub fn stage(dir: &Path, t: &Takeover) -> Result<(), EnforceError> {
    let pin_err = |path: &Path| {
        let path = path.to_owned();
        move |source| EnforceError::Pin { path, source }
    };
    for (name, version) in &t.migrate {
        let (pinned, staged) = (pin(dir, name), staged_path(dir, name, *version));
        // Already moved by an interrupted takeover: the pin under the name (if any) is
        // this build's map, filled in part.
        if !staged.exists() && pinned.exists() {
            std::fs::rename(&pinned, &staged).map_err(pin_err(&pinned))?;
        }
    }
    for name in &t.restore {
        let version = layout::of(name).expect("a map of this build").version;
        let staged = staged_path(dir, name, version);
        std::fs::rename(&staged, pin(dir, name)).map_err(pin_err(&staged))?;
    }
    for name in &t.fresh {
        match std::fs::remove_file(pin(dir, name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(pin_err(&pin(dir, name))(e)),
            _ => {}
        }
    }
    Ok(())
}

/// Copies the entries of the moved maps into this build's; returns how many were written.
pub fn migrate(ebpf: &mut aya::Ebpf, dir: &Path, t: &Takeover) -> Result<usize, EnforceError> {
    let mut written = 0;
    for (name, version) in &t.migrate {
        let staged = staged_path(dir, name, *version);
        if !staged.exists() {
            continue; // nothing was pinned under the name: nothing to carry over
        }
        let map = ebpf.map_mut(name).ok_or(crate::bpf::ObjectMapError::Missing { name })?;
        written += migrate::run(name, &staged, *version, map)?;
    }
    Ok(written)
}

/// Unlinks every moved pin left in `dir` (once this build is recorded as the pins' maker).
pub fn finish(dir: &Path) -> Result<(), EnforceError> {
    let entries = std::fs::read_dir(dir).map_err(|source| EnforceError::Pin { path: dir.to_owned(), source })?;
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().contains('@') {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|source| EnforceError::Pin { path, source })?;
        }
    }
    Ok(())
}
