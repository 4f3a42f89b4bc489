//! One connection to the control plane: every configured endpoint, every address it
//! resolves to (IPv4 and IPv6, alternating), tried with Happy Eyeballs (RFC 8305: the next
//! address starts 250 ms after the previous one, or at once when it fails; the first to
//! complete TCP, TLS and HTTP/2 wins); TLS with rustls against the configured CA only. The caller retries with backoff, so this never loops itself. The
//! certificate probe shakes hands the same way with every address, one family after an
//! outage taught that one family's certificate says nothing about the other's.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint as TonicEndpoint};

use super::config::Transport;
use super::health::CertProbe;
use super::sniff::{FirstAnswer, Sniff};
use crate::primitives::Endpoint;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// RFC 8305's Connection Attempt Delay: a silent address costs the next one this, not its
/// timeouts.
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(250);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Addresses one certificate probe shakes hands with, at most (a host name could resolve to
/// hundreds).
pub const MAX_PROBED: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("control.ca_file {path}: {reason}")]
    Ca { path: PathBuf, reason: String },
    #[error("no control-plane endpoint answered: {0}")]
    Unreachable(String),
    /// Said on its own, not among the other addresses' failures: it is what to fix.
    #[error("the control plane at {addr} {mismatch}")]
    Mismatch { addr: SocketAddr, mismatch: Mismatch },
}

/// The two ends disagree about TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    #[error(
        "answered with TLS but this agent is configured for plaintext (control.insecure = true, http://); \
         set control.ca_file to the control plane's CA instead"
    )]
    TlsAnswered,
    #[error(
        "answered in plaintext (HTTP/2 without TLS) but this agent is configured for TLS (control.ca_file, \
         https://); the control plane runs with --insecure"
    )]
    PlaintextAnswered,
}

/// Why one address did not give a connection (or a certificate probe).
#[derive(Debug, thiserror::Error)]
enum AddrError {
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    Mismatch(Mismatch),
}

impl From<String> for AddrError {
    fn from(reason: String) -> AddrError {
        AddrError::Failed(reason)
    }
}

/// Where the connection went and what certificate the server showed.
#[derive(Clone, Debug)]
pub struct Connected {
    pub addr: SocketAddr,
    /// Unix seconds the server's certificate expires; `None` for plaintext.
    pub cert_not_after: Option<i64>,
}

pub struct Connector {
    endpoints: Vec<Endpoint>,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Every address the endpoints resolved to so far: the guard keeps routes off them.
    resolved: Mutex<BTreeSet<IpAddr>>,
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

impl Connector {
    pub fn new(endpoints: Vec<Endpoint>, transport: &Transport) -> Result<Connector, ConnectError> {
        let tls = match transport {
            Transport::Insecure => None,
            Transport::Tls { ca_file } => Some(Arc::new(client_config(ca_file)?)),
        };
        Ok(Connector { endpoints, tls, resolved: Mutex::default() })
    }

    /// Connects to the first endpoint address that completes TCP (and TLS and HTTP/2),
    /// starting one attempt every [`ATTEMPT_DELAY`] (or at once after a failure) in
    /// [`happy_eyeballs_order`]; the attempts still running when one wins are dropped. Returns
    /// a channel bound to that one connection: when it breaks, the caller reconnects.
    pub async fn connect(&self) -> Result<(Channel, Connected), ConnectError> {
        use futures::StreamExt;
        let (addrs, mut failures) = self.resolve().await;
        let mut waiting = happy_eyeballs_order(addrs).into_iter();
        let mut running = futures::stream::FuturesUnordered::new();
        let mut mismatch = None;
        let mut next_start = tokio::time::Instant::now();
        loop {
            if running.is_empty() || tokio::time::Instant::now() >= next_start {
                match waiting.next() {
                    Some((host, addr)) => {
                        running.push(self.attempt(host, addr));
                        next_start = tokio::time::Instant::now() + ATTEMPT_DELAY;
                    }
                    None if running.is_empty() => break,
                    None => next_start = tokio::time::Instant::now() + Duration::from_secs(3600),
                }
            }
            tokio::select! {
                Some((addr, result)) = running.next() => match result {
                    Ok(ok) => return Ok(ok),
                    Err(e) => {
                        match e {
                            AddrError::Mismatch(m) => {
                                mismatch.get_or_insert(ConnectError::Mismatch { addr, mismatch: m });
                            }
                            AddrError::Failed(reason) => failures.push(format!("{addr}: {reason}")),
                        }
                        // A failed attempt starts the next one at once.
                        next_start = tokio::time::Instant::now();
                    }
                },
                _ = tokio::time::sleep_until(next_start) => {}
            }
        }
        Err(mismatch.unwrap_or_else(|| ConnectError::Unreachable(failures.join("; "))))
    }

