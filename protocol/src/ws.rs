//! RFC 6455 WebSocket frames: an incremental decoder for client frames and encoders
//! for server frames.
//!
//! The decoder streams: data payloads are handed out as they arrive (unmasked in place,
//! zero-copy out of the read buffer) rather than reassembled into whole messages,
//! because SignalR treats a connection's data as one byte stream and bounds each hub
//! message itself. Control frames are small (at most 125 bytes) and are returned whole.
//! Input may be split at any byte boundary.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

/// Frame opcodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Opcode {
    /// `0x0`: a further fragment of the data message in progress.
    Continuation,
    /// `0x1`: a data message of UTF-8 text (JSON hub protocol).
    Text,
    /// `0x2`: a data message of bytes (MessagePack hub protocol).
    Binary,
    /// `0x8`: the closing handshake, optionally with a status code and reason.
    Close,
    /// `0x9`: asks the peer for a Pong.
    Ping,
    /// `0xA`: the answer to a Ping, or an unsolicited heartbeat.
    Pong,
}

impl Opcode {
    /// The opcode of a frame header's low four bits; `None` for the reserved codes.
    pub fn from_u8(code: u8) -> Option<Opcode> {
        Some(match code {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xA => Opcode::Pong,
            _ => return None,
        })
    }

    /// The four-bit code written in a frame header.
    pub fn as_u8(self) -> u8 {
        match self {
            Opcode::Continuation => 0x0,
            Opcode::Text => 0x1,
            Opcode::Binary => 0x2,
            Opcode::Close => 0x8,
            Opcode::Ping => 0x9,
            Opcode::Pong => 0xA,
        }
    }

    /// Close, Ping and Pong: never fragmented, at most [`MAX_CONTROL_PAYLOAD`] bytes,
    /// and allowed between the fragments of a data message.
    pub fn is_control(self) -> bool {
        matches!(self, Opcode::Close | Opcode::Ping | Opcode::Pong)
    }
}

/// Close status codes used by ringhub.
pub mod close_code {
    /// 1000: the connection did what it was for; also SignalR's Close message.
    pub const NORMAL: u16 = 1000;
    /// 1001: the server is shutting down (or the client navigates away).
    pub const GOING_AWAY: u16 = 1001;
    /// 1002: the peer broke RFC 6455 (see [`WsError`](super::WsError)).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// 1007: a payload that cannot be read: text that is not UTF-8, a hub message that
    /// does not parse.
    pub const INVALID_DATA: u16 = 1007;
    /// 1008: a message the server refuses by policy rather than by format.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// 1009: a message over the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// 1011: the server failed, not the client.
    pub const INTERNAL_ERROR: u16 = 1011;
}

/// The largest payload a control frame may carry.
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// The status code and reason of a Close frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseFrame {
    /// The status code (see [`close_code`]).
    pub code: u16,
    /// Free UTF-8 text for humans; at most 123 bytes, so the frame stays a control frame.
    pub reason: String,
}

/// What the decoder yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsEvent {
    /// Payload bytes of a data message, already unmasked. A message may arrive in many
    /// pieces; `last` marks its final bytes. `text` is the message's type.
    Data {
        /// `true` for a text message, `false` for binary (the same for every piece).
        text: bool,
        /// This piece's bytes; may be empty.
        payload: Bytes,
        /// The message ends with this piece.
        last: bool,
    },
    /// The peer's Ping with its payload, which the Pong must echo.
    Ping(Bytes),
    /// The peer's Pong with its payload; nothing needs to answer it.
    Pong(Bytes),
    /// The peer closes; `None` when its Close frame carried no status code.
    Close(Option<CloseFrame>),
}

