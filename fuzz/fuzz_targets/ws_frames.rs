//! WebSocket client frames, fed in chunks whose sizes come from the input itself.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use ringhub_protocol::ws::{FrameDecoder, WsEvent, WsLimits, MAX_CONTROL_PAYLOAD};

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, data)) = data.split_first() else { return };
    let chunk = usize::from(chunk).max(1);
    let limits = WsLimits { max_message_bytes: 1024 };
    let mut decoder = FrameDecoder::new(limits);
    let mut buf = BytesMut::new();
    let mut message_len = 0usize;
    for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(WsEvent::Data { payload, last, .. })) => {
                    message_len += payload.len();
                    assert!(message_len <= limits.max_message_bytes);
                    if last {
                        message_len = 0;
                    }
                }
                Ok(Some(WsEvent::Ping(p) | WsEvent::Pong(p))) => assert!(p.len() <= MAX_CONTROL_PAYLOAD),
                Ok(Some(WsEvent::Close(_))) => {}
                Ok(None) => break,
                Err(e) => {
                    let _ = e.close_code();
                    return;
                }
            }
        }
    }
});
