//! The seam between a node and the other nodes of its cluster (contract section 7):
//! what a node hands to its backplane thread ([`Outgoing`], through a [`Link`]), and
//! the messages nodes exchange over Redis pub/sub ([`Wire`]), in a small binary format
//! that is checked as it is read (another node's bytes are input like any other).
//!
//! The backplane thread itself (Redis, its runtime, what arrives) is `cluster`; this
//! module is plain data, so that presence and `HubContext` can hand things over
//! without knowing Redis.
//!
//! Channels, after ASP.NET Core's Redis backplane: one for all connections, one per
//! group, user and connection (subscribed only while this node has one), one per node
//! (answers to its requests) and one for presence.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_channel::{mpsc, oneshot};
use thiserror::Error;

pub use crate::api::types::BackplaneError;
use crate::api::types::Target;
use crate::fanout::Broadcast;
use crate::flow::Ticket;
use crate::store::{DurableGroups, MembershipStore, StoreError};

/// Every key and channel of a cluster starts with this.
pub const PREFIX: &str = "ringhub";

pub fn all_channel() -> String {
    format!("{PREFIX}:all")
}
pub fn group_channel(hub: &str, group: &str) -> String {
    format!("{PREFIX}:group:{hub}:{group}")
}
pub fn user_channel(hub: &str, user: &str) -> String {
    format!("{PREFIX}:user:{hub}:{user}")
}
pub fn connection_channel(hub: &str, connection_id: &str) -> String {
    format!("{PREFIX}:conn:{hub}:{connection_id}")
}
pub fn node_channel(node: &str) -> String {
    format!("{PREFIX}:node:{node}")
}
pub fn presence_channel() -> String {
    format!("{PREFIX}:presence")
}
/// A user's durable groups (a Redis set).
pub fn durable_key(hub: &str, user: &str) -> String {
    format!("{PREFIX}:durable:{hub}:{user}")
}
/// The version of a user's durable groups (see [`DurableGroups`]).
pub fn durable_version_key(hub: &str, user: &str) -> String {
    format!("{PREFIX}:durable-version:{hub}:{user}")
}
/// A negotiated token, for whichever node the client connects to.
pub fn token_key(token: &str) -> String {
    format!("{PREFIX}:token:{token}")
}

/// The channel a send travels on: a group's, a user's or a connection's when it names
/// one; sends to several groups, users or connections go to every node (each resolves
/// the union against its own tables, so a connection in two of the groups gets it once).
pub fn send_channel(hub: &str, target: &Target) -> String {
    match target {
        Target::Group(group) | Target::GroupExcept(group, _) => group_channel(hub, group),
        Target::User(user) | Target::UserExcept(user, _) => user_channel(hub, user),
        Target::Connection(id) => connection_channel(hub, id),
        Target::All
        | Target::AllExcept(_)
        | Target::Groups(_)
        | Target::Users(_)
        | Target::Connections(_) => all_channel(),
    }
}

/// What is asked of another node: of whichever node holds a connection (published on
/// the connection's channel) or of every node with connections of a user (on the
/// user's channel); answered on the asking node's channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteOp {
    /// Join, leave, watch, unwatch or close one connection.
    Connection {
        connection_id: String,
        op: RemoteOpKind,
        /// The group it is about; for a close, the reason given (empty: none).
        group: String,
    },
    /// The user's connections take on its durable groups as of this version.
    Durable { user: String, groups: DurableGroups },
    /// A client result: the connection is sent `invocation` (a MessagePack Invocation
    /// without an id; the node holding it numbers it) and its answer is awaited for at
    /// most `timeout_ms`.
    InvokeClient {
        connection_id: String,
        invocation: Bytes,
        timeout_ms: u64,
    },
    /// Every node with members of the group (on the group's channel) says who they are.
    GroupMembers { group: String },
}

impl RemoteOp {
    /// How long the asking node waits for the answers: a client result for its own
    /// timeout and then as long as any request.
    pub fn answer_within(&self) -> std::time::Duration {
        match self {
            RemoteOp::InvokeClient { timeout_ms, .. } => {
                std::time::Duration::from_millis(*timeout_ms) + REQUEST_TIMEOUT
            }
            _ => REQUEST_TIMEOUT,
        }
    }
}

/// How long a node waits for the answers to what it asked of others.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteOpKind {
    Join,
    Leave,
    Watch,
    Unwatch,
    Close,
    /// Leave every group.
    LeaveAll,
}

