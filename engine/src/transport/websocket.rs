//! The WebSocket transport: the upgrade, the SignalR handshake, then a session whose
//! frames are read here and written by the writer task (`io::write_loop`).

use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use monoio::io::{OwnedReadHalf, OwnedWriteHalf};
use monoio::net::TcpStream;
use ringhub_protocol::frame::{self, Framing};
use ringhub_protocol::handshake;
use ringhub_protocol::http::{self as wire, RequestHead};
use ringhub_protocol::ws::{self, close_code, FrameDecoder, WsEvent, WsLimits};
use ringhub_protocol::HubProtocol;

use crate::api::Caller;
use crate::auth::Claims;
use crate::fanout::FrameKind;
use crate::metrics::ShardMetrics;
use crate::session::{Session, CLOSE_GRACE};
use crate::shard::dispatch::{self, BadInput, Dispatched};
use crate::shard::state::ShardState;
use crate::shard::tokens::Token;
use crate::transport::io::{
    read_more, read_up_to, write_loop, write_now, ReadSize, MIN_READ_CHUNK,
};
use crate::transport::{authenticate, negotiate, random_id};

/// SignalR's handshake timeout (every transport's).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// The WebSocket layer streams payloads (hub messages are bounded on their own), so
/// this only stops absurd single messages.
const MAX_WS_MESSAGE: usize = 64 << 20;

/// An accepted upgrade request, before the answer is written.
pub struct Upgrade {
    accept: String,
    hub: String,
    connection_id: String,
    claims: Option<Claims>,
    /// The negotiate token it redeemed (freed when the session ends).
    token: Option<String>,
}

/// Checks an upgrade request: the WebSocket headers, the access token, the negotiate
/// token (`?id=`, or a new connection without one). `Err` is the answer to close with.
pub fn upgrade(state: &ShardState, head: &RequestHead, hub: &str) -> Result<Upgrade, Vec<u8>> {
    let accept = match head.websocket_accept() {
        Ok(a) => a,
        Err(e) => {
            let extra: &[(&str, &str)] = if e.status() == 426 {
                &[("Sec-WebSocket-Version", "13")]
            } else {
                &[]
            };
            return Err(wire::response(
                e.status(),
                "text/plain",
                extra,
                e.to_string().as_bytes(),
                false,
            ));
        }
    };
    let claims = authenticate(&state.node, head)?;
    let token = head.query_param("id");
    let connection_id = match &token {
        None => random_id(),
        Some(token) => {
            let user_id = state.node.user_ids.user_id(claims.as_ref());
            negotiate::redeem(state, hub, token, user_id.as_deref(), |_, _| {
                Token::WebSocket
            })
            .map_err(|refused| refused.response(false))?
        }
    };
    Ok(Upgrade {
        accept,
        hub: hub.to_owned(),
        connection_id,
        claims,
        token,
    })
}

/// What reading a WebSocket produced besides hub bytes.
#[derive(Default)]
struct Pumped {
    pongs: Vec<Bytes>,
    closed: bool,
    /// A framing error after the events before it; those still count (a handshake
    /// and messages that arrived in the same read are handled before the close).
    error: Option<ws::WsError>,
}

/// Moves every complete WebSocket event out of `input`: data into `hub_bytes`,
/// pings answered (as pongs to send), a close noted, the first error kept.
fn pump(decoder: &mut FrameDecoder, input: &mut BytesMut, hub_bytes: &mut BytesMut) -> Pumped {
    let mut pumped = Pumped::default();
    loop {
        match decoder.decode(input) {
            Ok(Some(WsEvent::Data { payload, .. })) => hub_bytes.extend_from_slice(&payload),
            Ok(Some(WsEvent::Ping(payload))) => pumped
                .pongs
                .push(ws::encode_frame(ws::Opcode::Pong, &payload)),
            Ok(Some(WsEvent::Pong(_))) => {}
            Ok(Some(WsEvent::Close(_))) => {
                pumped.closed = true;
                break;
            }
            Ok(None) => break,
            Err(e) => {
                pumped.error = Some(e);
                break;
            }
        }
    }
    pumped
}

