//! One shard: a pinned thread with its own io_uring runtime and listener. It owns its
//! connections for their whole life: accepts them, speaks HTTP and WebSocket, runs
//! hub methods, and delivers what other shards send it through its inbox.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::{Buf, Bytes, BytesMut};
use hashbrown::HashMap;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, OwnedReadHalf, OwnedWriteHalf, Splitable};
use monoio::net::{TcpListener, TcpStream};
use ringhub_protocol::frame;
use ringhub_protocol::handshake;
use ringhub_protocol::http::{self, HttpLimits, Negotiation, RequestHead};
use ringhub_protocol::hub::{CompletionOutcome, HubMessage, HubProtocol, Invocation};
use ringhub_protocol::ws::{self, close_code, FrameDecoder, WsEvent, WsLimits};

use crate::auth::Claims;
use crate::conn::{write_now, Conn, MetricsRef, Signal, CLOSE_GRACE};
use crate::hub::{Call, Caller, Hub, HubContext, Target};
use crate::metrics::ShardMetrics;
use crate::presence::{PRESENCE_CHANGED, PRESENCE_INTERVAL};
use crate::rest;
use crate::router::{Broadcast, Command, ConnectionOp, HubTables};
use crate::server::{Negotiated, Shared, NEGOTIATION_TTL};

thread_local! {
    static CURRENT: RefCell<Option<Rc<ShardState>>> = const { RefCell::new(None) };
}

/// The index of the shard running on this thread, if it belongs to `shared`'s server.
pub(crate) fn current_index(shared: &Arc<Shared>) -> Option<usize> {
    CURRENT.with(|c| {
        c.borrow()
            .as_ref()
            .filter(|s| Arc::ptr_eq(&s.shared, shared))
            .map(|s| s.index)
    })
}

/// Runs `f` on this thread's shard.
pub(crate) fn with_current<R>(f: impl FnOnce(&ShardState) -> R) -> Option<R> {
    let state = CURRENT.with(|c| c.borrow().clone())?;
    Some(f(&state))
}

/// Bytes read from a socket at a time.
const READ_CHUNK: usize = 4096;
/// The largest request body accepted on plain HTTP endpoints (the REST API included).
pub(crate) const MAX_BODY_BYTES: usize = 1 << 20;
/// An idle keep-alive HTTP connection is closed after this long.
const HTTP_IDLE: Duration = Duration::from_secs(30);
/// SignalR's handshake timeout.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// The WebSocket layer streams payloads (hub messages are bounded on their own), so
/// this only stops absurd single messages.
const MAX_WS_MESSAGE: usize = 64 << 20;

/// A shard's state, reachable from all its tasks.
pub(crate) struct ShardState {
    pub index: usize,
    pub shared: Arc<Shared>,
    hubs: RefCell<HashMap<String, HubTables>>,
    hub: Box<dyn Hub>,
    context: HubContext,
    next_key: Cell<u64>,
    metrics: Rc<MetricsRef>,
    shutdown: Signal,
}

impl ShardState {
    fn metrics(&self) -> &ShardMetrics {
        self.metrics.get()
    }

    pub fn deliver(&self, hub: &str, target: &Target, broadcast: &Broadcast) {
        if let Some(tables) = self.hubs.borrow().get(hub) {
            tables.deliver(target, broadcast);
        }
    }

    /// Acts on a connection if it lives on this shard; false if it does not.
    pub fn connection_op(&self, hub: &str, connection_id: &str, op: &ConnectionOp) -> bool {
        let mut hubs = self.hubs.borrow_mut();
        let Some(tables) = hubs.get_mut(hub) else {
            return false;
        };
        let Some(conn) = tables
            .key_of(connection_id)
            .and_then(|key| tables.conn(key))
            .cloned()
        else {
            return false;
        };
        let presence = &self.shared.presence;
        let user = conn.caller.user_id.as_deref();
        match op {
            ConnectionOp::Join(group) => {
                if tables.join(conn.key, group) {
                    presence.joined(hub, group, user);
                }
            }
            ConnectionOp::Leave(group) => {
                if tables.leave(conn.key, group) {
                    presence.left(hub, group, user);
                }
            }
            ConnectionOp::WatchPresence(group) | ConnectionOp::UnwatchPresence(group) => {
                let watch = matches!(op, ConnectionOp::WatchPresence(_));
                if tables.watch(conn.key, group, watch) {
                    presence.watch(hub, group, self.index, watch);
                }
            }
            ConnectionOp::Close => conn.close(None, false),
        }
        true
    }

