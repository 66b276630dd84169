//! The WebSocket transport: the upgrade, the SignalR handshake, then a session whose
//! frames are read here and written by the shard's flush pass (`flush`).

use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::future::Either;
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
use crate::quota::Share;
use crate::session::{EndReason, Session, CLOSE_GRACE};
use crate::shard::dispatch::{self, BadInput, Dispatched};
use crate::shard::inbox::ConnectionOp;
use crate::shard::state::ShardState;
use crate::shard::tokens::{Attach, Resumable, Token};
use crate::transport::io::{read_more, read_up_to, write_now, ReadSize, Writer, MIN_READ_CHUNK};
use crate::transport::negotiate::Refused;
use crate::transport::{authenticate, client_query, negotiate, random_id};

/// SignalR's handshake timeout (every transport's).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// The WebSocket layer streams payloads (hub messages are bounded on their own), so
/// this only stops absurd single messages.
const MAX_WS_MESSAGE: usize = 64 << 20;

/// An accepted upgrade request, before the answer is written.
pub struct Upgrade {
    accept: String,
    claims: Option<Claims>,
    kind: UpgradeKind,
}

enum UpgradeKind {
    /// A new session.
    New {
        hub: String,
        connection_id: String,
        /// The negotiate token it redeemed (freed when the session ends).
        token: Option<String>,
        /// Negotiate offered stateful reconnect (the handshake decides).
        stateful_reconnect: bool,
        /// Its place among the node's sessions.
        slot: Share,
        client_query: Option<Box<str>>,
    },
    /// A new WebSocket for a session whose previous one dropped (stateful reconnect).
    Resume(Rc<Resumable>),
}

/// Checks an upgrade request: the WebSocket headers, the access token, the negotiate
/// token (`?id=`, or a new connection without one), or the token of a session to
/// resume. `Err` is the answer to close with.
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
    let user_id = state.node.user_ids.user_id(claims.as_ref());
    if let Some(token) = &token {
        if let Some(resumable) = resumable(state, hub, token, user_id.as_deref())? {
            return Ok(Upgrade {
                accept,
                claims,
                kind: UpgradeKind::Resume(resumable),
            });
        }
    }
    let slot = negotiate::session_slot(state).map_err(|refused| refused.response(false))?;
    let (connection_id, stateful_reconnect) = match &token {
        None => (random_id(), false),
        Some(token) => {
            let redeemed = negotiate::redeem(state, hub, token, user_id.as_deref(), |_, _| {
                Token::WebSocket
            })
            .map_err(|refused| refused.response(false))?;
            (redeemed.connection_id, redeemed.stateful_reconnect)
        }
    };
    Ok(Upgrade {
        accept,
        claims,
        kind: UpgradeKind::New {
            hub: hub.to_owned(),
            connection_id,
            token,
            stateful_reconnect,
            slot,
            client_query: client_query(&state.node, head),
        },
    })
}

