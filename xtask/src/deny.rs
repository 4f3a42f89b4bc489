//! The dependency policy (deny.toml): licenses, banned and duplicate crates, and where
//! crates may come from, checked with cargo-deny. Quick, so `test` runs it first.

use anyhow::{bail, Context, Result};

use crate::workspace::Workspace;

/// The cargo-deny release deny.toml is written for; scripts/install.sh installs it.
pub const VERSION: &str = "0.20.2";

/// Runs `cargo deny check bans licenses sources`. No advisories: that check fetches the
/// advisory database, and this one has to pass without a network once the crates are
/// downloaded (`--locked`: it judges Cargo.lock as committed).
pub fn check(ws: &Workspace) -> Result<()> {
    let version = match ws.cargo_cmd().args(["deny", "--version"]).output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        _ => bail!("cargo-deny is not installed: run scripts/install.sh (cargo install --locked cargo-deny@{VERSION})"),
    };
    if !version.ends_with(VERSION) {
        eprintln!("xtask deny: found {version:?}, deny.toml is checked with {VERSION} (scripts/install.sh)");
    }
    eprintln!("xtask deny: cargo deny check bans licenses sources");
    let status = ws
        .cargo_cmd()
        .args(["deny", "--locked", "check", "--hide-inclusion-graph", "bans", "licenses", "sources"])
        .status()
        .context("run cargo deny")?;
    if !status.success() {
        bail!("the dependency policy (deny.toml) is violated: see cargo deny's errors above");
    }
    Ok(())
}
