//! One HTTP connection: requests read one after another (keep-alive), routed to
//! health, metrics, the REST API, negotiate and the transports, until it closes,
//! upgrades to a WebSocket, becomes an event stream, or is handed to another shard.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use monoio::io::{OwnedReadHalf, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;
use ringhub_protocol::http::{self as wire, HttpLimits, RequestHead, MAX_BODY_BYTES};

use crate::admin;
use crate::shard::inbox::Command;
use crate::shard::state::ShardState;
use crate::shard::tokens::{owner_of, HttpChannel};
use crate::transport::channel::Kind;
use crate::transport::io::{discard_then_close, read_more, write_now, READ_CHUNK};
use crate::transport::long_polling::{self, Polled};
use crate::transport::websocket::{self, Upgrade};
use crate::transport::{channel, negotiate, sse, text_response, HubEndpoint};
use crate::{azure, rest};

/// An idle keep-alive HTTP connection is closed after this long.
const HTTP_IDLE: Duration = Duration::from_secs(30);
/// A request head must arrive whole within this long of its first byte (contract
/// section 6).
const HEAD_DEADLINE: Duration = Duration::from_secs(10);
/// After its head, a request body must arrive at least this fast (bytes per second):
/// its deadline is the head's plus its length at this rate, so a body sent a byte at a
/// time cannot hold a connection (and its place among the HTTP-phase connections) for
/// long. A 32 KiB hub message may take 11 s, the largest body 42 s.
const MIN_BODY_RATE: usize = 32 << 10;

/// A connection in the HTTP phase (not upgraded, not streaming), counted against the
/// shard's bound while it lives.
struct HttpPhase(Rc<ShardState>);

impl HttpPhase {
    fn enter(state: &Rc<ShardState>) -> Option<HttpPhase> {
        let count = state.http_connections.get();
        if count >= state.max_http_connections {
            return None;
        }
        state.http_connections.set(count + 1);
        state.metrics().http_connections.fetch_add(1, Relaxed);
        Some(HttpPhase(state.clone()))
    }
}

impl Drop for HttpPhase {
    fn drop(&mut self) {
        let count = self.0.http_connections.get();
        self.0.http_connections.set(count.saturating_sub(1));
        self.0.metrics().http_connections.fetch_sub(1, Relaxed);
    }
}

