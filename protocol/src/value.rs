//! The protocol-neutral argument value carried by hub messages.
//!
//! A JSON client may send to a group that also holds MessagePack clients, so arguments
//! are decoded into one model that both encodings can write. MessagePack is the richer
//! format (binary, extension types, non-string map keys); the JSON encoder maps those
//! the way the reference server does (binary as base64, timestamps as ISO 8601 text).

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

/// Nesting deeper than this is refused by the decoders (stack safety against hostile input).
pub const MAX_DEPTH: usize = 100;

/// One argument, result or stream item.
///
/// Integers are canonical: every integer that fits `i64` is [`Value::Int`]; only
/// integers above `i64::MAX` are [`Value::UInt`].
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum Value {
    /// JSON `null`, MessagePack nil; also what `()` and `None` become.
    Null,
    /// A boolean.
    Bool(bool),
    /// Any integer that fits `i64`, positive ones included.
    Int(i64),
    /// Only integers above `i64::MAX` (see [`Value::from_u64`]).
    UInt(u64),
    /// A floating-point number; JSON numbers with a fraction or exponent land here.
    /// NaN and the infinities, which JSON cannot write, go to JSON clients as `null`.
    Float(f64),
    /// A string.
    Str(String),
    /// MessagePack bin; written to JSON clients as base64 text, as the reference
    /// server does.
    Binary(Vec<u8>),
    /// An array, in order.
    Array(Vec<Value>),
    /// Entries in wire order; keys are strings in JSON, any value in MessagePack.
    Map(Vec<(Value, Value)>),
    /// A MessagePack extension: type tag and raw data (tag -1 is the timestamp).
    Ext(i8, Vec<u8>),
}

/// The MessagePack extension type of timestamps (JS `Date`, .NET `DateTime`).
pub const TIMESTAMP_EXT: i8 = -1;

impl Value {
    /// An unsigned integer in canonical form.
    pub fn from_u64(n: u64) -> Value {
        match i64::try_from(n) {
            Ok(i) => Value::Int(i),
            Err(_) => Value::UInt(n),
        }
    }

    /// The text of a [`Value::Str`]; `None` for any other kind (no conversion).
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The items of a [`Value::Array`]; `None` for any other kind.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A name for error messages ("expected a string, got an array").
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) | Value::UInt(_) | Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Binary(_) => "binary data",
            Value::Array(_) => "an array",
            Value::Map(_) => "an object",
            Value::Ext(..) => "an extension value",
        }
    }

    /// Nesting depth: 0 for scalars, 1 for a flat array or map.
    pub fn depth(&self) -> usize {
        match self {
            Value::Array(items) => 1 + items.iter().map(Value::depth).max().unwrap_or(0),
            Value::Map(entries) => {
                1 + entries
                    .iter()
                    .map(|(k, v)| k.depth().max(v.depth()))
                    .max()
                    .unwrap_or(0)
            }
            _ => 0,
        }
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Str(s.to_owned())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Str(s)
    }
}

impl From<i64> for Value {
    fn from(n: i64) -> Self {
        Value::Int(n)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

impl From<f64> for Value {
    fn from(f: f64) -> Self {
        Value::Float(f)
    }
}

// ---- JSON mapping (serde) ----

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Null => serializer.serialize_unit(),
            Value::Bool(b) => serializer.serialize_bool(*b),
            Value::Int(n) => serializer.serialize_i64(*n),
            Value::UInt(n) => serializer.serialize_u64(*n),
            // JSON has no NaN or infinity; JSON.stringify writes null for them too.
            Value::Float(f) if !f.is_finite() => serializer.serialize_unit(),
            Value::Float(f) => serializer.serialize_f64(*f),
            Value::Str(s) => serializer.serialize_str(s),
            Value::Binary(b) => serializer.serialize_str(&base64_standard(b)),
            Value::Array(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Value::Map(entries) => {
                let mut map = serializer.serialize_map(Some(entries.len()))?;
                for (key, value) in entries {
                    map.serialize_entry(&JsonKey(key), value)?;
                }
                map.end()
            }
            Value::Ext(TIMESTAMP_EXT, data) => match decode_timestamp(data) {
                Some((secs, nanos)) => serializer.serialize_str(&iso8601_millis(secs, nanos)),
                None => serializer.serialize_str(&base64_standard(data)),
            },
            Value::Ext(_, data) => serializer.serialize_str(&base64_standard(data)),
        }
    }
}

/// A map key written as a JSON object key: strings as they are, numbers, booleans and
/// null as their text, composite keys (MessagePack allows any) as [`key_text`].
struct JsonKey<'a>(&'a Value);

impl Serialize for JsonKey<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Str(s) => serializer.serialize_str(s),
            other => {
                let mut text = String::new();
                key_text(other, &mut text);
                serializer.serialize_str(&text)
            }
        }
    }
}

