//! Writes of a plaintext HTTP/2 server connection gathered into one `write` per poll of
//! its task.
//!
//! h2 writes a DATA frame of 256 bytes or more from the body's own buffer (a vectored
//! write of the frame head and the payload) and must flush it before it takes the next
//! frame, so every response of a few KiB cost its own write syscall even when ten of them
//! were ready in the same turn: 20,064 writes for 20,000 h2c responses, where HAProxy,
//! which sends once per event-loop turn, made ~2,500. [`BatchedWrites`] takes h2's writes
//! into a buffer instead, and [`SendAfterPoll`] sends that buffer once the connection's
//! poll is over: the turn's frames leave in one write, and nothing waits for a later
//! turn (an earlier attempt that deferred the flush to the back of the run queue made the
//! task poll again per batch and measured slower).
//!
//! Bounded: past [`MAX_PENDING`] bytes a write first sends what is gathered, and a write
//! of [`DIRECT_WRITE`] bytes or more with nothing gathered goes straight to the socket, so
//! large bodies are not copied.

use std::{
    future::Future,
    io::{self, IoSlice},
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{ready, Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpStream,
    },
};

/// Gathered bytes beyond which a write sends them first.
const MAX_PENDING: usize = 64 * 1024;
/// A write at least this large, with nothing gathered, goes to the socket uncopied.
const DIRECT_WRITE: usize = 16 * 1024;
/// Capacity the buffer keeps between turns; more is released after a large turn.
const KEPT_CAPACITY: usize = 16 * 1024;

/// A TCP stream whose writes are gathered until [`Sender::poll_send`] sends them; its
/// flush only says the bytes are taken, so whoever polls the connection must send them
/// after each poll ([`SendAfterPoll`]).
pub struct BatchedWrites {
    read: OwnedReadHalf,
    write: Arc<Mutex<WriteSide>>,
}

/// Sends what a [`BatchedWrites`] gathered.
pub struct Sender {
    write: Arc<Mutex<WriteSide>>,
}

struct WriteSide {
    socket: OwnedWriteHalf,
    pending: Vec<u8>,
    /// How much of `pending` the socket has taken.
    sent: usize,
    /// The error a send met: the connection is broken, later writes report it.
    failed: Option<io::ErrorKind>,
}

impl BatchedWrites {
    pub fn new(stream: TcpStream) -> (BatchedWrites, Sender) {
        let (read, socket) = stream.into_split();
        let write = Arc::new(Mutex::new(WriteSide { socket, pending: Vec::new(), sent: 0, failed: None }));
        (BatchedWrites { read, write: write.clone() }, Sender { write })
    }

    fn write_side(&self) -> MutexGuard<'_, WriteSide> {
        lock(&self.write)
    }
}

/// Only the connection's own task touches the write side; a poisoned lock means a panic
/// mid-write, after which the bytes are what they are.
fn lock(write: &Mutex<WriteSide>) -> MutexGuard<'_, WriteSide> {
    write.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Sender {
    /// Sends everything gathered; `Pending` (with the task registered for writability)
    /// while the socket cannot take it all.
    pub fn poll_send(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        lock(&self.write).poll_send(cx)
    }
}

impl WriteSide {
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(kind) = self.failed {
            return Poll::Ready(Err(kind.into()));
        }
        while self.sent < self.pending.len() {
            match ready!(Pin::new(&mut self.socket).poll_write(cx, &self.pending[self.sent..])) {
                Ok(0) => return Poll::Ready(Err(self.fail(io::ErrorKind::WriteZero.into()))),
                Ok(n) => self.sent += n,
                Err(error) => return Poll::Ready(Err(self.fail(error))),
            }
        }
        self.pending.clear();
        self.sent = 0;
        if self.pending.capacity() > KEPT_CAPACITY {
            self.pending.shrink_to(KEPT_CAPACITY);
        }
        Poll::Ready(Ok(()))
    }

    fn fail(&mut self, error: io::Error) -> io::Error {
        self.failed = Some(error.kind());
        self.pending = Vec::new();
        self.sent = 0;
        error
    }

    /// Takes `total` bytes from `bufs`: gathered, sent first if too much is gathered, or
    /// written straight through when large and nothing waits before them.
    fn poll_take(&mut self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>], total: usize) -> Poll<io::Result<usize>> {
        if let Some(kind) = self.failed {
            return Poll::Ready(Err(kind.into()));
        }
        if !self.pending.is_empty() && self.pending.len() + total > MAX_PENDING {
            ready!(self.poll_send(cx))?;
        }
        if self.pending.is_empty() && total >= DIRECT_WRITE {
            return Pin::new(&mut self.socket).poll_write_vectored(cx, bufs);
        }
        self.pending.reserve(total);
        for buf in bufs {
            self.pending.extend_from_slice(buf);
        }
        Poll::Ready(Ok(total))
    }
}