/// A plain HTTP connection: requests until it upgrades to a WebSocket, becomes an
/// event stream, is handed to the shard that owns a request's token, or closes.
/// `buf` holds bytes already read from it (by the shard that handed it over).
pub async fn serve_http(state: Rc<ShardState>, stream: TcpStream, mut buf: BytesMut) {
    let (mut reader, mut writer) = stream.into_split();
    let Some(mut phase) = HttpPhase::enter(&state) else {
        // Past the bound: refused at once, so that idle or slow HTTP clients cannot take
        // every descriptor of the process.
        let _ = write_now(
            &mut writer,
            text_response(503, "Too many HTTP connections; try again shortly.", false),
        )
        .await;
        return;
    };
    if buf.capacity() < READ_CHUNK {
        buf.reserve(READ_CHUNK);
    }
    let limits = HttpLimits::default();
    loop {
        // A request head must arrive whole within HEAD_DEADLINE of its first byte (a
        // byte at a time would otherwise hold the connection for hours); between
        // requests a keep-alive connection may idle for HTTP_IDLE.
        let mut head_started = (!buf.is_empty()).then(Instant::now);
        let head = loop {
            match wire::parse_request_head(&buf, limits) {
                Ok(Some((head, len))) => {
                    if let Some(owner) = owner_elsewhere(&state, &head) {
                        drop(phase);
                        hand_over(&state, owner, reader, writer, buf);
                        return;
                    }
                    buf.advance(len);
                    break head;
                }
                Ok(None) => {}
                Err(e) => {
                    let _ = write_now(
                        &mut writer,
                        text_response(e.status(), &e.to_string(), false),
                    )
                    .await;
                    return;
                }
            }
            let wait = match head_started {
                None => HTTP_IDLE,
                Some(started) => HEAD_DEADLINE.saturating_sub(started.elapsed()),
            };
            match monoio::time::timeout(wait, read_more(&mut reader, &mut buf)).await {
                Ok(Ok(true)) => {
                    head_started.get_or_insert_with(Instant::now);
                }
                Ok(_) => return,
                Err(_) if head_started.is_some() => {
                    let answer = text_response(408, "The request head took too long.", false);
                    let _ = write_now(&mut writer, answer).await;
                    return;
                }
                Err(_) => return,
            }
        };
        let body_len = match head.content_length() {
            Ok(length) => length.unwrap_or(0),
            Err(e) => {
                let response = text_response(e.status(), &e.to_string(), false);
                let _ = write_now(&mut writer, response).await;
                return;
            }
        };
        let is_api = head.path.starts_with("/api/");
        if body_len > 0 {
            // Refused whatever the body says: answered before it is read, then closed, so
            // that bodies nobody may send cost nothing.
            if let Some(refusal) = refused_before_body(&state, &head) {
                let _ = write_now(&mut writer, refusal).await;
                return;
            }
        }
        if body_len > MAX_BODY_BYTES {
            let response = if is_api {
                rest::too_large()
            } else {
                text_response(413, "request body too large", false)
            };
            if write_now(&mut writer, response).await.is_ok() {
                discard_then_close(&mut reader, &mut writer, body_len).await;
            }
            return;
        }
        let body_deadline = head_started.unwrap_or_else(Instant::now)
            + HEAD_DEADLINE
            + Duration::from_secs((body_len / MIN_BODY_RATE) as u64);
        while buf.len() < body_len {
            let wait = body_deadline.saturating_duration_since(Instant::now());
            match monoio::time::timeout(wait, read_more(&mut reader, &mut buf)).await {
                Ok(Ok(true)) => {}
                Ok(_) => return,
                Err(_) => {
                    let answer = text_response(408, "The request body took too long.", false);
                    let _ = write_now(&mut writer, answer).await;
                    return;
                }
            }
        }
        let body = buf.split_to(body_len);
        if is_api && !(head.path == "/api/openapi.json" && state.node.config.admin_listen.is_some())
        {
            let request = rest::Request {
                head: &head,
                body: &body,
            };
            let response = if azure::is_azure_request(&head) {
                azure::handle(&state.context, request).await
            } else {
                rest::handle(
                    &state.context,
                    state.node.config.api_key.as_deref(),
                    request,
                )
                .await
            };
            if write_now(&mut writer, response).await.is_err() || !head.keep_alive() {
                return;
            }
            continue;
        }
        let keep_alive = head.keep_alive();
        // CORS headers only for an allowed origin (`--cors-origins`): a browser then
        // refuses other origins' pages the answer.
        let origin = head
            .header_str("origin")
            .filter(|origin| state.node.config.allows_origin(origin))
            .map(str::to_owned);
        negotiate::find_in_cluster(&state, &head).await;
        // The answer, and whether the connection closes after it.
        let (answer, close) = match route(&state, &head, &body) {
            Routed::Respond(bytes) => (bytes, false),
            Routed::Close(bytes) => (bytes, true),
            Routed::Poll(channel) => {
                // A pending poll is a session's receive request, bounded with the
                // sessions (`--max-connections`), not an HTTP-phase connection: long-polling
                // clients waiting for messages do not lock everyone else out.
                drop(phase);
                let polled =
                    long_polling::poll(&state, channel, keep_alive, &mut reader, &mut buf).await;
                let Some(answer) = polled else {
                    // The client went away.
                    return;
                };
                let Some(again) = HttpPhase::enter(&state) else {
                    // Past the bound now: answered, then closed (the client polls anew).
                    let _ = write_now(&mut writer, with_cors(answer, origin.as_deref())).await;
                    return;
                };
                phase = again;
                (answer, false)
            }
            Routed::Send(channel) => {
                let remote = super::remote_for_logs(&reader);
                let status = channel::send(&state, &channel, &body, remote).await;
                (text_response(status, "", keep_alive), false)
            }
            Routed::Upgrade(upgrade) => {
                // A task of its own: this one's memory (sized for HTTP and REST work) is
                // freed instead of being held for the connection's lifetime.
                monoio::spawn(websocket::run(state, reader, writer, buf, *upgrade));
                return;
            }
            Routed::EventStream(channel) => {
                // A stream, not a request: it no longer counts as an HTTP connection.
                drop(phase);
                let cors = cors_headers(origin.as_deref());
                sse::run(state, reader, writer, channel, cors).await;
                return;
            }
        };
        let written = write_now(&mut writer, with_cors(answer, origin.as_deref())).await;
        if written.is_err() || close || !keep_alive {
            return;
        }
    }
}