    async fn attempt(&self, host: String, addr: SocketAddr) -> (SocketAddr, Result<(Channel, Connected), AddrError>) {
        (addr, self.connect_addr(&host, addr).await)
    }

    /// The control plane's addresses: literal endpoints and what host names resolved to.
    pub fn addresses(&self) -> Vec<IpAddr> {
        let mut all = self.resolved.lock().expect("not poisoned").clone();
        all.extend(self.endpoints.iter().filter_map(|e| match e {
            Endpoint::Addr(a) => Some(a.ip()),
            Endpoint::Host { .. } => None,
        }));
        all.into_iter().collect()
    }

    /// Every address each endpoint resolves to (host name, address), recorded for
    /// [`Connector::addresses`]; the failures to resolve as text.
    async fn resolve(&self) -> (Vec<(String, SocketAddr)>, Vec<String>) {
        let (mut out, mut failures) = (Vec::new(), Vec::new());
        for e in &self.endpoints {
            let (host, addrs) = match e {
                Endpoint::Addr(a) => (a.ip().to_string(), vec![*a]),
                Endpoint::Host { host, port } => match tokio::net::lookup_host((host.as_str(), *port)).await {
                    Ok(a) => (host.clone(), a.collect()),
                    Err(err) => {
                        failures.push(format!("{host}:{port}: {err}"));
                        continue;
                    }
                },
            };
            self.resolved.lock().expect("not poisoned").extend(addrs.iter().map(SocketAddr::ip));
            out.extend(addrs.into_iter().map(|a| (host.clone(), a)));
        }
        (out, failures)
    }

    /// Shakes hands with every address the endpoints resolve to (at most
    /// [`MAX_PROBED`], at once), with the verifier the connections use, and keeps each
    /// leaf certificate's expiry by address family. `None` in plaintext mode.
    pub async fn probe_certificates(&self) -> Option<CertProbe> {
        let cfg = self.tls.clone()?;
        let (addrs, failures) = self.resolve().await;
        for f in &failures {
            tracing::warn!(error = %f, "certificate probe: cannot resolve a control-plane endpoint");
        }
        let probes = addrs.into_iter().take(MAX_PROBED).map(|(host, addr)| {
            let cfg = cfg.clone();
            async move {
                let result = async {
                    let tls = handshake(&cfg, &host, tcp_connect(addr).await?).await.map_err(|e| e.to_string())?;
                    leaf_not_after(&tls).ok_or_else(|| "the certificate has no readable expiry".to_string())
                }
                .await;
                (addr, result)
            }
        });
        let mut probe = CertProbe::default();
        for (addr, result) in futures::future::join_all(probes).await {
            if let Err(e) = &result {
                tracing::warn!(%addr, error = %e, "certificate probe failed");
            }
            probe.family_mut(addr.ip()).record(result.ok());
        }
        Some(probe)
    }

    async fn connect_addr(&self, host: &str, addr: SocketAddr) -> Result<(Channel, Connected), AddrError> {
        let tcp = tcp_connect(addr).await?;
        let _ = tcp.set_nodelay(true);
        let (io, cert_not_after, first): (Box<dyn Io>, _, _) = match &self.tls {
            None => {
                let (sniff, first) = Sniff::new(tcp);
                (Box::new(sniff), None, Some(first))
            }
            Some(cfg) => {
                let tls = handshake(cfg, host, tcp).await?;
                let expiry = leaf_not_after(&tls);
                (Box::new(tls), expiry, None)
            }
        };
        // The channel gets exactly this stream; a second connect attempt by tonic fails and
        // surfaces as a stream error, which sends the caller back through its backoff.
        let slot = Arc::new(Mutex::new(Some(io)));
        let connector = tower::service_fn(move |_uri| {
            let io = slot.lock().expect("not poisoned").take();
            async move { io.map(TokioIo::new).ok_or_else(|| std::io::Error::other("connection closed")) }
        });
        // HTTP/2 pings find a dead path in seconds (TCP alone would take many minutes), so
        // the session ends and the next endpoint address is tried.
        let channel = TonicEndpoint::from_static("http://control-plane")
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .connect_with_connector(connector)
            .await
            .map_err(|e| format!("HTTP/2: {e}"))?;
        // Plaintext: the server's first bytes (its SETTINGS) show it speaks HTTP/2 at all.
        if let Some(first) = first {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, first).await {
                Ok(Ok(FirstAnswer::Tls)) => return Err(AddrError::Mismatch(Mismatch::TlsAnswered)),
                Ok(Ok(FirstAnswer::Closed)) => {
                    return Err(AddrError::Failed("closed the connection before answering HTTP/2".into()))
                }
                Ok(Ok(FirstAnswer::Other)) => {}
                Ok(Err(_)) | Err(_) => return Err(AddrError::Failed("no answer to the HTTP/2 preface".into())),
            }
        }
        Ok((channel, Connected { addr, cert_not_after }))
    }
}

