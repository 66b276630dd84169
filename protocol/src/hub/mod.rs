//! The SignalR hub message model and its two encodings.
//!
//! Decoding is two steps, each fuzzed on its own: [`HubProtocol::split_record`] finds one
//! complete record in a byte stream (JSON ends records with `0x1E`, MessagePack prefixes
//! them with a varint length), then [`HubProtocol::parse`] turns its body into a
//! [`HubMessage`]. Messages of unknown type parse to `None` and are ignored, as ASP.NET
//! Core does.

use std::collections::BTreeMap;

use bytes::BytesMut;
use thiserror::Error;

use crate::value::Value;
use crate::ws::Opcode;

pub mod json;
pub mod msgpack;

/// Message headers (types 1 to 5): a string map nobody interprets but everyone carries.
pub type Headers = BTreeMap<String, String>;

/// Types 1 (Invocation) and 4 (StreamInvocation).
#[derive(Debug, Clone, PartialEq, Default)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Invocation {
    /// Carried through unread.
    pub headers: Headers,
    /// `None` for a non-blocking call (no Completion is sent back).
    pub invocation_id: Option<String>,
    /// The method to call: a hub method's name client→server, the client handler's
    /// name server→client.
    pub target: String,
    /// The arguments in order; upload streams are not among them (see `stream_ids`).
    pub arguments: Vec<Value>,
    /// Upload stream ids; empty when the call has none.
    pub stream_ids: Vec<String>,
}

/// Type 2.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct StreamItem {
    /// Carried through unread.
    pub headers: Headers,
    /// The stream the item belongs to: a server stream's invocation id, or one of an
    /// upload's `stream_ids`.
    pub invocation_id: String,
    /// The item itself.
    pub item: Value,
}

/// How an invocation ended.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum CompletionOutcome {
    /// No result at all (MessagePack result kind 2, JSON without `result`).
    Void,
    /// A result, which may be null (MessagePack kind 3, JSON `"result": ...`).
    Result(Value),
    /// An error text (MessagePack kind 1, JSON `"error": ...`).
    Error(String),
}

/// Type 3.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Completion {
    /// Carried through unread.
    pub headers: Headers,
    /// The invocation or stream this ends.
    pub invocation_id: String,
    /// A result, no result, or an error.
    pub outcome: CompletionOutcome,
}

/// Type 5.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct CancelInvocation {
    /// Carried through unread.
    pub headers: Headers,
    /// The server stream the client no longer wants.
    pub invocation_id: String,
}

/// Type 7.
#[derive(Debug, Clone, PartialEq, Default)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Close {
    /// Why the server closes, shown to the client; `None` for a clean close.
    pub error: Option<String>,
    /// `true` lets a client with automatic reconnect come back.
    pub allow_reconnect: bool,
}

/// Every hub message type of the SignalR protocol (1 to 9).
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum HubMessage {
    /// Type 1: a call of a method on the other side, with or without an answer.
    Invocation(Invocation),
    /// Type 2: one item of a stream, server→client or client→server.
    StreamItem(StreamItem),
    /// Type 3: the end of an invocation or of a stream.
    Completion(Completion),
    /// Type 4: a client call of a hub method that answers with a stream of items.
    StreamInvocation(Invocation),
    /// Type 5: the client stops a server stream it asked for.
    CancelInvocation(CancelInvocation),
    /// Type 6: keep-alive, either way; carries nothing.
    Ping,
    /// Type 7: the server ends the connection, saying why.
    Close(Close),
    /// Type 8 (stateful reconnect): every message up to `sequence_id` arrived, so the
    /// sender may drop them from its replay buffer.
    Ack {
        /// The sequence number of the last message received.
        sequence_id: u64,
    },
    /// Type 9 (stateful reconnect): after a reconnect, the sequence number of the next
    /// message the sender sends, so the receiver can skip what it already has.
    Sequence {
        /// The sequence number of the message that follows.
        sequence_id: u64,
    },
}

impl HubMessage {
    /// The numeric `type` of this message on the wire.
    pub fn message_type(&self) -> u8 {
        match self {
            HubMessage::Invocation(_) => 1,
            HubMessage::StreamItem(_) => 2,
            HubMessage::Completion(_) => 3,
            HubMessage::StreamInvocation(_) => 4,
            HubMessage::CancelInvocation(_) => 5,
            HubMessage::Ping => 6,
            HubMessage::Close(_) => 7,
            HubMessage::Ack { .. } => 8,
            HubMessage::Sequence { .. } => 9,
        }
    }

    /// A non-blocking server→client invocation `target(arguments...)`.
    pub fn invocation(target: impl Into<String>, arguments: Vec<Value>) -> HubMessage {
        HubMessage::Invocation(Invocation {
            target: target.into(),
            arguments,
            ..Invocation::default()
        })
    }

