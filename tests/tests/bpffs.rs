//! The agent refuses a bpffs that is not the host's: run in a mount namespace of its own
//! with a fresh bpffs mounted there (what `PrivateMounts`-style sandboxing or `ip netns
//! exec` give an agent that mounts its own), it must stop with an error saying so rather
//! than pin programs that would vanish with the namespace. Needs root.

use std::process::Command;

use wirefence_tests::*;

#[test]
fn a_bpffs_private_to_the_agents_mount_namespace_is_refused() {
    let lab = Lab::new(1);
    let h = &lab.hosts[0];
    let private = TempDir::new();
    let rules = format!(
        "[policy]\npin_dir = \"{}\"\n[[policy.rules]]\nid = \"ping\"\nfrom = [\"10.77.0.9/32\"]\nto = [\"{}/32\"]\nproto = \"icmp\"\n",
        private.0.join("pins").display(),
        h.overlay_v4
    );
    h.config().extra(&rules).write();
    // unshare: a mount namespace of the agent's own, private (nothing propagates back), with
    // a bpffs mounted over a directory the host also has (so PID 1 finds the path).
    let out = run(Command::new("ip")
        .args(["netns", "exec", &h.ns.name, "unshare", "--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount -t bpf bpf "$0" && exec "$@""#)
        .arg(&private.0)
        .arg(agent_bin())
        .args(["run", "--once", "--config"])
        .arg(h.config_path()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the agent accepted a private bpffs:\n{stderr}");
    assert!(
        stderr.contains("is not the host's") && stderr.contains(private.0.join("pins").to_str().unwrap()),
        "the refusal does not name the private bpffs:\n{stderr}"
    );

    // The same directory with no bpffs at all (the host's view): refused too, not mounted.
    let out = h.run_once();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("is not on a bpffs"), "{stderr}");
    let fs = run_ok(Command::new("stat").args(["-f", "-c", "%T"]).arg(&private.0));
    assert_ne!(fs.trim(), "bpf_fs", "the agent mounted a bpffs");
}
