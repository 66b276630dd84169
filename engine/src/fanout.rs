//! Encode once, deliver to many: a [`Broadcast`] is a message on its way to many
//! connections, with its frames encoded lazily, at most once per hub protocol in the
//! whole process, by whichever shard needs them first; every recipient on every shard
//! gets that frame (a reference to the same `Bytes`, or a copy of its bytes in the
//! connection's send buffer when it is small: see `session::outbox`).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;

use bytes::Bytes;
use ringhub_protocol::{frame, HubMessage, HubProtocol};

/// How many frames were encoded for broadcasts since start (for the fan-out tests).
pub static BROADCAST_ENCODES: AtomicU64 = AtomicU64::new(0);

/// A message on its way to many connections, with its frames encoded lazily, once per
/// protocol, and shared by every shard.
#[derive(Debug)]
pub struct Broadcast {
    message: HubMessage,
    json: OnceLock<Bytes>,
    msgpack: OnceLock<Bytes>,
}

impl Broadcast {
    pub fn new(message: HubMessage) -> Broadcast {
        Broadcast {
            message,
            json: OnceLock::new(),
            msgpack: OnceLock::new(),
        }
    }

    /// The complete WebSocket frame for `protocol` (a reference-count clone).
    pub fn frame(&self, protocol: HubProtocol) -> Bytes {
        let cell = match protocol {
            HubProtocol::Json => &self.json,
            HubProtocol::MessagePack => &self.msgpack,
        };
        cell.get_or_init(|| {
            BROADCAST_ENCODES.fetch_add(1, Relaxed);
            frame::encode_message(protocol, &self.message)
        })
        .clone()
    }
}

/// The frames of one broadcast as this shard needs them: fetched from the shared
/// cells once per protocol, then cloned (a reference count) per recipient.
pub struct FrameCache<'a> {
    broadcast: &'a Broadcast,
    json: Option<Bytes>,
    msgpack: Option<Bytes>,
}

impl<'a> FrameCache<'a> {
    pub fn new(broadcast: &'a Broadcast) -> Self {
        FrameCache {
            broadcast,
            json: None,
            msgpack: None,
        }
    }

    pub fn get(&mut self, protocol: HubProtocol) -> &Bytes {
        let slot = match protocol {
            HubProtocol::Json => &mut self.json,
            HubProtocol::MessagePack => &mut self.msgpack,
        };
        slot.get_or_insert_with(|| self.broadcast.frame(protocol))
    }
}
