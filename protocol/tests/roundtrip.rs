//! Property tests: every message survives encode → decode in both protocols, and the
//! decoders give the same result however their input is split.

use bytes::{Bytes, BytesMut};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use ringhub_protocol::frame;
use ringhub_protocol::hub::*;
use ringhub_protocol::ws::{encode_client_frame, FrameDecoder, Opcode, WsEvent, WsLimits};
use ringhub_protocol::Value;

/// Values both protocols represent exactly: finite floats, string map keys for JSON.
fn value(json: bool) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        (i64::MAX as u64 + 1..=u64::MAX).prop_map(Value::UInt),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::Float),
        ".{0,40}".prop_map(Value::Str),
    ];
    let leaf = if json {
        leaf.boxed()
    } else {
        prop_oneof![
            4 => leaf,
            1 => vec(any::<u8>(), 0..300).prop_map(Value::Binary),
            1 => (any::<i8>(), vec(any::<u8>(), 0..40)).prop_map(|(t, d)| Value::Ext(t, d)),
        ]
        .boxed()
    };
    leaf.prop_recursive(4, 64, 8, move |inner| {
        let key = if json {
            ".{0,12}".prop_map(Value::Str).boxed()
        } else {
            inner.clone()
        };
        prop_oneof![
            vec(inner.clone(), 0..8).prop_map(Value::Array),
            vec((key, inner), 0..6).prop_map(Value::Map),
        ]
    })
}

fn id() -> impl Strategy<Value = String> {
    "[0-9a-z]{1,8}"
}

fn headers() -> impl Strategy<Value = Headers> {
    btree_map(".{0,8}", ".{0,8}", 0..3)
}

fn invocation(json: bool, blocking: bool) -> impl Strategy<Value = Invocation> {
    (
        headers(),
        id().prop_flat_map(move |id| {
            if blocking {
                Just(Some(id)).boxed()
            } else {
                proptest::option::of(Just(id)).boxed()
            }
        }),
        ".{1,20}",
        vec(value(json), 0..5),
        vec(id(), 0..3),
    )
        .prop_map(
            |(headers, invocation_id, target, arguments, stream_ids)| Invocation {
                headers,
                invocation_id,
                target,
                arguments,
                stream_ids,
            },
        )
}

fn message(json: bool) -> impl Strategy<Value = HubMessage> {
    let outcome = prop_oneof![
        Just(CompletionOutcome::Void),
        value(json).prop_map(CompletionOutcome::Result),
        ".{0,30}".prop_map(CompletionOutcome::Error),
    ];
    prop_oneof![
        invocation(json, false).prop_map(HubMessage::Invocation),
        (headers(), id(), value(json)).prop_map(|(headers, invocation_id, item)| {
            HubMessage::StreamItem(StreamItem {
                headers,
                invocation_id,
                item,
            })
        }),
        (headers(), id(), outcome).prop_map(|(headers, invocation_id, outcome)| {
            HubMessage::Completion(Completion {
                headers,
                invocation_id,
                outcome,
            })
        }),
        invocation(json, true).prop_map(HubMessage::StreamInvocation),
        (headers(), id()).prop_map(|(headers, invocation_id)| {
            HubMessage::CancelInvocation(CancelInvocation {
                headers,
                invocation_id,
            })
        }),
        Just(HubMessage::Ping),
        (proptest::option::of(".{0,30}"), any::<bool>()).prop_map(|(error, allow_reconnect)| {
            HubMessage::Close(Close {
                error,
                allow_reconnect,
            })
        }),
        // JSON numbers beyond 2^53 are not safe for JS clients, but they round-trip here.
        any::<u64>().prop_map(|sequence_id| HubMessage::Ack { sequence_id }),
        any::<u64>().prop_map(|sequence_id| HubMessage::Sequence { sequence_id }),
    ]
}

fn protocol_and_messages() -> impl Strategy<Value = (HubProtocol, Vec<HubMessage>)> {
    prop_oneof![
        vec(message(true), 1..6).prop_map(|m| (HubProtocol::Json, m)),
        vec(message(false), 1..6).prop_map(|m| (HubProtocol::MessagePack, m)),
    ]
}