impl RemoteOpKind {
    const ALL: [RemoteOpKind; 6] = [
        RemoteOpKind::Join,
        RemoteOpKind::Leave,
        RemoteOpKind::Watch,
        RemoteOpKind::Unwatch,
        RemoteOpKind::Close,
        RemoteOpKind::LeaveAll,
    ];
}

/// A node's answer to a [`RemoteOp`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The connection is not on that node.
    NotHere,
    Done,
    TooManyGroups(u64),
    Failed(String),
    /// What a client result came to: its Completion (MessagePack, without framing).
    ClientResult(Bytes),
    /// A node's members of a group: (connection id, user id).
    Members(Vec<(String, Option<String>)>),
}

/// One change of a node's presence, in the order the node made them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceEvent {
    Connected {
        hub: String,
        connection_id: String,
        user: Option<String>,
    },
    Disconnected {
        hub: String,
        connection_id: String,
    },
    Joined {
        hub: String,
        group: String,
        user: Option<String>,
    },
    Left {
        hub: String,
        group: String,
        user: Option<String>,
    },
}

/// One hub of a node's presence, whole.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HubSnapshot {
    pub hub: String,
    /// (connection id, user id)
    pub connections: Vec<(String, Option<String>)>,
    pub groups: Vec<GroupSnapshot>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupSnapshot {
    pub group: String,
    pub connections: u64,
    /// (user id, how many of its connections are in the group)
    pub users: Vec<(String, u64)>,
}

/// What nodes tell each other over Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wire {
    /// A send: the hub record once per protocol (framings are added by each node).
    Send {
        origin: String,
        hub: String,
        target: Target,
        json: Bytes,
        messagepack: Bytes,
    },
    Request {
        origin: String,
        id: u64,
        hub: String,
        op: RemoteOp,
    },
    Reply {
        id: u64,
        answer: Answer,
    },
    Presence {
        origin: String,
        seq: u64,
        event: PresenceEvent,
    },
    /// A node's whole presence as of its change number `seq`.
    Snapshot {
        origin: String,
        seq: u64,
        hubs: Vec<HubSnapshot>,
    },
    /// A node is alive; `seq` is the last presence change it published.
    Heartbeat {
        origin: String,
        name: String,
        seq: u64,
    },
    /// A node (re)joined: every node publishes a snapshot, and nodes of the same name
    /// (the node it restarts) are forgotten.
    Hello {
        origin: String,
        name: String,
    },
    /// Asks `node` for a snapshot (a receiver missed some of its changes).
    Want {
        node: String,
    },
    /// A node stops: its connections no longer count.
    Gone {
        origin: String,
    },
}

/// What the backplane thread is asked to do. Sent without waiting (an unbounded
/// queue: what it holds is bounded by the publishers' windows, whose tickets ride
/// along with sends until published).
pub enum Outgoing {
    Send {
        hub: Arc<str>,
        target: Arc<Target>,
        broadcast: Arc<Broadcast>,
        ticket: Option<Arc<Ticket>>,
    },
    /// A change of this node's presence, numbered by the registry that made it.
    Presence {
        seq: u64,
        event: PresenceEvent,
    },
    Subscribe(String),
    Unsubscribe(String),
    /// Answered once every subscription asked for before it is in effect; at once while
    /// Redis is unreachable, and after [`BARRIER_BOUND`] at the latest (a hung Redis
    /// does not hold a handshake or a join longer).
    Barrier(oneshot::Sender<()>),
    /// Published on `channel`; answered with every receiving node's answer.
    Request {
        channel: String,
        hub: String,
        op: RemoteOp,
        reply: oneshot::Sender<Result<Vec<Answer>, BackplaneError>>,
    },
    /// Durable membership in Redis (answered within [`STORE_BOUND`]).
    Store {
        op: StoreOp,
        reply: oneshot::Sender<Result<DurableGroups, BackplaneError>>,
    },
    /// A negotiated token, kept for the node the client connects to.
    SaveToken {
        token: String,
        negotiated: Bytes,
    },
    /// Takes a token another node negotiated (`None` if there is none).
    FetchToken {
        token: String,
        reply: oneshot::Sender<Option<Bytes>>,
    },
    /// The node stopped: leave Redis.
    Stop,
}

/// How long the backplane lets a barrier wait for Redis before answering it anyway.
pub const BARRIER_BOUND: std::time::Duration = std::time::Duration::from_secs(2);
/// How long a durable-membership operation may wait for Redis.
pub const STORE_BOUND: std::time::Duration = std::time::Duration::from_secs(2);

