//! The SignalR MessagePack hub protocol: each message is a MessagePack array behind a
//! varint length prefix (little-endian base 128, at most 5 bytes, at most 2^31 - 1).
//!
//! Reading dispatches on `rmp::Marker`; writing is a small infallible writer straight
//! into `BytesMut` (rmp's writers report I/O errors a memory buffer never has). The
//! tests check that both agree byte for byte with rmp's own encoder.

use bytes::{BufMut, BytesMut};
use rmp::Marker;

use super::{
    CancelInvocation, Close, Completion, CompletionOutcome, Headers, HubMessage, Invocation,
    MessageError, Record, StreamItem,
};
use crate::value::{Value, MAX_DEPTH};

/// The largest message the length prefix can describe.
pub const MAX_LENGTH_PREFIX: usize = (1 << 31) - 1;

/// Result kinds of a Completion.
const RESULT_ERROR: u64 = 1;
const RESULT_VOID: u64 = 2;
const RESULT_VALUE: u64 = 3;

pub(super) fn split_record(
    buf: &[u8],
    max_message_bytes: usize,
) -> Result<Option<Record<'_>>, MessageError> {
    let Some((length, prefix)) = read_length_prefix(buf)? else {
        return Ok(None);
    };
    if length == 0 {
        return Err(MessageError::Empty);
    }
    if length > max_message_bytes {
        return Err(MessageError::TooLarge {
            limit: max_message_bytes,
        });
    }
    let end = prefix + length;
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some(Record {
        body: &buf[prefix..end],
        consumed: end,
    }))
}

/// Reads a varint length prefix: `(length, prefix bytes)`, or `None` if incomplete.
pub fn read_length_prefix(buf: &[u8]) -> Result<Option<(usize, usize)>, MessageError> {
    let mut length = 0usize;
    for (index, &byte) in buf.iter().take(5).enumerate() {
        if index == 4 && byte > 0x07 {
            return Err(MessageError::LengthPrefix);
        }
        length |= usize::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            return Ok(Some((length, index + 1)));
        }
    }
    Ok(None)
}

/// Writes `length` as a varint prefix.
pub fn write_length_prefix(length: usize, out: &mut impl BufMut) {
    let mut rest = length.min(MAX_LENGTH_PREFIX);
    loop {
        let low = (rest & 0x7f) as u8;
        rest >>= 7;
        if rest == 0 {
            out.put_u8(low);
            return;
        }
        out.put_u8(low | 0x80);
    }
}

/// How many bytes the prefix of `length` takes.
pub fn length_prefix_len(length: usize) -> usize {
    match length {
        0..=0x7f => 1,
        0x80..=0x3fff => 2,
        0x4000..=0x1f_ffff => 3,
        0x20_0000..=0xfff_ffff => 4,
        _ => 5,
    }
}