fn encode_all(protocol: HubProtocol, messages: &[HubMessage]) -> BytesMut {
    let mut out = BytesMut::new();
    for m in messages {
        protocol.encode(m, &mut out);
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn decode_of_encode_is_identity((protocol, messages) in protocol_and_messages()) {
        let bytes = encode_all(protocol, &messages);
        let (decoded, used) = protocol.decode_all(&bytes, usize::MAX).unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(decoded, messages);
    }

    #[cfg(feature = "simd-json")]
    #[test]
    fn simd_json_and_serde_json_agree(messages in vec(message(true), 1..4)) {
        let bytes = encode_all(HubProtocol::Json, &messages);
        for record in bytes[..].split(|b| *b == 0x1e).filter(|r| !r.is_empty()) {
            let serde = json::parse(record).unwrap();
            let simd = json::parse_simd(&mut record.to_vec()).unwrap();
            prop_assert_eq!(serde, simd);
        }
    }

    #[test]
    fn hub_decoding_ignores_how_the_stream_is_split(
        (protocol, messages) in protocol_and_messages(),
        cuts in vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let bytes = encode_all(protocol, &messages);
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
        cuts.sort_unstable();
        cuts.push(bytes.len());
        // Feed the stream piece by piece into a growing buffer, as a connection would.
        let mut pending = BytesMut::new();
        let mut decoded = Vec::new();
        let mut last = 0;
        for cut in cuts {
            pending.extend_from_slice(&bytes[last..cut]);
            last = cut;
            let (mut got, used) = protocol.decode_all(&pending, usize::MAX).unwrap();
            decoded.append(&mut got);
            let _ = pending.split_to(used);
        }
        prop_assert!(pending.is_empty());
        prop_assert_eq!(decoded, messages);
    }

    #[test]
    fn frame_decoding_ignores_how_the_stream_is_split(
        payloads in vec((any::<bool>(), vec(any::<u8>(), 0..300), 1usize..4), 1..5),
        mask in any::<[u8; 4]>(),
        cuts in vec(any::<prop::sample::Index>(), 0..8),
    ) {
        // Each payload goes out as a binary message in `parts` fragments, with a ping
        // between messages.
        let mut wire = BytesMut::new();
        let mut expected = Vec::new();
        for (ping, payload, parts) in &payloads {
            let step = payload.len().div_ceil(*parts).max(1);
            let chunks: Vec<&[u8]> = if payload.is_empty() { vec![&[][..]] } else { payload.chunks(step).collect() };
            for (i, chunk) in chunks.iter().enumerate() {
                let opcode = if i == 0 { Opcode::Binary } else { Opcode::Continuation };
                encode_client_frame(opcode, i + 1 == chunks.len(), chunk, mask, &mut wire);
            }
            expected.push(Reassembled::Data(payload.clone()));
            if *ping {
                encode_client_frame(Opcode::Ping, true, b"hi", mask, &mut wire);
                expected.push(Reassembled::Ping(Bytes::from_static(b"hi")));
            }
        }
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
        cuts.sort_unstable();
        cuts.push(wire.len());
        let mut decoder = FrameDecoder::new(WsLimits::default());
        let mut pending = BytesMut::new();
        let mut got = Vec::new();
        let mut message = Vec::new();
        let mut last = 0;
        for cut in cuts {
            pending.extend_from_slice(&wire[last..cut]);
            last = cut;
            while let Some(event) = decoder.decode(&mut pending).unwrap() {
                match event {
                    WsEvent::Data { payload, last, text } => {
                        prop_assert!(!text);
                        message.extend_from_slice(&payload);
                        if last {
                            got.push(Reassembled::Data(std::mem::take(&mut message)));
                        }
                    }
                    WsEvent::Ping(p) => got.push(Reassembled::Ping(p)),
                    other => prop_assert!(false, "unexpected {:?}", other),
                }
            }
        }
        prop_assert_eq!(got, expected);
    }

    #[test]
    fn encode_once_frames_carry_the_record(message in message(false)) {
        for protocol in [HubProtocol::Json, HubProtocol::MessagePack] {
            let frame = frame::encode_message(protocol, &message);
            let mut record = BytesMut::new();
            protocol.encode(&message, &mut record);
            prop_assert!(frame.ends_with(&record));
            let header = frame.len() - record.len();
            prop_assert!(header == 2 || header == 4 || header == 10);
        }
    }
}

#[derive(Debug, PartialEq)]
enum Reassembled {
    Data(Vec<u8>),
    Ping(Bytes),
}
