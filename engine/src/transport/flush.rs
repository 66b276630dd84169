//! The shard's flush pass: one task writes every streaming session (WebSocket, SSE).
//!
//! A session with new frames lists itself in the shard's [`FlushQueue`] (once until the
//! pass reaches it); the pass runs after the tasks woken in the same loop turn, so the
//! frames a turn's reads produced go out together, and writes each listed session's
//! queue with one send that does not wait. Only a socket whose buffer is full gets a
//! task of its own, which waits for room with the runtime's writes and hands the
//! socket back when done. So an idle connection has no writer task and no send in
//! flight, and a delivery costs no task wake-ups: with a writer task per connection,
//! every delivery woke it twice (for the frame and for the send's completion).

use std::cell::RefCell;
use std::rc::Rc;

use bytes::Bytes;
use hashbrown::HashMap;

use crate::session::outbox::Taken;
use crate::session::{FlushQueue, Session};
use crate::signal::Signal;
use crate::transport::io::{write_all, write_copied, FrameBatch, Writer};

/// The flush pass of a shard and the sockets it writes.
#[derive(Default)]
pub struct Flusher {
    queue: Rc<FlushQueue>,
    sinks: RefCell<HashMap<u64, Sink>>,
    /// Reused by every send of the pass (sends complete before the next one starts):
    /// the buffer a session's small frames are taken into, and its shared frames.
    copied: RefCell<Vec<u8>>,
    shared: RefCell<Vec<Bytes>>,
}

/// A session's socket, as the flush pass holds it.
struct Sink {
    /// The number of the pass that last wrote it.
    written_in: u64,
    session: Rc<Session>,
    /// `None` while a write waiting for room in the socket has it.
    writer: Option<Writer>,
    /// The transport the socket carries (a resumed session gets a new one).
    transport: Signal,
}

/// A session left for the next pass.
#[derive(Debug, PartialEq, Eq)]
struct Deferred;

/// A pass that sent at least this many times means the shard is loaded: sessions it
/// sent to wait a pass before they are sent to again, so that each send carries more
/// frames (measured with `ringhub-bench` fanout-10k, see the README).
const LOADED: u64 = 256;

/// The longest a deferred session waits when no new frames start a pass.
const DEFER_AT_MOST: std::time::Duration = std::time::Duration::from_millis(1);

/// The pass being run, and whether the one before was loaded.
#[derive(Default)]
struct Pass {
    number: u64,
    /// Sessions this pass wrote (or found nothing to write for).
    written: u64,
    after_loaded: bool,
}

impl Pass {
    fn start(&mut self) {
        self.after_loaded = self.written >= LOADED;
        self.number += 1;
        self.written = 0;
    }

    /// Whether a session waits for the next pass: after a loaded pass, one that pass
    /// wrote (`written_in`: the number of the last pass that wrote it, updated here
    /// when this one does). A session whose transport `ended` is dealt with at once.
    fn defers(&mut self, written_in: &mut u64, ended: bool) -> bool {
        if self.after_loaded && *written_in + 1 == self.number && !ended {
            return true;
        }
        *written_in = self.number;
        self.written += 1;
        false
    }
}

/// What one pass over one session did.
enum Flushed {
    /// Everything taken was sent (or nothing was queued).
    Done,
    /// The socket took part of it; the rest waits for room.
    Blocked(Writer, Rest, Taken),
    /// The session is done with this socket (held here unless a write waiting for
    /// room has it): it closed and flushed, its transport ended, or the socket failed.
    Ended(Option<Writer>),
}

/// What a full socket has yet to take.
enum Rest {
    Copied(Vec<u8>),
    Frames(FrameBatch),
}

impl Flusher {
    /// From now on the pass writes `session` on `writer` (a socket it held for an
    /// earlier transport of the session is shut).
    pub fn attach(&self, session: &Rc<Session>, writer: Writer) {
        let sink = Sink {
            written_in: 0,
            session: session.clone(),
            writer: Some(writer),
            transport: session.transport_signal(),
        };
        let replaced = self.sinks.borrow_mut().insert(session.key, sink);
        if let Some(writer) = replaced.and_then(|sink| sink.writer) {
            writer.shutdown();
        }
        session.write_through(Some(self.queue.clone()));
    }

    /// The pass, for the shard's life.
    pub async fn run(self: Rc<Self>) {
        let (mut keys, mut deferred, mut due) = (Vec::new(), Vec::new(), Vec::new());
        let mut pass = Pass::default();
        loop {
            if deferred.is_empty() {
                self.queue.next(&mut keys).await;
            } else {
                // Deferred sessions go in the next pass, which the next listing starts,
                // or this long after the last one.
                let next = monoio::time::timeout(DEFER_AT_MOST, self.queue.next(&mut keys));
                if Box::pin(next).await.is_err() {
                    keys.clear();
                }
            }
            pass.start();
            std::mem::swap(&mut deferred, &mut due);
            for &key in due.iter().chain(keys.iter()) {
                if self.flush(key, &mut pass) == Some(Deferred) {
                    deferred.push(key);
                }
            }
            due.clear();
        }
    }

    /// Writes what `key`'s session has queued (or defers it to the next pass).
    fn flush(self: &Rc<Self>, key: u64, pass: &mut Pass) -> Option<Deferred> {
        let (flushed, session, transport) = {
            let mut sinks = self.sinks.borrow_mut();
            let sink = sinks.get_mut(&key)?;
            if pass.defers(&mut sink.written_in, sink.transport.is_fired()) {
                return Some(Deferred);
            }
            sink.session.unlist();
            match self.send(sink) {
                Flushed::Done => return None,
                Flushed::Ended(writer) => {
                    sinks.remove(&key);
                    if let Some(writer) = writer {
                        writer.shutdown();
                    }
                    return None;
                }
                blocked => (blocked, sink.session.clone(), sink.transport.clone()),
            }
        };
        if let Flushed::Blocked(writer, rest, taken) = flushed {
            monoio::spawn(
                self.clone()
                    .wait_for_room(session, transport, writer, rest, taken),
            );
        }
        None
    }

