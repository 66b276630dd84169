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
use crate::router::{Broadcast, Command};
use crate::server::Shared;
use crate::shard;

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
        self.membership(hub, connection_id, group, true)
    }

    /// Removes a connection from a group (not being a member is not an error).
    pub fn remove_from_group(
        &self,
        hub: &str,
        connection_id: &str,
        group: &str,
    ) -> impl Future<Output = Result<bool, ContextError>> + Send + 'static {
        self.membership(hub, connection_id, group, false)
    }

    fn membership(
        &self,
        hub: &str,
        connection_id: &str,
        group: &str,
        join: bool,
    ) -> impl Future<Output = Result<bool, ContextError>> + Send + 'static {
        let shutting_down = self.shared.is_shutting_down();
        let here = shard::current_index(&self.shared);
        // The connection is most often the caller's own, on this very shard.
        let local = here.is_some()
            && shard::with_current(|state| {
                state.change_membership(hub, connection_id, group, join)
            })
            .unwrap_or(false);
        let mut replies = Vec::new();
        if !shutting_down && !local {
            for (index, inbox) in self.shared.inboxes.iter().enumerate() {
                if Some(index) == here {
                    continue;
                }
                let (reply, answer) = oneshot::channel();
                inbox.push(Command::Membership {
                    hub: Arc::from(hub),
                    connection_id: connection_id.to_owned(),
                    group: group.to_owned(),
                    join,
                    reply,
                });
                replies.push(answer);
            }
        }
        async move {
            if shutting_down {
                return Err(ContextError::ShuttingDown);
            }
            let mut found = local;
            for answer in replies {
                // A shard that stopped answers nothing: the connection is gone with it.
                found |= answer.await.unwrap_or(false);
            }
            Ok(found)
        }
    }
}
