//! HTTP request heads: parsing and everything the engine asks of a parsed head.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ringhub_protocol::http::{self, HttpLimits};

fuzz_target!(|data: &[u8]| {
    let limits = HttpLimits { max_head_bytes: 4096, max_headers: 32 };
    if let Ok(Some((head, len))) = http::parse_request_head(data, limits) {
        assert!(len <= data.len());
        let _ = head.websocket_accept();
        let _ = head.path_segments();
        let _ = head.query_param("id");
        let _ = head.bearer_token();
        let _ = head.keep_alive();
        let _ = http::negotiate_version(&head);
    }
});