/// A durable-membership operation (one Redis set per hub and user, and its version);
/// each answers the user's groups as they are after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOp {
    Read {
        hub: String,
        user: String,
    },
    Add {
        hub: String,
        user: String,
        group: String,
    },
    Remove {
        hub: String,
        user: String,
        group: String,
    },
}

/// The backplane thread's end of a [`Link`]: what it is asked, the flag it keeps
/// true while Redis is reachable, and the node's id.
pub struct LinkEnd {
    pub queue: mpsc::UnboundedReceiver<Outgoing>,
    pub connected: Arc<AtomicBool>,
    /// This node's id in the cluster (its name and a random suffix).
    pub node_id: Arc<str>,
}

/// A node's handle on its backplane thread: `Clone + Send + Sync`, never blocks.
#[derive(Clone)]
pub struct Link {
    queue: mpsc::UnboundedSender<Outgoing>,
    connected: Arc<AtomicBool>,
}

impl Link {
    /// A link, and the end its thread serves.
    pub fn new(node_id: String) -> (Link, LinkEnd) {
        let (queue, receiver) = mpsc::unbounded();
        let connected = Arc::new(AtomicBool::new(false));
        let link = Link {
            queue,
            connected: connected.clone(),
        };
        let end = LinkEnd {
            queue: receiver,
            connected,
            node_id: node_id.into(),
        };
        (link, end)
    }

    pub fn send(&self, outgoing: Outgoing) {
        // A stopped thread drops what it is given: the node is shutting down.
        let _ = self.queue.unbounded_send(outgoing);
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Resolves once every subscription asked for so far is in effect; at once while
    /// Redis is unreachable (they are made when it is back), and within
    /// [`BARRIER_BOUND`] whatever Redis does.
    pub async fn barrier(&self) {
        let (reply, answer) = oneshot::channel();
        self.send(Outgoing::Barrier(reply));
        let _ = answer.await;
    }

    pub async fn request(
        &self,
        channel: String,
        hub: &str,
        op: RemoteOp,
    ) -> Result<Vec<Answer>, BackplaneError> {
        let (reply, answer) = oneshot::channel();
        self.send(Outgoing::Request {
            channel,
            hub: hub.to_owned(),
            op,
            reply,
        });
        answer.await.unwrap_or(Err(BackplaneError::Stopped))
    }

    pub async fn store(&self, op: StoreOp) -> Result<DurableGroups, BackplaneError> {
        let (reply, answer) = oneshot::channel();
        self.send(Outgoing::Store { op, reply });
        answer.await.unwrap_or(Err(BackplaneError::Stopped))
    }

    pub async fn fetch_token(&self, token: &str) -> Option<Bytes> {
        let (reply, answer) = oneshot::channel();
        self.send(Outgoing::FetchToken {
            token: token.to_owned(),
            reply,
        });
        answer.await.ok().flatten()
    }
}

/// Durable membership in Redis (with `--redis`): one set per hub and user, shared by
/// every node of the cluster. Its calls block on the backplane thread, which talks to
/// Redis: the engine makes them from its store thread only (reads at connect time and
/// durable changes go to the backplane directly, without blocking a shard).
pub(crate) struct RedisStore {
    pub(crate) link: Link,
}

impl RedisStore {
    fn run(&self, op: StoreOp) -> Result<DurableGroups, StoreError> {
        futures_executor::block_on(self.link.store(op))
            .map_err(|e| StoreError::Database(e.to_string()))
    }
}

impl MembershipStore for RedisStore {
    fn user_groups(&self, hub: &str, user: &str) -> Result<Vec<String>, StoreError> {
        self.run(StoreOp::Read {
            hub: hub.to_owned(),
            user: user.to_owned(),
        })
        .map(|durable| durable.groups)
    }

    fn add(&self, hub: &str, user: &str, group: &str) -> Result<(), StoreError> {
        self.run(StoreOp::Add {
            hub: hub.to_owned(),
            user: user.to_owned(),
            group: group.to_owned(),
        })
        .map(drop)
    }