/// Why client frames were refused. Each maps to the close code to answer with.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WsError {
    /// A client frame without a mask, which RFC 6455 requires of every client.
    #[error("client frame is not masked")]
    Unmasked,
    /// RSV1 to RSV3 set: ringhub negotiates no extension (no compression).
    #[error("reserved bits set without a negotiated extension")]
    ReservedBits,
    /// An opcode RFC 6455 reserves; the value is the code.
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    /// A Close, Ping or Pong without the FIN bit.
    #[error("control frame is fragmented")]
    FragmentedControl,
    /// A control frame over [`MAX_CONTROL_PAYLOAD`]; the value is its declared length.
    #[error("control frame payload of {0} bytes exceeds 125 bytes")]
    ControlTooLong(u64),
    /// A Continuation frame while no fragmented message is open.
    #[error("continuation frame without a message to continue")]
    UnexpectedContinuation,
    /// A Text or Binary frame while a fragmented message still waits for its end.
    #[error("new data frame while a fragmented message is still open")]
    ExpectedContinuation,
    /// A 64-bit length with its top bit set, which RFC 6455 forbids.
    #[error("frame length has the most significant bit set")]
    LengthOverflow,
    /// A data message over [`WsLimits::max_message_bytes`], refused as soon as its
    /// frame headers say so, before its payload arrives.
    #[error("WebSocket message exceeds the maximum size of {limit} bytes")]
    TooLarge {
        /// The limit that was exceeded.
        limit: usize,
    },
    /// A text message whose bytes are not UTF-8, checked across fragment boundaries.
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
    /// A Close status code a peer may not send (below 1000, reserved, or unassigned).
    #[error("invalid close status code {0}")]
    InvalidCloseCode(u16),
    /// A Close payload of one byte: too long to be empty, too short for a status code.
    #[error("close frame payload of one byte")]
    InvalidClosePayload,
}

impl WsError {
    /// The status code a server answers this error with.
    pub fn close_code(&self) -> u16 {
        match self {
            WsError::TooLarge { .. } => close_code::TOO_BIG,
            WsError::InvalidUtf8 => close_code::INVALID_DATA,
            _ => close_code::PROTOCOL_ERROR,
        }
    }
}

/// Decoder limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WsLimits {
    /// Largest data message (all its fragments together).
    pub max_message_bytes: usize,
}

