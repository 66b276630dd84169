//! [`HubContext`]: a handle on a running node, usable from any thread or runtime, to
//! send to every target kind, change group membership and read presence. It reaches
//! the shards only through their inboxes, so it never touches a shard's state.

use std::future::Future;
use std::sync::Arc;

use bytes::BytesMut;
use futures_channel::oneshot;
use ringhub_protocol::hub::msgpack;
use ringhub_protocol::{HubMessage, Invocation, Value};

use crate::api::types::{check_group, check_user, Caller, ContextError, Target};
use crate::backplane::{
    self, Answer, BackplaneError, Link, Outgoing, RemoteOp, RemoteOpKind, StoreOp,
};
use crate::client_results;
use crate::fanout::Broadcast;
use crate::flow::Window;
use crate::node::Node;
use crate::presence::GroupPresence;
use crate::shard::inbox::{ClientInvocation, Command, ConnectionOp};
use crate::store::{DurableGroups, MembershipStore, StoreError};

/// A store failure, for the caller.
fn stored(error: StoreError) -> ContextError {
    ContextError::Store(Arc::new(error))
}

/// Checks every group name and user id a target names.
fn check_target(target: &Target) -> Result<(), ContextError> {
    match target {
        Target::Group(group) | Target::GroupExcept(group, _) => check_group(group),
        Target::Groups(groups) => groups.iter().try_for_each(|g| check_group(g)),
        Target::User(user) | Target::UserExcept(user, _) => check_user(user),
        Target::Users(users) => users.iter().try_for_each(|u| check_user(u)),
        Target::All | Target::AllExcept(_) | Target::Connection(_) | Target::Connections(_) => {
            Ok(())
        }
    }
}

/// A checked send, ready to be handed to the shards.
struct PreparedSend {
    hub: Arc<str>,
    target: Arc<Target>,
    broadcast: Arc<Broadcast>,
    /// What its publisher is charged: the JSON record's size.
    size: usize,
}

/// Hands a send to every shard, this thread's own included: the inbox keeps one order
/// for all sends, and a hub invocation's Completion is queued only after its shard has
/// drained its inbox (see `shard::dispatch`). Each shard's copy holds the ticket.
fn push_to_shards(
    node: &Node,
    hub: Arc<str>,
    target: Arc<Target>,
    broadcast: Arc<Broadcast>,
    ticket: crate::flow::Ticket,
) {
    let ticket = Arc::new(ticket);
    for inbox in &node.inboxes {
        inbox.push(Command::Deliver {
            hub: hub.clone(),
            target: target.clone(),
            broadcast: broadcast.clone(),
            ticket: Some(ticket.clone()),
        });
    }
    // The other nodes: published by the backplane thread, which holds the ticket until
    // then (a publisher outpacing Redis is slowed like one outpacing its receivers).
    if let Some(link) = &node.backplane {
        link.send(Outgoing::Send {
            hub,
            target,
            broadcast,
            ticket: Some(ticket),
        });
    }
}

/// A handle on a running server: `Clone + Send + Sync`, usable from any thread or
/// runtime (tokio included).
///
/// Sends are flow-controlled (contract section 6): a send through the context a hub
/// method is given is charged to the calling connection, which is not read while its
/// sends are still on their way to congested receivers; a send through any other
/// context (REST, an embedder's) resolves only once its message is queued within
/// bounds for every recipient.
#[derive(Clone)]
pub struct HubContext {
    pub(crate) node: Arc<Node>,
    /// The window of the connection whose hub invocation this context serves.
    pub(crate) publisher: Option<Arc<Window>>,
}

impl std::fmt::Debug for HubContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubContext").finish_non_exhaustive()
    }
}

impl HubContext {
    /// The node's upstreams (`--upstream`), if it has any.
    pub(crate) fn upstream(&self) -> Option<&crate::upstream::Upstream> {
        self.node.upstream.as_ref()
    }

    /// Whether `caller` may join (and so send to) `group`, by the server's group authorizer.
    pub fn may_join(&self, caller: &Caller, group: &str) -> bool {
        self.node.may_join(caller.claims.as_ref(), group)
    }