/// The answer to a request with a body that is refused whatever its body holds: a REST
/// call without the key, a send-channel POST without a valid token.
fn refused_before_body(state: &ShardState, head: &RequestHead) -> Option<Vec<u8>> {
    if azure::is_azure_request(head) {
        return azure::refused_before_body(&state.context, head);
    }
    if head.path.starts_with("/api/") {
        return rest::refused_before_body(state.node.config.api_key.as_deref(), head);
    }
    let is_send_channel = head.method == "POST"
        && HubEndpoint::of(&state.node.hub_routes, head).is_some_and(|e| !e.negotiate);
    if !is_send_channel {
        return None;
    }
    let (token, _) = match channel::identify(state, head) {
        Ok(identified) => identified,
        Err(refusal) => return Some(refusal),
    };
    (!negotiate::is_known(state, &token)).then(|| negotiate::Refused::Unknown.response(false))
}

/// The shard that owns the token of a transport request, when it is another one.
fn owner_elsewhere(state: &ShardState, head: &RequestHead) -> Option<usize> {
    HubEndpoint::of(&state.node.hub_routes, head)?;
    let token = head.query_param("id")?;
    owner_of(&token, state.node.inboxes.len()).filter(|&owner| owner != state.index)
}

/// Gives the connection, with what was read from it, to the shard that owns the
/// request's token; it serves the connection from then on.
fn hand_over(
    state: &ShardState,
    owner: usize,
    reader: OwnedReadHalf<TcpStream>,
    writer: OwnedWriteHalf<TcpStream>,
    buffered: BytesMut,
) {
    let socket = match reader.reunite(writer) {
        Ok(stream) => duplicate(&stream),
        Err(_) => return,
    };
    match socket {
        Ok(socket) => state.node.inboxes[owner].push(Command::Adopt { socket, buffered }),
        Err(e) => tracing::warn!(shard = state.index, "cannot hand a connection over: {e}"),
    }
}

/// A descriptor of the same socket that the caller owns (the stream's own is closed
/// when the stream drops, on this shard's ring).
#[allow(unsafe_code)]
fn duplicate(stream: &TcpStream) -> std::io::Result<std::net::TcpStream> {
    // SAFETY: the descriptor belongs to `stream`, which is open for the whole borrow;
    // the borrow only serves to make a new, owned descriptor (dup with CLOEXEC).
    // Needed because monoio hands a stream's descriptor out only by panicking when an
    // operation still holds it; the copy has no such condition.
    let borrowed = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    Ok(std::net::TcpStream::from(borrowed.try_clone_to_owned()?))
}

/// Lets a browser page on another origin use the answer, credentials included, as the
/// SignalR client needs (it sends cookies and custom headers). Any origin is allowed:
/// access is granted by tokens, never by cookies.
fn with_cors(mut response: Vec<u8>, origin: Option<&str>) -> Vec<u8> {
    let Some(line_end) = response.windows(2).position(|w| w == b"\r\n") else {
        return response;
    };
    let headers: String = cors_headers(origin)
        .iter()
        .map(|(name, value)| format!("\r\n{name}: {value}"))
        .collect();
    response.splice(line_end..line_end, headers.into_bytes());
    response
}

/// The CORS headers of an answer to a request from `origin`.
fn cors_headers(origin: Option<&str>) -> Vec<(String, String)> {
    let Some(origin) = origin else {
        return Vec::new();
    };
    vec![
        ("Access-Control-Allow-Origin".into(), origin.to_owned()),
        ("Access-Control-Allow-Credentials".into(), "true".into()),
        ("Vary".into(), "Origin".into()),
    ]
}

