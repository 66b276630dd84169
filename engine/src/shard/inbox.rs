//! What one shard asks of another, and the lock-free queue it arrives in.

use std::sync::Arc;

use atomic_waker::AtomicWaker;
use crossbeam_queue::SegQueue;
use futures_channel::oneshot;

use crate::api::types::{ContextError, Target};
use crate::fanout::Broadcast;
use crate::flow::Ticket;
use crate::shard::tokens::Negotiated;
use crate::store::DurableGroups;

/// What one shard asks of another.
pub enum Command {
    Deliver {
        hub: Arc<str>,
        target: Arc<Target>,
        broadcast: Arc<Broadcast>,
        /// The send's charge on its publisher's window: every inbox's copy holds it, so
        /// what waits in inboxes is bounded by the publishers' windows (see `flow`).
        ticket: Option<Arc<Ticket>>,
    },
    /// Acts on a connection if it lives here; the reply says whether it did.
    Connection {
        hub: Arc<str>,
        connection_id: String,
        op: ConnectionOp,
        reply: oneshot::Sender<Result<bool, ContextError>>,
    },
    /// The user's connections here take on these durable groups (unless they have a
    /// newer version of them); the reply counts the connections.
    Durable {
        hub: Arc<str>,
        user: String,
        groups: Arc<DurableGroups>,
        reply: oneshot::Sender<usize>,
    },
    /// The connections of a group here, with their user ids.
    GroupMembers {
        hub: Arc<str>,
        group: String,
        reply: oneshot::Sender<Vec<(String, Option<String>)>>,
    },
    /// Redis answers again: every connection with a user reads its durable groups anew
    /// (made or changed while this node could not read them).
    ResyncDurable,
    /// Keep a token negotiated on another shard (sessions are spread over the shards by
    /// negotiate, whichever shard the client's HTTP connection reached).
    Negotiated {
        token: String,
        negotiated: Negotiated,
    },
    /// Serve this HTTP connection: its request is for a token this shard owns. The
    /// bytes already read from it (the request head first) come along.
    Adopt {
        socket: std::net::TcpStream,
        buffered: bytes::BytesMut,
    },
    Shutdown,
}

/// What can be done to a connection from anywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionOp {
    Join(String),
    Leave(String),
    WatchPresence(String),
    UnwatchPresence(String),
    /// Close it with a Close message (reconnect not suggested), carrying `reason` as
    /// its error when one is given.
    Close {
        reason: Option<String>,
    },
    /// Leave every group it is in.
    LeaveAll,
    /// Send it a client result's Invocation; it owes the answer.
    InvokeClient(ClientInvocation),
}

/// A client result's Invocation for one connection (see `HubContext::invoke_client`).
#[derive(Clone)]
pub struct ClientInvocation {
    /// The waiter's id in the node's `ClientResults` (the invocation id says it too).
    pub result_id: u64,
    pub invocation: Arc<Broadcast>,
}

impl std::fmt::Debug for ClientInvocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientInvocation({})", self.result_id)
    }
}

/// The same waiter (the invocation is made once per waiter).
impl PartialEq for ClientInvocation {
    fn eq(&self, other: &Self) -> bool {
        self.result_id == other.result_id
    }
}

impl Eq for ClientInvocation {}

/// A shard's inbox: a lock-free MPSC queue (producers never block, a thread-per-core
/// shard must never wait on another; what it holds is bounded by the publishers'
/// windows, each send holding its ticket until handled) with a waker that costs one
/// atomic swap when the shard is busy and only wakes it when it is parked.
#[derive(Default)]
pub struct Inbox {
    queue: SegQueue<Command>,
    waker: AtomicWaker,
}

impl Inbox {
    pub fn push(&self, command: Command) {
        self.queue.push(command);
        self.waker.wake();
    }

    /// The oldest command, if any (for the owning shard only).
    pub fn try_pop(&self) -> Option<Command> {
        self.queue.pop()
    }

    /// Waits for commands and hands each to `handle`, until `handle` returns false.
    ///
    /// After [`INBOX_BUDGET`] commands it yields, so the flush pass gets to write what
    /// they queued (once per session, for everything queued meanwhile) even while other
    /// shards keep sending.
    pub async fn run(&self, mut handle: impl FnMut(Command) -> bool) {
        loop {
            let mut handled = 0;
            while let Some(command) = self.queue.pop() {
                if !handle(command) {
                    return;
                }
                handled += 1;
                if handled == INBOX_BUDGET {
                    handled = 0;
                    yield_now().await;
                }
            }
            std::future::poll_fn(|cx| {
                self.waker.register(cx.waker());
                if self.queue.is_empty() {
                    std::task::Poll::Pending
                } else {
                    std::task::Poll::Ready(())
                }
            })
            .await;
        }
    }
}

/// Commands handled in a row before the inbox lets the shard's other tasks run: small
/// enough that a burst of largest messages (16 x 32 KiB) stays under the default queue
/// bound before the flush pass gets to write.
const INBOX_BUDGET: usize = 16;

/// Lets every other ready task of this thread run once.
async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            std::task::Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await
}
