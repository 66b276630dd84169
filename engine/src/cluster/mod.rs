//! The backplane thread (contract section 7): this node's link to the other nodes of
//! its cluster through Redis pub/sub, on its own thread and tokio runtime, so that no
//! shard ever waits on the network.
//!
//! Out: sends (one `PUBLISH` each, the record of every protocol in it, batched into
//! pipelines in the order they were made, so a sender's messages keep their order),
//! presence changes, requests to other nodes (membership changes of connections held
//! elsewhere, durable changes of a user's connections), subscriptions (a group's
//! channel while this node has a member, a user's and a connection's while connected
//! here). In: other nodes' sends enter the shards through the same inboxes as
//! cross-shard sends; requests are answered; presence is applied to `Presence`.
//!
//! Whether Redis works is judged by the node's own heartbeat coming back (`health`): a
//! killed Redis and a hung one are both noticed within seconds. While it is down, local
//! delivery goes on untouched: what would have been published is counted in
//! `ringhub_backplane_errors_total` and dropped (at most once, as ASP.NET Core), and
//! nothing waits on Redis (barriers, durable reads and requests answer at once). A send
//! keeps its publisher charged (flow control) while its `PUBLISH` is on its way, but
//! never longer than [`HOLD_LIMIT`]: a Redis that takes longer lets the publishers go.
//! When Redis answers again the node subscribes to what it needs, says hello, publishes
//! its presence whole, and has its connections take on their durable groups again.

mod health;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fred::clients::{Client, SubscriberClient};
use fred::interfaces::{ClientLike, EventInterface, KeysInterface, LuaInterface, PubsubInterface};
use fred::types::config::{Config as RedisConfig, ReconnectPolicy};
use fred::types::{Expiration, Value as RedisValue};
use futures_util::StreamExt;
use hashbrown::{HashMap, HashSet};
use ringhub_protocol::frame::Framing;
use ringhub_protocol::hub::msgpack;
use ringhub_protocol::{HubMessage, HubProtocol};

use crate::api::context::invoke_client_here;
use crate::api::types::ContextError;
use crate::api::HubContext;
use crate::backplane::{
    self, Answer, BackplaneError, LinkEnd, Outgoing, RemoteOp, RemoteOpKind, StoreOp, Wire,
    BARRIER_BOUND, STORE_BOUND,
};
use crate::client_results;
use crate::fanout::{Broadcast, FrameKind};
use crate::flow::{Ticket, Window};
use crate::node::Node;
use crate::shard::inbox::{Command, ConnectionOp};
use crate::store::DurableGroups;
use health::{Change, Health, LinkState};

/// How often a node says it is alive (its own heartbeat coming back is how it knows
/// Redis works).
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How often the link's health is looked at.
const HEALTH_CHECK: Duration = Duration::from_millis(250);
/// The longest a heartbeat (or another message published on its own) may take.
const DIRECT_PUBLISH_BOUND: Duration = Duration::from_secs(2);
/// How long a send's `PUBLISH` may keep its publisher charged: past it Redis is slow
/// to answer, and the publishers are let go (their local sends never wait on Redis for
/// longer).
const HOLD_LIMIT: Duration = Duration::from_millis(500);
/// How long a request waits for the node that holds a connection.
/// How long a negotiated token is kept in Redis for another node.
const TOKEN_TTL_SECS: i64 = 60;
/// How long a node looks for a token another node negotiated (its `SET` may still be on
/// its way when the client's WebSocket arrives here).
const TOKEN_SEARCH: Duration = Duration::from_secs(1);
/// The most messages published in one pipeline.
const MAX_BATCH: usize = 512;
/// Pub/sub messages the Redis client keeps for this thread before it loses some.
const INCOMING_CAPACITY: usize = 1 << 16;
/// A node silent for this long is asked after: if its Redis connection is gone (its
/// process died), it is forgotten at once instead of after the client timeout.
const PEER_SILENT: Duration = Duration::from_millis(2500);

/// A user's durable groups and their version, both in Redis, read or changed at once:
/// `KEYS[1]` the set, `KEYS[2]` the version, `ARGV[1]` `read`, `add` or `remove`,
/// `ARGV[2]` the group. A change makes the version at least Redis's clock in
/// microseconds, so versions keep growing after a Redis that lost its data restarts.
const DURABLE_SCRIPT: &str = r"
if ARGV[1] == 'add' then redis.call('SADD', KEYS[1], ARGV[2])
elseif ARGV[1] == 'remove' then redis.call('SREM', KEYS[1], ARGV[2]) end
local version
if ARGV[1] == 'read' then
  version = tonumber(redis.call('GET', KEYS[2]) or '0')