/// The attempt order of RFC 8305 §4: the endpoints in their configured order, and the
/// addresses of each alternating between the families, starting with the family of its
/// first address (the resolver's preference).
pub fn happy_eyeballs_order(addrs: Vec<(String, SocketAddr)>) -> Vec<(String, SocketAddr)> {
    let mut out = Vec::with_capacity(addrs.len());
    let mut rest = addrs.into_iter().peekable();
    while let Some((host, first)) = rest.next() {
        // This endpoint's addresses (consecutive, under one host name), split by family.
        let mut same = vec![(host.clone(), first)];
        while let Some(next) = rest.next_if(|(h, _)| *h == host) {
            same.push(next);
        }
        let (mut a, mut b): (Vec<_>, Vec<_>) = same.into_iter().partition(|(_, x)| x.is_ipv6() == first.is_ipv6());
        a.reverse();
        b.reverse();
        while !a.is_empty() || !b.is_empty() {
            out.extend(a.pop());
            out.extend(b.pop());
        }
    }
    out
}

async fn tcp_connect(addr: SocketAddr) -> Result<TcpStream, String> {
    tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())
}

/// The TLS handshake of every connection and probe: the configured CA only, `host` (a DNS
/// name, or the literal address) as the name the certificate must carry.
async fn handshake(
    cfg: &Arc<rustls::ClientConfig>,
    host: &str,
    tcp: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, AddrError> {
    let name = ServerName::try_from(host.to_owned()).map_err(|e| format!("server name {host:?}: {e}"))?;
    tokio::time::timeout(HANDSHAKE_TIMEOUT, tokio_rustls::TlsConnector::from(cfg.clone()).connect(name, tcp))
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| {
            let rustls = e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
            // The answer is no TLS record: an HTTP/2 server opens with its SETTINGS frame.
            match rustls {
                Some(rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)) => {
                    AddrError::Mismatch(Mismatch::PlaintextAnswered)
                }
                _ => AddrError::Failed(format!("TLS: {e}")),
            }
        })
}

/// Unix seconds the server's leaf certificate expires.
fn leaf_not_after(tls: &tokio_rustls::client::TlsStream<TcpStream>) -> Option<i64> {
    tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(not_after)
}

fn client_config(ca_file: &Path) -> Result<rustls::ClientConfig, ConnectError> {
    let ca = |reason: String| ConnectError::Ca { path: ca_file.to_owned(), reason };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).map_err(|e| ca(e.to_string()))? {
        roots.add(cert.map_err(|e| ca(e.to_string()))?).map_err(|e| ca(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(ca("no certificate in the file".into()));
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| ca(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

fn not_after(der: &CertificateDer<'_>) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    Some(cert.validity().not_after.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_endpoints_addresses_alternate_between_families_in_configured_order() {
        let a = |host: &str, addr: &str| (host.to_owned(), addr.parse::<SocketAddr>().unwrap());
        let order = happy_eyeballs_order(vec![
            a("cp", "[fd00::1]:7443"),
            a("cp", "[fd00::2]:7443"),
            a("cp", "[fd00::3]:7443"),
            a("cp", "192.0.2.1:7443"),
            a("cp", "192.0.2.2:7443"),
            a("10.0.0.9", "10.0.0.9:7443"),
            a("cp2", "192.0.2.9:7443"),
            a("cp2", "[fd00::9]:7443"),
        ]);
        let shown: Vec<String> = order.iter().map(|(_, x)| x.to_string()).collect();
        assert_eq!(
            shown,
            [
                "[fd00::1]:7443",
                "192.0.2.1:7443",
                "[fd00::2]:7443",
                "192.0.2.2:7443",
                "[fd00::3]:7443",
                "10.0.0.9:7443",
                "192.0.2.9:7443",
                "[fd00::9]:7443"
            ]
        );
    }
}
