//! The embedding API: write a [`Hub`] for typed method dispatch, and hold a
//! [`HubContext`] anywhere (any thread, any runtime) to send to every target kind and
//! to change group membership. The built-in hub of the contract (`builtin`) is written
//! on this API only.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures_channel::oneshot;
use ringhub_protocol::Value;
use thiserror::Error;

use crate::auth::Claims;
use crate::presence::GroupPresence;
use crate::router::{Broadcast, Command, ConnectionOp};
use crate::server::Shared;
use crate::shard;
use crate::store::{MembershipStore, StoreError};

/// A boxed future that stays on its shard's thread.
pub type LocalBoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// Who receives a message (contract section 4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    All,
    AllExcept(Vec<String>),
    Connection(String),
    Connections(Vec<String>),
    Group(String),
    GroupExcept(String, Vec<String>),
    Groups(Vec<String>),
    User(String),
    Users(Vec<String>),
}

/// A failed invocation; the client receives [`HubError::client_message`] as the
/// Completion error and the connection stays open.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HubError {
    /// A refusal meant for the client, sent as is (SignalR's `HubException`).
    #[error("{0}")]
    Exception(String),
    #[error("Unknown hub method '{0}'")]
    UnknownMethod(String),
    #[error("Failed to invoke '{method}' due to an error on the server: {detail}")]
    InvalidArguments { method: String, detail: String },
}

impl HubError {
    pub fn exception(message: impl Into<String>) -> HubError {
        HubError::Exception(message.into())
    }

    pub fn client_message(&self) -> String {
        self.to_string()
    }
}

/// The connection that invoked a method.
#[derive(Debug, Clone)]
pub struct Caller {
    pub connection_id: String,
    pub hub: String,
    /// From the user-id provider (the JWT `sub` by default); `None` when anonymous.
    pub user_id: Option<String>,
    /// `None` when the server runs without `--jwt-secret`.
    pub claims: Option<Claims>,
}

/// One invocation of a hub method.
pub struct Call<'a> {
    pub caller: &'a Caller,
    /// The method name as the client sent it.
    pub method: &'a str,
    pub arguments: Vec<Value>,
    pub context: &'a HubContext,
}

impl Call<'_> {
    /// Fails unless exactly `count` arguments were given.
    pub fn expect_arguments(&self, count: usize) -> Result<(), HubError> {
        if self.arguments.len() == count {
            Ok(())
        } else {
            Err(self.invalid_arguments(format!(
                "expected {count} argument{}, got {}",
                if count == 1 { "" } else { "s" },
                self.arguments.len()
            )))
        }
    }

    /// Argument `index` (0-based) converted to `T`, or an error naming it.
    pub fn arg<T: FromValue>(&self, index: usize) -> Result<T, HubError> {
        let value = self
            .arguments
            .get(index)
            .ok_or_else(|| self.invalid_arguments(format!("argument {} is missing", index + 1)))?;
        T::from_value(value).ok_or_else(|| {
            self.invalid_arguments(format!(
                "argument {} must be {}, got {}",
                index + 1,
                T::EXPECTED,
                value.kind()
            ))
        })
    }

    /// Takes argument `index` as it is (no copy), leaving null in its place.
    pub fn take_arg(&mut self, index: usize) -> Result<Value, HubError> {
        match self.arguments.get_mut(index) {
            Some(v) => Ok(std::mem::replace(v, Value::Null)),
            None => Err(self.invalid_arguments(format!("argument {} is missing", index + 1))),
        }
    }

    /// The error for arguments this method cannot take; `detail` says what was wrong.
    pub fn invalid_arguments(&self, detail: String) -> HubError {
        HubError::InvalidArguments {
            method: self.method.to_owned(),
            detail,
        }
    }
}

/// Typed argument conversion.
pub trait FromValue: Sized {
    /// What the argument must be, for error messages ("a string").
    const EXPECTED: &'static str;
    fn from_value(value: &Value) -> Option<Self>;
}

impl FromValue for String {
    const EXPECTED: &'static str = "a string";
    fn from_value(value: &Value) -> Option<Self> {
        value.as_str().map(str::to_owned)
    }
}

impl FromValue for i64 {
    const EXPECTED: &'static str = "an integer";
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Int(n) => Some(*n),
            Value::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Some(*f as i64),
            _ => None,
        }
    }
}

impl FromValue for f64 {
    const EXPECTED: &'static str = "a number";
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Int(n) => Some(*n as f64),
            Value::UInt(n) => Some(*n as f64),
            Value::Float(f) => Some(*f),
            _ => None,
        }
    }
}