else
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  version = redis.call('INCR', KEYS[2])
  if version < now then redis.call('SET', KEYS[2], now); version = now end
end
return {version, redis.call('SMEMBERS', KEYS[1])}
";

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
    let address = health::loggable_address(url);
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
            local.block_on(&runtime, run(node, config, address, end));
        })
}

/// What the backplane's tasks share (one thread: no locks).
struct Backplane {
    node: Arc<Node>,
    node_id: Arc<str>,
    publisher: Client,
    subscriber: SubscriberClient,
    health: RefCell<Health>,
    /// True while Redis is up (what the shards and `/readyz` read).
    connected: Arc<AtomicBool>,
    /// Sends, presence changes and requests on their way to Redis, in order.
    outbox: Outbox,
    subscriptions: tokio::sync::mpsc::UnboundedSender<SubscriptionOp>,
    /// Requests waiting for answers.
    pending: RefCell<HashMap<u64, Pending>>,
    next_request: Cell<u64>,
    /// The number of the last presence change published (heartbeats carry it, so that
    /// other nodes see what they missed).
    presence_published: Cell<u64>,
    /// What other nodes' sends may hold in this node's inboxes and congested queues
    /// together: when it is full, this thread stops taking messages from Redis (and
    /// past the Redis client's buffer, losses are counted) instead of the inboxes
    /// growing without bound.
    inbound: Arc<Window>,
}

struct Pending {
    /// How long it waits for its answers.
    within: Duration,
    expected: Option<usize>,
    answers: Vec<Answer>,
    reply: futures_channel::oneshot::Sender<Result<Vec<Answer>, BackplaneError>>,
}

/// A message waiting to be published.
struct Queued {
    channel: String,
    payload: Bytes,
    /// The send's charge on its publisher's window, held until Redis took it (or
    /// [`HOLD_LIMIT`] passed).
    ticket: Option<Arc<Ticket>>,
    /// The request it carries, whose answers are counted by its receivers.
    request: Option<u64>,
}

/// What waits to be published, in the order it was handed over.
struct Outbox {
    queue: RefCell<VecDeque<Queued>>,
    bytes: Cell<usize>,
    /// The most bytes that may wait: beyond it (a Redis slower than the node's senders
    /// for long) further sends are dropped and counted.
    limit: usize,
    ready: tokio::sync::Notify,
    /// A pipeline has waited longer than [`HOLD_LIMIT`] for Redis: until it is answered,
    /// sends hold no publisher.
    lagging: Cell<bool>,
}

impl Outbox {
    fn push(&self, mut queued: Queued) -> Result<(), Queued> {
        if self.bytes.get() + queued.payload.len() > self.limit {
            return Err(queued);
        }
        if self.lagging.get() {
            queued.ticket = None;
        }
        self.bytes.set(self.bytes.get() + queued.payload.len());
        self.queue.borrow_mut().push_back(queued);
        self.ready.notify_one();
        Ok(())
    }

    fn take(&self, most: usize) -> Vec<Queued> {
        let mut queue = self.queue.borrow_mut();
        let count = most.min(queue.len());
        let batch: Vec<Queued> = queue.drain(..count).collect();
        let bytes: usize = batch.iter().map(|q| q.payload.len()).sum();
        self.bytes.set(self.bytes.get() - bytes);
        batch
    }

    /// Redis is slow to answer: what waits lets its publishers go.
    fn let_go(&self) {
        self.lagging.set(true);
        for queued in self.queue.borrow_mut().iter_mut() {
            queued.ticket = None;
        }
    }
}

/// A subscription change, in the order asked.
enum SubscriptionOp {
    Subscribe(String),
    Unsubscribe(String),
    Barrier(Rc<BarrierReply>),
    /// Make the subscriber connection's subscriptions what is wanted (after it
    /// reconnected, `reconnected`: it has none; after Redis answered again: what was
    /// asked meanwhile).
    Resync {
        reconnected: bool,
    },
}

/// A barrier's answer, given once: by the subscription task, by the deadline, or at
/// once while Redis is down.
struct BarrierReply(Cell<Option<futures_channel::oneshot::Sender<()>>>);

