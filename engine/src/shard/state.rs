//! What one shard owns: its hubs' tables, its hub instance, and the handling of what
//! other shards (and `HubContext`s anywhere) ask of it through its inbox. Everything
//! here is touched by this shard's thread only.

use std::cell::{Cell, OnceCell, RefCell};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::BytesMut;
use hashbrown::HashMap;
use ringhub_protocol::HubMessage;

use crate::api::{Caller, ContextError, Hub, HubContext, Target};
use crate::backplane::StoreOp;
use crate::fanout::{Broadcast, FrameKind};
use crate::flow::{Ticket, Window};
use crate::metrics::{MetricsRef, ShardMetrics};
use crate::node::Node;
use crate::presence::PRESENCE_CHANGED;
use crate::session::Session;
use crate::shard::inbox::{Command, ConnectionOp};
use crate::shard::tables::HubTables;
use crate::shard::tokens::{Token, Tokens};
use crate::signal::Signal;
use crate::transport::flush::Flusher;

pub struct ShardState {
    pub index: usize,
    pub node: Arc<Node>,
    hubs: RefCell<HashMap<String, HubTables>>,
    pub hub: Box<dyn Hub>,
    pub context: HubContext,
    next_key: Cell<u64>,
    pub metrics: Rc<MetricsRef>,
    pub shutdown: Signal,
    /// The connection tokens this shard owns.
    pub tokens: Tokens,
    /// Serves an HTTP connection handed over by another shard (set by the thread body).
    adopter: OnceCell<Adopter>,
    /// Connections in the HTTP phase now, and the most this shard takes at once.
    pub http_connections: Cell<usize>,
    pub max_http_connections: usize,
    /// What all this shard's connections' sends may have on their way together (each
    /// connection's own window draws on it).
    publish_budget: Arc<Window>,
    /// Writes the streaming sessions' sockets (its pass runs as one of the shard's tasks).
    pub flusher: Rc<Flusher>,
}

/// What serves an HTTP connection handed over by another shard.
pub type Adopter = Box<dyn Fn(std::net::TcpStream, BytesMut)>;

/// The bound on one shard's HTTP-phase connections: half the process's open-file limit,
/// shared by its shards (the other half is for sessions and everything else).
fn max_http_connections(shards: usize) -> usize {
    let limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
            line.split_whitespace().nth(3)?.parse::<usize>().ok()
        })
        .unwrap_or(1024);
    (limit / 2 / shards.max(1)).max(16)
}

impl ShardState {
    pub fn new(index: usize, node: Arc<Node>, hub: Box<dyn Hub>) -> ShardState {
        ShardState {
            flusher: Rc::default(),
            index,
            hub,
            context: HubContext {
                node: node.clone(),
                publisher: None,
            },
            hubs: RefCell::default(),
            next_key: Cell::new(0),
            metrics: Rc::new(MetricsRef(node.metrics.clone(), index)),
            shutdown: Signal::default(),
            tokens: Tokens::default(),
            adopter: OnceCell::new(),
            http_connections: Cell::new(0),
            max_http_connections: max_http_connections(node.inboxes.len()),
            publish_budget: Window::new(node.config.shard_publish_budget(), None),
            node,
        }
    }

    pub fn metrics(&self) -> &ShardMetrics {
        self.metrics.get()
    }

    /// The context a session's hub calls get: their sends are charged to its window.
    pub fn context_of(&self, session: &Session) -> HubContext {
        self.context.publishing_as(&session.publish_window)
    }

    /// A new session of this shard (not registered yet), with its own publish window.
    /// `stateful_reconnect`: the session is resumable, with a replay buffer of that
    /// many bytes.
    pub fn new_session(
        &self,
        caller: Rc<Caller>,
        kind: FrameKind,
        stateful_reconnect: Option<usize>,
    ) -> Rc<Session> {
        let key = self.next_key.get();
        self.next_key.set(key + 1);
        let config = &self.node.config;
        let window = Window::new(
            config.connection_publish_window(),
            Some(self.publish_budget.clone()),
        );
        let session = Session::new(
            key,
            caller,
            kind,
            config.max_buffered_bytes,
            window,
            self.metrics.clone(),
        );
        Rc::new(match stateful_reconnect {
            Some(buffer) => session.with_stateful_reconnect(buffer),
            None => session,
        })
    }

    pub fn deliver(
        &self,
        hub: &str,
        target: &Target,
        broadcast: &Broadcast,
        ticket: Option<&Arc<Ticket>>,
    ) {
        if let Some(tables) = self.hubs.borrow().get(hub) {
            tables.deliver(target, broadcast, ticket);
        }
    }

    /// Acts on a session if it lives on this shard; `Ok(false)` if it does not.
    pub fn connection_op(
        &self,
        hub: &str,
        connection_id: &str,
        op: &ConnectionOp,
    ) -> Result<bool, ContextError> {
        let mut hubs = self.hubs.borrow_mut();
        let Some(tables) = hubs.get_mut(hub) else {
            return Ok(false);
        };
        let Some(session) = tables
            .key_of(connection_id)
            .and_then(|key| tables.session(key))
            .cloned()
        else {
            return Ok(false);
        };
        let presence = &self.node.presence;
        let user = session.caller.user_id.as_deref();
        match op {
            ConnectionOp::Join(group) => {
                let limit = self.node.config.max_groups_per_connection;
                let groups = session.groups.borrow();
                if groups.len() >= limit && !groups.contains(group.as_str()) {
                    return Err(ContextError::TooManyGroups { limit });
                }
                drop(groups);
                if tables.join(session.key, group) {
                    presence.joined(hub, group, user);
                }
            }
            ConnectionOp::Leave(group) => {
                if tables.leave(session.key, group) {
                    presence.left(hub, group, user);
                }
            }
            ConnectionOp::WatchPresence(group) | ConnectionOp::UnwatchPresence(group) => {
                let watch = matches!(op, ConnectionOp::WatchPresence(_));
                if tables.watch(session.key, group, watch) {
                    presence.watch(hub, group, self.index, watch);
                }
            }
            ConnectionOp::Close => session.close(None, false),
        }
        Ok(true)
    }

