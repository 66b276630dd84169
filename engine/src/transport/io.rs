//! Socket reads and writes shared by the transports: reads that append to a buffer,
//! a streaming socket's [`Writer`] (sends that never wait, for the flush pass, and the
//! runtime's writes that wait for room), and one-off writes.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use monoio::buf::{IoBuf, IoBufMut};
use monoio::io::{
    AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Splitable,
};
use monoio::net::TcpStream;

use crate::session::Session;

/// Bytes read from a socket at a time.
pub const READ_CHUNK: usize = 4096;

/// At most this many frames go into one vectored write (the kernel's IOV_MAX is 1024).
const MAX_IOVECS: usize = 512;

/// The write side of a streaming transport's socket: its half for the runtime's
/// asynchronous writes, and its descriptor for the flush pass's sends that never wait.
pub struct Writer {
    half: OwnedWriteHalf<TcpStream>,
    fd: RawFd,
}

/// At most this many shared frames go into one send of the flush pass.
const SEND_IOVECS: usize = 64;

impl Writer {
    /// Splits a socket's halves into its read half and a [`Writer`].
    pub fn new(
        reader: OwnedReadHalf<TcpStream>,
        half: OwnedWriteHalf<TcpStream>,
    ) -> (OwnedReadHalf<TcpStream>, Writer) {
        // The halves of one socket always reunite; the whole stream tells its descriptor.
        let stream = reader
            .reunite(half)
            .unwrap_or_else(|_| unreachable!("the halves of one socket"));
        let fd = stream.as_raw_fd();
        let (reader, half) = stream.into_split();
        (reader, Writer { half, fd })
    }

    /// For the runtime's writes (answers before the session's frames, slow receivers).
    pub fn half(&mut self) -> &mut OwnedWriteHalf<TcpStream> {
        &mut self.half
    }

    fn with_socket<T>(&self, act: impl FnOnce(socket2::SockRef<'_>) -> T) -> T {
        // SAFETY: `fd` is the descriptor of the socket `half` keeps open (the halves
        // share one stream, closed only when both are dropped), and the borrow ends
        // with this call, while `self` still holds `half`.
        #[allow(unsafe_code)]
        let fd = unsafe { BorrowedFd::borrow_raw(self.fd) };
        act(socket2::SockRef::from(&fd))
    }

    /// Sends what the socket takes now, without waiting: how many bytes (0 when its
    /// buffer is full). A plain send costs what an io_uring send costs per delivery
    /// (measured, docs/architecture.md) and leaves no completion to reap.
    pub fn send_now(&self, bytes: &[u8]) -> std::io::Result<usize> {
        self.with_socket(|socket| retry_send(|| socket.send_with_flags(bytes, SEND_FLAGS)))
    }

    /// [`Writer::send_now`] for shared frames, in one vectored send (up to
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

    /// Says the server is done sending (the peer reads the end of the stream).
    pub fn shutdown(&self) {
        self.with_socket(|socket| {
            let _ = socket.shutdown(std::net::Shutdown::Write);
        });
    }
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

/// Frames for vectored writes: the iovecs point into the frames' own memory, so
/// shared broadcast frames go to the socket without a copy. At most [`MAX_IOVECS`]
/// frames go into one write; the rest follow in the next.
#[derive(Default)]
pub struct FrameBatch {
    frames: Vec<Bytes>,
    iovecs: Vec<libc::iovec>,
}

impl FrameBatch {
    pub fn new(frames: Vec<Bytes>) -> FrameBatch {
        let mut batch = FrameBatch::default();
        batch.set(frames);
        batch
    }

    fn set(&mut self, frames: Vec<Bytes>) {
        self.iovecs.clear();
        self.iovecs
            .extend(frames.iter().take(MAX_IOVECS).map(|f| libc::iovec {
                iov_base: f.as_ptr() as *mut libc::c_void,
                iov_len: f.len(),
            }));
        self.frames = frames;
    }

    /// Drops the first `n` written bytes: whole frames, then the front of a partly
    /// written one (`Bytes::advance` moves a pointer, it copies nothing).
    pub fn consume(&mut self, mut n: usize) {
        let mut done = 0;
        for frame in &mut self.frames {
            if n >= frame.len() {
                n -= frame.len();
                done += 1;
            } else {
                frame.advance(n);
                break;
            }
        }
        self.frames.drain(..done);
        let frames = std::mem::take(&mut self.frames);
        self.set(frames);
    }

    fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

/// Writes the whole batch with as few `writev` calls as the socket allows (monoio's
/// `write_vectored_all` allocates a copy of the iovec array on every call; this
/// reuses the batch's own). Each partial write counts as the reader's progress.
pub async fn write_all(
    socket: &mut OwnedWriteHalf<TcpStream>,
    mut batch: FrameBatch,
    session: &Session,
) -> (std::io::Result<()>, FrameBatch) {
    while !batch.is_empty() {
        let (result, returned) = socket.writev(batch).await;
        batch = returned;
        match result {
            Ok(0) => return (Err(std::io::ErrorKind::WriteZero.into()), batch),
            Ok(n) => {
                batch.consume(n);
                session.wrote(n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return (Err(e), batch),
        }
    }
    (Ok(()), batch)
}

// SAFETY: the iovecs point into `frames`, which the batch owns and does not change
// while the runtime holds it (Bytes' memory never moves, the Vecs are not touched
// between `set` and the end of the write), and `iovecs.len()` iovecs are initialized.
// Measured reason: one send costs ~5 µs on loopback, copying frames into one buffer
// instead would copy every broadcast frame once per recipient.
#[allow(unsafe_code)]
unsafe impl monoio::buf::IoVecBuf for FrameBatch {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iovecs.as_ptr()
    }

    fn read_iovec_len(&self) -> usize {
        self.iovecs.len()
    }
}

/// Writes a session's send buffer whole; each partial write (the kernel takes what the
/// reader made room for) counts as the reader's progress.
pub async fn write_copied(
    socket: &mut OwnedWriteHalf<TcpStream>,
    mut buffer: Vec<u8>,
    session: &Session,
) -> (std::io::Result<()>, Vec<u8>) {
    let mut offset = 0;
    while offset < buffer.len() {
        let (result, slice) = socket.write(buffer.slice(offset..)).await;
        buffer = slice.into_inner();
        match result {
            Ok(0) => return (Err(std::io::ErrorKind::WriteZero.into()), buffer),
            Ok(n) => {
                offset += n;
                session.wrote(n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return (Err(e), buffer),
        }
    }
    (Ok(()), buffer)
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

/// How much a WebSocket session asks of one read: it starts at [`MIN_READ_CHUNK`] (an
/// idle connection keeps a small buffer) and doubles while reads come back full, so a
/// busy publisher's messages are taken many at a time and the writers they wake flush
/// once for all of them instead of once per message.
#[derive(Clone, Copy)]
pub struct ReadSize(pub usize);

/// The most one session read asks for.
pub const MAX_READ_CHUNK: usize = 64 << 10;
/// The least: what an idle connection's pending read holds (with the reader's task and
/// the session, the largest parts of an idle connection's memory).
pub const MIN_READ_CHUNK: usize = 256;

impl ReadSize {
    pub fn adapt(&mut self, got: usize) {
        self.0 = if got >= self.0 {
            (self.0 * 2).min(MAX_READ_CHUNK)
        } else if got < self.0 / 4 {
            (self.0 / 2).max(MIN_READ_CHUNK)
        } else {
            self.0
        };
    }
}

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
