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

/// How many times broadcasts were serialized since start (once per hub protocol a
/// message is sent in, whatever the framings; for the fan-out tests).
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
    /// `None` for a message that arrived from another node with its records made.
    message: Option<HubMessage>,
    frames: [OnceLock<Bytes>; KINDS],
}

impl Broadcast {
    pub fn new(message: HubMessage) -> Broadcast {
        Broadcast {
            message: Some(message),
            frames: Default::default(),
        }
    }

    /// A message another node serialized: its bare record in each protocol (the
    /// framings are added here, as for any broadcast).
    pub fn from_records(json: Bytes, messagepack: Bytes) -> Broadcast {
        let broadcast = Broadcast {
            message: None,
            frames: Default::default(),
        };
        for (protocol, record) in [
            (HubProtocol::Json, json),
            (HubProtocol::MessagePack, messagepack),
        ] {
            let kind = FrameKind {
                protocol,
                framing: Framing::Raw,
            };
            let _ = broadcast.frames[kind.index()].set(record);
        }
        broadcast
    }

    /// The complete frame for `kind` (a reference-count clone). The message is
    /// serialized once per protocol (its bare record); each framing wraps that record.
    pub fn frame(&self, kind: FrameKind) -> Bytes {
        self.frames[kind.index()]
            .get_or_init(|| match kind.framing {
                Framing::Raw => {
                    BROADCAST_ENCODES.fetch_add(1, Relaxed);
                    // Records of a message from another node are set when it is made.
                    self.message.as_ref().map_or_else(Bytes::new, |message| {
                        frame::encode_framed(kind.protocol, Framing::Raw, message)
                    })
                }
                framing => {
                    let record = self.frame(FrameKind {
                        protocol: kind.protocol,
                        framing: Framing::Raw,
                    });
                    frame::frame_raw(kind.protocol, framing, &record)
                }
            })
            .clone()
    }
}

/// The most a framing adds to a hub record: a WebSocket header (10 bytes at most), or
/// an SSE `data: ` prefix and the blank line after it.
const MAX_FRAMING_OVERHEAD: usize = 16;

/// How many times larger than its JSON form a message can be in MessagePack: a float
/// is 9 bytes in MessagePack and can be 3 in JSON (`1.0`); nothing grows more.
const MESSAGEPACK_GROWTH: usize = 3;

impl Broadcast {
    /// The size of the largest frame this message takes for any recipient, if it is at
    /// most `limit` (contract section 6: a message is refused where it enters when it
    /// could not fit); `Err` with that size otherwise. Serializes the JSON record
    /// (which every JSON frame is made from), and the MessagePack one only when its
    /// size could matter.
    pub fn check_size(&self, limit: usize) -> Result<usize, usize> {
        let record = |protocol| {
            self.frame(FrameKind {
                protocol,
                framing: Framing::Raw,
            })
            .len()
        };
        let json = record(HubProtocol::Json);
        let mut largest = json;
        if json * MESSAGEPACK_GROWTH + MAX_FRAMING_OVERHEAD > limit {
            largest = largest.max(record(HubProtocol::MessagePack));
        }
        let size = largest + MAX_FRAMING_OVERHEAD;
        if size > limit {
            Err(size)
        } else {
            Ok(json)
        }
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
    fn each_kind_is_made_once_from_one_serialization_per_protocol() {
        let message = HubMessage::invocation("m", vec!["é\n".into()]);
        let broadcast = Broadcast::new(message.clone());
        let before = BROADCAST_ENCODES.load(Relaxed);
        let mut seen = Vec::new();
        for protocol in [HubProtocol::Json, HubProtocol::MessagePack] {
            for framing in Framing::ALL {
                let kind = FrameKind { protocol, framing };
                let first = broadcast.frame(kind);
                assert_eq!(first, frame::encode_framed(protocol, framing, &message));
                assert_eq!(first.as_ptr(), broadcast.frame(kind).as_ptr(), "shared");
                assert!(!seen.contains(&first), "{kind:?} has its own bytes");
                seen.push(first);
            }
        }
        // Other tests may run meanwhile: at least one per protocol, and not one per kind.
        let serialized = BROADCAST_ENCODES.load(Relaxed) - before;
        assert!(serialized >= 2, "{serialized}");
    }

    #[test]
    fn a_message_is_measured_in_its_largest_encoding() {
        let text = Broadcast::new(HubMessage::invocation("m", vec!["x".repeat(1000).into()]));
        let json = text.check_size(2000).expect("fits");
        assert!((1000..1100).contains(&json), "{json}");
        assert_eq!(text.check_size(1000), Err(json + MAX_FRAMING_OVERHEAD));
        // 300 floats: `1.5,` in JSON (4 bytes each), 9 bytes each in MessagePack.
        let floats = Broadcast::new(HubMessage::invocation(
            "m",
            vec![ringhub_protocol::Value::Array(
                vec![ringhub_protocol::Value::Float(1.5); 300],
            )],
        ));
        let json = floats.check_size(1 << 20).expect("fits");
        assert!(json < 1300, "{json}");
        let size = floats.check_size(2000).expect_err("MessagePack is larger");
        assert!(size > 2700, "measured in MessagePack: {size}");
    }
}
