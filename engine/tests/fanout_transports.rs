//! Encode once across transports: one group send to members over WebSockets, Server-Sent
//! Events and long polling, on two shards, is serialized once per protocol in the whole
//! process (each framing wraps that one record). Its own test binary: the counter is
//! process-wide.

mod common;

use std::io::Write;
use std::time::Duration;

use common::{http, negotiate, read_some, start_with_shards, RawClient};
use ringhub_engine::broadcast_encodes;

/// POSTs hub messages (JSON, separators added) on a token's send channel.
fn post(addr: std::net::SocketAddr, token: &str, messages: &[&str]) {
    let body: String = messages.iter().map(|m| format!("{m}\u{1e}")).collect();
    assert_eq!(
        http(addr, "POST", &format!("/hubs/test?id={token}"), &body).0,
        200
    );
}

const HANDSHAKE: &str = r#"{"protocol":"json","version":1}"#;
const JOIN: &str = r#"{"type":1,"invocationId":"j","target":"JoinGroup","arguments":["room"]}"#;

#[test]
fn a_group_of_mixed_transports_is_serialized_once_per_protocol() {
    let server = start_with_shards(2);
    let addr = server.local_addr();
    let mut websockets = Vec::new();
    for _ in 0..2 {
        let mut member = RawClient::connect(addr, None);
        assert!(member
            .invoke("1", "JoinGroup", r#"["room"]"#)
            .contains("null"));
        websockets.push(member);
    }
    let mut streams = Vec::new();
    for _ in 0..2 {
        let (token, _) = negotiate(addr);
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let request = format!(
            "GET /hubs/test?id={token} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).unwrap();
        // The stream is open (its head and opening comment came) before anything is sent,
        // as a client waits for `open`.
        let mut seen = String::new();
        while !seen.contains("\r\n\r\n:\r\n") {
            let mut chunk = [0u8; 4096];
            let n = read_some(&mut stream, &mut chunk).unwrap();
            assert!(n > 0, "stream ended");
            seen.push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
        post(addr, &token, &[HANDSHAKE, JOIN]);
        streams.push((stream, seen));
    }
    let mut polls = Vec::new();
    for _ in 0..2 {
        let (token, _) = negotiate(addr);
        let poll = format!("/hubs/test?id={token}");
        assert_eq!(http(addr, "GET", &poll, "").0, 200, "the first poll");
        post(addr, &token, &[HANDSHAKE, JOIN]);
        let (_, answered) = http(addr, "GET", &poll, "");
        assert!(answered.contains(r#""invocationId":"j""#), "{answered}");
        polls.push(poll);
    }
    // Every member is in: the SSE ones have their join's completion.
    for (stream, seen) in &mut streams {
        while !seen.contains(r#""invocationId":"j""#) {
            let mut chunk = [0u8; 4096];
            let n = read_some(stream, &mut chunk).unwrap();
            assert!(n > 0, "stream ended");
            seen.push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    }
    let encodes = broadcast_encodes();
    let mut sender = RawClient::connect(addr, None);
    sender.invoke(
        "s",
        "SendToGroup",
        r#"["room","receive",["to every transport"]]"#,
    );
    let expected = r#"{"type":1,"target":"receive","arguments":["to every transport"]}"#;
    for member in &mut websockets {
        assert_eq!(member.next_message(), expected);
    }
    for (stream, seen) in &mut streams {
        let event = format!("data: {expected}\u{1e}\r\n\r\n");
        while !seen.contains(&event) {
            let mut chunk = [0u8; 4096];
            let n = read_some(stream, &mut chunk).unwrap();
            assert!(n > 0, "stream ended");
            seen.push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    }
    for poll in &polls {
        assert_eq!(http(addr, "GET", poll, "").1, format!("{expected}\u{1e}"));
    }
    assert_eq!(
        broadcast_encodes() - encodes,
        1,
        "one serialization (JSON) for WebSocket, SSE and long polling, over two shards"
    );
    server.shutdown();
}
