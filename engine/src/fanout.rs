//! Encode once, deliver to many: a [`Broadcast`] is a message on its way to many
//! connections, with its frames encoded lazily, at most once per hub protocol in the
//! whole process, by whichever shard needs them first; every recipient on every shard
//! gets that frame (a reference to the same `Bytes`, or a copy of its bytes in the
//! connection's send buffer when it is small: see `session::outbox`).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;

use bytes::Bytes;
use ringhub_protocol::frame::{self, Framing};
use ringhub_protocol::{HubMessage, HubProtocol};

/// How many frames were encoded for broadcasts since start (for the fan-out tests).
pub static BROADCAST_ENCODES: AtomicU64 = AtomicU64::new(0);

/// How a recipient needs a message: its hub protocol and its transport's framing.
/// Every broadcast is encoded at most once per kind in the whole process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FrameKind {
    pub protocol: HubProtocol,
    pub framing: Framing,
}

/// Protocols times framings.
const KINDS: usize = 2 * Framing::ALL.len();

impl FrameKind {
    fn index(self) -> usize {
        let protocol = usize::from(self.protocol == HubProtocol::MessagePack);
        protocol * Framing::ALL.len() + self.framing.index()
    }
}

/// A message on its way to many connections, with its frames encoded lazily, once per
/// [`FrameKind`], and shared by every shard.
#[derive(Debug)]
pub struct Broadcast {
    message: HubMessage,
    frames: [OnceLock<Bytes>; KINDS],
}

impl Broadcast {
    pub fn new(message: HubMessage) -> Broadcast {
        Broadcast {
            message,
            frames: Default::default(),
        }
    }

    /// The complete frame for `kind` (a reference-count clone).
    pub fn frame(&self, kind: FrameKind) -> Bytes {
        self.frames[kind.index()]
            .get_or_init(|| {
                BROADCAST_ENCODES.fetch_add(1, Relaxed);
                frame::encode_framed(kind.protocol, kind.framing, &self.message)
            })
            .clone()
    }
}

/// The frames of one broadcast as this shard needs them: fetched from the shared
/// cells once per kind, then cloned (a reference count) per recipient.
pub struct FrameCache<'a> {
    broadcast: &'a Broadcast,
    frames: [Option<Bytes>; KINDS],
}

impl<'a> FrameCache<'a> {
    pub fn new(broadcast: &'a Broadcast) -> Self {
        FrameCache {
            broadcast,
            frames: Default::default(),
        }
    }

    pub fn get(&mut self, kind: FrameKind) -> &Bytes {
        self.frames[kind.index()].get_or_insert_with(|| self.broadcast.frame(kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_is_encoded_once_and_differs_from_the_others() {
        let broadcast = Broadcast::new(HubMessage::invocation("m", vec![]));
        let mut seen = Vec::new();
        for protocol in [HubProtocol::Json, HubProtocol::MessagePack] {
            for framing in Framing::ALL {
                let kind = FrameKind { protocol, framing };
                let first = broadcast.frame(kind);
                assert_eq!(first.as_ptr(), broadcast.frame(kind).as_ptr(), "shared");
                assert!(!seen.contains(&first), "{kind:?} has its own bytes");
                seen.push(first);
            }
        }
    }
}
