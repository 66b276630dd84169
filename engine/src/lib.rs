//! ringhub's engine: a thread-per-core io_uring server that speaks the ASP.NET Core
//! SignalR protocol, as a library (embed it with [`ServerBuilder`] and your own
//! [`Hub`]) and as the `ringhub` binary.
//!
//! The layers, each using only those above it:
//! - `signal`: one-shot shard-local events; [`metrics`], [`config`], [`auth`];
//! - [`api`] types: [`Target`], [`Caller`], [`HubError`];
//! - `flow`: publishers' windows and the tickets that hold them (backpressure);
//! - `fanout`: a message encoded once per protocol for all its recipients;
//! - `backplane`: what a node hands its cluster thread, and what nodes tell each other;
//! - `session`: one connection apart from its transport (identity, groups, outbox);
//! - `shard::tables`, `shard::inbox`: a shard's routing tables and its inbox;
//! - [`presence`], [`store`], `node`: what all shards of a node share;
//! - [`api`]: [`HubContext`] (reaches shards through their inboxes only) and [`Hub`];
//! - [`builtin`], `rest` and `azure`: the contract's hub, REST API and Azure SignalR
//!   Service's REST API, on that API only;
//! - `shard::state`, `shard::dispatch`: what a shard owns, hub messages of its clients;
//! - `transport`: HTTP routing, negotiate, the WebSocket transport, socket I/O;
//! - `shard::run`: a shard thread's body; `cluster`: the Redis backplane's thread;
//!   [`server`]: building, starting, stopping;
//! - [`runtime`]: the io_uring runtime every thread runs on.

mod admin;
pub mod api;
pub mod auth;
mod azure;
mod backplane;
pub mod builtin;
mod client_results;
mod cluster;
pub mod config;
mod fanout;
mod flow;
pub mod metrics;
mod node;
pub mod presence;
mod quota;
mod rest;
pub mod runtime;
pub mod server;
mod session;
mod shard;
mod signal;
pub mod store;
mod transport;
pub mod upstream;

pub use api::{
    fallible_items, items, Call, Caller, ClientStream, ContextError, FromValue, Hub, HubContext,
    HubError, ItemStream, LocalBoxFuture, Target,
};
pub use auth::{Claims, GroupAuthorizer, UserIdProvider};
pub use config::Config;
#[cfg(feature = "cli")]
pub use config::ServeArgs;
/// The trait of the streams a hub method returns (`impl Stream<Item = T>`).
pub use futures_util::Stream;
pub use presence::GroupPresence;
/// Typed hub methods from an `impl` block: see [`ringhub_macros`].
pub use ringhub_macros::hub;
pub use ringhub_protocol::Value;
pub use server::{Server, ServerBuilder, ServerError};
pub use store::{MembershipStore, MemoryStore, RedbStore, StoreError};

/// Frames encoded for broadcasts since the process started: a fan-out encodes at most
/// one per hub protocol in use, however many recipients (checked by the tests).
pub fn broadcast_encodes() -> u64 {
    fanout::BROADCAST_ENCODES.load(std::sync::atomic::Ordering::Relaxed)
}
