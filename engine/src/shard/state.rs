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

use crate::api::hub::ShardHubs;
use crate::api::{Caller, ContextError, Hub, HubContext, Target};
use crate::backplane::{Link, StoreOp};
use crate::fanout::{Broadcast, FrameKind};
use crate::flow::{Ticket, Window};
use crate::metrics::{MetricsRef, ShardMetrics};
use crate::node::Node;
use crate::presence::PRESENCE_CHANGED;
use crate::quota::Share;
use crate::session::Session;
use crate::shard::inbox::{Command, ConnectionOp};
use crate::shard::tables::HubTables;
use crate::shard::tokens::{Token, Tokens};
use crate::signal::Signal;
use crate::store::DurableGroups;
use crate::transport::flush::Flusher;

/// The longest a new connection's registration waits on Redis (its durable groups and
/// its subscriptions), so that a hung Redis never holds a handshake for longer: what
/// it could not do then is done once Redis answers again.
const REGISTER_BOUND: std::time::Duration = std::time::Duration::from_secs(2);

pub struct ShardState {
    pub index: usize,
    pub node: Arc<Node>,
    hubs: RefCell<HashMap<String, HubTables>>,
    hubs_served: ShardHubs,
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
    (crate::config::open_file_limit() / 2 / shards.max(1)).max(16)
}