impl FromValue for bool {
    const EXPECTED: &'static str = "a boolean";
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }
}

impl FromValue for Value {
    const EXPECTED: &'static str = "any value";
    fn from_value(value: &Value) -> Option<Self> {
        Some(value.clone())
    }
}

impl<T: FromValue> FromValue for Vec<T> {
    const EXPECTED: &'static str = "an array";
    fn from_value(value: &Value) -> Option<Self> {
        value.as_array()?.iter().map(T::from_value).collect()
    }
}

/// A hub: the methods clients invoke. One instance runs on each shard (it need not be
/// `Send`); the server makes them with the factory given to the builder.
pub trait Hub: 'static {
    /// Dispatches one invocation; `Ok(value)` becomes the Completion result (`null`
    /// for methods without a result).
    fn invoke<'a>(&'a self, call: Call<'a>) -> LocalBoxFuture<'a, Result<Value, HubError>>;

    /// After the handshake, before the connection's first message is read.
    fn on_connected<'a>(
        &'a self,
        caller: &'a Caller,
        context: &'a HubContext,
    ) -> LocalBoxFuture<'a, ()> {
        let _ = (caller, context);
        Box::pin(async {})
    }

    /// After the connection left all its groups.
    fn on_disconnected<'a>(
        &'a self,
        caller: &'a Caller,
        context: &'a HubContext,
    ) -> LocalBoxFuture<'a, ()> {
        let _ = (caller, context);
        Box::pin(async {})
    }
}

/// Why the context could not act.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ContextError {
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("{0}")]
    Store(String),
}

/// A handle on a running server: `Clone + Send + Sync`, usable from any thread or
/// runtime (tokio included).
#[derive(Clone)]
pub struct HubContext {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for HubContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubContext").finish_non_exhaustive()
    }
}

impl HubContext {
    /// Whether `caller` may join (and so send to) `group`, by the server's group authorizer.
    pub fn may_join(&self, caller: &Caller, group: &str) -> bool {
        self.shared.may_join(caller.claims.as_ref(), group)
    }

    /// Whether the server requires tokens (`--jwt-secret`).
    pub fn authentication_enabled(&self) -> bool {
        self.shared.jwt.is_some()
    }