    /// Sends everything `sink`'s session has queued, as far as the socket takes it now.
    fn send(&self, sink: &mut Sink) -> Flushed {
        let session = sink.session.clone();
        if sink.transport.is_fired() {
            session.write_through(None);
            return Flushed::Ended(sink.writer.take());
        }
        let Some(writer) = sink.writer.take() else {
            // A write waiting for room has the socket; it lists the session when done.
            return Flushed::Done;
        };
        let mut copied = std::mem::take(&mut *self.copied.borrow_mut());
        let mut shared = self.shared.borrow_mut();
        loop {
            let Some(taken) = session.take_batch(&mut copied, &mut shared) else {
                *self.copied.borrow_mut() = copied;
                if session.closing_since().is_some() {
                    // Closed and flushed: the session is done with its transport.
                    socket_done(&session);
                    return Flushed::Ended(Some(writer));
                }
                sink.writer = Some(writer);
                return Flushed::Done;
            };
            let sent = if shared.is_empty() {
                writer.send_now(&copied)
            } else {
                writer.send_frames_now(&shared)
            };
            match sent {
                Ok(n) if n == taken.bytes => {
                    session.wrote(n);
                    session.sent(taken);
                    session.recycle_send_buffer(&mut copied);
                    shared.clear();
                }
                Ok(n) => {
                    if n > 0 {
                        session.wrote(n);
                    }
                    let rest = if shared.is_empty() {
                        copied.drain(..n);
                        Rest::Copied(copied)
                    } else {
                        let mut frames = FrameBatch::new(std::mem::take(&mut *shared));
                        frames.consume(n);
                        Rest::Frames(frames)
                    };
                    return Flushed::Blocked(writer, rest, taken);
                }
                Err(_) => {
                    // What was taken is dropped with the socket (a resumable session
                    // sends it again from its replay buffer).
                    copied.clear();
                    *self.copied.borrow_mut() = copied;
                    shared.clear();
                    socket_done(&session);
                    return Flushed::Ended(Some(writer));
                }
            }
        }
    }

    /// A socket whose buffer is full: the rest of the batch is written as the reader
    /// makes room (each part counts as its progress), then the socket goes back to the
    /// pass. The transport's end abandons the write.
    async fn wait_for_room(
        self: Rc<Self>,
        session: Rc<Session>,
        transport: Signal,
        mut writer: Writer,
        rest: Rest,
        taken: Taken,
    ) {
        let stop = transport.watch();
        let result = match rest {
            Rest::Copied(buffer) => {
                let write = write_copied(writer.half(), buffer, &session);
                stop.run(write).await.map(|(result, mut buffer)| {
                    session.recycle_send_buffer(&mut buffer);
                    result
                })
            }
            Rest::Frames(frames) => {
                let write = Box::pin(write_all(writer.half(), frames, &session));
                stop.run(write).await.map(|(result, _)| result)
            }
        };
        match result {
            Some(Ok(())) if !transport.is_fired() => {
                session.sent(taken);
                if let Some(sink) = self.sinks.borrow_mut().get_mut(&session.key) {
                    if sink.transport.same_as(&transport) {
                        sink.writer = Some(writer);
                    }
                }
                session.wake_writer();
            }
            Some(Err(_)) => {
                writer.shutdown();
                self.sinks.borrow_mut().remove(&session.key);
                socket_done(&session);
            }
            // The transport ended meanwhile (its pass dropped the sink).
            _ => writer.shutdown(),
        }
    }
}

/// The session is done with its socket (closed and flushed, or the socket failed): the
/// pass no longer writes it, and the session is told, which ends a session that cannot
/// resume and makes a resumable one wait for a new socket.
fn socket_done(session: &Session) {
    session.write_through(None);
    session.transport_failed();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a pass over sessions (their `written_in`), returning which were deferred.
    fn run_pass(pass: &mut Pass, sessions: &mut [u64]) -> Vec<usize> {
        pass.start();
        (0..sessions.len())
            .filter(|&i| pass.defers(&mut sessions[i], false))
            .collect()
    }

    #[test]
    fn after_a_loaded_pass_its_sessions_wait_one_pass_and_never_two() {
        let mut pass = Pass::default();
        let mut busy = vec![0u64; LOADED as usize];
        assert!(
            run_pass(&mut pass, &mut busy).is_empty(),
            "nothing before was loaded"
        );
        let deferred = run_pass(&mut pass, &mut busy);
        assert_eq!(
            deferred.len(),
            busy.len(),
            "written by the loaded pass before"
        );
        let mut newcomer = 0u64;
        assert!(
            !pass.defers(&mut newcomer, false),
            "not written by it: sent at once"
        );
        pass.start();
        for session in &mut busy {
            assert!(!pass.defers(session, false), "deferred once, written now");
        }
    }

    #[test]
    fn a_light_pass_defers_nothing_and_an_ended_transport_is_never_deferred() {
        let mut pass = Pass::default();
        let mut few = vec![0u64; 10];
        run_pass(&mut pass, &mut few);
        assert!(
            run_pass(&mut pass, &mut few).is_empty(),
            "10 writes are no load"
        );
        let mut many = vec![0u64; LOADED as usize];
        run_pass(&mut pass, &mut many);
        pass.start();
        assert!(!pass.defers(&mut many[0], true), "its transport ended");
        assert!(pass.defers(&mut many[1], false));
    }
}
