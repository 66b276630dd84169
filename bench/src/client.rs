//! The load generator's client side of the wire: connecting over WebSocket with
//! SignalR (JSON or MessagePack) or Socket.IO, building the few messages it sends, and
//! reading what it receives without a general decoder (the load generator must stay
//! cheaper than the servers it measures).

use std::net::SocketAddr;

use bytes::{Buf, BytesMut};
use memchr::memmem;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use ringhub_protocol::hub::{HubMessage, HubProtocol, Invocation};
use ringhub_protocol::ws::{encode_client_frame, parse_server_frame_header, Opcode};
use ringhub_protocol::Value;

/// What the load generator speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    SignalR(HubProtocol),
    /// Socket.IO v5 over Engine.IO v4, WebSocket transport only.
    SocketIo,
}

impl Wire {
    pub fn from_name(name: &str) -> Option<Wire> {
        match name {
            "socketio" => Some(Wire::SocketIo),
            other => HubProtocol::from_name(other).map(Wire::SignalR),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Wire::SignalR(protocol) => protocol.name(),
            Wire::SocketIo => "socketio",
        }
    }

    /// A client frame asking to join `group`, answered by one completion (or ack).
    pub fn join(self, group: &str) -> Vec<u8> {
        match self {
            Wire::SignalR(protocol) => invocation_frame(
                protocol,
                Some("j".into()),
                "JoinGroup",
                vec![Value::Str(group.into())],
            ),
            Wire::SocketIo => text_frame(format!("420[\"join\",\"{group}\"]").as_bytes()),
        }
    }

    /// A client frame sending a numbered message to `group`, answered by one completion.
    /// Recipients get `receive(publisher, seq, sent_ns, payload)`.
    pub fn publish(
        self,
        group: &str,
        publisher: u32,
        seq: u64,
        sent_ns: u64,
        payload: &str,
    ) -> Vec<u8> {
        match self {
            Wire::SignalR(protocol) => invocation_frame(
                protocol,
                Some("p".into()),
                "SendToGroup",
                vec![
                    Value::Str(group.into()),
                    Value::from("receive"),
                    Value::Array(vec![
                        Value::from_u64(publisher.into()),
                        Value::from_u64(seq),
                        Value::from_u64(sent_ns),
                        Value::Str(payload.into()),
                    ]),
                ],
            ),
            Wire::SocketIo => text_frame(
                format!("421[\"send\",\"{group}\",{publisher},{seq},{sent_ns},\"{payload}\"]")
                    .as_bytes(),
            ),
        }
    }

    /// Whether a server frame's payload answers an invocation (completion or ack).
    pub fn is_completion(self, payload: &[u8]) -> bool {
        match self {
            Wire::SignalR(HubProtocol::Json) => memmem::find(payload, b"\"type\":3").is_some(),
            Wire::SignalR(HubProtocol::MessagePack) => {
                // Length prefix, then an array whose first element is the type.
                let body = skip_varint(payload);
                body.len() >= 2 && body[1] == 3
            }
            Wire::SocketIo => payload.starts_with(b"43"),
        }
    }

    /// `(publisher, seq, sent_ns)` of a delivered `receive`, if the frame is one.
    pub fn delivery(self, payload: &[u8]) -> Option<(u32, u64, u64)> {
        let rest = match self {
            Wire::SignalR(HubProtocol::Json) => {
                let at = ARGUMENTS.find(payload)?;
                &payload[at + ARGUMENTS.needle().len()..]
            }
            Wire::SignalR(HubProtocol::MessagePack) => return msgpack_delivery(payload),
            Wire::SocketIo => payload.strip_prefix(b"42[\"receive\",")?,
        };
        let (publisher, rest) = leading_int(rest)?;
        let (seq, rest) = leading_int(rest.strip_prefix(b",")?)?;
        let (sent, _) = leading_int(rest.strip_prefix(b",")?)?;
        Some((u32::try_from(publisher).ok()?, seq, sent))
    }
}

static ARGUMENTS: std::sync::LazyLock<memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memmem::Finder::new(b"\"arguments\":["));

fn leading_int(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 19 {
        return None;
    }
    let value = bytes[..digits]
        .iter()
        .fold(0u64, |n, b| n * 10 + u64::from(b - b'0'));
    Some((value, &bytes[digits..]))
}

fn skip_varint(payload: &[u8]) -> &[u8] {
    let len = payload
        .iter()
        .take(5)
        .take_while(|b| *b & 0x80 != 0)
        .count()
        + 1;
    payload.get(len..).unwrap_or(&[])
}

