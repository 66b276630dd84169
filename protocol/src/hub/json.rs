//! The SignalR JSON hub protocol: UTF-8 JSON objects, each ended by `0x1E`.
//!
//! Parsing goes through serde into `Wire`, a borrowed view of every property the
//! protocol defines; property order is free and unknown properties are ignored. Two
//! parsers can feed the same view: `serde_json` ([`parse`], used by the engine) and,
//! with the `simd-json` feature, `simd-json` (`parse_simd`). `bench/benches/protocol.rs`
//! compares them on a typical hub frame: serde_json won (about 480 ns against 700 ns).

use std::borrow::Cow;

use bytes::{BufMut, BytesMut};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Deserializer, Serialize};

use super::{
    CancelInvocation, Close, Completion, CompletionOutcome, Headers, HubMessage, Invocation,
    MessageError, Record, StreamItem,
};
use crate::value::Value;

/// The JSON record separator (ASCII RS).
pub const RECORD_SEPARATOR: u8 = 0x1E;

pub(super) fn split_record(
    buf: &[u8],
    max_message_bytes: usize,
) -> Result<Option<Record<'_>>, MessageError> {
    let window = &buf[..buf.len().min(max_message_bytes.saturating_add(1))];
    match memchr::memchr(RECORD_SEPARATOR, window) {
        Some(end) => Ok(Some(Record {
            body: &buf[..end],
            consumed: end + 1,
        })),
        None if buf.len() > max_message_bytes => Err(MessageError::TooLarge {
            limit: max_message_bytes,
        }),
        None => Ok(None),
    }
}

/// Parses one record body with `serde_json`.
pub fn parse(body: &[u8]) -> Result<Option<HubMessage>, MessageError> {
    if body.is_empty() {
        return Err(MessageError::Empty);
    }
    let wire: Wire = serde_json::from_slice(body).map_err(|e| MessageError::Json(e.to_string()))?;
    wire.into_message()
}

/// Parses one record body with `simd-json`, which rewrites `body` in place.
#[cfg(feature = "simd-json")]
pub fn parse_simd(body: &mut [u8]) -> Result<Option<HubMessage>, MessageError> {
    if body.is_empty() {
        return Err(MessageError::Empty);
    }
    let wire: Wire =
        simd_json::serde::from_slice(body).map_err(|e| MessageError::Json(e.to_string()))?;
    wire.into_message()
}

/// Every property of every message type, borrowed from the input where possible.
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(rename = "type")]
    message_type: Option<u64>,
    #[serde(rename = "invocationId", borrow, default)]
    invocation_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    target: Option<Cow<'a, str>>,
    #[serde(default)]
    arguments: Option<Vec<Value>>,
    #[serde(rename = "streamIds", default)]
    stream_ids: Option<Vec<String>>,
    #[serde(default, deserialize_with = "present")]
    item: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    result: Option<Value>,
    #[serde(default)]
    error: Option<String>,
    #[serde(rename = "allowReconnect", default)]
    allow_reconnect: Option<bool>,
    #[serde(rename = "sequenceId", default)]
    sequence_id: Option<u64>,
    #[serde(default)]
    headers: Option<Headers>,
}

/// Tells `"result": null` (a null result) from no `result` at all (void).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

