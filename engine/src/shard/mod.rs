//! A shard: one pinned thread with its own io_uring runtime and listener, owning its
//! sessions for their whole life. `state` is what it owns, `tables` its routing
//! tables, `inbox` what other shards ask of it, `dispatch` the hub messages of its
//! clients, `run` the thread body.

pub mod dispatch;
pub mod inbox;
pub mod run;
pub mod state;
pub mod tables;
pub mod tokens;
