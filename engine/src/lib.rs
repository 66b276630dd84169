//! ringhub's engine: a thread-per-core io_uring server that speaks the ASP.NET Core
//! SignalR protocol, as a library (embed it with [`ServerBuilder`] and your own
//! [`Hub`]) and as the `ringhub` binary.
//!
//! # Quick start
//!
//! A typed hub: every `&self` method of a [`hub`] block is a hub method, called by its
//! name in PascalCase, its parameters decoded with serde from JSON and MessagePack
//! clients alike (`&Caller` and `&HubContext` are handed the invocation's).
//!
//! ```no_run
//! use ringhub_engine::{hub, Caller, Config, HubContext, HubError, ServerBuilder, Target};
//!
//! struct Chat;
//!
//! #[hub]
//! impl Chat {
//!     /// `Add(1, 2)` answers `3`.
//!     fn add(&self, a: i64, b: i64) -> i64 {
//!         a + b
//!     }
//!
//!     /// `Say("hi")`: every connection of the caller's hub receives `said(id, "hi")`.
//!     async fn say(
//!         &self,
//!         caller: &Caller,
//!         context: &HubContext,
//!         text: String,
//!     ) -> Result<(), HubError> {
//!         let from = caller.connection_id.clone();
//!         let said = vec![from.into(), text.into()];
//!         context.send(&caller.hub, Target::All, "said", said).await?;
//!         Ok(())
//!     }
//! }
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let config = Config {
//!         listen: "127.0.0.1:5000".parse()?,
//!         ..Config::default()
//!     };
//!     // One `Chat` per shard; clients connect to http://127.0.0.1:5000/hubs/chat.
//!     let server = ServerBuilder::new(config).map_hub("chat", || Chat).start()?;
//!     // Clone + Send + Sync: send and manage groups from any thread or runtime.
//!     let _context = server.context();
//!     std::thread::sleep(std::time::Duration::from_secs(3600));
//!     // Tells every client (reconnect allowed), then stops the shards.
//!     server.shutdown();
//!     Ok(())
//! }
//! ```
//!
//! `engine/examples/typed_hub.rs` adds streams both ways and client results.
//!
//! # Layers
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

#![warn(missing_docs)]

mod admin;
pub mod api;
pub mod auth;
mod azure;
mod backplane;
pub mod builtin;
#[cfg(feature = "cli")]
pub mod cli;
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