    /// A completion of `invocation_id` with the given outcome.
    pub fn completion(invocation_id: impl Into<String>, outcome: CompletionOutcome) -> HubMessage {
        HubMessage::Completion(Completion {
            headers: Headers::new(),
            invocation_id: invocation_id.into(),
            outcome,
        })
    }
}

/// Why bytes could not be read as a hub message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MessageError {
    /// A record body longer than the limit, found before reading all of it.
    #[error("hub message exceeds the maximum message size of {limit} bytes")]
    TooLarge {
        /// The limit the caller passed.
        limit: usize,
    },
    /// A record with no body at all.
    #[error("empty hub message")]
    Empty,
    /// A MessagePack varint length prefix that is malformed or too long.
    #[error("invalid message length prefix")]
    LengthPrefix,
    /// The body is not the JSON a hub message must be; the text says why.
    #[error("invalid JSON hub message: {0}")]
    Json(String),
    /// The body is not the MessagePack array a hub message must be; the text says why.
    #[error("invalid MessagePack hub message: {0}")]
    MessagePack(String),
    /// A property the message type requires is absent.
    #[error("missing required property '{field}' in a message of type {message_type}")]
    MissingField {
        /// The message's `type`.
        message_type: u64,
        /// The property's name on the wire.
        field: &'static str,
    },
    /// A property is present with a value of the wrong kind.
    #[error("property '{field}' must be {expected}")]
    WrongType {
        /// The property's name on the wire.
        field: &'static str,
        /// What it must be, in words (`a string`, ...).
        expected: &'static str,
    },
}

impl MessageError {
    /// The WebSocket close code (RFC 6455) a server ends the connection with after this
    /// error: 1009 for a message over the limit, 1007 (invalid payload data) otherwise.
    pub fn close_code(&self) -> u16 {
        match self {
            MessageError::TooLarge { .. } => crate::ws::close_code::TOO_BIG,
            _ => crate::ws::close_code::INVALID_DATA,
        }
    }
}

/// One complete record found in a byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// The encoded message, without separator or length prefix.
    pub body: &'a [u8],
    /// How many bytes of the stream the record took, framing included.
    pub consumed: usize,
}

/// The two hub protocols a client can pick in its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HubProtocol {
    /// `json`: text, records end with `0x1E`; what browsers use by default.
    Json,
    /// `messagepack`: binary, records prefixed with their length; smaller on the wire,
    /// and binary data travels as is.
    MessagePack,
}

impl HubProtocol {
    /// The name used in the handshake (`json`, `messagepack`).
    pub fn name(self) -> &'static str {
        match self {
            HubProtocol::Json => "json",
            HubProtocol::MessagePack => "messagepack",
        }
    }

    /// The protocol a handshake names; `None` for a name ringhub does not speak.
    pub fn from_name(name: &str) -> Option<HubProtocol> {
        match name {
            "json" => Some(HubProtocol::Json),
            "messagepack" => Some(HubProtocol::MessagePack),
            _ => None,
        }
    }

    /// The WebSocket frame type that carries this protocol (text for JSON).
    pub fn opcode(self) -> Opcode {
        match self {
            HubProtocol::Json => Opcode::Text,
            HubProtocol::MessagePack => Opcode::Binary,
        }
    }

    /// Finds the first complete record in `buf`; `Ok(None)` means more bytes are needed.
    ///
    /// `max_message_bytes` bounds the body (framing excluded); a longer record is an
    /// error as soon as that is certain, without waiting for the rest of it.
    pub fn split_record(
        self,
        buf: &[u8],
        max_message_bytes: usize,
    ) -> Result<Option<Record<'_>>, MessageError> {
        match self {
            HubProtocol::Json => json::split_record(buf, max_message_bytes),
            HubProtocol::MessagePack => msgpack::split_record(buf, max_message_bytes),
        }
    }

    /// Parses one record body; `Ok(None)` for a message of unknown type (ignored).
    pub fn parse(self, body: &[u8]) -> Result<Option<HubMessage>, MessageError> {
        match self {
            HubProtocol::Json => json::parse(body),
            HubProtocol::MessagePack => msgpack::parse(body),
        }
    }

    /// Appends `message` as one complete record (body plus framing) to `out`.
    pub fn encode(self, message: &HubMessage, out: &mut BytesMut) {
        match self {
            HubProtocol::Json => json::encode(message, out),
            HubProtocol::MessagePack => msgpack::encode(message, out),
        }
    }

    /// Splits and parses every complete record in `buf`. Returns the messages (unknown
    /// types left out) and how many bytes they took; the rest is an incomplete record.
    pub fn decode_all(
        self,
        mut buf: &[u8],
        max_message_bytes: usize,
    ) -> Result<(Vec<HubMessage>, usize), MessageError> {
        let mut messages = Vec::new();
        let mut consumed = 0;
        while let Some(record) = self.split_record(buf, max_message_bytes)? {
            if let Some(message) = self.parse(record.body)? {
                messages.push(message);
            }
            consumed += record.consumed;
            buf = &buf[record.consumed..];
        }
        Ok((messages, consumed))
    }
}
