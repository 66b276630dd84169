//! One HTTP connection: requests read one after another (keep-alive), routed to
//! health, metrics, the REST API, negotiate and the transports, until it closes or
//! upgrades to a WebSocket.

use std::rc::Rc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use monoio::io::Splitable;
use monoio::net::TcpStream;
use ringhub_protocol::http::{self as wire, HttpLimits, RequestHead};

use crate::api::valid_hub_name;
use crate::rest;
use crate::shard::state::ShardState;
use crate::transport::io::{discard_then_close, read_more, write_now, READ_CHUNK};
use crate::transport::websocket::{self, Upgrade};
use crate::transport::{negotiate, text_response, MAX_BODY_BYTES};

/// An idle keep-alive HTTP connection is closed after this long.
const HTTP_IDLE: Duration = Duration::from_secs(30);

/// A plain HTTP connection: requests until it upgrades to a WebSocket or closes.
pub async fn serve_http(state: Rc<ShardState>, stream: TcpStream) {
    let (mut reader, mut writer) = stream.into_split();
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let limits = HttpLimits::default();
    loop {
        let head = loop {
            match wire::parse_request_head(&buf, limits) {
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
                state.node.config.api_key.as_deref(),
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
                monoio::spawn(websocket::run(state, reader, writer, buf, upgrade));
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

/// What a request leads to.
enum Routed {
    /// Answer, and keep the connection if the request allows it.
    Respond(Vec<u8>),
    /// Answer, then close.
    Close(Vec<u8>),
    Upgrade(Box<Upgrade>),
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
            Routed::Respond(wire::response(
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
            if state.node.is_ready() {
                respond(200, "ok")
            } else {
                respond(503, "starting")
            }
        }
        ("GET", ["metrics"]) => Routed::Respond(wire::response(
            200,
            "text/plain; version=0.0.4",
            &[],
            state
                .node
                .metrics
                .render(state.node.presence.nonempty_groups())
                .as_bytes(),
            keep_alive,
        )),
        (method, ["hubs", hub, "negotiate"]) if valid_hub_name(hub) => {
            if method != "POST" {
                return respond(405, "negotiate requires POST");
            }
            Routed::Respond(negotiate::negotiate(state, head, hub))
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
            match websocket::upgrade(state, head, hub) {
                Ok(upgrade) => Routed::Upgrade(Box::new(upgrade)),
                Err(refusal) => Routed::Close(refusal),
            }
        }
        _ => respond(404, "not found"),
    }
}