impl Default for WsLimits {
    fn default() -> Self {
        WsLimits {
            max_message_bytes: 16 << 20,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum State {
    Header,
    Payload {
        opcode: Opcode,
        fin: bool,
        mask: [u8; 4],
        /// Payload bytes already handed out (for the mask phase).
        offset: usize,
        remaining: usize,
    },
}

/// Incremental decoder of client→server frames.
#[derive(Debug)]
pub struct FrameDecoder {
    limits: WsLimits,
    state: State,
    /// The type of the fragmented data message in progress, if any.
    open_message: Option<Opcode>,
    message_len: usize,
    utf8: Utf8Validator,
}

impl FrameDecoder {
    /// A decoder for one connection, at the start of a frame.
    pub fn new(limits: WsLimits) -> FrameDecoder {
        FrameDecoder {
            limits,
            state: State::Header,
            open_message: None,
            message_len: 0,
            utf8: Utf8Validator::default(),
        }
    }

    /// Decodes the next event from the front of `buf`, consuming what it used.
    /// `Ok(None)`: more bytes are needed. After an error the decoder must not be fed again.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<WsEvent>, WsError> {
        loop {
            match self.state {
                State::Header => {
                    let Some(header) = parse_header(buf)? else {
                        return Ok(None);
                    };
                    self.start_frame(&header)?;
                    buf.advance(header.header_len);
                    self.state = State::Payload {
                        opcode: header.opcode,
                        fin: header.fin,
                        mask: header.mask,
                        offset: 0,
                        remaining: header.payload_len,
                    };
                    // Empty data frames still carry `fin`; report them (the loop goes on).
                }
                State::Payload {
                    opcode,
                    fin,
                    mask,
                    offset,
                    remaining,
                } => {
                    if opcode.is_control() {
                        if buf.len() < remaining {
                            return Ok(None);
                        }
                        let mut payload = buf.split_to(remaining);
                        apply_mask(&mut payload, mask, 0);
                        self.state = State::Header;
                        return control_event(opcode, payload.freeze()).map(Some);
                    }
                    let take = remaining.min(buf.len());
                    if take == 0 && remaining > 0 {
                        return Ok(None);
                    }
                    let mut payload = buf.split_to(take);
                    apply_mask(&mut payload, mask, offset);
                    let remaining = remaining - take;
                    let last = fin && remaining == 0;
                    let text = self.open_message == Some(Opcode::Text);
                    if text {
                        self.utf8.feed(&payload, last)?;
                    }
                    self.state = if remaining == 0 {
                        State::Header
                    } else {
                        State::Payload {
                            opcode,
                            fin,
                            mask,
                            offset: offset + take,
                            remaining,
                        }
                    };
                    if last {
                        self.open_message = None;
                        self.message_len = 0;
                    }
                    return Ok(Some(WsEvent::Data {
                        text,
                        payload: payload.freeze(),
                        last,
                    }));
                }
            }
        }
    }

    /// Checks a frame header against the message in progress and the limits.
    fn start_frame(&mut self, header: &Header) -> Result<(), WsError> {
        if header.opcode.is_control() {
            return Ok(());
        }
        match (header.opcode, self.open_message) {
            (Opcode::Continuation, None) => return Err(WsError::UnexpectedContinuation),
            (Opcode::Continuation, Some(_)) => {}
            (_, Some(_)) => return Err(WsError::ExpectedContinuation),
            (opcode, None) => {
                self.open_message = Some(opcode);
                self.message_len = 0;
                self.utf8 = Utf8Validator::default();
            }
        }
        self.message_len = self.message_len.saturating_add(header.payload_len);
        if self.message_len > self.limits.max_message_bytes {
            return Err(WsError::TooLarge {
                limit: self.limits.max_message_bytes,
            });
        }
        Ok(())
    }
}

struct Header {
    fin: bool,
    opcode: Opcode,
    mask: [u8; 4],
    payload_len: usize,
    header_len: usize,
}

/// Parses a client frame header; `Ok(None)` if `buf` does not hold all of it yet.
fn parse_header(buf: &[u8]) -> Result<Option<Header>, WsError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    let fin = b0 & 0x80 != 0;
    if b0 & 0x70 != 0 {
        return Err(WsError::ReservedBits);
    }
    let opcode = Opcode::from_u8(b0 & 0x0f).ok_or(WsError::UnknownOpcode(b0 & 0x0f))?;
    if b1 & 0x80 == 0 {
        return Err(WsError::Unmasked);
    }
    let (len, len_bytes) = match b1 & 0x7f {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 2),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut raw = [0u8; 8];
                raw.copy_from_slice(b);
                (u64::from_be_bytes(raw), 8)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 0),
    };
    if len >> 63 != 0 {
        return Err(WsError::LengthOverflow);
    }
    if opcode.is_control() {
        if !fin {
            return Err(WsError::FragmentedControl);
        }
        if len > MAX_CONTROL_PAYLOAD as u64 {
            return Err(WsError::ControlTooLong(len));
        }
    }
    let mask_at = 2 + len_bytes;
    let Some(mask) = buf.get(mask_at..mask_at + 4) else {
        return Ok(None);
    };
    Ok(Some(Header {
        fin,
        opcode,
        mask: [mask[0], mask[1], mask[2], mask[3]],
        payload_len: usize::try_from(len).map_err(|_| WsError::LengthOverflow)?,
        header_len: mask_at + 4,
    }))
}

fn control_event(opcode: Opcode, payload: Bytes) -> Result<WsEvent, WsError> {
    Ok(match opcode {
        Opcode::Ping => WsEvent::Ping(payload),
        Opcode::Pong => WsEvent::Pong(payload),
        _ => WsEvent::Close(parse_close_payload(&payload)?),
    })
}

fn parse_close_payload(payload: &[u8]) -> Result<Option<CloseFrame>, WsError> {
    match payload {
        [] => Ok(None),
        [_] => Err(WsError::InvalidClosePayload),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !is_valid_close_code(code) {
                return Err(WsError::InvalidCloseCode(code));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| WsError::InvalidUtf8)?;
            Ok(Some(CloseFrame {
                code,
                reason: reason.to_owned(),
            }))
        }
    }
}

