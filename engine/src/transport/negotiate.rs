//! SignalR negotiate: a connection id and a token that a transport request redeems.
//! The token is kept by this shard and names it, so later requests find it here.

use bytes::BytesMut;
use ringhub_protocol::http::{self as wire, Negotiation, RequestHead};

use crate::backplane::{Outgoing, SharedToken};
use crate::quota::Share;
use crate::shard::inbox::Command;
use crate::shard::state::ShardState;
use crate::shard::tokens::{new_token, Negotiated, Token};
use crate::transport::{authenticate, random_id, text_response};

/// Answers `POST /hubs/{hub}/negotiate`.
pub fn negotiate(state: &ShardState, head: &RequestHead, hub: &str) -> Vec<u8> {
    let claims = match authenticate(&state.node, head) {
        Ok(claims) => claims,
        Err(refusal) => return refusal,
    };
    let json =
        |body: Vec<u8>| wire::response(200, "application/json", &[], &body, head.keep_alive());
    let Some(version) = wire::negotiate_version(head) else {
        return json(wire::negotiate_error_body(
            "negotiateVersion must be a number.",
        ));
    };
    // Bounded, as tokens live for the disconnect timeout and negotiates are free.
    let Some(slot) = state.node.negotiations.try_take(1) else {
        return Refused::Busy("Too many connections are being negotiated; try again shortly.")
            .response(head.keep_alive());
    };
    // The session will live on the next shard in turn: whichever shard the client's
    // transport requests reach, they are handed to that one.
    let owner = state.node.next_owner();
    let token = new_token(owner, &random_id());
    // Version 0 clients use the connection id as the token.
    let connection_id = if version >= 1 {
        random_id()
    } else {
        token.clone()
    };
    // Offered whenever the client asks (contract section 10); a client that did not ask
    // must not be told (the JS client then refuses the connection).
    let stateful_reconnect =
        version >= 1 && head.query_param("useStatefulReconnect").as_deref() == Some("true");
    let body = Negotiation {
        negotiate_version: version,
        connection_id: &connection_id,
        connection_token: &token,
        use_stateful_reconnect: stateful_reconnect,
    }
    .body();
    let shared = SharedToken {
        hub: hub.to_owned(),
        connection_id,
        user_id: state.node.user_ids.user_id(claims.as_ref()),
        stateful_reconnect,
    };
    if let Some(link) = &state.node.backplane {
        // Any node of the cluster may get the WebSocket: it finds the token in Redis.
        link.send(Outgoing::SaveToken {
            token: token.clone(),
            negotiated: shared.encode(),
        });
    }
    let negotiated = Negotiated::new(shared, slot);
    if owner == state.index {
        state.tokens.insert(token, Token::Negotiated(negotiated));
    } else {
        // Queued before the answer is written, so before any request with the token:
        // the owner finds it in its inbox at the latest (see `redeem`).
        state.node.inboxes[owner].push(Command::Negotiated { token, negotiated });
    }
    json(body)
}

/// In a cluster: a connection's first request (a WebSocket, an SSE stream, a first
/// poll or send) whose token this node does not know may carry a token another node
/// negotiated. It is taken from Redis (once: the first node to ask gets it) and kept
/// here as if negotiated here. So a proxy need not send negotiate to the node that then
/// serves the connection: SSE and long polling only need every request of a
/// connection on one node (hashing `id` does it).
pub async fn find_in_cluster(state: &ShardState, head: &RequestHead) {
    let Some(link) = &state.node.backplane else {
        return;
    };
    let for_a_hub = super::HubEndpoint::of(&state.node.hub_routes, head).is_some();
    if !matches!(head.method.as_str(), "GET" | "POST") || !for_a_hub {
        return;
    }
    let Some(token) = head.query_param("id") else {
        return;
    };
    if is_known(state, &token) {
        return;
    }
    let Some(found) = link.fetch_token(&token).await else {
        return;
    };
    let Ok(shared) = SharedToken::decode(found) else {
        tracing::warn!("a malformed token was found in Redis");
        return;
    };
    // Counted like one negotiated here (none left: the request finds no token, 404).
    let Some(slot) = state.node.negotiations.try_take(1) else {
        return;
    };
    state
        .tokens
        .insert(token, Token::Negotiated(Negotiated::new(shared, slot)));
}

/// Whether this shard knows the token, counting one that is still in its inbox, sent by
/// the shard that negotiated it (taken from there now).
pub fn is_known(state: &ShardState, token: &str) -> bool {
    let known = |state: &ShardState| state.tokens.with(token, |entry| entry.is_some());
    if known(state) {
        return true;
    }
    state.drain_inbox();
    known(state)
}