    /// Sends `method(arguments...)` to `target` in `hub`. Completes once the message
    /// was handed to every shard: later sends to the same recipients arrive after it.
    pub fn send(
        &self,
        hub: &str,
        target: Target,
        method: &str,
        arguments: Vec<Value>,
    ) -> impl Future<Output = Result<(), ContextError>> + Send + 'static {
        let result = self.send_now(hub, target, method, arguments);
        std::future::ready(result)
    }

    fn send_now(
        &self,
        hub: &str,
        target: Target,
        method: &str,
        arguments: Vec<Value>,
    ) -> Result<(), ContextError> {
        if self.shared.is_shutting_down() {
            return Err(ContextError::ShuttingDown);
        }
        let broadcast = Arc::new(Broadcast::new(ringhub_protocol::HubMessage::invocation(
            method, arguments,
        )));
        let hub: Arc<str> = Arc::from(hub);
        let target = Arc::new(target);
        let here = shard::current_index(&self.shared);
        for (index, inbox) in self.shared.inboxes.iter().enumerate() {
            if Some(index) == here {
                shard::with_current(|state| state.deliver(&hub, &target, &broadcast));
            } else {
                inbox.push(Command::Deliver {
                    hub: hub.clone(),
                    target: target.clone(),
                    broadcast: broadcast.clone(),
                });
            }
        }
        Ok(())
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
        self.connection_op(hub, connection_id, ConnectionOp::Join(group.to_owned()))
    }

    /// Removes a connection from a group (not being a member is not an error).
    pub fn remove_from_group(
        &self,
        hub: &str,
        connection_id: &str,
        group: &str,
    ) -> impl Future<Output = Result<bool, ContextError>> + Send + 'static {
        self.connection_op(hub, connection_id, ConnectionOp::Leave(group.to_owned()))
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
        self.connection_op(
            hub,
            connection_id,
            ConnectionOp::WatchPresence(group.to_owned()),
        )
    }

    pub fn unwatch_presence(
        &self,
        hub: &str,
        connection_id: &str,
        group: &str,
    ) -> impl Future<Output = Result<bool, ContextError>> + Send + 'static {
        self.connection_op(
            hub,
            connection_id,
            ConnectionOp::UnwatchPresence(group.to_owned()),
        )
    }

    /// Closes a connection with a Close message. Resolves `false` if it is not connected.
    pub fn close_connection(
        &self,
        hub: &str,
        connection_id: &str,
    ) -> impl Future<Output = Result<bool, ContextError>> + Send + 'static {
        self.connection_op(hub, connection_id, ConnectionOp::Close)
    }

    /// A group's connections and distinct users, over all shards, now.
    pub fn group_presence(&self, hub: &str, group: &str) -> GroupPresence {
        self.shared.presence.group(hub, group)
    }

    pub fn is_user_online(&self, hub: &str, user: &str) -> bool {
        self.shared.presence.is_user_online(hub, user)
    }

    /// The ids of the user's connections, sorted (empty when offline).
    pub fn user_connections(&self, hub: &str, user: &str) -> Vec<String> {
        self.shared.presence.user_connections(hub, user)
    }

    /// Whether a connection is connected to `hub` (on any shard).
    pub fn is_connected(&self, hub: &str, connection_id: &str) -> bool {
        self.shared.presence.shard_of(hub, connection_id).is_some()
    }

    /// The user's durable groups (read from the membership store), sorted.
    pub fn user_groups(&self, hub: &str, user: &str) -> Result<Vec<String>, ContextError> {
        let mut groups = self
            .shared
            .store
            .user_groups(hub, user)
            .map_err(|e| ContextError::Store(e.to_string()))?;
        groups.sort_unstable();
        Ok(groups)
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
            let (hub_key, user_key, group_key) = (hub.clone(), user.clone(), group.clone());
            context
                .run_on_store(move |store| {
                    if join {
                        store.add(&hub_key, &user_key, &group_key)
                    } else {
                        store.remove(&hub_key, &user_key, &group_key)
                    }
                })
                .await?;
            // Stored before the current connections are listed: a connection that
            // registers meanwhile reads the store after registering, so every
            // connection is covered by one side or the other.
            for connection_id in context.user_connections(&hub, &user) {
                let op = if join {
                    ConnectionOp::Join(group.clone())
                } else {
                    ConnectionOp::Leave(group.clone())
                };
                context.connection_op(&hub, &connection_id, op).await?;
            }
            Ok(())
        }
    }

    /// Runs `job` on the store thread.
    fn run_on_store(
        &self,
        job: impl FnOnce(&dyn MembershipStore) -> Result<(), StoreError> + Send + 'static,
    ) -> impl Future<Output = Result<(), ContextError>> + Send + 'static {
        let (reply, answer) = oneshot::channel();
        let sent = self.shared.store_jobs.send(Box::new(move |store| {
            let _ = reply.send(job(store));
        }));
        async move {
            sent.map_err(|_| ContextError::ShuttingDown)?;
            answer
                .await
                .map_err(|_| ContextError::ShuttingDown)?
                .map_err(|e| ContextError::Store(e.to_string()))
        }
    }

    /// Runs `op` on the shard that holds the connection: at once when that is this
    /// thread's shard, else through its inbox.
    fn connection_op(
        &self,
        hub: &str,
        connection_id: &str,
        op: ConnectionOp,
    ) -> impl Future<Output = Result<bool, ContextError>> + Send + 'static {
        enum Step {
            Done(Result<bool, ContextError>),
            Wait(oneshot::Receiver<bool>),
        }
        let step = if self.shared.is_shutting_down() {
            Step::Done(Err(ContextError::ShuttingDown))
        } else {
            match self.shared.presence.shard_of(hub, connection_id) {
                None => Step::Done(Ok(false)),
                Some(shard) if Some(shard) == shard::current_index(&self.shared) => {
                    let done =
                        shard::with_current(|state| state.connection_op(hub, connection_id, &op));
                    Step::Done(Ok(done.unwrap_or(false)))
                }
                Some(shard) => {
                    let (reply, answer) = oneshot::channel();
                    self.shared.inboxes[shard].push(Command::Connection {
                        hub: Arc::from(hub),
                        connection_id: connection_id.to_owned(),
                        op,
                        reply,
                    });
                    Step::Wait(answer)
                }
            }
        };
        async move {
            match step {
                Step::Done(result) => result,
                // A shard that stopped answers nothing: the connection is gone with it.
                Step::Wait(answer) => Ok(answer.await.unwrap_or(false)),
            }
        }
    }
}