/// Codes a peer may send (RFC 6455 §7.4): 1004-1006 and 1015 are reserved for
/// reporting, below 1000 and 1016-2999 are unassigned.
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// XORs `data` with the masking key, `offset` bytes into the payload.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    let m: [u8; 4] = std::array::from_fn(|i| mask[(offset + i) % 4]);
    let word = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(raw) ^ word).to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= m[i % 4];
    }
}

/// Validates UTF-8 across fragment boundaries, carrying an incomplete character.
#[derive(Debug, Default)]
struct Utf8Validator {
    carry: [u8; 4],
    carry_len: usize,
}

impl Utf8Validator {
    fn feed(&mut self, mut data: &[u8], last: bool) -> Result<(), WsError> {
        if self.carry_len > 0 {
            let width = utf8_width(self.carry[0]);
            let take = (width - self.carry_len).min(data.len());
            self.carry[self.carry_len..self.carry_len + take].copy_from_slice(&data[..take]);
            self.carry_len += take;
            data = &data[take..];
            if self.carry_len < width {
                return if last {
                    Err(WsError::InvalidUtf8)
                } else {
                    Ok(())
                };
            }
            std::str::from_utf8(&self.carry[..width]).map_err(|_| WsError::InvalidUtf8)?;
            self.carry_len = 0;
        }
        match std::str::from_utf8(data) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() && !last => {
                let tail = &data[e.valid_up_to()..];
                self.carry[..tail.len()].copy_from_slice(tail);
                self.carry_len = tail.len();
                Ok(())
            }
            Err(_) => Err(WsError::InvalidUtf8),
        }
    }
}

/// The length of the UTF-8 sequence a (valid) leading byte starts.
fn utf8_width(lead: u8) -> usize {
    match lead {
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

/// A server frame header (servers never mask): at most 10 bytes.
#[derive(Debug, Clone, Copy)]
pub struct FrameHeader {
    bytes: [u8; 10],
    len: u8,
}

/// The largest server frame header.
pub const MAX_SERVER_HEADER: usize = 10;

impl FrameHeader {
    /// The header of a final (unfragmented) frame with this opcode and payload length.
    pub fn new(opcode: Opcode, payload_len: usize) -> FrameHeader {
        let mut bytes = [0u8; 10];
        bytes[0] = 0x80 | opcode.as_u8();
        let len = if payload_len < 126 {
            bytes[1] = payload_len as u8;
            2
        } else if payload_len <= 0xffff {
            bytes[1] = 126;
            bytes[2..4].copy_from_slice(&(payload_len as u16).to_be_bytes());
            4
        } else {
            bytes[1] = 127;
            bytes[2..10].copy_from_slice(&(payload_len as u64).to_be_bytes());
            10
        };
        FrameHeader { bytes, len }
    }

    /// The header's bytes (2, 4 or 10), to write before the payload.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// A complete server frame with this payload.
pub fn encode_frame(opcode: Opcode, payload: &[u8]) -> Bytes {
    let header = FrameHeader::new(opcode, payload.len());
    let mut out = BytesMut::with_capacity(header.as_bytes().len() + payload.len());
    out.put_slice(header.as_bytes());
    out.put_slice(payload);
    out.freeze()
}

/// A server Close frame; the reason is cut to fit the 125-byte control payload.
pub fn encode_close(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode_frame(Opcode::Close, &payload)
}

/// The header of an unmasked server frame at the front of `buf` (client side, for load
/// generators and tests): `(fin, opcode, header length, payload length)`, or `None`
/// if the header is incomplete or not a valid server frame.
pub fn parse_server_frame_header(buf: &[u8]) -> Option<(bool, Opcode, usize, usize)> {
    let [b0, b1, ..] = *buf else { return None };
    let opcode = Opcode::from_u8(b0 & 0x0f)?;
    if b1 & 0x80 != 0 {
        return None;
    }
    let (len, at) = match b1 & 0x7f {
        126 => (
            usize::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)),
            4,
        ),
        127 => (
            usize::try_from(u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?)).ok()?,
            10,
        ),
        n => (usize::from(n), 2),
    };
    Some((b0 & 0x80 != 0, opcode, at, len))
}

