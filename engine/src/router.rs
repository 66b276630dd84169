//! Routing inside one shard, and the messages between shards.
//!
//! Each shard keeps, per hub, its own tables: connections, `group -> local members`
//! and `user -> local connections`. A send is turned into a [`Broadcast`] that every
//! shard resolves against its own tables; no table is shared, so no lock is taken on
//! the message path. The frames of a broadcast are encoded at most once per hub
//! protocol, by whichever shard needs them first, and every recipient on every shard
//! gets that frame (a reference to the same `Bytes`, or a copy of its bytes in the
//! connection's send buffer when it is small: see `conn`).

use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

use atomic_waker::AtomicWaker;
use bytes::Bytes;
use crossbeam_queue::SegQueue;
use futures_channel::oneshot;
use hashbrown::{HashMap, HashSet};
use ringhub_protocol::{frame, HubMessage, HubProtocol};

use crate::conn::Conn;
use crate::hub::Target;

/// How many frames were encoded for broadcasts since start (for the fan-out tests).
pub static BROADCAST_ENCODES: AtomicU64 = AtomicU64::new(0);

/// A message on its way to many connections, with its frames encoded lazily, once per
/// protocol, and shared by every shard.
#[derive(Debug)]
pub struct Broadcast {
    message: HubMessage,
    json: OnceLock<Bytes>,
    msgpack: OnceLock<Bytes>,
}

impl Broadcast {
    pub fn new(message: HubMessage) -> Broadcast {
        Broadcast {
            message,
            json: OnceLock::new(),
            msgpack: OnceLock::new(),
        }
    }

    /// The complete WebSocket frame for `protocol` (a reference-count clone).
    pub fn frame(&self, protocol: HubProtocol) -> Bytes {
        let cell = match protocol {
            HubProtocol::Json => &self.json,
            HubProtocol::MessagePack => &self.msgpack,
        };
        cell.get_or_init(|| {
            BROADCAST_ENCODES.fetch_add(1, Relaxed);
            frame::encode_message(protocol, &self.message)
        })
        .clone()
    }
}

/// What one shard asks of another.
pub enum Command {
    Deliver {
        hub: Arc<str>,
        target: Arc<Target>,
        broadcast: Arc<Broadcast>,
    },
    /// Acts on a connection if it lives here; the reply says whether it did.
    Connection {
        hub: Arc<str>,
        connection_id: String,
        op: ConnectionOp,
        reply: oneshot::Sender<bool>,
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
    /// Close it with a Close message (reconnect not suggested).
    Close,
}

/// A shard's inbox: a lock-free unbounded MPSC queue (producers never block, a
/// thread-per-core shard must never wait on another) with a waker that costs one
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

    /// Waits for commands and hands each to `handle`, until `handle` returns false.
    ///
    /// After [`INBOX_BUDGET`] commands it yields, so the writers it woke get to flush
    /// (once each, for everything queued meanwhile) even while other shards keep sending.
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
/// bound before the writers get to flush.
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

/// One hub's tables on one shard. Connections are keyed by a shard-local number.
#[derive(Default)]
pub struct HubTables {
    pub conns: HashMap<u64, Rc<Conn>>,
    by_id: HashMap<String, u64>,
    groups: HashMap<String, Members>,
    users: HashMap<String, Members>,
    /// group -> local connections watching its presence.
    watchers: HashMap<String, Members>,
}

/// A set of local connections by key, holding the connections themselves: a fan-out
/// walks the set without a lookup per recipient in the connection table (a cache miss
/// each with 10,000 connections).
type Members = HashMap<u64, Rc<Conn>>;

impl HubTables {
    pub fn insert(&mut self, conn: Rc<Conn>) {
        self.by_id
            .insert(conn.caller.connection_id.clone(), conn.key);
        if let Some(user) = &conn.caller.user_id {
            self.users
                .entry(user.clone())
                .or_default()
                .insert(conn.key, conn.clone());
        }
        self.conns.insert(conn.key, conn);
    }

    /// Removes a connection from every table, leaving its groups and its watches; calls
    /// `left(group)` for each group it was in and `unwatched(group)` for each watch.
    pub fn remove(
        &mut self,
        key: u64,
        mut left: impl FnMut(&str),
        mut unwatched: impl FnMut(&str),
    ) -> Option<Rc<Conn>> {
        let conn = self.conns.remove(&key)?;
        self.by_id.remove(&conn.caller.connection_id);
        if let Some(user) = &conn.caller.user_id {
            remove_member(&mut self.users, user, key);
        }
        for group in conn.groups.borrow_mut().drain() {
            remove_member(&mut self.groups, &group, key);
            left(&group);
        }
        for group in conn.watching.borrow_mut().drain() {
            remove_member(&mut self.watchers, &group, key);
            unwatched(&group);
        }
        Some(conn)
    }

    pub fn key_of(&self, connection_id: &str) -> Option<u64> {
        self.by_id.get(connection_id).copied()
    }

    pub fn conn(&self, key: u64) -> Option<&Rc<Conn>> {
        self.conns.get(&key)
    }

