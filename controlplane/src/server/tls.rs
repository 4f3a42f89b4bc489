//! The agent listener's certificate: loaded at start and loaded again when its files change
//! (polled: a renewal replaces them by rename, which an inotify watch on the file would
//! miss) or on demand (`serve` maps SIGHUP to [`ServerTls::reload`]). New connections get
//! the current certificate; open connections keep the one they shook hands with. A changed
//! pair that does not load (unreadable, not PEM, a key that does not match the
//! certificate, a key open to others) is refused with a log line and the current one stays.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::registry::lock;
use crate::Error;

use super::check_private;

/// PEM certificate chain and private key of the agent listener, and the files they came
/// from.
#[derive(Clone)]
pub struct TlsIdentity {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    files: TlsFiles,
}

#[derive(Clone, Debug)]
struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
}

impl TlsIdentity {
    /// The key must be ours and closed to group and others.
    pub fn from_files(cert: &Path, key: &Path) -> Result<TlsIdentity, Error> {
        check_private(key, 0o077)?;
        Ok(TlsIdentity {
            cert_pem: std::fs::read(cert).map_err(Error::io("read TLS certificate", cert))?,
            key_pem: std::fs::read(key).map_err(Error::io("read TLS key", key))?,
            files: TlsFiles { cert: cert.to_owned(), key: key.to_owned() },
        })
    }
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsIdentity { .. }")
    }
}

/// Builds the rustls acceptor (HTTP/2 only); rustls checks that the key is the
/// certificate's.
fn acceptor(tls: &TlsIdentity) -> Result<TlsAcceptor, Error> {
    let certs = CertificateDer::pem_slice_iter(&tls.cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| Error::TlsPem { what: "certificate", source })?;
    if certs.is_empty() {
        return Err(Error::TlsMissing("certificate"));
    }
    let key = match PrivateKeyDer::from_pem_slice(&tls.key_pem) {
        Ok(key) => key,
        Err(rustls::pki_types::pem::Error::NoItemsFound) => return Err(Error::TlsMissing("private key")),
        Err(source) => return Err(Error::TlsPem { what: "private key", source }),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Expiry of the first certificate of a PEM chain.
fn not_after(pem: &[u8]) -> Option<i64> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).ok()?;
    Some(pem.parse_x509().ok()?.validity().not_after.timestamp())
}

/// What identifies a version of a file: inode (a rename brings a new one), size, mtime.
type Stamp = Option<(u64, u64, i64, i64)>;

fn stamp(path: &Path) -> Stamp {
    std::fs::metadata(path).ok().map(|m| (m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

/// The listener's current certificate.
pub struct ServerTls {
    current: RwLock<TlsAcceptor>,
    /// Expiry (Unix seconds) of the certificate in `current`, if it parses as X.509.
    not_after: Mutex<Option<i64>>,
    files: TlsFiles,
    /// The files' stamps at the last load attempt (a failed one too: a broken pair is
    /// reported once, and tried again when either file changes).
    seen: Mutex<[Stamp; 2]>,
}

impl ServerTls {
    pub fn new(id: &TlsIdentity) -> Result<ServerTls, Error> {
        let seen = [stamp(&id.files.cert), stamp(&id.files.key)];
        Ok(ServerTls {
            current: RwLock::new(acceptor(id)?),
            not_after: Mutex::new(not_after(&id.cert_pem)),
            files: id.files.clone(),
            seen: Mutex::new(seen),
        })
    }

    /// The acceptor for a new connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads the files again and, if they load, serves them to new connections; if not,
    /// the error says why and the current certificate stays.
    pub fn reload(&self) -> Result<(), Error> {
        let files = &self.files;
        *lock(&self.seen) = [stamp(&files.cert), stamp(&files.key)];
        let id = TlsIdentity::from_files(&files.cert, &files.key)?;
        let next = acceptor(&id)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = next;
        *lock(&self.not_after) = not_after(&id.cert_pem);
        Ok(())
    }

    /// Expiry (Unix seconds) of the certificate new connections get.
    pub fn not_after(&self) -> Option<i64> {
        *lock(&self.not_after)
    }

    /// [`ServerTls::reload`] if either file changed since the last attempt.
    fn reload_if_changed(&self) -> Option<Result<(), Error>> {
        let files = &self.files;
        let now = [stamp(&files.cert), stamp(&files.key)];
        if *lock(&self.seen) == now {
            return None;
        }
        Some(self.reload())
    }

    /// The certificate file, for log lines.
    pub fn describe(&self) -> String {
        self.files.cert.display().to_string()
    }
}

/// Polls the files every `interval` until `stopped` resolves, reloading on a change.
pub async fn watch(tls: Arc<ServerTls>, interval: Duration, stopped: impl std::future::Future<Output = ()>) {
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            _ = tokio::time::sleep(interval) => {}
        }
        match tls.reload_if_changed() {
            None => {}
            Some(Ok(())) => tracing::info!(cert = %tls.describe(), "TLS certificate reloaded for new connections"),
            Some(Err(e)) => tracing::warn!(
                cert = %tls.describe(),
                error = %e,
                "TLS certificate files changed but do not load; new connections keep the current certificate"
            ),
        }
    }
}
