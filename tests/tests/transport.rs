//! An agent and a control plane that disagree about TLS: the real agent against the real
//! `wirefence-control serve`, once a plaintext agent against a TLS control plane and once
//! a TLS agent against a plaintext one. `status` must say which end speaks what, not an
//! HTTP/2 failure.

use std::time::Duration;

use wirefence_tests::control::ControlPlane;
use wirefence_tests::{run, run_ok, wait_until, Host, Lab};

const T: Duration = Duration::from_secs(30);

/// The agent's last control-plane error; empty while `status` has nothing to read yet (the
/// agent just started).
fn last_error(h: &Host) -> String {
    let out = run(h.agent().args(["status", "--json", "--config"]).arg(h.config_path()));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    status["control"]["last_error"].as_str().unwrap_or_default().to_owned()
}

fn status_text(h: &Host) -> String {
    run_ok(h.agent().args(["status", "--config"]).arg(h.config_path()))
}

#[test]
fn a_plaintext_agent_is_told_the_control_plane_answered_with_tls() {
    let lab = Lab::new(1);
    let cp = ControlPlane::start(&lab);
    let h = &lab.hosts[0];
    h.write_bound_control_config(&cp, &[]);
    let text = std::fs::read_to_string(h.config_path()).unwrap();
    let ca = format!("ca_file = \"{}\"\n", cp.ca_file().display());
    assert!(text.contains(&ca), "{text}");
    h.write_config(&text.replace(&ca, "insecure = true\n"));
    let _agent = h.spawn_agent();
    let says = "answered with TLS but this agent is configured for plaintext (control.insecure = true, http://)";
    wait_until("the agent says the control plane speaks TLS", T, || last_error(h).contains(says));
    let e = last_error(h);
    assert!(e.starts_with("the control plane at "), "{e}");
    assert!(!e.contains("Unavailable") && !e.contains("h2"), "{e}");
    assert!(status_text(h).contains(says), "{}", status_text(h));
}

#[test]
fn a_tls_agent_is_told_the_control_plane_answered_in_plaintext() {
    let lab = Lab::new(1);
    let cp = ControlPlane::start_plaintext(&lab);
    let h = &lab.hosts[0];
    h.write_bound_control_config(&cp, &[]);
    let _agent = h.spawn_agent();
    let says = "answered in plaintext (HTTP/2 without TLS) but this agent is configured for TLS (control.ca_file";
    wait_until("the agent says the control plane speaks plaintext", T, || last_error(h).contains(says));
    let e = last_error(h);
    assert!(e.starts_with("the control plane at "), "{e}");
    assert!(!e.contains("InvalidContentType"), "{e}");
    assert!(status_text(h).contains(says), "{}", status_text(h));
}