    fn remove(&self, hub: &str, user: &str, group: &str) -> Result<(), StoreError> {
        self.run(StoreOp::Remove {
            hub: hub.to_owned(),
            user: user.to_owned(),
            group: group.to_owned(),
        })
        .map(drop)
    }
}

/// Checks the records of another node's send as a client's input is checked (contract
/// section 6): for each protocol one whole record (JSON: text ending in its 0x1E;
/// MessagePack: its length prefix and body), at most `limit` bytes, of a non-blocking
/// invocation, which is all a send ever is. A record that is not would reach clients as
/// garbage, a forged Close, or a frame too large for any queue.
pub fn check_send_records(json: &[u8], messagepack: &[u8], limit: usize) -> Result<(), Malformed> {
    use ringhub_protocol::{HubMessage, HubProtocol};
    for (protocol, record) in [
        (HubProtocol::Json, json),
        (HubProtocol::MessagePack, messagepack),
    ] {
        let split = protocol
            .split_record(record, limit)
            .map_err(|_| Malformed)?
            .ok_or(Malformed)?;
        if split.consumed != record.len() {
            return Err(Malformed);
        }
        match protocol.parse(split.body) {
            Ok(Some(HubMessage::Invocation(invocation))) if invocation.invocation_id.is_none() => {}
            _ => return Err(Malformed),
        }
    }
    Ok(())
}

/// Another node's bytes that are not a backplane message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("malformed backplane message")]
pub struct Malformed;

/// The most elements a list of a backplane message may claim (a malformed length must
/// not make a node allocate out of proportion to what it received).
const MAX_LIST: usize = 1 << 24;

struct Writer(BytesMut);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.put_u8(v);
    }
    fn u64(&mut self, v: u64) {
        self.0.put_u64(v);
    }
    fn bytes(&mut self, v: &[u8]) {
        self.0.put_u32(v.len() as u32);
        self.0.put_slice(v);
    }
    fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }
    fn opt(&mut self, v: Option<&str>) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                self.str(v);
            }
        }
    }
    fn strs(&mut self, v: &[String]) {
        self.0.put_u32(v.len() as u32);
        v.iter().for_each(|s| self.str(s));
    }
}

struct Reader(Bytes);

impl Reader {
    fn u8(&mut self) -> Result<u8, Malformed> {
        (self.0.remaining() >= 1)
            .then(|| self.0.get_u8())
            .ok_or(Malformed)
    }
    fn u64(&mut self) -> Result<u64, Malformed> {
        (self.0.remaining() >= 8)
            .then(|| self.0.get_u64())
            .ok_or(Malformed)
    }
    fn len(&mut self) -> Result<usize, Malformed> {
        if self.0.remaining() < 4 {
            return Err(Malformed);
        }
        let len = self.0.get_u32() as usize;
        (len <= MAX_LIST).then_some(len).ok_or(Malformed)
    }
    fn bytes(&mut self) -> Result<Bytes, Malformed> {
        let len = self.len()?;
        (self.0.remaining() >= len)
            .then(|| self.0.split_to(len))
            .ok_or(Malformed)
    }
    fn str(&mut self) -> Result<String, Malformed> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| Malformed)
    }
    fn opt(&mut self) -> Result<Option<String>, Malformed> {
        match self.u8()? {
            0 => Ok(None),
            1 => self.str().map(Some),
            _ => Err(Malformed),
        }
    }
    /// A list of `len` items, each read by `item`; the capacity grows with what is
    /// actually there, not with the claimed length.
    fn list<T>(
        &mut self,
        mut item: impl FnMut(&mut Reader) -> Result<T, Malformed>,
    ) -> Result<Vec<T>, Malformed> {
        let len = self.len()?;
        let mut items = Vec::with_capacity(len.min(64));
        for _ in 0..len {
            items.push(item(self)?);
        }
        Ok(items)
    }
    fn strs(&mut self) -> Result<Vec<String>, Malformed> {
        self.list(Reader::str)
    }
}

/// A request's operation tag for a durable change (the others are a [`RemoteOpKind`]'s
/// index).
const DURABLE_TAG: u8 = 255;
const INVOKE_CLIENT_TAG: u8 = 254;
const GROUP_MEMBERS_TAG: u8 = 253;