/// What a request leads to.
enum Routed {
    /// Answer, and keep the connection if the request allows it.
    Respond(Vec<u8>),
    /// Answer, then close.
    Close(Vec<u8>),
    Upgrade(Box<Upgrade>),
    /// Stream Server-Sent Events on this connection.
    EventStream(Rc<HttpChannel>),
    /// A long poll to wait on.
    Poll(Rc<HttpChannel>),
    /// Hub messages POSTed for this channel (the request body).
    Send(Rc<HttpChannel>),
}

fn route(state: &Rc<ShardState>, head: &RequestHead, body: &[u8]) -> Routed {
    let keep_alive = head.keep_alive();
    let respond = |status, body: &str| Routed::Respond(text_response(status, body, keep_alive));
    if head.path_segments().is_none() {
        return respond(400, "path is not valid UTF-8");
    }
    if let Some(endpoint) = admin::Endpoint::of(&head.path) {
        if endpoint.is_admin_only() && state.node.config.admin_listen.is_some() {
            return respond(404, "not found (served on --admin-listen)");
        }
        return Routed::Respond(admin::answer(
            &state.node,
            endpoint,
            &head.method,
            keep_alive,
        ));
    }
    // CORS preflight of a browser on another origin (headers added by `with_cors`).
    let endpoint = HubEndpoint::of(&state.node.hub_routes, head);
    if head.method == "OPTIONS" && endpoint.is_some() {
        let requested = head
            .header_str("access-control-request-headers")
            .unwrap_or("");
        return Routed::Respond(wire::response(
            204,
            "text/plain",
            &[
                ("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS"),
                ("Access-Control-Allow-Headers", requested),
                ("Access-Control-Max-Age", "600"),
            ],
            b"",
            keep_alive,
        ));
    }
    let Some(endpoint) = endpoint else {
        return respond(404, "not found");
    };
    if endpoint.azure && state.node.access_keys.is_none() {
        return respond(
            404,
            "not found (the client endpoint /client/ needs --access-key)",
        );
    }
    let hub: &str = &endpoint.hub;
    let method = head.method.as_str();
    if endpoint.negotiate {
        if method != "POST" {
            return respond(405, "negotiate requires POST");
        }
        return Routed::Respond(negotiate::negotiate(state, head, hub));
    }
    match method {
        // Browsers do not apply CORS to WebSockets: with an allow-list, another
        // origin's page is refused here (cross-site WebSocket hijacking).
        "GET"
            if head.wants_websocket()
                && head
                    .header_str("origin")
                    .is_some_and(|origin| !state.node.config.allows_origin(origin)) =>
        {
            Routed::Close(text_response(
                403,
                "This origin is not allowed (--cors-origins).",
                false,
            ))
        }
        "GET" if head.wants_websocket() => match websocket::upgrade(state, head, hub) {
            Ok(upgrade) => Routed::Upgrade(Box::new(upgrade)),
            Err(refusal) => Routed::Close(refusal),
        },
        "GET" if sse::wants_event_stream(head) => match sse::open(state, head, hub) {
            Ok(channel) => Routed::EventStream(channel),
            Err(refusal) => Routed::Respond(refusal),
        },
        "GET" => match long_polling::open(state, head, hub) {
            Polled::Answer(answer) => Routed::Respond(answer),
            Polled::Wait(channel) => Routed::Poll(channel),
        },
        "POST" => match channel::identify(state, head) {
            Err(refusal) => Routed::Respond(refusal),
            Ok((token, claims)) => {
                match channel::existing(state, hub, &token, claims.as_ref(), Kind::Either) {
                    Some(Ok(channel)) => Routed::Send(channel),
                    Some(Err(refused)) => Routed::Respond(refused.response(keep_alive)),
                    None if state.tokens.is_websocket(&token) => respond(
                        405,
                        "POST requests are not allowed for WebSocket connections.",
                    ),
                    // Before the first receive request: kept for the transport.
                    None => {
                        let user_id = state.node.user_ids.user_id(claims.as_ref());
                        match negotiate::keep_early_input(
                            state,
                            hub,
                            &token,
                            user_id.as_deref(),
                            body,
                        ) {
                            Ok(()) => respond(200, ""),
                            Err(refused) => Routed::Respond(refused.response(keep_alive)),
                        }
                    }
                }
            }
        },
        "DELETE" => Routed::Respond(long_polling::delete(state, head, hub)),
        _ => respond(405, "method not allowed"),
    }
}
