//! A session's bounded outbound queue: frames wait here until the transport that
//! carries the session takes them all at once (one write per turn). Plain data, no
//! I/O: the transports drive it, and the tests below drive it directly.
//!
//! Its backlog (queued, plus taken and not yet written) takes new frames while it is
//! at most half the bound. Above that the receiver is congested: frames wait in
//! order in a held queue, each keeping its publisher's [`Ticket`] (so the publisher is
//! slowed, see `flow`), and are admitted as writes bring the backlog down again.
//! Messages are at most half the bound, so an admitted one always fits. What one
//! receiver may hold is bounded too ([`HELD_FACTOR`] queue bounds), so that it can
//! never pin the windows its publishers share with everyone else.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::flow::{Ticket, HELD_ENTRY_CHARGE};

/// Frames up to this size are copied into the session's send buffer; larger ones are
/// queued by reference. Measured with `ringhub-bench` fanout-1k (frames of ~150 bytes):
/// copying beat a shared reference plus a vectored write, which costs an atomic
/// increment and decrement per recipient and, in the kernel, an iovec import per send.
/// A memcpy of a few hundred bytes costs less than either.
pub const COPY_MAX: usize = 1024;

/// A receiver that queues a send with at most this fraction of its bound before it
/// keeps up with that send (see [`Ticket::kept_up`]).
const KEEPING_UP_FRACTION: usize = 4;

/// What one receiver may hold, in queue bounds: a quarter of the windows publishers
/// share (a shard's connections, REST and `HubContext` sends: 16 queue bounds each, see
/// `Config`), so that one slow receiver never fills them, while the frames a crowd of
/// publishers has on its way to a receiver that keeps up fit easily.
pub const HELD_FACTOR: usize = 4;

/// A writer keeps a send buffer of at most this capacity between bursts.
const KEEP_SEND_BUFFER: usize = 16 << 10;

/// What [`Outbox::push`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// The receiver is congested: the frame waits behind the others, with its ticket.
    Held,
    /// The session is closing: nothing more is queued.
    Closing,
    /// The frame would take the queue past its bound: the session must be closed.
    Overflow,
}

/// A frame waiting while its receiver is congested.
#[derive(Debug)]
struct Held {
    frame: Bytes,
    /// The ticket of the send it belongs to (`None`: the session's own frame).
    ticket: Option<Arc<Ticket>>,
    /// When it came (only frames of sends are timed: see [`Outbox::behind_the_others`]).
    since: Option<Instant>,
}

/// What one take from the outbox held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    /// Frames taken (the deliveries the write makes).
    pub frames: u64,
    pub bytes: usize,
}

#[derive(Debug)]
pub struct Outbox {
    /// Frames too large to copy (shared with every other recipient) and sealed runs of
    /// copied small frames, oldest first; `tail` comes after all of them.
    frames: VecDeque<Bytes>,
    /// Small frames, copied one after another: the usual batch is this one buffer, sent
    /// with a plain send (no iovec array for the kernel to import, no reference count
    /// taken and dropped per recipient).
    tail: Vec<u8>,
    frame_count: u64,
    /// Bytes queued (admitted and not taken).
    bytes: usize,
    /// Bytes taken by the transport and not yet written.
    in_flight: usize,
    /// Frames that came while the backlog was above half the bound, oldest first.
    held: VecDeque<Held>,
    /// Bytes of held frames without a ticket (Completions, pongs, pings): they slow no
    /// publisher, so they count toward the bound.
    held_untracked: usize,
    /// Bytes of held frames with a ticket: at most [`HELD_FACTOR`] bounds.
    held_tracked: usize,
    max_bytes: usize,
    /// Set once the session is ending: nothing more is queued, what is queued is
    /// flushed, then the transport stops.
    closing_since: Option<Instant>,
}

impl Outbox {
    pub fn new(max_bytes: usize) -> Outbox {
        Outbox {
            frames: VecDeque::new(),
            tail: Vec::new(),
            frame_count: 0,
            bytes: 0,
            in_flight: 0,
            held: VecDeque::new(),
            held_untracked: 0,
            held_tracked: 0,
            max_bytes,
            closing_since: None,
        }
    }

