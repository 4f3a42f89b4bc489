//! `certs init`: a small CA and a server certificate signed by it, for running the agent
//! listener with real TLS in tests and demos.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

use crate::Error;

/// The files `init` writes.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl CertFiles {
    pub fn in_dir(dir: &Path) -> CertFiles {
        CertFiles {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
        }
    }
}

/// Writes `ca.pem`, `ca.key`, `server.pem` and `server.key` (keys 0600) into `dir`; the
/// server certificate carries `sans` (DNS names or IP addresses). Existing files are never
/// overwritten.
pub fn init(dir: &Path, sans: &[String]) -> Result<CertFiles, Error> {
    let files = CertFiles::in_dir(dir);
    for p in [&files.ca_cert, &files.ca_key, &files.server_cert, &files.server_key] {
        if p.exists() {
            return Err(Error::Exists(p.clone()));
        }
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o755).create(dir).map_err(Error::io("create directory", dir))?;

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name.push(DnType::CommonName, "wirefence control plane CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    // Real lifetimes, so expiry monitoring (agents report it per address family) means
    // something: the CA ten years, the server certificate one year.
    let now = time::OffsetDateTime::now_utc();
    ca.not_before = now - time::Duration::hours(1);
    ca.not_after = now + time::Duration::days(3650);
    let ca_cert = ca.self_signed(&ca_key)?;

    let server_key = KeyPair::generate()?;
    let mut server = CertificateParams::new(sans.to_vec())?;
    server.distinguished_name.push(DnType::CommonName, sans.first().map_or("wirefence-control", |s| s.as_str()));
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.not_before = now - time::Duration::hours(1);
    server.not_after = now + time::Duration::days(365);
    let issuer = Issuer::new(ca, ca_key);
    let server_cert = server.signed_by(&server_key, &issuer)?;

    write(&files.ca_cert, ca_cert.pem().as_bytes(), 0o644)?;
    write(&files.ca_key, issuer.key().serialize_pem().as_bytes(), 0o600)?;
    write(&files.server_cert, server_cert.pem().as_bytes(), 0o644)?;
    write(&files.server_key, server_key.serialize_pem().as_bytes(), 0o600)?;
    Ok(files)
}

fn write(path: &Path, data: &[u8], mode: u32) -> Result<(), Error> {
    let mut f =
        OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(Error::io("create", path))?;
    f.write_all(data).map_err(Error::io("write", path))
}