    /// The largest message a send takes once encoded (a frame for any protocol and
    /// transport): half of `--max-buffered-bytes`, so that one message can never fill a
    /// receiver's queue by itself (contract section 6).
    pub fn message_limit(&self) -> usize {
        self.node.config.message_limit()
    }

    /// This context, with its sends charged to a connection's publish window.
    pub(crate) fn publishing_as(&self, window: &Arc<Window>) -> HubContext {
        HubContext {
            node: self.node.clone(),
            publisher: Some(window.clone()),
        }
    }

    /// Whether the server requires tokens (`--jwt-secret`).
    pub fn authentication_enabled(&self) -> bool {
        self.node.jwt.is_some()
    }

    /// Sends `method(arguments...)` to `target` in `hub`. The message is handed to
    /// every shard when the future is first polled with room in its window (sends of
    /// one context, each awaited, arrive in order). Resolves then for a hub method's
    /// context; for any other, once every recipient's queue took it (REST answers
    /// then). Refused with [`ContextError::MessageTooLarge`] when one of its frames
    /// would be larger than [`HubContext::message_limit`].
    pub fn send(
        &self,
        hub: &str,
        target: Target,
        method: &str,
        arguments: Vec<Value>,
    ) -> impl Future<Output = Result<(), ContextError>> + Send + 'static {
        self.send_unless(hub, target, method, arguments, std::future::pending())
    }

    /// [`HubContext::send`], refused with [`ContextError::NoRoom`] if `given_up`
    /// resolves before there is room for the message (the caller's timer: REST's
    /// `--rest-timeout-secs`). Once handed over, the send goes on to its end.
    pub(crate) fn send_unless(
        &self,
        hub: &str,
        target: Target,
        method: &str,
        arguments: Vec<Value>,
        given_up: impl Future<Output = ()> + 'static,
    ) -> impl Future<Output = Result<(), ContextError>> + 'static {
        let prepared = self.prepare_send(hub, target, method, arguments);
        let node = self.node.clone();
        let publisher = self.publisher.clone();
        async move {
            let PreparedSend {
                hub,
                target,
                broadcast,
                size,
            } = prepared?;
            let window = publisher.as_ref().unwrap_or(&node.context_budget);
            let room = window.room();
            futures_util::pin_mut!(room, given_up);
            if let futures_util::future::Either::Right(_) =
                futures_util::future::select(room, given_up).await
            {
                return Err(ContextError::NoRoom);
            }
            if node.is_shutting_down() {
                return Err(ContextError::ShuttingDown);
            }
            if publisher.is_some() {
                push_to_shards(&node, hub, target, broadcast, window.charge(size));
            } else {
                let (ticket, released) = window.charge_and_notify(size);
                push_to_shards(&node, hub, target, broadcast, ticket);
                // A shard that stops drops what it held: the send is over either way.
                let _ = released.await;
            }
            Ok(())
        }
    }

    /// Checks a send and encodes what its size check needs.
    fn prepare_send(
        &self,
        hub: &str,
        target: Target,
        method: &str,
        arguments: Vec<Value>,
    ) -> Result<PreparedSend, ContextError> {
        if self.node.is_shutting_down() {
            return Err(ContextError::ShuttingDown);
        }
        check_target(&target)?;
        let broadcast = Broadcast::new(ringhub_protocol::HubMessage::invocation(method, arguments));
        let limit = self.message_limit();
        let size = broadcast
            .check_size(limit)
            .map_err(|_| ContextError::MessageTooLarge { limit })?;
        Ok(PreparedSend {
            hub: Arc::from(hub),
            target: Arc::new(target),
            broadcast: Arc::new(broadcast),
            size,
        })
    }

    /// Asks a connected client for a result (SignalR's client results): its handler of
    /// `method` (in the JS client, `connection.on(method, ...)` returning a value) is
    /// called with `arguments`, and its answer is decoded as `T`. The connection may be
    /// on any shard and, with `--redis`, on any node. Fails with the client's error
    /// ([`ContextError::ClientError`], which is also what a client without such a
    /// handler answers), when the connection ends first, when it does not answer within
    /// `--client-result-timeout-secs` (default 30), or when no node holds it.
    ///
    /// A hub method that awaits a result of its own caller does not block that
    /// caller's other messages: a connection's invocations run beside its reading.
    pub fn invoke_client<T: serde::de::DeserializeOwned>(
        &self,
        hub: &str,
        connection_id: &str,
        method: &str,
        arguments: Vec<Value>,
    ) -> impl Future<Output = Result<T, ContextError>> + Send + 'static {
        let timeout = self.node.config.client_result_timeout;
        let answer = self.invoke_client_value(hub, connection_id, method, arguments, timeout);
        async move {
            answer
                .await?
                .decode()
                .map_err(|e| ContextError::BadClientResult(e.to_string()))
        }
    }

    /// [`HubContext::invoke_client`], its answer as sent.
    fn invoke_client_value(
        &self,
        hub: &str,
        connection_id: &str,
        method: &str,
        arguments: Vec<Value>,
        timeout: std::time::Duration,
    ) -> impl Future<Output = Result<Value, ContextError>> + Send + 'static {
        let invocation = Invocation {
            target: method.to_owned(),
            arguments,
            ..Invocation::default()
        };
        let (node, hub, connection_id) =
            (self.node.clone(), hub.to_owned(), connection_id.to_owned());
        async move {
            if node.is_shutting_down() {
                return Err(ContextError::ShuttingDown);
            }
            let link = match (
                node.presence.shard_of(&hub, &connection_id),
                &node.backplane,
            ) {
                (Some(shard), _) => {
                    return invoke_client_here(
                        &node,
                        shard,
                        &hub,
                        &connection_id,
                        invocation,
                        timeout,
                    )
                    .await
                }
                (None, None) => return Err(ContextError::NoSuchConnection(connection_id)),
                (None, Some(link)) => link.clone(),
            };
            let mut body = BytesMut::new();
            msgpack::encode_body(&HubMessage::Invocation(invocation), &mut body);
            let op = RemoteOp::InvokeClient {
                connection_id: connection_id.clone(),
                invocation: body.freeze(),
                timeout_ms: timeout.as_millis() as u64,
            };
            let channel = backplane::connection_channel(&hub, &connection_id);
            let answers = link.request(channel, &hub, op).await?;
            for answer in answers {
                match answer {
                    Answer::ClientResult(body) => {
                        return client_results::decode_answer(&body, &connection_id, timeout)
                    }
                    Answer::Failed(e) => return Err(BackplaneError::Remote(e).into()),
                    _ => {}
                }
            }
            Err(ContextError::NoSuchConnection(connection_id))
        }
    }

    /// Adds a connection to a group. Resolves to `false` if no such connection is
    /// connected (a no-op, as in SignalR). Once it resolves `true`, every later send to
    /// the group reaches the connection.
    pub fn add_to_group(
        &self,
        hub: &str,
        connection_id: &str,
        group: &str,
    ) -> impl Future<Output = Result<bool, ContextError>> + Send + 'static {
        let join = self.group_op(hub, connection_id, group, ConnectionOp::Join);
        let link = self.node.backplane.clone();
        async move {
            let joined = join.await?;
            // In a cluster, joined once the group's channel is subscribed (sends from
            // other nodes reach the connection from then on).
            if let (true, Some(link)) = (joined, link) {
                link.barrier().await;
            }
            Ok(joined)
        }
    }

    /// Removes a connection from a group (not being a member is not an error).
    pub fn remove_from_group(
        &self,
        hub: &str,
        connection_id: &str,
        group: &str,
    ) -> impl Future<Output = Result<bool, ContextError>> + Send + 'static {
        self.group_op(hub, connection_id, group, ConnectionOp::Leave)
    }

    /// The connection receives `PresenceChanged({"group", "connections", "users"})`
    /// whenever the group's counts change, at most once per 100 ms, until it unwatches
    /// or disconnects. Resolves `false` if no such connection is connected.
    pub fn watch_presence(
        &self,
        hub: &str,
        connection_id: &str,
        group: &str,
    ) -> impl Future<Output = Result<bool, ContextError>> + Send + 'static {
        self.group_op(hub, connection_id, group, ConnectionOp::WatchPresence)
    }

    /// Stops [`HubContext::watch_presence`]'s messages. Resolves `false` if no such
    /// connection is connected; not watching is not an error.
    pub fn unwatch_presence(
        &self,
        hub: &str,
        connection_id: &str,
        group: &str,
    ) -> impl Future<Output = Result<bool, ContextError>> + Send + 'static {
        self.group_op(hub, connection_id, group, ConnectionOp::UnwatchPresence)
    }

    /// Closes a connection with a Close message. Resolves `false` if it is not connected.
    pub fn close_connection(
        &self,
        hub: &str,
        connection_id: &str,
    ) -> impl Future<Output = Result<bool, ContextError>> + Send + 'static {
        self.close_connection_because(hub, connection_id, None)
    }

    /// [`HubContext::close_connection`], with `reason` as the Close message's error.
    pub fn close_connection_because(
        &self,
        hub: &str,
        connection_id: &str,
        reason: Option<&str>,
    ) -> impl Future<Output = Result<bool, ContextError>> + Send + 'static {
        let reason = reason.map(str::to_owned);
        self.connection_op(hub, connection_id, ConnectionOp::Close { reason })
    }

    /// Removes a connection from every group it is in. Resolves to `false` if no such
    /// connection is connected.
    pub fn remove_from_all_groups(
        &self,
        hub: &str,
        connection_id: &str,
    ) -> impl Future<Output = Result<bool, ContextError>> + Send + 'static {
        self.connection_op(hub, connection_id, ConnectionOp::LeaveAll)
    }

    /// The connections of a group on every node, with their user ids, sorted by
    /// connection id: with `--redis`, the nodes with members of the group are asked (a
    /// node that does not answer in time is left out, not waited for).
    pub fn group_members(
        &self,
        hub: &str,
        group: &str,
    ) -> impl Future<Output = Result<Vec<(String, Option<String>)>, ContextError>> + Send + 'static
    {
        let here = self.local_group_members(hub, group);
        let ask = self.node.backplane.clone().map(|link| {
            let op = RemoteOp::GroupMembers {
                group: group.to_owned(),
            };
            let (channel, hub) = (backplane::group_channel(hub, group), hub.to_owned());
            async move { link.request(channel, &hub, op).await }
        });
        async move {
            let mut members = here.await;
            if let Some(ask) = ask {
                for answer in ask.await? {
                    if let Answer::Members(theirs) = answer {
                        members.extend(theirs);
                    }
                }
                members.sort_unstable();
                members.dedup_by(|a, b| a.0 == b.0);
            }
            Ok(members)
        }
    }

    /// The connections of a group on this node, with their user ids, sorted by
    /// connection id. (The other nodes of a cluster are not asked.)
    pub fn local_group_members(
        &self,
        hub: &str,
        group: &str,
    ) -> impl Future<Output = Vec<(String, Option<String>)>> + Send + 'static {
        let hub = Arc::<str>::from(hub);
        let answers: Vec<_> = self
            .node
            .inboxes
            .iter()
            .map(|inbox| {
                let (reply, answer) = oneshot::channel();
                inbox.push(Command::GroupMembers {
                    hub: hub.clone(),
                    group: group.to_owned(),
                    reply,
                });
                answer
            })
            .collect();
        async move {
            let mut members = Vec::new();
            for answer in answers {
                // A shard that stopped answers nothing: its connections are gone with it.
                members.extend(answer.await.unwrap_or_default());
            }
            members.sort_unstable();
            members
        }
    }

    /// The ids of the hub's connections, on every node as far as this node was told,
    /// sorted.
    pub fn hub_connections(&self, hub: &str) -> Vec<String> {
        self.node.presence.hub_connections(hub)
    }

    /// A group's connections and distinct users, over all shards, now.
    pub fn group_presence(&self, hub: &str, group: &str) -> GroupPresence {
        self.node.presence.group(hub, group)
    }

    /// Whether the user has at least one connection to `hub` (on any shard, on any node
    /// of the cluster as far as this node was told): to choose between a live message
    /// and, say, a push notification.
    pub fn is_user_online(&self, hub: &str, user: &str) -> bool {
        self.node.presence.is_user_online(hub, user)
    }

    /// The ids of the user's connections, sorted (empty when offline).
    pub fn user_connections(&self, hub: &str, user: &str) -> Vec<String> {
        self.node.presence.user_connections(hub, user)
    }

    /// Whether a connection is connected to `hub` (on any shard, on any node of the
    /// cluster as far as this node was told).
    pub fn is_connected(&self, hub: &str, connection_id: &str) -> bool {
        self.node.presence.is_connected(hub, connection_id)
    }

    /// The user's durable groups (read from the membership store, on its thread),
    /// sorted.
    pub fn user_groups(
        &self,
        hub: &str,
        user: &str,
    ) -> impl Future<Output = Result<Vec<String>, ContextError>> + Send + 'static {
        let (hub, user) = (hub.to_owned(), user.to_owned());
        let groups = self.run_on_store(move |store| store.user_groups(&hub, &user).map_err(stored));
        async move {
            let mut groups = groups.await?;
            groups.sort_unstable();
            Ok(groups)
        }
    }

    /// Durably adds a user to a group: stored first, then joined by every current
    /// connection of the user; future connections join at connect time, after restarts
    /// too. Resolves once both are done.
    pub fn add_user_to_group(
        &self,
        hub: &str,
        user: &str,
        group: &str,
    ) -> impl Future<Output = Result<(), ContextError>> + Send + 'static {
        self.durable_membership(hub, user, group, true)
    }

    /// Durably removes a user from a group; its current connections leave it.
    pub fn remove_user_from_group(
        &self,
        hub: &str,
        user: &str,
        group: &str,
    ) -> impl Future<Output = Result<(), ContextError>> + Send + 'static {
        self.durable_membership(hub, user, group, false)
    }

    fn durable_membership(
        &self,
        hub: &str,
        user: &str,
        group: &str,
        join: bool,
    ) -> impl Future<Output = Result<(), ContextError>> + Send + 'static {
        let context = self.clone();
        let (hub, user, group) = (hub.to_owned(), user.to_owned(), group.to_owned());
        async move {
            check_group(&group)?;
            check_user(&user)?;
            let durable = context.store_durable(&hub, &user, &group, join).await?;
            // Stored before the user's connections are told: a connection that registers
            // meanwhile reads the store after registering, so every connection is covered
            // by one side or the other, and each takes on the newest version it is given.
            context.apply_durable(&hub, &user, durable).await
        }
    }

    /// Stores a durable change; the user's durable groups after it, with their version.
    async fn store_durable(
        &self,
        hub: &str,
        user: &str,
        group: &str,
        join: bool,
    ) -> Result<DurableGroups, ContextError> {
        let limit = self.node.config.max_groups_per_connection;
        // Durable groups count toward the limit of every connection of the user.
        let over_limit = {
            let group = group.to_owned();
            move |groups: &[String]| groups.len() >= limit && !groups.contains(&group)
        };
        let (hub_key, user_key, group_key) = (hub.to_owned(), user.to_owned(), group.to_owned());
        let redis = self
            .node
            .backplane
            .as_ref()
            .filter(|_| self.node.durable_in_redis);
        if let Some(link) = redis {
            let backplane = ContextError::Backplane;
            let op = if join {
                let read = StoreOp::Read {
                    hub: hub_key.clone(),
                    user: user_key.clone(),
                };
                if over_limit(&link.store(read).await.map_err(backplane)?.groups) {
                    return Err(ContextError::TooManyGroups { limit });
                }
                StoreOp::Add {
                    hub: hub_key,
                    user: user_key,
                    group: group_key,
                }
            } else {
                StoreOp::Remove {
                    hub: hub_key,
                    user: user_key,
                    group: group_key,
                }
            };
            return link.store(op).await.map_err(backplane);
        }
        let node = self.node.clone();
        self.run_on_store(move |store| {
            if join {
                if over_limit(&store.user_groups(&hub_key, &user_key).map_err(stored)?) {
                    return Err(ContextError::TooManyGroups { limit });
                }
                store.add(&hub_key, &user_key, &group_key).map_err(stored)?;
            } else {
                store
                    .remove(&hub_key, &user_key, &group_key)
                    .map_err(stored)?;
            }
            // Numbered once stored, and read after: the groups are at least this new.
            let version = node.next_durable_version();
            let mut groups = store.user_groups(&hub_key, &user_key).map_err(stored)?;
            groups.sort_unstable();
            Ok(DurableGroups { version, groups })
        })
        .await
    }

    /// Every connection of the user, on every shard and node, takes on `durable`
    /// (unless it has a newer version); resolves once they did.
    async fn apply_durable(
        &self,
        hub: &str,
        user: &str,
        durable: DurableGroups,
    ) -> Result<(), ContextError> {
        self.apply_durable_here(hub, user, durable.clone()).await;
        if let Some(link) = &self.node.backplane {
            // Every node with connections of the user listens on the user's channel (a
            // node without any answers nothing, and the request is done at once).
            let op = RemoteOp::Durable {
                user: user.to_owned(),
                groups: durable,
            };
            let answers = link
                .request(backplane::user_channel(hub, user), hub, op)
                .await
                .map_err(ContextError::Backplane)?;
            for answer in answers {
                if let Answer::Failed(e) = answer {
                    return Err(BackplaneError::Remote(e).into());
                }
            }
        }
        Ok(())
    }

    /// The user's connections on this node's shards take on `durable`; how many.
    pub(crate) async fn apply_durable_here(
        &self,
        hub: &str,
        user: &str,
        durable: DurableGroups,
    ) -> usize {
        let (hub, durable) = (Arc::<str>::from(hub), Arc::new(durable));
        let mut replies = Vec::with_capacity(self.node.inboxes.len());
        for inbox in &self.node.inboxes {
            let (reply, answer) = oneshot::channel();
            inbox.push(Command::Durable {
                hub: hub.clone(),
                user: user.to_owned(),
                groups: durable.clone(),
                reply,
            });
            replies.push(answer);
        }
        let mut applied = 0;
        for answer in replies {
            // A shard that stopped answers nothing: its connections are gone with it.
            applied += answer.await.unwrap_or(0);
        }
        applied
    }

    /// Runs `job` on the store thread.
    fn run_on_store<T: Send + 'static>(
        &self,
        job: impl FnOnce(&dyn MembershipStore) -> Result<T, ContextError> + Send + 'static,
    ) -> impl Future<Output = Result<T, ContextError>> + Send + 'static {
        let (reply, answer) = oneshot::channel();
        let sent = self.node.store_jobs.send(Box::new(move |store| {
            let _ = reply.send(job(store));
        }));
        async move {
            sent.map_err(|_| ContextError::ShuttingDown)?;
            answer.await.map_err(|_| ContextError::ShuttingDown)?
        }
    }

    /// A membership operation on a connection, after checking the group name.
    fn group_op(
        &self,
        hub: &str,
        connection_id: &str,
        group: &str,
        op: fn(String) -> ConnectionOp,
    ) -> impl Future<Output = Result<bool, ContextError>> + Send + 'static {
        let operation = check_group(group)
            .map(|()| self.connection_op(hub, connection_id, op(group.to_owned())));
        async move {
            match operation {
                Ok(operation) => operation.await,
                Err(e) => Err(e),
            }
        }
    }

    /// Runs `op` on the shard that holds the connection, through its inbox, or, in a
    /// cluster, on the node that holds it (answered once done there).
    fn connection_op(
        &self,
        hub: &str,
        connection_id: &str,
        op: ConnectionOp,
    ) -> impl Future<Output = Result<bool, ContextError>> + Send + 'static {
        self.connection_op_on(hub, connection_id, op, true)
    }

    /// Runs `op` on the shard of this node that holds the connection, through its inbox;
    /// `false` if no shard of this node holds it.
    pub(crate) fn local_connection_op(
        &self,
        hub: &str,
        connection_id: &str,
        op: ConnectionOp,
    ) -> impl Future<Output = Result<bool, ContextError>> + Send + 'static {
        self.connection_op_on(hub, connection_id, op, false)
    }

    /// Runs `op` where the connection is: a shard of this node, or (with
    /// `other_nodes`, in a cluster) the node that answers for it.
    fn connection_op_on(
        &self,
        hub: &str,
        connection_id: &str,
        op: ConnectionOp,
        other_nodes: bool,
    ) -> impl Future<Output = Result<bool, ContextError>> + Send + 'static {
        enum Step {
            Done(Result<bool, ContextError>),
            Wait(oneshot::Receiver<Result<bool, ContextError>>),
            Ask(Link, String, String, RemoteOp),
        }
        let shard = self.node.presence.shard_of(hub, connection_id);
        let step = match (shard, &self.node.backplane) {
            (None, Some(link)) if other_nodes => Step::Ask(
                link.clone(),
                backplane::connection_channel(hub, connection_id),
                hub.to_owned(),
                remote_op(connection_id, &op),
            ),
            _ if self.node.is_shutting_down() => Step::Done(Err(ContextError::ShuttingDown)),
            (None, _) => Step::Done(Ok(false)),
            (Some(shard), _) => {
                let (reply, answer) = oneshot::channel();
                self.node.inboxes[shard].push(Command::Connection {
                    hub: Arc::from(hub),
                    connection_id: connection_id.to_owned(),
                    op,
                    reply,
                });
                Step::Wait(answer)
            }
        };
        async move {
            let (link, channel, hub, op) = match step {
                Step::Done(result) => return result,
                // A shard that stopped answers nothing: the connection is gone with it.
                Step::Wait(answer) => return answer.await.unwrap_or(Ok(false)),
                Step::Ask(link, channel, hub, op) => (link, channel, hub, op),
            };
            // Not here: the node holding it answers (no node: not connected).
            let answers = link
                .request(channel, &hub, op)
                .await
                .map_err(ContextError::Backplane)?;
            let mut done = false;
            for answer in answers {
                match answer {
                    Answer::Done => done = true,
                    Answer::NotHere => {}
                    Answer::TooManyGroups(limit) => {
                        return Err(ContextError::TooManyGroups {
                            limit: limit as usize,
                        })
                    }
                    Answer::Failed(e) => return Err(BackplaneError::Remote(e).into()),
                    Answer::ClientResult(_) | Answer::Members(_) => {}
                }
            }
            Ok(done)
        }
    }
}

