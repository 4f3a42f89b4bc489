//! Every subcommand that reads a config takes `/etc/wirefence/agent.toml` when `--config`
//! is not given (what the packaged unit runs), and says so in its help.

use std::process::Command;

const DEFAULT: &str = "/etc/wirefence/agent.toml";

fn agent(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_wirefence-agent")).args(args).output().expect("run wirefence-agent")
}

#[test]
fn subcommands_default_to_the_packaged_config_path() {
    for sub in [&["run"][..], &["down"], &["status"], &["check"], &["policy", "check"]] {
        let mut args = sub.to_vec();
        args.push("--help");
        let help = String::from_utf8_lossy(&agent(&args).stdout).into_owned();
        assert!(help.contains(&format!("[default: {DEFAULT}]")), "{sub:?} --help:\n{help}");
    }
    // Without --config, `check` reads the default path (absent on a build machine: the
    // error names it).
    assert!(
        !std::path::Path::new(DEFAULT).exists(),
        "{DEFAULT} exists on this machine: this test needs it absent (a build or CI host)"
    );
    let out = agent(&["check"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(DEFAULT), "the error names the default path: {stderr}");
    assert_eq!(stderr.matches("No such file or directory").count(), 1, "the reason is said once: {stderr}");
}

#[test]
fn check_before_the_first_run_says_the_key_will_be_created_and_errors_once() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("private.key");
    let config = dir.path().join("agent.toml");
    let text = format!(
        "[interface]\nname = \"wfchk0\"\nprivate_key_file = \"{}\"\nlisten_port = 51820\naddresses = [\"10.9.0.1/24\"]\n\n\
         [agent]\nstate_dir = \"{}\"\n",
        key.display(),
        dir.path().join("state").display()
    );
    std::fs::write(&config, text).unwrap();
    let out = agent(&["check", "--config", config.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("private key {} does not exist yet: the first run creates it", key.display())));
    assert!(!key.exists(), "check created the key");

    // A key others may read is refused, and the reason given once.
    std::fs::write(&key, "not a key\n").unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = agent(&["check", "--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let line = stderr.lines().find(|l| l.starts_with("error: ")).unwrap_or_default();
    assert!(line.contains(&key.display().to_string()), "{stderr}");
    assert_eq!(line.matches(&key.display().to_string()).count(), 1, "the path is said once: {stderr}");
}