impl ShardState {
    pub fn new(index: usize, node: Arc<Node>, hubs_served: ShardHubs) -> ShardState {
        ShardState {
            flusher: Rc::default(),
            index,
            hubs_served,
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
    /// The hub serving `name` on this shard (`None`: no hub is mapped to it).
    pub fn hub(&self, name: &str) -> Option<&dyn Hub> {
        self.hubs_served.get(name)
    }

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
        slot: Option<Share>,
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
            slot,
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
                if !session.groups.borrow().contains(group.as_str()) {
                    self.check_group_limit(&session)?;
                }
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
                if watch && !session.watching.borrow().contains(group.as_str()) {
                    self.check_group_limit(&session)?;
                }
                if tables.watch(session.key, group, watch) {
                    presence.watch(hub, group, self.index, watch);
                }
            }
            ConnectionOp::Close { reason } => session.close(reason.as_deref(), false),
            ConnectionOp::LeaveAll => {
                let groups: Vec<String> = session.groups.borrow().iter().cloned().collect();
                for group in groups {
                    if tables.leave(session.key, &group) {
                        presence.left(hub, &group, user);
                    }
                }
            }
            ConnectionOp::InvokeClient(invocation) => {
                session.calls().owe(invocation.result_id);
                if !session.enqueue(&invocation.invocation.frame(session.kind()), None) {
                    // Closing: it will never answer.
                    session.calls().answered(invocation.result_id);
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Refuses one group more for a session already in (or watching)
    /// `--max-groups-per-connection` groups: watches count, as each holds memory and a
    /// presence entry like a membership.
    fn check_group_limit(&self, session: &Session) -> Result<(), ContextError> {
        let limit = self.node.config.max_groups_per_connection;
        if session.groups.borrow().len() + session.watching.borrow().len() >= limit {
            return Err(ContextError::TooManyGroups { limit });
        }
        Ok(())
    }

    /// Puts a session in this shard's tables and in presence, then in its user's
    /// durable groups. In that order: a durable change stores first and then tells the
    /// user's connections, so a session registering meanwhile is covered by one side or
    /// the other (and versions keep the newer side). In a cluster, resolves once the
    /// session's channels (its own, its user's, its durable groups') are subscribed, so
    /// that what other nodes send it from the moment the client learns it is connected
    /// reaches it; within [`REGISTER_BOUND`] whatever Redis does.
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
            .insert(session.clone());
        let metrics = self.metrics();
        metrics.connections.fetch_add(1, Relaxed);
        ShardMetrics::add(&metrics.connects, 1);
        // Boxed: a timer future is 128-byte aligned, and the session's task is sized
        // for its largest state (see `transport::websocket::run_session`).
        let waited = Box::pin(monoio::time::timeout(REGISTER_BOUND, async {
            self.join_durable_groups(&session).await;
            if let Some(link) = &self.node.backplane {
                link.barrier().await;
            }
        }))
        .await;
        if waited.is_err() {
            tracing::debug!(connection = %caller.connection_id, "Redis is slow: connected before its subscriptions were confirmed");
        }
    }

    /// A registered session's handshake answer is on its way: its hub learns of it, and
    /// what the hub sent then is queued for this shard's recipients first.
    /// `remote`: the client's address, when the connection logs are on.
    pub async fn announce(
        &self,
        session: &Session,
        transport: &'static str,
        remote: Option<std::net::SocketAddr>,
    ) {
        let caller = &session.caller;
        if let Some(hub) = self.hub(&caller.hub) {
            hub.on_connected(caller, &self.context_of(session)).await;
        }
        self.drain_inbox();
        tracing::debug!(
            connection = %caller.connection_id,
            hub = %caller.hub,
            user = caller.user_id.as_deref().unwrap_or(""),
            remote = %remote.map_or_else(String::new, |addr| addr.to_string()),
            transport,
            protocol = ?session.protocol(),
            "connected"
        );
    }

    /// A registered session ended: it leaves every table and group now (presence drops
    /// at once, watchers are told), and the returned future tells its hub.
    pub fn end(
        self: &Rc<Self>,
        session: &Session,
    ) -> impl std::future::Future<Output = ()> + 'static {
        self.unregister(session);
        for result_id in session.end_calls() {
            let gone = ContextError::ClientDisconnected(session.caller.connection_id.clone());
            self.node.client_results.answer(result_id, Err(gone));
        }
        let (state, caller, context) = (
            self.clone(),
            session.caller.clone(),
            self.context_of(session),
        );
        let (reason, lasted) = (session.end_reason(), session.started.elapsed());
        async move {
            if let Some(hub) = state.hub(&caller.hub) {
                hub.on_disconnected(&caller, &context).await;
            }
            tracing::debug!(
                connection = %caller.connection_id,
                hub = %caller.hub,
                user = caller.user_id.as_deref().unwrap_or(""),
                ?reason,
                lasted_ms = lasted.as_millis() as u64,
                "disconnected"
            );
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
        let metrics = self.metrics();
        metrics.connections.fetch_sub(1, Relaxed);
        metrics.connection_ended(session.started.elapsed());
    }

    /// The backplane, when durable membership lives in Redis (read through it without
    /// blocking this shard).
    fn durable_link(&self) -> Option<&Link> {
        self.node
            .backplane
            .as_ref()
            .filter(|_| self.node.durable_in_redis)
    }

    /// A user's durable groups and their version. The embedded store (or an
    /// embedder's) is read here: a read transaction costs microseconds, and the
    /// version is read first, so it is never newer than the groups.
    async fn read_durable(&self, hub: &str, user: &str) -> Result<DurableGroups, String> {
        if let Some(link) = self.durable_link() {
            let read = StoreOp::Read {
                hub: hub.to_owned(),
                user: user.to_owned(),
            };
            return link.store(read).await.map_err(|e| e.to_string());
        }
        let version = self.node.durable_version();
        let groups = self
            .node
            .store
            .user_groups(hub, user)
            .map_err(|e| e.to_string())?;
        Ok(DurableGroups { version, groups })
    }

    /// Joins a new session to its user's durable groups. When they cannot be read now
    /// (Redis unreachable), the session takes them on once Redis answers again.
    async fn join_durable_groups(&self, session: &Rc<Session>) {
        let caller = &session.caller;
        let Some(user) = &caller.user_id else {
            return;
        };
        match self.read_durable(&caller.hub, user).await {
            Ok(durable) => self.apply_durable(session, &durable),
            Err(e) => tracing::debug!(
                user,
                "cannot read durable groups now ({e}); the connection takes them on once Redis answers"
            ),
        }
    }

    /// Brings a session's durable groups to `durable`, unless it took on a newer version
    /// already: the groups it holds durably and `durable` no longer lists are left, the
    /// new ones joined (a connection at its group limit stays out of the rest).
    pub fn apply_durable(&self, session: &Session, durable: &DurableGroups) {
        if durable.version < session.durable_version.get() {
            return;
        }
        session.durable_version.set(durable.version);
        let caller = &session.caller;
        let (hub, id) = (caller.hub.as_str(), caller.connection_id.as_str());
        let held = session.durable_groups.borrow_mut().take();
        let mut now_held = hashbrown::HashSet::new();
        for group in held.into_iter().flat_map(|held| held.into_iter()) {
            if durable.groups.contains(&group) {
                now_held.insert(group);
            } else {
                let _ = self.connection_op(hub, id, &ConnectionOp::Leave(group));
            }
        }
        for group in &durable.groups {
            if now_held.contains(group) {
                continue;
            }
            match self.connection_op(hub, id, &ConnectionOp::Join(group.clone())) {
                Ok(_) => {
                    now_held.insert(group.clone());
                }
                Err(e) => {
                    tracing::warn!(
                        user = caller.user_id,
                        "cannot join every durable group: {e}"
                    );
                    break;
                }
            }
        }
        if !now_held.is_empty() {
            *session.durable_groups.borrow_mut() = Some(Box::new(now_held));
        }
    }

    /// [`ShardState::apply_durable`] for every connection of `user` here; how many.
    fn apply_durable_to_user(&self, hub: &str, user: &str, durable: &DurableGroups) -> usize {
        let sessions = match self.hubs.borrow().get(hub) {
            Some(tables) => tables.user_sessions(user),
            None => return 0,
        };
        for session in &sessions {
            self.apply_durable(session, durable);
        }
        sessions.len()
    }

    /// Redis answers again: every connection with a user takes on its durable groups as
    /// Redis has them now (those it could not read at connect, and changes made while
    /// this node could not hear of them).
    fn resync_durable(&self) {
        let Some(link) = self.durable_link().cloned() else {
            return;
        };
        let mut users = hashbrown::HashSet::new();
        for (hub, tables) in self.hubs.borrow().iter() {
            for session in tables.sessions.values() {
                if let Some(user) = &session.caller.user_id {
                    users.insert((hub.clone(), user.clone()));
                }
            }
        }
        if users.is_empty() {
            return;
        }
        // The answers come back through this shard's inbox, as any durable change does.
        let (node, index) = (self.node.clone(), self.index);
        monoio::spawn(async move {
            let reads = users.into_iter().map(|(hub, user)| {
                let link = link.clone();
                async move {
                    let read = StoreOp::Read {
                        hub: hub.clone(),
                        user: user.clone(),
                    };
                    (link.store(read).await, hub, user)
                }
            });
            for (read, hub, user) in futures_util::future::join_all(reads).await {
                match read {
                    Ok(durable) => node.inboxes[index].push(Command::Durable {
                        hub: hub.into(),
                        user,
                        groups: Arc::new(durable),
                        reply: futures_channel::oneshot::channel().0,
                    }),
                    Err(e) => tracing::debug!(user, "cannot read durable groups again: {e}"),
                }
            }
        });
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
            Command::Durable {
                hub,
                user,
                groups,
                reply,
            } => {
                let _ = reply.send(self.apply_durable_to_user(&hub, &user, &groups));
            }
            Command::GroupMembers { hub, group, reply } => {
                let members = self
                    .hubs
                    .borrow()
                    .get(&*hub)
                    .map(|tables| tables.group_members(&group))
                    .unwrap_or_default();
                let _ = reply.send(members);
            }
            Command::ResyncDurable => self.resync_durable(),
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
