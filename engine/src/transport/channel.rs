//! What Server-Sent Events and long polling share: finding a token's channel for a
//! request, a new channel's session, the POST send path (the handshake first), and the
//! end of a channel.

use std::rc::Rc;
use std::time::Instant;

use bytes::Buf;
use ringhub_protocol::frame::{self, Framing};
use ringhub_protocol::handshake;
use ringhub_protocol::http::RequestHead;
use ringhub_protocol::HubProtocol;

use crate::api::Caller;
use crate::fanout::FrameKind;
use crate::metrics::ShardMetrics;
use crate::shard::dispatch::{self, Dispatched};
use crate::shard::state::ShardState;
use crate::shard::tokens::{HttpChannel, Token};
use crate::transport::authenticate;
use crate::transport::negotiate::{self, Refused};

/// The refusal of a handshake that asks for a binary protocol over Server-Sent Events.
const TEXT_ONLY: &str = "Cannot use the 'messagepack' protocol on the current transport. The transport does not support 'Binary' transfer format.";

/// The token in `?id=` and the user of the request, or the answer that refuses it.
pub fn identify(
    state: &ShardState,
    head: &RequestHead,
) -> Result<(String, Option<crate::auth::Claims>), Vec<u8>> {
    let claims = authenticate(&state.node, head)?;
    let token = head
        .query_param("id")
        .ok_or_else(|| Refused::NoId.response(head.keep_alive()))?;
    Ok((token, claims))
}

/// Which kind of channel a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    ServerSentEvents,
    LongPolling,
    /// A POST: the send channel of either.
    Either,
}

/// The channel of `token` for a request by `claims`' user, checked to be of the
/// `expected` kind and to belong to that user.
pub fn existing(
    state: &ShardState,
    hub: &str,
    token: &str,
    claims: Option<&crate::auth::Claims>,
    expected: Kind,
) -> Option<Result<Rc<HttpChannel>, Refused>> {
    let channel = state.tokens.channel(token)?;
    let caller = &channel.session.caller;
    let kind = if channel.long_polling {
        Kind::LongPolling
    } else {
        Kind::ServerSentEvents
    };
    Some(if caller.hub != hub {
        Err(Refused::Unknown)
    } else if caller.user_id != state.node.user_ids.user_id(claims) {
        Err(Refused::OtherUser)
    } else if expected != Kind::Either && expected != kind {
        Err(Refused::OtherTransport)
    } else {
        Ok(channel)
    })
}

/// Starts a channel on a negotiated token: its session exists (not yet registered:
/// that waits for the handshake, which arrives by POST).
pub fn start(
    state: &Rc<ShardState>,
    hub: &str,
    token: &str,
    claims: Option<crate::auth::Claims>,
    client_query: Option<Box<str>>,
    long_polling: bool,
) -> Result<Rc<HttpChannel>, Refused> {
    let user_id = state.node.user_ids.user_id(claims.as_ref());
    let slot = negotiate::session_slot(state)?;
    let mut created = None;
    negotiate::redeem(
        state,
        hub,
        token,
        user_id.as_deref(),
        |connection_id, early| {
            let caller = Rc::new(Caller {
                connection_id: connection_id.to_owned(),
                hub: hub.to_owned(),
                user_id: user_id.clone(),
                claims,
                client_query,
            });
            let framing = if long_polling {
                Framing::Raw
            } else {
                Framing::ServerSentEvents
            };
            let session = state.new_session(
                caller,
                FrameKind {
                    protocol: HubProtocol::Json,
                    framing,
                },
                None,
                Some(slot),
            );
            let has_early_input = !early.is_empty();
            let channel = Rc::new(HttpChannel::new(
                token.to_owned(),
                session,
                long_polling,
                early,
            ));
            if has_early_input {
                // What was POSTed before (a handshake, often) is handled now.
                let (state, channel) = (state.clone(), channel.clone());
                monoio::spawn(async move { send(&state, &channel, &[], None).await });
            }
            created = Some(channel.clone());
            Token::Http(channel)
        },
    )
    .map_err(|refused| match refused {
        // A WebSocket has it: this request asks for another transport.
        Refused::Active => Refused::OtherTransport,
        other => other,
    })?;
    created.ok_or(Refused::Unknown)
}

/// A `POST` on the send channel: the bytes are hub messages (the handshake first).
/// Returns the status to answer with.
pub async fn send(
    state: &Rc<ShardState>,
    channel: &Rc<HttpChannel>,
    body: &[u8],
    remote: Option<std::net::SocketAddr>,
) -> u16 {
    let session = &channel.session;
    if channel.disposed.get() {
        return 404;
    }
    let mut input = channel.input.lock().await;
    input.extend_from_slice(body);
    session.last_received.set(Instant::now());
    if !channel.connected.get() {
        let max_message = state.node.config.max_message_bytes;
        let refusal = match handshake::parse_request(&input, max_message) {
            Ok(None) => return 200,
            Ok(Some((request, used))) => match request.select() {
                Ok(HubProtocol::MessagePack) if session.framing == Framing::ServerSentEvents => {
                    Some(TEXT_ONLY.to_owned())
                }
                Ok(protocol) => {
                    input.advance(used);
                    connect(state, channel, protocol, remote).await;
                    None
                }
                Err(error) => Some(error),
            },
            Err(e) => Some(e.response_text().to_owned()),
        };
        if let Some(refusal) = refusal {
            ShardMetrics::add(&state.metrics().protocol_errors, 1);
            let answer = handshake::error_response(&refusal);
            session.end_with(vec![frame::frame_raw(
                HubProtocol::Json,
                session.framing,
                &answer,
            )]);
            return 200;
        }
    }
    match dispatch::handle_records(state, session, &mut input).await {
        Dispatched::More => {}
        Dispatched::ClientClosed => {
            session.ending(crate::session::EndReason::ClientClosed);
            session.close(None, false);
        }
        Dispatched::BadInput(bad) => {
            ShardMetrics::add(&state.metrics().protocol_errors, 1);
            session.ending(crate::session::EndReason::BadInput);
            session.close(Some(&bad.message), false);
        }
    }
    200
}

/// The handshake succeeded: answer it, register the session, tell the hub.
async fn connect(
    state: &Rc<ShardState>,
    channel: &Rc<HttpChannel>,
    protocol: HubProtocol,
    remote: Option<std::net::SocketAddr>,
) {
    let session = &channel.session;
    session.set_protocol(protocol);
    session.enqueue_untracked(&frame::frame_raw(
        protocol,
        session.framing,
        handshake::OK_RESPONSE,
    ));
    channel.connected.set(true);
    state.register(session.clone()).await;
    let transport = if channel.long_polling {
        "long polling"
    } else {
        "server-sent events"
    };
    state.announce(session, transport, remote).await;
}

/// Ends a channel once: its token is freed, its session stops and leaves its groups.
pub fn dispose(state: &Rc<ShardState>, channel: &Rc<HttpChannel>) {
    if channel.disposed.replace(true) {
        return;
    }
    state.tokens.remove(&channel.token);
    let session = &channel.session;
    session.stop_now();
    if let Some(poll) = channel.pending_poll.borrow_mut().take() {
        poll.fire();
    }
    if channel.connected.get() {
        monoio::spawn(state.end(session));
    }
}