fn msgpack_delivery(payload: &[u8]) -> Option<(u32, u64, u64)> {
    use rmp::decode;
    let mut body = skip_varint(payload);
    let items = decode::read_array_len(&mut body).ok()?;
    let kind: u8 = decode::read_int(&mut body).ok()?;
    if kind != 1 || items < 5 {
        return None;
    }
    if decode::read_map_len(&mut body).ok()? != 0 {
        return None;
    }
    // Invocation id: nil for a non-blocking invocation.
    match rmp::decode::read_marker(&mut body).ok()? {
        rmp::Marker::Null => {}
        _ => return None,
    }
    let target = decode::read_str_len(&mut body).ok()? as usize;
    body = body.get(target..)?;
    if decode::read_array_len(&mut body).ok()? < 3 {
        return None;
    }
    let publisher: u32 = decode::read_int(&mut body).ok()?;
    let seq: u64 = decode::read_int(&mut body).ok()?;
    let sent: u64 = decode::read_int(&mut body).ok()?;
    Some((publisher, seq, sent))
}

pub fn text_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = BytesMut::new();
    encode_client_frame(Opcode::Text, true, payload, [9, 8, 7, 6], &mut frame);
    frame.to_vec()
}

pub fn invocation_frame(
    protocol: HubProtocol,
    id: Option<String>,
    target: &str,
    arguments: Vec<Value>,
) -> Vec<u8> {
    let record = invocation_record(protocol, id, target, arguments);
    let mut frame = BytesMut::new();
    encode_client_frame(protocol.opcode(), true, &record, [9, 8, 7, 6], &mut frame);
    frame.to_vec()
}

/// An invocation as a bare hub record (what HTTP transports send).
pub fn invocation_record(
    protocol: HubProtocol,
    id: Option<String>,
    target: &str,
    arguments: Vec<Value>,
) -> Vec<u8> {
    let message = HubMessage::Invocation(Invocation {
        invocation_id: id,
        target: target.into(),
        arguments,
        ..Invocation::default()
    });
    let mut record = BytesMut::new();
    protocol.encode(&message, &mut record);
    record.to_vec()
}

/// Connects, upgrades and takes the handshake; returns the stream and any bytes read
/// past the handshake answer.
pub async fn open(
    addr: SocketAddr,
    hub: &str,
    wire: Wire,
) -> std::io::Result<(TcpStream, BytesMut)> {
    open_with(addr, hub, wire, false).await
}

