//! Interoperability with the stock `@microsoft/signalr` client, both ways.
//!
//! (a) `tests/js/gen-vectors.mjs` encodes messages with the client's own JSON and
//!     MessagePack hub protocols into `tests/js/vectors/js-vectors.json`; this test
//!     decodes each one and compares it field by field with its own copy of the message.
//! (b) This test encodes the same messages with ringhub's encoders into
//!     `rust-vectors.json` (under `RINGHUB_INTEROP_DIR`, default `target/interop`),
//!     which `tests/js/check-rust-vectors.mjs` decodes with the client.

use std::collections::BTreeMap;
use std::path::PathBuf;

use bytes::BytesMut;
use ringhub_protocol::hub::*;
use ringhub_protocol::value::TIMESTAMP_EXT;
use ringhub_protocol::Value;

fn s(text: &str) -> Value {
    Value::from(text)
}

fn map(entries: Vec<(&str, Value)>) -> Value {
    Value::Map(entries.into_iter().map(|(k, v)| (s(k), v)).collect())
}

fn invocation(id: Option<&str>, target: &str, arguments: Vec<Value>) -> Invocation {
    Invocation {
        invocation_id: id.map(str::to_owned),
        target: target.into(),
        arguments,
        ..Invocation::default()
    }
}

/// 2024-02-29T12:34:56.789Z as @msgpack/msgpack writes a Date (timestamp 64).
fn leap_day_timestamp() -> Value {
    let (secs, nanos) = (1_709_210_096u64, 789_000_000u64);
    Value::Ext(TIMESTAMP_EXT, ((nanos << 34) | secs).to_be_bytes().to_vec())
}

/// Every interop message by name, in its richest form (binary and dates as such).
fn messages() -> BTreeMap<&'static str, HubMessage> {
    let all_kinds = vec![
        s("text"),
        Value::Int(42),
        Value::Int(-7),
        Value::Int(-200),
        Value::Float(1.5),
        Value::Float(0.1),
        Value::Int(1 << 40),
        Value::Bool(true),
        Value::Bool(false),
        Value::Null,
        map(vec![(
            "nested",
            Value::Array(vec![
                Value::Int(1),
                s("two"),
                map(vec![("three", Value::Int(3))]),
            ]),
        )]),
        Value::Array(vec![]),
        Value::Map(vec![]),
    ];
    let headers: Headers = [("tenant", "a"), ("trace", "b")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let completion = |id: &str, outcome| HubMessage::completion(id, outcome);
    BTreeMap::from([
        (
            "invocation_nonblocking",
            HubMessage::Invocation(invocation(None, "Send", vec![s("ann"), s("hi")])),
        ),
        (
            "invocation_blocking_all_kinds",
            HubMessage::Invocation(invocation(Some("7"), "Echo", all_kinds)),
        ),
        (
            "invocation_with_headers",
            HubMessage::Invocation(Invocation {
                headers,
                ..invocation(Some("8"), "Echo", vec![Value::Int(1)])
            }),
        ),
        (
            "invocation_with_stream_ids",
            HubMessage::Invocation(Invocation {
                stream_ids: vec!["10".into(), "11".into()],
                ..invocation(Some("9"), "Upload", vec![])
            }),
        ),
        (
            "invocation_unicode",
            HubMessage::Invocation(invocation(
                None,
                "Say",
                vec![s("héllo € 😀"), s("tab\tquote\"back\\slash\u{1e}")],
            )),
        ),
        (
            "invocation_binary_and_date",
            HubMessage::Invocation(invocation(
                None,
                "Bytes",
                vec![Value::Binary(vec![1, 2, 3]), leap_day_timestamp()],
            )),
        ),
        (
            "stream_item",
            HubMessage::StreamItem(StreamItem {
                headers: Headers::new(),
                invocation_id: "3".into(),
                item: map(vec![("n", Value::Int(42))]),
            }),
        ),
        (
            "completion_result",
            completion(
                "0",
                CompletionOutcome::Result(Value::Array(vec![Value::Int(1), s("x")])),
            ),
        ),
        (
            "completion_null_result",
            completion("1", CompletionOutcome::Result(Value::Null)),
        ),
        ("completion_void", completion("2", CompletionOutcome::Void)),
        (
            "completion_error",
            completion(
                "3",
                CompletionOutcome::Error("Unknown hub method 'Foo'".into()),
            ),
        ),
        (
            "stream_invocation",
            HubMessage::StreamInvocation(invocation(
                Some("5"),
                "Counter",
                vec![Value::Int(10), Value::Int(500)],
            )),
        ),
        (
            "cancel_invocation",
            HubMessage::CancelInvocation(CancelInvocation {
                headers: Headers::new(),
                invocation_id: "5".into(),
            }),
        ),
        ("ping", HubMessage::Ping),
        ("close", HubMessage::Close(Close::default())),
        (
            "close_with_error",
            HubMessage::Close(Close {
                error: Some("Connection closed with an error.".into()),
                allow_reconnect: true,
            }),
        ),
        ("ack", HubMessage::Ack { sequence_id: 12 }),
        ("sequence", HubMessage::Sequence { sequence_id: 5 }),
    ])
}

