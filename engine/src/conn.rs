//! One connection's state on its shard: the bounded outbound queue, the writer task
//! that flushes it in one write per turn, and the signal that ends it.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use hashbrown::HashSet;
use monoio::io::{AsyncWriteRent, AsyncWriteRentExt, OwnedWriteHalf};
use monoio::net::TcpStream;
use ringhub_protocol::hub::Close;
use ringhub_protocol::ws::{self, close_code};
use ringhub_protocol::{frame, HubMessage, HubProtocol};

use crate::hub::Caller;
use crate::metrics::ShardMetrics;

/// The error sentence of a slow-consumer close (contract section 6).
pub const SLOW_CONSUMER: &str = "Connection closed: client too slow.";

/// How long a closing connection may take to flush its last frames.
pub const CLOSE_GRACE: Duration = Duration::from_secs(3);

/// At most this many frames go into one vectored write (the kernel's IOV_MAX is 1024).
const MAX_IOVECS: usize = 512;

/// Frames up to this size are copied into the connection's send buffer; larger ones are
/// queued by reference. Measured with `ringhub-bench` fanout-1k (frames of ~150 bytes):
/// copying beat a shared reference plus a vectored write, which costs an atomic
/// increment and decrement per recipient and, in the kernel, an iovec import per send.
/// A memcpy of a few hundred bytes costs less than either.
const COPY_MAX: usize = 1024;

/// A writer keeps a send buffer of at most this capacity between bursts.
const KEEP_SEND_BUFFER: usize = 16 << 10;

/// A one-shot, shard-local event several tasks can wait for.
#[derive(Clone, Default)]
pub struct Signal(Rc<SignalInner>);

#[derive(Default)]
struct SignalInner {
    fired: Cell<bool>,
    waiters: RefCell<Vec<Waker>>,
}

impl Signal {
    pub fn fire(&self) {
        if !self.0.fired.replace(true) {
            for waker in self.0.waiters.borrow_mut().drain(..) {
                waker.wake();
            }
        }
    }

    pub fn is_fired(&self) -> bool {
        self.0.fired.get()
    }

    pub async fn fired(&self) {
        std::future::poll_fn(|cx| {
            if self.0.fired.get() {
                return Poll::Ready(());
            }
            self.register(cx.waker());
            Poll::Pending
        })
        .await
    }

    fn register(&self, waker: &Waker) {
        let mut waiters = self.0.waiters.borrow_mut();
        if !waiters.iter().any(|w| w.will_wake(waker)) {
            waiters.push(waker.clone());
        }
    }

    /// For a task that runs many operations, each to be abandoned if the signal fires
    /// (a connection's reader and writer, once per read or write).
    pub fn watch(&self) -> SignalWatch<'_> {
        SignalWatch {
            signal: self,
            registered: RefCell::new(None),
        }
    }
}

/// Runs operations unless a [`Signal`] fires first. It registers the task with the
/// signal once and afterwards only compares wakers: registering on every operation
/// (what `select!` with [`Signal::fired`] does) cost 6 % of a shard's time with
/// 10,000 connections, mostly cache misses on the signal's waiter list.
pub struct SignalWatch<'a> {
    signal: &'a Signal,
    registered: RefCell<Option<Waker>>,
}