    fn register(&self, conn: Rc<Conn>) {
        let caller = &conn.caller;
        self.shared.presence.connected(
            &caller.hub,
            &caller.connection_id,
            caller.user_id.as_deref(),
            self.index,
        );
        let mut hubs = self.hubs.borrow_mut();
        hubs.entry_ref(caller.hub.as_str())
            .or_default()
            .insert(conn);
        self.metrics()
            .connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Takes the connection out of every table and group, here and in presence.
    fn unregister(&self, conn: &Conn) {
        let (hub, user) = (conn.caller.hub.as_str(), conn.caller.user_id.as_deref());
        let presence = &self.shared.presence;
        let mut hubs = self.hubs.borrow_mut();
        if let Some(tables) = hubs.get_mut(hub) {
            tables.remove(
                conn.key,
                |group| presence.left(hub, group, user),
                |group| presence.watch(hub, group, self.index, false),
            );
            if tables.conns.is_empty() {
                hubs.remove(hub);
            }
        }
        presence.disconnected(hub, &conn.caller.connection_id);
        self.metrics()
            .connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Joins a new connection to its user's durable groups.
    fn join_durable_groups(&self, caller: &Caller) {
        let Some(user) = &caller.user_id else {
            return;
        };
        match self.shared.store.user_groups(&caller.hub, user) {
            Ok(groups) => {
                for group in groups {
                    self.connection_op(
                        &caller.hub,
                        &caller.connection_id,
                        &ConnectionOp::Join(group),
                    );
                }
            }
            Err(e) => tracing::warn!(user, "cannot read durable groups: {e}"),
        }
    }

    /// Tells this shard's watchers about the groups whose counts changed.
    fn notify_presence(&self) {
        for (hub, group, presence) in self.shared.presence.take_changes(self.index) {
            if let Some(tables) = self.hubs.borrow().get(&hub) {
                let broadcast = Broadcast::new(HubMessage::invocation(
                    PRESENCE_CHANGED,
                    vec![presence.changed_value(&group)],
                ));
                tables.notify_watchers(&group, &broadcast);
            }
        }
    }

    fn all_conns(&self) -> Vec<Rc<Conn>> {
        self.hubs
            .borrow()
            .values()
            .flat_map(|t| t.conns.values().cloned())
            .collect()
    }

    fn handle(&self, command: Command) -> bool {
        match command {
            Command::Deliver {
                hub,
                target,
                broadcast,
            } => self.deliver(&hub, &target, &broadcast),
            Command::Connection {
                hub,
                connection_id,
                op,
                reply,
            } => {
                let _ = reply.send(self.connection_op(&hub, &connection_id, &op));
            }
            Command::Shutdown => {
                self.shutdown.fire();
                return false;
            }
        }
        true
    }
}

/// The body of a shard thread.
pub(crate) fn run(index: usize, core: usize, listener: std::net::TcpListener, shared: Arc<Shared>) {
    if let Err(e) = monoio::utils::bind_to_cpu_set([core]) {
        tracing::warn!(shard = index, core, "could not pin the shard thread: {e:?}");
    }
    let mut runtime = match crate::runtime::io_uring_runtime(1024) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(shard = index, "cannot start io_uring: {e}");
            return;
        }
    };
    runtime.block_on(async move {
        let listener = match TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(shard = index, "cannot use the listener: {e}");
                return;
            }
        };
        let state = Rc::new(ShardState {
            index,
            hub: (shared.hub_factory)(),
            context: HubContext {
                shared: shared.clone(),
            },
            hubs: RefCell::default(),
            next_key: Cell::new(0),
            metrics: Rc::new(MetricsRef(shared.metrics.clone(), index)),
            shutdown: Signal::default(),
            shared,
        });
        CURRENT.with(|c| *c.borrow_mut() = Some(state.clone()));
        let inbox_state = state.clone();
        monoio::spawn(async move {
            let shared = inbox_state.shared.clone();
            shared.inboxes[inbox_state.index]
                .run(|c| inbox_state.handle(c))
                .await;
        });
        monoio::spawn(tick(state.clone()));
        monoio::spawn(presence_notifier(state.clone()));
        state
            .shared
            .ready_shards
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        tracing::debug!(shard = index, "accepting");
        loop {
            let accepted = monoio::select! {
                a = listener.accept() => a,
                _ = state.shutdown.fired() => break,
            };
            match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    monoio::spawn(serve_http(state.clone(), stream));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(shard = index, "accept failed: {e}");
                    monoio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        drop(listener);
        // Tell every client, give them a moment to read it, then end.
        for conn in state.all_conns() {
            conn.close(None, true);
        }
        let deadline = Instant::now() + CLOSE_GRACE;
        while !state.hubs.borrow().is_empty() && Instant::now() < deadline {
            monoio::time::sleep(Duration::from_millis(20)).await;
        }
        CURRENT.with(|c| *c.borrow_mut() = None);
    });
}

