//! What a connection has going on beside reading and writing: the invocations queued
//! behind the running one, the streams it is sent, the streams it uploads, and the
//! client results it owes. Plain shard-local state; `shard::dispatch` drives it.
//!
//! Invocations run off the connection's read loop, one at a time and in order (as
//! ASP.NET Core's `MaximumParallelInvocationsPerClient` of 1), so that while a method
//! waits (for room to send, for an upload stream's next item, for a client result of
//! this very connection) the loop still reads the client's stream items, completions
//! and cancellations. What waits is bounded: past [`MAX_QUEUED`] invocations the loop
//! stops reading the client, as it does while its sends are held.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use hashbrown::HashMap;
use ringhub_protocol::Value;

use crate::signal::Signal;

/// Invocations that may wait behind the running one before the connection is no longer
/// read.
pub const MAX_QUEUED: usize = 8;

/// Streams one connection may be sent at once (each is a task of the shard).
pub const MAX_STREAMS: usize = 64;

/// Upload streams one connection may have open at once: each may hold
/// [`UPLOAD_BUFFER`] messages the method has not taken, so this bounds what a client can
/// park on the server.
pub const MAX_UPLOADS: usize = 16;

/// Items an upload stream buffers before its connection is no longer read (ASP.NET
/// Core's `StreamBufferCapacity`).
pub const UPLOAD_BUFFER: usize = 10;

/// A queued invocation: the whole of it, owning what it uses.
pub type Job = Pin<Box<dyn Future<Output = ()>>>;

/// What the client sends on an upload stream.
#[derive(Debug)]
pub enum Upload {
    Item(Value),
    /// The client ended the stream with an error.
    Failed(String),
    /// The client ended the stream.
    Completed,
}

/// An upload stream's buffer: what the client sent and the method has not taken, at
/// most [`UPLOAD_BUFFER`] items. Shard-local (the method reads it on the shard that
/// reads the client), so a plain cell with one waker each way.
#[derive(Default)]
struct UploadBuffer {
    items: VecDeque<Upload>,
    /// The connection side will send nothing more (it ended without a Completion).
    abandoned: bool,
    /// The method dropped its stream: items are not wanted.
    unread: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

/// The connection's end of an upload stream.
#[derive(Clone)]
pub struct UploadSender(Rc<RefCell<UploadBuffer>>);

/// The method's end of an upload stream (see `api::ClientStream`).
pub struct UploadReceiver(Rc<RefCell<UploadBuffer>>);

/// A buffer of [`UPLOAD_BUFFER`] items.
pub fn upload_channel() -> (UploadSender, UploadReceiver) {
    let buffer = Rc::new(RefCell::new(UploadBuffer::default()));
    (UploadSender(buffer.clone()), UploadReceiver(buffer))
}

impl UploadSender {
    /// Ready with `true` once the buffer has room, with `false` if the method no longer
    /// reads the stream.
    pub fn poll_room(&self, cx: &mut Context<'_>) -> Poll<bool> {
        let mut buffer = self.0.borrow_mut();
        if buffer.unread {
            return Poll::Ready(false);
        }
        if buffer.items.len() < UPLOAD_BUFFER {
            return Poll::Ready(true);
        }
        buffer.writer = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Adds what the client sent (call once [`UploadSender::poll_room`] said so).
    pub fn push(&self, upload: Upload) {
        let mut buffer = self.0.borrow_mut();
        buffer.items.push_back(upload);
        if let Some(reader) = buffer.reader.take() {
            reader.wake();
        }
    }

    /// The connection ended: the method's stream ends unfinished.
    fn abandon(&self) {
        let mut buffer = self.0.borrow_mut();
        buffer.abandoned = true;
        if let Some(reader) = buffer.reader.take() {
            reader.wake();
        }
    }
}

impl UploadReceiver {
    /// The next upload; `None` once the connection ended without completing it.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Upload>> {
        let mut buffer = self.0.borrow_mut();
        if let Some(upload) = buffer.items.pop_front() {
            if let Some(writer) = buffer.writer.take() {
                writer.wake();
            }
            return Poll::Ready(Some(upload));
        }
        if buffer.abandoned {
            return Poll::Ready(None);
        }
        buffer.reader = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for UploadReceiver {
    fn drop(&mut self) {
        let mut buffer = self.0.borrow_mut();
        buffer.unread = true;
        buffer.items.clear();
        if let Some(writer) = buffer.writer.take() {
            writer.wake();
        }
    }
}

/// The waker every invocation of a connection is polled with. A job first polled by
/// the read loop may be moved to the invoker task, and monoio's timers keep the waker
/// of their first poll (they never take a newer one): so jobs never see a task's own
/// waker, only this one, which wakes whichever task drives them now.
#[derive(Default)]
pub struct JobWaker(atomic_waker::AtomicWaker);

impl JobWaker {
    /// The task that drives the jobs from now on.
    pub fn register(&self, waker: &Waker) {
        self.0.register(waker);
    }
}

impl futures_util::task::ArcWake for JobWaker {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        arc_self.0.wake();
    }
}

#[derive(Default)]
pub struct Calls {
    /// What the connection's invocations are polled with.
    job_waker: Arc<JobWaker>,
    /// Whether an invocation runs (then new ones queue behind it).
    running: bool,
    queued: VecDeque<Job>,
    /// The read loop, waiting for room in `queued`.
    room: Option<Waker>,
    /// Streams the connection is sent, by invocation id: firing one stops it.
    streams: HashMap<String, Signal>,
    /// Streams the connection uploads, by stream id.
    uploads: HashMap<String, UploadSender>,
    /// Client results this connection was asked for and has not answered (ids of the
    /// node's registry).
    owed: Vec<u64>,
}

impl Calls {
    /// Starts `job` now if nothing runs (true: the caller runs it), else queues it.
    pub fn run_or_queue(&mut self, job: Job) -> Option<Job> {
        if self.running {
            self.queued.push_back(job);
            None
        } else {
            self.running = true;
            Some(job)
        }
    }

