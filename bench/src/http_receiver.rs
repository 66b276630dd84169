//! SignalR receivers over Server-Sent Events and long polling, for the load generator:
//! negotiate, the receive channel, the handshake and join by POST, then every record
//! handed to the caller as a WebSocket receiver's frame payloads are. Minimal HTTP/1.1
//! (ringhub answers with `Content-Length` everywhere but the event stream).

use std::net::SocketAddr;

use bytes::{Buf, BytesMut};
use memchr::memmem;
use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;
use ringhub_protocol::hub::HubProtocol;

use crate::client::read;

/// How receivers get their messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiverTransport {
    WebSockets,
    ServerSentEvents,
    LongPolling,
}

impl ReceiverTransport {
    pub fn from_name(name: &str) -> Option<ReceiverTransport> {
        match name {
            "websockets" => Some(ReceiverTransport::WebSockets),
            "sse" => Some(ReceiverTransport::ServerSentEvents),
            "longpolling" => Some(ReceiverTransport::LongPolling),
            _ => None,
        }
    }
}

/// One keep-alive HTTP connection, one request at a time.
pub struct HttpConnection {
    stream: TcpStream,
    buf: BytesMut,
}

impl HttpConnection {
    pub async fn open(addr: SocketAddr) -> std::io::Result<HttpConnection> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(HttpConnection {
            stream,
            buf: BytesMut::with_capacity(16 * 1024),
        })
    }

    /// Sends a request and reads its answer: (status, body).
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> std::io::Result<(u16, BytesMut)> {
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        self.stream.write_all(request).await.0?;
        let (status, head_len, length) = loop {
            if let Some(end) = memmem::find(&self.buf, b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end])
                    .map_err(|_| std::io::Error::other("answer head is not UTF-8"))?;
                let status = head
                    .get(9..12)
                    .and_then(|s| s.parse::<u16>().ok())
                    .ok_or_else(|| std::io::Error::other("no status"))?;
                let length = head
                    .lines()
                    .filter_map(|line| line.split_once(':'))
                    .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, value)| value.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                break (status, end + 4, length);
            }
            read(&mut self.stream, &mut self.buf).await?;
        };
        while self.buf.len() < head_len + length {
            read(&mut self.stream, &mut self.buf).await?;
        }
        self.buf.advance(head_len);
        Ok((status, self.buf.split_to(length)))
    }
}

/// Negotiates a connection on `hub`: its token.
async fn negotiate(http: &mut HttpConnection, hub: &str) -> std::io::Result<String> {
    let (status, body) = http
        .request(
            "POST",
            &format!("/hubs/{hub}/negotiate?negotiateVersion=1"),
            b"",
        )
        .await?;
    let json: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| std::io::Error::other(format!("negotiate ({status}): {e}")))?;
    json["connectionToken"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| std::io::Error::other("negotiate gave no token"))
}

/// A receiver over Server-Sent Events or long polling: connects, handshakes, sends
/// `join` (a hub message, as `Wire::join` builds it but without WebSocket framing), then
/// hands every record it receives to `each` until the connection ends.
pub async fn receive(
    addr: SocketAddr,
    hub: &str,
    protocol: HubProtocol,
    transport: ReceiverTransport,
    join: &[u8],
    mut each: impl FnMut(&[u8]),
) -> std::io::Result<()> {
    let mut http = HttpConnection::open(addr).await?;
    let token = negotiate(&mut http, hub).await?;
    let path = format!("/hubs/{hub}?id={token}");
    let mut send = format!(
        "{{\"protocol\":\"{}\",\"version\":1}}\u{1e}",
        protocol.name()
    )
    .into_bytes();
    send.extend_from_slice(join);
    match transport {
        ReceiverTransport::ServerSentEvents => {
            let mut stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let head =
                format!("GET {path} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n");
            stream.write_all(head.into_bytes()).await.0?;
            let mut buf = BytesMut::with_capacity(16 * 1024);
            // The stream is open once its head and the opening comment came.
            while memmem::find(&buf, b"\r\n\r\n:\r\n").is_none() {
                read(&mut stream, &mut buf).await?;
            }
            let at = memmem::find(&buf, b"\r\n\r\n:\r\n").unwrap_or(0);
            buf.advance(at + 7);
            http.request("POST", &path, &send).await?;
            drop(http);
            loop {
                while let Some(end) = memmem::find(&buf, b"\r\n\r\n") {
                    let event = buf.split_to(end + 4);
                    // ringhub writes one record per event, in one `data:` line.
                    if let Some(data) = event.strip_prefix(b"data: ") {
                        each(&data[..data.len() - 4]);
                    }
                }
                read(&mut stream, &mut buf).await?;
            }
        }
        ReceiverTransport::LongPolling | ReceiverTransport::WebSockets => {
            let (status, _) = http.request("GET", &path, b"").await?;
            if status != 200 {
                return Err(std::io::Error::other(format!("first poll: {status}")));
            }
            http.request("POST", &path, &send).await?;
            loop {
                let (status, mut body) = http.request("GET", &path, b"").await?;
                if status != 200 {
                    return Err(std::io::Error::other(format!("poll: {status}")));
                }
                while let Ok(Some(record)) = protocol.split_record(&body, usize::MAX) {
                    let used = record.consumed;
                    each(&body[..used]);
                    body.advance(used);
                }
            }
        }
    }
}
