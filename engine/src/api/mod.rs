//! The embedding API: write a [`Hub`] for typed method dispatch, and hold a
//! [`HubContext`] anywhere (any thread, any runtime) to send to every target kind and
//! to change group membership. The built-in hub of the contract (`builtin`) is written
//! on this API only.

pub mod context;
pub mod hub;
pub mod types;

pub use context::HubContext;
pub use hub::{fallible_items, items, Call, ClientStream, FromValue, Hub, ItemStream};
pub use types::{valid_hub_name, Caller, ContextError, HubError, LocalBoxFuture, Target};