impl BarrierReply {
    fn answer(&self) {
        if let Some(reply) = self.0.take() {
            let _ = reply.send(());
        }
    }
}

async fn run(node: Arc<Node>, config: RedisConfig, address: String, end: LinkEnd) {
    let LinkEnd {
        mut queue,
        connected,
        node_id,
    } = end;
    let builder = {
        // Redis not there when the node starts is retried like a lost connection.
        let config = RedisConfig {
            fail_fast: false,
            ..config
        };
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
    let (subscriptions, subscription_ops) = tokio::sync::mpsc::unbounded_channel();
    let backplane = Rc::new(Backplane {
        inbound: Window::new(node.config.context_publish_budget(), None),
        outbox: Outbox {
            queue: RefCell::default(),
            bytes: Cell::new(0),
            limit: node.config.context_publish_budget(),
            ready: tokio::sync::Notify::new(),
            lagging: Cell::new(false),
        },
        health: RefCell::new(Health::new(address, Instant::now())),
        node,
        node_id,
        publisher,
        subscriber,
        subscriptions,
        pending: RefCell::default(),
        next_request: Cell::new(1),
        presence_published: Cell::new(0),
        connected,
    });
    // Listened to before connecting, so that the first connection's events are heard.
    let incoming = backplane.subscriber.message_rx();
    let (mut publisher_errors, mut subscriber_errors) = (
        backplane.publisher.error_rx(),
        backplane.subscriber.error_rx(),
    );
    let (mut publisher_back, mut subscriber_back) = (
        backplane.publisher.reconnect_rx(),
        backplane.subscriber.reconnect_rx(),
    );
    // The connection tasks run on their own (and reconnect forever): their handles are
    // not needed, their state arrives as events.
    drop(backplane.publisher.connect());
    drop(backplane.subscriber.connect());

    tokio::task::spawn_local(manage_subscriptions(backplane.clone(), subscription_ops));
    tokio::task::spawn_local(receive(backplane.clone(), incoming));
    tokio::task::spawn_local(publish_outbox(backplane.clone()));

    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    let mut health_check = tokio::time::interval(HEALTH_CHECK);
    loop {
        tokio::select! {
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
                for outgoing in batch {
                    backplane.hand_over(outgoing);
                }
                if stop {
                    break;
                }
            }
            _ = heartbeat.tick() => {
                tokio::task::spawn_local(backplane.clone().heartbeat());
            }
            _ = health_check.tick() => {
                let now = Instant::now();
                let change = backplane.health.borrow_mut().check(now);
                if let Some(change) = change {
                    backplane.changed(change, true);
                }
                let report = backplane.health.borrow_mut().report(now);
                if let Some(report) = report {
                    tracing::warn!(node = %backplane.node_id, "{report}");
                    backplane.force_reconnection();
                }
            }
            error = publisher_errors.recv() => backplane.driver_failed(error),
            error = subscriber_errors.recv() => backplane.driver_failed(error),
            _ = subscriber_back.recv() => {
                // A new subscriber connection has no subscriptions: make them, then ask
                // Redis whether it answers (the heartbeat comes back once it does).
                let _ = backplane.subscriptions.send(SubscriptionOp::Resync { reconnected: true });
                let (done, resynced) = futures_channel::oneshot::channel();
                let _ = backplane.subscriptions.send(SubscriptionOp::Barrier(Rc::new(BarrierReply(Cell::new(Some(done))))));
                let probe = backplane.clone();
                tokio::task::spawn_local(async move {
                    let _ = resynced.await;
                    probe.heartbeat().await;
                });
            }
            _ = publisher_back.recv() => {
                tokio::task::spawn_local(backplane.clone().heartbeat());
            }
        }
    }
    // What the shards published while closing their sessions went first.
    if backplane.health.borrow().state() == LinkState::Up {
        let gone = Wire::Gone {
            origin: backplane.node_id.to_string(),
        };
        backplane.publish_direct(gone.encode(), false).await;
    }
    // A client that is not connected (Redis unreachable) has nothing to quit.
    for client in [
        &backplane.publisher as &dyn Quit,
        &backplane.subscriber as &dyn Quit,
    ] {
        client.quit_if_connected().await;
    }
}

/// Ends a Redis client's connection politely, if it has one.
trait Quit {
    fn quit_if_connected(&self) -> futures_util::future::LocalBoxFuture<'_, ()>;
}