fn write_target(w: &mut Writer, target: &Target) {
    match target {
        Target::All => w.u8(0),
        Target::AllExcept(ids) => {
            w.u8(1);
            w.strs(ids);
        }
        Target::Connection(id) => {
            w.u8(2);
            w.str(id);
        }
        Target::Connections(ids) => {
            w.u8(3);
            w.strs(ids);
        }
        Target::Group(group) => {
            w.u8(4);
            w.str(group);
        }
        Target::GroupExcept(group, ids) => {
            w.u8(5);
            w.str(group);
            w.strs(ids);
        }
        Target::Groups(groups) => {
            w.u8(6);
            w.strs(groups);
        }
        Target::User(user) => {
            w.u8(7);
            w.str(user);
        }
        Target::UserExcept(user, ids) => {
            w.u8(8);
            w.str(user);
            w.strs(ids);
        }
        Target::Users(users) => {
            w.u8(9);
            w.strs(users);
        }
    }
}

fn read_target(r: &mut Reader) -> Result<Target, Malformed> {
    Ok(match r.u8()? {
        0 => Target::All,
        1 => Target::AllExcept(r.strs()?),
        2 => Target::Connection(r.str()?),
        3 => Target::Connections(r.strs()?),
        4 => Target::Group(r.str()?),
        5 => Target::GroupExcept(r.str()?, r.strs()?),
        6 => Target::Groups(r.strs()?),
        7 => Target::User(r.str()?),
        8 => Target::UserExcept(r.str()?, r.strs()?),
        9 => Target::Users(r.strs()?),
        _ => return Err(Malformed),
    })
}

impl Wire {
    pub fn encode(&self) -> Bytes {
        let mut w = Writer(BytesMut::with_capacity(64));
        match self {
            Wire::Send {
                origin,
                hub,
                target,
                json,
                messagepack,
            } => {
                w.u8(1);
                w.str(origin);
                w.str(hub);
                write_target(&mut w, target);
                w.bytes(json);
                w.bytes(messagepack);
            }
            Wire::Request {
                origin,
                id,
                hub,
                op,
            } => {
                w.u8(2);
                w.str(origin);
                w.u64(*id);
                w.str(hub);
                match op {
                    RemoteOp::Connection {
                        connection_id,
                        op,
                        group,
                    } => {
                        w.u8(*op as u8);
                        w.str(connection_id);
                        w.str(group);
                    }
                    RemoteOp::Durable { user, groups } => {
                        w.u8(DURABLE_TAG);
                        w.str(user);
                        w.u64(groups.version);
                        w.strs(&groups.groups);
                    }
                    RemoteOp::InvokeClient {
                        connection_id,
                        invocation,
                        timeout_ms,
                    } => {
                        w.u8(INVOKE_CLIENT_TAG);
                        w.str(connection_id);
                        w.bytes(invocation);
                        w.u64(*timeout_ms);
                    }
                    RemoteOp::GroupMembers { group } => {
                        w.u8(GROUP_MEMBERS_TAG);
                        w.str(group);
                    }
                }
            }
            Wire::Reply { id, answer } => {
                w.u8(3);
                w.u64(*id);
                match answer {
                    Answer::NotHere => w.u8(0),
                    Answer::Done => w.u8(1),
                    Answer::TooManyGroups(limit) => {
                        w.u8(2);
                        w.u64(*limit);
                    }
                    Answer::Failed(error) => {
                        w.u8(3);
                        w.str(error);
                    }
                    Answer::ClientResult(completion) => {
                        w.u8(4);
                        w.bytes(completion);
                    }
                    Answer::Members(members) => {
                        w.u8(5);
                        w.0.put_u32(members.len() as u32);
                        for (connection, user) in members {
                            w.str(connection);
                            w.opt(user.as_deref());
                        }
                    }
                }
            }
            Wire::Presence { origin, seq, event } => {
                w.u8(4);
                w.str(origin);
                w.u64(*seq);
                match event {
                    PresenceEvent::Connected {
                        hub,
                        connection_id,
                        user,
                    } => {
                        w.u8(0);
                        w.str(hub);
                        w.str(connection_id);
                        w.opt(user.as_deref());
                    }
                    PresenceEvent::Disconnected { hub, connection_id } => {
                        w.u8(1);
                        w.str(hub);
                        w.str(connection_id);
                    }
                    PresenceEvent::Joined { hub, group, user } => {
                        w.u8(2);
                        w.str(hub);
                        w.str(group);
                        w.opt(user.as_deref());
                    }
                    PresenceEvent::Left { hub, group, user } => {
                        w.u8(3);
                        w.str(hub);
                        w.str(group);
                        w.opt(user.as_deref());
                    }
                }
            }
            Wire::Snapshot { origin, seq, hubs } => {
                w.u8(5);
                w.str(origin);
                w.u64(*seq);
                w.0.put_u32(hubs.len() as u32);
                for hub in hubs {
                    w.str(&hub.hub);
                    w.0.put_u32(hub.connections.len() as u32);
                    for (id, user) in &hub.connections {
                        w.str(id);
                        w.opt(user.as_deref());
                    }
                    w.0.put_u32(hub.groups.len() as u32);
                    for group in &hub.groups {
                        w.str(&group.group);
                        w.u64(group.connections);
                        w.0.put_u32(group.users.len() as u32);
                        for (user, count) in &group.users {
                            w.str(user);
                            w.u64(*count);
                        }
                    }
                }
            }
            Wire::Heartbeat { origin, name, seq } => {
                w.u8(6);
                w.str(origin);
                w.str(name);
                w.u64(*seq);
            }
            Wire::Hello { origin, name } => {
                w.u8(7);
                w.str(origin);
                w.str(name);
            }
            Wire::Want { node } => {
                w.u8(8);
                w.str(node);
            }
            Wire::Gone { origin } => {
                w.u8(9);
                w.str(origin);
            }
        }
        w.0.freeze()
    }