/// Once a second: keep-alive pings, client timeouts, and the end of closes that
/// could not flush in time.
async fn tick(state: Rc<ShardState>) {
    let config = &state.shared.config;
    let pings = [
        frame::encode_message(HubProtocol::Json, &HubMessage::Ping),
        frame::encode_message(HubProtocol::MessagePack, &HubMessage::Ping),
    ];
    let mut interval = monoio::time::interval(Duration::from_secs(1));
    loop {
        interval.tick().await;
        if state.shutdown.is_fired() {
            return;
        }
        let now = Instant::now();
        for conn in state.all_conns() {
            if let Some(since) = conn.closing_since() {
                if now - since > CLOSE_GRACE {
                    conn.stop.fire();
                }
            } else if now - conn.last_received.get() > config.client_timeout {
                conn.close(
                    Some("Server timeout elapsed without receiving a message from the client."),
                    true,
                );
            } else if now - conn.last_sent.get() >= config.keepalive && conn.queued_bytes() == 0 {
                let ping = &pings[usize::from(conn.protocol == HubProtocol::MessagePack)];
                conn.last_sent.set(now);
                conn.enqueue(ping);
            }
        }
    }
}

/// Every [`PRESENCE_INTERVAL`]: one `PresenceChanged` per changed watched group.
async fn presence_notifier(state: Rc<ShardState>) {
    let mut interval = monoio::time::interval(PRESENCE_INTERVAL);
    while !state.shutdown.is_fired() {
        interval.tick().await;
        state.notify_presence();
    }
}

/// Reads more bytes into `buf`; `Ok(false)` at end of stream.
async fn read_more(
    reader: &mut OwnedReadHalf<TcpStream>,
    buf: &mut BytesMut,
) -> std::io::Result<bool> {
    read_up_to(reader, buf, READ_CHUNK).await.map(|n| n > 0)
}

/// Reads at most about `want` more bytes into `buf`; returns how many (0 at end of stream).
async fn read_up_to(
    reader: &mut OwnedReadHalf<TcpStream>,
    buf: &mut BytesMut,
    want: usize,
) -> std::io::Result<usize> {
    buf.reserve(want);
    // monoio reads into the start of a buffer; a slice over the spare capacity makes it
    // append after the bytes already there.
    let (start, end) = (buf.len(), buf.capacity());
    let spare = std::mem::take(buf).slice_mut(start..end);
    let (result, spare) = reader.read(spare).await;
    *buf = spare.into_inner();
    result
}

/// How much a WebSocket session asks of one read: it starts at [`MIN_READ_CHUNK`] (an
/// idle connection keeps a small buffer) and doubles while reads come back full, so a
/// busy publisher's messages are taken many at a time and the writers they wake flush
/// once for all of them instead of once per message.
#[derive(Clone, Copy)]
struct ReadSize(usize);

/// The most one session read asks for.
const MAX_READ_CHUNK: usize = 64 << 10;
/// The least: what an idle connection's pending read holds (with the reader's and the
/// writer's tasks, the largest parts of an idle connection's memory).
const MIN_READ_CHUNK: usize = 256;

