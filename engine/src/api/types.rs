//! The plain types of the embedding API: who receives a message, who called, and how
//! an invocation fails.

use std::future::Future;
use std::pin::Pin;

use std::sync::Arc;

use thiserror::Error;

use crate::auth::Claims;
use crate::store::StoreError;

/// A boxed future that stays on its shard's thread.
pub type LocalBoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// Who receives a message (contract section 4).
#[derive(Debug, Clone, PartialEq, Eq)]
///
/// Every target is within one hub (the `hub` of the send): connection ids, group names
/// and user ids are looked up there, on every shard and, with `--redis`, on every node.
/// A target that matches no connection is not an error: the send reaches nobody.
pub enum Target {
    /// Every connection of the hub (SignalR's `Clients.All`).
    All,
    /// Every connection but the listed ids (`Clients.AllExcept`), such as the caller's
    /// own to skip an echo.
    AllExcept(Vec<String>),
    /// One connection by id (`Clients.Client`).
    Connection(String),
    /// Several connections by id; each receives the message once.
    Connections(Vec<String>),
    /// A group's members at the time the send reaches them (`Clients.Group`).
    Group(String),
    /// A group's members but the listed connection ids (`Clients.GroupExcept`).
    GroupExcept(String, Vec<String>),
    /// The members of any of the groups; a connection in several receives it once.
    Groups(Vec<String>),
    /// Every connection of a user id, on any device (`Clients.User`).
    User(String),
    /// A user's connections but the listed ones.
    UserExcept(String, Vec<String>),
    /// Every connection of any of the users; each receives the message once.
    Users(Vec<String>),
}

/// Why a hub method failed: what its invocation's Completion error says (the
/// connection stays open). The one error type of hub methods: a [`ContextError`] of a
/// send, a group change or a client result converts into it, so a method can `?` them.
#[derive(Debug, Clone, Error)]
pub enum HubError {
    /// A refusal meant for the client, sent as is (SignalR's `HubException`).
    #[error("{0}")]
    Exception(String),
    /// No method of that name: what a [`Hub`](crate::Hub) answers for a name it does
    /// not match (ASP.NET Core's sentence).
    #[error("Unknown hub method '{0}'")]
    UnknownMethod(String),
    /// Wrong arity or argument types (see [`Call::invalid_arguments`]); the sentence is
    /// ASP.NET Core's, so clients that match on it keep working.
    ///
    /// [`Call::invalid_arguments`]: crate::Call::invalid_arguments
    #[error("Failed to invoke '{method}' due to an error on the server: {detail}")]
    InvalidArguments {
        /// The method name as the client sent it.
        method: String,
        /// Which argument and what was wrong with it.
        detail: String,
    },
    /// A streaming method called with a plain Invocation (ASP.NET Core's sentence).
    #[error("The client attempted to invoke the streaming '{0}' method with a non-streaming invocation.")]
    StreamingMethod(String),
    /// A plain method called with a StreamInvocation.
    #[error("The client attempted to invoke the non-streaming '{0}' method with a streaming invocation.")]
    NotStreamingMethod(String),
    /// What the method asked of the server (a send, a join, a client result) failed;
    /// the client reads why.
    #[error(transparent)]
    Context(#[from] ContextError),
}

impl HubError {
    /// A [`HubError::Exception`] from any text: the refusals a method makes itself
    /// (`return Err(HubError::exception("not your ward"))`).
    pub fn exception(message: impl Into<String>) -> HubError {
        HubError::Exception(message.into())
    }

    /// The Completion error the client receives.
    pub fn client_message(&self) -> String {
        self.to_string()
    }
}

/// The connection that invoked a method.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The id other parties reach this connection by ([`Target::Connection`]); not a
    /// secret (the reconnect token is kept apart).
    pub connection_id: String,
    /// The hub the client connected to (`/hubs/{hub}`): pass it to the context's sends
    /// and group changes to stay within the caller's hub.
    pub hub: String,
    /// From the user-id provider (the JWT `sub` by default); `None` when anonymous.
    pub user_id: Option<String>,
    /// `None` when the server runs without `--jwt-secret`.
    pub claims: Option<Claims>,
    /// The query of the request the connection was made with (without its
    /// `access_token`), kept only for upstreams (`X-ASRS-Client-Query`).
    pub(crate) client_query: Option<Box<str>>,
}

/// Which hub names a server serves and under which paths (contract section 9): the
/// names mapped to hubs (`None`: any valid name, as `ringhub serve`), and paths mapped
/// to names (`/chatHub` for `chat`, as ASP.NET Core's `MapHub`).
#[derive(Debug, Clone, Default)]
pub struct HubRoutes {
    /// The hub names served; `None` serves every valid name (see [`valid_hub_name`]).
    pub names: Option<Vec<String>>,
    /// (path without its trailing slash, hub name)
    pub paths: Vec<(String, String)>,
}

impl HubRoutes {
    /// Whether a client may connect to hub `name`: a valid name, and mapped (or any
    /// name served). A name served by no hub answers `404` rather than a hub that does
    /// not exist.
    pub fn serves(&self, name: &str) -> bool {
        valid_hub_name(name)
            && self
                .names
                .as_ref()
                .is_none_or(|names| names.iter().any(|n| n == name))
    }

    /// The hub a request path is for, and what follows its hub path (`""` for the hub
    /// itself, `"negotiate"`): `/hubs/{name}[/negotiate]` for a served name, or a
    /// mapped path. `None`: not a hub's path, or a name no hub is mapped to.
    pub fn hub_of_path<'p>(&'p self, path: &'p str) -> Option<(&'p str, &'p str)> {
        let path = path.split('?').next().unwrap_or(path);
        for (mapped, name) in &self.paths {
            if let Some(rest) = path.strip_prefix(mapped.as_str()) {
                match rest {
                    "" | "/" => return Some((name, "")),
                    "/negotiate" => return Some((name, "negotiate")),
                    _ => {}
                }
            }
        }
        let rest = path.strip_prefix("/hubs/")?;
        let (name, tail) = rest.split_once('/').unwrap_or((rest, ""));
        matches!(tail, "" | "negotiate")
            .then_some((name, tail))
            .filter(|(name, _)| self.serves(name))
    }
}

