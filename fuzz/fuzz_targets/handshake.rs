//! SignalR handshake requests (server side) and responses (client side).
#![no_main]
use libfuzzer_sys::fuzz_target;
use ringhub_protocol::handshake;

fuzz_target!(|data: &[u8]| {
    match handshake::parse_request(data, 1024) {
        Ok(Some((request, used))) => {
            assert!(used <= data.len());
            let _ = request.select();
        }
        Ok(None) => assert!(data.len() <= 1024),
        Err(e) => {
            let _ = e.response_text();
        }
    }
    let _ = handshake::parse_response(data);
});
