//! A session: one SignalR connection as the hub sees it (identity, hub protocol,
//! groups, outbound queue, timestamps), apart from the transport that carries it. A
//! streaming transport's socket is written by the shard's flush pass, which the session
//! asks for through its [`FlushQueue`]; long polling takes what is queued with
//! [`Session::next_batch`]. Both end when [`Session::stop`] fires.

pub mod calls;
pub mod outbox;
pub mod replay;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hashbrown::HashSet;
use ringhub_protocol::frame::{self, Framing};
use ringhub_protocol::hub::Close;
use ringhub_protocol::ws::{self, close_code};
use ringhub_protocol::{HubMessage, HubProtocol};

use crate::api::types::Caller;
use crate::fanout::FrameKind;
use crate::flow::{Ticket, Window};
use crate::metrics::{MetricsRef, ShardMetrics};
use crate::quota::Share;
use crate::signal::Signal;
use calls::Calls;
use outbox::{Outbox, Pushed, Taken};
use replay::{ClientSequence, Incoming, Replay};

/// The error sentence of a slow-consumer close (contract section 6).
pub const SLOW_CONSUMER: &str = "Connection closed: client too slow.";

/// Why a receiver is closed as a slow consumer (logged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlowConsumer {
    /// Its queue (or what it holds) passed its bound.
    Overflow,
    /// Congested, it took nothing for `--slow-consumer-secs`.
    TookNothing,
    /// It held publishers alone, behind every other recipient of their sends, for
    /// `--slow-consumer-secs`.
    HeldPublishersAlone,
}

/// Why a session ended (its `disconnected` log line says it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The client sent a Close message or a WebSocket close, or deleted its connection.
    ClientClosed,
    /// The client's socket or requests went away without a word.
    ClientLeft,
    /// Silent past `--client-timeout-secs`.
    ClientTimeout,
    /// A dropped stateful-reconnect session was not resumed in time.
    NotResumed,
    SlowConsumer,
    /// Malformed or oversized input.
    BadInput,
    /// The node is shutting down.
    ServerStopping,
    /// Closed through the hub or the REST API.
    ClosedByServer,
}

/// How long a closing session may take to flush its last frames.
pub const CLOSE_GRACE: Duration = Duration::from_secs(3);

pub struct Session {
    /// The shard-local number that keys it in its shard's tables.
    pub key: u64,
    pub caller: Rc<Caller>,
    /// Set by the handshake (JSON until then).
    protocol: Cell<HubProtocol>,
    /// How its transport wraps frames.
    pub framing: Framing,
    pub groups: RefCell<HashSet<String>>,
    /// Groups whose presence this session watches.
    pub watching: RefCell<HashSet<String>>,
    /// The version of its user's durable groups it took on last (see
    /// `store::DurableGroups`), and the groups it is in because of them (boxed: most
    /// sessions have none).
    pub durable_version: Cell<u64>,
    pub durable_groups: RefCell<Option<Box<HashSet<String>>>>,
    outbox: RefCell<Outbox>,
    /// Since when the session has been congested (its backlog above half the bound, or
    /// frames held) without its reader taking anything: one slow-consumer clock.
    congested_since: Cell<Option<Instant>>,
    /// How long it has been behind the other recipients of its sends, holding their
    /// publishers alone (see [`Session::too_slow`]): the other clock.
    behind_for: Cell<Duration>,
    /// The transport's task waiting for frames (long polling).
    writer: RefCell<Option<Waker>>,
    /// The shard's flush pass, while it writes this session's socket (streaming
    /// transports): frames make the session listed there instead of waking a task.
    flush: RefCell<Option<Rc<FlushQueue>>>,
    /// Whether the session is listed for the next flush pass (listed once per pass).
    flush_listed: Cell<bool>,
    /// The task waiting for the backlog to come down before it reads more from the client.
    reader: RefCell<Option<Waker>>,
    /// What this connection's sends may have on their way (see `flow`).
    pub publish_window: Arc<Window>,
    pub last_received: Cell<Instant>,
    pub last_sent: Cell<Instant>,
    /// When the session began (the connection-duration metric).
    pub started: Instant,
    /// Why it ended, once known (the first reason given wins; logged at its end).
    ended_because: Cell<Option<EndReason>>,
    /// Ends the session: fire it with [`Session::stop_now`], which also ends its
    /// transport.
    pub stop: Signal,
    /// Ends the current transport's reading and writing at once, whatever they are
    /// doing (fired with `stop` too; a resumable session gets a new one per transport).
    transport: RefCell<Signal>,
    /// Stateful reconnect's state, when the client negotiated it (boxed: most sessions
    /// have none, and idle sessions' memory is mostly this struct and their tasks).
    stateful: Option<Box<Stateful>>,
    /// Invocations, streams and client results under way (boxed, made on first use:
    /// most connections only ever make calls that finish at once).
    calls: RefCell<Option<Box<Calls>>>,
    metrics: Rc<MetricsRef>,
    /// Its place among the node's sessions (`--max-connections`), given back with it.
    _slot: Option<Share>,
}

