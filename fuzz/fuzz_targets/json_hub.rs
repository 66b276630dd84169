//! The JSON hub protocol: framing and parsing, with serde_json and simd-json made to
//! agree on every record they both accept, and every accepted message re-encodable.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use ringhub_protocol::hub::{json, HubProtocol};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some(record)) = HubProtocol::Json.split_record(rest, 4096) {
        let serde = json::parse(record.body);
        let simd = json::parse_simd(&mut record.body.to_vec());
        if let (Ok(a), Ok(b)) = (&serde, &simd) {
            assert_eq!(a, b, "serde_json and simd-json disagree");
        }
        if let Ok(Some(message)) = serde {
            let mut out = BytesMut::new();
            HubProtocol::Json.encode(&message, &mut out);
            let again = HubProtocol::Json.decode_all(&out, usize::MAX);
            assert!(again.is_ok(), "re-encoded message does not decode: {again:?}");
        }
        rest = &rest[record.consumed..];
    }
});