impl SignalWatch<'_> {
    /// `work`'s output, or `None` if the signal fired first (`work` is then dropped).
    pub async fn run<F: std::future::Future>(&self, work: F) -> Option<F::Output> {
        let mut work = std::pin::pin!(work);
        std::future::poll_fn(|cx| {
            if self.signal.is_fired() {
                return Poll::Ready(None);
            }
            if let Poll::Ready(output) = work.as_mut().poll(cx) {
                return Poll::Ready(Some(output));
            }
            let mut registered = self.registered.borrow_mut();
            if !registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                self.signal.register(cx.waker());
                *registered = Some(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }
}

struct Outbox {
    /// Frames too large to copy (shared with every other recipient) and sealed runs of
    /// copied small frames, oldest first; `tail` comes after all of them.
    frames: VecDeque<Bytes>,
    /// Small frames, copied one after another: the usual batch is this one buffer, sent
    /// with a plain send (no iovec array for the kernel to import, no reference count
    /// taken and dropped per recipient).
    tail: Vec<u8>,
    /// Frames queued (the deliveries the next write makes).
    frame_count: u64,
    bytes: usize,
    /// Set once the connection is ending: nothing more is queued, what is queued is
    /// flushed, then the connection stops.
    closing_since: Option<Instant>,
}

impl Outbox {
    /// Moves the copied small frames into `frames`, so a large frame can follow them.
    fn seal_tail(&mut self) {
        if !self.tail.is_empty() {
            self.frames
                .push_back(Bytes::from(std::mem::take(&mut self.tail)));
        }
    }
}

/// A connection after its handshake.
pub struct Conn {
    pub key: u64,
    pub caller: Rc<Caller>,
    pub protocol: HubProtocol,
    pub groups: RefCell<HashSet<String>>,
    /// Groups whose presence this connection watches.
    pub watching: RefCell<HashSet<String>>,
    outbox: RefCell<Outbox>,
    writer: RefCell<Option<Waker>>,
    pub last_received: Cell<Instant>,
    pub last_sent: Cell<Instant>,
    /// Ends reader and writer at once, whatever they are doing.
    pub stop: Signal,
    max_buffered_bytes: usize,
    metrics: Rc<MetricsRef>,
}

/// A shard's metrics block, reachable from its connections.
pub struct MetricsRef(pub std::sync::Arc<crate::metrics::Metrics>, pub usize);

impl MetricsRef {
    pub fn get(&self) -> &ShardMetrics {
        &self.0.shards[self.1]
    }
}

impl Conn {
    pub fn new(
        key: u64,
        caller: Rc<Caller>,
        protocol: HubProtocol,
        max_buffered_bytes: usize,
        metrics: Rc<MetricsRef>,
    ) -> Conn {
        let now = Instant::now();
        Conn {
            key,
            caller,
            protocol,
            groups: RefCell::default(),
            watching: RefCell::default(),
            outbox: RefCell::new(Outbox {
                frames: VecDeque::new(),
                tail: Vec::new(),
                frame_count: 0,
                bytes: 0,
                closing_since: None,
            }),
            writer: RefCell::new(None),
            last_received: Cell::new(now),
            last_sent: Cell::new(now),
            stop: Signal::default(),
            max_buffered_bytes,
            metrics,
        }
    }

    /// Queues a frame. Returns false if it was not queued: the connection is closing,
    /// or it just fell too far behind and is being closed as a slow consumer.
    pub fn enqueue(&self, frame: &Bytes) -> bool {
        let mut outbox = self.outbox.borrow_mut();
        if outbox.closing_since.is_some() {
            return false;
        }
        if outbox.bytes + frame.len() > self.max_buffered_bytes {
            drop(outbox);
            ShardMetrics::add(&self.metrics.get().slow_consumer_closes, 1);
            tracing::info!(connection = %self.caller.connection_id, "closing a slow consumer");
            self.close(Some(SLOW_CONSUMER), false);
            return false;
        }
        outbox.bytes += frame.len();
        outbox.frame_count += 1;
        if frame.len() <= COPY_MAX {
            outbox.tail.extend_from_slice(frame);
        } else {
            outbox.seal_tail();
            outbox.frames.push_back(frame.clone());
        }
        drop(outbox);
        self.wake_writer();
        true
    }

    /// Ends the connection: drops what is still queued, sends a Close message and a
    /// WebSocket close frame, then stops. A no-op if it is already closing.
    pub fn close(&self, error: Option<&str>, allow_reconnect: bool) {
        let mut outbox = self.outbox.borrow_mut();
        if outbox.closing_since.is_some() {
            return;
        }
        outbox.closing_since = Some(Instant::now());
        outbox.frames.clear();
        outbox.tail.clear();
        let close = HubMessage::Close(Close {
            error: error.map(str::to_owned),
            allow_reconnect,
        });
        outbox
            .frames
            .push_back(frame::encode_message(self.protocol, &close));
        outbox
            .frames
            .push_back(ws::encode_close(close_code::NORMAL, ""));
        outbox.bytes = outbox.frames.iter().map(Bytes::len).sum();
        outbox.frame_count = outbox.frames.len() as u64;
        drop(outbox);
        self.wake_writer();
    }

    /// When the connection started closing, if it is.
    pub fn closing_since(&self) -> Option<Instant> {
        self.outbox.borrow().closing_since
    }

    pub fn queued_bytes(&self) -> usize {
        self.outbox.borrow().bytes
    }

    fn wake_writer(&self) {
        let waker = self.writer.borrow_mut().take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Takes everything queued: into `copied` when only small frames are queued (the
    /// usual case), otherwise into `batch` (the copied ones sealed in order between the
    /// shared ones). Waits while nothing is queued; `None` when the connection is done.
    async fn next_batch(&self, copied: &mut Vec<u8>, batch: &mut Vec<Bytes>) -> Option<Taken> {
        std::future::poll_fn(|cx| {
            let mut outbox = self.outbox.borrow_mut();
            if outbox.bytes == 0 {
                if outbox.closing_since.is_some() || self.stop.is_fired() {
                    return Poll::Ready(None);
                }
                *self.writer.borrow_mut() = Some(cx.waker().clone());
                return Poll::Pending;
            }
            if outbox.frames.is_empty() {
                std::mem::swap(&mut outbox.tail, copied);
            } else {
                outbox.seal_tail();
                batch.extend(outbox.frames.drain(..));
            }
            let taken = Taken {
                frames: std::mem::take(&mut outbox.frame_count),
                bytes: std::mem::take(&mut outbox.bytes),
            };
            Poll::Ready(Some(taken))
        })
        .await
    }

    /// Gives a written send buffer back to the outbox if nothing was queued meanwhile,
    /// so a connection's next frames are copied into memory it already has (one buffer
    /// per connection in the steady state; a second only while frames arrive during a
    /// write). Buffers grown past [`KEEP_SEND_BUFFER`] by a burst are freed.
    fn recycle_send_buffer(&self, written: &mut Vec<u8>) {
        written.clear();
        if written.capacity() > KEEP_SEND_BUFFER {
            *written = Vec::new();
        }
        let mut outbox = self.outbox.borrow_mut();
        if outbox.tail.is_empty() && outbox.tail.capacity() < written.capacity() {
            std::mem::swap(&mut outbox.tail, written);
        }
    }

    /// The writer task: one write per turn with everything queued, until the connection
    /// closes or the socket fails.
    pub async fn write_loop(self: Rc<Self>, mut socket: OwnedWriteHalf<TcpStream>) {
        let mut batch = FrameBatch::default();
        let mut copied = Vec::new();
        let stop = self.stop.watch();
        loop {
            let mut frames = std::mem::take(&mut batch.frames);
            frames.clear();
            let Some(taken) = self.next_batch(&mut copied, &mut frames).await else {
                break;
            };
            let result = if frames.is_empty() {
                let write = socket.write_all(std::mem::take(&mut copied));
                stop.run(write).await.map(|(result, buffer)| {
                    copied = buffer;
                    self.recycle_send_buffer(&mut copied);
                    result.map(drop)
                })
            } else {
                batch.set(frames);
                // Boxed: frames over COPY_MAX are the rare case, and an unboxed second
                // kind of write would make every connection's writer task larger.
                let write = Box::pin(write_all(&mut socket, std::mem::take(&mut batch)));
                stop.run(write).await.map(|(result, written)| {
                    batch = written;
                    result
                })
            };
            match result {
                Some(Ok(())) => {}
                Some(Err(_)) | None => break,
            }
            let metrics = self.metrics.get();
            ShardMetrics::add(&metrics.deliveries, taken.frames);
            ShardMetrics::add(&metrics.bytes_sent, taken.bytes as u64);
            self.last_sent.set(Instant::now());
        }
        let _ = socket.shutdown().await;
        self.stop.fire();
    }
}

/// What one turn of the writer took from the outbox.
struct Taken {
    frames: u64,
    bytes: usize,
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
/// reuses the batch's own).
async fn write_all(
    socket: &mut OwnedWriteHalf<TcpStream>,
    mut batch: FrameBatch,
) -> (std::io::Result<()>, FrameBatch) {
    while !batch.is_empty() {
        let (result, returned) = socket.writev(batch).await;
        batch = returned;
        match result {
            Ok(0) => return (Err(std::io::ErrorKind::WriteZero.into()), batch),
            Ok(n) => batch.consume(n),
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
