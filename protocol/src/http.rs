//! HTTP/1.1 on the server side: request heads (parsed by `httparse` with explicit
//! limits), the WebSocket upgrade handshake, the SignalR negotiate body and plain
//! responses. Bodies are the caller's business; [`RequestHead::content_length`] tells
//! how many bytes follow the head.

use std::borrow::Cow;

use base64::Engine;
use serde::Serialize;
use sha1::{Digest, Sha1};
use thiserror::Error;

/// Limits on a request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Bytes up to and including the blank line that ends the head.
    pub max_head_bytes: usize,
    /// Number of header fields (at most [`HEADER_CAPACITY`]).
    pub max_headers: usize,
}

/// The most header fields any limit can allow (the parser's fixed array).
pub const HEADER_CAPACITY: usize = 128;

/// The largest request body a server takes on plain HTTP endpoints (negotiate, the REST
/// APIs, the send channel of SSE and long polling): a body past it is refused before it
/// is read.
pub const MAX_BODY_BYTES: usize = 1 << 20;

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_head_bytes: 16 * 1024,
            max_headers: 64,
        }
    }
}

/// Why a request could not be read; all answer `400` except where noted.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HttpError {
    /// No blank line within [`HttpLimits::max_head_bytes`] (answers `431`).
    #[error("request head exceeds {limit} bytes")]
    HeadTooLarge {
        /// The limit that was exceeded.
        limit: usize,
    },
    /// More header fields than [`HttpLimits::max_headers`] (answers `431`).
    #[error("more than {limit} header fields")]
    TooManyHeaders {
        /// The limit that was exceeded.
        limit: usize,
    },
    /// Not an HTTP/1.x head, or a target that is not a path; the text names the part
    /// that failed.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// A `Content-Length` that is not one decimal number, or several that disagree:
    /// the body's end would be a guess, so the connection cannot be trusted.
    #[error("invalid Content-Length")]
    InvalidContentLength,
    /// Any `Transfer-Encoding` header (answers `411 Length Required`): SignalR clients
    /// always send a length, and one way to find a body's end leaves no room for
    /// request smuggling.
    #[error("chunked request bodies are not supported")]
    ChunkedBody,
}

impl HttpError {
    /// The status code to answer with.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::HeadTooLarge { .. } | HttpError::TooManyHeaders { .. } => 431,
            HttpError::ChunkedBody => 411,
            _ => 400,
        }
    }
}

/// A parsed request head, owning its data (heads are small and short-lived).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// The method as sent (`GET`, `POST`, ...), case kept.
    pub method: String,
    /// The path, still percent-encoded.
    pub path: String,
    /// The raw query string without `?`, if any.
    pub query: Option<String>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// Header names lowercased, values as sent.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Parses the request head at the front of `buf`: the head and its length, or
/// `Ok(None)` if its end has not arrived yet.
pub fn parse_request_head(
    buf: &[u8],
    limits: HttpLimits,
) -> Result<Option<(RequestHead, usize)>, HttpError> {
    let max_headers = limits.max_headers.min(HEADER_CAPACITY);
    let mut fields = [httparse::EMPTY_HEADER; HEADER_CAPACITY];
    let mut request = httparse::Request::new(&mut fields[..max_headers]);
    let window = &buf[..buf.len().min(limits.max_head_bytes)];
    let head_len = match request.parse(window) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= limits.max_head_bytes => {
            return Err(HttpError::HeadTooLarge {
                limit: limits.max_head_bytes,
            })
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::TooManyHeaders { limit: max_headers })
        }
        Err(httparse::Error::Version) => {
            return Err(HttpError::Malformed("unsupported HTTP version"))
        }
        Err(httparse::Error::Token) => return Err(HttpError::Malformed("invalid method")),
        Err(httparse::Error::HeaderName) => {
            return Err(HttpError::Malformed("invalid header name"))
        }
        Err(httparse::Error::HeaderValue) => {
            return Err(HttpError::Malformed("invalid header value"))
        }
        Err(_) => return Err(HttpError::Malformed("invalid request line")),
    };
    let (Some(method), Some(target), Some(minor_version)) =
        (request.method, request.path, request.version)
    else {
        return Err(HttpError::Malformed("incomplete request line"));
    };
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query.to_owned())),
        None => (target, None),
    };
    if !path.starts_with('/') {
        return Err(HttpError::Malformed(
            "request target is not an absolute path",
        ));
    }
    let headers = request
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
        .collect();
    let head = RequestHead {
        method: method.to_owned(),
        path: path.to_owned(),
        query,
        minor_version,
        headers,
    };
    // Reject what would make the body's length ambiguous before anyone reads it.
    if head.header("transfer-encoding").is_some() {
        return Err(HttpError::ChunkedBody);
    }
    head.content_length()?;
    Ok(Some((head, head_len)))
}