/// A masked client frame (for load generators and tests).
pub fn encode_client_frame(
    opcode: Opcode,
    fin: bool,
    payload: &[u8],
    mask: [u8; 4],
    out: &mut BytesMut,
) {
    out.put_u8(if fin { 0x80 } else { 0 } | opcode.as_u8());
    match payload.len() {
        n if n < 126 => out.put_u8(0x80 | n as u8),
        n if n <= 0xffff => {
            out.put_u8(0x80 | 126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(0x80 | 127);
            out.put_u64(n as u64);
        }
    }
    out.put_slice(&mask);
    let start = out.len();
    out.put_slice(payload);
    apply_mask(&mut out[start..], mask, 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn client(opcode: Opcode, fin: bool, payload: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        encode_client_frame(opcode, fin, payload, MASK, &mut out);
        out
    }

    fn decode_all(decoder: &mut FrameDecoder, buf: &mut BytesMut) -> Result<Vec<WsEvent>, WsError> {
        let mut events = Vec::new();
        while let Some(event) = decoder.decode(buf)? {
            events.push(event);
        }
        Ok(events)
    }

    #[test]
    fn decodes_the_rfc_example() {
        // RFC 6455 §5.7: a masked "Hello".
        let mut buf = BytesMut::from(
            &[
                0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
            ][..],
        );
        let mut decoder = FrameDecoder::new(WsLimits::default());
        assert_eq!(
            decoder.decode(&mut buf).unwrap(),
            Some(WsEvent::Data {
                text: true,
                payload: Bytes::from_static(b"Hello"),
                last: true
            })
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn fragments_and_interleaved_control_frames() {
        let mut buf = client(Opcode::Text, false, b"Hel");
        buf.extend_from_slice(&client(Opcode::Ping, true, b"p"));
        buf.extend_from_slice(&client(Opcode::Continuation, true, b"lo"));
        let mut decoder = FrameDecoder::new(WsLimits::default());
        let events = decode_all(&mut decoder, &mut buf).unwrap();
        assert_eq!(
            events,
            vec![
                WsEvent::Data {
                    text: true,
                    payload: Bytes::from_static(b"Hel"),
                    last: false
                },
                WsEvent::Ping(Bytes::from_static(b"p")),
                WsEvent::Data {
                    text: true,
                    payload: Bytes::from_static(b"lo"),
                    last: true
                },
            ]
        );
    }

    #[test]
    fn utf8_split_across_fragments_is_accepted_and_bad_utf8_refused() {
        let euro = "€".as_bytes();
        let mut buf = client(Opcode::Text, false, &euro[..1]);
        buf.extend_from_slice(&client(Opcode::Continuation, true, &euro[1..]));
        let mut decoder = FrameDecoder::new(WsLimits::default());
        assert_eq!(decode_all(&mut decoder, &mut buf).unwrap().len(), 2);

        let mut bad = client(Opcode::Text, true, &[0xff, 0x41]);
        let mut decoder = FrameDecoder::new(WsLimits::default());
        assert_eq!(
            decode_all(&mut decoder, &mut bad),
            Err(WsError::InvalidUtf8)
        );

        let mut cut = client(Opcode::Text, true, &euro[..2]);
        let mut decoder = FrameDecoder::new(WsLimits::default());
        assert_eq!(
            decode_all(&mut decoder, &mut cut),
            Err(WsError::InvalidUtf8)
        );
    }

    #[test]
    fn protocol_violations_are_errors() {
        let cases: Vec<(Vec<u8>, WsError)> = vec![
            (
                vec![0x81, 0x05, b'h', b'e', b'l', b'l', b'o'],
                WsError::Unmasked,
            ),
            (vec![0xc1, 0x80, 0, 0, 0, 0], WsError::ReservedBits),
            (vec![0x83, 0x80, 0, 0, 0, 0], WsError::UnknownOpcode(3)),
            (vec![0x09, 0x80, 0, 0, 0, 0], WsError::FragmentedControl),
            (
                vec![0x89, 0xfe, 0, 126, 0, 0, 0, 0],
                WsError::ControlTooLong(126),
            ),
            (
                vec![0x80, 0x80, 0, 0, 0, 0],
                WsError::UnexpectedContinuation,
            ),
            (
                vec![0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                WsError::LengthOverflow,
            ),
            (
                vec![0x88, 0x81, 0, 0, 0, 0, 3],
                WsError::InvalidClosePayload,
            ),
            (
                vec![0x88, 0x82, 0, 0, 0, 0, 0x03, 0xed],
                WsError::InvalidCloseCode(1005),
            ),
        ];
        for (bytes, expected) in cases {
            let mut decoder = FrameDecoder::new(WsLimits::default());
            let mut buf = BytesMut::from(&bytes[..]);
            assert_eq!(
                decode_all(&mut decoder, &mut buf),
                Err(expected),
                "{bytes:02x?}"
            );
        }
        let mut twice = client(Opcode::Text, false, b"a");
        twice.extend_from_slice(&client(Opcode::Binary, true, b"b"));
        let mut decoder = FrameDecoder::new(WsLimits::default());
        assert_eq!(
            decode_all(&mut decoder, &mut twice),
            Err(WsError::ExpectedContinuation)
        );
    }

    #[test]
    fn message_size_limit_spans_fragments_and_is_checked_on_the_header() {
        let limits = WsLimits {
            max_message_bytes: 4,
        };
        let mut buf = client(Opcode::Binary, false, b"abc");
        buf.extend_from_slice(&client(Opcode::Continuation, true, b"de")[..6]);
        let mut decoder = FrameDecoder::new(limits);
        assert_eq!(
            decode_all(&mut decoder, &mut buf),
            Err(WsError::TooLarge { limit: 4 })
        );
    }

    #[test]
    fn close_frames_carry_codes_and_reasons() {
        let mut payload = 1001u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        let mut buf = client(Opcode::Close, true, &payload);
        let mut decoder = FrameDecoder::new(WsLimits::default());
        assert_eq!(
            decoder.decode(&mut buf).unwrap(),
            Some(WsEvent::Close(Some(CloseFrame {
                code: 1001,
                reason: "bye".into()
            })))
        );
        let frame = encode_close(1000, &"x".repeat(300));
        assert_eq!(frame.len(), 2 + 125);
        assert_eq!(&frame[..4], &[0x88, 125, 0x03, 0xe8]);
    }

    #[test]
    fn server_frame_headers_read_back() {
        for len in [0usize, 125, 126, 65_535, 65_536] {
            let frame = encode_frame(Opcode::Binary, &vec![0; len]);
            let header = FrameHeader::new(Opcode::Binary, len);
            assert_eq!(
                parse_server_frame_header(&frame),
                Some((true, Opcode::Binary, header.as_bytes().len(), len))
            );
        }
        assert_eq!(parse_server_frame_header(&[0x81]), None);
        assert_eq!(
            parse_server_frame_header(&[0x81, 0x85, 0, 0, 0, 0]),
            None,
            "masked"
        );
    }

    #[test]
    fn server_headers_use_the_shortest_length() {
        assert_eq!(FrameHeader::new(Opcode::Text, 125).as_bytes(), &[0x81, 125]);
        assert_eq!(
            FrameHeader::new(Opcode::Binary, 126).as_bytes(),
            &[0x82, 126, 0, 126]
        );
        assert_eq!(
            FrameHeader::new(Opcode::Binary, 65_536).as_bytes(),
            &[0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]
        );
    }

    #[test]
    fn mask_with_offset_matches_bytewise_xor() {
        for offset in 0..8 {
            let original: Vec<u8> = (0..37u8).collect();
            let mut fast = original.clone();
            apply_mask(&mut fast, MASK, offset);
            let slow: Vec<u8> = original
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ MASK[(offset + i) % 4])
                .collect();
            assert_eq!(fast, slow);
        }
    }
}
