//! What a plaintext connection's server said first. An HTTP/2 server opens with a SETTINGS
//! frame; a TLS server answers the HTTP/2 preface with a TLS alert record. Without this the
//! agent would only see the HTTP/2 layer fail (`connection closed`, a frame size error),
//! which does not say that the two ends disagree about TLS.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

/// The server's first answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirstAnswer {
    /// A TLS record (alert or handshake).
    Tls,
    /// Anything else: HTTP/2 or something to let the HTTP/2 layer judge.
    Other,
    /// The connection ended (or failed) before the server sent a byte.
    Closed,
}

impl FirstAnswer {
    /// A TLS record starts with its content type (20..=23: change cipher spec, alert,
    /// handshake, application data) and the major version 3.
    pub fn of(bytes: &[u8]) -> FirstAnswer {
        match bytes {
            [] => FirstAnswer::Closed,
            [0x14..=0x17] | [0x14..=0x17, 0x03, ..] => FirstAnswer::Tls,
            _ => FirstAnswer::Other,
        }
    }
}

/// A stream that reports the first bytes it reads, once; everything passes unchanged.
pub struct Sniff<T> {
    inner: T,
    first: Option<oneshot::Sender<FirstAnswer>>,
}

impl<T> Sniff<T> {
    pub fn new(inner: T) -> (Sniff<T>, oneshot::Receiver<FirstAnswer>) {
        let (tx, rx) = oneshot::channel();
        (Sniff { inner, first: Some(tx) }, rx)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Sniff<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(r) = &result {
            if let Some(tx) = this.first.take() {
                let answer = match r {
                    Ok(()) => FirstAnswer::of(&buf.filled()[before..]),
                    Err(_) => FirstAnswer::Closed,
                };
                let _ = tx.send(answer);
            }
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Sniff<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn tls_records_and_http2_frames_are_told_apart() {
        // rustls' answer to a plaintext HTTP/2 preface: a fatal decode_error alert.
        assert_eq!(FirstAnswer::of(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x32]), FirstAnswer::Tls);
        assert_eq!(FirstAnswer::of(&[0x16, 0x03, 0x01]), FirstAnswer::Tls);
        assert_eq!(FirstAnswer::of(&[0x15]), FirstAnswer::Tls);
        // An HTTP/2 server's SETTINGS frame: a 24-bit length, then type 4.
        assert_eq!(FirstAnswer::of(&[0x00, 0x00, 0x12, 0x04, 0x00]), FirstAnswer::Other);
        assert_eq!(FirstAnswer::of(b"HTTP/1.1 400 Bad Request"), FirstAnswer::Other);
        assert_eq!(FirstAnswer::of(&[0x15, 0x00]), FirstAnswer::Other);
        assert_eq!(FirstAnswer::of(&[]), FirstAnswer::Closed);
    }

    #[tokio::test]
    async fn the_first_read_is_reported_and_passed_on() {
        let (client, mut server) = tokio::io::duplex(64);
        let (mut sniff, first) = Sniff::new(client);
        server.write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x32]).await.unwrap();
        let mut got = [0u8; 7];
        sniff.read_exact(&mut got).await.unwrap();
        assert_eq!(got[0], 0x15);
        assert_eq!(first.await.unwrap(), FirstAnswer::Tls);

        let (client, server) = tokio::io::duplex(64);
        let (mut sniff, first) = Sniff::new(client);
        drop(server);
        assert_eq!(sniff.read(&mut [0u8; 4]).await.unwrap(), 0);
        assert_eq!(first.await.unwrap(), FirstAnswer::Closed);
    }
}