impl Wire<'_> {
    fn into_message(self) -> Result<Option<HubMessage>, MessageError> {
        let message_type = self.message_type.ok_or(MessageError::MissingField {
            message_type: 0,
            field: "type",
        })?;
        let missing = |field| MessageError::MissingField {
            message_type,
            field,
        };
        let headers = self.headers.unwrap_or_default();
        let invocation_id = self.invocation_id.map(Cow::into_owned);
        let message = match message_type {
            1 | 4 => {
                let invocation = Invocation {
                    headers,
                    target: self.target.ok_or(missing("target"))?.into_owned(),
                    arguments: self.arguments.ok_or(missing("arguments"))?,
                    stream_ids: self.stream_ids.unwrap_or_default(),
                    // An empty id makes a call non-blocking, as in the reference server.
                    invocation_id: invocation_id.filter(|id| !id.is_empty()),
                };
                if message_type == 1 {
                    HubMessage::Invocation(invocation)
                } else {
                    if invocation.invocation_id.is_none() {
                        return Err(missing("invocationId"));
                    }
                    HubMessage::StreamInvocation(invocation)
                }
            }
            2 => HubMessage::StreamItem(StreamItem {
                headers,
                invocation_id: invocation_id.ok_or(missing("invocationId"))?,
                item: self.item.ok_or(missing("item"))?,
            }),
            3 => {
                let outcome = match (self.error, self.result) {
                    (Some(_), Some(_)) => {
                        return Err(MessageError::WrongType {
                            field: "error",
                            expected: "absent when 'result' is present",
                        })
                    }
                    (Some(error), None) => CompletionOutcome::Error(error),
                    (None, Some(result)) => CompletionOutcome::Result(result),
                    (None, None) => CompletionOutcome::Void,
                };
                HubMessage::Completion(Completion {
                    headers,
                    invocation_id: invocation_id.ok_or(missing("invocationId"))?,
                    outcome,
                })
            }
            5 => HubMessage::CancelInvocation(CancelInvocation {
                headers,
                invocation_id: invocation_id.ok_or(missing("invocationId"))?,
            }),
            6 => HubMessage::Ping,
            7 => HubMessage::Close(Close {
                error: self.error,
                allow_reconnect: self.allow_reconnect.unwrap_or(false),
            }),
            8 => HubMessage::Ack {
                sequence_id: self.sequence_id.ok_or(missing("sequenceId"))?,
            },
            9 => HubMessage::Sequence {
                sequence_id: self.sequence_id.ok_or(missing("sequenceId"))?,
            },
            _ => return Ok(None),
        };
        Ok(Some(message))
    }
}

/// Appends `message` as JSON plus `0x1E`, in the reference server's property order:
/// `type`, `headers` (only if any), `invocationId` (only if any), then the rest.
pub fn encode(message: &HubMessage, out: &mut BytesMut) {
    // serde_json fails only on I/O errors (BytesMut has none) and non-string map keys
    // (`Value` writes every key as a string), so this cannot fail.
    let _ = serde_json::to_writer((&mut *out).writer(), &Outgoing(message));
    out.put_u8(RECORD_SEPARATOR);
}

struct Outgoing<'a>(&'a HubMessage);