    /// Queues a frame of the send `ticket` belongs to (`None`: a frame of this session's
    /// own, a Completion or a ping), or holds it while the receiver is congested.
    pub fn push(&mut self, frame: &Bytes, ticket: Option<&Arc<Ticket>>) -> Pushed {
        if self.closing_since.is_some() {
            return Pushed::Closing;
        }
        let untracked = if ticket.is_none() { frame.len() } else { 0 };
        if self.backlog() + self.held_untracked + untracked > self.max_bytes {
            return Pushed::Overflow;
        }
        if !self.held.is_empty() || self.is_above_half() {
            let mut since = None;
            if let Some(ticket) = ticket {
                if self.held_tracked + frame.len() > HELD_FACTOR * self.max_bytes {
                    return Pushed::Overflow;
                }
                ticket.charge_more(HELD_ENTRY_CHARGE);
                ticket.held();
                self.held_tracked += frame.len();
                since = Some(Instant::now());
            }
            self.held_untracked += untracked;
            self.held.push_back(Held {
                frame: frame.clone(),
                ticket: ticket.cloned(),
                since,
            });
            return Pushed::Held;
        }
        if self.backlog() + frame.len() > self.max_bytes {
            return Pushed::Overflow;
        }
        self.admit(frame);
        if let Some(ticket) = ticket {
            if self.backlog() <= self.max_bytes / KEEPING_UP_FRACTION {
                ticket.kept_up();
            }
        }
        Pushed::Queued
    }

    fn admit(&mut self, frame: &Bytes) {
        self.bytes += frame.len();
        self.frame_count += 1;
        if frame.len() <= COPY_MAX {
            self.tail.extend_from_slice(frame);
        } else {
            self.seal_tail();
            self.frames.push_back(frame.clone());
        }
    }

    /// Queued and in-flight bytes.
    pub fn backlog(&self) -> usize {
        self.bytes + self.in_flight
    }

    /// Whether the backlog is above half the bound (new frames are held).
    pub fn is_above_half(&self) -> bool {
        self.backlog() > self.max_bytes / 2
    }

    /// Whether the receiver is congested: above half its bound, or frames are held.
    pub fn is_congested(&self) -> bool {
        self.is_above_half() || !self.held.is_empty()
    }

    /// Frames waiting in the held queue.
    #[cfg(test)]
    pub fn held_frames(&self) -> usize {
        self.held.len()
    }

    /// How long this receiver has been the only one holding its oldest held send, after
    /// the other recipients took it (`None`: it is not): how far it is behind the others,
    /// keeping that send's publisher charged alone. (A send to this receiver only, or
    /// whose other recipients were closed rather than took it, slows its publisher as
    /// any backpressure does.) Counted from when the send came or the last other holder
    /// took it, whichever is later.
    pub fn behind_the_others(&self, now: Instant) -> Option<Duration> {
        let held = self.held.iter().find(|held| held.ticket.is_some())?;
        let ticket = held.ticket.as_ref()?;
        if !ticket.held_by_one_after_another_took_it() {
            return None;
        }
        let alone_since = held.since.max(ticket.last_taken())?;
        Some(now.saturating_duration_since(alone_since))
    }

    /// The transport wrote what it took: held frames are admitted while the backlog is
    /// at most half the bound, and their tickets dropped (the publishers may go on).
    /// Returns whether the backlog came down to half the bound or less (before the held
    /// frames went in): the receiver keeps up, whatever is admitted next.
    pub fn written(&mut self) -> bool {
        self.in_flight = 0;
        let came_down = !self.is_above_half();
        while !self.is_above_half() {
            let Some(Held { frame, ticket, .. }) = self.held.pop_front() else {
                break;
            };
            match ticket {
                Some(ticket) => {
                    ticket.let_go(true);
                    self.held_tracked -= frame.len();
                }
                None => self.held_untracked -= frame.len(),
            }
            self.admit(&frame);
        }
        came_down
    }

    /// Drops what is queued and queues `last` instead, the final frames (a Close
    /// message, a WebSocket close); false if the outbox was already closing.
    pub fn close_with(&mut self, last: impl IntoIterator<Item = Bytes>, now: Instant) -> bool {
        if self.closing_since.is_some() {
            return false;
        }
        self.closing_since = Some(now);
        self.drop_queued();
        self.frames.extend(last);
        self.bytes = self.frames.iter().map(Bytes::len).sum();
        self.frame_count = self.frames.len() as u64;
        true
    }

    /// Drops everything queued, held and in flight (a transport that is gone): held
    /// frames' publishers are released.
    pub fn reset(&mut self) {
        self.drop_queued();
        self.frame_count = 0;
        self.bytes = 0;
        self.in_flight = 0;
    }

