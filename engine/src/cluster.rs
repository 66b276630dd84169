//! The backplane thread (contract section 7): this node's link to the other nodes of
//! its cluster through Redis pub/sub, on its own thread and tokio runtime, so that no
//! shard ever waits on the network.
//!
//! Out: sends (one `PUBLISH` each, the record of every protocol in it, batched into
//! pipelines in the order they were made, so a sender's messages keep their order),
//! presence changes, membership requests for connections held elsewhere, subscriptions
//! (a group's channel while this node has a member, a user's and a connection's while
//! connected here). In: other nodes' sends enter the shards through the same inboxes as
//! cross-shard sends; requests are answered; presence is applied to `Presence`.
//!
//! While Redis is unreachable, local delivery goes on: what would have been published
//! is counted in `ringhub_backplane_errors_total` and dropped (at most once, as ASP.NET
//! Core), and when Redis is back the node resubscribes, says hello and publishes its
//! presence whole.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fred::clients::{Client, SubscriberClient};
use fred::interfaces::{ClientLike, EventInterface, KeysInterface, PubsubInterface, SetsInterface};
use fred::types::config::{Config as RedisConfig, ReconnectPolicy};
use fred::types::{Expiration, Value as RedisValue};
use futures_util::StreamExt;
use hashbrown::{HashMap, HashSet};
use ringhub_protocol::frame::Framing;
use ringhub_protocol::HubProtocol;

use crate::api::types::ContextError;
use crate::api::HubContext;
use crate::backplane::{
    self, Answer, BackplaneError, LinkEnd, Outgoing, RemoteOp, RemoteOpKind, StoreOp, Wire,
};
use crate::fanout::{Broadcast, FrameKind};
use crate::flow::Window;
use crate::node::Node;
use crate::shard::inbox::{Command, ConnectionOp};

/// How often a node says it is alive, and checks whether Redis is reachable.
const HEARTBEAT: Duration = Duration::from_secs(1);
const CONNECTION_CHECK: Duration = Duration::from_millis(200);
/// How long a request waits for the node that holds a connection.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a negotiated token is kept in Redis for another node.
const TOKEN_TTL_SECS: i64 = 60;
/// How long a node looks for a token another node negotiated (its `SET` may still be on
/// its way when the client's WebSocket arrives here).
const TOKEN_SEARCH: Duration = Duration::from_secs(1);
/// The most sends published in one pipeline.
const MAX_BATCH: usize = 512;
/// Pub/sub messages the Redis client keeps for this thread before it loses some.
const INCOMING_CAPACITY: usize = 1 << 16;

/// Starts the backplane thread for `node`, connected (or connecting: an unreachable
/// Redis is retried forever) to `url`.
pub(crate) fn start(
    node: Arc<Node>,
    url: &str,
    end: LinkEnd,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let config = RedisConfig::from_url(url).map_err(|e| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, e.details().to_owned())
    })?;
    std::thread::Builder::new()
        .name("ringhub-backplane".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    tracing::error!("the backplane cannot start its runtime: {e}");
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, run(node, config, end));
        })
}

/// What the backplane's tasks share (one thread: no locks).
struct Backplane {
    node: Arc<Node>,
    node_id: Arc<str>,
    publisher: Client,
    subscriber: SubscriberClient,
    /// Requests waiting for answers: id -> (answers expected once known, answers).
    pending: RefCell<HashMap<u64, Pending>>,
    next_request: Cell<u64>,
    /// The number of the last presence change published (heartbeats carry it, so that
    /// other nodes see what they missed).
    presence_published: Cell<u64>,
    connected: Arc<AtomicBool>,
    /// What other nodes' sends may hold in this node's inboxes and congested queues
    /// together: when it is full, this thread stops taking messages from Redis (and
    /// past the Redis client's buffer, losses are counted) instead of the inboxes
    /// growing without bound.
    inbound: Arc<Window>,
}

struct Pending {
    expected: Option<usize>,
    answers: Vec<Answer>,
    reply: futures_channel::oneshot::Sender<Result<Vec<Answer>, BackplaneError>>,
}

/// A subscription change, in the order asked.
enum SubscriptionOp {
    Subscribe(String),
    Unsubscribe(String),
    Barrier(futures_channel::oneshot::Sender<()>),
    /// Redis came back: subscribe to everything wanted again.
    Resync,
}