/// The negotiated protocol, and a framing error met after the handshake record (the
/// messages before it still count).
struct Handshaken {
    protocol: HubProtocol,
    /// What else the read that brought the handshake held: a framing error after it,
    /// or the client's close (messages before either still count).
    then: Pumped,
}

/// The WebSocket upgrade answer and the SignalR handshake; `None` if the connection
/// ended there (an error answer was sent when there was one to give).
async fn take_handshake(
    state: &ShardState,
    reader: &mut OwnedReadHalf<TcpStream>,
    writer: &mut OwnedWriteHalf<TcpStream>,
    upgrade: &Upgrade,
    input: &mut BytesMut,
    decoder: &mut FrameDecoder,
    hub_bytes: &mut BytesMut,
) -> Option<Handshaken> {
    write_now(writer, wire::upgrade_response(&upgrade.accept))
        .await
        .ok()?;
    let max_message = state.node.config.max_message_bytes;
    // The handshake: the first record, JSON for both protocols.
    let handshake = monoio::time::timeout(HANDSHAKE_TIMEOUT, async {
        loop {
            let mut pumped = pump(decoder, input, hub_bytes);
            for pong in std::mem::take(&mut pumped.pongs) {
                write_now(writer, pong).await.map_err(|e| e.to_string())?;
            }
            match handshake::parse_request(hub_bytes, max_message) {
                Ok(Some((request, used))) => return Ok((request, used, pumped)),
                Ok(None) => {}
                Err(e) => return Err(e.response_text().to_owned()),
            }
            if let Some(error) = pumped.error {
                return Err(error.to_string());
            }
            if pumped.closed {
                return Err("closed".to_owned());
            }
            if !read_more(reader, input).await.unwrap_or(false) {
                return Err("closed".to_owned());
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err(handshake::CANCELED.to_owned()));
    match handshake.and_then(|(request, used, then)| {
        let protocol = request.select()?;
        hub_bytes.advance(used);
        Ok(Handshaken { protocol, then })
    }) {
        Ok(handshaken) => Some(handshaken),
        Err(error) => {
            if error != "closed" {
                ShardMetrics::add(&state.metrics().protocol_errors, 1);
                let mut answer = BytesMut::new();
                answer.extend_from_slice(&ws::encode_frame(
                    ws::Opcode::Text,
                    &handshake::error_response(&error),
                ));
                answer.extend_from_slice(&ws::encode_close(close_code::NORMAL, ""));
                let _ = write_now(writer, answer.freeze()).await;
            }
            None
        }
    }
}

/// Runs a WebSocket session to its end, then frees its token.
pub async fn run(
    state: Rc<ShardState>,
    reader: OwnedReadHalf<TcpStream>,
    writer: OwnedWriteHalf<TcpStream>,
    input: BytesMut,
    upgrade: Box<Upgrade>,
) {
    let token = upgrade.token.clone();
    run_session(&state, reader, writer, input, upgrade).await;
    if let Some(token) = token {
        state.tokens.remove(&token);
    }
}

async fn run_session(
    state: &Rc<ShardState>,
    mut reader: OwnedReadHalf<TcpStream>,
    mut writer: OwnedWriteHalf<TcpStream>,
    mut input: BytesMut,
    upgrade: Box<Upgrade>,
) {
    let mut decoder = FrameDecoder::new(WsLimits {
        max_message_bytes: MAX_WS_MESSAGE,
    });
    let mut hub_bytes = BytesMut::new();
    // Boxed: the handshake's state is large and needed once; the task keeps only what a
    // connected session needs for the rest of its life.
    let handshaken = Box::pin(take_handshake(
        state,
        &mut reader,
        &mut writer,
        &upgrade,
        &mut input,
        &mut decoder,
        &mut hub_bytes,
    ))
    .await;
    let Some(Handshaken { protocol, then }) = handshaken else {
        return;
    };
    let kind = FrameKind {
        protocol,
        framing: Framing::WebSocket,
    };
    let caller = Rc::new(Caller {
        user_id: state.node.user_ids.user_id(upgrade.claims.as_ref()),
        connection_id: upgrade.connection_id,
        hub: upgrade.hub,
        claims: upgrade.claims,
    });
    let session = state.new_session(caller.clone(), kind);
    // Registered (and in its durable groups) before the client learns it is connected,
    // so that whatever the client or its backend does next already finds it. Frames
    // sent to it meanwhile wait in its queue until the writer starts.
    state.register(session.clone());
    if Box::pin(write_now(
        &mut writer,
        frame::encode_raw(protocol, handshake::OK_RESPONSE),
    ))
    .await
    .is_err()
    {
        state.unregister(&session);
        return;
    }
    monoio::spawn(write_loop(session.clone(), writer));
    let context = state.context_of(&session);
    state.hub.on_connected(&caller, &context).await;
    state.drain_inbox();
    tracing::debug!(connection = %caller.connection_id, hub = %caller.hub, ?protocol, "connected");

    let end = read_loop(
        state,
        &session,
        &mut reader,
        decoder,
        input,
        hub_bytes,
        then,
    )
    .await;
    match end {
        SessionEnd::ClientLeft => session.stop_now(),
        SessionEnd::ClientClosed | SessionEnd::Stopped => session.close(None, false),
        SessionEnd::BadInput(bad) => {
            ShardMetrics::add(&state.metrics().protocol_errors, 1);
            tracing::debug!(connection = %caller.connection_id, "closing on bad input: {}", bad.message);
            session.close_with_code(Some(&bad.message), false, bad.close_code);
        }
    }
    state.unregister(&session);
    state.hub.on_disconnected(&caller, &context).await;
    // Unregistered, the session is no longer on the shard's timer: the close grace is
    // kept here, so a peer that reads nothing cannot keep the socket open.
    if monoio::time::timeout(CLOSE_GRACE, session.stop.fired())
        .await
        .is_err()
    {
        session.stop_now();
    }
    tracing::debug!(connection = %caller.connection_id, "disconnected");
}

enum SessionEnd {
    /// The socket ended without a close.
    ClientLeft,
    /// A WebSocket close frame or a SignalR Close message.
    ClientClosed,
    /// The server ended it (shutdown, slow consumer, timeout).
    Stopped,
    BadInput(BadInput),
}

async fn read_loop(
    state: &Rc<ShardState>,
    session: &Rc<Session>,
    reader: &mut OwnedReadHalf<TcpStream>,
    mut decoder: FrameDecoder,
    mut input: BytesMut,
    mut hub_bytes: BytesMut,
    early: Pumped,
) -> SessionEnd {
    let mut framing_error = early.error;
    let mut client_closed = early.closed;
    let mut read_size = ReadSize(MIN_READ_CHUNK);
    let stop = session.stop.watch();
    loop {
        match dispatch::handle_records(state, session, &mut hub_bytes).await {
            Dispatched::More => {}
            Dispatched::ClientClosed => return SessionEnd::ClientClosed,
            Dispatched::BadInput(bad) => return SessionEnd::BadInput(bad),
        }
        if client_closed && framing_error.is_none() {
            return SessionEnd::ClientClosed;
        }
        if let Some(error) = framing_error.take() {
            let code = error.close_code();
            return SessionEnd::BadInput(BadInput::new(error, code));
        }
        if session.closing_since().is_some() || session.stop.is_fired() {
            return SessionEnd::Stopped;
        }
        // Everything read was used: after a burst, give the large buffer back, so that
        // a quiet connection waits with a small one.
        if input.is_empty() && input.capacity() > 2 * read_size.0 {
            input = BytesMut::new();
        }
        let Some(read) = stop.run(read_up_to(reader, &mut input, read_size.0)).await else {
            return SessionEnd::Stopped;
        };
        match read {
            Ok(got) if got > 0 => {
                read_size.adapt(got);
                session.last_received.set(Instant::now());
            }
            _ => return SessionEnd::ClientLeft,
        }
        let pumped = pump(&mut decoder, &mut input, &mut hub_bytes);
        for pong in pumped.pongs {
            session.enqueue(&pong, None);
        }
        framing_error = pumped.error;
        client_closed = pumped.closed;
    }
}