    /// Drops the queued and held frames (the counts are the caller's to set).
    fn drop_queued(&mut self) {
        self.frames.clear();
        self.tail.clear();
        for Held { ticket, .. } in self.held.drain(..) {
            if let Some(ticket) = ticket {
                ticket.let_go(false);
            }
        }
        self.held_untracked = 0;
        self.held_tracked = 0;
    }

    pub fn closing_since(&self) -> Option<Instant> {
        self.closing_since
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Takes everything queued: into `copied` when only small frames are queued (the
    /// usual case), otherwise into `batch` (the copied ones sealed in order between the
    /// shared ones). `None` when nothing is queued. Whatever `copied` held is dropped:
    /// its buffer becomes this outbox's, and a stale byte in it would reach the client.
    pub fn take(&mut self, copied: &mut Vec<u8>, batch: &mut Vec<Bytes>) -> Option<Taken> {
        if self.bytes == 0 {
            return None;
        }
        copied.clear();
        if self.frames.is_empty() {
            std::mem::swap(&mut self.tail, copied);
        } else {
            self.seal_tail();
            batch.extend(self.frames.drain(..));
        }
        let taken = Taken {
            frames: std::mem::take(&mut self.frame_count),
            bytes: std::mem::take(&mut self.bytes),
        };
        self.in_flight += taken.bytes;
        Some(taken)
    }

    /// Gives a written send buffer back if nothing was queued meanwhile, so the next
    /// frames are copied into memory the session already has (one buffer per session
    /// in the steady state; a second only while frames arrive during a write). Buffers
    /// grown past [`KEEP_SEND_BUFFER`] by a burst are freed.
    pub fn recycle(&mut self, written: &mut Vec<u8>) {
        written.clear();
        if written.capacity() > KEEP_SEND_BUFFER {
            *written = Vec::new();
        }
        if self.tail.is_empty() && self.tail.capacity() < written.capacity() {
            std::mem::swap(&mut self.tail, written);
        }
    }

    /// Moves the copied small frames into `frames`, so a large frame can follow them.
    fn seal_tail(&mut self) {
        if !self.tail.is_empty() {
            self.frames
                .push_back(Bytes::from(std::mem::take(&mut self.tail)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{Window, MIN_CHARGE};

    fn take_all(outbox: &mut Outbox) -> (Option<Taken>, Vec<u8>) {
        let (mut copied, mut batch) = (Vec::new(), Vec::new());
        let taken = outbox.take(&mut copied, &mut batch);
        let mut bytes: Vec<u8> = batch.iter().flat_map(|b| b.iter().copied()).collect();
        if batch.is_empty() {
            bytes = copied;
        }
        (taken, bytes)
    }

    #[test]
    fn small_and_large_frames_come_out_in_order() {
        let mut outbox = Outbox::new(1 << 20);
        let small = Bytes::from_static(b"ab");
        let large = Bytes::from(vec![b'L'; COPY_MAX + 1]);
        assert_eq!(outbox.push(&small, None), Pushed::Queued);
        assert_eq!(outbox.push(&large, None), Pushed::Queued);
        assert_eq!(
            outbox.push(&Bytes::from_static(b"cd"), None),
            Pushed::Queued
        );
        let (taken, bytes) = take_all(&mut outbox);
        let taken = taken.expect("queued");
        assert_eq!(taken.frames, 3);
        assert_eq!(taken.bytes, 4 + COPY_MAX + 1);
        let mut expected = b"ab".to_vec();
        expected.extend_from_slice(&large);
        expected.extend_from_slice(b"cd");
        assert_eq!(bytes, expected);
        assert_eq!(outbox.bytes(), 0);
        assert_eq!(take_all(&mut outbox).0, None);
    }

    #[test]
    fn the_bound_is_never_passed() {
        let mut outbox = Outbox::new(10);
        assert_eq!(
            outbox.push(&Bytes::from_static(b"123456"), None),
            Pushed::Queued
        );
        assert_eq!(
            outbox.push(&Bytes::from_static(b"12345"), None),
            Pushed::Overflow
        );
        assert_eq!(outbox.bytes(), 6);
        assert_eq!(
            outbox.push(&Bytes::from_static(b"1234"), None),
            Pushed::Held
        );
        assert_eq!(
            outbox.push(&Bytes::from_static(b"1"), None),
            Pushed::Overflow
        );
        assert_eq!(outbox.bytes(), 6, "held frames wait above half the bound");
        let (taken, bytes) = take_all(&mut outbox);
        assert_eq!(taken.map(|t| t.bytes), Some(6));
        assert_eq!(bytes, b"123456");
        assert!(outbox.is_congested(), "6 bytes are still being written");
        assert!(outbox.written(), "the backlog came down");
        assert_eq!(outbox.bytes(), 4, "admitted once written");
        assert!(!outbox.is_congested());
    }

    #[test]
    fn a_congested_receiver_holds_frames_in_order_with_their_publishers_charged() {
        let window = Window::new(1 << 20, None);
        let mut outbox = Outbox::new(4096);
        let frame = |c: u8| Bytes::from(vec![c; 1000]);
        let mut tickets = Vec::new();
        let mut pushed = Vec::new();
        for c in b"abcd" {
            let ticket = Arc::new(window.charge(1000));
            pushed.push(outbox.push(&frame(*c), Some(&ticket)));
            tickets.push(ticket);
        }
        assert_eq!(
            pushed,
            [Pushed::Queued, Pushed::Queued, Pushed::Queued, Pushed::Held],
            "taken while at most half the bound (2048) was queued"
        );
        assert_eq!(
            outbox.push(&Bytes::from_static(b"ping"), None),
            Pushed::Held
        );
        drop(tickets);
        assert_eq!(
            window.used(),
            MIN_CHARGE + HELD_ENTRY_CHARGE,
            "the held send still charges its publisher"
        );
        let (taken, bytes) = take_all(&mut outbox);
        assert_eq!(taken.map(|t| t.frames), Some(3));
        assert_eq!(bytes, [frame(b'a'), frame(b'b'), frame(b'c')].concat());
        assert!(
            outbox.written(),
            "the backlog came down before d was admitted"
        );
        assert_eq!(window.used(), 0, "admitted: the publisher may go on");
        let (_, bytes) = take_all(&mut outbox);
        assert_eq!(bytes, [&frame(b'd')[..], b"ping"].concat());
    }

    #[test]
    fn a_send_every_other_recipient_took_is_held_alone() {
        let window = Window::new(1 << 20, None);
        let (mut slow, mut other) = (Outbox::new(100), Outbox::new(100));
        let ticket = Arc::new(window.charge(60));
        for outbox in [&mut slow, &mut other] {
            outbox.push(&Bytes::from(vec![0; 60]), Some(&ticket));
        }
        let second = Arc::new(window.charge(30));
        slow.push(&Bytes::from(vec![1; 30]), Some(&second));
        other.push(&Bytes::from(vec![1; 30]), Some(&second));
        assert_eq!(slow.held_frames(), 1);
        drop(second);
        assert_eq!(
            slow.behind_the_others(Instant::now()),
            None,
            "the other receiver holds it too"
        );
        std::thread::sleep(Duration::from_millis(50));
        take_all(&mut other);
        let taken = Instant::now();
        other.written();
        let later = taken + Duration::from_secs(1);
        let lag = slow
            .behind_the_others(later)
            .expect("every other recipient took it: only this receiver holds its publisher");
        assert!(
            lag <= Duration::from_secs(1),
            "behind since the other took it, not since it came: {lag:?}"
        );
        assert!(lag > Duration::from_millis(990), "{lag:?}");
        drop(ticket);
        // The same, but the other receiver is closed instead of taking it: this one is
        // no slower than anyone who got the message.
        let (mut slow, mut closed) = (Outbox::new(100), Outbox::new(100));
        let first = Arc::new(window.charge(60));
        let second = Arc::new(window.charge(30));
        for outbox in [&mut slow, &mut closed] {
            outbox.push(&Bytes::from(vec![0; 60]), Some(&first));
            outbox.push(&Bytes::from(vec![1; 30]), Some(&second));
        }
        closed.close_with([], Instant::now());
        assert_eq!(slow.behind_the_others(Instant::now()), None);
        let mut lone = Outbox::new(100);
        let only_for_it = Arc::new(window.charge(60));
        lone.push(&Bytes::from(vec![0; 60]), Some(&only_for_it));
        lone.push(&Bytes::from(vec![0; 30]), Some(&only_for_it));
        drop(only_for_it);
        assert_eq!(
            lone.behind_the_others(Instant::now()),
            None,
            "a send to this receiver only is backpressure, not unfairness"
        );
        // A reader that keeps up queues the send at once (little before it): the one that
        // holds it is behind from the moment it came. One whose own queue is long is not
        // keeping up: it makes nobody look slow.
        let (mut slow, mut fast, mut filling) =
            (Outbox::new(100), Outbox::new(100), Outbox::new(100));
        slow.push(&Bytes::from(vec![0; 60]), None);
        filling.push(&Bytes::from(vec![0; 40]), None);
        let send = Arc::new(window.charge(20));
        let came = Instant::now();
        slow.push(&Bytes::from(vec![1; 20]), Some(&send));
        filling.push(&Bytes::from(vec![1; 20]), Some(&send));
        assert_eq!(
            slow.behind_the_others(came),
            None,
            "the filling one is no faster"
        );
        fast.push(&Bytes::from(vec![1; 20]), Some(&send));
        let lag = slow
            .behind_the_others(came + Duration::from_secs(1))
            .expect("a recipient kept up with it");
        assert!(lag >= Duration::from_millis(990), "{lag:?}");
    }

    #[test]
    fn one_receiver_holds_at_most_held_factor_bounds() {
        let window = Window::new(usize::MAX, None);
        let mut outbox = Outbox::new(100);
        let frame = Bytes::from(vec![0; 50]);
        let ticket = Arc::new(window.charge(50));
        let mut pushed = Vec::new();
        for _ in 0..(2 + 2 * HELD_FACTOR + 1) {
            pushed.push(outbox.push(&frame, Some(&ticket)));
        }
        assert_eq!(&pushed[..2], [Pushed::Queued; 2]);
        assert!(pushed[2..2 + 2 * HELD_FACTOR]
            .iter()
            .all(|p| *p == Pushed::Held));
        assert_eq!(
            pushed.last(),
            Some(&Pushed::Overflow),
            "past HELD_FACTOR bounds held, the receiver is closed"
        );
    }

    #[test]
    fn closing_drops_held_frames_and_releases_their_publishers() {
        let window = Window::new(1 << 20, None);
        let mut outbox = Outbox::new(100);
        let ticket = Arc::new(window.charge(60));
        outbox.push(&Bytes::from(vec![0; 60]), Some(&ticket));
        outbox.push(&Bytes::from(vec![1; 30]), Some(&ticket));
        assert_eq!(outbox.held_frames(), 1);
        drop(ticket);
        assert!(window.used() > 0);
        outbox.close_with([Bytes::from_static(b"bye")], Instant::now());
        assert_eq!(window.used(), 0);
    }

    #[test]
    fn closing_replaces_the_queue_with_the_last_frames_once() {
        let mut outbox = Outbox::new(100);
        outbox.push(&Bytes::from_static(b"dropped"), None);
        let now = Instant::now();
        assert!(outbox.close_with([Bytes::from_static(b"bye")], now));
        assert!(!outbox.close_with([Bytes::from_static(b"again")], now));
        assert_eq!(
            outbox.push(&Bytes::from_static(b"late"), None),
            Pushed::Closing
        );
        assert_eq!(outbox.closing_since(), Some(now));
        let (taken, bytes) = take_all(&mut outbox);
        assert_eq!(taken.map(|t| t.frames), Some(1));
        assert_eq!(bytes, b"bye");
    }

    #[test]
    fn bytes_left_in_the_buffer_handed_to_take_never_reach_the_client() {
        let mut outbox = Outbox::new(1 << 20);
        outbox.push(&Bytes::from_static(b"ab"), None);
        let (mut copied, mut batch) = (b"stale".to_vec(), Vec::new());
        outbox.take(&mut copied, &mut batch);
        assert_eq!(copied, b"ab");
        // The outbox now owns the buffer it was handed: the next frames start clean.
        let mut stale = b"old".to_vec();
        outbox.push(&Bytes::from_static(b"cd"), None);
        outbox.take(&mut stale, &mut batch);
        assert_eq!(stale, b"cd");
        outbox.push(&Bytes::from_static(b"ef"), None);
        let (_, bytes) = take_all(&mut outbox);
        assert_eq!(bytes, b"ef");
    }

    #[test]
    fn a_written_buffer_is_reused_unless_a_burst_grew_it() {
        let mut outbox = Outbox::new(1 << 20);
        let mut written = Vec::with_capacity(512);
        outbox.recycle(&mut written);
        outbox.push(&Bytes::from_static(b"x"), None);
        let (mut copied, mut batch) = (Vec::new(), Vec::new());
        outbox.take(&mut copied, &mut batch);
        assert_eq!(
            copied.capacity(),
            512,
            "the recycled buffer carried the frame"
        );
        let mut big = Vec::with_capacity(KEEP_SEND_BUFFER + 1);
        outbox.recycle(&mut big);
        assert_eq!(big.capacity(), 0, "a burst-sized buffer is freed");
    }
}
