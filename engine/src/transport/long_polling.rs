//! The long-polling transport: each GET takes everything queued for the session (or
//! waits for it, up to the poll timeout), sends come by POST (`transport::channel`),
//! DELETE ends the connection. One poll at a time: a newer poll ends the pending one,
//! which answers `204`. A connection without a poll for the disconnect timeout is
//! disposed (by the shard's timer).

use std::rc::Rc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use monoio::io::OwnedReadHalf;
use monoio::net::TcpStream;
use ringhub_protocol::http::{self as wire, RequestHead};

use crate::shard::state::ShardState;
use crate::shard::tokens::HttpChannel;
use crate::signal::Signal;
use crate::transport::channel::{self, Kind};
use crate::transport::client_query;
use crate::transport::io::read_up_to;
use crate::transport::negotiate::Refused;
use crate::transport::text_response;

/// Headers of every poll answer: nothing may cache it.
const NO_CACHE: [(&str, &str); 3] = [
    ("Cache-Control", "no-cache, no-store"),
    ("Pragma", "no-cache"),
    ("Expires", "Thu, 01 Jan 1970 00:00:00 GMT"),
];

/// What a GET poll leads to.
pub enum Polled {
    /// Answer now (the first poll, or a refusal).
    Answer(Vec<u8>),
    /// Wait on the channel.
    Wait(Rc<HttpChannel>),
}

/// Checks a poll. The first poll of a negotiated token starts the connection and is
/// answered at once with an empty `200`, as the client expects.
pub fn open(state: &Rc<ShardState>, head: &RequestHead, hub: &str) -> Polled {
    let keep_alive = head.keep_alive();
    let (token, claims) = match channel::identify(state, head) {
        Ok(found) => found,
        Err(refusal) => return Polled::Answer(refusal),
    };
    match channel::existing(state, hub, &token, claims.as_ref(), Kind::LongPolling) {
        Some(Ok(channel)) => Polled::Wait(channel),
        Some(Err(refused)) => Polled::Answer(refused.response(keep_alive)),
        None => match channel::start(
            state,
            hub,
            &token,
            claims,
            client_query(&state.node, head),
            true,
        ) {
            Ok(_) => Polled::Answer(answer(200, b"", keep_alive)),
            Err(refused) => Polled::Answer(refused.response(keep_alive)),
        },
    }
}

fn answer(status: u16, body: &[u8], keep_alive: bool) -> Vec<u8> {
    wire::response(
        status,
        "application/octet-stream",
        &NO_CACHE,
        body,
        keep_alive,
    )
}

/// Waits for the session's next frames: `200` with all of them, `200` empty after the
/// poll timeout, `204` when a newer poll took over or the connection has ended. While
/// it waits, the request's socket is watched: a client that goes away (a killed
/// process) ends the poll at once, and the disconnect timeout starts then. Bytes the
/// client sends meanwhile (a pipelined request) are kept in `buf`.
pub async fn poll(
    state: &Rc<ShardState>,
    channel: Rc<HttpChannel>,
    keep_alive: bool,
    reader: &mut OwnedReadHalf<TcpStream>,
    buf: &mut BytesMut,
) -> Option<Vec<u8>> {
    let mine = Signal::default();
    if let Some(previous) = channel.pending_poll.replace(Some(mine.clone())) {
        previous.fire();
    }
    channel.receive_gone_since.set(None);
    let session = channel.session.clone();
    let (mut copied, mut frames) = (Vec::new(), Vec::<Bytes>::new());
    let waited = {
        let replaced = mine.watch();
        let stopped = session.stop.watch();
        let next = monoio::time::timeout(
            state.node.config.long_poll_timeout,
            session.next_batch(&mut copied, &mut frames),
        );
        let wait = stopped.run(replaced.run(next));
        let client_left = async {
            let mut sink = BytesMut::new();
            match read_up_to(reader, &mut sink, 64).await {
                Ok(n) if n > 0 => {
                    buf.extend_from_slice(&sink);
                    std::future::pending::<()>().await;
                }
                _ => {}
            }
        };
        monoio::select! {
            waited = wait => Some(waited),
            _ = client_left => None,
        }
    };
    if channel
        .pending_poll
        .borrow()
        .as_ref()
        .is_some_and(|pending| pending.same_as(&mine))
    {
        channel.pending_poll.replace(None);
        channel.receive_gone_since.set(Some(Instant::now()));
    }
    let Some(waited) = waited else {
        tracing::debug!(connection = %session.caller.connection_id, "a long poll was abandoned");
        return None;
    };
    Some(match waited {
        // A newer poll took over.
        Some(None) => answer(204, b"", keep_alive),
        // Nothing to send within the poll timeout.
        Some(Some(Err(_))) => answer(200, b"", keep_alive),
        Some(Some(Ok(Some(taken)))) => {
            let body = if frames.is_empty() {
                copied
            } else {
                frames.concat()
            };
            session.sent(taken);
            answer(200, &body, keep_alive)
        }
        // Closed and flushed, or stopped: the connection is over.
        Some(Some(Ok(None))) | None => {
            channel::dispose(state, &channel);
            answer(204, b"", keep_alive)
        }
    })
}

/// `DELETE`: the client ends its long-polling connection (`202`); a pending poll
/// answers `204`.
pub fn delete(state: &Rc<ShardState>, head: &RequestHead, hub: &str) -> Vec<u8> {
    let keep_alive = head.keep_alive();
    let (token, claims) = match channel::identify(state, head) {
        Ok(found) => found,
        Err(refusal) => return refusal,
    };
    match channel::existing(state, hub, &token, claims.as_ref(), Kind::LongPolling) {
        Some(Ok(channel)) => {
            channel
                .session
                .ending(crate::session::EndReason::ClientClosed);
            channel::dispose(state, &channel);
            text_response(202, "", keep_alive)
        }
        Some(Err(Refused::OtherTransport)) => text_response(
            400,
            "Cannot terminate this connection using the DELETE endpoint.",
            keep_alive,
        ),
        Some(Err(refused)) => refused.response(keep_alive),
        None => Refused::Unknown.response(keep_alive),
    }
}
