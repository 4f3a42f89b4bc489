//! Config loading for every command: the file, the private key and, in control mode, the
//! last applied control-plane view, made into the desired state. Also what may change under
//! a running agent and what needs a restart.

use std::path::Path;

use crate::config::{BackendChoice, Config, ConfigCache};
use crate::control::{self, ControlConfig, ControlFiles, ControlView};
use crate::desired::{desired_state, DesiredError};
use crate::keys;
use crate::model::{Desired, IfName, PrivateKey, PublicKey};

/// Everything loaded from one version of the config file.
pub struct Loaded {
    /// The config the desired state was built from (in control mode with the view's part).
    pub config: Config,
    pub desired: Desired,
    /// Control mode: the file as read, so a new view can be combined with it.
    pub file: Option<Config>,
}

/// Loads the config file. In control mode the control plane's part comes from the last
/// applied view saved in the state directory (none yet: no peers, and a policy that denies
/// everything until the first view arrives).
pub fn load(path: &Path) -> anyhow::Result<Loaded> {
    load_cached(path, &mut ConfigCache::default())
}

/// As [`load`], reusing what `cache` holds of earlier versions of the file (a daemon's
/// reloads: a 1% change of 10,000 peers parses 100 of them).
pub fn load_cached(path: &Path, cache: &mut ConfigCache) -> anyhow::Result<Loaded> {
    let file = cache.load(path)?;
    let key = private_key(&file)?;
    let view = match &file.control {
        None => None,
        Some(cc) => saved_view(&ControlFiles::new(&file.agent.state_dir), &key.public_key(), cc, &file.interface.name),
    };
    Ok(build(file, &key, view.as_ref().map(|a| &a.view))?)
}

/// The private key, created on first use. In control mode a key rotation a crash
/// interrupted after the control plane took the next key is finished first.
pub fn private_key(file: &Config) -> anyhow::Result<PrivateKey> {
    let path = &file.interface.private_key_file;
    if file.control.is_some() {
        let credential = ControlFiles::new(&file.agent.state_dir).credential().ok().flatten();
        keys::settle(path, credential.as_ref().map(|c| &c.public_key))?;
    }
    Ok(keys::load_or_generate(path)?)
}

/// The last applied view; one that cannot be read is set aside (the agent then starts
/// denying everything and the control plane sends a full snapshot). One the local guard
/// refuses today is not used either (but kept: nothing else is lost).
pub fn saved_view(
    files: &ControlFiles,
    own: &PublicKey,
    control: &ControlConfig,
    tunnel: &IfName,
) -> Option<control::Applied> {
    let mut saved = match files.view(own) {
        Ok(v) => v?,
        Err(e) => {
            tracing::error!(error = %e, "cannot use the saved control-plane view; starting without it");
            files.set_aside_view();
            return None;
        }
    };
    let pinned = files.credential().ok().flatten().filter(|c| c.public_key == *own).map(|c| c.overlay);
    match control::guard::admit_saved(&mut saved.view, control, &pinned.unwrap_or_default(), tunnel) {
        Ok(()) => Some(saved),
        Err(e) => {
            tracing::error!(error = %e, "the saved control-plane view breaks the local guard; starting without it");
            None
        }
    }
}

/// The config as the running agent sees it, for commands that inspect or remove its state
/// (`status`, `down`): never creates a key, and ignores a view it cannot read.
pub fn load_effective(path: &Path) -> anyhow::Result<Config> {
    let file = Config::load(path)?;
    let view = match (&file.control, keys::load(&file.interface.private_key_file)) {
        (Some(_), Ok(key)) => ControlFiles::new(&file.agent.state_dir).view(&key.public_key()).ok().flatten(),
        _ => None,
    };
    Ok(control::effective_config(file, view.as_ref().map(|a| &a.view)))
}

/// The desired state of `file` combined with `view` (control mode).
pub fn build(file: Config, key: &PrivateKey, view: Option<&ControlView>) -> Result<Loaded, DesiredError> {
    let kept = file.control.is_some().then(|| file.clone());
    let config = control::effective_config(file, view);
    let desired = desired_state(&config, key)?;
    Ok(Loaded { config, desired, file: kept })
}

/// Settings that cannot change under a running agent without a restart.
#[derive(Debug, PartialEq)]
pub struct RestartSettings<'a> {
    pub backend: BackendChoice,
    pub protocol: u8,
    pub state_dir: &'a Path,
    pub userspace_command: &'a str,
    pub pin_dir: Option<&'a Path>,
    /// Without the advertised endpoints and routes, which a reload may change.
    pub control: Option<ControlConfig>,
    /// Bound once at start: a reload that could fail to bind would leave the config half applied.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Opened by the events task when it starts.
    pub flow_log: Option<&'a Path>,
}

