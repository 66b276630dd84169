//! Socket reads and writes shared by the transports: reads that append to a buffer,
//! a streaming socket's [`Writer`] (sends that never wait, for the flush pass, and the
//! runtime's writes that wait for room), and one-off writes.

use std::io::{IoSlice, Read};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf};
use monoio::net::TcpStream;

use crate::session::Session;

/// Bytes read from a socket at a time.
pub const READ_CHUNK: usize = 4096;

/// A streaming transport's socket once its session runs, shared by the task that reads
/// it and the shard's flush pass that writes it. Both wait for readiness with the
/// runtime and move bytes with calls that never wait: an idle connection has one
/// readiness wait in flight and owns no buffer (reads go through the shard's one read
/// buffer, see `ShardState::read_buffer`).
#[derive(Clone)]
pub struct Socket(Rc<TcpStream>);

/// At most this many shared frames go into one send of the flush pass.
const SEND_IOVECS: usize = 64;

impl Socket {
    /// The socket of these halves (they must be of one socket: always so here).
    pub fn new(reader: OwnedReadHalf<TcpStream>, writer: OwnedWriteHalf<TcpStream>) -> Socket {
        let stream = reader
            .reunite(writer)
            .unwrap_or_else(|_| unreachable!("the halves of one socket"));
        let socket = Socket(Rc::new(stream));
        // From here on bytes move only by calls that must not wait (the runtime only
        // waits for readiness), so a spurious readiness cannot block the shard.
        socket.with_socket(|socket| {
            if let Err(error) = socket.set_nonblocking(true) {
                tracing::warn!("cannot make a socket non-blocking: {error}");
            }
        });
        socket
    }

    fn with_socket<T>(&self, act: impl FnOnce(socket2::SockRef<'_>) -> T) -> T {
        // SAFETY: the descriptor is the stream's, which `self` keeps open (it is closed
        // only when the last clone is dropped), and the borrow ends with this call.
        #[allow(unsafe_code)]
        let fd = unsafe { BorrowedFd::borrow_raw(self.0.as_raw_fd()) };
        act(socket2::SockRef::from(&fd))
    }

    /// Resolves when the socket has bytes to read (or its end, or an error).
    pub async fn readable(&self) -> std::io::Result<()> {
        self.0.readable(true).await
    }

    /// Resolves when the socket's send buffer has room.
    pub async fn writable(&self) -> std::io::Result<()> {
        self.0.writable(true).await
    }

    /// Reads what the socket has now into `buffer`, without waiting: `Some(0)` at the
    /// end of the stream, `None` when there is nothing to read yet.
    pub fn recv_now(&self, buffer: &mut [u8]) -> std::io::Result<Option<usize>> {
        self.with_socket(|socket| loop {
            // Non-blocking (set in `new`), so a plain read never waits.
            match (&*socket).read(buffer) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            }
        })
    }

    /// Sends what the socket takes now, without waiting: how many bytes (0 when its
    /// buffer is full).
    pub fn send_now(&self, bytes: &[u8]) -> std::io::Result<usize> {
        self.with_socket(|socket| retry_send(|| socket.send_with_flags(bytes, SEND_FLAGS)))
    }

    /// [`Socket::send_now`] for shared frames, in one vectored send (up to
    /// [`SEND_IOVECS`] frames).
    pub fn send_frames_now(&self, frames: &[Bytes]) -> std::io::Result<usize> {
        let mut slices = [IoSlice::new(&[]); SEND_IOVECS];
        let count = frames.len().min(SEND_IOVECS);
        for (slice, frame) in slices.iter_mut().zip(frames) {
            *slice = IoSlice::new(frame);
        }
        let slices = &slices[..count];
        self.with_socket(|socket| {
            retry_send(|| socket.send_vectored_with_flags(slices, SEND_FLAGS))
        })
    }

    /// Sends all of `bytes`, waiting for room as the reader makes it; each part sent
    /// counts as the reader's progress.
    pub async fn send_all(&self, bytes: &[u8], session: &Session) -> std::io::Result<()> {
        let mut sent = 0;
        while sent < bytes.len() {
            self.writable().await?;
            let n = self.send_now(&bytes[sent..])?;
            sent += n;
            session.wrote(n);
        }
        Ok(())
    }