/// Hub names as the contract allows them: `[A-Za-z0-9_-]{1,64}`.
pub fn valid_hub_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Why the context could not act.
#[derive(Debug, Clone, Error)]
pub enum ContextError {
    /// The node is stopping ([`Server::shutdown`](crate::Server::shutdown)); nothing
    /// more is sent or stored.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The membership store failed (shared: the same failure may answer several waiters).
    #[error(transparent)]
    Store(#[from] Arc<StoreError>),
    /// The cluster's backplane could not do it (Redis unreachable, no answer).
    #[error(transparent)]
    Backplane(#[from] BackplaneError),
    /// A group name over [`MAX_NAME_BYTES`]: names are keys of tables, channels and the
    /// store, so their size is bounded.
    #[error("Group name is too long (limit {MAX_NAME_BYTES} bytes).")]
    GroupNameTooLong,
    /// An empty group name.
    #[error("Group name must not be empty.")]
    GroupNameEmpty,
    /// A user id over [`MAX_NAME_BYTES`].
    #[error("User id is too long (limit {MAX_NAME_BYTES} bytes).")]
    UserIdTooLong,
    /// An empty user id.
    #[error("User id must not be empty.")]
    UserIdEmpty,
    /// `--max-groups-per-connection` (durable groups and watched groups count).
    #[error("Too many groups for this connection (limit {limit}).")]
    TooManyGroups {
        /// The configured limit.
        limit: usize,
    },
    /// No room to queue a send before its caller gave up: its recipients are slow (the
    /// slow ones are closed within `--slow-consumer-secs`), or the node is flooded.
    #[error("The message could not be queued in time: its recipients are slow or the server is busy; try again later.")]
    NoRoom,
    /// A message whose frame would be larger than half of `--max-buffered-bytes`.
    #[error("The message is too large (limit {limit} bytes once encoded).")]
    MessageTooLarge {
        /// [`HubContext::message_limit`](crate::HubContext::message_limit).
        limit: usize,
    },
    /// A client result was asked of a connection no node holds (ASP.NET Core's sentence).
    #[error("Connection '{0}' does not exist.")]
    NoSuchConnection(String),
    /// The client answered a client result with an error (no handler for the method
    /// included: the JS client then answers `Client didn't provide a result.`).
    #[error("{0}")]
    ClientError(String),
    /// The connection ended before it answered a client result.
    #[error("Connection '{0}' disconnected.")]
    ClientDisconnected(String),
    /// No answer to a client result within `--client-result-timeout-secs`.
    #[error("The client did not answer within {secs} s.")]
    ClientResultTimeout {
        /// The configured timeout, in seconds.
        secs: u64,
    },
    /// The client's answer is not the type asked for.
    #[error("The client's result could not be read: {0}")]
    BadClientResult(String),
}

/// Equal when of the same kind and saying the same (a store failure has no equality of
/// its own: its text stands for it).
impl PartialEq for ContextError {
    fn eq(&self, other: &Self) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
            && self.to_string() == other.to_string()
    }
}

impl PartialEq for HubError {
    fn eq(&self, other: &Self) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
            && self.to_string() == other.to_string()
    }
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
                | ContextError::ClientDisconnected(_)
                | ContextError::ClientResultTimeout { .. }
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

/// Why the cluster could not do something (`--redis`).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BackplaneError {
    /// Redis is unreachable right now (the backplane keeps reconnecting); what needs
    /// the cluster fails fast rather than wait.
    #[error("the backplane is not connected to Redis")]
    Disconnected,
    /// Redis answered with an error; its text.
    #[error("Redis: {0}")]
    Redis(String),
    /// The other nodes were asked (for a connection this node does not hold) and none
    /// answered within this many seconds: the one that held it may have died.
    #[error("no answer from the node holding it within {0} s")]
    NoAnswer(u64),
    /// A Redis command took longer than this many seconds.
    #[error("Redis did not answer within {0} s")]
    Timeout(u64),
    /// The backplane's thread ended (the node is shutting down).
    #[error("the backplane stopped")]
    Stopped,
    /// The node that was asked failed (its reason).
    #[error("{0}")]
    Remote(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_paths_route_to_served_names_only() {
        let any = HubRoutes::default();
        assert_eq!(any.hub_of_path("/hubs/chat"), Some(("chat", "")));
        assert_eq!(
            any.hub_of_path("/hubs/chat/negotiate"),
            Some(("chat", "negotiate"))
        );
        assert_eq!(any.hub_of_path("/hubs/chat/other"), None);
        assert_eq!(any.hub_of_path("/hubs/bad name"), None);
        let mapped = HubRoutes {
            names: Some(vec!["chat".into()]),
            paths: vec![("/chatHub".into(), "chat".into())],
        };
        assert_eq!(mapped.hub_of_path("/chatHub"), Some(("chat", "")));
        assert_eq!(
            mapped.hub_of_path("/chatHub/negotiate"),
            Some(("chat", "negotiate"))
        );
        assert_eq!(mapped.hub_of_path("/chatHubs"), None);
        assert_eq!(mapped.hub_of_path("/hubs/chat"), Some(("chat", "")));
        assert_eq!(
            mapped.hub_of_path("/hubs/other"),
            None,
            "no hub is mapped to it"
        );
    }
}
