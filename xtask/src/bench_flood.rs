//! The abuse `bench-control` puts on the agent listener while it times pushes: from a
//! namespace of its own, with many source addresses, idle TCP connections, half-open TLS
//! handshakes and Watch calls with bad credentials, each reopened as soon as the control
//! plane closes it. Runs on its own thread (inside the namespace) until stopped.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wirefence_proto::v1;

/// How hard to flood.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Source addresses of the connection flood (already on the namespace's interface).
    pub sources: Vec<IpAddr>,
    /// Source addresses of the bad-credential Watch calls (their own, so the connection
    /// flood's refusals do not stop them).
    pub watch_sources: Vec<IpAddr>,
    /// Idle TCP connections kept open per source.
    pub idle_per_source: usize,
    /// Half-open TLS handshakes kept open per source.
    pub half_open_per_source: usize,
    /// Concurrent loops of bad-credential Watch calls (each on its own connection).
    pub watch_loops: usize,
    pub target: SocketAddr,
    /// CA of the listener's certificate and the name it is issued to.
    pub ca_file: PathBuf,
    pub domain: String,
}

/// What the flood did.
#[derive(Debug, Default)]
pub struct Counts {
    pub connections: AtomicU64,
    pub closed_by_server: AtomicU64,
    pub bad_watches: AtomicU64,
    /// Bad-credential Watch calls answered with anything but Unauthenticated.
    pub unexpected: AtomicU64,
}

pub struct Flood {
    stop: Arc<AtomicBool>,
    pub counts: Arc<Counts>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flood {
    /// Starts flooding from namespace `netns`.
    pub fn start(netns: &str, plan: Plan) -> Result<Flood> {
        let path = format!("/run/netns/{netns}");
        let file = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let (s, c) = (stop.clone(), counts.clone());
        let thread = std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            // SAFETY: setns on a valid namespace descriptor affects only this thread, whose
            // runtime then creates every socket of the flood in that namespace.
            assert_eq!(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns {path}");
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("flood runtime");
            rt.block_on(run(plan, s, c));
        });
        Ok(Flood { stop, counts, thread: Some(thread) })
    }

    pub fn stop(mut self) -> Arc<Counts> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.counts.clone()
    }
}

async fn run(plan: Plan, stop: Arc<AtomicBool>, counts: Arc<Counts>) {
    let mut tasks = tokio::task::JoinSet::new();
    for &source in &plan.sources {
        for i in 0..plan.idle_per_source + plan.half_open_per_source {
            let half_open = i >= plan.idle_per_source;
            let (stop, counts, target) = (stop.clone(), counts.clone(), plan.target);
            tasks.spawn(async move { hold(source, target, half_open, &stop, &counts).await });
        }
    }
    let tls = std::fs::read(&plan.ca_file).ok().map(|pem| {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(pem))
            .domain_name(plan.domain.clone())
    });
    for i in 0..plan.watch_loops {
        let source = plan.watch_sources[i % plan.watch_sources.len()];
        let (stop, counts, target, tls) = (stop.clone(), counts.clone(), plan.target, tls.clone());
        tasks.spawn(async move { bad_watches(source, target, tls, &stop, &counts).await });
    }
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tasks.abort_all();
}

/// Keeps one connection open that never completes a handshake; reopens it when closed.
async fn hold(source: IpAddr, target: SocketAddr, half_open: bool, stop: &AtomicBool, counts: &Counts) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(socket) = tokio::net::TcpSocket::new_v4() else { return };
        if socket.bind(SocketAddr::new(source, 0)).is_err() {
            return;
        }
        if let Ok(mut s) = socket.connect(target).await {
            counts.connections.fetch_add(1, Ordering::Relaxed);
            // A TLS record header announcing a ClientHello that never comes.
            if !half_open || s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await.is_ok() {
                let mut buf = [0u8; 256];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                counts.closed_by_server.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Come back at once, as an attacker would, but without spinning on refusals.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Watch calls with a well-formed but unknown credential, back to back.
async fn bad_watches(
    source: IpAddr,
    target: SocketAddr,
    tls: Option<tonic::transport::ClientTlsConfig>,
    stop: &AtomicBool,
    counts: &Counts,
) {
    let bad = format!("n{:016x}.{}", rand::random::<u64>(), "A".repeat(43));
    while !stop.load(Ordering::Relaxed) {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let Ok(mut endpoint) = tonic::transport::Endpoint::from_shared(format!("{scheme}://{target}")) else { return };
        endpoint = endpoint.local_address(Some(source)).connect_timeout(Duration::from_secs(2));
        if let Some(tls) = &tls {
            let Ok(e) = endpoint.tls_config(tls.clone()) else { return };
            endpoint = e;
        }
        let Ok(channel) = endpoint.connect().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let mut client = v1::agent_service_client::AgentServiceClient::new(channel);
        while !stop.load(Ordering::Relaxed) {
            let mut req = tonic::Request::new(v1::WatchRequest::default());
            req.metadata_mut().insert("authorization", format!("Bearer {bad}").parse().expect("ascii"));
            match client.watch(req).await {
                Err(s) if s.code() == tonic::Code::Unauthenticated => {
                    counts.bad_watches.fetch_add(1, Ordering::Relaxed);
                }
                Err(s) if s.code() == tonic::Code::Unavailable || s.code() == tonic::Code::Unknown => break,
                _ => {
                    counts.unexpected.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}