/// A client result of a connection on this node, held by `shard`: it sends the invocation,
/// numbered in the node's registry, and whichever shard reads its answer (or sees it
/// end) answers here; the registry's expiry bounds the wait.
pub(crate) async fn invoke_client_here(
    node: &Node,
    shard: usize,
    hub: &str,
    connection_id: &str,
    mut invocation: Invocation,
    timeout: std::time::Duration,
) -> Result<Value, ContextError> {
    let (result_id, answer) = node.client_results.register(timeout);
    invocation.invocation_id = Some(client_results::invocation_id(result_id));
    let invocation = Broadcast::new(HubMessage::Invocation(invocation));
    let limit = node.config.message_limit();
    if invocation.check_size(limit).is_err() {
        node.client_results.forget(result_id);
        return Err(ContextError::MessageTooLarge { limit });
    }
    let (reply, delivered) = oneshot::channel();
    node.inboxes[shard].push(Command::Connection {
        hub: Arc::from(hub),
        connection_id: connection_id.to_owned(),
        op: ConnectionOp::InvokeClient(ClientInvocation {
            result_id,
            invocation: Arc::new(invocation),
        }),
        reply,
    });
    match delivered.await {
        Ok(Ok(true)) => {}
        Ok(Err(e)) => {
            node.client_results.forget(result_id);
            return Err(e);
        }
        // Gone meanwhile, or its shard stopped.
        _ => {
            node.client_results.forget(result_id);
            return Err(ContextError::NoSuchConnection(connection_id.to_owned()));
        }
    }
    answer.await.unwrap_or(Err(ContextError::ShuttingDown))
}

/// A connection operation as another node is asked to do it.
fn remote_op(connection_id: &str, op: &ConnectionOp) -> RemoteOp {
    let (op, group) = match op {
        ConnectionOp::Join(group) => (RemoteOpKind::Join, group.clone()),
        ConnectionOp::Leave(group) => (RemoteOpKind::Leave, group.clone()),
        ConnectionOp::WatchPresence(group) => (RemoteOpKind::Watch, group.clone()),
        ConnectionOp::UnwatchPresence(group) => (RemoteOpKind::Unwatch, group.clone()),
        ConnectionOp::Close { reason } => (RemoteOpKind::Close, reason.clone().unwrap_or_default()),
        ConnectionOp::LeaveAll => (RemoteOpKind::LeaveAll, String::new()),
        ConnectionOp::InvokeClient(_) => unreachable!("client results ask with their own op"),
    };
    RemoteOp::Connection {
        connection_id: connection_id.to_owned(),
        op,
        group,
    }
}