impl ReadSize {
    fn adapt(&mut self, got: usize) {
        self.0 = if got >= self.0 {
            (self.0 * 2).min(MAX_READ_CHUNK)
        } else if got < self.0 / 4 {
            (self.0 / 2).max(MIN_READ_CHUNK)
        } else {
            self.0
        };
    }
}

/// After answering a request whose body is not read (413): says it is done sending,
/// then reads and drops what the client is still sending (up to `body_len` bytes, for
/// at most a few seconds) before closing. Closing with unread bytes would reset the
/// connection, and a reset can reach the client before it has read the answer.
async fn discard_then_close(
    reader: &mut OwnedReadHalf<TcpStream>,
    writer: &mut OwnedWriteHalf<TcpStream>,
    body_len: usize,
) {
    let _ = writer.shutdown().await;
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut sink = BytesMut::new();
    let mut discarded = 0;
    while discarded < body_len {
        let left = deadline.saturating_duration_since(Instant::now());
        match monoio::time::timeout(left, read_up_to(reader, &mut sink, READ_CHUNK)).await {
            Ok(Ok(n)) if n > 0 => {
                discarded += n;
                sink.clear();
            }
            _ => return,
        }
    }
}

fn text_response(status: u16, body: &str, keep_alive: bool) -> Vec<u8> {
    http::response(
        status,
        "text/plain; charset=utf-8",
        &[],
        body.as_bytes(),
        keep_alive,
    )
}

