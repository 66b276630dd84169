//! "Encode once": a server→client hub message as one complete unit of its transport's
//! [`Framing`] (a WebSocket frame, a Server-Sent Event, or the bare record a long poll
//! answers with) in a [`Bytes`], ready to be written unchanged to every connection
//! that uses the same hub protocol and framing. Cloning the `Bytes` for each recipient
//! costs a reference count, not a copy.
//!
//! The frame is built in one allocation with no copying: the hub record is written
//! behind room reserved for the longest possible headers, then the WebSocket header
//! (and, for MessagePack, the length prefix) are written right in front of it and the
//! unused front of the buffer is skipped.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::hub::{json, msgpack, HubMessage, HubProtocol};
use crate::ws::{FrameHeader, MAX_SERVER_HEADER};

/// Room for the longest WebSocket header and the longest varint length prefix.
const HEADROOM: usize = MAX_SERVER_HEADER + 5;

/// Initial capacity: most broadcast frames are small.
const TYPICAL_FRAME: usize = 256;

/// One hub message as a complete WebSocket frame (text for JSON, binary for MessagePack).
pub fn encode_message(protocol: HubProtocol, message: &HubMessage) -> Bytes {
    let mut buf = BytesMut::with_capacity(TYPICAL_FRAME);
    buf.put_bytes(0, HEADROOM);
    let mut start = HEADROOM;
    match protocol {
        HubProtocol::Json => json::encode(message, &mut buf),
        HubProtocol::MessagePack => {
            msgpack::encode_body(message, &mut buf);
            let body_len = buf.len() - HEADROOM;
            start -= msgpack::length_prefix_len(body_len);
            let mut prefix = &mut buf[start..HEADROOM];
            msgpack::write_length_prefix(body_len, &mut prefix);
        }
    }
    let header = FrameHeader::new(protocol.opcode(), buf.len() - start);
    let header = header.as_bytes();
    start -= header.len();
    buf[start..start + header.len()].copy_from_slice(header);
    buf.advance(start);
    buf.freeze()
}

/// Raw bytes (a handshake response, records already encoded) as one frame of the
/// type `protocol` uses: the reference server answers a MessagePack handshake in a
/// binary frame.
pub fn encode_raw(protocol: HubProtocol, payload: &[u8]) -> Bytes {
    crate::ws::encode_frame(protocol.opcode(), payload)
}

/// How a transport carries hub records to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Framing {
    /// One WebSocket message per unit (text for JSON, binary for MessagePack).
    WebSocket,
    /// One Server-Sent Event per unit: `data: <line>` lines and an empty line.
    ServerSentEvents,
    /// The records themselves, concatenated into a long poll's answer.
    Raw,
}

impl Framing {
    /// Every framing, in [`Framing::index`] order: to fill a table with one entry each.
    pub const ALL: [Framing; 3] = [Framing::WebSocket, Framing::ServerSentEvents, Framing::Raw];

    /// A dense index (0..3), for tables keyed by framing.
    pub fn index(self) -> usize {
        match self {
            Framing::WebSocket => 0,
            Framing::ServerSentEvents => 1,
            Framing::Raw => 2,
        }
    }
}

/// One hub message as one complete unit of `framing`.
pub fn encode_framed(protocol: HubProtocol, framing: Framing, message: &HubMessage) -> Bytes {
    match framing {
        Framing::WebSocket => encode_message(protocol, message),
        Framing::ServerSentEvents => {
            let mut record = BytesMut::with_capacity(TYPICAL_FRAME);
            protocol.encode(message, &mut record);
            sse_event(&record)
        }
        Framing::Raw => {
            let mut record = BytesMut::with_capacity(TYPICAL_FRAME);
            protocol.encode(message, &mut record);
            record.freeze()
        }
    }
}

/// Bytes already encoded as records (a handshake answer) as one unit of `framing`.
pub fn frame_raw(protocol: HubProtocol, framing: Framing, records: &[u8]) -> Bytes {
    match framing {
        Framing::WebSocket => encode_raw(protocol, records),
        Framing::ServerSentEvents => sse_event(records),
        Framing::Raw => Bytes::copy_from_slice(records),
    }
}

