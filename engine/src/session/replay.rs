//! Stateful reconnect's bookkeeping for one session (`signalr-protocol.md` section 7):
//! the frames sent and not yet acknowledged, to send again on a resumed connection, and
//! the count of the client's messages, to drop the ones it sends again. Plain data,
//! unit-tested; the session and the WebSocket transport drive it.

use std::collections::VecDeque;

use bytes::Bytes;
use ringhub_protocol::HubMessage;

/// Whether a message counts in stateful reconnect's sequence (both directions).
pub fn is_tracked(message: &HubMessage) -> bool {
    matches!(
        message,
        HubMessage::Invocation(_)
            | HubMessage::StreamItem(_)
            | HubMessage::Completion(_)
            | HubMessage::StreamInvocation(_)
            | HubMessage::CancelInvocation(_)
    )
}

/// The frames sent to the client and not acknowledged, with their sequence ids (the
/// first is 1), up to a bound in bytes. Frames are kept by reference: a broadcast's
/// frame is shared with every other recipient, so keeping it costs a reference count.
#[derive(Debug)]
pub struct Replay {
    frames: VecDeque<(u64, Bytes)>,
    bytes: usize,
    max_bytes: usize,
    /// The id the next tracked frame gets.
    next_id: u64,
    /// More than `max_bytes` went unacknowledged at once: the session cannot be resumed
    /// without losing messages, so nothing is kept any more.
    overflowed: bool,
}

impl Replay {
    pub fn new(max_bytes: usize) -> Replay {
        Replay {
            frames: VecDeque::new(),
            bytes: 0,
            max_bytes,
            next_id: 1,
            overflowed: false,
        }
    }

    /// Keeps a tracked frame just queued for the client; false once the bound was
    /// passed (then, and from then on, nothing is kept).
    pub fn push(&mut self, frame: &Bytes) -> bool {
        let id = self.next_id;
        self.next_id += 1;
        if self.overflowed {
            return false;
        }
        if self.bytes + frame.len() > self.max_bytes {
            self.overflowed = true;
            self.frames = VecDeque::new();
            self.bytes = 0;
            return false;
        }
        self.bytes += frame.len();
        self.frames.push_back((id, frame.clone()));
        true
    }

    /// The client processed every message up to `sequence_id`.
    pub fn ack(&mut self, sequence_id: u64) {
        while let Some((id, frame)) = self.frames.front() {
            if *id > sequence_id {
                break;
            }
            self.bytes -= frame.len();
            self.frames.pop_front();
        }
    }

    pub fn can_resume(&self) -> bool {
        !self.overflowed
    }

    /// What a resumed connection starts with: the id of the first frame sent again (or
    /// of the next one, when nothing waits), then the frames, oldest first.
    pub fn resend(&self) -> (u64, impl Iterator<Item = &Bytes>) {
        let first = self.frames.front().map_or(self.next_id, |(id, _)| *id);
        (first, self.frames.iter().map(|(_, frame)| frame))
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.frames.len()
    }
}

/// The client's side of the sequence: which of its messages were processed.
#[derive(Debug)]
pub struct ClientSequence {
    /// The id the client's next tracked message has.
    next_id: u64,
    /// The highest id processed.
    processed: u64,
    /// The highest id acknowledged to the client.
    acknowledged: u64,
    /// After a resume, until the client's Sequence message: its messages are ignored.
    awaiting_sequence: bool,
}

/// What to do with a message from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Process,
    /// Sent before the drop and processed then, or before the client's Sequence.
    Ignore,
    /// A Sequence naming messages the server never got: the connection must end.
    Invalid,
}

impl Default for ClientSequence {
    fn default() -> Self {
        ClientSequence {
            next_id: 1,
            processed: 0,
            acknowledged: 0,
            awaiting_sequence: false,
        }
    }
}

impl ClientSequence {
    /// Counts a message from the client (a Sequence resets the count).
    pub fn receive(&mut self, message: &HubMessage) -> Incoming {
        if let HubMessage::Sequence { sequence_id } = message {
            // Ids start at 1: a Sequence of 0 would make the next message's id 0, taken
            // as already processed and silently dropped.
            if *sequence_id == 0 || *sequence_id > self.processed + 1 {
                return Incoming::Invalid;
            }
            self.next_id = *sequence_id;
            self.awaiting_sequence = false;
            return Incoming::Ignore;
        }
        if self.awaiting_sequence {
            return Incoming::Ignore;
        }
        if !is_tracked(message) {
            return Incoming::Process;
        }
        let id = self.next_id;
        self.next_id += 1;
        if id <= self.processed {
            return Incoming::Ignore;
        }
        self.processed = id;
        Incoming::Process
    }

    /// A new connection carries the session: the client's messages count again once
    /// it said where it starts.
    pub fn resumed(&mut self) {
        self.awaiting_sequence = true;
    }

    /// The id to acknowledge, if messages were processed since the last Ack.
    pub fn ack_due(&mut self) -> Option<u64> {
        if self.processed > self.acknowledged {
            self.acknowledged = self.processed;
            Some(self.processed)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invocation() -> HubMessage {
        HubMessage::invocation("m", vec![])
    }

    #[test]
    fn unacknowledged_frames_are_sent_again_from_the_first_one() {
        let mut replay = Replay::new(10);
        let frame = |s: &'static [u8]| Bytes::from_static(s);
        assert_eq!(replay.resend().0, 1, "nothing sent: the next id");
        assert!(replay.push(&frame(b"one")));
        assert!(replay.push(&frame(b"two")));
        assert!(replay.push(&frame(b"3")));
        replay.ack(1);
        let (first, frames) = replay.resend();
        assert_eq!(first, 2);
        assert_eq!(frames.collect::<Vec<_>>(), [&frame(b"two"), &frame(b"3")]);
        replay.ack(3);
        assert_eq!(replay.resend().0, 4);
        assert_eq!(replay.len(), 0);
    }

    #[test]
    fn past_its_bound_a_replay_gives_up_for_good() {
        let mut replay = Replay::new(8);
        assert!(replay.push(&Bytes::from_static(b"12345")));
        assert!(!replay.push(&Bytes::from_static(b"6789")));
        assert!(!replay.can_resume());
        replay.ack(2);
        assert!(!replay.push(&Bytes::from_static(b"1")), "never again");
        assert_eq!(replay.len(), 0);
    }

    #[test]
    fn messages_sent_again_after_a_resume_are_processed_once() {
        let mut client = ClientSequence::default();
        for _ in 0..3 {
            assert_eq!(client.receive(&invocation()), Incoming::Process);
        }
        assert_eq!(client.receive(&HubMessage::Ping), Incoming::Process);
        assert_eq!(client.ack_due(), Some(3));
        assert_eq!(client.ack_due(), None);
        client.resumed();
        assert_eq!(
            client.receive(&invocation()),
            Incoming::Ignore,
            "before Sequence"
        );
        // The client had not seen an Ack for 3: it sends 3 again, then 4.
        let sequence = HubMessage::Sequence { sequence_id: 3 };
        assert_eq!(client.receive(&sequence), Incoming::Ignore);
        assert_eq!(client.receive(&invocation()), Incoming::Ignore, "3 again");
        assert_eq!(client.receive(&invocation()), Incoming::Process, "4");
        let ahead = HubMessage::Sequence { sequence_id: 6 };
        assert_eq!(client.receive(&ahead), Incoming::Invalid);
        let zero = HubMessage::Sequence { sequence_id: 0 };
        assert_eq!(
            client.receive(&zero),
            Incoming::Invalid,
            "ids start at 1: a Sequence of 0 is refused, not a message dropped"
        );
    }
}