/// What the JS client writes for a message where JSON cannot carry it as is:
/// `JSON.stringify` turns a `Uint8Array` into an index-keyed object and a `Date` into text.
fn as_written_by_js(protocol: HubProtocol, name: &str, message: HubMessage) -> HubMessage {
    if protocol == HubProtocol::Json && name == "invocation_binary_and_date" {
        let bytes = map(vec![
            ("0", Value::Int(1)),
            ("1", Value::Int(2)),
            ("2", Value::Int(3)),
        ]);
        return HubMessage::Invocation(invocation(
            None,
            "Bytes",
            vec![bytes, s("2024-02-29T12:34:56.789Z")],
        ));
    }
    message
}

fn protocols() -> [(&'static str, HubProtocol); 2] {
    [
        ("json", HubProtocol::Json),
        ("messagepack", HubProtocol::MessagePack),
    ]
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex vector"))
        .collect()
}

#[test]
fn decodes_what_the_js_client_writes() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/js/vectors/js-vectors.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run `node tests/js/gen-vectors.mjs`)",
            path.display()
        )
    });
    let vectors: BTreeMap<String, BTreeMap<String, String>> = serde_json::from_str(&text).unwrap();
    let expected = messages();
    for (protocol_name, protocol) in protocols() {
        let written = &vectors[protocol_name];
        // The MessagePack client always writes Close as [7, nil], so it has no
        // close_with_error vector; every other message must be there.
        let wanted: Vec<&str> = expected
            .keys()
            .copied()
            .filter(|n| protocol == HubProtocol::Json || *n != "close_with_error")
            .collect();
        let found: Vec<&str> = written.keys().map(String::as_str).collect();
        assert_eq!(found, wanted, "{protocol_name}: vector names");
        for (name, bytes) in written {
            let bytes = unhex(bytes);
            let (decoded, used) = protocol
                .decode_all(&bytes, 1 << 20)
                .unwrap_or_else(|e| panic!("{protocol_name}/{name}: {e}"));
            assert_eq!(
                used,
                bytes.len(),
                "{protocol_name}/{name}: whole vector used"
            );
            let want = as_written_by_js(protocol, name, expected[name.as_str()].clone());
            assert_eq!(decoded, vec![want], "{protocol_name}/{name}");
        }
    }
}

#[test]
fn writes_vectors_for_the_js_client() {
    let dir = std::env::var_os("RINGHUB_INTEROP_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/interop"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut out = BTreeMap::new();
    for (protocol_name, protocol) in protocols() {
        let mut encoded = BTreeMap::new();
        for (name, message) in messages() {
            let mut bytes = BytesMut::new();
            protocol.encode(&message, &mut bytes);
            encoded.insert(name, hex(&bytes));
        }
        out.insert(protocol_name, encoded);
    }
    let text = serde_json::to_string_pretty(&out).unwrap();
    std::fs::write(dir.join("rust-vectors.json"), text).unwrap();
}