    pub fn decode(bytes: Bytes) -> Result<Wire, Malformed> {
        let mut r = Reader(bytes);
        let wire = match r.u8()? {
            1 => Wire::Send {
                origin: r.str()?,
                hub: r.str()?,
                target: read_target(&mut r)?,
                json: r.bytes()?,
                messagepack: r.bytes()?,
            },
            2 => Wire::Request {
                origin: r.str()?,
                id: r.u64()?,
                hub: r.str()?,
                op: match r.u8()? {
                    DURABLE_TAG => RemoteOp::Durable {
                        user: r.str()?,
                        groups: DurableGroups {
                            version: r.u64()?,
                            groups: r.strs()?,
                        },
                    },
                    INVOKE_CLIENT_TAG => RemoteOp::InvokeClient {
                        connection_id: r.str()?,
                        invocation: r.bytes()?,
                        timeout_ms: r.u64()?,
                    },
                    GROUP_MEMBERS_TAG => RemoteOp::GroupMembers { group: r.str()? },
                    tag => RemoteOp::Connection {
                        op: *RemoteOpKind::ALL.get(usize::from(tag)).ok_or(Malformed)?,
                        connection_id: r.str()?,
                        group: r.str()?,
                    },
                },
            },
            3 => Wire::Reply {
                id: r.u64()?,
                answer: match r.u8()? {
                    0 => Answer::NotHere,
                    1 => Answer::Done,
                    2 => Answer::TooManyGroups(r.u64()?),
                    3 => Answer::Failed(r.str()?),
                    4 => Answer::ClientResult(r.bytes()?),
                    5 => Answer::Members(r.list(|r| Ok((r.str()?, r.opt()?)))?),
                    _ => return Err(Malformed),
                },
            },
            4 => Wire::Presence {
                origin: r.str()?,
                seq: r.u64()?,
                event: match r.u8()? {
                    0 => PresenceEvent::Connected {
                        hub: r.str()?,
                        connection_id: r.str()?,
                        user: r.opt()?,
                    },
                    1 => PresenceEvent::Disconnected {
                        hub: r.str()?,
                        connection_id: r.str()?,
                    },
                    2 => PresenceEvent::Joined {
                        hub: r.str()?,
                        group: r.str()?,
                        user: r.opt()?,
                    },
                    3 => PresenceEvent::Left {
                        hub: r.str()?,
                        group: r.str()?,
                        user: r.opt()?,
                    },
                    _ => return Err(Malformed),
                },
            },
            5 => Wire::Snapshot {
                origin: r.str()?,
                seq: r.u64()?,
                hubs: r.list(|r| {
                    Ok(HubSnapshot {
                        hub: r.str()?,
                        connections: r.list(|r| Ok((r.str()?, r.opt()?)))?,
                        groups: r.list(|r| {
                            Ok(GroupSnapshot {
                                group: r.str()?,
                                connections: r.u64()?,
                                users: r.list(|r| Ok((r.str()?, r.u64()?)))?,
                            })
                        })?,
                    })
                })?,
            },
            6 => Wire::Heartbeat {
                origin: r.str()?,
                name: r.str()?,
                seq: r.u64()?,
            },
            7 => Wire::Hello {
                origin: r.str()?,
                name: r.str()?,
            },
            8 => Wire::Want { node: r.str()? },
            9 => Wire::Gone { origin: r.str()? },
            _ => return Err(Malformed),
        };
        if r.0.has_remaining() {
            return Err(Malformed);
        }
        Ok(wire)
    }
}