/// A session's stateful-reconnect state.
struct Stateful {
    replay: RefCell<Replay>,
    client: RefCell<ClientSequence>,
    /// Between transports: tracked frames only go to the replay buffer.
    detached: Cell<bool>,
    /// The task waiting for a new transport (woken when one is offered, or when the
    /// session can no longer be resumed).
    waiter: RefCell<Option<Waker>>,
}

impl Session {
    pub fn new(
        key: u64,
        caller: Rc<Caller>,
        kind: FrameKind,
        max_buffered_bytes: usize,
        publish_window: Arc<Window>,
        metrics: Rc<MetricsRef>,
        slot: Option<Share>,
    ) -> Session {
        let now = Instant::now();
        Session {
            key,
            caller,
            protocol: Cell::new(kind.protocol),
            framing: kind.framing,
            groups: RefCell::default(),
            watching: RefCell::default(),
            durable_version: Cell::new(0),
            durable_groups: RefCell::default(),
            outbox: RefCell::new(Outbox::new(max_buffered_bytes)),
            congested_since: Cell::new(None),
            behind_for: Cell::new(Duration::ZERO),
            writer: RefCell::new(None),
            flush: RefCell::new(None),
            flush_listed: Cell::new(false),
            reader: RefCell::new(None),
            publish_window,
            last_received: Cell::new(now),
            last_sent: Cell::new(now),
            started: now,
            ended_because: Cell::new(None),
            stop: Signal::default(),
            transport: RefCell::default(),
            stateful: None,
            calls: RefCell::default(),
            metrics,
            _slot: slot,
        }
    }

    /// Makes the session resumable (stateful reconnect), keeping up to `buffer` bytes
    /// of unacknowledged frames.
    pub fn with_stateful_reconnect(mut self, buffer: usize) -> Session {
        self.stateful = Some(Box::new(Stateful {
            replay: RefCell::new(Replay::new(buffer)),
            client: RefCell::new(ClientSequence::default()),
            detached: Cell::new(false),
            waiter: RefCell::new(None),
        }));
        self
    }

