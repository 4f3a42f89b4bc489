//! The build record of an interface's pins (`state_dir/<if>.ebpf-build`): which object
//! made them (a digest of its bytes) and each pinned map's layout
//! ([`wirefence_common::layout`]). A build taking the pins over reads it to know what it
//! can reuse and what it must migrate, and writes its own last, once the takeover is done.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use wirefence_common as common;
use wirefence_common::layout::MapLayout;

use super::EnforceError;
use crate::model::IfName;

/// One map's layout as recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Layout {
    pub version: u32,
    pub key_size: u32,
    pub value_size: u32,
}

impl From<&MapLayout> for Layout {
    fn from(l: &MapLayout) -> Layout {
        Layout { version: l.version, key_size: l.key_size, value_size: l.value_size }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BuildRecord {
    /// [`crate::bpf::object_id`] of the build that made the pins.
    pub object: String,
    /// Map name -> layout.
    pub maps: BTreeMap<String, Layout>,
}

impl BuildRecord {
    /// This build's record.
    pub fn ours() -> BuildRecord {
        BuildRecord {
            object: crate::bpf::object_id(),
            maps: common::layout::LAYOUTS.iter().map(|l| (l.name.to_owned(), l.into())).collect(),
        }
    }

    /// A record from before layouts were recorded (the object's digest alone): every map
    /// at version 1, the layouts of that time; conntrack entries then may be keyed by
    /// their first packet rather than canonically (`CONNTRACK_V1`).
    fn legacy(object: &str) -> BuildRecord {
        let maps = common::layout::LAYOUTS
            .iter()
            .map(|l| {
                let layout = if l.name == common::CONNTRACK {
                    Layout { version: common::layout::CONNTRACK_V1, key_size: 40, value_size: 24 }
                } else {
                    Layout { version: 1, ..l.into() }
                };
                (l.name.to_owned(), layout)
            })
            .collect();
        BuildRecord { object: object.to_owned(), maps }
    }
}

/// Where an interface's build record is kept.
pub(crate) fn build_file(state_dir: &Path, ifname: &IfName) -> PathBuf {
    state_dir.join(format!("{ifname}.ebpf-build"))
}

/// The record in `file`; `None` if there is none.
pub fn read(file: &Path) -> Result<Option<BuildRecord>, EnforceError> {
    let text = match std::fs::read_to_string(file) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(EnforceError::State { path: file.to_owned(), source }),
    };
    let text = text.trim();
    if !text.starts_with('{') {
        return Ok(Some(BuildRecord::legacy(text)));
    }
    serde_json::from_str(text).map(Some).map_err(|e| EnforceError::State {
        path: file.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not a build record: {e}")),
    })
}

/// Writes `record` to `file` (atomically: a crash leaves the old one or the new one).
pub fn write(file: &Path, record: &BuildRecord) -> Result<(), EnforceError> {
    let json = serde_json::to_vec_pretty(record).expect("a build record serializes");
    crate::durable::write_atomic(file, &json, 0o600)
        .map_err(|source| EnforceError::State { path: file.to_owned(), source })
}

/// The object recorded in `file` ("not recorded" when there is no record).
pub(crate) fn recorded_build(file: &Path) -> Result<String, EnforceError> {
    Ok(read(file)?.map_or_else(|| "not recorded".to_owned(), |r| r.object))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_a_bare_digest_reads_as_the_legacy_layouts() {
        let dir = std::env::temp_dir().join(format!("wf-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("wg0.ebpf-build");
        assert_eq!(read(&file).unwrap(), None);
        write(&file, &BuildRecord::ours()).unwrap();
        assert_eq!(read(&file).unwrap(), Some(BuildRecord::ours()));
        std::fs::write(&file, "0123456789abcdef\n").unwrap();
        let legacy = read(&file).unwrap().unwrap();
        assert_eq!(legacy.object, "0123456789abcdef");
        assert_eq!(legacy.maps[common::CONNTRACK].version, common::layout::CONNTRACK_V1);
        assert_eq!(legacy.maps[common::POLICY], Layout { version: 1, key_size: 20, value_size: 8 });
        std::fs::write(&file, "{\"object\": 3}").unwrap();
        assert!(read(&file).unwrap_err().to_string().contains("not a build record"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