    /// What the connection's invocations are polled with (see [`JobWaker`]).
    pub fn job_waker(&self) -> Arc<JobWaker> {
        self.job_waker.clone()
    }

    /// Whether an invocation runs (or waits to).
    #[cfg(test)]
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// The job that ran is done: the next one, if any (else nothing runs).
    pub fn next_job(&mut self) -> Option<Job> {
        let next = self.queued.pop_front();
        self.running = next.is_some();
        if let Some(waker) = self.room.take() {
            waker.wake();
        }
        next
    }

    /// The job handed back by [`Calls::run_or_queue`] finished at once.
    pub fn finished_at_once(&mut self) {
        self.running = false;
    }

    /// Ready once fewer than [`MAX_QUEUED`] invocations wait.
    pub fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.queued.len() < MAX_QUEUED {
            return Poll::Ready(());
        }
        self.room = Some(cx.waker().clone());
        Poll::Pending
    }

    /// A stream the connection is sent starts; `None` when it has [`MAX_STREAMS`]
    /// already, or one under that id.
    pub fn start_stream(&mut self, invocation_id: &str) -> Option<Signal> {
        if self.streams.len() >= MAX_STREAMS || self.streams.contains_key(invocation_id) {
            return None;
        }
        let stop = Signal::default();
        self.streams.insert(invocation_id.to_owned(), stop.clone());
        Some(stop)
    }

    pub fn stream_ended(&mut self, invocation_id: &str) {
        self.streams.remove(invocation_id);
    }

    /// The client's CancelInvocation (unknown ids are ignored, as ASP.NET Core does).
    pub fn cancel_stream(&mut self, invocation_id: &str) {
        if let Some(stop) = self.streams.remove(invocation_id) {
            stop.fire();
        }
    }

    /// Opens the upload streams of an invocation; `None` if one of the ids is in use, or
    /// they would be more than [`MAX_UPLOADS`].
    pub fn open_uploads(&mut self, stream_ids: &[String]) -> Option<Vec<UploadReceiver>> {
        if self.uploads.len() + stream_ids.len() > MAX_UPLOADS {
            return None;
        }
        if stream_ids
            .iter()
            .enumerate()
            .any(|(i, id)| self.uploads.contains_key(id) || stream_ids[..i].contains(id))
        {
            return None;
        }
        let mut receivers = Vec::with_capacity(stream_ids.len());
        for id in stream_ids {
            let (sender, receiver) = upload_channel();
            self.uploads.insert(id.clone(), sender);
            receivers.push(receiver);
        }
        Some(receivers)
    }

