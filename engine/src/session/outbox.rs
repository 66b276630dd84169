//! A session's bounded outbound queue: frames wait here until the transport that
//! carries the session takes them all at once (one write per turn). Plain data, no
//! I/O: the transports drive it, and the tests below drive it directly.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;

/// Frames up to this size are copied into the session's send buffer; larger ones are
/// queued by reference. Measured with `ringhub-bench` fanout-1k (frames of ~150 bytes):
/// copying beat a shared reference plus a vectored write, which costs an atomic
/// increment and decrement per recipient and, in the kernel, an iovec import per send.
/// A memcpy of a few hundred bytes costs less than either.
pub const COPY_MAX: usize = 1024;

/// A writer keeps a send buffer of at most this capacity between bursts.
const KEEP_SEND_BUFFER: usize = 16 << 10;

/// What [`Outbox::push`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// The session is closing: nothing more is queued.
    Closing,
    /// The frame would take the queue past its bound: the session must be closed.
    Overflow,
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
    bytes: usize,
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
            max_bytes,
            closing_since: None,
        }
    }

    pub fn push(&mut self, frame: &Bytes) -> Pushed {
        if self.closing_since.is_some() {
            return Pushed::Closing;
        }
        if self.bytes + frame.len() > self.max_bytes {
            return Pushed::Overflow;
        }
        self.bytes += frame.len();
        self.frame_count += 1;
        if frame.len() <= COPY_MAX {
            self.tail.extend_from_slice(frame);
        } else {
            self.seal_tail();
            self.frames.push_back(frame.clone());
        }
        Pushed::Queued
    }

    /// Drops what is queued and queues `last` instead, the final frames (a Close
    /// message, a WebSocket close); false if the outbox was already closing.
    pub fn close_with(&mut self, last: impl IntoIterator<Item = Bytes>, now: Instant) -> bool {
        if self.closing_since.is_some() {
            return false;
        }
        self.closing_since = Some(now);
        self.frames.clear();
        self.tail.clear();
        self.frames.extend(last);
        self.bytes = self.frames.iter().map(Bytes::len).sum();
        self.frame_count = self.frames.len() as u64;
        true
    }

    pub fn closing_since(&self) -> Option<Instant> {
        self.closing_since
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Takes everything queued: into `copied` when only small frames are queued (the
    /// usual case), otherwise into `batch` (the copied ones sealed in order between the
    /// shared ones). `None` when nothing is queued.
    pub fn take(&mut self, copied: &mut Vec<u8>, batch: &mut Vec<Bytes>) -> Option<Taken> {
        if self.bytes == 0 {
            return None;
        }
        if self.frames.is_empty() {
            std::mem::swap(&mut self.tail, copied);
        } else {
            self.seal_tail();
            batch.extend(self.frames.drain(..));
        }
        Some(Taken {
            frames: std::mem::take(&mut self.frame_count),
            bytes: std::mem::take(&mut self.bytes),
        })
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
        assert_eq!(outbox.push(&small), Pushed::Queued);
        assert_eq!(outbox.push(&large), Pushed::Queued);
        assert_eq!(outbox.push(&Bytes::from_static(b"cd")), Pushed::Queued);
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
        assert_eq!(outbox.push(&Bytes::from_static(b"123456")), Pushed::Queued);
        assert_eq!(outbox.push(&Bytes::from_static(b"12345")), Pushed::Overflow);
        assert_eq!(outbox.bytes(), 6);
        assert_eq!(outbox.push(&Bytes::from_static(b"1234")), Pushed::Queued);
        assert_eq!(outbox.bytes(), 10);
    }

    #[test]
    fn closing_replaces_the_queue_with_the_last_frames_once() {
        let mut outbox = Outbox::new(100);
        outbox.push(&Bytes::from_static(b"dropped"));
        let now = Instant::now();
        assert!(outbox.close_with([Bytes::from_static(b"bye")], now));
        assert!(!outbox.close_with([Bytes::from_static(b"again")], now));
        assert_eq!(outbox.push(&Bytes::from_static(b"late")), Pushed::Closing);
        assert_eq!(outbox.closing_since(), Some(now));
        let (taken, bytes) = take_all(&mut outbox);
        assert_eq!(taken.map(|t| t.frames), Some(1));
        assert_eq!(bytes, b"bye");
    }

    #[test]
    fn a_written_buffer_is_reused_unless_a_burst_grew_it() {
        let mut outbox = Outbox::new(1 << 20);
        let mut written = Vec::with_capacity(512);
        outbox.recycle(&mut written);
        outbox.push(&Bytes::from_static(b"x"));
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