impl AsyncRead for BatchedWrites {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl AsyncWrite for BatchedWrites {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.write_side().poll_take(cx, &[IoSlice::new(buf)], buf.len())
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total = bufs.iter().map(|buf| buf.len()).sum();
        self.write_side().poll_take(cx, bufs, total)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// The bytes are taken; [`SendAfterPoll`] sends them when the connection's poll ends.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.write_side().failed {
            Some(kind) => Poll::Ready(Err(kind.into())),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut side = self.write_side();
        ready!(side.poll_send(cx))?;
        Pin::new(&mut side.socket).poll_shutdown(cx)
    }
}

pin_project_lite::pin_project! {
    /// Polls `connection`, then sends what its poll wrote through a [`BatchedWrites`].
    pub struct SendAfterPoll<C: Future> {
        #[pin]
        connection: C,
        sender: Sender,
        ended: Option<C::Output>,
    }
}

impl<C: Future> SendAfterPoll<C> {
    pub fn new(connection: C, sender: Sender) -> Self {
        SendAfterPoll { connection, sender, ended: None }
    }

    pub fn connection(self: Pin<&mut Self>) -> Pin<&mut C> {
        self.project().connection
    }
}

impl<C: Future> Future for SendAfterPoll<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = self.project();
        if this.ended.is_none() {
            if let Poll::Ready(output) = this.connection.poll(cx) {
                *this.ended = Some(output);
            }
        }
        // A send that fails leaves the error for the connection's next write, and the
        // broken socket wakes its next read: the connection ends through its own path.
        if this.sender.poll_send(cx).is_ready() {
            if let Some(output) = this.ended.take() {
                return Poll::Ready(output);
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    /// Writes inside one poll reach the peer only when that poll has ended, and then
    /// together; a large write passes through; the read side is untouched.
    #[tokio::test]
    async fn writes_of_one_poll_leave_together_after_it() {
        let (mut peer, server) = pair().await;
        let (mut io, sender) = BatchedWrites::new(server);
        let connection = async move {
            io.write_all(b"first ").await.unwrap();
            io.write_all(b"second").await.unwrap();
            io.flush().await.unwrap();
            let mut got = [0u8; 4];
            io.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"ping");
            io.write_all(&vec![7u8; DIRECT_WRITE * 4]).await.unwrap();
            io.shutdown().await.unwrap();
        };
        let driven = tokio::spawn(SendAfterPoll::new(connection, sender));
        let mut first = [0u8; 12];
        peer.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"first second");
        peer.write_all(b"ping").await.unwrap();
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest.len(), DIRECT_WRITE * 4);
        assert!(rest.iter().all(|&byte| byte == 7));
        driven.await.unwrap();
    }

    /// Nothing gathered is sent while the connection's poll is still under way.
    #[tokio::test]
    async fn a_flush_inside_the_poll_sends_nothing_yet() {
        let (mut peer, server) = pair().await;
        let (mut io, sender) = BatchedWrites::new(server);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(matches!(Pin::new(&mut io).poll_write(&mut cx, b"held"), Poll::Ready(Ok(4))));
        assert!(matches!(Pin::new(&mut io).poll_flush(&mut cx), Poll::Ready(Ok(()))));
        let mut got = [0u8; 4];
        let early = tokio::time::timeout(std::time::Duration::from_millis(50), peer.read(&mut got)).await;
        assert!(early.is_err(), "bytes left before the poll ended");
        assert!(sender.poll_send(&mut cx).is_ready());
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"held");
    }
}
