//! State that must survive: one `serve` per database (a second is refused, the first keeps
//! serving), and the database incarnation that tells an agent its versions came from
//! another history (a recreated or restored database).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use wirefence_control::server::{serve, ServeConfig};

#[tokio::test]
async fn a_second_serve_on_the_same_database_is_refused_and_the_first_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    let laptop = cp.enroll("laptop", 1, &[]).await;
    cp.enroll("db1", 2, &[]).await;
    let db = dir.path().join("control.db");
    let pid = std::process::id().to_string();

    // In process: refused before anything is bound, naming the lock file and its holder.
    let err = serve(ServeConfig::new(&db, dir.path().join("second.sock"))).await.err().expect("refused");
    let text = err.to_string();
    assert!(text.contains("control.db.lock") && text.contains(&pid), "{text}");
    assert!(!dir.path().join("second.sock").exists());

    // The CLI: exits with the same error instead of serving.
    let mut child = Command::new(env!("CARGO_BIN_EXE_wirefence-control"))
        .arg("--admin-socket")
        .arg(dir.path().join("third.sock"))
        .args(["serve", "--listen", "127.0.0.1:0", "--insecure", "--db"])
        .arg(&db)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(10) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("a second `serve` on {} is still running", db.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(stderr.contains("in use by another control plane") && stderr.contains(&pid), "{stderr}");

    // The first still serves: a policy applied through it reaches its agents.
    let mut s = watch(&cp, &laptop.credential, 0).await.unwrap();
    let first = next(&mut s).await.unwrap();
    let v = cp.apply(POLICY).await.unwrap();
    assert!(v > first.version);
    assert_eq!(next(&mut s).await.unwrap().version, v);
}

#[tokio::test]
async fn an_agent_of_a_recreated_database_gets_a_snapshot_even_at_the_same_version() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    let laptop = cp.enroll("laptop", 1, &[]).await;
    cp.enroll("db1", 2, &[]).await;
    let v = cp.apply(POLICY).await.unwrap();
    let old = cp.handle.registry().incarnation().to_owned();
    let mut s = watch(&cp, &laptop.credential, 0).await.unwrap();
    let u = next(&mut s).await.unwrap();
    assert_eq!((u.version, u.incarnation.as_str()), (v, old.as_str()), "updates carry the incarnation");
    assert_eq!(snapshot(&u).policy.as_ref().unwrap().rules.len(), 1);
    let Cp { handle, admin, .. } = cp;
    drop(admin);
    handle.shutdown().await.unwrap();

    // The database is recreated: same nodes, no policy, and as many changes, so the
    // version numbers meet again.
    for f in ["control.db", "control.db-wal", "control.db-shm"] {
        let _ = std::fs::remove_file(dir.path().join(f));
    }
    let mut cp = start(dir.path()).await;
    let new = cp.handle.registry().incarnation().to_owned();
    assert_ne!(new, old);
    let laptop = cp.enroll("laptop", 1, &[]).await;
    cp.enroll("db1", 2, &[]).await;
    cp.enroll("web1", 3, &[]).await;
    assert_eq!(cp.handle.registry().current().version, v, "the test needs equal versions");

    // The agent resumes from v of the old incarnation: it gets the new database's snapshot.
    let mut s = watch_of(&cp, &laptop.credential, v, &old).await.unwrap();
    let u = next(&mut s).await.unwrap();
    assert_eq!((u.version, u.incarnation.as_str()), (v, new.as_str()));
    assert!(snapshot(&u).policy.as_ref().unwrap().rules.is_empty(), "the recreated database has no policy");
    // An agent that does not know its incarnation gets one too; one current in this
    // incarnation gets nothing.
    let mut s = watch_of(&cp, &laptop.credential, v, "").await.unwrap();
    assert_eq!(next(&mut s).await.unwrap().incarnation, new);
    let mut s = watch_of(&cp, &laptop.credential, v, &new).await.unwrap();
    silent(&mut s, 200).await;
}

#[tokio::test]
async fn a_database_directory_or_tls_key_open_to_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let chmod = |p: &std::path::Path, m| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    chmod(&data, 0o777);
    let err =
        serve(ServeConfig::new(data.join("control.db"), dir.path().join("admin.sock"))).await.err().expect("refused");
    let text = err.to_string();
    assert!(text.contains(data.to_str().unwrap()) && text.contains("0777"), "{text}");
    assert!(!data.join("control.db").exists(), "nothing created in it");

    let tls = dir.path().join("tls");
    let files = wirefence_control::certs::init(&tls, &["127.0.0.1".to_owned()]).unwrap();
    wirefence_control::server::TlsIdentity::from_files(&files.server_cert, &files.server_key)
        .expect("certs init output");
    chmod(&files.server_key, 0o644);
    let err = wirefence_control::server::TlsIdentity::from_files(&files.server_cert, &files.server_key).unwrap_err();
    assert!(err.to_string().contains("0644"), "{err}");
}