async fn run(node: Arc<Node>, config: RedisConfig, end: LinkEnd) {
    let LinkEnd {
        mut queue,
        connected,
        node_id,
    } = end;
    let builder = {
        let mut builder = fred::types::Builder::from_config(config);
        builder
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(2);
                c.internal_command_timeout = Duration::from_secs(2);
                // A command is not sent again after a reconnect: what was published
                // during an outage is not replayed (contract section 7).
                c.max_command_attempts = 1;
            })
            .with_performance_config(|p| {
                p.default_command_timeout = Duration::from_secs(3);
                p.broadcast_channel_capacity = INCOMING_CAPACITY;
            })
            .set_policy(ReconnectPolicy::new_constant(0, 500));
        builder
    };
    let (publisher, subscriber) = match (builder.build(), builder.build_subscriber_client()) {
        (Ok(p), Ok(s)) => (p, s),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!("the backplane cannot be built: {e}");
            return;
        }
    };
    let inbound = Window::new(node.config.context_publish_budget(), None);
    let backplane = Rc::new(Backplane {
        inbound,
        node,
        node_id,
        publisher,
        subscriber,
        pending: RefCell::default(),
        next_request: Cell::new(1),
        presence_published: Cell::new(0),
        connected,
    });
    let incoming = backplane.subscriber.message_rx();
    // The connection tasks run on their own (and reconnect forever): their handles are
    // not needed, their state arrives as events.
    drop(backplane.publisher.connect());
    drop(backplane.subscriber.connect());

    let (subscriptions, subscription_ops) = tokio::sync::mpsc::unbounded_channel();
    for channel in [
        backplane::all_channel(),
        backplane::presence_channel(),
        backplane::node_channel(&backplane.node_id),
    ] {
        let _ = subscriptions.send(SubscriptionOp::Subscribe(channel));
    }
    tokio::task::spawn_local(manage_subscriptions(backplane.clone(), subscription_ops));
    tokio::task::spawn_local(receive(backplane.clone(), incoming));

    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    let mut connection_check = tokio::time::interval(CONNECTION_CHECK);
    // The client's own state stays "connected" while it reconnects: its events tell.
    let (mut publisher_errors, mut subscriber_errors) = (
        backplane.publisher.error_rx(),
        backplane.subscriber.error_rx(),
    );
    let (mut publisher_back, mut subscriber_back) = (
        backplane.publisher.reconnect_rx(),
        backplane.subscriber.reconnect_rx(),
    );
    let mut up = [false, false];
    let mut ever_connected = false;
    loop {
        let came_up = tokio::select! {
            first = queue.next() => {
                let Some(first) = first else { break };
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match queue.try_recv() {
                        Ok(next) => batch.push(next),
                        _ => break,
                    }
                }
                let stop = batch.iter().any(|o| matches!(o, Outgoing::Stop));
                backplane.handle_batch(batch, &subscriptions).await;
                if stop {
                    // What the shards published while closing their sessions went first.
                    let gone = Wire::Gone { origin: backplane.node_id.to_string() };
                    backplane.publish_presence(gone).await;
                    break;
                }
                false
            }
            _ = heartbeat.tick() => {
                backplane.heartbeat().await;
                false
            }
            _ = publisher_errors.recv() => backplane.set_connection(&mut up, 0, false),
            _ = subscriber_errors.recv() => backplane.set_connection(&mut up, 1, false),
            _ = publisher_back.recv() => backplane.set_connection(&mut up, 0, true),
            _ = subscriber_back.recv() => backplane.set_connection(&mut up, 1, true),
            // The first connection, if its event came before this loop listened.
            _ = connection_check.tick(), if !ever_connected => {
                let both = backplane.publisher.is_connected() && backplane.subscriber.is_connected();
                up = [both, both];
                backplane.set_connection(&mut up, 0, both)
            }
        };
        if came_up {
            ever_connected = true;
            // Subscribed again before saying hello, so that the other nodes' answers
            // (their snapshots) are heard.
            let (done, resynced) = futures_channel::oneshot::channel();
            let _ = subscriptions.send(SubscriptionOp::Resync);
            let _ = subscriptions.send(SubscriptionOp::Barrier(done));
            let _ = resynced.await;
            backplane.hello().await;
        }
    }
    let _ = backplane.publisher.quit().await;
    let _ = backplane.subscriber.quit().await;
}

