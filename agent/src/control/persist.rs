//! Files the control-mode agent keeps in its state directory (all written atomically, 0600):
//! the node credential, the last applied view (so a restart with the control plane down
//! comes up in the last known good state) and a status record for `wirefence-agent status`.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use prost::Message;
use serde::{Deserialize, Serialize};
use wirefence_proto::v1;

use super::tracker::Applied;
use super::view::{ControlView, UpdateError};
use crate::model::PublicKey;

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a saved control-plane view: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// The node's identity at the control plane. The credential is a bearer secret: no `Debug`
/// output shows it.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Credential {
    pub node_id: String,
    pub credential: String,
    /// The public key it was issued for: a new private key needs a new registration.
    pub public_key: PublicKey,
    /// The overlay ranges the control plane announced when this node enrolled, pinned:
    /// the guard refuses tunnel addresses outside them (unless `control.overlay` is set).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overlay: Vec<ipnet::IpNet>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential {{ node_id: {:?}, credential: <redacted> }}", self.node_id)
    }
}

/// What `status` shows about the control-plane connection.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ControlStatus {
    pub node_id: Option<String>,
    pub connected_to: Option<String>,
    pub applied_version: u64,
    pub last_error: Option<String>,
    /// Unix seconds the control plane's TLS certificate expires, by the address family the
    /// connection used.
    pub cert_expiry_ipv4: Option<i64>,
    pub cert_expiry_ipv6: Option<i64>,
    /// Advertised routes the control plane refused, with why, as it last said (in a
    /// registration reply, then in each applied view).
    #[serde(default)]
    pub refused_routes: Vec<String>,
    /// The control plane refused this node for what only an operator can change (or the
    /// local setup lacks something): why. The agent retries only slowly meanwhile.
    #[serde(default)]
    pub action_needed: Option<String>,
    /// The public key the control plane last took in a registration (after a key rotation:
    /// the new key is the node's for every peer).
    #[serde(default)]
    pub registered_key: Option<PublicKey>,
}

#[derive(Clone, Debug)]
pub struct ControlFiles {
    dir: PathBuf,
}

impl ControlFiles {
    pub fn new(state_dir: &Path) -> ControlFiles {
        ControlFiles { dir: state_dir.join("control") }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> Result<(), PersistError> {
        let path = self.path(name);
        let io = |source| PersistError::Io { path: path.clone(), source };
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir).map_err(io)?;
        crate::durable::write_atomic(&path, bytes, 0o600).map_err(io)
    }

    fn read(&self, name: &str) -> Result<Option<Vec<u8>>, PersistError> {
        let path = self.path(name);
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(PersistError::Io { path, source }),
        }
    }

    /// The directory and what the agent trusts from it (the credential, a bearer secret,
    /// and the view it would enforce) must be the agent's alone.
    pub fn check_private(&self) -> Result<(), crate::perms::UnsafePath> {
        use crate::perms::{check_if_exists, Private};
        check_if_exists(&self.dir, Private::Dir)?;
        check_if_exists(&self.path("credential.json"), Private::Secret)?;
        check_if_exists(&self.path("view.pb"), Private::Secret)
    }

    pub fn credential(&self) -> Result<Option<Credential>, PersistError> {
        let Some(bytes) = self.read("credential.json")? else { return Ok(None) };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| PersistError::Corrupt { path: self.path("credential.json"), reason: e.to_string() })
    }

    /// Where the credential is kept (removing it is how an admin makes the node enroll anew).
    pub fn credential_path(&self) -> PathBuf {
        self.path("credential.json")
    }

    pub fn set_credential(&self, c: &Credential) -> Result<(), PersistError> {
        self.write("credential.json", &serde_json::to_vec(c).expect("serializable"))
    }

    /// The last applied view, its version and incarnation, validated again as it is read back.
    pub fn view(&self, own: &PublicKey) -> Result<Option<Applied>, PersistError> {
        let Some(bytes) = self.read("view.pb")? else { return Ok(None) };
        let corrupt = |reason: String| PersistError::Corrupt { path: self.path("view.pb"), reason };
        let u = v1::Update::decode(bytes.as_slice()).map_err(|e| corrupt(e.to_string()))?;
        let Some(v1::update::Body::Snapshot(s)) = &u.body else {
            return Err(corrupt("not a snapshot".into()));
        };
        let view = ControlView::from_snapshot(s, own).map_err(|e: UpdateError| corrupt(e.to_string()))?;
        Ok(Some(Applied { version: u.version, incarnation: u.incarnation, view }))
    }

    /// Renames an unreadable view file to `view.pb.bad` (kept for inspection).
    pub fn set_aside_view(&self) {
        let _ = crate::durable::rename(&self.path("view.pb"), &self.path("view.pb.bad"));
    }

    pub fn set_view(&self, a: &Applied) -> Result<(), PersistError> {
        let u = v1::Update {
            version: a.version,
            body: Some(v1::update::Body::Snapshot(a.view.to_snapshot())),
            incarnation: a.incarnation.clone(),
            continued: false,
        };
        self.write("view.pb", &u.encode_to_vec())
    }

    pub fn status(&self) -> Result<Option<ControlStatus>, PersistError> {
        let Some(bytes) = self.read("status.json")? else { return Ok(None) };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| PersistError::Corrupt { path: self.path("status.json"), reason: e.to_string() })
    }

    pub fn set_status(&self, s: &ControlStatus) -> Result<(), PersistError> {
        self.write("status.json", &serde_json::to_vec_pretty(s).expect("serializable"))
    }

    /// Forgets the node (after `down`): credential, view and status.
    pub fn remove_all(&self) -> Result<(), PersistError> {
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(PersistError::Io { path: self.dir.clone(), source: e })
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn files_are_private_and_roundtrip() {
        let dir = std::env::temp_dir().join(format!("wf-persist-{}", std::process::id()));
        let files = ControlFiles::new(&dir);
        let own = crate::model::PrivateKey::generate().public_key();
        assert!(files.view(&own).unwrap().is_none());
        let view = ControlView { addresses: ["10.77.0.1/32".parse().unwrap()].into(), ..Default::default() };
        let applied = Applied { version: 7, incarnation: "x".into(), view };
        files.set_view(&applied).unwrap();
        assert_eq!(files.view(&own).unwrap(), Some(applied));
        let c = Credential {
            node_id: "n1".into(),
            credential: "n1.secret".into(),
            public_key: own,
            overlay: vec!["10.77.0.0/24".parse().unwrap()],
        };
        files.set_credential(&c).unwrap();
        assert_eq!(files.credential().unwrap(), Some(c.clone()));
        assert!(!format!("{c:?}").contains("secret"));
        for f in ["view.pb", "credential.json"] {
            let mode = std::fs::metadata(dir.join("control").join(f)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        std::fs::write(dir.join("control/view.pb"), b"\xff\xffnot protobuf").unwrap();
        assert!(files.view(&own).unwrap_err().to_string().contains("not a saved control-plane view"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
