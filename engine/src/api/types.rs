//! The plain types of the embedding API: who receives a message, who called, and how
//! an invocation fails.

use std::future::Future;
use std::pin::Pin;

use thiserror::Error;

use crate::auth::Claims;

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
    /// A user's connections but the listed ones.
    UserExcept(String, Vec<String>),
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

/// Hub names as the contract allows them: `[A-Za-z0-9_-]{1,64}`.
pub fn valid_hub_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Why the context could not act.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ContextError {
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("{0}")]
    Store(String),
    /// The cluster's backplane could not do it (Redis unreachable, no answer).
    #[error("{0}")]
    Backplane(String),
    #[error("Group name is too long (limit {MAX_NAME_BYTES} bytes).")]
    GroupNameTooLong,
    #[error("Group name must not be empty.")]
    GroupNameEmpty,
    #[error("User id is too long (limit {MAX_NAME_BYTES} bytes).")]
    UserIdTooLong,
    #[error("User id must not be empty.")]
    UserIdEmpty,
    /// `--max-groups-per-connection` (durable groups count).
    #[error("Too many groups for this connection (limit {limit}).")]
    TooManyGroups { limit: usize },
    /// No room to queue a send before its caller gave up: its recipients are slow (the
    /// slow ones are closed within `--slow-consumer-secs`), or the node is flooded.
    #[error("The message could not be queued in time: its recipients are slow or the server is busy; try again later.")]
    NoRoom,
    /// A message whose frame would be larger than half of `--max-buffered-bytes`.
    #[error("The message is too large (limit {limit} bytes once encoded).")]
    MessageTooLarge { limit: usize },
}

impl ContextError {
    /// Whether the caller asked for something the contract refuses (a client error,
    /// REST 400), rather than the node failing to do it.
    pub fn is_refusal(&self) -> bool {
        !matches!(
            self,
            ContextError::ShuttingDown
                | ContextError::Store(_)
                | ContextError::Backplane(_)
                | ContextError::NoRoom
        )
    }
}

/// The longest group name and user id, in bytes (contract section 6).
pub const MAX_NAME_BYTES: usize = 256;

/// Checks a group name against the contract's limits.
pub fn check_group(group: &str) -> Result<(), ContextError> {
    match group.len() {
        0 => Err(ContextError::GroupNameEmpty),
        n if n > MAX_NAME_BYTES => Err(ContextError::GroupNameTooLong),
        _ => Ok(()),
    }
}

/// Checks a user id against the contract's limits.
pub fn check_user(user: &str) -> Result<(), ContextError> {
    match user.len() {
        0 => Err(ContextError::UserIdEmpty),
        n if n > MAX_NAME_BYTES => Err(ContextError::UserIdTooLong),
        _ => Ok(()),
    }
}