/// A token negotiated on one node, kept in Redis for the node the client's WebSocket
/// reaches (no sticky sessions for WebSockets: contract section 7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedToken {
    pub hub: String,
    pub connection_id: String,
    pub user_id: Option<String>,
    pub stateful_reconnect: bool,
}

impl SharedToken {
    pub fn encode(&self) -> Bytes {
        let mut w = Writer(BytesMut::new());
        w.str(&self.hub);
        w.str(&self.connection_id);
        w.opt(self.user_id.as_deref());
        w.u8(u8::from(self.stateful_reconnect));
        w.0.freeze()
    }

    pub fn decode(bytes: Bytes) -> Result<SharedToken, Malformed> {
        let mut r = Reader(bytes);
        let token = SharedToken {
            hub: r.str()?,
            connection_id: r.str()?,
            user_id: r.opt()?,
            stateful_reconnect: r.u8()? != 0,
        };
        if r.0.has_remaining() {
            return Err(Malformed);
        }
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Wire> {
        let targets = [
            Target::All,
            Target::AllExcept(vec!["a".into(), "b".into()]),
            Target::Connection("c".into()),
            Target::Connections(vec!["c".into()]),
            Target::Group("g".into()),
            Target::GroupExcept("g".into(), vec!["x".into()]),
            Target::Groups(vec!["g".into(), "h".into()]),
            Target::User("u".into()),
            Target::UserExcept("u".into(), vec![]),
            Target::Users(vec!["u".into()]),
        ];
        let mut samples: Vec<Wire> = targets
            .into_iter()
            .map(|target| Wire::Send {
                origin: "n1".into(),
                hub: "chat".into(),
                target,
                json: Bytes::from_static(b"{\"type\":1}\x1e"),
                messagepack: Bytes::from_static(&[1, 2, 3]),
            })
            .collect();
        samples.extend([
            Wire::Request {
                origin: "n1".into(),
                id: 7,
                hub: "chat".into(),
                op: RemoteOp::Connection {
                    connection_id: "c".into(),
                    op: RemoteOpKind::Close,
                    group: String::new(),
                },
            },
            Wire::Request {
                origin: "n1".into(),
                id: 8,
                hub: "chat".into(),
                op: RemoteOp::Durable {
                    user: "ann".into(),
                    groups: DurableGroups {
                        version: 1_796_655_961_000_000,
                        groups: vec!["ward:1".into(), "ward:2".into()],
                    },
                },
            },
            Wire::Reply {
                id: 8,
                answer: Answer::TooManyGroups(3),
            },
            Wire::Reply {
                id: 9,
                answer: Answer::Failed("no".into()),
            },
            Wire::Request {
                origin: "n1".into(),
                id: 10,
                hub: "chat".into(),
                op: RemoteOp::InvokeClient {
                    connection_id: "c".into(),
                    invocation: Bytes::from_static(&[0x95, 1, 0x80, 0xc0]),
                    timeout_ms: 30_000,
                },
            },
            Wire::Reply {
                id: 10,
                answer: Answer::ClientResult(Bytes::from_static(&[0x94, 3, 0x80])),
            },
            Wire::Request {
                origin: "n1".into(),
                id: 11,
                hub: "chat".into(),
                op: RemoteOp::GroupMembers {
                    group: "ward:4".into(),
                },
            },
            Wire::Reply {
                id: 11,
                answer: Answer::Members(vec![
                    ("c1".into(), Some("ann".into())),
                    ("c2".into(), None),
                ]),
            },
            Wire::Presence {
                origin: "n".into(),
                seq: 3,
                event: PresenceEvent::Joined {
                    hub: "h".into(),
                    group: "g".into(),
                    user: None,
                },
            },
            Wire::Snapshot {
                origin: "n".into(),
                seq: 9,
                hubs: vec![HubSnapshot {
                    hub: "h".into(),
                    connections: vec![("c".into(), Some("ann".into())), ("d".into(), None)],
                    groups: vec![GroupSnapshot {
                        group: "g".into(),
                        connections: 2,
                        users: vec![("ann".into(), 1)],
                    }],
                }],
            },
            Wire::Heartbeat {
                origin: "n".into(),
                name: "a".into(),
                seq: 1,
            },
            Wire::Hello {
                origin: "n".into(),
                name: "a".into(),
            },
            Wire::Want { node: "n".into() },
            Wire::Gone { origin: "n".into() },
        ]);
        samples
    }

    #[test]
    fn every_message_reads_back_as_written() {
        for wire in samples() {
            assert_eq!(Wire::decode(wire.encode()), Ok(wire));
        }
        let token = SharedToken {
            hub: "chat".into(),
            connection_id: "c".into(),
            user_id: Some("ann".into()),
            stateful_reconnect: true,
        };
        assert_eq!(SharedToken::decode(token.encode()), Ok(token));
    }

    #[test]
    fn truncated_extended_or_lying_bytes_are_refused() {
        for wire in samples() {
            let bytes = wire.encode();
            for cut in 0..bytes.len() {
                assert_eq!(Wire::decode(bytes.slice(..cut)), Err(Malformed), "{wire:?}");
            }
            let mut longer = bytes.to_vec();
            longer.push(0);
            assert_eq!(Wire::decode(longer.into()), Err(Malformed));
        }
        // A list that claims 2^32-1 entries is refused before anything is allocated.
        let lying = Bytes::from_static(&[
            5, 0, 0, 0, 1, b'n', 0, 0, 0, 0, 0, 0, 0, 1, 255, 255, 255, 255,
        ]);
        assert_eq!(Wire::decode(lying), Err(Malformed));
    }

    proptest::proptest! {
        /// Another node's bytes are input: anything decodes to a message or `Malformed`,
        /// never a panic or an allocation out of proportion to the bytes.
        #[test]
        fn any_bytes_decode_or_are_refused(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = Wire::decode(Bytes::from(bytes.clone()));
            let _ = SharedToken::decode(Bytes::from(bytes));
        }

        /// Mutating one byte of a valid message never panics either.
        #[test]
        fn a_changed_byte_is_read_or_refused(index in 0usize..4096, value in proptest::num::u8::ANY, which in 0usize..32) {
            let samples = samples();
            let mut bytes = samples[which % samples.len()].encode().to_vec();
            let at = index % bytes.len();
            bytes[at] = value;
            let _ = Wire::decode(Bytes::from(bytes));
        }
    }

    #[test]
    fn only_whole_records_of_a_non_blocking_invocation_pass_as_a_send() {
        use ringhub_protocol::frame::Framing::Raw;
        use ringhub_protocol::{HubMessage, HubProtocol, Value};
        let message = HubMessage::invocation("say", vec![Value::from("hi")]);
        let record = |protocol| ringhub_protocol::frame::encode_framed(protocol, Raw, &message);
        let (json, messagepack) = (record(HubProtocol::Json), record(HubProtocol::MessagePack));
        assert_eq!(check_send_records(&json, &messagepack, 1024), Ok(()));
        let close = |protocol| {
            ringhub_protocol::frame::encode_framed(
                protocol,
                Raw,
                &HubMessage::Close(Default::default()),
            )
        };
        let forged: [(&[u8], &[u8]); 7] = [
            (b"not json\x1e", &messagepack),
            (&json[..json.len() - 1], &messagepack),
            (&[json.as_ref(), json.as_ref()].concat(), &messagepack),
            (
                b"{\"type\":1,\"target\":\"\xff\",\"arguments\":[]}\x1e",
                &messagepack,
            ),
            (&close(HubProtocol::Json), &close(HubProtocol::MessagePack)),
            (&json, &messagepack[..messagepack.len() - 1]),
            (b"", b""),
        ];
        for (json_record, messagepack_record) in forged {
            assert_eq!(
                check_send_records(json_record, messagepack_record, 1024),
                Err(Malformed),
                "{json_record:?}"
            );
        }
        assert_eq!(
            check_send_records(&json, &messagepack, 8),
            Err(Malformed),
            "over the limit"
        );
    }

    #[test]
    fn a_send_names_the_narrowest_channel() {
        assert_eq!(
            send_channel("h", &Target::Group("g".into())),
            "ringhub:group:h:g"
        );
        assert_eq!(
            send_channel("h", &Target::UserExcept("u".into(), vec![])),
            "ringhub:user:h:u"
        );
        assert_eq!(
            send_channel("h", &Target::Connection("c".into())),
            "ringhub:conn:h:c"
        );
        assert_eq!(
            send_channel("h", &Target::Groups(vec!["g".into()])),
            "ringhub:all"
        );
    }
}