    /// [`Socket::send_all`] for shared frames (a partly sent frame is advanced, not
    /// copied).
    pub async fn send_all_frames(
        &self,
        mut frames: Vec<Bytes>,
        session: &Session,
    ) -> std::io::Result<()> {
        while !frames.is_empty() {
            self.writable().await?;
            let n = self.send_frames_now(&frames)?;
            consume(&mut frames, n);
            session.wrote(n);
        }
        Ok(())
    }

    /// Says the server is done sending (the peer reads the end of the stream).
    pub fn shutdown(&self) {
        self.with_socket(|socket| {
            let _ = socket.shutdown(std::net::Shutdown::Write);
        });
    }
}

/// Drops the first `n` sent bytes of `frames`: whole frames, then the front of a partly
/// sent one (`Bytes::advance` moves a pointer, it copies nothing).
pub fn consume(frames: &mut Vec<Bytes>, mut n: usize) {
    let mut done = 0;
    for frame in frames.iter_mut() {
        if n >= frame.len() {
            n -= frame.len();
            done += 1;
        } else {
            frame.advance(n);
            break;
        }
    }
    frames.drain(..done);
}

/// A send that never waits, and never raises SIGPIPE on a socket the peer closed.
const SEND_FLAGS: libc::c_int = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;

/// A send retried while interrupted; a full socket buffer is 0 bytes sent.
fn retry_send(mut send: impl FnMut() -> std::io::Result<usize>) -> std::io::Result<usize> {
    loop {
        match send() {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(0),
            other => return other,
        }
    }
}

/// Writes bytes before the flush pass writes the socket (HTTP responses, the
/// handshake answer).
pub async fn write_now(
    socket: &mut impl AsyncWriteRent,
    bytes: impl Into<Bytes>,
) -> std::io::Result<()> {
    let bytes: Bytes = bytes.into();
    if !bytes.has_remaining() {
        return Ok(());
    }
    let (result, _) = socket.write_all(bytes).await;
    result.map(|_| ())
}

/// Reads more bytes into `buf`; `Ok(false)` at end of stream.
pub async fn read_more(
    reader: &mut OwnedReadHalf<TcpStream>,
    buf: &mut BytesMut,
) -> std::io::Result<bool> {
    read_up_to(reader, buf, READ_CHUNK).await.map(|n| n > 0)
}

/// Reads at most about `want` more bytes into `buf`; returns how many (0 at end of stream).
pub async fn read_up_to(
    reader: &mut OwnedReadHalf<TcpStream>,
    buf: &mut BytesMut,
    want: usize,
) -> std::io::Result<usize> {
    buf.reserve(want);
    // monoio reads into the start of a buffer; a slice over the spare capacity makes it
    // append after the bytes already there.
    let (start, end) = (buf.len(), buf.capacity());
    let spare = std::mem::take(buf).slice_mut(start..end);
    let (result, spare) = reader.read(spare).await;
    *buf = spare.into_inner();
    result
}

/// The shard's read buffer (`ShardState::read_buffer`): the most one read of a
/// streaming session takes (a busy publisher's messages are taken many at a time).
pub const MAX_READ_CHUNK: usize = 64 << 10;

/// After answering a request whose body is not read (413): says it is done sending,
/// then reads and drops what the client is still sending (up to `body_len` bytes, for
/// at most a few seconds) before closing. Closing with unread bytes would reset the
/// connection, and a reset can reach the client before it has read the answer.
pub async fn discard_then_close(
    reader: &mut OwnedReadHalf<TcpStream>,
    writer: &mut OwnedWriteHalf<TcpStream>,
    body_len: usize,
) {
    let _ = writer.shutdown().await;
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut sink = BytesMut::new();
    let mut discarded = 0;
    while discarded < body_len {
        let left = deadline.saturating_duration_since(Instant::now());
        match monoio::time::timeout(left, read_up_to(reader, &mut sink, READ_CHUNK)).await {
            Ok(Ok(n)) if n > 0 => {
                discarded += n;
                sink.clear();
            }
            _ => return,
        }
    }
}