impl Backplane {
    fn count_errors(&self, n: usize) {
        self.node
            .metrics
            .backplane_errors
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Notes that one of the two Redis connections (0: commands, 1: subscriptions)
    /// went down or came back; true when both just came up.
    fn set_connection(&self, up: &mut [bool; 2], which: usize, is_up: bool) -> bool {
        up[which] = is_up;
        let now = up[0] && up[1];
        let was = self.connected.swap(now, Ordering::AcqRel);
        self.node
            .metrics
            .backplane_connected
            .store(u64::from(now), Ordering::Relaxed);
        if now != was {
            if now {
                tracing::info!(node = %self.node_id, "backplane connected to Redis");
            } else {
                tracing::warn!(node = %self.node_id, "backplane lost Redis: local delivery goes on, cross-node sends are dropped until it is back");
            }
        }
        now && !was
    }

    /// Publishes messages in one pipeline, in order; returns each one's receiver count
    /// (`None` where it could not be published, counted as errors).
    async fn publish(&self, messages: Vec<(String, Bytes)>) -> Vec<Option<i64>> {
        if messages.is_empty() {
            return Vec::new();
        }
        if !self.is_connected() {
            self.count_errors(messages.len());
            return vec![None; messages.len()];
        }
        let pipeline = self.publisher.pipeline();
        for (channel, payload) in messages {
            let _: Result<(), _> = pipeline.publish(channel, payload).await;
        }
        let results = pipeline.try_all::<i64>().await;
        results
            .into_iter()
            .map(|result| match result {
                Ok(receivers) => Some(receivers),
                Err(e) => {
                    self.count_errors(1);
                    tracing::debug!("backplane publish failed: {e}");
                    None
                }
            })
            .collect()
    }

    async fn handle_batch(
        self: &Rc<Self>,
        batch: Vec<Outgoing>,
        subscriptions: &tokio::sync::mpsc::UnboundedSender<SubscriptionOp>,
    ) {
        let mut messages = Vec::new();
        // Held until published: the publishers' windows cover what waits here.
        let mut tickets = Vec::new();
        let mut requests = Vec::new();
        for outgoing in batch {
            match outgoing {
                Outgoing::Send {
                    hub,
                    target,
                    broadcast,
                    ticket,
                } => {
                    let record = |protocol| {
                        broadcast.frame(FrameKind {
                            protocol,
                            framing: Framing::Raw,
                        })
                    };
                    let wire = Wire::Send {
                        origin: self.node_id.to_string(),
                        hub: hub.to_string(),
                        target: (*target).clone(),
                        json: record(HubProtocol::Json),
                        messagepack: record(HubProtocol::MessagePack),
                    };
                    messages.push((backplane::send_channel(&hub, &target), wire.encode()));
                    tickets.extend(ticket);
                }
                Outgoing::Presence { seq, event } => {
                    self.presence_published.set(seq);
                    let wire = Wire::Presence {
                        origin: self.node_id.to_string(),
                        seq,
                        event,
                    };
                    messages.push((backplane::presence_channel(), wire.encode()));
                }
                Outgoing::Subscribe(channel) => {
                    let _ = subscriptions.send(SubscriptionOp::Subscribe(channel));
                }
                Outgoing::Unsubscribe(channel) => {
                    let _ = subscriptions.send(SubscriptionOp::Unsubscribe(channel));
                }
                Outgoing::Barrier(reply) => {
                    let _ = subscriptions.send(SubscriptionOp::Barrier(reply));
                }
                Outgoing::Request {
                    channel,
                    hub,
                    op,
                    reply,
                } => {
                    let id = self.next_request.get();
                    self.next_request.set(id + 1);
                    let wire = Wire::Request {
                        origin: self.node_id.to_string(),
                        id,
                        hub,
                        op,
                    };
                    self.pending.borrow_mut().insert(
                        id,
                        Pending {
                            expected: None,
                            answers: Vec::new(),
                            reply,
                        },
                    );
                    requests.push((messages.len(), id));
                    messages.push((channel, wire.encode()));
                    let backplane = self.clone();
                    tokio::task::spawn_local(async move {
                        tokio::time::sleep(REQUEST_TIMEOUT).await;
                        backplane.finish_request(id, true);
                    });
                }
                Outgoing::Store { op, reply } => {
                    let backplane = self.clone();
                    tokio::task::spawn_local(async move {
                        let _ = reply.send(backplane.store(op).await);
                    });
                }
                Outgoing::SaveToken { token, negotiated } => {
                    let backplane = self.clone();
                    tokio::task::spawn_local(async move {
                        let saved: Result<(), _> = backplane
                            .publisher
                            .set(
                                backplane::token_key(&token),
                                negotiated,
                                Some(Expiration::EX(TOKEN_TTL_SECS)),
                                None,
                                false,
                            )
                            .await;
                        if let Err(e) = saved {
                            backplane.count_errors(1);
                            tracing::debug!("cannot keep a negotiated token in Redis: {e}");
                        }
                    });
                }
                Outgoing::Stop => {}
                Outgoing::FetchToken { token, reply } => {
                    let backplane = self.clone();
                    tokio::task::spawn_local(async move {
                        let _ = reply.send(backplane.fetch_token(&token).await);
                    });
                }
            }
        }
        let receivers = self.publish(messages).await;
        drop(tickets);
        for (index, id) in requests {
            match receivers[index] {
                Some(count) => {
                    if let Some(pending) = self.pending.borrow_mut().get_mut(&id) {
                        pending.expected = Some(count.max(0) as usize);
                    }
                    self.finish_request(id, false);
                }
                None => {
                    if let Some(pending) = self.pending.borrow_mut().remove(&id) {
                        let _ = pending.reply.send(Err(BackplaneError::Disconnected));
                    }
                }
            }
        }
    }

    /// Answers a request once every receiving node answered (or on `timeout`, with what
    /// arrived: a node that died answers nothing).
    fn finish_request(&self, id: u64, timeout: bool) {
        let mut pending = self.pending.borrow_mut();
        let done = pending.get(&id).is_some_and(|p| {
            timeout
                || p.expected
                    .is_some_and(|expected| p.answers.len() >= expected)
        });
        if !done {
            return;
        }
        let Some(request) = pending.remove(&id) else {
            return;
        };
        let answer = if timeout && request.answers.is_empty() {
            Err(BackplaneError::NoAnswer(REQUEST_TIMEOUT.as_secs()))
        } else {
            Ok(request.answers)
        };
        let _ = request.reply.send(answer);
    }

    async fn store(&self, op: StoreOp) -> Result<Vec<String>, BackplaneError> {
        let redis = |e: fred::error::Error| BackplaneError::Redis(e.details().to_owned());
        match op {
            StoreOp::Groups { hub, user } => {
                let mut groups: Vec<String> = self
                    .publisher
                    .smembers(backplane::durable_key(&hub, &user))
                    .await
                    .map_err(redis)?;
                groups.sort_unstable();
                Ok(groups)
            }
            StoreOp::Add { hub, user, group } => {
                let _: i64 = self
                    .publisher
                    .sadd(backplane::durable_key(&hub, &user), group)
                    .await
                    .map_err(redis)?;
                Ok(Vec::new())
            }
            StoreOp::Remove { hub, user, group } => {
                let _: i64 = self
                    .publisher
                    .srem(backplane::durable_key(&hub, &user), group)
                    .await
                    .map_err(redis)?;
                Ok(Vec::new())
            }
        }
    }

    async fn fetch_token(&self, token: &str) -> Option<Bytes> {
        let key = backplane::token_key(token);
        let deadline = tokio::time::Instant::now() + TOKEN_SEARCH;
        while self.is_connected() {
            match self
                .publisher
                .getdel::<Option<Bytes>, _>(key.as_str())
                .await
            {
                Ok(Some(found)) => return Some(found),
                Ok(None) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                _ => return None,
            }
        }
        None
    }

    /// Says this node is alive (with the number of its last presence change) and
    /// forgets nodes that stopped saying so.
    async fn heartbeat(&self) {
        let client_timeout = self.node.config.client_timeout;
        // A node is forgotten a heartbeat before the client timeout, so that it stops
        // counting within the timeout of its death (contract section 7).
        let silence = client_timeout.saturating_sub(HEARTBEAT).max(2 * HEARTBEAT);
        self.node.presence.forget_nodes(silence, None);
        if !self.is_connected() {
            return;
        }
        let wire = Wire::Heartbeat {
            origin: self.node_id.to_string(),
            name: self.node.config.node_name.clone(),
            seq: self.presence_published.get(),
        };
        self.publish_presence(wire).await;
    }

    /// Publishes one message on the presence channel (on its own: not ordered with the
    /// pipelines of sends and changes).
    async fn publish_presence(&self, wire: Wire) {
        self.publish(vec![(backplane::presence_channel(), wire.encode())])
            .await;
    }

    /// Redis is (back) up: other nodes learn of this one and get its presence whole.
    async fn hello(&self) {
        let hello = Wire::Hello {
            origin: self.node_id.to_string(),
            name: self.node.config.node_name.clone(),
        };
        self.publish_presence(hello).await;
        self.publish_snapshot().await;
    }

    async fn publish_snapshot(&self) {
        let (seq, hubs) = self.node.presence.local_snapshot();
        // The snapshot is taken after every change it numbers was handed to this thread,
        // but some may not be published yet: they follow it and are ignored (<= seq).
        let wire = Wire::Snapshot {
            origin: self.node_id.to_string(),
            seq,
            hubs,
        };
        self.publish_presence(wire).await;
    }

    /// Acts on what another node published.
    async fn handle_incoming(self: &Rc<Self>, wire: Wire) {
        let own = |origin: &str| origin == &*self.node_id;
        match wire {
            Wire::Send {
                origin,
                hub,
                target,
                json,
                messagepack,
            } => {
                if own(&origin) {
                    return;
                }
                let (hub, target) = (Arc::<str>::from(hub), Arc::new(target));
                self.inbound.room().await;
                let ticket = Arc::new(self.inbound.charge(json.len()));
                let broadcast = Arc::new(Broadcast::from_records(json, messagepack));
                for inbox in &self.node.inboxes {
                    inbox.push(Command::Deliver {
                        hub: hub.clone(),
                        target: target.clone(),
                        broadcast: broadcast.clone(),
                        ticket: Some(ticket.clone()),
                    });
                }
            }
            Wire::Request {
                origin,
                id,
                hub,
                op,
            } => {
                let backplane = self.clone();
                let own = own(&origin);
                tokio::task::spawn_local(async move {
                    let answer = if own {
                        // This node looked at its own connections before asking.
                        Answer::NotHere
                    } else {
                        backplane.answer(&hub, op).await
                    };
                    let reply = Wire::Reply { id, answer };
                    backplane
                        .publish(vec![(backplane::node_channel(&origin), reply.encode())])
                        .await;
                });
            }
            Wire::Reply { id, answer } => {
                if let Some(pending) = self.pending.borrow_mut().get_mut(&id) {
                    pending.answers.push(answer);
                }
                self.finish_request(id, false);
            }
            Wire::Presence { origin, seq, event } => {
                if own(&origin) {
                    return;
                }
                let presence = &self.node.presence;
                if !presence.apply_remote(&origin, seq, event)
                    && presence.heard_from(&origin, "", Some(seq))
                {
                    self.want(&origin).await;
                }
            }
            Wire::Snapshot { origin, seq, hubs } => {
                if !own(&origin) {
                    self.node.presence.apply_snapshot(&origin, seq, hubs);
                }
            }
            Wire::Heartbeat { origin, name, seq } => {
                if !own(&origin) && self.node.presence.heard_from(&origin, &name, Some(seq)) {
                    self.want(&origin).await;
                }
            }
            Wire::Hello { origin, name } => {
                if own(&origin) {
                    return;
                }
                let presence = &self.node.presence;
                presence.heard_from(&origin, &name, None);
                // A node of the same name that said hello anew restarted: what its
                // previous life held is gone.
                presence.forget_nodes(Duration::MAX, Some((&name, &origin)));
                self.publish_snapshot().await;
            }
            Wire::Want { node } => {
                if own(&node) {
                    self.publish_snapshot().await;
                }
            }
            Wire::Gone { origin } => {
                if !own(&origin) {
                    self.node.presence.forget_node(&origin);
                }
            }
        }
    }

    async fn want(&self, node: &str) {
        let wire = Wire::Want {
            node: node.to_owned(),
        };
        self.publish_presence(wire).await;
    }

    /// Does what another node asks of a connection, if it is here.
    async fn answer(&self, hub: &str, op: RemoteOp) -> Answer {
        let group = op.group;
        let op_here = match op.op {
            RemoteOpKind::Join => ConnectionOp::Join(group),
            RemoteOpKind::Leave => ConnectionOp::Leave(group),
            RemoteOpKind::Watch => ConnectionOp::WatchPresence(group),
            RemoteOpKind::Unwatch => ConnectionOp::UnwatchPresence(group),
            RemoteOpKind::Close => ConnectionOp::Close,
        };
        let context = HubContext {
            node: self.node.clone(),
            publisher: None,
        };
        let done = context
            .local_connection_op(hub, &op.connection_id, op_here)
            .await;
        let answer = match done {
            Ok(true) => Answer::Done,
            Ok(false) => Answer::NotHere,
            Err(ContextError::TooManyGroups { limit }) => Answer::TooManyGroups(limit as u64),
            Err(e) => Answer::Failed(e.to_string()),
        };
        if answer == Answer::Done && matches!(op.op, RemoteOpKind::Join) {
            // Acknowledged once the group's channel is subscribed here.
            if let Some(link) = &self.node.backplane {
                link.barrier().await;
            }
        }
        answer
    }
}

/// Reads what arrives from Redis and acts on it, in order.
async fn receive(
    backplane: Rc<Backplane>,
    mut incoming: tokio::sync::broadcast::Receiver<fred::types::Message>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match incoming.recv().await {
            Ok(message) => {
                let bytes = match message.value {
                    RedisValue::Bytes(bytes) => bytes,
                    RedisValue::String(text) => text.into_inner(),
                    _ => continue,
                };
                match Wire::decode(bytes) {
                    Ok(wire) => backplane.handle_incoming(wire).await,
                    Err(e) => {
                        backplane.count_errors(1);
                        tracing::warn!(channel = %message.channel, "ignored: {e}");
                    }
                }
            }
            Err(RecvError::Lagged(lost)) => {
                backplane.count_errors(lost as usize);
                tracing::warn!(lost, "the backplane fell behind Redis: messages were lost");
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// Applies subscription changes in the order they were asked, merging runs of the same
/// kind into one command; a barrier is answered once everything before it is done.
async fn manage_subscriptions(
    backplane: Rc<Backplane>,
    mut ops: tokio::sync::mpsc::UnboundedReceiver<SubscriptionOp>,
) {
    let mut wanted: HashSet<String> = HashSet::new();
    let mut batch = Vec::new();
    while ops.recv_many(&mut batch, 4096).await > 0 {
        let mut run: Vec<String> = Vec::new();
        let mut run_subscribes = true;
        for op in batch.drain(..) {
            let (channel, subscribe) = match op {
                SubscriptionOp::Subscribe(channel) => (channel, true),
                SubscriptionOp::Unsubscribe(channel) => (channel, false),
                SubscriptionOp::Barrier(reply) => {
                    flush(&backplane, &mut run, run_subscribes).await;
                    let _ = reply.send(());
                    continue;
                }
                SubscriptionOp::Resync => {
                    flush(&backplane, &mut run, run_subscribes).await;
                    let all: Vec<String> = wanted.iter().cloned().collect();
                    for chunk in all.chunks(1024) {
                        let mut chunk = chunk.to_vec();
                        flush(&backplane, &mut chunk, true).await;
                    }
                    continue;
                }
            };
            if subscribe {
                wanted.insert(channel.clone());
            } else {
                wanted.remove(&channel);
            }
            if subscribe != run_subscribes {
                flush(&backplane, &mut run, run_subscribes).await;
                run_subscribes = subscribe;
            }
            run.push(channel);
        }
        flush(&backplane, &mut run, run_subscribes).await;
    }
}

/// Sends one SUBSCRIBE (or UNSUBSCRIBE) for the channels of `run`, if Redis is up
/// (otherwise the resync after it comes back covers them).
async fn flush(backplane: &Backplane, run: &mut Vec<String>, subscribe: bool) {
    if run.is_empty() {
        return;
    }
    let channels = std::mem::take(run);
    if !backplane.is_connected() {
        return;
    }
    let done = if subscribe {
        backplane.subscriber.subscribe(channels).await
    } else {
        backplane.subscriber.unsubscribe(channels).await
    };
    if let Err(e) = done {
        backplane.count_errors(1);
        tracing::warn!("backplane (un)subscribe failed: {e}");
    }
}