impl<C: ClientLike> Quit for C {
    fn quit_if_connected(&self) -> futures_util::future::LocalBoxFuture<'_, ()> {
        Box::pin(async move {
            if self.is_connected() {
                let _ = tokio::time::timeout(DIRECT_PUBLISH_BOUND, self.quit()).await;
            }
        })
    }
}

impl Backplane {
    fn count_errors(&self, n: usize) {
        self.node
            .metrics
            .backplane_errors
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    fn is_down(&self) -> bool {
        self.health.borrow().state() == LinkState::Down
    }

    /// The Redis driver reported a failed or lost connection.
    fn driver_failed(
        &self,
        error: Result<
            (fred::error::Error, Option<fred::types::config::Server>),
            tokio::sync::broadcast::error::RecvError,
        >,
    ) {
        if let Ok((error, _)) = error {
            self.health.borrow_mut().failed(describe(&error));
        }
    }

    /// Acts on a change of the link's state. `timed_out`: Redis went silent (rather
    /// than the driver reporting a lost connection), so the connections are replaced.
    fn changed(self: &Rc<Self>, change: Change, timed_out: bool) {
        match change {
            Change::Down { report } => {
                let was_up = self.connected.swap(false, Ordering::AcqRel);
                self.node
                    .metrics
                    .backplane_connected
                    .store(0, Ordering::Relaxed);
                tracing::warn!(node = %self.node_id, "{report}");
                // Nothing waits on Redis while it is gone: what waits to be published is
                // dropped (at most once), and requests fail now.
                let dropped = self.outbox.take(usize::MAX);
                self.count_errors(dropped.len());
                for id in dropped.iter().filter_map(|queued| queued.request) {
                    self.fail_request(id);
                }
                if timed_out && was_up {
                    // A hung connection is never given up by the driver on its own.
                    self.force_reconnection();
                }
            }
            Change::Up { after, again } => {
                self.connected.store(true, Ordering::Release);
                let metrics = &self.node.metrics;
                metrics.backplane_connected.store(1, Ordering::Relaxed);
                if again {
                    metrics.backplane_reconnects.fetch_add(1, Ordering::Relaxed);
                }
                let address = self.health.borrow().address().to_owned();
                let after = after.map_or(String::new(), |down| {
                    format!(" after {} s unreachable", down.as_secs())
                });
                let again = if again { " again" } else { "" };
                tracing::info!(node = %self.node_id, "connected to Redis at {address}{again}{after}");
                // What was asked while Redis was away is subscribed now; the other nodes
                // learn of this one and get its presence whole; connections take on
                // their durable groups as Redis has them (made or changed meanwhile).
                let _ = self
                    .subscriptions
                    .send(SubscriptionOp::Resync { reconnected: false });
                tokio::task::spawn_local(self.clone().hello());
                if self.node.durable_in_redis {
                    for inbox in &self.node.inboxes {
                        inbox.push(Command::ResyncDurable);
                    }
                }
            }
        }
    }

    fn force_reconnection(&self) {
        for client in [&self.publisher as &dyn ForceReconnection, &self.subscriber] {
            client.force();
        }
    }

    /// Takes what a shard or a `HubContext` handed over.
    fn hand_over(self: &Rc<Self>, outgoing: Outgoing) {
        let down = self.is_down();
        match outgoing {
            Outgoing::Send {
                hub,
                target,
                broadcast,
                ticket,
            } => {
                if down {
                    self.count_errors(1);
                    return;
                }
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
                self.queue(Queued {
                    channel: backplane::send_channel(&hub, &target),
                    payload: wire.encode(),
                    ticket,
                    request: None,
                });
            }
            Outgoing::Presence { seq, event } => {
                self.presence_published.set(seq);
                if down {
                    // Other nodes see the gap in the heartbeat's number and ask for a
                    // snapshot once Redis is back.
                    return;
                }
                let wire = Wire::Presence {
                    origin: self.node_id.to_string(),
                    seq,
                    event,
                };
                self.queue(Queued {
                    channel: backplane::presence_channel(),
                    payload: wire.encode(),
                    ticket: None,
                    request: None,
                });
            }
            Outgoing::Subscribe(channel) => {
                let _ = self.subscriptions.send(SubscriptionOp::Subscribe(channel));
            }
            Outgoing::Unsubscribe(channel) => {
                let _ = self
                    .subscriptions
                    .send(SubscriptionOp::Unsubscribe(channel));
            }
            Outgoing::Barrier(reply) => {
                let reply = Rc::new(BarrierReply(Cell::new(Some(reply))));
                if down {
                    reply.answer();
                    return;
                }
                let _ = self
                    .subscriptions
                    .send(SubscriptionOp::Barrier(reply.clone()));
                tokio::task::spawn_local(async move {
                    tokio::time::sleep(BARRIER_BOUND).await;
                    reply.answer();
                });
            }
            Outgoing::Request {
                channel,
                hub,
                op,
                reply,
            } => {
                if down {
                    let _ = reply.send(Err(BackplaneError::Disconnected));
                    return;
                }
                let id = self.next_request.get();
                self.next_request.set(id + 1);
                let within = op.answer_within();
                let wire = Wire::Request {
                    origin: self.node_id.to_string(),
                    id,
                    hub,
                    op,
                };
                self.pending.borrow_mut().insert(
                    id,
                    Pending {
                        within,
                        expected: None,
                        answers: Vec::new(),
                        reply,
                    },
                );
                self.queue(Queued {
                    channel,
                    payload: wire.encode(),
                    ticket: None,
                    request: Some(id),
                });
                let backplane = self.clone();
                tokio::task::spawn_local(async move {
                    tokio::time::sleep(within).await;
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
                if down {
                    return;
                }
                let backplane = self.clone();
                tokio::task::spawn_local(async move {
                    let saved = tokio::time::timeout(
                        STORE_BOUND,
                        backplane.publisher.set::<(), _, _>(
                            backplane::token_key(&token),
                            negotiated,
                            Some(Expiration::EX(TOKEN_TTL_SECS)),
                            None,
                            false,
                        ),
                    )
                    .await;
                    if !matches!(saved, Ok(Ok(()))) {
                        backplane.count_errors(1);
                        tracing::debug!("cannot keep a negotiated token in Redis: {saved:?}");
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

    /// Puts a message in line for publishing; past the outbox's bound it is dropped
    /// and counted (its request fails).
    fn queue(&self, queued: Queued) {
        if let Err(refused) = self.outbox.push(queued) {
            self.count_errors(1);
            if let Some(id) = refused.request {
                self.fail_request(id);
            }
        }
    }

    fn fail_request(&self, id: u64) {
        if let Some(pending) = self.pending.borrow_mut().remove(&id) {
            let _ = pending.reply.send(Err(BackplaneError::Disconnected));
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
            Err(BackplaneError::NoAnswer(request.within.as_secs()))
        } else {
            Ok(request.answers)
        };
        let _ = request.reply.send(answer);
    }

    /// Publishes one message on its own (not in line with the sends), within
    /// [`DIRECT_PUBLISH_BOUND`]. `probe`: sent while Redis is down too (a heartbeat
    /// asks whether it is back).
    async fn publish_direct(&self, payload: Bytes, probe: bool) {
        self.publish_direct_on(backplane::presence_channel(), payload, probe)
            .await;
    }

    async fn publish_direct_on(&self, channel: String, payload: Bytes, probe: bool) {
        if !probe && self.is_down() {
            self.count_errors(1);
            return;
        }
        let published = tokio::time::timeout(
            DIRECT_PUBLISH_BOUND,
            self.publisher.publish::<i64, _, _>(channel, payload),
        )
        .await;
        if !matches!(published, Ok(Ok(_))) && !probe {
            self.count_errors(1);
        }
    }

    /// A durable-membership operation in Redis, within [`STORE_BOUND`].
    async fn store(&self, op: StoreOp) -> Result<DurableGroups, BackplaneError> {
        if self.is_down() {
            return Err(BackplaneError::Disconnected);
        }
        let (hub, user, action, group) = match op {
            StoreOp::Read { hub, user } => (hub, user, "read", String::new()),
            StoreOp::Add { hub, user, group } => (hub, user, "add", group),
            StoreOp::Remove { hub, user, group } => (hub, user, "remove", group),
        };
        let keys = vec![
            backplane::durable_key(&hub, &user),
            backplane::durable_version_key(&hub, &user),
        ];
        let ran = tokio::time::timeout(
            STORE_BOUND,
            self.publisher.eval::<(u64, Vec<String>), _, _, _>(
                DURABLE_SCRIPT,
                keys,
                vec![action, &group],
            ),
        )
        .await;
        match ran {
            Err(_) => Err(BackplaneError::Timeout(STORE_BOUND.as_secs())),
            Ok(Err(e)) => Err(BackplaneError::Redis(e.details().to_owned())),
            Ok(Ok((version, mut groups))) => {
                groups.sort_unstable();
                Ok(DurableGroups { version, groups })
            }
        }
    }

    async fn fetch_token(&self, token: &str) -> Option<Bytes> {
        let key = backplane::token_key(token);
        let deadline = tokio::time::Instant::now() + TOKEN_SEARCH;
        let search = async {
            while !self.is_down() {
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
        };
        tokio::time::timeout_at(deadline, search)
            .await
            .ok()
            .flatten()
    }

    /// Says this node is alive (with the number of its last presence change): the
    /// probe whose echo tells that Redis works. Forgets nodes that stopped saying so,
    /// and at once those whose connection to Redis is gone (a crashed process).
    async fn heartbeat(self: Rc<Self>) {
        let client_timeout = self.node.config.client_timeout;
        // A node is forgotten a heartbeat before the client timeout, so that it stops
        // counting within the timeout of its death (contract section 7).
        let silence = client_timeout.saturating_sub(HEARTBEAT).max(2 * HEARTBEAT);
        self.node.presence.forget_nodes(silence, None);
        let wire = Wire::Heartbeat {
            origin: self.node_id.to_string(),
            name: self.node.config.node_name.clone(),
            seq: self.presence_published.get(),
        };
        self.publish_direct(wire.encode(), true).await;
        if self.health.borrow().state() == LinkState::Up {
            self.forget_dead_peers().await;
        }
    }

    /// Nodes silent for [`PEER_SILENT`] whose subscriber connection Redis no longer has
    /// (a process that died closes its connections; a stopped or partitioned one keeps
    /// them) are gone: forgotten now, not after the client timeout.
    async fn forget_dead_peers(&self) {
        let silent = self.node.presence.silent_nodes(PEER_SILENT);
        if silent.is_empty() {
            return;
        }
        let channels: Vec<String> = silent
            .iter()
            .map(|(id, _)| backplane::node_channel(id))
            .collect();
        let counted = tokio::time::timeout(
            DIRECT_PUBLISH_BOUND,
            self.publisher.pubsub_numsub::<Vec<RedisValue>, _>(channels),
        )
        .await;
        let Ok(Ok(counts)) = counted else {
            return;
        };
        // [channel, count, channel, count, ...]
        for (pair, (id, name)) in counts.chunks(2).zip(&silent) {
            if pair.get(1).and_then(RedisValue::as_i64) == Some(0) {
                tracing::info!(node = %name, "a cluster node's Redis connection is gone: it died");
                self.node.presence.forget_node(id);
            }
        }
    }

    /// Redis is (back) up: other nodes learn of this one and get its presence whole.
    async fn hello(self: Rc<Self>) {
        let hello = Wire::Hello {
            origin: self.node_id.to_string(),
            name: self.node.config.node_name.clone(),
        };
        self.publish_direct(hello.encode(), false).await;
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
        self.publish_direct(wire.encode(), false).await;
    }

    /// The node heard its own heartbeat.
    fn echo(self: &Rc<Self>) {
        let change = self.health.borrow_mut().echo(Instant::now());
        if let Some(change) = change {
            self.changed(change, false);
        }
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
                let limit = self.node.config.message_limit();
                if backplane::check_send_records(&json, &messagepack, limit).is_err() {
                    self.node
                        .metrics
                        .backplane_rejected
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        origin,
                        "dropped a send whose records are not whole invocations within the limit"
                    );
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
                        .publish_direct_on(backplane::node_channel(&origin), reply.encode(), false)
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
                if own(&origin) {
                    self.echo();
                } else if self.node.presence.heard_from(&origin, &name, Some(seq)) {
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
        self.publish_direct(wire.encode(), false).await;
    }

    /// Does what another node asks of a connection (or of a user's connections), if
    /// they are here.
    async fn answer(&self, hub: &str, op: RemoteOp) -> Answer {
        let context = HubContext {
            node: self.node.clone(),
            publisher: None,
        };
        let (connection_id, op, group) = match op {
            RemoteOp::Durable { user, groups } => {
                let applied = context.apply_durable_here(hub, &user, groups).await;
                return if applied > 0 {
                    Answer::Done
                } else {
                    Answer::NotHere
                };
            }
            RemoteOp::Connection {
                connection_id,
                op,
                group,
            } => (connection_id, op, group),
            RemoteOp::GroupMembers { group } => {
                let members = context.local_group_members(hub, &group).await;
                return if members.is_empty() {
                    Answer::NotHere
                } else {
                    Answer::Members(members)
                };
            }
            RemoteOp::InvokeClient {
                connection_id,
                invocation,
                timeout_ms,
            } => {
                let Some(shard) = self.node.presence.shard_of(hub, &connection_id) else {
                    return Answer::NotHere;
                };
                let Ok(Some(HubMessage::Invocation(invocation))) = msgpack::parse(&invocation)
                else {
                    return Answer::Failed("a malformed client invocation".into());
                };
                let timeout = Duration::from_millis(timeout_ms);
                let answer =
                    invoke_client_here(&self.node, shard, hub, &connection_id, invocation, timeout)
                        .await;
                return Answer::ClientResult(client_results::encode_answer(&answer));
            }
        };
        let op_here = match op {
            RemoteOpKind::Join => ConnectionOp::Join(group),
            RemoteOpKind::Leave => ConnectionOp::Leave(group),
            RemoteOpKind::Watch => ConnectionOp::WatchPresence(group),
            RemoteOpKind::Unwatch => ConnectionOp::UnwatchPresence(group),
            RemoteOpKind::Close => ConnectionOp::Close {
                reason: (!group.is_empty()).then_some(group),
            },
            RemoteOpKind::LeaveAll => ConnectionOp::LeaveAll,
        };
        let done = context
            .local_connection_op(hub, &connection_id, op_here)
            .await;
        let answer = match done {
            Ok(true) => Answer::Done,
            Ok(false) => Answer::NotHere,
            Err(ContextError::TooManyGroups { limit }) => Answer::TooManyGroups(limit as u64),
            Err(e) => Answer::Failed(e.to_string()),
        };
        if answer == Answer::Done && matches!(op, RemoteOpKind::Join) {
            // Acknowledged once the group's channel is subscribed here.
            if let Some(link) = &self.node.backplane {
                link.barrier().await;
            }
        }
        answer
    }
}

/// What went wrong, for a log line: the driver keeps an I/O error's debug text
/// (`Os { code: 111, kind: ConnectionRefused, message: "Connection refused" }`).
fn describe(error: &fred::error::Error) -> String {
    let details = error.details();
    if let Some((_, rest)) = details.split_once("message: \"") {
        if let Some((message, _)) = rest.split_once('"') {
            return message.to_owned();
        }
    }
    if let Some(kind) = details
        .strip_prefix("Kind(")
        .and_then(|kind| kind.strip_suffix(')'))
    {
        return kind.to_owned();
    }
    if details.is_empty() {
        error.kind().to_str().to_owned()
    } else {
        details.to_owned()
    }
}

/// Replacing a Redis client's connection (one that hangs is never given up by the
/// driver on its own).
trait ForceReconnection {
    fn force(&self);
}

impl<C: ClientLike + Clone + 'static> ForceReconnection for C {
    fn force(&self) {
        let client = self.clone();
        tokio::task::spawn_local(async move {
            let _ = client.force_reconnection().await;
        });
    }
}

/// Publishes what waits in the outbox, a pipeline at a time, in order. A send keeps
/// its publisher charged while its pipeline is on its way, up to [`HOLD_LIMIT`].
async fn publish_outbox(backplane: Rc<Backplane>) {
    let outbox = &backplane.outbox;
    loop {
        let batch = outbox.take(MAX_BATCH);
        if batch.is_empty() {
            outbox.ready.notified().await;
            continue;
        }
        let pipeline = backplane.publisher.pipeline();
        let mut held: Vec<Arc<Ticket>> = Vec::new();
        let mut requests: Vec<(usize, u64)> = Vec::new();
        for (index, queued) in batch.into_iter().enumerate() {
            let _: Result<(), _> = pipeline.publish(queued.channel, queued.payload).await;
            held.extend(queued.ticket);
            requests.extend(queued.request.map(|id| (index, id)));
        }
        let published = pipeline.try_all::<i64>();
        tokio::pin!(published);
        let results = tokio::select! {
            results = &mut published => results,
            _ = tokio::time::sleep(HOLD_LIMIT) => {
                // Redis is slow to answer: nobody waits on it any longer.
                outbox.let_go();
                held.clear();
                published.await
            }
        };
        drop(held);
        outbox.lagging.set(false);
        let mut receivers = Vec::with_capacity(results.len());
        for result in results {
            receivers.push(match result {
                Ok(count) => Some(count),
                Err(e) => {
                    backplane.count_errors(1);
                    tracing::debug!("backplane publish failed: {e}");
                    None
                }
            });
        }
        for (index, id) in requests {
            match receivers.get(index).copied().flatten() {
                Some(count) => {
                    if let Some(pending) = backplane.pending.borrow_mut().get_mut(&id) {
                        pending.expected = Some(count.max(0) as usize);
                    }
                    backplane.finish_request(id, false);
                }
                None => backplane.fail_request(id),
            }
        }
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
                        backplane
                            .node
                            .metrics
                            .backplane_rejected
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(channel = %message.channel, "ignored: {e}");
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

/// The channels every node listens on, subscribed first (and together) on every new
/// subscriber connection: other nodes see this node's own channel from the moment its
/// heartbeat comes back.
fn fixed_channels(node_id: &str) -> [String; 3] {
    [
        backplane::all_channel(),
        backplane::presence_channel(),
        backplane::node_channel(node_id),
    ]
}

/// Applies subscription changes in the order they were asked, merging runs of the same
/// kind into one command; a barrier is answered once everything before it is done.
/// Keeps what is wanted and what the subscriber connection has, so that after an outage
/// (or a new connection) it subscribes to what is missing and drops what is no longer
/// wanted.
async fn manage_subscriptions(
    backplane: Rc<Backplane>,
    mut ops: tokio::sync::mpsc::UnboundedReceiver<SubscriptionOp>,
) {
    let fixed = fixed_channels(&backplane.node_id);
    let mut wanted: HashSet<String> = fixed.iter().cloned().collect();
    let mut subscribed: HashSet<String> = HashSet::new();
    let mut batch = Vec::new();
    while ops.recv_many(&mut batch, 4096).await > 0 {
        let mut run: Vec<String> = Vec::new();
        let mut run_subscribes = true;
        for op in batch.drain(..) {
            let (channel, subscribe) = match op {
                SubscriptionOp::Subscribe(channel) => (channel, true),
                SubscriptionOp::Unsubscribe(channel) => (channel, false),
                SubscriptionOp::Barrier(reply) => {
                    flush(&backplane, &mut run, run_subscribes, &mut subscribed).await;
                    reply.answer();
                    continue;
                }
                SubscriptionOp::Resync { reconnected } => {
                    flush(&backplane, &mut run, run_subscribes, &mut subscribed).await;
                    if reconnected {
                        subscribed.clear();
                        let mut first = fixed.to_vec();
                        send(&backplane, &mut first, true, &mut subscribed).await;
                    }
                    let missing: Vec<String> = wanted.difference(&subscribed).cloned().collect();
                    let stale: Vec<String> = subscribed.difference(&wanted).cloned().collect();
                    for (channels, subscribe) in [(missing, true), (stale, false)] {
                        for chunk in channels.chunks(1024) {
                            send(&backplane, &mut chunk.to_vec(), subscribe, &mut subscribed).await;
                        }
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
                flush(&backplane, &mut run, run_subscribes, &mut subscribed).await;
                run_subscribes = subscribe;
            }
            run.push(channel);
        }
        flush(&backplane, &mut run, run_subscribes, &mut subscribed).await;
    }
}

/// Sends the (un)subscriptions of `run` unless Redis is down (the resync after it
/// comes back covers them).
async fn flush(
    backplane: &Backplane,
    run: &mut Vec<String>,
    subscribe: bool,
    subscribed: &mut HashSet<String>,
) {
    if backplane.is_down() {
        run.clear();
        return;
    }
    send(backplane, run, subscribe, subscribed).await;
}

/// One SUBSCRIBE (or UNSUBSCRIBE) for the channels of `run`; `subscribed` follows what
/// succeeded.
async fn send(
    backplane: &Backplane,
    run: &mut Vec<String>,
    subscribe: bool,
    subscribed: &mut HashSet<String>,
) {
    if run.is_empty() {
        return;
    }
    let channels = std::mem::take(run);
    let done = if subscribe {
        backplane.subscriber.subscribe(channels.clone()).await
    } else {
        backplane.subscriber.unsubscribe(channels.clone()).await
    };
    match done {
        Ok(()) if subscribe => subscribed.extend(channels),
        Ok(()) => channels.iter().for_each(|c| {
            subscribed.remove(c);
        }),
        Err(e) => {
            backplane.count_errors(1);
            tracing::debug!("backplane (un)subscribe failed: {e}");
        }
    }
}
