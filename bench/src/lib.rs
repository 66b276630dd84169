//! ringhub-bench: what the benchmark binaries share: the typical inputs of the
//! criterion micro-benchmarks (`benches/`), and the WebSocket client side of the load
//! generator ([`client`]), which the peer servers reuse for their reads.

pub mod client;
pub mod http_receiver;

use bytes::BytesMut;
use ringhub_protocol::hub::{HubMessage, HubProtocol, Invocation};
use ringhub_protocol::ws::{encode_client_frame, Opcode};
use ringhub_protocol::Value;

/// A 64-byte payload, the size the fan-out workloads use.
pub fn payload_64() -> String {
    "x".repeat(64)
}

/// What a client typically sends: `SendToGroup(group, target, [payload, seq, sentAt])`
/// as a blocking call.
pub fn typical_client_invocation() -> HubMessage {
    HubMessage::Invocation(Invocation {
        invocation_id: Some("1234".into()),
        target: "SendToGroup".into(),
        arguments: vec![
            Value::from("room-7"),
            Value::from("ReceiveMessage"),
            Value::Array(vec![
                Value::Str(payload_64()),
                Value::Int(987_654),
                Value::Int(1_763_856_000_123),
            ]),
        ],
        ..Invocation::default()
    })
}

/// What every group member receives for it.
pub fn typical_group_message() -> HubMessage {
    HubMessage::invocation(
        "ReceiveMessage",
        vec![
            Value::Str(payload_64()),
            Value::Int(987_654),
            Value::Int(1_763_856_000_123),
        ],
    )
}

/// One encoded record body (no separator or prefix) of `message`.
pub fn record_body(protocol: HubProtocol, message: &HubMessage) -> Vec<u8> {
    let mut out = BytesMut::new();
    protocol.encode(message, &mut out);
    let record = protocol
        .split_record(&out, usize::MAX)
        .ok()
        .flatten()
        .map(|r| r.body.to_vec());
    record.unwrap_or_default()
}

/// `count` masked client text frames each carrying a `payload_len`-byte payload.
pub fn masked_frame_stream(count: usize, payload_len: usize) -> Vec<u8> {
    let payload = vec![b'a'; payload_len];
    let mut out = BytesMut::new();
    for i in 0..count {
        let mask = (i as u32).wrapping_mul(0x9e37_79b9).to_be_bytes();
        encode_client_frame(Opcode::Text, true, &payload, mask, &mut out);
    }
    out.to_vec()
}
