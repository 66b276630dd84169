//! The Server-Sent Events transport: one long `text/event-stream` answer carries the
//! session's frames (one event per message, JSON only); sends come by POST
//! (`transport::channel`). The stream ends when the client goes away or the session
//! ends, and the session is disposed with it, as ASP.NET Core does.

use std::rc::Rc;

use bytes::BytesMut;
use monoio::io::{OwnedReadHalf, OwnedWriteHalf};
use monoio::net::TcpStream;
use ringhub_protocol::http::{self as wire, RequestHead};

use crate::shard::state::ShardState;
use crate::shard::tokens::HttpChannel;
use crate::transport::channel::{self, Kind};
use crate::transport::client_query;
use crate::transport::io::{read_up_to, write_now, Writer};

/// Whether a GET asks for an event stream.
pub fn wants_event_stream(head: &RequestHead) -> bool {
    head.header_str("accept")
        .is_some_and(|accept| accept.contains("text/event-stream"))
}

/// Checks an SSE request; `Ok` is the channel to stream.
pub fn open(
    state: &Rc<ShardState>,
    head: &RequestHead,
    hub: &str,
) -> Result<Rc<HttpChannel>, Vec<u8>> {
    let (token, claims) = channel::identify(state, head)?;
    let keep_alive = head.keep_alive();
    let result =
        match channel::existing(state, hub, &token, claims.as_ref(), Kind::ServerSentEvents) {
            // One SSE stream per connection, ever: a second one is a conflict.
            Some(Ok(_)) => Err(super::negotiate::Refused::Active),
            Some(Err(refused)) => Err(refused),
            None => {
                let query = client_query(&state.node, head);
                channel::start(state, hub, &token, claims, query, false)
            }
        };
    result.map_err(|refused| refused.response(keep_alive))
}

/// The head of the stream, as ASP.NET Core sends it: no caching, no compression, and
/// no length (the stream ends with the connection). `cors` are extra headers.
fn stream_head(cors: &[(String, String)]) -> Vec<u8> {
    let mut head = format!("HTTP/1.1 200 {}\r\n", wire::reason_phrase(200));
    head.push_str("Content-Type: text/event-stream\r\nCache-Control: no-cache,no-store\r\n");
    head.push_str("Pragma: no-cache\r\nContent-Encoding: identity\r\nX-Accel-Buffering: no\r\n");
    for (name, value) in cors {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    // The first bytes: a comment line, which makes some browsers fire `open`.
    head.push_str("Connection: close\r\n\r\n:\r\n");
    head.into_bytes()
}

/// Streams the channel's session until the client leaves or the session ends.
pub async fn run(
    state: Rc<ShardState>,
    reader: OwnedReadHalf<TcpStream>,
    writer: OwnedWriteHalf<TcpStream>,
    channel: Rc<HttpChannel>,
    cors: Vec<(String, String)>,
) {
    let (mut reader, mut writer) = Writer::new(reader, writer);
    if write_now(writer.half(), stream_head(&cors)).await.is_err() {
        channel::dispose(&state, &channel);
        return;
    }
    channel.receive_gone_since.set(None);
    let session = channel.session.clone();
    state.flusher.attach(&session, writer);
    // A client sends nothing more on this request: reading only tells when it leaves.
    let stop = session.stop.watch();
    let mut sink = BytesMut::new();
    loop {
        match stop.run(read_up_to(&mut reader, &mut sink, 64)).await {
            Some(Ok(n)) if n > 0 => sink.clear(),
            _ => break,
        }
    }
    session.stop_now();
    channel::dispose(&state, &channel);
}