/// A JSON-like rendering of a key in one pass, strings unescaped. Rendering nested
/// keys as escaped JSON instead would double the escapes at every level: a hostile
/// MessagePack client could make one small message expand exponentially (found by
/// the `roundtrip` fuzz target).
fn key_text(value: &Value, out: &mut String) {
    use std::fmt::Write;
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => {
            let _ = write!(out, "{b}");
        }
        Value::Int(n) => {
            let _ = write!(out, "{n}");
        }
        Value::UInt(n) => {
            let _ = write!(out, "{n}");
        }
        Value::Float(f) => {
            let _ = write!(out, "{f}");
        }
        Value::Str(s) => out.push_str(s),
        Value::Binary(data) | Value::Ext(_, data) => out.push_str(&base64_standard(data)),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                key_text(item, out);
            }
            out.push(']');
        }
        Value::Map(entries) => {
            out.push('{');
            for (i, (k, v)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                key_text(k, out);
                out.push(':');
                key_text(v, out);
            }
            out.push('}');
        }
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
        Ok(Value::Int(n))
    }

    fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
        Ok(Value::from_u64(n))
    }

    fn visit_f64<E>(self, f: f64) -> Result<Value, E> {
        Ok(Value::Float(f))
    }

    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::Str(s.to_owned()))
    }

    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::Str(s))
    }

    fn visit_bytes<E>(self, b: &[u8]) -> Result<Value, E> {
        Ok(Value::Binary(b.to_vec()))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Value::deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
        while let Some((key, value)) = map.next_entry::<String, Value>()? {
            entries.push((Value::Str(key), value));
        }
        Ok(Value::Map(entries))
    }
}

// ---- helpers for the JSON mapping of MessagePack-only kinds ----

fn base64_standard(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Decodes the MessagePack timestamp extension (32, 64 or 96 bit) into (seconds, nanoseconds).
pub fn decode_timestamp(data: &[u8]) -> Option<(i64, u32)> {
    match data.len() {
        4 => Some((i64::from(u32::from_be_bytes(data.try_into().ok()?)), 0)),
        8 => {
            let raw = u64::from_be_bytes(data.try_into().ok()?);
            let nanos = (raw >> 34) as u32;
            let secs = (raw & 0x3_ffff_ffff) as i64;
            (nanos < 1_000_000_000).then_some((secs, nanos))
        }
        12 => {
            let nanos = u32::from_be_bytes(data[..4].try_into().ok()?);
            let secs = i64::from_be_bytes(data[4..].try_into().ok()?);
            (nanos < 1_000_000_000).then_some((secs, nanos))
        }
        _ => None,
    }
}

/// `1970-01-01T00:00:00.000Z` style text, as JavaScript's `Date.toISOString()` writes.
fn iso8601_millis(secs: i64, nanos: u32) -> String {
    let days = secs.div_euclid(86_400);
    let secs_of_day = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        secs_of_day / 3600,
        secs_of_day / 60 % 60,
        secs_of_day % 60,
        nanos / 1_000_000
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_render_like_javascript_dates() {
        assert_eq!(iso8601_millis(0, 0), "1970-01-01T00:00:00.000Z");
        // 2024-02-29T12:34:56.789Z
        assert_eq!(
            iso8601_millis(1_709_210_096, 789_000_000),
            "2024-02-29T12:34:56.789Z"
        );
        assert_eq!(iso8601_millis(-1, 0), "1969-12-31T23:59:59.000Z");
    }

    #[test]
    fn timestamp_ext_formats_decode() {
        assert_eq!(decode_timestamp(&[0, 0, 0, 5]), Some((5, 0)));
        let raw: u64 = (7u64 << 34) | 9;
        assert_eq!(decode_timestamp(&raw.to_be_bytes()), Some((9, 7)));
        let mut twelve = 3u32.to_be_bytes().to_vec();
        twelve.extend_from_slice(&(-4i64).to_be_bytes());
        assert_eq!(decode_timestamp(&twelve), Some((-4, 3)));
        assert_eq!(decode_timestamp(&[1, 2, 3]), None);
    }

    #[test]
    fn binary_and_timestamps_map_to_json_text() {
        let v = Value::Array(vec![
            Value::Binary(vec![1, 2, 3]),
            Value::Ext(TIMESTAMP_EXT, vec![0, 0, 0, 0]),
            Value::Map(vec![(Value::Int(4), Value::Float(f64::NAN))]),
        ]);
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            r#"["AQID","1970-01-01T00:00:00.000Z",{"4":null}]"#
        );
    }

    #[test]
    fn nested_composite_keys_stay_linear_in_json() {
        // Maps keyed by maps keyed by maps...: the JSON text must grow linearly.
        let mut value = Value::from("x\"y");
        for _ in 0..30 {
            value = Value::Map(vec![(value.clone(), Value::Int(1))]);
        }
        let text = serde_json::to_string(&value).unwrap();
        assert!(text.len() < 400, "{} bytes", text.len());
        let keyed = Value::Map(vec![(
            Value::Array(vec![Value::Int(1), Value::from("a")]),
            Value::Null,
        )]);
        assert_eq!(serde_json::to_string(&keyed).unwrap(), r#"{"[1,a]":null}"#);
    }

    #[test]
    fn depth_counts_nesting() {
        assert_eq!(Value::Int(1).depth(), 0);
        let nested = Value::Array(vec![Value::Map(vec![(
            Value::from("a"),
            Value::Array(vec![]),
        )])]);
        assert_eq!(nested.depth(), 3);
    }
}