/// Parses one record body (without its length prefix).
pub fn parse(body: &[u8]) -> Result<Option<HubMessage>, MessageError> {
    let mut r = Reader { buf: body, pos: 0 };
    let len = r.array_len("message")?;
    if len == 0 {
        return Err(MessageError::Empty);
    }
    let message_type = r.uint("type")?;
    let needs = |count: usize, field: &'static str| {
        if len < count {
            Err(MessageError::MissingField {
                message_type,
                field,
            })
        } else {
            Ok(())
        }
    };
    let message = match message_type {
        1 | 4 => {
            needs(5, "arguments")?;
            let headers = r.headers()?;
            let invocation_id = r
                .optional_str("invocationId")?
                .filter(|id| !id.is_empty())
                .map(str::to_owned);
            let target = r.str("target")?.to_owned();
            let arguments = r.arguments()?;
            let stream_ids = if len > 5 {
                r.string_array("streamIds")?
            } else {
                Vec::new()
            };
            let invocation = Invocation {
                headers,
                invocation_id,
                target,
                arguments,
                stream_ids,
            };
            if message_type == 1 {
                HubMessage::Invocation(invocation)
            } else {
                if invocation.invocation_id.is_none() {
                    return Err(MessageError::MissingField {
                        message_type,
                        field: "invocationId",
                    });
                }
                HubMessage::StreamInvocation(invocation)
            }
        }
        2 => {
            needs(4, "item")?;
            HubMessage::StreamItem(StreamItem {
                headers: r.headers()?,
                invocation_id: r.str("invocationId")?.to_owned(),
                item: r.value(0)?,
            })
        }
        3 => {
            needs(4, "resultKind")?;
            let headers = r.headers()?;
            let invocation_id = r.str("invocationId")?.to_owned();
            let outcome = match r.uint("resultKind")? {
                RESULT_ERROR => {
                    needs(5, "error")?;
                    CompletionOutcome::Error(r.str("error")?.to_owned())
                }
                RESULT_VOID => CompletionOutcome::Void,
                RESULT_VALUE => {
                    needs(5, "result")?;
                    CompletionOutcome::Result(r.value(0)?)
                }
                _ => {
                    return Err(MessageError::WrongType {
                        field: "resultKind",
                        expected: "1, 2 or 3",
                    })
                }
            };
            HubMessage::Completion(Completion {
                headers,
                invocation_id,
                outcome,
            })
        }
        5 => {
            needs(3, "invocationId")?;
            HubMessage::CancelInvocation(CancelInvocation {
                headers: r.headers()?,
                invocation_id: r.str("invocationId")?.to_owned(),
            })
        }
        6 => HubMessage::Ping,
        7 => {
            needs(2, "error")?;
            let error = r.optional_str("error")?.map(str::to_owned);
            let allow_reconnect = if len > 2 {
                r.bool("allowReconnect")?
            } else {
                false
            };
            HubMessage::Close(Close {
                error,
                allow_reconnect,
            })
        }
        8 | 9 => {
            needs(2, "sequenceId")?;
            let sequence_id = r.uint("sequenceId")?;
            if message_type == 8 {
                HubMessage::Ack { sequence_id }
            } else {
                HubMessage::Sequence { sequence_id }
            }
        }
        _ => return Ok(None),
    };
    Ok(Some(message))
}

/// A cursor over one MessagePack body; every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