/// `payload` as one Server-Sent Event: each line as `data: <line>\r\n` (a `\r` before
/// a `\n` dropped), then an empty line, as ASP.NET Core's formatter writes it. JSON
/// records hold no raw line breaks, so this is normally one `data:` line.
pub fn sse_event(payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 10);
    for line in payload.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::Value;
    use crate::ws::{encode_client_frame, FrameDecoder, Opcode, WsEvent, WsLimits};

    /// Reads a server frame back: (opcode byte, payload).
    fn split_server_frame(frame: &[u8]) -> (u8, &[u8]) {
        let (len, at) = match frame[1] {
            126 => (usize::from(u16::from_be_bytes([frame[2], frame[3]])), 4),
            127 => (
                u64::from_be_bytes(frame[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (usize::from(n), 2),
        };
        assert_eq!(frame.len(), at + len, "frame length matches its header");
        (frame[0], &frame[at..])
    }

    #[test]
    fn frames_hold_exactly_one_encoded_record() {
        for size in [1, 100, 200, 70_000] {
            let message = HubMessage::invocation("Receive", vec![Value::Str("y".repeat(size))]);
            for protocol in [HubProtocol::Json, HubProtocol::MessagePack] {
                let frame = encode_message(protocol, &message);
                let (first, payload) = split_server_frame(&frame);
                assert_eq!(first, 0x80 | protocol.opcode().as_u8());
                let mut expected = BytesMut::new();
                protocol.encode(&message, &mut expected);
                assert_eq!(payload, &expected[..], "{protocol:?} {size}");
            }
        }
    }

    #[test]
    fn a_frame_decodes_back_through_the_client_path() {
        let message = HubMessage::invocation("Receive", vec![Value::Int(7)]);
        let frame = encode_message(HubProtocol::MessagePack, &message);
        let (_, payload) = split_server_frame(&frame);
        // Re-mask it as a client would and run it through the server decoder.
        let mut wire = BytesMut::new();
        encode_client_frame(Opcode::Binary, true, payload, [1, 2, 3, 4], &mut wire);
        let mut decoder = FrameDecoder::new(WsLimits::default());
        let Some(WsEvent::Data { payload, .. }) = decoder.decode(&mut wire).unwrap() else {
            panic!("expected data");
        };
        let (messages, _) = HubProtocol::MessagePack
            .decode_all(&payload, 1 << 20)
            .unwrap();
        assert_eq!(messages, vec![message]);
    }

    #[test]
    fn every_framing_carries_the_same_record() {
        let message = HubMessage::invocation("Receive", vec![Value::Str("a\nb".into())]);
        for protocol in [HubProtocol::Json, HubProtocol::MessagePack] {
            let mut record = BytesMut::new();
            protocol.encode(&message, &mut record);
            assert_eq!(encode_framed(protocol, Framing::Raw, &message), record);
            let frame = encode_framed(protocol, Framing::WebSocket, &message);
            let (_, payload) = split_server_frame(&frame);
            assert_eq!(payload, &record[..]);
        }
        let mut record = BytesMut::new();
        HubProtocol::Json.encode(&message, &mut record);
        let event = encode_framed(HubProtocol::Json, Framing::ServerSentEvents, &message);
        let mut expected = b"data: ".to_vec();
        expected.extend_from_slice(&record);
        expected.extend_from_slice(b"\r\n\r\n");
        assert_eq!(
            &event[..],
            &expected[..],
            "JSON escapes line breaks: one data line"
        );
    }

    #[test]
    fn sse_events_split_lines() {
        assert_eq!(
            &sse_event(b"a\r\nb\nc")[..],
            b"data: a\r\ndata: b\r\ndata: c\r\n\r\n"
        );
        assert_eq!(&sse_event(b"")[..], b"data: \r\n\r\n");
    }
}