impl Serialize for Outgoing<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let message = self.0;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("type", &message.message_type())?;
        let with_headers = |map: &mut S::SerializeMap, headers: &Headers| {
            if headers.is_empty() {
                Ok(())
            } else {
                map.serialize_entry("headers", headers)
            }
        };
        match message {
            HubMessage::Invocation(inv) | HubMessage::StreamInvocation(inv) => {
                with_headers(&mut map, &inv.headers)?;
                if let Some(id) = &inv.invocation_id {
                    map.serialize_entry("invocationId", id)?;
                }
                map.serialize_entry("target", &inv.target)?;
                map.serialize_entry("arguments", &inv.arguments)?;
                if !inv.stream_ids.is_empty() {
                    map.serialize_entry("streamIds", &inv.stream_ids)?;
                }
            }
            HubMessage::StreamItem(item) => {
                with_headers(&mut map, &item.headers)?;
                map.serialize_entry("invocationId", &item.invocation_id)?;
                map.serialize_entry("item", &item.item)?;
            }
            HubMessage::Completion(done) => {
                with_headers(&mut map, &done.headers)?;
                map.serialize_entry("invocationId", &done.invocation_id)?;
                match &done.outcome {
                    CompletionOutcome::Void => {}
                    CompletionOutcome::Result(value) => map.serialize_entry("result", value)?,
                    CompletionOutcome::Error(error) => map.serialize_entry("error", error)?,
                }
            }
            HubMessage::CancelInvocation(cancel) => {
                with_headers(&mut map, &cancel.headers)?;
                map.serialize_entry("invocationId", &cancel.invocation_id)?;
            }
            HubMessage::Ping => {}
            HubMessage::Close(close) => {
                if let Some(error) = &close.error {
                    map.serialize_entry("error", error)?;
                }
                if close.allow_reconnect {
                    map.serialize_entry("allowReconnect", &true)?;
                }
            }
            HubMessage::Ack { sequence_id } | HubMessage::Sequence { sequence_id } => {
                map.serialize_entry("sequenceId", sequence_id)?;
            }
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::HubProtocol;

    fn encoded(message: &HubMessage) -> String {
        let mut out = BytesMut::new();
        encode(message, &mut out);
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn writes_the_reference_layout() {
        let msg = HubMessage::invocation("ReceiveMessage", vec!["ann".into(), "hi".into()]);
        assert_eq!(
            encoded(&msg),
            "{\"type\":1,\"target\":\"ReceiveMessage\",\"arguments\":[\"ann\",\"hi\"]}\u{1e}"
        );
        let done = HubMessage::completion("0", CompletionOutcome::Result(Value::Null));
        assert_eq!(
            encoded(&done),
            "{\"type\":3,\"invocationId\":\"0\",\"result\":null}\u{1e}"
        );
        let close = HubMessage::Close(Close {
            error: Some("bye".into()),
            allow_reconnect: true,
        });
        assert_eq!(
            encoded(&close),
            "{\"type\":7,\"error\":\"bye\",\"allowReconnect\":true}\u{1e}"
        );
        assert_eq!(encoded(&HubMessage::Ping), "{\"type\":6}\u{1e}");
    }

    #[test]
    fn reads_properties_in_any_order_and_ignores_unknown_ones() {
        let body = br#"{"arguments":[1,"x"],"extra":{"a":[]},"target":"Send","invocationId":"4","type":1}"#;
        let expected = HubMessage::Invocation(Invocation {
            invocation_id: Some("4".into()),
            target: "Send".into(),
            arguments: vec![Value::Int(1), "x".into()],
            ..Invocation::default()
        });
        assert_eq!(parse(body).unwrap(), Some(expected.clone()));
        #[cfg(feature = "simd-json")]
        assert_eq!(parse_simd(&mut body.to_vec()).unwrap(), Some(expected));
    }

    #[test]
    fn tells_null_result_from_void() {
        let null = parse(br#"{"type":3,"invocationId":"1","result":null}"#).unwrap();
        let void = parse(br#"{"type":3,"invocationId":"1"}"#).unwrap();
        assert_eq!(
            null,
            Some(HubMessage::completion(
                "1",
                CompletionOutcome::Result(Value::Null)
            ))
        );
        assert_eq!(
            void,
            Some(HubMessage::completion("1", CompletionOutcome::Void))
        );
    }

    #[test]
    fn unknown_types_are_ignored_and_bad_ones_rejected() {
        assert_eq!(parse(br#"{"type":42,"whatever":true}"#).unwrap(), None);
        assert!(matches!(
            parse(br#"{"type":"1"}"#),
            Err(MessageError::Json(_))
        ));
        assert!(matches!(
            parse(br#"{"target":"x","arguments":[]}"#),
            Err(MessageError::MissingField { field: "type", .. })
        ));
        assert!(matches!(
            parse(br#"{"type":1,"target":"x"}"#),
            Err(MessageError::MissingField {
                field: "arguments",
                ..
            })
        ));
        assert!(matches!(parse(b"{\"type\":1,"), Err(MessageError::Json(_))));
        assert_eq!(parse(b""), Err(MessageError::Empty));
    }

    #[test]
    fn splits_records_and_enforces_the_size_limit() {
        let stream = b"{\"type\":6}\x1e{\"type\":6}\x1e{\"ty";
        let (messages, used) = HubProtocol::Json.decode_all(stream, 100).unwrap();
        assert_eq!(messages, vec![HubMessage::Ping, HubMessage::Ping]);
        assert_eq!(used, 22);
        // Exactly at the limit is fine, one byte over is not, even before the separator.
        assert!(split_record(b"0123456789\x1e", 10).unwrap().is_some());
        assert_eq!(
            split_record(b"0123456789A", 10),
            Err(MessageError::TooLarge { limit: 10 })
        );
        assert_eq!(split_record(b"0123456789", 10), Ok(None));
    }
}
