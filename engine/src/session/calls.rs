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

use futures_channel::mpsc;
use hashbrown::HashMap;
use ringhub_protocol::Value;

use crate::signal::Signal;

/// Invocations that may wait behind the running one before the connection is no longer
/// read.
pub const MAX_QUEUED: usize = 8;

/// Streams one connection may be sent at once (each is a task of the shard).
pub const MAX_STREAMS: usize = 64;

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

/// The receiving end of an upload stream (see `api::ClientStream`).
pub type UploadReceiver = mpsc::Receiver<Upload>;

/// A bounded channel of [`UPLOAD_BUFFER`] items.
pub fn upload_channel() -> (mpsc::Sender<Upload>, UploadReceiver) {
    // A futures channel holds `buffer` plus one item per sender.
    mpsc::channel(UPLOAD_BUFFER - 1)
}

#[derive(Default)]
pub struct Calls {
    /// Whether an invocation runs (then new ones queue behind it).
    running: bool,
    queued: VecDeque<Job>,
    /// The read loop, waiting for room in `queued`.
    room: Option<Waker>,
    /// Streams the connection is sent, by invocation id: firing one stops it.
    streams: HashMap<String, Signal>,
    /// Streams the connection uploads, by stream id.
    uploads: HashMap<String, mpsc::Sender<Upload>>,
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

    /// Opens the upload streams of an invocation; `None` if one of the ids is in use.
    pub fn open_uploads(&mut self, stream_ids: &[String]) -> Option<Vec<UploadReceiver>> {
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
    pub fn upload(&mut self, id: &str, ends: bool) -> Option<mpsc::Sender<Upload>> {
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
        // Dropping the senders ends the streams without a Completion: the receiving
        // method reads that as the connection gone.
        self.uploads.clear();
        std::mem::take(&mut self.owed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
