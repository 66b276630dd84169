//! ringhub's engine: a thread-per-core io_uring server that speaks the ASP.NET Core
//! SignalR protocol, as a library (embed it with [`ServerBuilder`] and your own
//! [`Hub`]) and as the `ringhub` binary.
//!
//! - [`server`]: building, starting and stopping a node (one pinned shard per core);
//! - `shard`: one shard's accept loop, HTTP endpoints and WebSocket sessions;
//! - `conn`: a connection's bounded outbound queue and its vectored writer;
//! - `router`: per-shard group/user tables and the messages between shards;
//! - [`hub`]: the embedding API ([`Hub`], [`HubContext`], [`Target`]);
//! - [`builtin`]: the contract's built-in hub, written on that API;
//! - [`presence`]: connections, users and group counts across shards;
//! - [`store`]: durable user -> group membership ([`MembershipStore`], redb by default);
//! - `rest`: the REST API for backends (contract section 5);
//! - [`runtime`]: the io_uring runtime every thread runs on;
//! - [`auth`], [`config`], [`metrics`].

pub mod auth;
pub mod builtin;
pub mod config;
mod conn;
pub mod hub;
pub mod metrics;
pub mod presence;
mod rest;
mod router;
pub mod runtime;
pub mod server;
mod shard;
pub mod store;

pub use auth::{Claims, GroupAuthorizer, UserIdProvider};
pub use config::{Config, ServeArgs};
pub use hub::{
    Call, Caller, ContextError, FromValue, Hub, HubContext, HubError, LocalBoxFuture, Target,
};
pub use presence::GroupPresence;
pub use ringhub_protocol::Value;
pub use server::{Server, ServerBuilder, ServerError};
pub use store::{MembershipStore, MemoryStore, RedbStore, StoreError};

/// Frames encoded for broadcasts since the process started: a fan-out encodes at most
/// one per hub protocol in use, however many recipients (checked by the tests).
pub fn broadcast_encodes() -> u64 {
    router::BROADCAST_ENCODES.load(std::sync::atomic::Ordering::Relaxed)
}