    /// Adds the connection to the group; true if it was not in it.
    pub fn join(&mut self, key: u64, group: &str) -> bool {
        let Some(conn) = self.conns.get(&key) else {
            return false;
        };
        if !conn.groups.borrow_mut().insert(group.to_owned()) {
            return false;
        }
        let conn = conn.clone();
        self.groups.entry_ref(group).or_default().insert(key, conn);
        true
    }

    /// Removes the connection from the group; true if it was in it.
    pub fn leave(&mut self, key: u64, group: &str) -> bool {
        let Some(conn) = self.conns.get(&key) else {
            return false;
        };
        if !conn.groups.borrow_mut().remove(group) {
            return false;
        }
        remove_member(&mut self.groups, group, key);
        true
    }

    /// Starts or stops the connection's watch of a group; true if that changed anything.
    pub fn watch(&mut self, key: u64, group: &str, watch: bool) -> bool {
        let Some(conn) = self.conns.get(&key) else {
            return false;
        };
        if watch {
            if !conn.watching.borrow_mut().insert(group.to_owned()) {
                return false;
            }
            let conn = conn.clone();
            self.watchers
                .entry_ref(group)
                .or_default()
                .insert(key, conn);
        } else {
            if !conn.watching.borrow_mut().remove(group) {
                return false;
            }
            remove_member(&mut self.watchers, group, key);
        }
        true
    }

    /// Hands the broadcast's frame to every local watcher of `group`.
    pub fn notify_watchers(&self, group: &str, broadcast: &Broadcast) {
        let Some(watchers) = self.watchers.get(group) else {
            return;
        };
        let mut frames = FrameCache::new(broadcast);
        for conn in watchers.values() {
            conn.enqueue(frames.get(conn.protocol));
        }
    }

    /// Hands the broadcast's frame to every local recipient of `target`, each once.
    /// Returns how many connections it was queued for.
    pub fn deliver(&self, target: &Target, broadcast: &Broadcast) -> usize {
        let mut frames = FrameCache::new(broadcast);
        let mut count = 0;
        let mut send = |conn: &Rc<Conn>| {
            if conn.enqueue(frames.get(conn.protocol)) {
                count += 1;
            }
        };
        let keys_of = |ids: &[String]| -> HashSet<u64> {
            ids.iter().filter_map(|id| self.key_of(id)).collect()
        };
        match target {
            Target::All => self.conns.values().for_each(&mut send),
            Target::AllExcept(ids) => except(&self.conns, &keys_of(ids)).for_each(&mut send),
            Target::Connection(id) => self
                .key_of(id)
                .and_then(|key| self.conns.get(&key))
                .into_iter()
                .for_each(&mut send),
            Target::Connections(ids) => keys_of(ids)
                .iter()
                .filter_map(|key| self.conns.get(key))
                .for_each(&mut send),
            Target::Group(group) => {
                if let Some(members) = self.groups.get(group) {
                    members.values().for_each(&mut send);
                }
            }
            Target::GroupExcept(group, ids) => {
                if let Some(members) = self.groups.get(group) {
                    except(members, &keys_of(ids)).for_each(&mut send);
                }
            }
            Target::Groups(groups) => union(groups.iter().filter_map(|g| self.groups.get(g)))
                .values()
                .for_each(|conn| send(conn)),
            Target::User(user) => {
                if let Some(conns) = self.users.get(user) {
                    conns.values().for_each(&mut send);
                }
            }
            Target::Users(users) => union(users.iter().filter_map(|u| self.users.get(u)))
                .values()
                .for_each(|conn| send(conn)),
        }
        count
    }
}

/// The members whose keys are not in `excluded`.
fn except<'a>(
    members: &'a Members,
    excluded: &'a HashSet<u64>,
) -> impl Iterator<Item = &'a Rc<Conn>> {
    members
        .iter()
        .filter(|(key, _)| !excluded.contains(*key))
        .map(|(_, conn)| conn)
}

/// Removes `key` from the set under `name`, dropping the set once empty.
fn remove_member(sets: &mut HashMap<String, Members>, name: &str, key: u64) {
    if let Some(set) = sets.get_mut(name) {
        set.remove(&key);
        if set.is_empty() {
            sets.remove(name);
        }
    }
}

/// The union of several member sets, so that a connection in two of them gets one copy.
fn union<'a>(sets: impl Iterator<Item = &'a Members>) -> HashMap<u64, &'a Rc<Conn>> {
    let mut all = HashMap::new();
    for set in sets {
        all.extend(set.iter().map(|(key, conn)| (*key, conn)));
    }
    all
}

/// The frames of one broadcast as this shard needs them: fetched from the shared
/// cells once per protocol, then cloned (a reference count) per recipient.
struct FrameCache<'a> {
    broadcast: &'a Broadcast,
    json: Option<Bytes>,
    msgpack: Option<Bytes>,
}

impl<'a> FrameCache<'a> {
    fn new(broadcast: &'a Broadcast) -> Self {
        FrameCache {
            broadcast,
            json: None,
            msgpack: None,
        }
    }

    fn get(&mut self, protocol: HubProtocol) -> &Bytes {
        let slot = match protocol {
            HubProtocol::Json => &mut self.json,
            HubProtocol::MessagePack => &mut self.msgpack,
        };
        slot.get_or_insert_with(|| self.broadcast.frame(protocol))
    }
}
