//! The agent refuses to start on files a local user could tamper with: a state directory
//! or key file owned by another user, or open to group/other. Runs `wirefence-agent run
//! --once` in fresh network and mount namespaces (`unshare -n -m`), so a start that is not
//! refused converges harmlessly there (and the test then fails): no link, bpffs mount or
//! pin outlives it. Needs root.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Case {
    dir: tempfile::TempDir,
}

impl Case {
    fn new(control: bool) -> Case {
        assert!(nix::unistd::geteuid().is_root(), "these tests chown files and need root");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        wirefence_agent::keys::generate(&d.join("private.key")).unwrap();
        std::fs::create_dir(d.join("state")).unwrap();
        std::fs::write(d.join("enroll.key"), "k").unwrap();
        chmod(&d.join("enroll.key"), 0o600);
        // Control mode: the control plane sends the addresses.
        let addresses = if control { "" } else { "addresses = [\"10.99.0.1/24\"]\n" };
        let control = match control {
            true => format!(
                "[control]\nendpoints = [\"127.0.0.1:9\"]\ninsecure = true\nhostname = \"perm\"\nenrollment_key_file = \"{}\"\n",
                d.join("enroll.key").display()
            ),
            false => String::new(),
        };
        let ifname = format!("wfp{:x}", std::process::id() % 0xffff);
        let config = format!(
            "[interface]\nname = \"{ifname}\"\nbackend = \"userspace\"\nprivate_key_file = \"{}\"\nlisten_port = 51820\n\
             {addresses}\n[agent]\nstate_dir = \"{}\"\n\n{control}",
            d.join("private.key").display(),
            d.join("state").display(),
        );
        std::fs::write(d.join("agent.toml"), config).unwrap();
        Case { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts the agent once; its stderr when it refused, a panic when it ran.
    fn refused(&self) -> String {
        let out = Command::new("unshare")
            .args(["-n", "-m"])
            .arg(env!("CARGO_BIN_EXE_wirefence-agent"))
            .args(["run", "--once", "--config"])
            .arg(self.path("agent.toml"))
            .output()
            .expect("run unshare");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "the agent started: {stderr}");
        stderr
    }
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(p: &Path, uid: u32) {
    std::os::unix::fs::chown(p, Some(uid), None).unwrap();
}

fn assert_names(stderr: &str, path: &Path, what: &str) {
    assert!(stderr.contains(&path.display().to_string()) && stderr.contains(what), "{stderr}");
}

#[test]
fn a_state_directory_of_another_user_or_open_to_writers_is_refused() {
    let c = Case::new(false);
    let state = c.path("state");
    chown(&state, 65534);
    assert_names(&c.refused(), &state, "owned by uid 65534");
    chown(&state, 0);
    chmod(&state, 0o775);
    assert_names(&c.refused(), &state, "mode 0775");
}

#[test]
fn a_private_key_of_another_user_or_readable_by_others_is_refused() {
    let c = Case::new(false);
    let key = c.path("private.key");
    chmod(&key, 0o644);
    assert_names(&c.refused(), &key, "mode 0644");
    chmod(&key, 0o600);
    chown(&key, 65534);
    assert_names(&c.refused(), &key, "owned by uid 65534");
}

#[test]
fn control_credentials_and_enrollment_keys_open_to_others_are_refused() {
    let c = Case::new(true);
    let enroll = c.path("enroll.key");
    chmod(&enroll, 0o644);
    assert_names(&c.refused(), &enroll, "mode 0644");
    chmod(&enroll, 0o600);
    let control = c.path("state/control");
    std::fs::create_dir(&control).unwrap();
    chmod(&control, 0o700);
    std::fs::write(control.join("credential.json"), "{}").unwrap();
    chmod(&control.join("credential.json"), 0o640);
    assert_names(&c.refused(), &control.join("credential.json"), "mode 0640");
}