impl RequestHead {
    /// The first value of a header (name in lowercase).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// A header value as text, if it is valid UTF-8.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Whether a comma-separated header lists `token` (case-insensitive), in any of
    /// its occurrences: `Connection: keep-alive, Upgrade`.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .filter_map(|(_, v)| std::str::from_utf8(v).ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// The body length from `Content-Length`; `None` when absent (no body).
    pub fn content_length(&self) -> Result<Option<usize>, HttpError> {
        let mut lengths = self
            .headers
            .iter()
            .filter(|(n, _)| n == "content-length")
            .map(|(_, v)| {
                std::str::from_utf8(v)
                    .ok()
                    .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<usize>().ok())
                    .ok_or(HttpError::InvalidContentLength)
            });
        let Some(first) = lengths.next().transpose()? else {
            return Ok(None);
        };
        for other in lengths {
            if other? != first {
                return Err(HttpError::InvalidContentLength);
            }
        }
        Ok(Some(first))
    }

    /// Whether the connection stays open after the response (HTTP/1.1 default).
    pub fn keep_alive(&self) -> bool {
        if self.has_token("connection", "close") {
            return false;
        }
        self.minor_version >= 1 || self.has_token("connection", "keep-alive")
    }

    /// The decoded value of a query parameter (exact name; `+` is a space).
    pub fn query_param(&self, name: &str) -> Option<String> {
        let query = self.query.as_deref()?;
        form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }

    /// Every query parameter, decoded, in order.
    pub fn query_pairs(&self) -> Vec<(String, String)> {
        self.query.as_deref().map_or_else(Vec::new, |query| {
            form_urlencoded::parse(query.as_bytes())
                .into_owned()
                .collect()
        })
    }

    /// The path split at `/` with each segment percent-decoded
    /// (`/api/hubs/chat/groups/ward%3A4b` → `["api", "hubs", "chat", "groups", "ward:4b"]`).
    /// `None` if a segment does not decode to UTF-8.
    pub fn path_segments(&self) -> Option<Vec<Cow<'_, str>>> {
        self.path
            .split('/')
            .skip(1)
            .map(|segment| {
                percent_encoding::percent_decode_str(segment)
                    .decode_utf8()
                    .ok()
            })
            .collect()
    }

    /// The bearer token from `Authorization: Bearer ...`, if any.
    pub fn bearer_token(&self) -> Option<&str> {
        let value = self.header_str("authorization")?.trim();
        let (scheme, token) = value.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    }
}

/// Why a request is not a valid WebSocket upgrade.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum UpgradeError {
    /// The upgrade request is not a `GET` (RFC 6455 section 4.1).
    #[error("WebSocket upgrade must use GET")]
    NotGet,
    /// No `Upgrade: websocket` header.
    #[error("missing 'Upgrade: websocket'")]
    MissingUpgrade,
    /// No `upgrade` token in the `Connection` header.
    #[error("missing 'Connection: Upgrade'")]
    MissingConnectionUpgrade,
    /// `Sec-WebSocket-Version` is not 13, the only version RFC 6455 defines (answers
    /// `426`, so the client can retry with 13).
    #[error("unsupported WebSocket version (13 is required)")]
    UnsupportedVersion,
    /// `Sec-WebSocket-Key` is absent or not 16 bytes in base64.
    #[error("missing or invalid Sec-WebSocket-Key")]
    InvalidKey,
}

impl UpgradeError {
    /// The status to refuse with: 426 (with `Sec-WebSocket-Version: 13`) for a wrong
    /// version, 400 otherwise.
    pub fn status(&self) -> u16 {
        match self {
            UpgradeError::UnsupportedVersion => 426,
            _ => 400,
        }
    }
}

impl RequestHead {
    /// Whether the request asks for a WebSocket (it may still be an invalid one).
    pub fn wants_websocket(&self) -> bool {
        self.has_token("upgrade", "websocket")
    }

