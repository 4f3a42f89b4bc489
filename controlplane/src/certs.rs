//! `certs init`: a small CA and a server certificate signed by it; `certs renew`: a new
//! server certificate (and key) from that CA, written in place atomically so a running
//! `serve` picks it up (see `server::tls`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SigningKey,
};
use x509_parser::extensions::GeneralName;

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

    let issuer = Issuer::new(ca, ca_key);
    let (server_cert, server_key) = server_cert(sans, &issuer)?;

    write(&files.ca_cert, ca_cert.pem().as_bytes(), 0o644)?;
    write(&files.ca_key, issuer.key().serialize_pem().as_bytes(), 0o600)?;
    write(&files.server_cert, server_cert.pem().as_bytes(), 0o644)?;
    write(&files.server_key, server_key.serialize_pem().as_bytes(), 0o600)?;
    Ok(files)
}

/// A server certificate for `sans`, valid one year, and its new key, signed by `issuer`.
fn server_cert(sans: &[String], issuer: &Issuer<'_, impl SigningKey>) -> Result<(Certificate, KeyPair), Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(sans.to_vec())?;
    params.distinguished_name.push(DnType::CommonName, sans.first().map_or("wirefence-control", |s| s.as_str()));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(365);
    Ok((params.signed_by(&key, issuer)?, key))
}

/// Replaces `server.pem` and `server.key` in `dir` with a new key and a certificate from the
/// CA there (`ca.pem`, `ca.key`), for `sans` or, when empty, the names of the current
/// certificate. Each file is written to a temporary file, synced and renamed over the old
/// one (the key first: a `serve` that reads in between finds a pair that does not match,
/// refuses it and keeps its certificate until the new one lands).
pub fn renew(dir: &Path, sans: &[String]) -> Result<CertFiles, Error> {
    let files = CertFiles::in_dir(dir);
    let read = |p: &Path| std::fs::read_to_string(p).map_err(Error::io("read", p));
    let ca_key = KeyPair::from_pem(&read(&files.ca_key)?)?;
    let issuer = Issuer::from_ca_cert_pem(&read(&files.ca_cert)?, ca_key)?;
    let sans = if sans.is_empty() { names_of(&files.server_cert)? } else { sans.to_vec() };
    let (cert, key) = server_cert(&sans, &issuer)?;
    replace(&files.server_key, key.serialize_pem().as_bytes(), 0o600)?;
    replace(&files.server_cert, cert.pem().as_bytes(), 0o644)?;
    Ok(files)
}

/// The subject alternative names (DNS names, IP addresses) of the certificate at `path`.
fn names_of(path: &Path) -> Result<Vec<String>, Error> {
    let pem = std::fs::read(path).map_err(Error::io("read", path))?;
    let bad = |why: String| Error::CertFile { path: path.to_owned(), why };
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).map_err(|e| bad(format!("not PEM: {e}")))?;
    let cert = pem.parse_x509().map_err(|e| bad(format!("not a certificate: {e}")))?;
    let san = cert.subject_alternative_name().map_err(|e| bad(format!("subject alternative names: {e}")))?;
    let names: Vec<String> = san
        .map(|s| &s.value.general_names)
        .into_iter()
        .flatten()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_string()),
            GeneralName::IPAddress(b) => match b.len() {
                4 => Some(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).ok()?).to_string()),
                16 => Some(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).ok()?).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect();
    if names.is_empty() {
        return Err(bad("no DNS or IP subject alternative names to keep (give --san)".into()));
    }
    Ok(names)
}

/// Writes `data` to `path` atomically: a temporary file beside it, synced, renamed over it,
/// and the directory synced.
fn replace(path: &Path, data: &[u8], mode: u32) -> Result<(), Error> {
    let tmp = path.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    write(&tmp, data, mode)?;
    File::open(&tmp).and_then(|f| f.sync_all()).map_err(Error::io("sync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(Error::io("rename over", path))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).map_err(Error::io("sync directory", dir))
}

fn write(path: &Path, data: &[u8], mode: u32) -> Result<(), Error> {
    let mut f =
        OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(Error::io("create", path))?;
    f.write_all(data).map_err(Error::io("write", path))
}
