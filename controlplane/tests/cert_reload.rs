//! Certificate hot reload: `certs renew` replaces the listener's certificate while agents
//! are connected; new connections get the new one, open streams go on, a broken pair is
//! refused and the current certificate kept; SIGHUP reloads at once.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_rustls::TlsConnector;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use wirefence_control::certs;
use wirefence_control::server::TlsIdentity;
use wirefence_proto::v1::agent_service_client::AgentServiceClient;
use wirefence_proto::v1::WatchRequest;

/// A policy that concerns the watching node (its view changes when it is applied).
const LAPTOP_SSH: &str = r#"
[[rules]]
id = "to-laptop"
from = ["node:laptop"]
to = ["node:laptop"]
proto = "tcp"
ports = ["22"]
"#;

/// The certificate (DER) the listener at `addr` presents in a handshake verified with `ca`.
async fn served_cert(addr: SocketAddr, ca: &Path) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("read ca.pem") {
        roots.add(c.expect("a CA certificate")).expect("add the CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake with the CA of `certs init`");
    tls.get_ref().1.peer_certificates().expect("a server certificate")[0].to_vec()
}

/// The expiry (Unix seconds) of the certificate file at `path`.
fn not_after(path: &Path) -> i64 {
    let pem = std::fs::read(path).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    pem.parse_x509().unwrap().validity().not_after.timestamp()
}

fn file_cert(path: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(path).expect("read a certificate").to_vec()
}

/// Waits (3 s at most) until `addr` serves `want`.
async fn until_served(addr: SocketAddr, ca: &Path, want: &[u8], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while served_cert(addr, ca).await != want {
        assert!(Instant::now() < deadline, "{what}: the listener still serves the old certificate after 3 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_renewed_certificate_reaches_new_connections_while_streams_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let files = certs::init(&pki, &["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let tls = TlsIdentity::from_files(&files.server_cert, &files.server_key).unwrap();
    let mut cp = start_with(dir.path(), |c| {
        c.tls = Some(tls);
        c.tls_poll = Duration::from_millis(100);
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let metrics = cp.handle.metrics_addr.unwrap();
    let expiry = |m: &str| sample(m, "wirefence_control_certificate_expiry_timestamp_seconds") as i64;
    let first_expiry = not_after(&files.server_cert);
    assert_eq!(expiry(&scrape(metrics).await), first_expiry);
    let addr = cp.addr();
    let first = file_cert(&files.server_cert);
    assert_eq!(served_cert(addr, &files.ca_cert).await, first);

    // An enrolled agent watching over TLS.
    let ca = Certificate::from_pem(std::fs::read(&files.ca_cert).unwrap());
    let channel = Endpoint::from_shared(format!("https://127.0.0.1:{}", addr.port()))
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(ca).domain_name("localhost"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut agent = AgentServiceClient::new(channel);
    let key = cp.bound_key("laptop", &[]).await;
    let req = prove(&mut agent, register_req("laptop", 1, &key), &[1; 32]).await;
    let credential = agent.register(req).await.unwrap().into_inner().credential;
    let req = WatchRequest {
        resume_from: 0,
        incarnation: cp.handle.registry().incarnation().to_owned(),
        ..Default::default()
    };
    let mut stream = agent.watch(authed(req, &credential)).await.unwrap().into_inner();
    let v0 = next(&mut stream).await.unwrap().version;

    // Renewed (same names, from the same CA): new connections get it; the stream goes on.
    // A second later, so the new certificate's expiry differs from the first's.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let renewed = certs::renew(&pki, &[]).unwrap();
    let second = file_cert(&renewed.server_cert);
    assert_ne!(second, first, "renew wrote a new certificate");
    until_served(addr, &files.ca_cert, &second, "after certs renew").await;
    let new_expiry = not_after(&files.server_cert);
    assert!(new_expiry > first_expiry);
    assert_eq!(expiry(&scrape(metrics).await), new_expiry, "the metric follows the reload");
    let v1 = cp.apply(LAPTOP_SSH).await.unwrap();
    assert!(v1 > v0);
    assert_eq!(next(&mut stream).await.unwrap().version, v1, "the open stream got the next update");

    // A broken certificate file, then a pair whose key is not the certificate's: refused,
    // the renewed certificate stays.
    std::fs::write(&files.server_cert, b"-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(served_cert(addr, &files.ca_cert).await, second, "a broken file is not served");
    std::fs::copy(&files.ca_cert, &files.server_cert).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(served_cert(addr, &files.ca_cert).await, second, "a certificate without its key is not served");
    let e = cp.handle.tls().unwrap().reload().unwrap_err().to_string();
    assert!(e.to_lowercase().contains("key"), "the refusal names the mismatch: {e}");

    // Renewing again repairs it, with new names when given.
    let sans = ["localhost".to_string(), "cp.example".to_string()];
    certs::renew(&pki, &sans).unwrap();
    let third = file_cert(&files.server_cert);
    until_served(addr, &files.ca_cert, &third, "after the repair").await;
    let pem = std::fs::read(&files.server_cert).unwrap();
    let (_, der) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let cert = der.parse_x509().unwrap();
    let names = cert.subject_alternative_name().unwrap().unwrap().value.general_names.len();
    assert_eq!(names, 2);
    assert_eq!(std::fs::metadata(&files.server_key).unwrap().permissions().mode() & 0o777, 0o600);
}

/// The binary: `serve` reloads on SIGHUP at once (the poll interval here is an hour), and
/// `certs renew` is the CLI's.
#[tokio::test]
async fn sighup_reloads_the_certificate_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let files = certs::init(&pki, &["localhost".to_string()]).unwrap();
    let bin = env!("CARGO_BIN_EXE_wirefence-control");
    let mut serve = tokio::process::Command::new(bin)
        .arg("--admin-socket")
        .arg(dir.path().join("admin.sock"))
        .args(["serve", "--listen", "127.0.0.1:0", "--tls-reload-interval", "1h", "--db"])
        .arg(dir.path().join("control.db"))
        .arg("--tls-cert")
        .arg(&files.server_cert)
        .arg("--tls-key")
        .arg(&files.server_key)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start wirefence-control serve");
    let mut lines = BufReader::new(serve.stdout.take().unwrap()).lines();
    let addr: SocketAddr = loop {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("serve prints its address")
            .unwrap()
            .expect("serve exited");
        if let Some(a) = line.strip_prefix("listening on ") {
            break a.parse().unwrap();
        }
    };
    assert_eq!(served_cert(addr, &files.ca_cert).await, file_cert(&files.server_cert));

    let out = tokio::process::Command::new(bin).args(["certs", "renew", "--dir"]).arg(&pki).output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let renewed = file_cert(&files.server_cert);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_ne!(served_cert(addr, &files.ca_cert).await, renewed, "no reload before the signal (polled hourly)");
    let pid = nix::unistd::Pid::from_raw(serve.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    until_served(addr, &files.ca_cert, &renewed, "after SIGHUP").await;
    assert!(serve.try_wait().unwrap().is_none(), "SIGHUP does not stop serve");
}