/// Why a transport request cannot use a token, as ASP.NET Core answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `400`: no `id` in the query.
    NoId,
    /// `404`: unknown, expired, ended, or for another hub.
    Unknown,
    /// `403`: negotiated by another user.
    OtherUser,
    /// `409`: its transport is already running.
    Active,
    /// `400`: it was started with another transport.
    OtherTransport,
    /// `413`: more bytes POSTed before the first receive request than a session may
    /// keep (`--max-message-bytes`).
    TooMuchEarlyInput(usize),
    /// `503`: the node is at one of its limits (sessions, pending negotiations, early
    /// input): the client should try again later.
    Busy(&'static str),
}

impl Refused {
    pub fn response(self, keep_alive: bool) -> Vec<u8> {
        let too_much;
        let (status, text) = match self {
            Refused::NoId => (400, "Connection ID required"),
            Refused::Unknown => (404, "No Connection with that ID"),
            Refused::OtherUser => (403, "Forbidden"),
            Refused::Active => (409, "Connection is already in use by another transport."),
            Refused::OtherTransport => (400, "Cannot change transports mid-connection"),
            Refused::TooMuchEarlyInput(limit) => {
                too_much = format!(
                    "More than {limit} bytes were sent before the connection's first receive request."
                );
                (413, too_much.as_str())
            }
            Refused::Busy(why) => (503, why),
        };
        text_response(status, text, keep_alive)
    }
}

/// A negotiated token taken by a transport.
pub struct Redeemed {
    pub connection_id: String,
    /// Negotiate offered stateful reconnect.
    pub stateful_reconnect: bool,
}

/// A place for a new session among the node's (`--max-connections`), or the answer
/// that refuses it.
pub fn session_slot(state: &ShardState) -> Result<Share, Refused> {
    state.node.sessions.try_take(1).ok_or(Refused::Busy(
        "The server is at its limit of connections (--max-connections); try again later.",
    ))
}

/// Takes a negotiated token for a new transport: its connection id, once the token is
/// known, for this hub, unexpired, and presented by the user who negotiated it. The
/// token then stands for `started` (what the transport keeps there).
pub fn redeem(
    state: &ShardState,
    hub: &str,
    token: &str,
    user_id: Option<&str>,
    started: impl FnOnce(&str, BytesMut) -> Token,
) -> Result<Redeemed, Refused> {
    with_negotiated(state, hub, token, user_id, |entry| {
        let Token::Negotiated(n) = entry else {
            return Err(Refused::Unknown);
        };
        let redeemed = Redeemed {
            connection_id: n.connection_id.clone(),
            stateful_reconnect: n.stateful_reconnect,
        };
        let early_input = std::mem::take(&mut n.early_input);
        *entry = started(&redeemed.connection_id, early_input);
        Ok(redeemed)
    })
}

/// Keeps bytes POSTed to a negotiated token before its transport started: at most
/// `--max-message-bytes` per token (a handshake fits), within the node's budget for
/// such bytes. They are handled once the transport starts.
pub fn keep_early_input(
    state: &ShardState,
    hub: &str,
    token: &str,
    user_id: Option<&str>,
    body: &[u8],
) -> Result<(), Refused> {
    let limit = state.node.config.max_message_bytes;
    let budget = &state.node.early_input;
    with_negotiated(state, hub, token, user_id, |entry| {
        let Token::Negotiated(n) = entry else {
            return Err(Refused::Unknown);
        };
        if n.early_input.len() + body.len() > limit {
            return Err(Refused::TooMuchEarlyInput(limit));
        }
        let kept = match &mut n.early_share {
            Some(share) => share.try_grow(body.len()),
            None => budget
                .try_take(body.len())
                .map(|share| n.early_share = Some(share))
                .is_some(),
        };
        if !kept {
            return Err(Refused::Busy(
                "The server holds too much input for connections not started yet; try again shortly.",
            ));
        }
        n.early_input.extend_from_slice(body);
        Ok(())
    })
}

/// Runs `f` on a token that is negotiated (not yet used by a transport), known, for
/// this hub, unexpired, and presented by the user who negotiated it.
fn with_negotiated<R>(
    state: &ShardState,
    hub: &str,
    token: &str,
    user_id: Option<&str>,
    f: impl FnOnce(&mut Token) -> Result<R, Refused>,
) -> Result<R, Refused> {
    let ttl = state.node.config.disconnect_timeout;
    is_known(state, token);
    state.tokens.with(token, |entry| {
        let Some(entry) = entry else {
            return Err(Refused::Unknown);
        };
        match entry {
            Token::Negotiated(n) if n.hub != hub || n.created.elapsed() >= ttl => {
                Err(Refused::Unknown)
            }
            Token::Negotiated(n) if n.user_id.as_deref() != user_id => Err(Refused::OtherUser),
            Token::Negotiated(_) => f(entry),
            Token::WebSocket | Token::Resumable(_) => Err(Refused::Active),
            Token::Http(_) => Err(Refused::OtherTransport),
        }
    })
}