    /// Puts a session in this shard's tables and in presence, then in its user's
    /// durable groups. In that order: a durable add stores first and then lists the
    /// user's connections, so a session registering meanwhile is covered by one side
    /// or the other. In a cluster, resolves once the session's channels (its own, its
    /// user's, its durable groups') are subscribed, so that what other nodes send it
    /// from the moment the client learns it is connected reaches it.
    pub async fn register(&self, session: Rc<Session>) {
        let caller = session.caller.clone();
        self.node.presence.connected(
            &caller.hub,
            &caller.connection_id,
            caller.user_id.as_deref(),
            self.index,
        );
        self.hubs
            .borrow_mut()
            .entry_ref(caller.hub.as_str())
            .or_default()
            .insert(session);
        self.metrics().connections.fetch_add(1, Relaxed);
        self.join_durable_groups(&caller).await;
        if let Some(link) = &self.node.backplane {
            link.barrier().await;
        }
    }

    /// Takes the session out of every table and group, here and in presence.
    pub fn unregister(&self, session: &Session) {
        let (hub, user) = (
            session.caller.hub.as_str(),
            session.caller.user_id.as_deref(),
        );
        let presence = &self.node.presence;
        let mut hubs = self.hubs.borrow_mut();
        if let Some(tables) = hubs.get_mut(hub) {
            tables.remove(
                session.key,
                |group| presence.left(hub, group, user),
                |group| presence.watch(hub, group, self.index, false),
            );
            if tables.sessions.is_empty() {
                hubs.remove(hub);
            }
        }
        presence.disconnected(hub, &session.caller.connection_id);
        self.metrics().connections.fetch_sub(1, Relaxed);
    }

    /// Joins a new session to its user's durable groups. The store is read here when
    /// it is the embedded one (a read transaction costs microseconds) or an embedder's;
    /// when it is the cluster's, Redis is read by the backplane thread while this shard
    /// goes on.
    async fn join_durable_groups(&self, caller: &Caller) {
        let Some(user) = &caller.user_id else {
            return;
        };
        let redis = (self.node.backplane.as_ref()).filter(|_| self.node.durable_in_redis);
        let groups = match redis {
            Some(link) if !link.is_connected() => Err(
                "Redis is unreachable (the connection joins them once it reconnects)".to_owned(),
            ),
            Some(link) => link
                .store(StoreOp::Groups {
                    hub: caller.hub.clone(),
                    user: user.clone(),
                })
                .await
                .map_err(|e| e.to_string()),
            None => self
                .node
                .store
                .user_groups(&caller.hub, user)
                .map_err(|e| e.to_string()),
        };
        match groups {
            Ok(groups) => {
                for group in groups {
                    let join = ConnectionOp::Join(group);
                    if let Err(e) = self.connection_op(&caller.hub, &caller.connection_id, &join) {
                        tracing::warn!(user, "cannot join every durable group: {e}");
                        break;
                    }
                }
            }
            Err(e) => tracing::warn!(user, "cannot read durable groups: {e}"),
        }
    }

    /// Tells this shard's watchers about the groups whose counts changed.
    pub fn notify_presence(&self) {
        for (hub, group, presence) in self.node.presence.take_changes(self.index) {
            if let Some(tables) = self.hubs.borrow().get(&hub) {
                let broadcast = Broadcast::new(HubMessage::invocation(
                    PRESENCE_CHANGED,
                    vec![presence.changed_value(&group)],
                ));
                tables.notify_watchers(&group, &broadcast);
            }
        }
    }

    pub fn all_sessions(&self) -> Vec<Rc<Session>> {
        self.hubs
            .borrow()
            .values()
            .flat_map(|t| t.sessions.values().cloned())
            .collect()
    }

    pub fn has_sessions(&self) -> bool {
        !self.hubs.borrow().is_empty()
    }

    /// Acts on one command from the inbox; false once the shard is to stop.
    pub fn handle(&self, command: Command) -> bool {
        match command {
            Command::Deliver {
                hub,
                target,
                broadcast,
                ticket,
            } => self.deliver(&hub, &target, &broadcast, ticket.as_ref()),
            Command::Connection {
                hub,
                connection_id,
                op,
                reply,
            } => {
                let _ = reply.send(self.connection_op(&hub, &connection_id, &op));
            }
            Command::Negotiated { token, negotiated } => {
                self.tokens.insert(token, Token::Negotiated(negotiated));
            }
            Command::Adopt { socket, buffered } => match self.adopter.get() {
                Some(adopt) => adopt(socket, buffered),
                None => tracing::warn!(shard = self.index, "a handed-over connection was dropped"),
            },
            Command::Shutdown => {
                self.shutdown.fire();
                return false;
            }
        }
        true
    }

    pub fn set_adopter(&self, adopter: Adopter) {
        let _ = self.adopter.set(adopter);
    }

    /// Handles everything waiting in this shard's inbox now, so that what a hub method
    /// sent is queued for this shard's recipients before the method's Completion.
    pub fn drain_inbox(&self) {
        let inbox = &self.node.inboxes[self.index];
        while let Some(command) = inbox.try_pop() {
            if !self.handle(command) {
                return;
            }
        }
    }
}
