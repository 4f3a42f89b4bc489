//! The `wirefence-control` binary: argument errors, and every admin command against an
//! in-process control plane through the Unix admin socket.

mod common;

use common::*;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn serve_refuses_without_a_tls_choice() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let args = ["serve", "--db", db.to_str().unwrap(), "--listen", "127.0.0.1:0"];
    let out = cli(&dir.path().join("a.sock"), &args).await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("give --tls-cert and --tls-key, or --insecure"), "{}", text(&out.stderr));
    assert!(!db.exists(), "nothing is created before the arguments are checked");
}

#[tokio::test]
async fn admin_commands_over_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    let sock = cp.handle.admin_socket.clone();

    let args = [
        "keys",
        "create",
        "--json",
        "--hostname",
        "db1",
        "--expires-in",
        "1h",
        "--tag",
        "web",
        "--route",
        "10.88.0.0/16",
    ];
    let out = cli(&sock, &args).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let k: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let key = k["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with(k["key_id"].as_str().unwrap()));
    assert!(k["expires_unix"].as_i64().unwrap() > 0);
    assert_eq!(k.as_object().unwrap().len(), 3, "{k}");
    let mut agent = cp.agent().await;
    let mut req = register_req("db1", 2, &key);
    req.routes = vec![prefix("10.88.5.0/24")];
    agent.register(cp.prove(req, 2).await).await.unwrap();

    // Listed without the secret; used up; revocable.
    let out = cli(&sock, &["keys", "list", "--json"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stdout).contains(key.split_once('.').unwrap().1), "no secret in the list");
    let keys: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (keys[0]["hostname"].as_str(), keys[0]["uses"].as_u64(), keys[0]["max_uses"].as_u64()),
        (Some("db1"), Some(1), Some(1))
    );
    let out = cli(&sock, &["keys", "list"]).await;
    let table = text(&out.stdout);
    assert!(table.starts_with("ID") && table.contains("db1") && table.contains(" 0 "), "{table}");
    let out = cli(&sock, &["keys", "create", "--expires-in", "0s"]).await;
    assert!(!out.status.success() && text(&out.stderr).contains("never"), "{}", text(&out.stderr));
    let out = cli(&sock, &["keys", "create", "--json"]).await;
    let spare: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let expires = spare["expires_unix"].as_i64().unwrap() - wirefence_control::model::now_unix();
    assert!((3590..=3600).contains(&expires), "the default lifetime is 1 h: {expires}");
    let spare_id = spare["key_id"].as_str().unwrap();
    let out = cli(&sock, &["keys", "revoke", spare_id]).await;
    assert!(out.status.success() && text(&out.stdout).contains(spare_id), "{}", text(&out.stderr));
    let r = agent.register(cp.enroll_req("x", 7, spare["key"].as_str().unwrap()).await).await;
    assert_code(r, tonic::Code::PermissionDenied, "revoked");
    let out = cli(&sock, &["keys", "revoke", "knothing"]).await;
    assert!(!out.status.success() && text(&out.stderr).contains("no enrollment key"), "{}", text(&out.stderr));
    let out = cli(&sock, &["keys", "create", "--route", "0.0.0.0/0"]).await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("routes[0]: 0.0.0.0/0 is broader than /8"), "{}", text(&out.stderr));
    cp.enroll("laptop", 1, &[]).await;

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[rules]]\nid = \"x\"\nfrom = [\"group:nope\"]\nto = [\"*\"]\n").unwrap();
    let out = cli(&sock, &["policy", "apply", bad.to_str().unwrap()]).await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains(&format!("{}:3:9: rules[0].from[0]: unknown group \"nope\"", bad.display())), "{err}");
    assert!(err.contains("the running policy is unchanged"), "{err}");

    let good = dir.path().join("good.toml");
    std::fs::write(&good, POLICY).unwrap();
    let out = cli(&sock, &["policy", "apply", good.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("1 rules, 1 tests passed"), "{}", text(&out.stdout));
    assert!(!text(&out.stdout).contains("note:"), "every selector matches a node: {}", text(&out.stdout));
    let ahead = dir.path().join("ahead.toml");
    let rules = "[groups]\nlater = [\"tag:later\", \"node:laptop\"]\n\n[[rules]]\nid = \"a\"\nfrom = [\"node:future\", \"group:later\"]\n\
                 to = [\"tag:web\", \"tag:later\"]\n";
    std::fs::write(&ahead, rules).unwrap();
    let out = cli(&sock, &["policy", "apply", ahead.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("note: no node matches node:future, tag:later yet"), "{}", text(&out.stdout));
    std::fs::write(&good, POLICY).unwrap();
    let out = cli(&sock, &["policy", "apply", good.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = cli(&sock, &["policy", "show"]).await;
    assert!(text(&out.stdout).contains("id = \"admin-ssh\""));
    let out = cli(&sock, &["policy", "show", "--json"]).await;
    let p: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(p["source"], POLICY);

    let out = cli(&sock, &["nodes", "list", "--json"]).await;
    let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let hosts: Vec<&str> = nodes.as_array().unwrap().iter().map(|n| n["hostname"].as_str().unwrap()).collect();
    assert_eq!(hosts.len(), 2);
    assert!(hosts.contains(&"db1") && hosts.contains(&"laptop"));
    let out = cli(&sock, &["nodes", "list"]).await;
    assert!(text(&out.stdout).starts_with("ID"));
    let out = cli(&sock, &["nodes", "show", "db1", "--json"]).await;
    let n: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(n["tags"][0], "web");
    assert_eq!(n["addresses"][0], "10.77.0.1/32");
    assert_eq!(n["routes"][0], "10.88.5.0/24");
    let out = cli(&sock, &["nodes", "show", "db1"]).await;
    assert!(text(&out.stdout).contains("hostname:        db1"));
    let out = cli(&sock, &["nodes", "set", "db1", "--tag", "web", "--tag", "db"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("version ") && text(&out.stdout).contains("tags:            db, web"));
    let out = cli(&sock, &["nodes", "set", "db1"]).await;
    assert!(!out.status.success());
    let out = cli(&sock, &["nodes", "set", "db1", "--hostname", "db1"]).await;
    assert!(out.status.success(), "its own name again changes nothing: {}", text(&out.stderr));
    let out = cli(&sock, &["nodes", "remove", "db1"]).await;
    assert!(out.status.success() && text(&out.stdout).starts_with("removed db1"));
    // Kept, and shown as removed: by name, and in `nodes list --all` only.
    let out = cli(&sock, &["nodes", "show", "db1"]).await;
    assert!(text(&out.stdout).contains("removed:         yes"), "{}", text(&out.stdout));
    let out = cli(&sock, &["nodes", "list"]).await;
    assert!(!text(&out.stdout).contains("db1"), "{}", text(&out.stdout));
    let out = cli(&sock, &["nodes", "list", "--all"]).await;
    let row = text(&out.stdout).lines().find(|l| l.contains("db1")).map(str::to_owned);
    assert!(row.as_deref().is_some_and(|r| r.contains("removed")), "{}", text(&out.stdout));
    let out = cli(&sock, &["nodes", "show", "db2"]).await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("no node \"db2\""), "{}", text(&out.stderr));

    let pki = dir.path().join("pki");
    let out =
        cli(&sock, &["certs", "init", "--dir", pki.to_str().unwrap(), "--san", "localhost", "--san", "::1"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(pki.join("server.pem").exists() && pki.join("server.key").exists() && pki.join("ca.pem").exists());

    let out = cli(&dir.path().join("nothing.sock"), &["nodes", "list"]).await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("connect to the admin socket"), "{}", text(&out.stderr));
}
