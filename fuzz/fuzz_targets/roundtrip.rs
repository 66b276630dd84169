//! Structure-aware: arbitrary messages must encode, in both protocols and as
//! encode-once frames of every framing, into bytes that decode; after one normalization (JSON has no
//! binary, NaN or non-string keys) encoding is stable.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use ringhub_protocol::frame;
use ringhub_protocol::hub::{HubMessage, HubProtocol};
use ringhub_protocol::value::MAX_DEPTH;

fn too_deep(message: &HubMessage) -> bool {
    let values: Vec<&ringhub_protocol::Value> = match message {
        HubMessage::Invocation(i) | HubMessage::StreamInvocation(i) => i.arguments.iter().collect(),
        HubMessage::StreamItem(s) => vec![&s.item],
        HubMessage::Completion(c) => match &c.outcome {
            ringhub_protocol::CompletionOutcome::Result(v) => vec![v],
            _ => vec![],
        },
        _ => vec![],
    };
    values.iter().any(|v| v.depth() >= MAX_DEPTH)
}

fuzz_target!(|message: HubMessage| {
    // A StreamInvocation needs an id to be valid at all; servers never send one.
    if let HubMessage::StreamInvocation(i) = &message {
        if i.invocation_id.as_deref().unwrap_or("").is_empty() {
            return;
        }
    }
    if too_deep(&message) {
        return;
    }
    for protocol in [HubProtocol::Json, HubProtocol::MessagePack] {
        let mut first = BytesMut::new();
        protocol.encode(&message, &mut first);
        let frame = frame::encode_message(protocol, &message);
        assert!(frame.ends_with(&first));
        // Every transport's unit carries the same record: a long poll's bare, and for
        // JSON an SSE event whose one data line is the record (JSON escapes line breaks).
        assert_eq!(frame::encode_framed(protocol, frame::Framing::Raw, &message), first);
        if protocol == HubProtocol::Json {
            let event = frame::encode_framed(protocol, frame::Framing::ServerSentEvents, &message);
            assert_eq!(&event[..6], b"data: ");
            assert_eq!(&event[6..event.len() - 4], &first[..]);
            assert_eq!(&event[event.len() - 4..], b"\r\n\r\n");
        }
        let (decoded, used) = protocol.decode_all(&first, usize::MAX).expect("encoded message decodes");
        assert_eq!(used, first.len());
        assert_eq!(decoded.len(), 1);
        let mut second = BytesMut::new();
        protocol.encode(&decoded[0], &mut second);
        let (again, _) = protocol.decode_all(&second, usize::MAX).expect("normalized message decodes");
        let mut third = BytesMut::new();
        protocol.encode(&again[0], &mut third);
        assert_eq!(second, third, "{protocol:?} encoding is not stable");
    }
});
