//! The Vagrant lab (`vagrant/`): what CI can check of it without a hypervisor.

use anyhow::{bail, Context, Result};
use std::process::Command;

use crate::workspace::Workspace;

/// `vagrant validate --ignore-provider` on vagrant/Vagrantfile, with the packages of
/// `<target>/debian` as its shared folder (which must exist). Provider blocks are left
/// out: checking them needs the provider itself (libvirt connects to its daemon).
pub fn validate(ws: &Workspace) -> Result<()> {
    let debs = ws.target_dir.join("debian");
    let out = Command::new("vagrant")
        .args(["validate", "--ignore-provider"])
        .current_dir(ws.root.join("vagrant"))
        .env("WIREFENCE_DEBS", &debs)
        .env("VAGRANT_CHECKPOINT_DISABLE", "1")
        .output()
        .context("cannot run vagrant (Debian package vagrant; scripts/install.sh installs it)")?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() || !text.contains("Vagrantfile validated successfully") {
        bail!("vagrant validate of vagrant/Vagrantfile failed:\n{text}");
    }
    Ok(())
}
