//! The MessagePack hub protocol: framing and parsing; whatever decodes re-encodes to
//! bytes that decode and re-encode to the very same bytes.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use ringhub_protocol::hub::HubProtocol;

fuzz_target!(|data: &[u8]| {
    let protocol = HubProtocol::MessagePack;
    let mut rest = data;
    while let Ok(Some(record)) = protocol.split_record(rest, 4096) {
        if let Ok(Some(message)) = protocol.parse(record.body) {
            let mut first = BytesMut::new();
            protocol.encode(&message, &mut first);
            let (decoded, _) = protocol.decode_all(&first, usize::MAX).expect("re-encoded message decodes");
            let mut second = BytesMut::new();
            for m in &decoded {
                protocol.encode(m, &mut second);
            }
            assert_eq!(first, second, "encoding is not stable");
        }
        rest = &rest[record.consumed..];
    }
});