fn truncated() -> MessageError {
    MessageError::MessagePack("unexpected end of data".into())
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], MessageError> {
        let end = self.pos.checked_add(n).ok_or_else(truncated)?;
        let bytes = self.buf.get(self.pos..end).ok_or_else(truncated)?;
        self.pos = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8, MessageError> {
        Ok(self.take(1)?[0])
    }

    fn be<const N: usize>(&mut self) -> Result<[u8; N], MessageError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn len_u8(&mut self) -> Result<usize, MessageError> {
        Ok(usize::from(self.u8()?))
    }

    fn len_u16(&mut self) -> Result<usize, MessageError> {
        Ok(usize::from(u16::from_be_bytes(self.be()?)))
    }

    fn len_u32(&mut self) -> Result<usize, MessageError> {
        Ok(u32::from_be_bytes(self.be()?) as usize)
    }

    fn marker(&mut self) -> Result<Marker, MessageError> {
        Ok(Marker::from_u8(self.u8()?))
    }

    /// A collection can't have more elements than bytes left (each takes at least one),
    /// so a hostile length never makes us reserve more than the input size.
    fn capacity_for(&self, count: usize) -> usize {
        count.min(self.buf.len() - self.pos)
    }

    fn value(&mut self, depth: usize) -> Result<Value, MessageError> {
        if depth > MAX_DEPTH {
            return Err(MessageError::MessagePack(format!(
                "value nested deeper than {MAX_DEPTH} levels"
            )));
        }
        Ok(match self.marker()? {
            Marker::Null => Value::Null,
            Marker::True => Value::Bool(true),
            Marker::False => Value::Bool(false),
            Marker::FixPos(n) => Value::Int(i64::from(n)),
            Marker::FixNeg(n) => Value::Int(i64::from(n)),
            Marker::U8 => Value::Int(i64::from(self.u8()?)),
            Marker::U16 => Value::Int(i64::from(u16::from_be_bytes(self.be()?))),
            Marker::U32 => Value::Int(i64::from(u32::from_be_bytes(self.be()?))),
            Marker::U64 => Value::from_u64(u64::from_be_bytes(self.be()?)),
            Marker::I8 => Value::Int(i64::from(i8::from_be_bytes(self.be()?))),
            Marker::I16 => Value::Int(i64::from(i16::from_be_bytes(self.be()?))),
            Marker::I32 => Value::Int(i64::from(i32::from_be_bytes(self.be()?))),
            Marker::I64 => Value::Int(i64::from_be_bytes(self.be()?)),
            Marker::F32 => Value::Float(f64::from(f32::from_be_bytes(self.be()?))),
            Marker::F64 => Value::Float(f64::from_be_bytes(self.be()?)),
            Marker::FixStr(n) => self.utf8(usize::from(n))?,
            Marker::Str8 => {
                let n = self.len_u8()?;
                self.utf8(n)?
            }
            Marker::Str16 => {
                let n = self.len_u16()?;
                self.utf8(n)?
            }
            Marker::Str32 => {
                let n = self.len_u32()?;
                self.utf8(n)?
            }
            Marker::Bin8 => {
                let n = self.len_u8()?;
                Value::Binary(self.take(n)?.to_vec())
            }
            Marker::Bin16 => {
                let n = self.len_u16()?;
                Value::Binary(self.take(n)?.to_vec())
            }
            Marker::Bin32 => {
                let n = self.len_u32()?;
                Value::Binary(self.take(n)?.to_vec())
            }
            Marker::FixArray(n) => self.array(usize::from(n), depth)?,
            Marker::Array16 => {
                let n = self.len_u16()?;
                self.array(n, depth)?
            }
            Marker::Array32 => {
                let n = self.len_u32()?;
                self.array(n, depth)?
            }
            Marker::FixMap(n) => self.map(usize::from(n), depth)?,
            Marker::Map16 => {
                let n = self.len_u16()?;
                self.map(n, depth)?
            }
            Marker::Map32 => {
                let n = self.len_u32()?;
                self.map(n, depth)?
            }
            Marker::FixExt1 => self.ext(1)?,
            Marker::FixExt2 => self.ext(2)?,
            Marker::FixExt4 => self.ext(4)?,
            Marker::FixExt8 => self.ext(8)?,
            Marker::FixExt16 => self.ext(16)?,
            Marker::Ext8 => {
                let n = self.len_u8()?;
                self.ext(n)?
            }
            Marker::Ext16 => {
                let n = self.len_u16()?;
                self.ext(n)?
            }
            Marker::Ext32 => {
                let n = self.len_u32()?;
                self.ext(n)?
            }
            Marker::Reserved => {
                return Err(MessageError::MessagePack("reserved marker 0xc1".into()));
            }
        })
    }

    fn utf8(&mut self, n: usize) -> Result<Value, MessageError> {
        let bytes = self.take(n)?;
        let text = std::str::from_utf8(bytes)
            .map_err(|_| MessageError::MessagePack("string is not valid UTF-8".into()))?;
        Ok(Value::Str(text.to_owned()))
    }

    fn array(&mut self, n: usize, depth: usize) -> Result<Value, MessageError> {
        let mut items = Vec::with_capacity(self.capacity_for(n));
        for _ in 0..n {
            items.push(self.value(depth + 1)?);
        }
        Ok(Value::Array(items))
    }

    fn map(&mut self, n: usize, depth: usize) -> Result<Value, MessageError> {
        let mut entries = Vec::with_capacity(self.capacity_for(n));
        for _ in 0..n {
            let key = self.value(depth + 1)?;
            let value = self.value(depth + 1)?;
            entries.push((key, value));
        }
        Ok(Value::Map(entries))
    }

    fn ext(&mut self, n: usize) -> Result<Value, MessageError> {
        let tag = i8::from_be_bytes(self.be()?);
        Ok(Value::Ext(tag, self.take(n)?.to_vec()))
    }

    fn str_len(&mut self, marker: Marker) -> Result<Option<usize>, MessageError> {
        Ok(Some(match marker {
            Marker::FixStr(n) => usize::from(n),
            Marker::Str8 => self.len_u8()?,
            Marker::Str16 => self.len_u16()?,
            Marker::Str32 => self.len_u32()?,
            _ => return Ok(None),
        }))
    }

    fn str(&mut self, field: &'static str) -> Result<&'a str, MessageError> {
        self.optional_str(field)?.ok_or(MessageError::WrongType {
            field,
            expected: "a string",
        })
    }

    /// A string, or `None` for nil.
    fn optional_str(&mut self, field: &'static str) -> Result<Option<&'a str>, MessageError> {
        let marker = self.marker()?;
        if marker == Marker::Null {
            return Ok(None);
        }
        let Some(n) = self.str_len(marker)? else {
            return Err(MessageError::WrongType {
                field,
                expected: "a string",
            });
        };
        let bytes = self.take(n)?;
        std::str::from_utf8(bytes)
            .map(Some)
            .map_err(|_| MessageError::MessagePack(format!("'{field}' is not valid UTF-8")))
    }

    fn uint(&mut self, field: &'static str) -> Result<u64, MessageError> {
        match self.value(MAX_DEPTH)? {
            Value::Int(n) if n >= 0 => Ok(n as u64),
            Value::UInt(n) => Ok(n),
            _ => Err(MessageError::WrongType {
                field,
                expected: "a non-negative integer",
            }),
        }
    }

    fn bool(&mut self, field: &'static str) -> Result<bool, MessageError> {
        match self.marker()? {
            Marker::True => Ok(true),
            Marker::False => Ok(false),
            Marker::Null => Ok(false),
            _ => Err(MessageError::WrongType {
                field,
                expected: "a boolean",
            }),
        }
    }

    fn array_len(&mut self, field: &'static str) -> Result<usize, MessageError> {
        match self.marker()? {
            Marker::FixArray(n) => Ok(usize::from(n)),
            Marker::Array16 => self.len_u16(),
            Marker::Array32 => self.len_u32(),
            _ => Err(MessageError::WrongType {
                field,
                expected: "an array",
            }),
        }
    }

    fn arguments(&mut self) -> Result<Vec<Value>, MessageError> {
        let n = self.array_len("arguments")?;
        let mut items = Vec::with_capacity(self.capacity_for(n));
        for _ in 0..n {
            items.push(self.value(1)?);
        }
        Ok(items)
    }

    fn string_array(&mut self, field: &'static str) -> Result<Vec<String>, MessageError> {
        let n = self.array_len(field)?;
        let mut items = Vec::with_capacity(self.capacity_for(n));
        for _ in 0..n {
            items.push(self.str(field)?.to_owned());
        }
        Ok(items)
    }

    /// Headers: a map of strings to strings (nil accepted as empty, as .NET does).
    fn headers(&mut self) -> Result<Headers, MessageError> {
        let n = match self.marker()? {
            Marker::FixMap(n) => usize::from(n),
            Marker::Map16 => self.len_u16()?,
            Marker::Map32 => self.len_u32()?,
            Marker::Null => 0,
            _ => {
                return Err(MessageError::WrongType {
                    field: "headers",
                    expected: "a map",
                })
            }
        };
        let mut headers = Headers::new();
        for _ in 0..n {
            let key = self.str("headers")?.to_owned();
            let value = self.str("headers")?.to_owned();
            headers.insert(key, value);
        }
        Ok(headers)
    }
}

/// Appends `message` with its length prefix.
pub fn encode(message: &HubMessage, out: &mut BytesMut) {
    // Most messages are shorter than 128 bytes: guess a one-byte prefix and move the
    // body only when the guess was wrong.
    let start = out.len();
    out.put_u8(0);
    encode_body(message, out);
    let body_len = out.len() - start - 1;
    let prefix_len = length_prefix_len(body_len);
    if prefix_len > 1 {
        out.put_bytes(0, prefix_len - 1);
        out.copy_within(start + 1..start + 1 + body_len, start + prefix_len);
    }
    let mut prefix = &mut out[start..start + prefix_len];
    write_length_prefix(body_len, &mut prefix);
}

/// Appends the MessagePack body of `message`, without the length prefix, in the
/// reference server's layout (6-element Invocation, 3-element Close, headers as a map).
pub fn encode_body(message: &HubMessage, out: &mut BytesMut) {
    let w = out;
    match message {
        HubMessage::Invocation(inv) | HubMessage::StreamInvocation(inv) => {
            write_array_len(w, 6);
            write_uint(w, u64::from(message.message_type()));
            write_headers(w, &inv.headers);
            match &inv.invocation_id {
                Some(id) => write_str(w, id),
                None => w.put_u8(0xc0),
            }
            write_str(w, &inv.target);
            write_array_len(w, inv.arguments.len());
            for argument in &inv.arguments {
                write_value(w, argument);
            }
            write_array_len(w, inv.stream_ids.len());
            for id in &inv.stream_ids {
                write_str(w, id);
            }
        }
        HubMessage::StreamItem(item) => {
            write_array_len(w, 4);
            write_uint(w, 2);
            write_headers(w, &item.headers);
            write_str(w, &item.invocation_id);
            write_value(w, &item.item);
        }
        HubMessage::Completion(done) => {
            let (len, kind) = match &done.outcome {
                CompletionOutcome::Error(_) => (5, RESULT_ERROR),
                CompletionOutcome::Void => (4, RESULT_VOID),
                CompletionOutcome::Result(_) => (5, RESULT_VALUE),
            };
            write_array_len(w, len);
            write_uint(w, 3);
            write_headers(w, &done.headers);
            write_str(w, &done.invocation_id);
            write_uint(w, kind);
            match &done.outcome {
                CompletionOutcome::Error(error) => write_str(w, error),
                CompletionOutcome::Void => {}
                CompletionOutcome::Result(value) => write_value(w, value),
            }
        }
        HubMessage::CancelInvocation(cancel) => {
            write_array_len(w, 3);
            write_uint(w, 5);
            write_headers(w, &cancel.headers);
            write_str(w, &cancel.invocation_id);
        }
        HubMessage::Ping => {
            write_array_len(w, 1);
            write_uint(w, 6);
        }
        HubMessage::Close(close) => {
            write_array_len(w, 3);
            write_uint(w, 7);
            match &close.error {
                Some(error) => write_str(w, error),
                None => w.put_u8(0xc0),
            }
            w.put_u8(if close.allow_reconnect { 0xc3 } else { 0xc2 });
        }
        HubMessage::Ack { sequence_id } | HubMessage::Sequence { sequence_id } => {
            write_array_len(w, 2);
            write_uint(w, u64::from(message.message_type()));
            write_uint(w, *sequence_id);
        }
    }
}

fn write_headers(w: &mut BytesMut, headers: &Headers) {
    write_map_len(w, headers.len());
    for (key, value) in headers {
        write_str(w, key);
        write_str(w, value);
    }
}

/// Writes one value in the smallest format, as rmp and @msgpack/msgpack do.
pub fn write_value(w: &mut BytesMut, value: &Value) {
    match value {
        Value::Null => w.put_u8(0xc0),
        Value::Bool(false) => w.put_u8(0xc2),
        Value::Bool(true) => w.put_u8(0xc3),
        Value::Int(n) if *n >= 0 => write_uint(w, *n as u64),
        Value::Int(n) => write_negative(w, *n),
        Value::UInt(n) => write_uint(w, *n),
        Value::Float(f) => {
            w.put_u8(0xcb);
            w.put_f64(*f);
        }
        Value::Str(s) => write_str(w, s),
        Value::Binary(data) => {
            write_sized(w, data.len(), [None, Some(0xc4), Some(0xc5), Some(0xc6)]);
            w.put_slice(data);
        }
        Value::Array(items) => {
            write_array_len(w, items.len());
            for item in items {
                write_value(w, item);
            }
        }
        Value::Map(entries) => {
            write_map_len(w, entries.len());
            for (key, value) in entries {
                write_value(w, key);
                write_value(w, value);
            }
        }
        Value::Ext(tag, data) => {
            match data.len() {
                1 => w.put_u8(0xd4),
                2 => w.put_u8(0xd5),
                4 => w.put_u8(0xd6),
                8 => w.put_u8(0xd7),
                16 => w.put_u8(0xd8),
                n => write_sized(w, n, [None, Some(0xc7), Some(0xc8), Some(0xc9)]),
            }
            w.put_i8(*tag);
            w.put_slice(data);
        }
    }
}

fn write_uint(w: &mut BytesMut, n: u64) {
    match n {
        0..=0x7f => w.put_u8(n as u8),
        0x80..=0xff => {
            w.put_u8(0xcc);
            w.put_u8(n as u8);
        }
        0x100..=0xffff => {
            w.put_u8(0xcd);
            w.put_u16(n as u16);
        }
        0x1_0000..=0xffff_ffff => {
            w.put_u8(0xce);
            w.put_u32(n as u32);
        }
        _ => {
            w.put_u8(0xcf);
            w.put_u64(n);
        }
    }
}

fn write_negative(w: &mut BytesMut, n: i64) {
    if n >= -32 {
        w.put_i8(n as i8);
    } else if n >= i64::from(i8::MIN) {
        w.put_u8(0xd0);
        w.put_i8(n as i8);
    } else if n >= i64::from(i16::MIN) {
        w.put_u8(0xd1);
        w.put_i16(n as i16);
    } else if n >= i64::from(i32::MIN) {
        w.put_u8(0xd2);
        w.put_i32(n as i32);
    } else {
        w.put_u8(0xd3);
        w.put_i64(n);
    }
}

fn write_str(w: &mut BytesMut, s: &str) {
    let fix = (s.len() < 32).then_some(0xa0 | s.len() as u8);
    write_sized(w, s.len(), [fix, Some(0xd9), Some(0xda), Some(0xdb)]);
    w.put_slice(s.as_bytes());
}

fn write_array_len(w: &mut BytesMut, n: usize) {
    let fix = (n < 16).then_some(0x90 | n as u8);
    write_sized(w, n, [fix, None, Some(0xdc), Some(0xdd)]);
}

fn write_map_len(w: &mut BytesMut, n: usize) {
    let fix = (n < 16).then_some(0x80 | n as u8);
    write_sized(w, n, [fix, None, Some(0xde), Some(0xdf)]);
}

/// Writes a length in the smallest of the given forms: `[fix, 8-bit, 16-bit, 32-bit]`
/// markers, where `fix` already holds the length and absent forms are skipped.
fn write_sized(w: &mut BytesMut, n: usize, markers: [Option<u8>; 4]) {
    match markers {
        [Some(fix), ..] => w.put_u8(fix),
        [_, Some(m8), ..] if n <= 0xff => {
            w.put_u8(m8);
            w.put_u8(n as u8);
        }
        [_, _, Some(m16), _] if n <= 0xffff => {
            w.put_u8(m16);
            w.put_u16(n as u16);
        }
        [.., Some(m32)] => {
            w.put_u8(m32);
            // Lengths above 4 GiB cannot occur: every message is bounded far below.
            w.put_u32(n as u32);
        }
        [..] => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::HubProtocol;

    fn encoded(message: &HubMessage) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode(message, &mut out);
        out.to_vec()
    }

    #[test]
    fn length_prefixes_match_the_spec_table() {
        for (value, bytes) in [
            (2usize, &[0x02u8][..]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (300, &[0xac, 0x02]),
            (16384, &[0x80, 0x80, 0x01]),
            (MAX_LENGTH_PREFIX, &[0xff, 0xff, 0xff, 0xff, 0x07]),
        ] {
            let mut out = Vec::new();
            write_length_prefix(value, &mut out);
            assert_eq!(out, bytes, "prefix of {value}");
            assert_eq!(length_prefix_len(value), bytes.len());
            assert_eq!(read_length_prefix(bytes), Ok(Some((value, bytes.len()))));
        }
        assert_eq!(
            read_length_prefix(&[0xff, 0xff, 0xff, 0xff, 0x08]),
            Err(MessageError::LengthPrefix)
        );
        assert_eq!(read_length_prefix(&[0x80, 0x80]), Ok(None));
    }

    #[test]
    fn writes_the_spec_examples() {
        let broadcast = HubMessage::invocation("ReceiveMessage", vec!["hi".into()]);
        let mut expected = vec![0x18, 0x96, 0x01, 0x80, 0xc0, 0xae];
        expected.extend_from_slice(b"ReceiveMessage");
        expected.extend_from_slice(&[0x91, 0xa2, b'h', b'i', 0x90]);
        assert_eq!(encoded(&broadcast), expected);
        let void = HubMessage::completion("0", CompletionOutcome::Void);
        assert_eq!(encoded(&void), [0x06, 0x94, 0x03, 0x80, 0xa1, 0x30, 0x02]);
        assert_eq!(encoded(&HubMessage::Ping), [0x02, 0x91, 0x06]);
    }

    #[test]
    fn reads_what_the_js_client_writes() {
        // Client stop: [7, nil]; a 5-element invocation; headers as nil.
        let (messages, used) = HubProtocol::MessagePack
            .decode_all(&[0x03, 0x92, 0x07, 0xc0], 1024)
            .unwrap();
        assert_eq!(used, 4);
        assert_eq!(messages, vec![HubMessage::Close(Close::default())]);
        let body = [
            0x95, 0x01, 0xc0, 0xa1, b'7', 0xa1, b'F', 0x91, 0xcd, 0x01, 0x00,
        ];
        let expected = HubMessage::Invocation(Invocation {
            invocation_id: Some("7".into()),
            target: "F".into(),
            arguments: vec![Value::Int(256)],
            ..Invocation::default()
        });
        assert_eq!(parse(&body), Ok(Some(expected)));
    }

    #[test]
    fn long_bodies_get_longer_prefixes() {
        let big = HubMessage::invocation("T", vec![Value::Str("x".repeat(300))]);
        let bytes = encoded(&big);
        let (messages, used) = HubProtocol::MessagePack
            .decode_all(&bytes, 1 << 20)
            .unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(messages, vec![big]);
    }

    #[test]
    fn hostile_lengths_are_errors_not_allocations() {
        // An array claiming 2^32-1 elements in a 6-byte body.
        assert!(parse(&[0x93, 0x01, 0x80, 0xdd, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert_eq!(split_record(&[0x00], 10), Err(MessageError::Empty));
        assert_eq!(
            split_record(&[0x0b], 10),
            Err(MessageError::TooLarge { limit: 10 })
        );
        let mut deep = vec![0x91u8; 200];
        deep.push(0xc0);
        let mut body = vec![0x95, 0x01, 0x80, 0xc0, 0xa1, b'x', 0x91];
        body.extend_from_slice(&deep);
        assert!(matches!(parse(&body), Err(MessageError::MessagePack(_))));
    }

    #[test]
    fn values_encode_like_rmp() {
        let samples = [
            Value::Int(0),
            Value::Int(127),
            Value::Int(128),
            Value::Int(65_536),
            Value::Int(-33),
            Value::Int(-129),
            Value::Int(i64::MIN),
            Value::UInt(u64::MAX),
            Value::Str("a".repeat(40)),
            Value::Str("b".repeat(70_000)),
        ];
        for sample in samples {
            let mut ours = BytesMut::new();
            write_value(&mut ours, &sample);
            let mut theirs = Vec::new();
            match &sample {
                Value::Int(n) => {
                    rmp::encode::write_sint(&mut theirs, *n).unwrap();
                }
                Value::UInt(n) => {
                    rmp::encode::write_uint(&mut theirs, *n).unwrap();
                }
                Value::Str(s) => rmp::encode::write_str(&mut theirs, s).unwrap(),
                _ => unreachable!(),
            }
            assert_eq!(&ours[..], &theirs[..], "{sample:?}");
        }
    }
}