    /// What the connection has under way beside reading and writing.
    pub fn calls(&self) -> std::cell::RefMut<'_, Calls> {
        std::cell::RefMut::map(self.calls.borrow_mut(), |calls| {
            &mut **calls.get_or_insert_with(Box::default)
        })
    }

    /// The connection ended: what [`Calls::end`] does, if it had any calls; returns
    /// the client results it still owed.
    pub fn end_calls(&self) -> Vec<u64> {
        match self.calls.borrow_mut().as_mut() {
            Some(calls) => calls.end(),
            None => Vec::new(),
        }
    }

    pub fn protocol(&self) -> HubProtocol {
        self.protocol.get()
    }

    /// What the handshake chose (transports that learn it after the session exists).
    pub fn set_protocol(&self, protocol: HubProtocol) {
        self.protocol.set(protocol);
    }

    /// The frames this session takes.
    pub fn kind(&self) -> FrameKind {
        FrameKind {
            protocol: self.protocol(),
            framing: self.framing,
        }
    }

    /// One hub message framed for this session.
    pub fn encode(&self, message: &HubMessage) -> Bytes {
        frame::encode_framed(self.protocol(), self.framing, message)
    }

    pub fn metrics(&self) -> &ShardMetrics {
        self.metrics.get()
    }

    /// Queues a frame of the send `ticket` belongs to, or of the session's own (a
    /// Completion, a ping: `None`). While the session is congested the frame is held, in
    /// order, and its publisher stays charged. Returns false if it was not queued: the
    /// session is closing, or it just fell too far behind and is being closed as a slow
    /// consumer.
    pub fn enqueue(&self, frame: &Bytes, ticket: Option<&Arc<Ticket>>) -> bool {
        if let Some(stateful) = &self.stateful {
            let kept = stateful.replay.borrow_mut().push(frame);
            if stateful.detached.get() {
                // Kept for the resume; no transport to hold publishers up for.
                if !kept {
                    self.wake_resume_waiter();
                }
                return kept;
            }
        }
        self.push(frame, ticket)
    }

    /// Queues a frame that stateful reconnect does not count (a ping, a pong, an Ack,
    /// the handshake answer); dropped while no transport carries the session.
    pub fn enqueue_untracked(&self, frame: &Bytes) -> bool {
        if self.is_detached() {
            return false;
        }
        self.push(frame, None)
    }

    fn push(&self, frame: &Bytes, ticket: Option<&Arc<Ticket>>) -> bool {
        let pushed = self.outbox.borrow_mut().push(frame, ticket);
        match pushed {
            Pushed::Queued => {
                self.note_congestion();
                self.wake_writer();
                true
            }
            Pushed::Held => {
                self.note_congestion();
                true
            }
            Pushed::Closing => false,
            Pushed::Overflow => {
                self.close_as_slow(SlowConsumer::Overflow);
                false
            }
        }
    }

    /// Ends the session: drops what is still queued, sends a Close message (and on a
    /// WebSocket a close frame), then stops. A no-op if it is already closing.
    pub fn close(&self, error: Option<&str>, allow_reconnect: bool) {
        self.close_with_code(error, allow_reconnect, close_code::NORMAL);
    }

    /// [`Session::close`], with `code` in the WebSocket close frame (RFC 6455: 1002
    /// protocol error, 1007 invalid data, 1009 too big, after bad input).
    pub fn close_with_code(&self, error: Option<&str>, allow_reconnect: bool, code: u16) {
        let close = HubMessage::Close(Close {
            error: error.map(str::to_owned),
            allow_reconnect,
        });
        let mut last = vec![self.encode(&close)];
        if self.framing == Framing::WebSocket {
            last.push(ws::encode_close(code, ""));
        }
        self.end_with(last);
    }

    /// Ends the session with `last` as its final frames (dropping what is queued).
    pub fn end_with(&self, last: Vec<Bytes>) {
        if self.is_detached() {
            // No transport to say it on: ended at once (a resume then finds nothing).
            self.stop_now();
            return;
        }
        let closed = self.outbox.borrow_mut().close_with(last, Instant::now());
        if closed {
            self.wake_writer();
            self.wake_reader();
        }
    }

    /// Stops the session and its transport now (its writer too, even while it waits
    /// for frames), without a Close message.
    pub fn stop_now(&self) {
        self.stop.fire();
        self.end_transport();
        self.wake_resume_waiter();
    }

    /// The signal that ends the current transport.
    pub fn transport_signal(&self) -> Signal {
        self.transport.borrow().clone()
    }

    /// Ends the current transport (its reader and writer), not the session.
    pub fn end_transport(&self) {
        self.transport.borrow().fire();
        self.wake_writer();
        self.wake_reader();
    }

    /// The transport failed (a write did): a resumable session waits for a new one,
    /// any other ends with it.
    pub fn transport_failed(&self) {
        if self.stateful.is_some() {
            self.end_transport();
        } else {
            self.stop_now();
        }
    }

    /// Whether stateful reconnect could resume this session now.
    pub fn can_resume(&self) -> bool {
        self.stateful
            .as_ref()
            .is_some_and(|s| s.replay.borrow().can_resume())
    }

    pub fn is_detached(&self) -> bool {
        self.stateful.as_ref().is_some_and(|s| s.detached.get())
    }

    /// The transport is gone and the session waits for a new one: what was queued is
    /// dropped (every message of it is in the replay buffer, and its publishers are
    /// released), and until the resume tracked frames only go to the replay buffer.
    pub fn detach(&self) {
        if let Some(stateful) = &self.stateful {
            stateful.detached.set(true);
            self.outbox.borrow_mut().reset();
            self.congested_since.set(None);
            self.behind_for.set(Duration::ZERO);
        }
    }

    /// A new transport carries the session: its first frames are a Sequence message
    /// and every unacknowledged frame again, and the client's messages count once it
    /// sent its own Sequence. Returns how many frames were sent again.
    pub fn resume(&self) -> usize {
        *self.transport.borrow_mut() = Signal::default();
        let Some(stateful) = &self.stateful else {
            return 0;
        };
        stateful.detached.set(false);
        stateful.client.borrow_mut().resumed();
        let replay = stateful.replay.borrow();
        let (first, frames) = replay.resend();
        let sequence = self.encode(&HubMessage::Sequence { sequence_id: first });
        self.push(&sequence, None);
        let mut resent = 0;
        for frame in frames {
            self.push(frame, None);
            resent += 1;
        }
        resent
    }

    /// Counts a message from the client for stateful reconnect: whether to handle it.
    pub fn client_message(&self, message: &HubMessage) -> Incoming {
        match &self.stateful {
            Some(stateful) => stateful.client.borrow_mut().receive(message),
            None => Incoming::Process,
        }
    }

    /// The client processed every frame up to `sequence_id`.
    pub fn acknowledged(&self, sequence_id: u64) {
        if let Some(stateful) = &self.stateful {
            stateful.replay.borrow_mut().ack(sequence_id);
        }
    }

    /// Queues an Ack for the client's messages processed since the last one (stateful
    /// reconnect; the shard's timer calls it once a second).
    pub fn acknowledge_client(&self) {
        let Some(stateful) = &self.stateful else {
            return;
        };
        if stateful.detached.get() {
            return;
        }
        let due = stateful.client.borrow_mut().ack_due();
        if let Some(sequence_id) = due {
            self.enqueue_untracked(&self.encode(&HubMessage::Ack { sequence_id }));
        }
    }

    /// Wakes `waker` when a new transport is offered or the session can no longer be
    /// resumed.
    pub fn wake_on_resume_change(&self, waker: &Waker) {
        if let Some(stateful) = &self.stateful {
            *stateful.waiter.borrow_mut() = Some(waker.clone());
        }
    }

    /// Wakes the task waiting for a new transport (see [`Session::wake_on_resume_change`]).
    pub fn wake_resume_waiter(&self) {
        if let Some(stateful) = &self.stateful {
            wake(&stateful.waiter);
        }
    }

    /// When the session started closing, if it is.
    pub fn closing_since(&self) -> Option<Instant> {
        self.outbox.borrow().closing_since()
    }

    pub fn queued_bytes(&self) -> usize {
        self.outbox.borrow().bytes()
    }

    /// Starts the slow-consumer clock when the session becomes congested (the clock is
    /// read only then: no time is taken per frame otherwise).
    fn note_congestion(&self) {
        if self.congested_since.get().is_none() && self.outbox.borrow().is_congested() {
            self.congested_since.set(Some(Instant::now()));
        }
    }

    /// Whether the session is a slow consumer as of `now` (contract section 6), by
    /// either clock, each allowed `allowed`; called every `step`.
    /// - It stayed congested (above half its queue bound, counting what its writer
    ///   holds, or with frames held) without taking anything: it stopped reading, alone
    ///   or with everyone else in its groups.
    /// - It was behind the others: it held a send alone, after every other recipient
    ///   took it, for longer than an eighth of `allowed`, however much it reads
    ///   meanwhile (a reader that trickles would otherwise set the pace of everyone in
    ///   its groups). That clock runs while it is, and runs back at a quarter of the
    ///   pace while it is not, so a trickle that catches up now and then still adds up. A reader that is
    ///   merely last among readers that keep up (a busy client process reads its
    ///   sockets in turn) is behind by milliseconds, never by that much; a crowd that
    ///   falls behind together shares every held send and is not closed: its
    ///   publishers are slowed instead.
    pub fn too_slow(
        &self,
        now: Instant,
        step: Duration,
        allowed: Duration,
    ) -> Option<SlowConsumer> {
        // A long-polling client takes its messages a request at a time: between polls it
        // is behind by a round trip and its own processing, which in a busy client
        // process is easily more than an eighth of the allowance (CI: 4 of 200 healthy
        // long-polling readers closed). It is judged behind only past the allowance.
        let grace = if self.framing == Framing::Raw {
            allowed
        } else {
            allowed / 8
        };
        let outbox = self.outbox.borrow();
        let behind = outbox.behind_the_others(now).is_some_and(|lag| lag > grace);
        let congested = outbox.is_congested();
        drop(outbox);
        let behind_for = if behind {
            self.behind_for.get() + step
        } else {
            self.behind_for.get().saturating_sub(step / 4)
        };
        self.behind_for.set(behind_for);
        let stopped = if congested {
            let since = self.congested_since.get().unwrap_or(now);
            self.congested_since.set(Some(since));
            now - since > allowed
        } else {
            self.congested_since.set(None);
            false
        };
        if behind_for > allowed {
            Some(SlowConsumer::HeldPublishersAlone)
        } else if stopped {
            Some(SlowConsumer::TookNothing)
        } else {
            None
        }
    }

    /// The transport handed `bytes` more to the socket: the reader took something, so
    /// it has not stopped (the congestion clock starts again; the other clock does not
    /// care how much it takes).
    pub fn wrote(&self, bytes: usize) {
        // The clock is read only while it runs: no time is taken per write otherwise.
        if bytes > 0 && self.congested_since.get().is_some() {
            self.congested_since.set(Some(Instant::now()));
        }
    }

    /// The shard itself was stalled: the time it did not run is not the reader's fault,
    /// both clocks start again.
    pub fn restart_slow_consumer_clocks(&self, now: Instant) {
        if self.congested_since.get().is_some() {
            self.congested_since.set(Some(now));
        }
        self.behind_for.set(Duration::ZERO);
    }

    /// `work`'s output, or `None` once the session is ending or its transport is gone:
    /// what a read loop waits for (room in an upload stream's buffer, in the invocation
    /// queue) must not keep it past its connection.
    pub async fn unless_ending<F: std::future::Future>(&self, work: F) -> Option<F::Output> {
        let mut work = std::pin::pin!(work);
        std::future::poll_fn(|cx| {
            if self.closing_since().is_some() || self.transport.borrow().is_fired() {
                return Poll::Ready(None);
            }
            if let Poll::Ready(output) = work.as_mut().poll(cx) {
                return Poll::Ready(Some(output));
            }
            *self.reader.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Resolves once the session is not congested (or is ending): a transport reads the
    /// client's next messages only then, so a client that does not read what it is sent
    /// cannot make the server queue more for it (Completions, pongs).
    pub async fn uncongested(&self) {
        std::future::poll_fn(|cx| {
            if !self.outbox.borrow().is_congested()
                || self.closing_since().is_some()
                || self.transport.borrow().is_fired()
            {
                return Poll::Ready(());
            }
            *self.reader.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    fn wake_reader(&self) {
        wake(&self.reader);
    }

    /// Notes why the session ends (the first reason given is kept).
    pub fn ending(&self, reason: EndReason) {
        if self.ended_because.get().is_none() {
            self.ended_because.set(Some(reason));
        }
    }

    /// Why the session ended: the reason given, else the server closed it (it was
    /// closing) or the client went away.
    pub fn end_reason(&self) -> EndReason {
        self.ended_because
            .get()
            .unwrap_or(if self.closing_since().is_some() {
                EndReason::ClosedByServer
            } else {
                EndReason::ClientLeft
            })
    }

    /// Closes it as a slow consumer (contract section 6), counted in the metrics.
    pub fn close_as_slow(&self, why: SlowConsumer) {
        self.ending(EndReason::SlowConsumer);
        ShardMetrics::add(&self.metrics().slow_consumer_closes, 1);
        tracing::info!(connection = %self.caller.connection_id, ?why, "closing a slow consumer");
        self.close(Some(SLOW_CONSUMER), false);
    }

    /// Tells whoever writes the session that there is something to do (frames, a
    /// close, the transport's end): lists it for the flush pass, or wakes the task
    /// waiting in [`Session::next_batch`].
    pub fn wake_writer(&self) {
        if let Some(queue) = &*self.flush.borrow() {
            if !self.flush_listed.replace(true) {
                queue.list(self.key);
            }
            return;
        }
        wake(&self.writer);
    }

    /// From now on the shard's flush pass writes this session (`None`: no longer);
    /// listed at once, for what is already queued.
    pub fn write_through(&self, queue: Option<Rc<FlushQueue>>) {
        let listed = queue.is_some();
        *self.flush.borrow_mut() = queue;
        self.flush_listed.set(false);
        if listed {
            self.wake_writer();
        }
    }

    /// The flush pass took the session off its list (frames arriving from now on list
    /// it again).
    pub fn unlist(&self) {
        self.flush_listed.set(false);
    }

    /// Takes everything queued (see [`Outbox::take`]); `None` when nothing is.
    pub fn take_batch(&self, copied: &mut Vec<u8>, batch: &mut Vec<Bytes>) -> Option<Taken> {
        self.outbox.borrow_mut().take(copied, batch)
    }

    /// Waits for queued frames and takes them all (see [`Outbox::take`]); `None` once
    /// the session is done (closed and flushed, or stopped).
    pub async fn next_batch(&self, copied: &mut Vec<u8>, batch: &mut Vec<Bytes>) -> Option<Taken> {
        std::future::poll_fn(|cx| {
            if let Some(taken) = self.take_batch(copied, batch) {
                return Poll::Ready(Some(taken));
            }
            if self.closing_since().is_some() || self.transport.borrow().is_fired() {
                return Poll::Ready(None);
            }
            *self.writer.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// See [`Outbox::recycle`].
    pub fn recycle_send_buffer(&self, written: &mut Vec<u8>) {
        self.outbox.borrow_mut().recycle(written);
    }

    /// Counts a batch as handed to the socket, and admits what was held meanwhile. A
    /// write that brought the backlog down to half the bound restarts the slow-consumer
    /// clock even when held frames fill it again at once: the receiver reads, the
    /// publishers are paced by it (contract: closed when it *stayed* above half).
    pub fn sent(&self, taken: Taken) {
        let (came_down, congested) = {
            let mut outbox = self.outbox.borrow_mut();
            let came_down = outbox.written();
            (came_down, outbox.is_congested())
        };
        if came_down {
            self.congested_since.set(None);
            self.note_congestion();
        }
        if !congested {
            self.wake_reader();
        }
        let metrics = self.metrics();
        ShardMetrics::add(&metrics.deliveries, taken.frames);
        ShardMetrics::add(&metrics.bytes_sent, taken.bytes as u64);
        self.last_sent.set(Instant::now());
    }
}

/// The shard's list of sessions with something to write (see `transport::flush`): a
/// session lists itself when frames arrive, once until the next flush pass, which then
/// writes every listed session's frames: one pass per loop turn instead of a writer
/// task woken per session.
#[derive(Default)]
pub struct FlushQueue {
    listed: RefCell<Vec<u64>>,
    flusher: RefCell<Option<Waker>>,
}

impl FlushQueue {
    fn list(&self, key: u64) {
        self.listed.borrow_mut().push(key);
        wake(&self.flusher);
    }

    /// Waits until sessions are listed, then moves their keys into `keys` (cleared
    /// first; its capacity is reused for the next list).
    pub async fn next(&self, keys: &mut Vec<u64>) {
        std::future::poll_fn(|cx| {
            let mut listed = self.listed.borrow_mut();
            if listed.is_empty() {
                *self.flusher.borrow_mut() = Some(cx.waker().clone());
                return Poll::Pending;
            }
            keys.clear();
            std::mem::swap(&mut *listed, keys);
            Poll::Ready(())
        })
        .await
    }
}

/// Wakes the task waiting in `slot`, if one is (the slot is emptied first: a woken task
/// that waits again registers anew).
fn wake(slot: &RefCell<Option<Waker>>) {
    let waker = slot.borrow_mut().take();
    if let Some(waker) = waker {
        waker.wake();
    }
}
