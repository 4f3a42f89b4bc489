//! The real agent against the real control plane (namespaces, TLS, userspace WireGuard):
//! once the node has a credential its enrollment key is never used again and `status`
//! says the file can go; a credential rotation an admin asks for happens without
//! re-enrollment, and the old credential stops working.

use std::time::Duration;

use wirefence_tests::control::ControlPlane;
use wirefence_tests::{run_ok, wait_until, Host, Lab};

const T: Duration = Duration::from_secs(30);

fn credential_file(h: &Host) -> std::path::PathBuf {
    h.dir.join("state/control/credential.json")
}

fn credential(h: &Host) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(credential_file(h)).ok()?).ok()?;
    Some(v["credential"].as_str()?.to_owned())
}

fn status_text(h: &Host) -> String {
    run_ok(h.agent().args(["status", "--config"]).arg(h.config_path()))
}

/// Whether the control plane has the node connected (its Watch stream open).
fn connected(cp: &ControlPlane, h: &Host) -> bool {
    let out = cp.admin(&["nodes", "show", &h.control_hostname(), "--json"]);
    serde_json::from_slice::<serde_json::Value>(&out.stdout).is_ok_and(|n| n["connected"] == true)
}

#[test]
fn the_enrollment_key_is_not_needed_after_enrollment_and_credentials_rotate() {
    let lab = Lab::new(1);
    let cp = ControlPlane::start(&lab);
    let h = &lab.hosts[0];
    let key = h.write_bound_control_config(&cp, &[]);
    let agent = h.spawn_agent();
    wait_until("the node enrolled and connected", T, || credential(h).is_some() && connected(&cp, h));

    let line = format!("enrollment key {} is no longer needed and can be removed", key.display());
    assert!(status_text(h).contains(&line), "{}", status_text(h));
    assert_eq!(h.status_json()["removable_enrollment_key"], key.display().to_string());
    std::fs::remove_file(&key).unwrap();
    assert!(!status_text(h).contains("can be removed"));
    assert!(h.status_json().get("removable_enrollment_key").is_none());

    // The admin asks for a rotation; the agent's next registration (here: a restart,
    // without the key file) rotates. Same node, new credential.
    let old = credential(h).unwrap();
    let old_file = std::fs::read(credential_file(h)).unwrap();
    cp.admin_ok(&["nodes", "rotate-credential", &h.control_hostname()]);
    agent.kill9();
    wait_until("the control plane saw the agent go", T, || !connected(&cp, h));
    let agent = h.spawn_agent();
    wait_until("a new credential", T, || credential(h).is_some_and(|c| c != old) && connected(&cp, h));
    let new_file = std::fs::read(credential_file(h)).unwrap();
    assert!(cp.log().contains("credential rotated"), "{}", cp.log());
    assert_eq!(cp.admin_ok(&["nodes", "list", "--json"]).matches("\"node_id\"").count(), 1);

    // The old credential no longer works, and a refused credential does not make the
    // agent enroll again (there is no key anyway): it says what to do.
    agent.kill9();
    wait_until("the control plane saw the agent go", T, || !connected(&cp, h));
    std::fs::write(credential_file(h), &old_file).unwrap();
    let agent = h.spawn_agent();
    wait_until("the old credential refused", T, || {
        h.control_status()["last_error"].as_str().is_some_and(|e| e.contains("does not accept this node's credential"))
    });
    assert!(!connected(&cp, h));
    assert_eq!(credential(h).as_deref(), Some(old.as_str()), "the agent keeps the credential it was given");
    agent.kill9();
    std::fs::write(credential_file(h), &new_file).unwrap();
    let _agent = h.spawn_agent();
    wait_until("connected again with the new credential", T, || connected(&cp, h));
}