/// A plain HTTP connection: requests until it upgrades to a WebSocket or closes.
async fn serve_http(state: Rc<ShardState>, stream: TcpStream) {
    let (mut reader, mut writer) = stream.into_split();
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let limits = HttpLimits::default();
    loop {
        let head = loop {
            match http::parse_request_head(&buf, limits) {
                Ok(Some((head, len))) => {
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
            match monoio::time::timeout(HTTP_IDLE, read_more(&mut reader, &mut buf)).await {
                Ok(Ok(true)) => {}
                _ => return,
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
        while buf.len() < body_len {
            match monoio::time::timeout(HTTP_IDLE, read_more(&mut reader, &mut buf)).await {
                Ok(Ok(true)) => {}
                _ => return,
            }
        }
        let body = buf.split_to(body_len);
        if is_api {
            let request = rest::Request {
                head: &head,
                body: &body,
            };
            let response = rest::handle(
                &state.context,
                state.shared.config.api_key.as_deref(),
                request,
            )
            .await;
            if write_now(&mut writer, response).await.is_err() || !head.keep_alive() {
                return;
            }
            continue;
        }
        let keep_alive = head.keep_alive();
        let origin = head.header_str("origin").map(str::to_owned);
        let routed = match route(&state, &head) {
            Routed::Respond(bytes) => Routed::Respond(with_cors(bytes, origin.as_deref())),
            Routed::Close(bytes) => Routed::Close(with_cors(bytes, origin.as_deref())),
            upgrade => upgrade,
        };
        match routed {
            Routed::Respond(bytes) => {
                if write_now(&mut writer, bytes).await.is_err() || !keep_alive {
                    return;
                }
            }
            Routed::Close(bytes) => {
                let _ = write_now(&mut writer, bytes).await;
                return;
            }
            Routed::Upgrade(upgrade) => {
                // A task of its own: this one's memory (sized for HTTP and REST work) is
                // freed instead of being held for the connection's lifetime.
                monoio::spawn(websocket(state, reader, writer, buf, upgrade));
                return;
            }
        }
    }
}

/// Lets a browser page on another origin use the answer, credentials included, as the
/// SignalR client needs (it sends cookies and custom headers). Any origin is allowed:
/// access is granted by tokens, never by cookies.
fn with_cors(mut response: Vec<u8>, origin: Option<&str>) -> Vec<u8> {
    let Some(origin) = origin else {
        return response;
    };
    let Some(line_end) = response.windows(2).position(|w| w == b"\r\n") else {
        return response;
    };
    let headers = format!(
        "\r\nAccess-Control-Allow-Origin: {origin}\r\nAccess-Control-Allow-Credentials: true\r\nVary: Origin"
    );
    response.splice(line_end..line_end, headers.into_bytes());
    response
}

enum Routed {
    Respond(Vec<u8>),
    Close(Vec<u8>),
    Upgrade(Box<Upgrade>),
}

struct Upgrade {
    accept: String,
    hub: String,
    connection_id: String,
    claims: Option<Claims>,
}

pub(crate) fn valid_hub_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn random_id() -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>())
}

fn route(state: &ShardState, head: &RequestHead) -> Routed {
    let keep_alive = head.keep_alive();
    let respond = |status, body: &str| Routed::Respond(text_response(status, body, keep_alive));
    let segments = match head.path_segments() {
        Some(s) => s,
        None => return respond(400, "path is not valid UTF-8"),
    };
    let segments: Vec<&str> = segments.iter().map(|s| s.as_ref()).collect();
    match (head.method.as_str(), segments.as_slice()) {
        // CORS preflight of a browser on another origin (headers added by `with_cors`).
        ("OPTIONS", ["hubs", ..]) => {
            let requested = head
                .header_str("access-control-request-headers")
                .unwrap_or("");
            Routed::Respond(http::response(
                204,
                "text/plain",
                &[
                    ("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
                    ("Access-Control-Allow-Headers", requested),
                    ("Access-Control-Max-Age", "600"),
                ],
                b"",
                keep_alive,
            ))
        }
        ("GET", ["healthz"]) => {
            if state.shared.is_ready() {
                respond(200, "ok")
            } else {
                respond(503, "starting")
            }
        }
        ("GET", ["metrics"]) => Routed::Respond(http::response(
            200,
            "text/plain; version=0.0.4",
            &[],
            state
                .shared
                .metrics
                .render(state.shared.presence.nonempty_groups())
                .as_bytes(),
            keep_alive,
        )),
        (method, ["hubs", hub, "negotiate"]) if valid_hub_name(hub) => {
            if method != "POST" {
                return respond(405, "negotiate requires POST");
            }
            negotiate(state, head, hub)
        }
        (method, ["hubs", hub]) if valid_hub_name(hub) => {
            if method != "GET" {
                return respond(405, "only the WebSockets transport is offered");
            }
            if !head.wants_websocket() {
                return respond(
                    400,
                    "WebSocket upgrade required (only the WebSockets transport is offered)",
                );
            }
            upgrade(state, head, hub)
        }
        _ => respond(404, "not found"),
    }
}

/// Checks the access token when authentication is on; `Err` is the 401 response.
fn authenticate(state: &ShardState, head: &RequestHead) -> Result<Option<Claims>, Routed> {
    let Some(jwt) = &state.shared.jwt else {
        return Ok(None);
    };
    let query_token = head.query_param("access_token");
    let token = query_token.as_deref().or_else(|| head.bearer_token());
    jwt.verify(token).map(Some).map_err(|e| {
        Routed::Respond(http::response(
            401,
            "text/plain; charset=utf-8",
            &[("WWW-Authenticate", "Bearer")],
            e.to_string().as_bytes(),
            head.keep_alive(),
        ))
    })
}

fn negotiate(state: &ShardState, head: &RequestHead, hub: &str) -> Routed {
    if let Err(refusal) = authenticate(state, head) {
        return refusal;
    }
    let json = |body: Vec<u8>| {
        Routed::Respond(http::response(
            200,
            "application/json",
            &[],
            &body,
            head.keep_alive(),
        ))
    };
    let Some(version) = http::negotiate_version(head) else {
        return json(http::negotiate_error_body(
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
        .shared
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

fn upgrade(state: &ShardState, head: &RequestHead, hub: &str) -> Routed {
    let accept = match head.websocket_accept() {
        Ok(a) => a,
        Err(e) => {
            let extra: &[(&str, &str)] = if e.status() == 426 {
                &[("Sec-WebSocket-Version", "13")]
            } else {
                &[]
            };
            return Routed::Close(http::response(
                e.status(),
                "text/plain",
                extra,
                e.to_string().as_bytes(),
                false,
            ));
        }
    };
    let claims = match authenticate(state, head) {
        Ok(c) => c,
        Err(refusal) => return refusal,
    };
    let connection_id = match head.query_param("id") {
        None => random_id(),
        Some(token) => {
            let mut pending = state
                .shared
                .negotiations
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match pending.remove(&token) {
                Some(n) if n.hub == hub && n.created.elapsed() < NEGOTIATION_TTL => n.connection_id,
                _ => return Routed::Close(text_response(404, "No Connection with that ID", false)),
            }
        }
    };
    Routed::Upgrade(Box::new(Upgrade {
        accept,
        hub: hub.to_owned(),
        connection_id,
        claims,
    }))
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
type Handshaken = (HubProtocol, Option<ws::WsError>);

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
    write_now(writer, http::upgrade_response(&upgrade.accept))
        .await
        .ok()?;
    let max_message = state.shared.config.max_message_bytes;
    // The handshake: the first record, JSON for both protocols.
    let handshake = monoio::time::timeout(HANDSHAKE_TIMEOUT, async {
        loop {
            let pumped = pump(decoder, input, hub_bytes);
            for pong in pumped.pongs {
                write_now(writer, pong).await.map_err(|e| e.to_string())?;
            }
            match handshake::parse_request(hub_bytes, max_message) {
                Ok(Some((request, used))) => return Ok((request, used, pumped.error)),
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
    match handshake.and_then(|(request, used, early_error)| {
        let protocol = request.select()?;
        hub_bytes.advance(used);
        Ok((protocol, early_error))
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

async fn websocket(
    state: Rc<ShardState>,
    mut reader: OwnedReadHalf<TcpStream>,
    mut writer: OwnedWriteHalf<TcpStream>,
    mut input: BytesMut,
    upgrade: Box<Upgrade>,
) {
    let config = &state.shared.config;
    let mut decoder = FrameDecoder::new(WsLimits {
        max_message_bytes: MAX_WS_MESSAGE,
    });
    let mut hub_bytes = BytesMut::new();
    // Boxed: the handshake's state is large and needed once; the task keeps only what a
    // connected session needs for the rest of its life.
    let handshaken = Box::pin(take_handshake(
        &state,
        &mut reader,
        &mut writer,
        &upgrade,
        &mut input,
        &mut decoder,
        &mut hub_bytes,
    ))
    .await;
    let Some((protocol, early_error)) = handshaken else {
        return;
    };
    let caller = Rc::new(Caller {
        user_id: state.shared.user_ids.user_id(upgrade.claims.as_ref()),
        connection_id: upgrade.connection_id,
        hub: upgrade.hub,
        claims: upgrade.claims,
    });
    let key = state.next_key.get();
    state.next_key.set(key + 1);
    let conn = Rc::new(Conn::new(
        key,
        caller.clone(),
        protocol,
        config.max_buffered_bytes,
        state.metrics.clone(),
    ));
    // Registered (and in its durable groups) before the client learns it is connected,
    // so that whatever the client or its backend does next already finds it. Frames
    // sent to it meanwhile wait in its queue until the writer starts.
    state.register(conn.clone());
    state.join_durable_groups(&caller);
    if Box::pin(write_now(
        &mut writer,
        frame::encode_raw(protocol, handshake::OK_RESPONSE),
    ))
    .await
    .is_err()
    {
        state.unregister(&conn);
        return;
    }
    monoio::spawn(conn.clone().write_loop(writer));
    state.hub.on_connected(&caller, &state.context).await;
    tracing::debug!(connection = %caller.connection_id, hub = %caller.hub, ?protocol, "connected");

    let error = session(
        &state,
        &conn,
        &mut reader,
        decoder,
        input,
        hub_bytes,
        early_error,
    )
    .await;
    match error {
        SessionEnd::ClientLeft => conn.stop.fire(),
        SessionEnd::ClientClosed | SessionEnd::Stopped => conn.close(None, false),
        SessionEnd::BadInput(message) => {
            ShardMetrics::add(&state.metrics().protocol_errors, 1);
            tracing::debug!(connection = %caller.connection_id, "closing on bad input: {message}");
            conn.close(Some(&message), false);
        }
    }
    state.unregister(&conn);
    state.hub.on_disconnected(&caller, &state.context).await;
    conn.stop.fired().await;
    tracing::debug!(connection = %caller.connection_id, "disconnected");
}

enum SessionEnd {
    /// The socket ended without a close.
    ClientLeft,
    /// A WebSocket close frame or a SignalR Close message.
    ClientClosed,
    /// The server ended it (shutdown, slow consumer, timeout).
    Stopped,
    BadInput(String),
}

fn bad_input(error: impl std::fmt::Display) -> SessionEnd {
    SessionEnd::BadInput(format!("Connection closed with an error. {error}"))
}

async fn session(
    state: &Rc<ShardState>,
    conn: &Rc<Conn>,
    reader: &mut OwnedReadHalf<TcpStream>,
    mut decoder: FrameDecoder,
    mut input: BytesMut,
    mut hub_bytes: BytesMut,
    mut framing_error: Option<ws::WsError>,
) -> SessionEnd {
    let protocol = conn.protocol;
    let max_message = state.shared.config.max_message_bytes;
    let mut read_size = ReadSize(MIN_READ_CHUNK);
    let stop = conn.stop.watch();
    loop {
        loop {
            let (message, used) = match protocol.split_record(&hub_bytes, max_message) {
                Ok(Some(record)) => (protocol.parse(record.body), record.consumed),
                Ok(None) => break,
                Err(e) => return bad_input(e),
            };
            hub_bytes.advance(used);
            match message {
                Ok(Some(message)) => {
                    // Boxed: a connection waits in its read far longer than it handles
                    // messages, so the task is sized for the read and this is allocated
                    // per message instead (idle connections hold less memory).
                    if let Some(end) = Box::pin(handle_message(state, conn, message)).await {
                        return end;
                    }
                }
                Ok(None) => {}
                Err(e) => return bad_input(e),
            }
        }
        if let Some(error) = framing_error.take() {
            return bad_input(error);
        }
        if conn.closing_since().is_some() || conn.stop.is_fired() {
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
                conn.last_received.set(Instant::now());
            }
            _ => return SessionEnd::ClientLeft,
        }
        let pumped = pump(&mut decoder, &mut input, &mut hub_bytes);
        for pong in pumped.pongs {
            conn.enqueue(&pong);
        }
        framing_error = pumped.error;
        if pumped.closed && framing_error.is_none() {
            return SessionEnd::ClientClosed;
        }
    }
}

/// Handles one hub message; `Some` ends the session.
async fn handle_message(
    state: &Rc<ShardState>,
    conn: &Rc<Conn>,
    message: HubMessage,
) -> Option<SessionEnd> {
    ShardMetrics::add(&state.metrics().messages_received, 1);
    match message {
        HubMessage::Invocation(invocation) => {
            invoke(state, conn, invocation).await;
            None
        }
        HubMessage::StreamInvocation(invocation) => {
            if let Some(id) = invocation.invocation_id {
                let error = format!(
                    "The client attempted to invoke the non-streaming '{}' method with a streaming invocation.",
                    invocation.target
                );
                complete(conn, id, CompletionOutcome::Error(error));
            }
            None
        }
        HubMessage::Close(_) => Some(SessionEnd::ClientClosed),
        // Pings only reset the timeout; client results, upload streams, cancellation and
        // stateful-reconnect acks have nothing to act on here.
        _ => None,
    }
}

async fn invoke(state: &Rc<ShardState>, conn: &Rc<Conn>, invocation: Invocation) {
    let Invocation {
        invocation_id,
        target,
        arguments,
        ..
    } = invocation;
    let call = Call {
        caller: &conn.caller,
        method: &target,
        arguments,
        context: &state.context,
    };
    let result = state.hub.invoke(call).await;
    if let Some(id) = invocation_id {
        let outcome = match result {
            Ok(value) => CompletionOutcome::Result(value),
            Err(e) => CompletionOutcome::Error(e.client_message()),
        };
        complete(conn, id, outcome);
    }
}

fn complete(conn: &Conn, invocation_id: String, outcome: CompletionOutcome) {
    let completion = HubMessage::completion(invocation_id, outcome);
    conn.enqueue(&frame::encode_message(conn.protocol, &completion));
}
