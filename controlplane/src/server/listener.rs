//! The agent listener's accept loop, owned here rather than by tonic so that nothing a
//! client can do before it speaks HTTP/2 is unbounded: each accepted TCP connection takes
//! a slot of its source (and of the total) or is closed at once, and must finish its TLS
//! handshake (plaintext: send its first byte) within the handshake timeout. Handshakes run
//! in their own tasks, so a silent client never delays the next accept. Connections that
//! pass are handed to tonic through a channel, still holding their slot until closed.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::limits::Limits;
use crate::registry::lock;

use super::ServerTls;

/// The unit a source is counted by: an IPv4 address, or an IPv6 /64 (one host usually
/// owns a whole /64, so counting its addresses singly would cap nothing).
fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

/// Open connections per source and in total.
#[derive(Debug)]
pub struct Caps {
    per_source: usize,
    total: usize,
    open: Mutex<(HashMap<IpAddr, usize>, usize)>,
}

impl Caps {
    pub fn new(per_source: usize, total: usize) -> Arc<Caps> {
        Arc::new(Caps { per_source, total, open: Mutex::new((HashMap::new(), 0)) })
    }

    /// A slot for a connection from `ip`, or `None` when its source or the total is full.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let source = source_of(ip);
        let mut open = lock(&self.open);
        let (by_source, total) = &mut *open;
        let n = by_source.entry(source).or_default();
        if *n >= self.per_source || *total >= self.total {
            if *n == 0 {
                by_source.remove(&source);
            }
            return None;
        }
        *n += 1;
        *total += 1;
        Some(Slot { caps: self.clone(), source })
    }
}

/// One counted connection; frees its slot when dropped (with the connection).
#[derive(Debug)]
pub struct Slot {
    caps: Arc<Caps>,
    source: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = lock(&self.caps.open);
        let (by_source, total) = &mut *open;
        *total = total.saturating_sub(1);
        if let Some(n) = by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                by_source.remove(&self.source);
            }
        }
    }
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An accepted connection as tonic sees it.
pub struct Accepted {
    io: Io,
    info: TcpConnectInfo,
    _slot: Slot,
}

impl Connected for Accepted {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

macro_rules! delegate {
    ($self:ident, $io:ident => $e:expr) => {
        match &mut $self.get_mut().io {
            Io::Plain($io) => {
                let $io = Pin::new($io);
                $e
            }
            Io::Tls($io) => {
                let $io = Pin::new($io.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for Accepted {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_read(cx, buf))
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        delegate!(self, io => io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, io => io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(io) => io.is_write_vectored(),
            Io::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_shutdown(cx))
    }
}

/// TLS handshake, or (plaintext) the first byte, within `timeout`.
async fn handshake(tcp: TcpStream, tls: Option<TlsAcceptor>, timeout: Duration) -> io::Result<Io> {
    let done = async {
        match tls {
            Some(acceptor) => Ok(Io::Tls(Box::new(acceptor.accept(tcp).await?))),
            None => {
                // Readiness alone may be spurious: wait for a byte that is really there.
                if tcp.peek(&mut [0u8; 1]).await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                Ok(Io::Plain(tcp))
            }
        }
    };
    tokio::time::timeout(timeout, done)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))?
}

/// Accepts on `listener` until the returned stream is dropped (tonic stopped serving).
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    limits: &Limits,
) -> ReceiverStream<io::Result<Accepted>> {
    let caps = Caps::new(limits.max_connections_per_source, limits.max_connections);
    let timeout = limits.handshake_timeout;
    // Small: a connection waits here only until tonic picks it up.
    let (tx, rx) = mpsc::channel(16);
    let local = listener.local_addr().ok();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = tx.closed() => break,
                a = listener.accept() => a,
            };
            let (tcp, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(slot) = caps.admit(remote.ip()) else {
                tracing::debug!(%remote, "connection refused: too many from its source or in total");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            // The certificate current at accept time (a reload changes it for later ones).
            let (tx, tls) = (tx.clone(), tls.as_ref().map(|t| t.acceptor()));
            tokio::spawn(async move {
                match handshake(tcp, tls, timeout).await {
                    Ok(io) => {
                        let info = TcpConnectInfo { local_addr: local, remote_addr: Some(remote) };
                        let _ = tx.send(Ok(Accepted { io, info, _slot: slot })).await;
                    }
                    Err(e) => tracing::debug!(%remote, error = %e, "handshake failed"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_counted_per_ipv4_address_and_ipv6_64() {
        let caps = Caps::new(2, 5);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let a = [caps.admit(ip("192.0.2.1")), caps.admit(ip("::ffff:192.0.2.1"))];
        assert!(a.iter().all(Option::is_some));
        assert!(caps.admit(ip("192.0.2.1")).is_none(), "third from one IPv4 address");
        let b = [caps.admit(ip("2001:db8::1")), caps.admit(ip("2001:db8::2"))];
        assert!(b.iter().all(Option::is_some));
        assert!(caps.admit(ip("2001:db8::ffff:1")).is_none(), "third from one /64");
        let c = caps.admit(ip("2001:db8:0:1::1"));
        assert!(c.is_some());
        assert!(caps.admit(ip("198.51.100.1")).is_none(), "total reached");
        drop(a);
        assert!(caps.admit(ip("192.0.2.1")).is_some(), "slots come back when connections close");
        assert_eq!(lock(&caps.open).0.get(&ip("192.0.2.1")), None, "no entry left for a source without connections");
    }
}