/// [`open`]; with `stateful`, a SignalR connection negotiates stateful reconnect first
/// and asks for it in its handshake (version 2), as `withStatefulReconnect()` does.
pub async fn open_with(
    addr: SocketAddr,
    hub: &str,
    wire: Wire,
    stateful: bool,
) -> std::io::Result<(TcpStream, BytesMut)> {
    let mut path = match wire {
        Wire::SignalR(_) => format!("/hubs/{hub}"),
        Wire::SocketIo => "/socket.io/?EIO=4&transport=websocket".to_owned(),
    };
    if stateful {
        let token = negotiate_stateful(addr, hub).await?;
        path = format!("/hubs/{hub}?id={token}");
    }
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let head = format!(
        "GET {path} HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    let (result, _) = stream.write_all(head.into_bytes()).await;
    result?;
    let mut buf = BytesMut::with_capacity(8192);
    // Like a browser, speak only after the 101 (some servers refuse pipelined bytes).
    let end = loop {
        if let Some(end) = memmem::find(&buf, b"\r\n\r\n") {
            break end;
        }
        read(&mut stream, &mut buf).await?;
    };
    if !buf.starts_with(b"HTTP/1.1 101") {
        return Err(std::io::Error::other(
            String::from_utf8_lossy(&buf[..end]).into_owned(),
        ));
    }
    buf.advance(end + 4);
    match wire {
        Wire::SignalR(protocol) => {
            let handshake = format!(
                "{{\"protocol\":\"{}\",\"version\":{}}}\u{1e}",
                protocol.name(),
                if stateful { 2 } else { 1 }
            );
            write(&mut stream, text_frame(handshake.as_bytes())).await?;
            next_frame(&mut stream, &mut buf).await?;
        }
        Wire::SocketIo => {
            // Engine.IO open packet, then connect to the main namespace and wait for its
            // answer (events sent before it are dropped), answering pings meanwhile.
            next_frame(&mut stream, &mut buf).await?;
            write(&mut stream, text_frame(b"40")).await?;
            loop {
                let payload = next_frame(&mut stream, &mut buf).await?;
                if payload.starts_with(b"40") {
                    break;
                }
                if payload[..] == b"2"[..] {
                    write(&mut stream, text_frame(b"3")).await?;
                }
            }
        }
    }
    Ok((stream, buf))
}

/// `POST /hubs/{hub}/negotiate` asking for stateful reconnect; the connection token.
async fn negotiate_stateful(addr: SocketAddr, hub: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!(
        "POST /hubs/{hub}/negotiate?negotiateVersion=1&useStatefulReconnect=true HTTP/1.1\r\nHost: bench\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    write(&mut stream, request.into_bytes()).await?;
    let mut buf = BytesMut::new();
    while read(&mut stream, &mut buf).await.is_ok() {}
    let body = memmem::find(&buf, b"\r\n\r\n").map_or(&buf[..], |end| &buf[end + 4..]);
    let answer: serde_json::Value = serde_json::from_slice(body).map_err(std::io::Error::other)?;
    if answer["useStatefulReconnect"] != true {
        return Err(std::io::Error::other(
            "the server did not offer stateful reconnect",
        ));
    }
    answer["connectionToken"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| std::io::Error::other("no connection token"))
}

/// A client frame acknowledging every tracked message up to `sequence_id` (stateful
/// reconnect's Ack).
pub fn ack_frame(protocol: HubProtocol, sequence_id: u64) -> Vec<u8> {
    let mut record = BytesMut::new();
    protocol.encode(&HubMessage::Ack { sequence_id }, &mut record);
    let mut frame = BytesMut::new();
    encode_client_frame(protocol.opcode(), true, &record, [9, 8, 7, 6], &mut frame);
    frame.to_vec()
}

async fn write(stream: &mut TcpStream, bytes: Vec<u8>) -> std::io::Result<()> {
    stream.write_all(bytes).await.0.map(drop)
}

/// Reads until one whole frame is there; takes it out and returns its payload.
async fn next_frame(stream: &mut TcpStream, buf: &mut BytesMut) -> std::io::Result<BytesMut> {
    loop {
        if let Some((_, _, header, len)) = parse_server_frame_header(buf) {
            if buf.len() >= header + len {
                let mut frame = buf.split_to(header + len);
                return Ok(frame.split_off(header));
            }
        }
        read(stream, buf).await?;
    }
}

/// Appends what the socket has to `buf`; an error at end of stream.
pub async fn read(stream: &mut impl AsyncReadRent, buf: &mut BytesMut) -> std::io::Result<()> {
    buf.reserve(16 * 1024);
    let (start, end) = (buf.len(), buf.capacity());
    let (result, slice) = stream.read(std::mem::take(buf).slice_mut(start..end)).await;
    *buf = slice.into_inner();
    match result? {
        0 => Err(std::io::ErrorKind::UnexpectedEof.into()),
        _ => Ok(()),
    }
}

/// Hands the payload of every complete data frame in `buf` to `each` and removes it;
/// returns the frames a Socket.IO client must answer (pings, as pongs).
pub fn drain_frames(buf: &mut BytesMut, wire: Wire, mut each: impl FnMut(&[u8])) -> Vec<u8> {
    let mut replies = Vec::new();
    while let Some((_, opcode, header, len)) = parse_server_frame_header(buf) {
        if buf.len() < header + len {
            break;
        }
        if matches!(opcode, Opcode::Text | Opcode::Binary) {
            let payload = &buf[header..header + len];
            if wire == Wire::SocketIo && payload == b"2" {
                replies.extend_from_slice(&text_frame(b"3"));
            } else {
                each(payload);
            }
        }
        buf.advance(header + len);
    }
    replies
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringhub_protocol::frame;

    fn server_payload(protocol: HubProtocol, message: &HubMessage) -> Vec<u8> {
        let framed = frame::encode_message(protocol, message);
        let (_, _, header, len) = parse_server_frame_header(&framed).unwrap();
        framed[header..header + len].to_vec()
    }

    #[test]
    fn deliveries_and_completions_are_recognised_in_every_wire() {
        let delivered = HubMessage::invocation(
            "receive",
            vec![
                Value::Int(3),
                Value::Int(41),
                Value::Int(1_700_000_000_123),
                "xx".into(),
            ],
        );
        let completion = HubMessage::completion(
            "p",
            ringhub_protocol::hub::CompletionOutcome::Result(Value::Null),
        );
        for protocol in [HubProtocol::Json, HubProtocol::MessagePack] {
            let wire = Wire::SignalR(protocol);
            let payload = server_payload(protocol, &delivered);
            assert_eq!(wire.delivery(&payload), Some((3, 41, 1_700_000_000_123)));
            assert!(!wire.is_completion(&payload));
            let payload = server_payload(protocol, &completion);
            assert!(wire.is_completion(&payload));
            assert_eq!(wire.delivery(&payload), None);
        }
        let wire = Wire::SocketIo;
        assert_eq!(
            wire.delivery(b"42[\"receive\",3,41,77,\"xx\"]"),
            Some((3, 41, 77))
        );
        assert!(wire.is_completion(b"431[]"));
        assert_eq!(wire.delivery(b"431[]"), None);
    }
}
