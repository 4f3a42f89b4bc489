//! Text from agents cannot drive the operator's terminal or forge log lines: the real
//! `wirefence-control serve` binary gets a hostile hostname (refused) and a hostile apply
//! error (kept), and its log and its `nodes list/show` output show them escaped.

mod common;

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use common::{authed, prove, register_req};
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::Code;
use wirefence_proto::v1::agent_service_client::AgentServiceClient;
use wirefence_proto::v1::{agent_report, AgentReport, ApplyFailed};

const FAKE_LINE: &str = "2026-12-06T00:00:00.000000Z  INFO wirefence_control: node enrolled";

/// Characters that must never reach the log or the terminal from an agent (ANSI colours
/// are off: stderr is a pipe).
fn raw_controls(s: &str) -> Vec<char> {
    s.chars().filter(|c| matches!(c, '\x1b' | '\r' | '\x07' | '\u{9b}' | '\u{202e}')).collect()
}

async fn cli(socket: &Path, args: &[&str]) -> Output {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_wirefence-control"))
        .arg("--admin-socket")
        .arg(socket)
        .args(args)
        .output()
        .await
        .expect("run wirefence-control");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

#[tokio::test]
async fn hostile_agent_text_is_escaped_in_logs_and_cli_output() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin.sock");
    let db = dir.path().join("control.db");
    let mut server = tokio::process::Command::new(env!("CARGO_BIN_EXE_wirefence-control"))
        .arg("--admin-socket")
        .arg(&socket)
        .args(["serve", "--insecure", "--listen", "127.0.0.1:0", "--db"])
        .arg(&db)
        .env("WIREFENCE_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start wirefence-control serve");
    let mut stdout = BufReader::new(server.stdout.take().unwrap()).lines();
    let mut addr = None;
    while let Some(line) = tokio::time::timeout(Duration::from_secs(30), stdout.next_line())
        .await
        .expect("the server starts within 30 s")
        .unwrap()
    {
        if let Some(a) = line.strip_prefix("listening on ") {
            addr = Some(a.to_owned());
        }
        if line.starts_with("admin socket") {
            break;
        }
    }
    let addr = addr.expect("the server prints its address");
    let mut agent = AgentServiceClient::connect(format!("http://{addr}")).await.unwrap();
    let out = cli(&socket, &["keys", "create", "--max-uses", "2", "--json"]).await;
    let key: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let key = key["key"].as_str().unwrap();

    // A hostname with controls is refused; the refusal quotes it escaped.
    let hostile = format!("db1\x1b[31m\n{FAKE_LINE} hostname=\u{202e}toor");
    let req = prove(&mut agent, register_req(&hostile, 1, key), &[1; 32]).await;
    let refused = agent.register(req).await.expect_err("refused");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().starts_with("hostname: ") && refused.message().contains(r"\u{1b}[31m\n2026"));
    assert!(raw_controls(refused.message()).is_empty() && !refused.message().contains('\n'), "{refused:?}");

    // An apply error is free text: it is kept as sent, and shown escaped.
    let req = prove(&mut agent, register_req("db1", 1, key), &[1; 32]).await;
    let me = agent.register(req).await.unwrap().into_inner();
    let reason = format!("wg0 busy\x1b[2J\x1b]0;owned\x07\r\n{FAKE_LINE} hostname=\u{202e}toor \u{9b}31m");
    let failed = AgentReport { body: Some(agent_report::Body::Failed(ApplyFailed { version: 1, reason })) };
    agent.report(authed(tokio_stream::iter(vec![failed]), &me.credential)).await.unwrap();

    let show = String::from_utf8(cli(&socket, &["nodes", "show", &me.node_id]).await.stdout).unwrap();
    assert!(raw_controls(&show).is_empty(), "{show:?}");
    let shown = format!(
        r"last error:      wg0 busy\u{{1b}}[2J\u{{1b}}]0;owned\u{{7}}\r\n{FAKE_LINE} hostname=\u{{202e}}toor \u{{9b}}31m"
    );
    assert!(show.contains(&shown), "{show}");
    let list = String::from_utf8(cli(&socket, &["nodes", "list"]).await.stdout).unwrap();
    assert!(raw_controls(&list).is_empty() && list.lines().count() == 2, "{list:?}");

    server.start_kill().unwrap();
    let log = String::from_utf8(server.wait_with_output().await.unwrap().stderr).unwrap();
    assert!(log.contains("apply failed"), "{log}");
    assert!(raw_controls(&log).is_empty(), "{log:?}");
    assert!(!log.lines().any(|l| l.starts_with(FAKE_LINE)), "a forged log line: {log}");
    assert!(log.contains(r"\r\n2026-12-06T00:00:00.000000Z") && log.contains(r"hostname=\u{202e}toor"), "{log}");
}