/// The session a token names if it waits for (or may take) a new WebSocket: the
/// request must be for its hub and from its user (`403`, as on connect); once the
/// session cannot be resumed (its replay buffer overflowed) it is refused with `404`
/// and ended, and the client connects anew.
fn resumable(
    state: &ShardState,
    hub: &str,
    token: &str,
    user_id: Option<&str>,
) -> Result<Option<Rc<Resumable>>, Vec<u8>> {
    let found = state.tokens.with(token, |entry| match entry {
        Some(Token::Resumable(resumable)) => Some(resumable.clone()),
        _ => None,
    });
    let Some(resumable) = found else {
        return Ok(None);
    };
    let session = &resumable.session;
    let refused = |refusal: Refused| {
        ShardMetrics::add(&state.metrics().resumes_refused, 1);
        Err(refusal.response(false))
    };
    if session.caller.hub != hub {
        return refused(Refused::Unknown);
    }
    if session.caller.user_id.as_deref() != user_id {
        return refused(Refused::OtherUser);
    }
    if !session.can_resume() || session.closing_since().is_some() {
        tracing::debug!(connection = %session.caller.connection_id, "resume refused: too much was unacknowledged");
        session.stop_now();
        return refused(Refused::Unknown);
    }
    Ok(Some(resumable))
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
    /// The hub protocol version the client asked for (2: stateful reconnect).
    version: u64,
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
    accept: &str,
    input: &mut BytesMut,
    decoder: &mut FrameDecoder,
    hub_bytes: &mut BytesMut,
) -> Option<Handshaken> {
    write_now(writer, wire::upgrade_response(accept))
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
        Ok(Handshaken {
            protocol,
            version: request.version,
            then,
        })
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
#[allow(clippy::manual_async_fn)] // on purpose: see `run_session`
pub fn run(
    state: Rc<ShardState>,
    reader: OwnedReadHalf<TcpStream>,
    writer: OwnedWriteHalf<TcpStream>,
    input: BytesMut,
    upgrade: Upgrade,
) -> impl std::future::Future<Output = ()> {
    // This task lives as long as the connection, and whatever it holds across the
    // session's awaits is memory every idle connection pays for: the upgrade is split
    // without an await, and the task is the session's own future, not one wrapping it
    // (a wrapper keeps its captured sockets and buffer as dead weight; see
    // `run_session`).
    let (reader, writer) = Writer::new(reader, writer);
    match start(upgrade) {
        Start::Resume(resume) => Either::Left(hand_to_session(reader, writer, input, resume)),
        Start::New(new) => {
            Either::Right(run_session(state, Carrier::new(reader, input), writer, new))
        }
    }
}

/// Answers a resume's upgrade here; the session's own task takes the socket from there
/// (no handshake on a resumed connection: the Sequence message comes first).
#[allow(clippy::manual_async_fn)] // on purpose: see `run_session`
fn hand_to_session(
    reader: OwnedReadHalf<TcpStream>,
    mut writer: Writer,
    input: BytesMut,
    resume: Box<Resume>,
) -> impl std::future::Future<Output = ()> {
    async move {
        let Resume {
            resumable,
            accept,
            claims,
        } = *resume;
        if write_now(writer.half(), wire::upgrade_response(&accept))
            .await
            .is_ok()
        {
            resumable.offer(Attach {
                reader,
                writer,
                input,
                claims,
            });
        }
    }
}

/// What an upgrade starts.
enum Start {
    New(Box<NewSession>),
    Resume(Box<Resume>),
}

struct Resume {
    resumable: Rc<Resumable>,
    accept: String,
    claims: Option<Claims>,
}

fn start(upgrade: Upgrade) -> Start {
    let Upgrade {
        accept,
        claims,
        kind,
    } = upgrade;
    match kind {
        UpgradeKind::Resume(resumable) => Start::Resume(Box::new(Resume {
            resumable,
            accept,
            claims,
        })),
        UpgradeKind::New {
            hub,
            connection_id,
            token,
            stateful_reconnect,
            slot,
            client_query,
        } => Start::New(Box::new(NewSession {
            accept,
            claims,
            hub,
            connection_id,
            token,
            stateful_reconnect,
            slot,
            client_query,
        })),
    }
}

/// An upgrade for a new session.
struct NewSession {
    accept: String,
    claims: Option<Claims>,
    hub: String,
    connection_id: String,
    token: Option<String>,
    stateful_reconnect: bool,
    slot: Share,
    client_query: Option<Box<str>>,
}

/// What one WebSocket carrying a session reads from.
struct Carrier {
    reader: OwnedReadHalf<TcpStream>,
    decoder: FrameDecoder,
    input: BytesMut,
    hub_bytes: BytesMut,
    /// What the read before the carrier started held besides hub bytes.
    early: Pumped,
}

impl Carrier {
    fn new(reader: OwnedReadHalf<TcpStream>, input: BytesMut) -> Carrier {
        Carrier {
            reader,
            decoder: FrameDecoder::new(WsLimits {
                max_message_bytes: MAX_WS_MESSAGE,
            }),
            input,
            hub_bytes: BytesMut::new(),
            early: Pumped::default(),
        }
    }
}

/// A new session's whole life. Not an `async fn`: an async fn's future keeps its
/// arguments twice (as passed and as locals), an `async move` block once, and every
/// idle connection's task holds this future (measured with `-Zprint-type-sizes`: the
/// task went from 2,048 to 1,112 bytes with this, the boxed timers and `start`).
#[allow(clippy::manual_async_fn)]
fn run_session(
    state: Rc<ShardState>,
    mut carrier: Carrier,
    mut writer: Writer,
    new: Box<NewSession>,
) -> impl std::future::Future<Output = ()> {
    async move {
        // The negotiate token it redeemed is freed when the session ends, however it
        // ends (a failed handshake included).
        let _token = new.token.clone().map(|token| TokenRelease {
            state: state.clone(),
            token,
        });
        let state = &state;
        // Boxed: the handshake's state is large and needed once; the task keeps only what a
        // connected session needs for the rest of its life.
        let Some(Handshaken {
            protocol,
            version,
            then,
        }) = Box::pin(take_handshake(
            state,
            &mut carrier.reader,
            writer.half(),
            &new.accept,
            &mut carrier.input,
            &mut carrier.decoder,
            &mut carrier.hub_bytes,
        ))
        .await
        else {
            return;
        };
        carrier.early = then;
        let kind = FrameKind {
            protocol,
            framing: Framing::WebSocket,
        };
        let caller = Rc::new(Caller {
            user_id: state.node.user_ids.user_id(new.claims.as_ref()),
            connection_id: new.connection_id,
            hub: new.hub,
            claims: new.claims,
            client_query: new.client_query,
        });
        // Stateful reconnect needs the negotiated token (the resume names it) and a client
        // that said so in its handshake (version 2).
        let resumable_with = new.token.filter(|_| new.stateful_reconnect && version >= 2);
        let buffer = state.node.config.stateful_reconnect_buffer;
        let session = state.new_session(
            caller.clone(),
            kind,
            resumable_with.as_ref().map(|_| buffer),
            Some(new.slot),
        );
        // Registered (and in its durable groups) before the client learns it is connected,
        // so that whatever the client or its backend does next already finds it. Frames
        // sent to it meanwhile wait in its queue until the writer starts.
        state.register(session.clone()).await;
        if Box::pin(write_now(
            writer.half(),
            frame::encode_raw(protocol, handshake::OK_RESPONSE),
        ))
        .await
        .is_err()
        {
            state.unregister(&session);
            return;
        }
        let resumable = resumable_with.map(|token| {
            let resumable = Rc::new(Resumable::new(session.clone()));
            state
                .tokens
                .insert(token, Token::Resumable(resumable.clone()));
            resumable
        });
        state.flusher.attach(&session, writer);
        let remote = super::remote_for_logs(&carrier.reader);
        state.announce(&session, "websockets", remote).await;

        let end = loop {
            let end = read_loop(state, &session, &mut carrier).await;
            let Some(resumable) = &resumable else {
                break end;
            };
            if !matches!(end, SessionEnd::ClientLeft | SessionEnd::Detached)
                || !session.can_resume()
            {
                break end;
            }
            // The socket dropped: the session keeps its groups, presence and everything
            // sent to it, and waits for the client's new WebSocket.
            session.end_transport();
            session.detach();
            tracing::debug!(connection = %caller.connection_id, "transport lost; waiting for a resume");
            let timeout = state.node.config.disconnect_timeout;
            // Boxed, like the close grace's timeout below: a timer future is 128-byte
            // aligned, which would pad this task (held by every idle connection).
            let attach = match Box::pin(monoio::time::timeout(timeout, resumable.next_transport()))
                .await
            {
                Ok(Some(attach)) => attach,
                Ok(None) => break SessionEnd::ClientLeft,
                Err(_) => {
                    // Its resume window passed: a resume from now on is refused (404).
                    ShardMetrics::add(&state.metrics().resumes_refused, 1);
                    session.ending(EndReason::NotResumed);
                    tracing::debug!(connection = %caller.connection_id, "no resume within --disconnect-timeout-secs");
                    break SessionEnd::ClientLeft;
                }
            };
            let resent = session.resume();
            let metrics = state.metrics();
            ShardMetrics::add(&metrics.resumes, 1);
            ShardMetrics::add(&metrics.replayed_messages, resent as u64);
            tracing::debug!(connection = %caller.connection_id, resent, "resumed");
            rejoin_check(state, &session, attach.claims.as_ref());
            carrier = Carrier::new(attach.reader, attach.input);
            session.last_received.set(Instant::now());
            state.flusher.attach(&session, attach.writer);
        };
        match end {
            SessionEnd::ClientLeft | SessionEnd::Detached => session.stop_now(),
            SessionEnd::ClientClosed => {
                session.ending(EndReason::ClientClosed);
                session.close(None, false);
            }
            SessionEnd::Stopped => session.close(None, false),
            SessionEnd::BadInput(bad) => {
                session.ending(EndReason::BadInput);
                ShardMetrics::add(&state.metrics().protocol_errors, 1);
                tracing::debug!(connection = %caller.connection_id, "closing on bad input: {}", bad.message);
                session.close_with_code(Some(&bad.message), false, bad.close_code);
            }
        }
        state.end(&session).await;
        // Unregistered, the session is no longer on the shard's timer: the close grace is
        // kept here, so a peer that reads nothing cannot keep the socket open.
        if Box::pin(monoio::time::timeout(CLOSE_GRACE, session.stop.fired()))
            .await
            .is_err()
        {
            session.stop_now();
        }
    }
}

/// Frees a session's negotiate token when dropped.
struct TokenRelease {
    state: Rc<ShardState>,
    token: String,
}

impl Drop for TokenRelease {
    fn drop(&mut self) {
        self.state.tokens.remove(&self.token);
    }
}

enum SessionEnd {
    /// The socket ended without a close.
    ClientLeft,
    /// A WebSocket close frame or a SignalR Close message.
    ClientClosed,
    /// The server ended it (shutdown, slow consumer, timeout).
    Stopped,
    /// The transport ended (its writer failed, or a resume took the session over).
    Detached,
    BadInput(BadInput),
}

/// A resumed session is authorized again, as SignalR 1.x rejoined groups with a check:
/// groups the authorizer no longer allows for the token it came back with are left
/// (the client is not told of the others).
fn rejoin_check(state: &ShardState, session: &Session, claims: Option<&Claims>) {
    let groups: Vec<String> = session.groups.borrow().iter().cloned().collect();
    let caller = &session.caller;
    for group in groups {
        if !state.node.may_join(claims, &group) {
            tracing::debug!(connection = %caller.connection_id, group, "left on resume: no longer allowed");
            let leave = ConnectionOp::Leave(group);
            let _ = state.connection_op(&caller.hub, &caller.connection_id, &leave);
        }
    }
}

async fn read_loop(
    state: &Rc<ShardState>,
    session: &Rc<Session>,
    carrier: &mut Carrier,
) -> SessionEnd {
    let Carrier {
        reader,
        decoder,
        input,
        hub_bytes,
        early,
    } = carrier;
    let early = std::mem::take(early);
    let mut framing_error = early.error;
    let mut client_closed = early.closed;
    let mut read_size = ReadSize(MIN_READ_CHUNK);
    let transport = session.transport_signal();
    let stop = transport.watch();
    let ended_by_server = || {
        if session.closing_since().is_some() || session.stop.is_fired() {
            SessionEnd::Stopped
        } else {
            SessionEnd::Detached
        }
    };
    loop {
        if !hub_bytes.is_empty() {
            // Boxed: handling messages is the largest state of this loop, and the task
            // of every idle connection would otherwise be sized for it.
            match Box::pin(dispatch::handle_records(state, session, hub_bytes)).await {
                Dispatched::More => {}
                Dispatched::ClientClosed => return SessionEnd::ClientClosed,
                Dispatched::BadInput(bad) => return SessionEnd::BadInput(bad),
            }
        }
        if client_closed && framing_error.is_none() {
            return SessionEnd::ClientClosed;
        }
        if let Some(error) = framing_error.take() {
            let code = error.close_code();
            return SessionEnd::BadInput(BadInput::new(error, code));
        }
        if session.closing_since().is_some() || transport.is_fired() {
            return ended_by_server();
        }
        // Everything read was used: after a burst, give the large buffer back, so that
        // a quiet connection waits with a small one.
        if input.is_empty() && input.capacity() > 2 * read_size.0 {
            *input = BytesMut::new();
        }
        let Some(read) = stop.run(read_up_to(reader, input, read_size.0)).await else {
            return ended_by_server();
        };
        match read {
            Ok(got) if got > 0 => {
                read_size.adapt(got);
                session.last_received.set(Instant::now());
            }
            _ => return SessionEnd::ClientLeft,
        }
        let pumped = pump(decoder, input, hub_bytes);
        for pong in pumped.pongs {
            session.enqueue_untracked(&pong);
        }
        framing_error = pumped.error;
        client_closed = pumped.closed;
    }
}