    /// The sender of upload stream `id`; ending it (a Completion) removes it.
    pub fn upload(&mut self, id: &str, ends: bool) -> Option<UploadSender> {
        if ends {
            self.uploads.remove(id)
        } else {
            self.uploads.get(id).cloned()
        }
    }

    pub fn owe(&mut self, result_id: u64) {
        self.owed.push(result_id);
    }

    /// Whether the connection owed result `id` (it does no more).
    pub fn answered(&mut self, result_id: u64) -> bool {
        match self.owed.iter().position(|&owed| owed == result_id) {
            Some(at) => {
                self.owed.swap_remove(at);
                true
            }
            None => false,
        }
    }

    /// The connection ended: its streams stop, its uploads end unfinished (their
    /// methods see it), and the client results it owes are returned to be failed.
    pub fn end(&mut self) -> Vec<u64> {
        for (_, stop) in self.streams.drain() {
            stop.fire();
        }
        // Ended without a Completion: the receiving method reads that as the
        // connection gone.
        for (_, upload) in self.uploads.drain() {
            upload.abandon();
        }
        std::mem::take(&mut self.owed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upload_buffer_takes_ten_items_then_waits_for_the_reader() {
        let (sender, mut receiver) = upload_channel();
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        for n in 0..UPLOAD_BUFFER as i64 {
            assert_eq!(sender.poll_room(&mut cx), Poll::Ready(true));
            sender.push(Upload::Item(Value::Int(n)));
        }
        assert_eq!(sender.poll_room(&mut cx), Poll::Pending, "full");
        assert!(matches!(
            receiver.poll_next(&mut cx),
            Poll::Ready(Some(Upload::Item(Value::Int(0))))
        ));
        assert_eq!(sender.poll_room(&mut cx), Poll::Ready(true), "room for one");
        sender.abandon();
        for _ in 1..UPLOAD_BUFFER {
            assert!(matches!(receiver.poll_next(&mut cx), Poll::Ready(Some(_))));
        }
        assert!(
            matches!(receiver.poll_next(&mut cx), Poll::Ready(None)),
            "abandoned"
        );
        drop(receiver);
        assert_eq!(
            sender.poll_room(&mut cx),
            Poll::Ready(false),
            "no one reads"
        );
    }

    #[test]
    fn jobs_run_one_at_a_time_in_order() {
        let mut calls = Calls::default();
        let first = calls.run_or_queue(Box::pin(async {}));
        assert!(first.is_some(), "nothing ran: the first runs at once");
        assert!(calls.run_or_queue(Box::pin(async {})).is_none(), "queued");
        assert!(calls.next_job().is_some(), "the queued one is next");
        assert!(calls.next_job().is_none());
        assert!(
            calls.run_or_queue(Box::pin(async {})).is_some(),
            "idle again"
        );
    }

    #[test]
    fn upload_ids_are_unique_and_a_completion_ends_one() {
        let mut calls = Calls::default();
        let ids = vec!["1".to_owned(), "2".to_owned()];
        assert_eq!(calls.open_uploads(&ids).map(|r| r.len()), Some(2));
        assert!(calls.open_uploads(&["2".to_owned()]).is_none(), "in use");
        assert!(calls
            .open_uploads(&["3".to_owned(), "3".to_owned()])
            .is_none());
        assert!(calls.upload("1", false).is_some());
        assert!(calls.upload("1", true).is_some(), "ended");
        assert!(calls.upload("1", false).is_none());
    }

    #[test]
    fn an_ended_connection_stops_its_streams_and_returns_what_it_owes() {
        let mut calls = Calls::default();
        let stop = calls.start_stream("7").expect("a stream");
        assert!(calls.start_stream("7").is_none(), "one stream per id");
        calls.owe(1);
        calls.owe(2);
        assert!(calls.answered(1));
        assert!(!calls.answered(1), "answered once");
        assert_eq!(calls.end(), vec![2]);
        assert!(stop.is_fired());
    }
}