    /// Validates a WebSocket upgrade (RFC 6455 §4.2.1) and returns the
    /// `Sec-WebSocket-Accept` value to answer with.
    pub fn websocket_accept(&self) -> Result<String, UpgradeError> {
        if self.method != "GET" {
            return Err(UpgradeError::NotGet);
        }
        if !self.has_token("upgrade", "websocket") {
            return Err(UpgradeError::MissingUpgrade);
        }
        if !self.has_token("connection", "upgrade") {
            return Err(UpgradeError::MissingConnectionUpgrade);
        }
        if self.header("sec-websocket-version").map(<[u8]>::trim_ascii) != Some(b"13") {
            return Err(UpgradeError::UnsupportedVersion);
        }
        let key = self
            .header("sec-websocket-key")
            .map(<[u8]>::trim_ascii)
            .ok_or(UpgradeError::InvalidKey)?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(key)
            .map_err(|_| UpgradeError::InvalidKey)?;
        if decoded.len() != 16 {
            return Err(UpgradeError::InvalidKey);
        }
        Ok(accept_key(key))
    }
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`.
pub fn accept_key(key: &[u8]) -> String {
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut sha1 = Sha1::new();
    sha1.update(key);
    sha1.update(GUID);
    base64::engine::general_purpose::STANDARD.encode(sha1.finalize())
}

/// The `101 Switching Protocols` response.
pub fn upgrade_response(accept: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes()
}

/// The reason phrase of the status codes ringhub sends.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// A response with a body, `Content-Length` set; `extra` headers are `(name, value)`.
pub fn response(
    status: u16,
    content_type: &str,
    extra: &[(&str, &str)],
    body: &[u8],
    keep_alive: bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + body.len());
    out.extend_from_slice(format!("HTTP/1.1 {status} {}\r\n", reason_phrase(status)).as_bytes());
    if status != 204 {
        out.extend_from_slice(format!("Content-Type: {content_type}\r\n").as_bytes());
        out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    for (name, value) in extra {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if status != 204 {
        out.extend_from_slice(body);
    }
    out
}

/// A negotiate answer (negotiate version 0 or 1; WebSockets, Server-Sent Events and
/// long polling offered).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiation<'a> {
    /// 0 or 1, from [`negotiate_version`]; with 0 there is no separate token and the
    /// client connects with the id itself.
    pub negotiate_version: u32,
    /// The id other parties know the connection by (`Context.ConnectionId`); never a
    /// credential, unlike the token.
    pub connection_id: &'a str,
    /// Sent back by the client as `?id=`; must be URL-safe (the client does not encode it).
    pub connection_token: &'a str,
    /// Only when the client asked (`useStatefulReconnect=true`) and the server allows it.
    pub use_stateful_reconnect: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NegotiateBody<'a> {
    negotiate_version: u32,
    connection_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    connection_token: Option<&'a str>,
    available_transports: [Transport; 3],
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    use_stateful_reconnect: bool,
}

#[derive(Serialize, Clone, Copy)]
struct Transport {
    transport: &'static str,
    #[serde(rename = "transferFormats")]
    transfer_formats: &'static [&'static str],
}

/// The transports ringhub offers, in the order the client tries them (ASP.NET Core's).
const TRANSPORTS: [Transport; 3] = [
    Transport {
        transport: "WebSockets",
        transfer_formats: &["Text", "Binary"],
    },
    Transport {
        transport: "ServerSentEvents",
        transfer_formats: &["Text"],
    },
    Transport {
        transport: "LongPolling",
        transfer_formats: &["Text", "Binary"],
    },
];

/// The negotiate version to answer a request with: `min(requested, 1)`, 0 if absent.
/// `None` when the requested value is not a number.
pub fn negotiate_version(head: &RequestHead) -> Option<u32> {
    match head.query_param("negotiateVersion") {
        None => Some(0),
        Some(v) => v.parse::<u32>().ok().map(|v| v.min(1)),
    }
}

impl Negotiation<'_> {
    /// The JSON body of the `200` answer.
    pub fn body(&self) -> Vec<u8> {
        let body = NegotiateBody {
            negotiate_version: self.negotiate_version,
            connection_id: self.connection_id,
            // Version 0 clients use the connection id as the token.
            connection_token: (self.negotiate_version >= 1).then_some(self.connection_token),
            available_transports: TRANSPORTS,
            use_stateful_reconnect: self.use_stateful_reconnect,
        };
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

/// A negotiate failure body `{"error":"..."}` (sent with status 200, as the client expects).
pub fn negotiate_error_body(error: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "error": error })).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> RequestHead {
        parse_request_head(text.as_bytes(), HttpLimits::default())
            .unwrap()
            .unwrap()
            .0
    }

    const UPGRADE: &str = "GET /hubs/chat?id=abc&access_token=a%2Bb HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

    #[test]
    fn upgrade_gets_the_rfc_accept_key() {
        let h = head(UPGRADE);
        assert_eq!(h.path, "/hubs/chat");
        assert_eq!(h.query_param("id").as_deref(), Some("abc"));
        assert_eq!(h.query_param("access_token").as_deref(), Some("a+b"));
        assert_eq!(
            h.websocket_accept().unwrap(),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        let response = String::from_utf8(upgrade_response("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")).unwrap();
        assert!(response.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(response.ends_with("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"));
    }

    #[test]
    fn bad_upgrades_say_why() {
        let no_version = UPGRADE.replace("Sec-WebSocket-Version: 13\r\n", "");
        assert_eq!(
            head(&no_version).websocket_accept(),
            Err(UpgradeError::UnsupportedVersion)
        );
        let short_key = UPGRADE.replace("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ=");
        assert_eq!(
            head(&short_key).websocket_accept(),
            Err(UpgradeError::InvalidKey)
        );
        let post = UPGRADE.replace("GET", "POST");
        assert_eq!(head(&post).websocket_accept(), Err(UpgradeError::NotGet));
        let no_conn = UPGRADE.replace("keep-alive, Upgrade", "keep-alive");
        assert_eq!(
            head(&no_conn).websocket_accept(),
            Err(UpgradeError::MissingConnectionUpgrade)
        );
    }

    #[test]
    fn heads_arrive_in_pieces_and_are_bounded() {
        let full = UPGRADE.as_bytes();
        for cut in 0..full.len() {
            assert_eq!(
                parse_request_head(&full[..cut], HttpLimits::default()),
                Ok(None)
            );
        }
        let (_, len) = parse_request_head(full, HttpLimits::default())
            .unwrap()
            .unwrap();
        assert_eq!(len, full.len());
        let small = HttpLimits {
            max_head_bytes: 64,
            max_headers: 64,
        };
        assert_eq!(
            parse_request_head(full, small),
            Err(HttpError::HeadTooLarge { limit: 64 })
        );
        let few = HttpLimits {
            max_head_bytes: 4096,
            max_headers: 2,
        };
        assert_eq!(
            parse_request_head(full, few),
            Err(HttpError::TooManyHeaders { limit: 2 })
        );
        assert!(matches!(
            parse_request_head(b"\x00\x01garbage\r\n\r\n", HttpLimits::default()),
            Err(HttpError::Malformed(_))
        ));
    }

    #[test]
    fn bodies_are_measured_strictly() {
        let h = head("POST /api/x HTTP/1.1\r\nContent-Length: 12\r\n\r\n");
        assert_eq!(h.content_length(), Ok(Some(12)));
        for bad in [
            "Content-Length: -1",
            "Content-Length: 1x",
            "Content-Length: 3\r\nContent-Length: 4",
        ] {
            let text = format!("POST / HTTP/1.1\r\n{bad}\r\n\r\n");
            assert_eq!(
                parse_request_head(text.as_bytes(), HttpLimits::default()),
                Err(HttpError::InvalidContentLength),
                "{bad}"
            );
        }
        let chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(
            parse_request_head(chunked, HttpLimits::default()),
            Err(HttpError::ChunkedBody)
        );
    }

    #[test]
    fn paths_decode_and_tokens_are_found() {
        let h = head(
            "GET /api/hubs/chat/groups/ward%3A4b HTTP/1.1\r\nAuthorization: Bearer abc.def\r\n\r\n",
        );
        let segments = h.path_segments().unwrap();
        assert_eq!(segments, ["api", "hubs", "chat", "groups", "ward:4b"]);
        assert_eq!(h.bearer_token(), Some("abc.def"));
        assert!(h.keep_alive());
        let old = head("GET / HTTP/1.0\r\n\r\n");
        assert!(!old.keep_alive());
    }

    #[test]
    fn negotiate_bodies_follow_the_client_rules() {
        let v1 = Negotiation {
            negotiate_version: 1,
            connection_id: "id1",
            connection_token: "tok1",
            use_stateful_reconnect: false,
        };
        assert_eq!(
            String::from_utf8(v1.body()).unwrap(),
            r#"{"negotiateVersion":1,"connectionId":"id1","connectionToken":"tok1","availableTransports":[{"transport":"WebSockets","transferFormats":["Text","Binary"]},{"transport":"ServerSentEvents","transferFormats":["Text"]},{"transport":"LongPolling","transferFormats":["Text","Binary"]}]}"#
        );
        let v0 = Negotiation {
            negotiate_version: 0,
            use_stateful_reconnect: true,
            ..v1
        };
        let body = String::from_utf8(v0.body()).unwrap();
        assert!(!body.contains("connectionToken"));
        assert!(body.ends_with(r#""useStatefulReconnect":true}"#));
        assert_eq!(
            negotiate_version(&head(
                "POST /hubs/h/negotiate?negotiateVersion=5 HTTP/1.1\r\n\r\n"
            )),
            Some(1)
        );
        assert_eq!(
            negotiate_version(&head("POST /hubs/h/negotiate HTTP/1.1\r\n\r\n")),
            Some(0)
        );
        assert_eq!(
            negotiate_version(&head(
                "POST /hubs/h/negotiate?negotiateVersion=x HTTP/1.1\r\n\r\n"
            )),
            None
        );
    }

    #[test]
    fn responses_have_lengths() {
        let r = String::from_utf8(response(404, "text/plain", &[], b"nope", true)).unwrap();
        assert_eq!(
            r,
            "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 4\r\n\r\nnope"
        );
        let r = String::from_utf8(response(204, "text/plain", &[], b"", false)).unwrap();
        assert_eq!(r, "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
    }
}
