//! Socket reads and writes shared by the transports: reads that append to a buffer,
//! the writer that flushes a session's queue in one write per turn, and one-off writes.

use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use monoio::buf::{IoBuf, IoBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf};
use monoio::net::TcpStream;

use crate::session::Session;

/// Bytes read from a socket at a time.
pub const READ_CHUNK: usize = 4096;

/// At most this many frames go into one vectored write (the kernel's IOV_MAX is 1024).
const MAX_IOVECS: usize = 512;

/// The writer task of a session on a socket: one write per turn with everything
/// queued, until the session closes or the socket fails.
pub async fn write_loop(session: Rc<Session>, mut socket: OwnedWriteHalf<TcpStream>) {
    let mut batch = FrameBatch::default();
    let mut copied = Vec::new();
    let transport = session.transport_signal();
    let stop = transport.watch();
    loop {
        let mut frames = std::mem::take(&mut batch.frames);
        frames.clear();
        // Ends when the session is done or stopped (`stop_now` wakes it).
        let Some(taken) = session.next_batch(&mut copied, &mut frames).await else {
            break;
        };
        let result = if frames.is_empty() {
            let write = write_copied(&mut socket, std::mem::take(&mut copied), &session);
            stop.run(write).await.map(|(result, buffer)| {
                copied = buffer;
                session.recycle_send_buffer(&mut copied);
                result
            })
        } else {
            batch.set(frames);
            // Boxed: frames over COPY_MAX are the rare case, and an unboxed second
            // kind of write would make every session's writer task larger.
            let write = Box::pin(write_all(&mut socket, std::mem::take(&mut batch), &session));
            stop.run(write).await.map(|(result, written)| {
                batch = written;
                result
            })
        };
        match result {
            Some(Ok(())) => {}
            Some(Err(_)) | None => break,
        }
        session.sent(taken);
    }
    let _ = socket.shutdown().await;
    session.transport_failed();
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
    fn consume(&mut self, mut n: usize) {
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
async fn write_all(
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
async fn write_copied(
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

/// Writes bytes before the writer task exists (HTTP responses, the handshake answer).
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
/// The least: what an idle connection's pending read holds (with the reader's and the
/// writer's tasks, the largest parts of an idle connection's memory).
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