impl<'a> RestartSettings<'a> {
    pub fn of(c: &'a Config) -> Self {
        RestartSettings {
            backend: c.interface.backend,
            protocol: c.routing.protocol,
            state_dir: &c.agent.state_dir,
            userspace_command: &c.interface.userspace_command,
            pin_dir: c.policy.as_ref().map(|p| p.pin_dir.as_path()),
            control: c.control.as_ref().map(ControlConfig::restart_settings),
            metrics_listen: c.metrics.listen,
            flow_log: c.agent.flow_log.as_deref(),
        }
    }

    /// The config fields that differ, as the operator writes them.
    pub fn changed(&self, new: &RestartSettings) -> Vec<&'static str> {
        let mut out = Vec::new();
        let mut check = |differs: bool, field| {
            if differs {
                out.push(field);
            }
        };
        check(self.backend != new.backend, "interface.backend");
        check(self.protocol != new.protocol, "routing.protocol");
        check(self.state_dir != new.state_dir, "agent.state_dir");
        check(self.userspace_command != new.userspace_command, "interface.userspace_command");
        check(self.pin_dir != new.pin_dir, "policy.pin_dir");
        check(self.control != new.control, "[control]");
        check(self.metrics_listen != new.metrics_listen, "metrics.listen");
        check(self.flow_log != new.flow_log, "agent.flow_log");
        out
    }
}

/// A reload that changes settings only a restart may change.
#[derive(Debug, thiserror::Error)]
#[error("{} change only with a restart (the running agent keeps the previous config)", .changed.join(", "))]
pub struct NeedsRestart {
    pub changed: Vec<&'static str>,
}

/// Checks a reloaded config against the running one.
pub fn check_reload(running: &Config, new: &Config) -> Result<(), NeedsRestart> {
    let changed = RestartSettings::of(running).changed(&RestartSettings::of(new));
    if changed.is_empty() {
        Ok(())
    } else {
        Err(NeedsRestart { changed })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let text = format!("[interface]\nname = \"wf0\"\nprivate_key_file = \"/k\"\n{extra}");
        Config::parse(Path::new("t.toml"), &text).unwrap()
    }

    #[test]
    fn reload_names_exactly_the_restart_settings_that_changed() {
        let running = config("backend = \"userspace\"\n");
        assert!(check_reload(&running, &config("backend = \"userspace\"\nmtu = 1380\n")).is_ok());
        let e = check_reload(&running, &config("backend = \"kernel\"\n[routing]\nprotocol = 99\n")).unwrap_err();
        assert_eq!(e.changed, vec!["interface.backend", "routing.protocol"]);
        let msg = e.to_string();
        assert!(msg.starts_with("interface.backend, routing.protocol change only with a restart"), "{msg}");
        let e = check_reload(&running, &config("backend = \"userspace\"\n[agent]\nstate_dir = \"/elsewhere\"\n"))
            .unwrap_err();
        assert_eq!(e.changed, vec!["agent.state_dir"]);
        let e = check_reload(&running, &config("backend = \"userspace\"\n[metrics]\nlisten = \"\"\n")).unwrap_err();
        assert_eq!(e.changed, vec!["metrics.listen"]);
        let logged = "backend = \"userspace\"\n[agent]\nflow_log = \"/var/log/flows.jsonl\"\n";
        assert_eq!(check_reload(&running, &config(logged)).unwrap_err().changed, vec!["agent.flow_log"]);
    }

    #[test]
    fn a_reload_may_change_what_the_node_advertises_but_not_where_it_connects() {
        let control = |extra: &str| {
            config(&format!(
                "backend = \"userspace\"\n[control]\nendpoints = [\"192.0.2.10:7443\"]\ninsecure = true\n\
                 advertise_endpoints = [\"192.0.2.1:51820\"]\n{extra}"
            ))
        };
        let running = control("advertise_routes = [\"10.20.2.0/24\"]\n");
        assert!(check_reload(&running, &control("advertise_routes = [\"10.20.2.0/24\", \"10.30.0.0/24\"]\n")).is_ok());
        assert!(check_reload(&running, &control("")).is_ok());
        let e = check_reload(&running, &control("advertise_routes = [\"10.20.2.0/24\"]\nhostname = \"other\"\n"))
            .unwrap_err();
        assert_eq!(e.changed, vec!["[control]"]);
    }
}
