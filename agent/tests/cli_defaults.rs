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
