//! SignalR negotiate: a connection id and a token that a transport request redeems.

use std::time::Instant;

use ringhub_protocol::http::{self as wire, Negotiation, RequestHead};

use crate::node::{Negotiated, NEGOTIATION_TTL};
use crate::shard::state::ShardState;
use crate::transport::{authenticate, random_id};

/// Answers `POST /hubs/{hub}/negotiate`.
pub fn negotiate(state: &ShardState, head: &RequestHead, hub: &str) -> Vec<u8> {
    if let Err(refusal) = authenticate(&state.node, head) {
        return refusal;
    }
    let json =
        |body: Vec<u8>| wire::response(200, "application/json", &[], &body, head.keep_alive());
    let Some(version) = wire::negotiate_version(head) else {
        return json(wire::negotiate_error_body(
            "negotiateVersion must be a number.",
        ));
    };
    let connection_id = random_id();
    let token = if version >= 1 {
        random_id()
    } else {
        connection_id.clone()
    };
    let body = Negotiation {
        negotiate_version: version,
        connection_id: &connection_id,
        connection_token: &token,
        // Stateful reconnect is not offered yet: never claim it.
        use_stateful_reconnect: false,
    }
    .body();
    let now = Instant::now();
    let mut pending = state
        .node
        .negotiations
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    pending.retain(|_, n| now - n.created < NEGOTIATION_TTL);
    pending.insert(
        token,
        Negotiated {
            connection_id,
            hub: hub.to_owned(),
            created: now,
        },
    );
    json(body)
}

/// The connection id a token was negotiated for (the token is used up), if it is
/// known, for this hub, and not expired.
pub fn redeem(state: &ShardState, hub: &str, token: &str) -> Option<String> {
    let mut pending = state
        .node
        .negotiations
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    match pending.remove(token) {
        Some(n) if n.hub == hub && n.created.elapsed() < NEGOTIATION_TTL => Some(n.connection_id),
        _ => None,
    }
}
