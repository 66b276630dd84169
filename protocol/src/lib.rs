//! Sans-IO wire formats for ringhub: everything that turns bytes into messages and
//! messages into bytes, with no sockets, no async and no clock.
//!
//! The seam to the engine is "bytes in, messages out; message in, frame out":
//! - [`http`]: HTTP/1.1 request heads, WebSocket upgrade, negotiate and plain responses;
//! - [`ws`]: RFC 6455 frames, an incremental client-frame decoder and server-frame encoders;
//! - [`handshake`]: the SignalR handshake request and response;
//! - [`hub`]: the SignalR hub message model with its JSON and MessagePack encodings;
//! - [`frame`]: "encode once", a server→client hub message as one complete WebSocket
//!   frame in [`bytes::Bytes`], ready to be written unchanged to any number of connections.
//!
//! Every decoder takes its limits as parameters and reports bad input as an error enum;
//! no input makes it panic (the parsers are fuzzed, see `fuzz/`).

#![warn(missing_docs)]

pub mod frame;
pub mod handshake;
pub mod http;
pub mod hub;
pub mod value;
pub mod value_serde;
pub mod ws;

pub use hub::{
    CancelInvocation, Close, Completion, CompletionOutcome, Headers, HubMessage, HubProtocol,
    Invocation, MessageError, StreamItem,
};
pub use value::Value;
pub use value_serde::ValueError;
